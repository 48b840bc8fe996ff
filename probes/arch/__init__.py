"""The narrow interface every arch implements (arch_prepare_kprobe & co.), and the table
that picks the implementation for a machine. The core never asks which arch it is."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from emu.machine import Machine
    from emu.symbols import Symbol
    from probes.kprobes import Kprobe


class ArchKprobes(Protocol):
    """Names follow arch_*_kprobe. `p.ainsn` is an ArchSpecificInsn (probes/arch/common.py):
    its `handler` simulates/emulates the instruction on pt_regs, or its `slot` holds the
    copy that is stepped, ending in a trap at `ss_trap`; execution resumes after the
    probed instruction (`addr + length`)."""

    def adjust_kprobe_addr(self, addr: int, sym: "Symbol") -> tuple[int, bool]: ...
    def prepare(self, p: "Kprobe") -> None: ...          # raises KprobeError(EINVAL|EILSEQ|...)
    def arm(self, p: "Kprobe") -> None: ...
    def disarm(self, p: "Kprobe") -> None: ...
    def remove(self, p: "Kprobe") -> None: ...
    def handler_ip(self, p: "Kprobe") -> int: ...        # the ip pre handlers see
    def in_slot(self, p: "Kprobe", addr: int) -> bool: ...
    def owns(self, addr: int) -> bool: ...


_IMPLS = {
    "arm64": "probes.arch.arm64.kprobes:Arm64Kprobes",
    "x86_64": "probes.arch.x86_64.kprobes:X86Kprobes",
}


def get_arch_kprobes(machine: "Machine") -> ArchKprobes:
    module, _, cls = _IMPLS[machine.arch.name].partition(":")
    return getattr(importlib.import_module(module), cls)(machine)
