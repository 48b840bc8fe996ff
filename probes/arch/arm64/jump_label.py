"""arm64 jump labels (arch/arm64/kernel/jump_label.c): a site is one 4-byte instruction,
NOP or `B target`, patched in place (aarch64_insn_patch_text_nosync)."""
from __future__ import annotations

from probes.errors import KprobeError

AARCH64_INSN_NOP = 0xD503201F
_B = 0x14000000


class Arm64JumpLabel:
    jump_label_nop_size = 4

    def arch_jump_label_transform(self, code: int, target: int, enable: bool) -> bytes:
        if not enable:
            return AARCH64_INSN_NOP.to_bytes(4, "little")
        off = target - code
        if off % 4 or not -(1 << 27) <= off < (1 << 27):
            raise KprobeError(22, f"jump label at {code:#x}: target {target:#x} out of B range")
        return (_B | ((off >> 2) & 0x3FFFFFF)).to_bytes(4, "little")
