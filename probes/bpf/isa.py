"""The eBPF instruction set: constants, the instruction record and its encoding.

Mirrors include/uapi/linux/bpf.h and bpf_common.h (RFC 9669 for the v4
additions). The table ``OPCODES`` says, for every valid opcode, which
fields it uses; everything the table does not list is an invalid opcode,
and a used-as-zero field that is not zero is a "reserved field" error, as
in the kernel's check in do_check(). Left out: classic BPF, may_goto (0xe5)
and kfunc calls beyond decoding them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

# Instruction classes (low 3 bits of the opcode)
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_JMP32 = 0x06
BPF_ALU64 = 0x07

# Load/store size (bits 3-4)
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_DW = 0x18

# Load/store mode (bits 5-7)
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MEM = 0x60
BPF_MEMSX = 0x80
BPF_ATOMIC = 0xC0

# Source operand (bit 3)
BPF_K = 0x00
BPF_X = 0x08

# ALU operations (bits 4-7)
BPF_ADD = 0x00
BPF_SUB = 0x10
BPF_MUL = 0x20
BPF_DIV = 0x30
BPF_OR = 0x40
BPF_AND = 0x50
BPF_LSH = 0x60
BPF_RSH = 0x70
BPF_NEG = 0x80
BPF_MOD = 0x90
BPF_XOR = 0xA0
BPF_MOV = 0xB0
BPF_ARSH = 0xC0
BPF_END = 0xD0

# BPF_END source bit: convert to little (0) or big (1) endian
BPF_TO_LE = 0x00
BPF_TO_BE = 0x08

# Jump operations (bits 4-7)
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_JNE = 0x50
BPF_JSGT = 0x60
BPF_JSGE = 0x70
BPF_CALL = 0x80
BPF_EXIT = 0x90
BPF_JLT = 0xA0
BPF_JLE = 0xB0
BPF_JSLT = 0xC0
BPF_JSLE = 0xD0

# Atomic operations (imm of BPF_STX | BPF_ATOMIC)
BPF_FETCH = 0x01
BPF_XCHG = 0xE0 | BPF_FETCH
BPF_CMPXCHG = 0xF0 | BPF_FETCH
BPF_LOAD_ACQ = 0x100
BPF_STORE_REL = 0x110

# lddw pseudo sources (src_reg of BPF_LD | BPF_IMM | BPF_DW)
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_VALUE = 2
BPF_PSEUDO_BTF_ID = 3
BPF_PSEUDO_FUNC = 4
BPF_PSEUDO_MAP_IDX = 5
BPF_PSEUDO_MAP_IDX_VALUE = 6

# call src_reg
BPF_PSEUDO_CALL = 1
BPF_PSEUDO_KFUNC_CALL = 2

# Registers and limits
BPF_REG_0, BPF_REG_1, BPF_REG_2, BPF_REG_3, BPF_REG_4, BPF_REG_5 = range(6)
BPF_REG_6, BPF_REG_7, BPF_REG_8, BPF_REG_9, BPF_REG_10 = range(6, 11)
BPF_REG_FP = BPF_REG_10
MAX_BPF_REG = 11
MAX_BPF_STACK = 512
MAX_CALL_FRAMES = 8
MAX_TAIL_CALL_CNT = 33
BPF_COMPLEXITY_LIMIT_INSNS = 1_000_000
BPF_MAXINSNS = 4096

# Opcodes used by name elsewhere
BPF_LDDW = BPF_LD | BPF_IMM | BPF_DW          # 0x18
BPF_CALL_OP = BPF_JMP | BPF_CALL              # 0x85
BPF_CALLX_OP = BPF_JMP | BPF_CALL | BPF_X     # 0x8d, callx (ISA drafts, uBPF)
BPF_EXIT_OP = BPF_JMP | BPF_EXIT              # 0x95
BPF_JA_OP = BPF_JMP | BPF_JA                  # 0x05
BPF_JA32_OP = BPF_JMP32 | BPF_JA              # 0x06, "gotol"

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

SIZE_BYTES = {BPF_W: 4, BPF_H: 2, BPF_B: 1, BPF_DW: 8}
SIZE_SUFFIX = {BPF_W: "w", BPF_H: "h", BPF_B: "b", BPF_DW: "dw"}

ALU_OP_NAMES = {
    BPF_ADD: "add", BPF_SUB: "sub", BPF_MUL: "mul", BPF_DIV: "div",
    BPF_OR: "or", BPF_AND: "and", BPF_LSH: "lsh", BPF_RSH: "rsh",
    BPF_NEG: "neg", BPF_MOD: "mod", BPF_XOR: "xor", BPF_MOV: "mov",
    BPF_ARSH: "arsh",
}
JMP_OP_NAMES = {
    BPF_JEQ: "jeq", BPF_JGT: "jgt", BPF_JGE: "jge", BPF_JSET: "jset",
    BPF_JNE: "jne", BPF_JSGT: "jsgt", BPF_JSGE: "jsge", BPF_JLT: "jlt",
    BPF_JLE: "jle", BPF_JSLT: "jslt", BPF_JSLE: "jsle",
}
ATOMIC_ALU_OPS = {BPF_ADD: "add", BPF_OR: "or", BPF_AND: "and", BPF_XOR: "xor"}

_INSN = struct.Struct("<BBhi")


def sext32(v: int) -> int:
    """Interpret the low 32 bits of v as a signed integer."""
    v &= U32
    return v - (1 << 32) if v & 0x80000000 else v


def sext64(v: int) -> int:
    """Interpret the low 64 bits of v as a signed integer."""
    v &= U64
    return v - (1 << 64) if v & (1 << 63) else v


@dataclass(frozen=True, slots=True)
class Insn:
    """struct bpf_insn: one 8-byte slot. ``off`` and ``imm`` are signed."""

    code: int
    dst_reg: int = 0
    src_reg: int = 0
    off: int = 0
    imm: int = 0

    @property
    def cls(self) -> int:
        return self.code & 0x07

    @property
    def op(self) -> int:
        return self.code & 0xF0

    @property
    def size(self) -> int:
        return self.code & 0x18

    @property
    def mode(self) -> int:
        return self.code & 0xE0

    @property
    def is_reg_src(self) -> bool:
        return bool(self.code & BPF_X)

    def encode(self) -> bytes:
        regs = (self.dst_reg & 0xF) | ((self.src_reg & 0xF) << 4)
        return _INSN.pack(self.code, regs, self.off, self.imm)


def encode(insns: Iterable[Insn]) -> bytes:
    return b"".join(i.encode() for i in insns)


def decode(code: bytes) -> list[Insn]:
    """Split raw bytecode into slots. Validity is the verifier's business."""
    from .errors import VerifierError

    if len(code) % 8:
        raise VerifierError(f"program length {len(code)} is not a multiple of 8")
    out = []
    for pos in range(0, len(code), 8):
        op, regs, off, imm = _INSN.unpack_from(code, pos)
        out.append(Insn(op, regs & 0xF, regs >> 4, off, imm))
    return out


def lddw_imm64(first: Insn, second: Insn) -> int:
    """The 64-bit constant of an lddw pair."""
    return (first.imm & U32) | ((second.imm & U32) << 32)


# --- the opcode table -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OpSpec:
    """What one opcode is and which fields it may use.

    ``kind`` names the instruction family (the interpreter and verifier
    dispatch on it). ``src``/``dst`` are "reg" (a register number),
    "zero" (must be 0) or a frozenset of allowed values; ``off``/``imm``
    are "any", "zero" or a frozenset.
    """

    kind: str
    dst: object = "reg"
    src: object = "zero"
    off: object = "zero"
    imm: object = "zero"


ZERO_OR_ONE = frozenset({0, 1})
END_WIDTHS = frozenset({16, 32, 64})
ATOMIC_RMW = frozenset(
    [op for op in ATOMIC_ALU_OPS] + [op | BPF_FETCH for op in ATOMIC_ALU_OPS]
    + [BPF_XCHG, BPF_CMPXCHG, BPF_LOAD_ACQ, BPF_STORE_REL])
ATOMIC_ORDERED = frozenset({BPF_LOAD_ACQ, BPF_STORE_REL})


def _alu_specs(cls: int) -> dict[int, OpSpec]:
    kind = "alu64" if cls == BPF_ALU64 else "alu"
    specs = {}
    for op in ALU_OP_NAMES:
        if op == BPF_NEG:
            specs[cls | op] = OpSpec("neg" + kind[3:])
            continue
        signed_ok = ZERO_OR_ONE if op in (BPF_DIV, BPF_MOD) else "zero"
        specs[cls | op | BPF_K] = OpSpec(kind, off=signed_ok, imm="any")
        x_off = signed_ok
        if op == BPF_MOV:  # movsx: sign-extend from 8/16(/32) bits
            x_off = frozenset({0, 8, 16, 32} if cls == BPF_ALU64 else {0, 8, 16})
        specs[cls | op | BPF_X] = OpSpec(kind, src="reg", off=x_off)
    specs[cls | BPF_END | BPF_TO_LE] = OpSpec("end", imm=END_WIDTHS)
    if cls == BPF_ALU:
        specs[cls | BPF_END | BPF_TO_BE] = OpSpec("end", imm=END_WIDTHS)
    return specs


def _mem_specs() -> dict[int, OpSpec]:
    specs = {}
    for size in SIZE_BYTES:
        specs[BPF_LDX | BPF_MEM | size] = OpSpec("ldx", src="reg", off="any")
        specs[BPF_ST | BPF_MEM | size] = OpSpec("st", off="any", imm="any")
        specs[BPF_STX | BPF_MEM | size] = OpSpec("stx", src="reg", off="any")
        if size != BPF_DW:
            specs[BPF_LDX | BPF_MEMSX | size] = OpSpec("ldxsx", src="reg", off="any")
            specs[BPF_LD | BPF_ABS | size] = OpSpec("ldabs", dst="zero", imm="any")
            specs[BPF_LD | BPF_IND | size] = OpSpec("ldind", dst="zero", src="reg", imm="any")
        rmw = ATOMIC_RMW if size in (BPF_W, BPF_DW) else ATOMIC_ORDERED
        specs[BPF_STX | BPF_ATOMIC | size] = OpSpec("atomic", src="reg", off="any", imm=rmw)
    specs[BPF_LDDW] = OpSpec("lddw", src=frozenset(range(7)), imm="any")
    return specs


def _jmp_specs() -> dict[int, OpSpec]:
    specs = {
        BPF_JA_OP: OpSpec("ja", dst="zero", off="any"),
        BPF_JA32_OP: OpSpec("ja32", dst="zero", imm="any"),
        BPF_CALL_OP: OpSpec("call", dst="zero", src=frozenset({0, 1, 2}), imm="any"),
        BPF_CALLX_OP: OpSpec("callx"),
        BPF_EXIT_OP: OpSpec("exit", dst="zero"),
    }
    for cls, kind in ((BPF_JMP, "jmp"), (BPF_JMP32, "jmp32")):
        for op in JMP_OP_NAMES:
            specs[cls | op | BPF_K] = OpSpec(kind, off="any", imm="any")
            specs[cls | op | BPF_X] = OpSpec(kind, src="reg", off="any")
    return specs


OPCODES: dict[int, OpSpec] = {
    **_alu_specs(BPF_ALU), **_alu_specs(BPF_ALU64), **_mem_specs(), **_jmp_specs()}


def _field_ok(rule: object, value: int, is_reg: bool) -> bool:
    if rule == "any":
        return True
    if rule == "zero":
        return value == 0
    if rule == "reg":
        return 0 <= value < MAX_BPF_REG
    return value in rule  # type: ignore[operator]


def check_fields(insn: Insn) -> str | None:
    """Why this single slot is not a valid instruction, or None.

    Register numbers above 10 and non-zero reserved fields are reported as
    the kernel does ("invalid register", "uses reserved fields").
    """
    spec = OPCODES.get(insn.code)
    if spec is None:
        return f"unknown opcode {insn.code:02x}"
    if spec.dst == "reg" and insn.dst_reg >= MAX_BPF_REG:
        return f"R{insn.dst_reg} is invalid (invalid destination register)"
    if spec.src == "reg" and insn.src_reg >= MAX_BPF_REG:
        return f"R{insn.src_reg} is invalid (invalid source register)"
    if spec.kind == "end" and insn.imm not in END_WIDTHS:
        return f"BPF_END uses invalid width {insn.imm}"
    if spec.kind == "atomic" and insn.imm not in spec.imm:  # type: ignore[operator]
        return f"BPF_ATOMIC uses invalid atomic opcode {insn.imm:#x}"
    if spec.kind == "lddw" and insn.src_reg not in spec.src:  # type: ignore[operator]
        return f"invalid BPF_LD_IMM insn (invalid source register {insn.src_reg})"
    for name, rule, value in (("dst_reg", spec.dst, insn.dst_reg),
                              ("src_reg", spec.src, insn.src_reg),
                              ("off", spec.off, insn.off),
                              ("imm", spec.imm, insn.imm)):
        if not _field_ok(rule, value, name.endswith("reg")):
            return f"opcode {insn.code:02x} uses reserved fields ({name}={value})"
    return None


def check_lddw_second(insn: Insn) -> str | None:
    """The second slot of lddw must be all zero but its imm."""
    if insn.code or insn.dst_reg or insn.src_reg or insn.off:
        return "invalid BPF_LD_IMM insn (second half must be zero but imm)"
    return None


def slot_starts(insns: list[Insn]) -> list[bool]:
    """True for slots that begin an instruction (False for lddw second halves)."""
    starts = [True] * len(insns)
    i = 0
    while i < len(insns):
        if insns[i].code == BPF_LDDW:
            if i + 1 < len(insns):
                starts[i + 1] = False
            i += 2
        else:
            i += 1
    return starts
