"""Per-arch facts of the machine, picked once by name (like Unicorn's arch table).

The rest of emu/ asks the `Arch` object and never branches on the architecture."""
from __future__ import annotations

from emu.arch.base import Arch
from emu.errors import UsageError


def get_arch(name: str) -> Arch:
    """The Arch for `arm64`/`aarch64` or `x86_64`/`amd64`."""
    from emu.arch.arm64 import ARM64
    from emu.arch.x86_64 import X86_64

    table = {"arm64": ARM64, "aarch64": ARM64, "x86_64": X86_64, "amd64": X86_64, "x86-64": X86_64}
    try:
        return table[name.lower()]
    except KeyError:
        raise UsageError(f"unsupported architecture {name!r} (arm64 or x86_64)") from None


def arch_for_elf_machine(e_machine: str) -> Arch | None:
    for name in ("arm64", "x86_64"):
        arch = get_arch(name)
        if arch.elf_machine == e_machine:
            return arch
    return None


ARCH_NAMES = ("arm64", "x86_64")

__all__ = ["Arch", "get_arch", "arch_for_elf_machine", "ARCH_NAMES"]
