"""The exception tree. Every error a user can cause is a KprobeEmuError: the CLI prints
its message on one line and exits with `exit_code`."""
from __future__ import annotations


class KprobeEmuError(Exception):
    """Root of all kprobe-emu errors. `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(KprobeEmuError):
    """Bad command line or input file (missing, wrong format)."""

    exit_code = 2


class ElfError(UsageError):
    """The file is not an ELF we can load (truncated, wrong machine, dynamic, ...)."""


class GuestFault(KprobeEmuError):
    """The guest did something the machine cannot continue from."""

    exit_code = 139
