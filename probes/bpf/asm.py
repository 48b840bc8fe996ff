"""Assembler for the uBPF / bpf_conformance text syntax.

    mov32 %r0, 0          add r1, r2          neg r3
    ldxw r0, [r1+4]       stdw [r10-8], 5     stxb [r1], r2
    lddw r0, 0x1122334455667788               lddw r1, map_fd(3)
    jeq r1, 0, +1         jsgt32 %r1, %r2, label       ja label    ja32 label
    call 1                call local func     call %r2 (callx)     exit
    lock add [r10-8], r1  lock fetch xor32 [r10-4], r1  lock cmpxchg [r10-8], r1
    be16 r0   le32 r0   bswap64 r0   sdiv r0, 3   movsx1664 r0, r1   ldxsb r0, [r1+2]

Registers are written ``%rN`` or ``rN``; ``#`` starts a comment; ``name:``
defines a label, and ``exit`` names the first exit when no label says
otherwise (as the conformance assembler does). Jump offsets count slots, so
an lddw counts two. Numbers follow the conformance assembler's ranges: an
imm32 is a signed decimal or a hex bit pattern up to 0xffffffff, an offset
a signed decimal or hex up to 0xffff.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from .errors import AsmError
from .isa import (
    ALU_OP_NAMES, ATOMIC_ALU_OPS, BPF_ABS, BPF_ALU, BPF_ALU64, BPF_ATOMIC,
    BPF_CALL_OP, BPF_CALLX_OP, BPF_CMPXCHG, BPF_DIV, BPF_DW, BPF_END,
    BPF_EXIT_OP, BPF_FETCH, BPF_IND, BPF_JA32_OP, BPF_JA_OP, BPF_JMP,
    BPF_JMP32, BPF_K, BPF_LD, BPF_LDDW, BPF_LDX, BPF_LOAD_ACQ, BPF_MEM,
    BPF_MEMSX, BPF_MOD, BPF_MOV, BPF_NEG, BPF_PSEUDO_BTF_ID,
    BPF_PSEUDO_FUNC, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX,
    BPF_PSEUDO_MAP_IDX_VALUE, BPF_PSEUDO_MAP_VALUE, BPF_ST, BPF_STORE_REL,
    BPF_STX, BPF_TO_BE, BPF_TO_LE, BPF_W, BPF_X, BPF_XCHG, Insn, JMP_OP_NAMES,
    SIZE_SUFFIX, encode, sext32,
)

_SIZES = {suffix: size for size, suffix in SIZE_SUFFIX.items()}
_ALU_OPS = {name: op for op, name in ALU_OP_NAMES.items()}
_ALU_OPS.update({"sdiv": BPF_DIV, "smod": BPF_MOD})
_JMP_OPS = {name: op for op, name in JMP_OP_NAMES.items()}
_ATOMIC_OPS = {name: op for op, name in ATOMIC_ALU_OPS.items()}
_PSEUDO = {"map_fd": BPF_PSEUDO_MAP_FD, "map_value": BPF_PSEUDO_MAP_VALUE,
           "btf_id": BPF_PSEUDO_BTF_ID, "func": BPF_PSEUDO_FUNC,
           "map_idx": BPF_PSEUDO_MAP_IDX, "map_idx_value": BPF_PSEUDO_MAP_IDX_VALUE}
_REG = re.compile(r"%?r(\d+)$")
_MEM = re.compile(r"\[\s*([%\w]+)\s*(?:([+-])\s*(\w+))?\s*\]$")
_PSEUDO_RE = re.compile(r"(\w+)\((.*)\)$")


@dataclass
class _Slot:
    """One emitted slot, with a label still to resolve (field 'off' or 'imm')."""

    insn: Insn
    line: int
    label: str | None = None
    label_field: str = "off"


@dataclass
class _State:
    slots: list[_Slot] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    first_exit: int | None = None


# --- operand parsing --------------------------------------------------------

def _int(text: str) -> int:
    """Decimal or 0x-hex, with an optional sign (leading zeros are decimal)."""
    m = re.match(r"([+-]?)(0[xX][0-9a-fA-F]+|\d+)$", text.strip())
    if not m:
        raise AsmError(f"Invalid number: {text}")
    digits = m.group(2)
    value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 10)
    return -value if m.group(1) == "-" else value


def parse_imm32(text: str) -> int:
    """An imm32 as the signed value stored in the instruction."""
    value = _int(text)
    if "0x" in text.lower():
        if not -(1 << 31) <= value <= 0xFFFFFFFF:
            raise AsmError(f"Immediate out of 32-bit range: {text}")
        return sext32(value)
    if not -(1 << 31) <= value < (1 << 31):
        raise AsmError(f"Immediate out of 32-bit range: {text}")
    return value


def parse_imm64(text: str) -> int:
    value = _int(text)
    if not -(1 << 63) <= value < (1 << 64):
        raise AsmError(f"Immediate out of 64-bit range: {text}")
    return value & ((1 << 64) - 1)


def parse_off(text: str) -> int:
    value = _int(text)
    if "0x" in text.lower():
        if not -(1 << 15) <= value <= 0xFFFF:
            raise AsmError(f"Offset out of 16-bit range: {text}")
        return value - 0x10000 if value >= 0x8000 else value
    if not -(1 << 15) <= value < (1 << 15):
        raise AsmError(f"Offset out of 16-bit range: {text}")
    return value


def parse_reg(text: str) -> int:
    m = _REG.match(text)
    # Registers 11-15 still encode (4 bits) so that verifier tests can be written.
    if not m or int(m.group(1)) > 15:
        raise AsmError(f"Invalid register: {text}")
    return int(m.group(1))


def is_reg(text: str) -> bool:
    return bool(_REG.match(text))


def parse_mem(text: str) -> tuple[int, int]:
    """``[reg+off]`` -> (reg, off)."""
    m = _MEM.match(text)
    if not m:
        raise AsmError(f"Failed to decode register and offset: {text}")
    reg = parse_reg(m.group(1))
    if not m.group(2):
        return reg, 0
    return reg, parse_off(m.group(2) + m.group(3))


def _split_operands(text: str) -> list[str]:
    """Split on commas and blanks, keeping [..] and (..) groups whole."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                out.append(cur)
            cur = ""
            continue
        cur += ch
    if cur:
        out.append(cur)
    return out


# --- encoders: each takes (state, mnemonic, operands, line) ------------------

def _want(mnemonic: str, ops: list[str], *counts: int) -> None:
    if len(ops) not in counts:
        raise AsmError(f"Invalid number of operands for mnemonic: {mnemonic}")


def _emit(st: _State, insn: Insn, line: int, label: str | None = None,
          label_field: str = "off") -> None:
    st.slots.append(_Slot(insn, line, label, label_field))


def _target(text: str, wide: bool = False) -> tuple[int, str | None]:
    """A jump target: a signed slot offset (16 bits, or 32 in ``imm`` for
    ja32 and local calls) or a label name."""
    if re.match(r"[+-]?(0x[0-9a-fA-F]+|\d+)$", text):
        return (parse_imm32(text) if wide else parse_off(text)), None
    if not re.match(r"[A-Za-z_.$][\w.$]*$", text):
        raise AsmError(f"Invalid label: {text}")
    return 0, text


def _enc_alu(st: _State, mn: str, ops: list[str], line: int) -> None:
    cls = BPF_ALU if mn.endswith("32") else BPF_ALU64
    name = mn[:-2] if mn.endswith("32") else mn
    op = _ALU_OPS[name]
    off = 1 if name in ("sdiv", "smod") else 0
    if op == BPF_NEG:
        _want(mn, ops, 1)
        _emit(st, Insn(cls | BPF_NEG | BPF_K, parse_reg(ops[0])), line)
        return
    _want(mn, ops, 2)
    dst = parse_reg(ops[0])
    if is_reg(ops[1]):
        _emit(st, Insn(cls | op | BPF_X, dst, parse_reg(ops[1]), off), line)
    else:
        _emit(st, Insn(cls | op | BPF_K, dst, 0, off, parse_imm32(ops[1])), line)


def _enc_movsx(st: _State, mn: str, ops: list[str], line: int) -> None:
    _want(mn, ops, 2)
    m = re.match(r"movsx(8|16|32)(32|64)$", mn)
    assert m
    cls = BPF_ALU64 if m.group(2) == "64" else BPF_ALU
    _emit(st, Insn(cls | BPF_MOV | BPF_X, parse_reg(ops[0]), parse_reg(ops[1]),
                   int(m.group(1))), line)


def _enc_end(st: _State, mn: str, ops: list[str], line: int) -> None:
    _want(mn, ops, 1)
    m = re.match(r"(le|be|b?swap)(\d+)$", mn)
    assert m
    code = {"le": BPF_ALU | BPF_END | BPF_TO_LE, "be": BPF_ALU | BPF_END | BPF_TO_BE,
            }.get(m.group(1), BPF_ALU64 | BPF_END | BPF_TO_LE)
    _emit(st, Insn(code, parse_reg(ops[0]), 0, 0, int(m.group(2))), line)


def _enc_ldx(st: _State, mn: str, ops: list[str], line: int) -> None:
    _want(mn, ops, 2)
    signed = mn.startswith("ldxs")
    size = _SIZES[mn[4:] if signed else mn[3:]]
    src, off = parse_mem(ops[1])
    mode = BPF_MEMSX if signed else BPF_MEM
    _emit(st, Insn(BPF_LDX | mode | size, parse_reg(ops[0]), src, off), line)


def _enc_st(st: _State, mn: str, ops: list[str], line: int) -> None:
    _want(mn, ops, 2)
    dst, off = parse_mem(ops[0])
    if mn.startswith("stx"):
        _emit(st, Insn(BPF_STX | BPF_MEM | _SIZES[mn[3:]], dst, parse_reg(ops[1]), off), line)
    else:
        _emit(st, Insn(BPF_ST | BPF_MEM | _SIZES[mn[2:]], dst, 0, off, parse_imm32(ops[1])), line)


def _enc_ordered(st: _State, mn: str, ops: list[str], line: int) -> None:
    """ldacq{b,h,w,dw} dst, [src+off] and strel{b,h,w,dw} [dst+off], src."""
    _want(mn, ops, 2)
    size = _SIZES[mn[5:]]
    if mn.startswith("ldacq"):
        src, off = parse_mem(ops[1])
        insn = Insn(BPF_STX | BPF_ATOMIC | size, parse_reg(ops[0]), src, off, BPF_LOAD_ACQ)
    else:
        dst, off = parse_mem(ops[0])
        insn = Insn(BPF_STX | BPF_ATOMIC | size, dst, parse_reg(ops[1]), off, BPF_STORE_REL)
    _emit(st, insn, line)


def _enc_lddw(st: _State, mn: str, ops: list[str], line: int) -> None:
    _want(mn, ops, 2)
    dst = parse_reg(ops[0])
    m = _PSEUDO_RE.match(ops[1])
    if m and m.group(1) in _PSEUDO:
        args = [a.strip() for a in m.group(2).split(",")]
        src = _PSEUDO[m.group(1)]
        lo = parse_imm32(args[0])
        hi = parse_imm32(args[1]) if len(args) > 1 else 0
    else:
        src, value = 0, parse_imm64(ops[1])
        lo, hi = sext32(value), sext32(value >> 32)
    _emit(st, Insn(BPF_LDDW, dst, src, 0, lo), line)
    _emit(st, Insn(0, 0, 0, 0, hi), line)


def _enc_ldabs(st: _State, mn: str, ops: list[str], line: int) -> None:
    size = _SIZES[mn[5:]]
    if mn.startswith("ldabs"):
        _want(mn, ops, 1)
        _emit(st, Insn(BPF_LD | BPF_ABS | size, 0, 0, 0, parse_imm32(ops[0])), line)
    else:
        _want(mn, ops, 2)
        _emit(st, Insn(BPF_LD | BPF_IND | size, 0, parse_reg(ops[0]), 0,
                       parse_imm32(ops[1])), line)


def _enc_lock(st: _State, mn: str, ops: list[str], line: int) -> None:
    # lock [fetch] <op>[32] [dst+off], src
    if len(ops) < 3:
        raise AsmError("Invalid number of operands for lock")
    fetch = ops[0] == "fetch"
    if fetch:
        ops = ops[1:]
    if len(ops) != 3:
        raise AsmError("Invalid number of operands for lock")
    name = ops[0]
    size = BPF_W if name.endswith("32") else BPF_DW
    name = name[:-2] if name.endswith("32") else name
    if name in _ATOMIC_OPS:
        imm = _ATOMIC_OPS[name] | (BPF_FETCH if fetch else 0)
    elif name in ("xchg", "cmpxchg") and not fetch:
        imm = BPF_XCHG if name == "xchg" else BPF_CMPXCHG
    else:
        raise AsmError(f"Invalid atomic operation: {ops[0]}")
    dst, off = parse_mem(ops[1])
    _emit(st, Insn(BPF_STX | BPF_ATOMIC | size, dst, parse_reg(ops[2]), off, imm), line)


def _enc_jmp(st: _State, mn: str, ops: list[str], line: int) -> None:
    _want(mn, ops, 3)
    cls = BPF_JMP32 if mn.endswith("32") else BPF_JMP
    op = _JMP_OPS[mn[:-2] if mn.endswith("32") else mn]
    dst = parse_reg(ops[0])
    off, label = _target(ops[2])
    if is_reg(ops[1]):
        insn = Insn(cls | op | BPF_X, dst, parse_reg(ops[1]), off)
    else:
        insn = Insn(cls | op | BPF_K, dst, 0, off, parse_imm32(ops[1]))
    _emit(st, insn, line, label)


def _enc_ja(st: _State, mn: str, ops: list[str], line: int) -> None:
    _want(mn, ops, 1)
    off, label = _target(ops[0], wide=mn != "ja")
    if mn == "ja":
        _emit(st, Insn(BPF_JA_OP, 0, 0, off), line, label)
    else:  # ja32 / gotol: the offset lives in imm
        imm = off if label is None else 0
        _emit(st, Insn(BPF_JA32_OP, 0, 0, 0, imm), line, label, "imm")


def _enc_call(st: _State, mn: str, ops: list[str], line: int) -> None:
    _want(mn, ops, 1, 2)
    if mn == "callx" or (len(ops) == 1 and is_reg(ops[0])):
        _want(mn, ops, 1)
        _emit(st, Insn(BPF_CALLX_OP, parse_reg(ops[0])), line)
        return
    mode, target = ("helper", ops[0]) if len(ops) == 1 else (ops[0], ops[1])
    if mode == "helper" and is_reg(target):
        _emit(st, Insn(BPF_CALLX_OP, parse_reg(target)), line)
    elif mode == "helper":
        _emit(st, Insn(BPF_CALL_OP, 0, 0, 0, parse_imm32(target)), line)
    elif mode == "local":
        off, label = _target(target, wide=True)
        _emit(st, Insn(BPF_CALL_OP, 0, 1, 0, off), line, label, "imm")
    elif mode in ("runtime", "kfunc"):
        _emit(st, Insn(BPF_CALL_OP, 0, 2, 0, parse_imm32(target)), line)
    else:
        raise AsmError(f"Invalid call mode: {mode}")


def _enc_exit(st: _State, mn: str, ops: list[str], line: int) -> None:
    _want(mn, ops, 0)
    if st.first_exit is None:
        st.first_exit = len(st.slots)
    _emit(st, Insn(BPF_EXIT_OP), line)


def _mnemonics() -> dict[str, Callable[[_State, str, list[str], int], None]]:
    table: dict[str, Callable[[_State, str, list[str], int], None]] = {}
    for name in _ALU_OPS:
        table[name] = table[name + "32"] = _enc_alu
    for frm in (8, 16, 32):
        for to in (32, 64):
            if frm < to:
                table[f"movsx{frm}{to}"] = _enc_movsx
    for width in (16, 32, 64):
        for kind in ("le", "be", "swap", "bswap"):
            table[f"{kind}{width}"] = _enc_end
    for suffix, size in _SIZES.items():
        table["ldx" + suffix] = _enc_ldx
        table["st" + suffix] = _enc_st
        table["stx" + suffix] = _enc_st
        table["ldacq" + suffix] = _enc_ordered
        table["strel" + suffix] = _enc_ordered
        if size != BPF_DW:
            table["ldxs" + suffix] = _enc_ldx
            table["ldabs" + suffix] = _enc_ldabs
            table["ldind" + suffix] = _enc_ldabs
    for name in _JMP_OPS:
        table[name] = table[name + "32"] = _enc_jmp
    table.update(lddw=_enc_lddw, lock=_enc_lock, ja=_enc_ja, ja32=_enc_ja,
                 gotol=_enc_ja, call=_enc_call, callx=_enc_call, exit=_enc_exit)
    return table


MNEMONICS = _mnemonics()


def _strip_comment(text: str) -> str:
    for mark in ("#", "//"):
        pos = text.find(mark)
        if pos >= 0:
            text = text[:pos]
    return text.strip()


def _assemble_line(st: _State, text: str, lineno: int) -> None:
    m = re.match(r"([A-Za-z_.$][\w.$]*):\s*(.*)$", text)
    if m:
        if m.group(1) in st.labels:
            raise AsmError(f"Duplicate label: {m.group(1)}", lineno)
        st.labels[m.group(1)] = len(st.slots)
        text = m.group(2)
        if not text:
            return
    parts = text.split(None, 1)
    mnemonic = parts[0].lower()
    operands = _split_operands(parts[1]) if len(parts) > 1 else []
    encoder = MNEMONICS.get(mnemonic)
    if encoder is None:
        raise AsmError(f"Invalid mnemonic: {mnemonic}", lineno)
    try:
        encoder(st, mnemonic, operands, lineno)
    except AsmError as e:
        raise AsmError(e.reason, lineno) from None


def _resolve(st: _State) -> list[Insn]:
    labels = dict(st.labels)
    if "exit" not in labels and st.first_exit is not None:
        labels["exit"] = st.first_exit
    out = []
    for idx, slot in enumerate(st.slots):
        insn = slot.insn
        if slot.label is not None:
            if slot.label not in labels:
                raise AsmError(f"Invalid label: {slot.label}", slot.line)
            rel = labels[slot.label] - idx - 1
            if slot.label_field == "off":
                if not -(1 << 15) <= rel < (1 << 15):
                    raise AsmError(f"Jump to {slot.label} out of 16-bit range", slot.line)
                insn = Insn(insn.code, insn.dst_reg, insn.src_reg, rel, insn.imm)
            else:
                insn = Insn(insn.code, insn.dst_reg, insn.src_reg, insn.off, rel)
        out.append(insn)
    return out


def assemble_insns(text: str) -> list[Insn]:
    """Assemble source text into instruction slots."""
    st = _State()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if line:
            _assemble_line(st, line, lineno)
    return _resolve(st)


def assemble(text: str) -> bytes:
    """Assemble source text into bytecode (8 bytes a slot, little-endian)."""
    return encode(assemble_insns(text))


__all__ = ["assemble", "assemble_insns", "parse_imm32", "parse_off", "MNEMONICS"]
