"""x86-64's live text poke (arch/x86/kernel/alternative.c): text_poke_bp's steps and the
int3 handler's emulation of the instruction being written (probes/text_poke.py)."""
from __future__ import annotations

import struct

from emu.machine import Machine
from emu.uaccess import UserFault, get_user, put_user

INT3 = 0xCC
# x86_nops[n]: the n-byte nop the kernel patches in (arch/x86/kernel/alternative.c)
X86_NOPS = (b"", bytes.fromhex("90"), bytes.fromhex("6690"), bytes.fromhex("0f1f00"),
            bytes.fromhex("0f1f4000"), bytes.fromhex("0f1f440000"),
            bytes.fromhex("660f1f440000"), bytes.fromhex("0f1f8000000000"))

Write = tuple[int, bytes]


def poke_steps(addr: int, data: bytes) -> tuple[list[list[Write]], bool]:
    """text_poke_bp: int3 on the first byte, the tail, the first byte; CPUs meeting the
    int3 meanwhile need the emulation. One byte is one write."""
    if len(data) > 1:
        return [[(addr, bytes((INT3,)))], [(addr + 1, data[1:])], [(addr, data[:1])]], True
    return [[(addr, data)]], False


def poke_emulate(m: Machine, addr: int, insn: bytes) -> bool:
    """int3_emulate_jmp/call/ret/nop of the instruction being written at `addr`."""
    op = insn[0]
    if op == 0xE9 and len(insn) >= 5:
        m.pc = addr + 5 + struct.unpack_from("<i", insn, 1)[0]
    elif op == 0xEB and len(insn) >= 2:
        m.pc = addr + 2 + struct.unpack_from("<b", insn, 1)[0]
    elif op == 0xE8 and len(insn) >= 5:
        sp = m.sp - 8
        try:
            put_user(m.memory, sp, addr + 5, 8)
        except UserFault:
            return False                 # the owner-less trap: reported as a fault
        m.sp, m.pc = sp, addr + 5 + struct.unpack_from("<i", insn, 1)[0]
    elif op == 0xC3:
        try:
            ret = get_user(m.memory, m.sp, 8)
        except UserFault:
            return False
        m.sp, m.pc = m.sp + 8, ret
    elif insn in X86_NOPS[1:]:
        m.pc = addr + len(insn)
    else:
        return False
    return True
