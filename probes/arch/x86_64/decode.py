"""x86-64 instruction decoding for kprobes (arch/x86/kernel/kprobes/core.c: can_probe,
__copy_instruction, prepare_emulation), on capstone's decoder.

Deviations (safe, documented in README): `ret imm16` (C2) also releases its imm16 bytes
(the kernel's emulation ignores them), and far returns (CA/CB), which the kernel would
emulate as near returns, are refused with -EOPNOTSUPP. PUSHF/POPF with an operand-size
prefix (66 9c/9d) move 2 bytes, as the CPU does (the kernel's emulation moves 8); near
ret/call/jmp/Jcc with that prefix (16-bit ip) are refused with -EOPNOTSUPP."""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Iterator

import capstone
from capstone import x86_const as X

LEGACY_PREFIXES = {0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67}


@dataclass
class X86Insn:
    """The parts of a decoded instruction the kprobe code needs (struct insn)."""
    addr: int
    length: int
    raw: bytes
    prefixes: bytes
    rex: int
    opcode: bytes          # 1-3 opcode bytes
    modrm: int | None
    addr_bytes: int
    rip_disp_offset: int | None    # offset of a RIP-relative disp32 in raw
    text: str

    @property
    def op1(self) -> int:
        return self.opcode[0]


class X86Decoder:
    def __init__(self) -> None:
        self.cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.cs.detail = True

    def decode(self, code: bytes, addr: int) -> X86Insn | None:
        for insn in self.cs.disasm(code, addr, 1):
            return self._convert(insn)
        return None

    def lengths(self, code: bytes, addr: int) -> Iterator[tuple[int, int]]:
        """(address, length) of each instruction decoded linearly from `addr`."""
        off = 0
        while off < len(code):
            insn = next(self.cs.disasm_lite(code[off:off + 16], addr + off, 1), None)
            if insn is None:
                return
            yield addr + off, insn[1]
            off += insn[1]

    @staticmethod
    def _convert(insn: capstone.CsInsn) -> X86Insn:
        raw = bytes(insn.bytes)
        i = 0
        while i < len(raw) and raw[i] in LEGACY_PREFIXES:
            i += 1
        prefixes = raw[:i]
        rex = raw[i] if i < len(raw) and 0x40 <= raw[i] <= 0x4F else 0
        if rex:
            i += 1
        if raw[i] == 0x0F:
            n = 3 if i + 1 < len(raw) and raw[i + 1] in (0x38, 0x3A) else 2
        else:
            n = 1
        opcode = raw[i:i + n]
        modrm = insn.modrm if _has_modrm(insn) else None
        rip = any(op.type == X.X86_OP_MEM and op.mem.base == X.X86_REG_RIP for op in insn.operands)
        return X86Insn(addr=insn.address, length=insn.size, raw=raw, prefixes=prefixes, rex=rex,
                       opcode=opcode, modrm=modrm, addr_bytes=insn.addr_size,
                       rip_disp_offset=insn.disp_offset if rip else None,
                       text=f"{insn.mnemonic} {insn.op_str}".strip())


def _has_modrm(insn: capstone.CsInsn) -> bool:
    return bool(insn.modrm_offset != 0 if hasattr(insn, "modrm_offset") else insn.modrm != 0)


def modrm_reg(modrm: int) -> int:
    return (modrm >> 3) & 7


def modrm_mod(modrm: int) -> int:
    return modrm >> 6


def modrm_rm(modrm: int) -> int:
    return modrm & 7


# Instructions can_probe()/is_exception_insn refuse with -EILSEQ: traps and undefined.
def exception_insn(insn: X86Insn) -> bool:
    op = insn.opcode
    return op[0] in (0xCC, 0xCD, 0xCE, 0xF1) or op[:2] in (b"\x0f\xff", b"\x0f\xb9", b"\x0f\x0b")


def copy_refusal(insn: X86Insn) -> str | None:
    """__copy_instruction(): what cannot be copied to a slot (-EINVAL)."""
    if insn.op1 == 0x17:
        return "POP SS cannot be single-stepped"
    if insn.op1 == 0x8E and insn.modrm is not None and modrm_reg(insn.modrm) == 2:
        return "MOV SS cannot be single-stepped"
    return None


def _ranges(spec: str) -> frozenset[int]:
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    return frozenset(out)


# 0F xx opcodes that may run from a slot with a jmp back (core.c twobyte_is_boostable)
TWOBYTE_BOOSTABLE = _ranges("02-03,06,08-09,1F-23,31,40-4F,60-6B,6E-6F,74-77,7E-7F,90-A1,A3-A5,"
                            "A8-A9,AB-AD,AF-B7,BB-C1,C8-CF,D1-D3,D5,D8-D9,DB-DD,DF,E1-E2,E5,E8-E9,"
                            "EB-ED,EF,F1-F3,F5,F8-FA,FC-FE")
ONEBYTE_NOT_BOOSTABLE = _ranges("62,70-7F,9A,CC-CE,D6,D8-DF,E0-E3,E8-E9,EB,F0-F4")


def can_boost(insn: X86Insn) -> bool:
    """can_boost(): may the instruction run from a slot followed by a jmp back?"""
    if len(insn.opcode) == 2:
        return insn.opcode[1] in TWOBYTE_BOOSTABLE
    if len(insn.opcode) != 1:
        return False
    if 0x2E in insn.prefixes or 0x67 in insn.prefixes:     # CS override, address size
        return False
    op = insn.op1
    if op in ONEBYTE_NOT_BOOSTABLE:
        return False
    reg = modrm_reg(insn.modrm) if insn.modrm is not None else 0
    if op in (0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3):
        return reg != 0b110
    if op in (0xF6, 0xF7):
        return reg != 0b001
    if op == 0xFE:
        return reg in (0b000, 0b001)
    if op == 0xFF:
        return reg in (0b000, 0b001, 0b100)
    return True


EOPNOTSUPP = errno.EOPNOTSUPP
