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

    def lengths(self, code: bytes, addr: int):
        """(address, length) of each instruction decoded linearly from `addr`."""
        off = 0
        while off < len(code):
            insn = next(self.cs.disasm_lite(code[off:off + 16], addr + off, 1), None)
            if insn is None:
                return
            yield addr + off, insn[1]
            off += insn[1]

    @staticmethod
    def _convert(insn) -> X86Insn:
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


def _has_modrm(insn) -> bool:
    return insn.modrm_offset != 0 if hasattr(insn, "modrm_offset") else insn.modrm != 0


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


EOPNOTSUPP = errno.EOPNOTSUPP
