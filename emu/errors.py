"""The product's exception tree. Every error kprobe-emu raises on purpose is an `EmuError`:
the CLI prints its message on one line and exits with `exit_code`. Layers derive their own
errors from it (probes/errors.py, probes/bpf/errors.py) and add the data they carry.

A guest's misbehaviour is not an exception: the machine ends the run with a fault report
(emu/machine.py `Fault`, exit 139)."""
from __future__ import annotations


class EmuError(Exception):
    """Root of all kprobe-emu errors. `exit_code` is what the CLI exits with."""

    exit_code = 1


# The root's first name, kept so code written against it keeps working.
KprobeEmuError = EmuError


class UsageError(EmuError):
    """Bad command line or input file (missing, wrong format)."""

    exit_code = 2


class GuestFault(EmuError):
    """Untrusted input misbehaved outside a guest run (a packet filter's program faulting on a
    packet): reported on one line, exit 139 like a guest fault."""

    exit_code = 139


class ElfError(UsageError):
    """The file is not an ELF we can load (truncated, wrong machine, dynamic, ...)."""


class NotApplicable(EmuError):
    """A feature that does not exist on this architecture (x86 boosting on arm64, arm64's
    BRK immediates on x86): a fact about the arch, not a missing implementation.
    Attributes: `arch` (its name), `feature` (what was asked for)."""

    exit_code = 2

    def __init__(self, arch: str, feature: str) -> None:
        super().__init__(f"{feature}: not applicable on {arch}")
        self.arch, self.feature = arch, feature
