"""Per-arch facts of the machine, picked once by name (like Unicorn's arch table).

The rest of emu/ asks the `Arch` object and never branches on the architecture.
`ARCH_NAMES` is the one list of the architectures; everything that enumerates them
(CLI choices, benchmarks, tests) takes it from here."""
from __future__ import annotations

import importlib

from emu.arch.base import Arch, CpuHost
from emu.errors import UsageError

ARCH_NAMES = ("arm64", "x86_64")
AUTO = "auto"                       # --arch auto: the ELF header says
# Other spellings users and toolchains write for the same architectures.
_ALIASES = {"aarch64": "arm64", "amd64": "x86_64", "x86-64": "x86_64"}


def get_arch(name: str) -> Arch:
    """The Arch for `arm64`/`aarch64` or `x86_64`/`amd64`."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ARCH_NAMES:
        raise UsageError(f"unsupported architecture {name!r} ({' or '.join(ARCH_NAMES)})")
    arch = importlib.import_module(f"emu.arch.{key}").ARCH
    assert isinstance(arch, Arch)
    return arch


def requested_arch(name: str) -> Arch | None:
    """An --arch value: None for `auto` (the ELF header decides), else the Arch."""
    return None if name.lower() == AUTO else get_arch(name)


def arch_for_elf_machine(e_machine: str) -> Arch | None:
    for name in ARCH_NAMES:
        arch = get_arch(name)
        if arch.elf_machine == e_machine:
            return arch
    return None


__all__ = ["Arch", "CpuHost", "get_arch", "requested_arch", "arch_for_elf_machine", "ARCH_NAMES",
           "AUTO"]
