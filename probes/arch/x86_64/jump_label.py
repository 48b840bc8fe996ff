"""x86-64 jump labels (arch/x86/kernel/jump_label.c): a site is a 5-byte NOP
(`0f 1f 44 00 00`) or `jmp rel32` (`e9`). (The kernel also knows the 2-byte forms that
objtool shrinks sites to; the guest header emits only the 5-byte one.)"""
from __future__ import annotations

BYTES_NOP5 = bytes((0x0F, 0x1F, 0x44, 0x00, 0x00))
JMP32_INSN_OPCODE = 0xE9


class X86JumpLabel:
    jump_label_nop_size = 5

    def arch_jump_label_transform(self, code: int, target: int, enable: bool) -> bytes:
        if not enable:
            return BYTES_NOP5
        rel = (target - (code + 5)) & 0xFFFFFFFF
        return bytes((JMP32_INSN_OPCODE,)) + rel.to_bytes(4, "little")
