"""Probe-layer errors carry the kernel's errno and a reason, like UcError/CsError. They sit
under the product's root, emu.errors.KprobeEmuError."""
from __future__ import annotations

import errno as _errno

from emu.errors import KprobeEmuError
from emu.machine import SIGSEGV, Fault
from emu.uaccess import UserFault


class ProbeError(KprobeEmuError):
    """A probe-layer refusal: `errno` is the kernel's (EINVAL, ENOENT, EILSEQ, ...),
    `reason` says why, `where` names the location (SYM+OFF or an address) if known."""

    exit_code = 2

    def __init__(self, err: int, reason: str, where: str = "") -> None:
        self.errno = err
        self.reason = reason
        self.where = where
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{where + ': ' if where else ''}-{name}: {reason}")


class KprobeError(ProbeError):
    """A refused registration (register_kprobe's negative errno)."""


class OptimizeRefused(ProbeError):
    """The arch cannot jump-optimize this probe (can_optimize / prepare_optimized_kprobe
    said no); the probe stays a breakpoint probe and `ainsn.opt_reason` keeps `reason`."""


class NotApplicable(ProbeError):
    """The job has no answer on this arch (e.g. jump labels before they exist)."""


def user_fault(e: UserFault, pc: int) -> Fault:
    """The machine's fault report for a checked access that failed on the guest's behalf,
    worded as the CPU's own fault on that access (emu.machine's memory fault kinds)."""
    return Fault(e.kind, pc, e.addr, SIGSEGV)
