"""arm64's live text poke (arch/arm64/kernel/patching.c): one aligned instruction is one
atomic 32-bit write (aarch64_insn_patch_text_nosync), several go in under stop_machine;
either way one step, and no CPU ever meets a half-written instruction to emulate."""
from __future__ import annotations

from emu.machine import Machine

Write = tuple[int, bytes]


def poke_steps(addr: int, data: bytes) -> tuple[list[list[Write]], bool]:
    return [[(addr, data)]], False


def poke_emulate(m: Machine, addr: int, insn: bytes) -> bool:
    return False
