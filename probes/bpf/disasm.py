"""Disassembler: the assembler's own syntax, and an llvm-objdump-like listing.

``disassemble`` output assembles back to the same bytes (labels become
relative offsets). ``disassemble_llvm`` prints what ``llvm-objdump -d``
prints for a BPF object: slot index, the 8 bytes, and LLVM's C-like syntax
(``r0 = *(u32 *)(r1 + 4)``, ``if w1 s> w2 goto -3``, ``lock *(u64 *)(r7 + 0) += r1``).
"""
from __future__ import annotations

from typing import Callable, Sequence

from .isa import (
    ALU_OP_NAMES, ATOMIC_ALU_OPS, BPF_ALU, BPF_ALU64, BPF_ARSH, BPF_CMPXCHG,
    BPF_DW, BPF_FETCH, BPF_LDDW, BPF_LOAD_ACQ, BPF_NEG, BPF_STORE_REL,
    BPF_TO_BE, BPF_XCHG, JMP_OP_NAMES, OPCODES, SIZE_BYTES, SIZE_SUFFIX,
    BPF_JMP32, Insn, check_fields, check_lddw_second, decode, lddw_imm64,
)

_PSEUDO_NAMES = {1: "map_fd", 2: "map_value", 3: "btf_id", 4: "func", 5: "map_idx",
                 6: "map_idx_value"}


def _helper_name(imm: int) -> str:
    from .helpers import HELPER_NAMES  # late: helpers imports the whole machine

    return HELPER_NAMES.get(imm, "")


def _rel(off: int) -> str:
    return f"+{off}" if off >= 0 else str(off)


def _mem(reg: int, off: int) -> str:
    if off == 0:
        return f"[r{reg}]"
    return f"[r{reg}+{off}]" if off > 0 else f"[r{reg}{off}]"


def _imm(value: int) -> str:
    return hex(value) if value >= 0 else "-" + hex(-value)


# --- assembler syntax ------------------------------------------------------

def _fmt_alu(i: Insn) -> str:
    suffix = "32" if i.cls == BPF_ALU else ""
    if i.op == BPF_NEG:
        return f"neg{suffix} r{i.dst_reg}"
    name = ALU_OP_NAMES[i.op]
    if i.off == 1 and name in ("div", "mod"):
        name = "s" + name
    if name == "mov" and i.is_reg_src and i.off:
        return f"movsx{i.off}{'64' if i.cls == BPF_ALU64 else '32'} r{i.dst_reg}, r{i.src_reg}"
    src = f"r{i.src_reg}" if i.is_reg_src else _imm(i.imm)
    return f"{name}{suffix} r{i.dst_reg}, {src}"


def _fmt_end(i: Insn) -> str:
    if i.cls == BPF_ALU64:
        return f"bswap{i.imm} r{i.dst_reg}"
    return f"{'be' if i.code & BPF_TO_BE else 'le'}{i.imm} r{i.dst_reg}"


def _fmt_atomic(i: Insn) -> str:
    size = SIZE_SUFFIX[i.size]
    if i.imm == BPF_LOAD_ACQ:
        return f"ldacq{size} r{i.dst_reg}, {_mem(i.src_reg, i.off)}"
    if i.imm == BPF_STORE_REL:
        return f"strel{size} {_mem(i.dst_reg, i.off)}, r{i.src_reg}"
    suffix = "" if i.size == BPF_DW else "32"
    if i.imm == BPF_XCHG:
        name = "xchg"
    elif i.imm == BPF_CMPXCHG:
        name = "cmpxchg"
    else:
        name = ("fetch " if i.imm & BPF_FETCH else "") + ATOMIC_ALU_OPS[i.imm & ~BPF_FETCH]
    return f"lock {name}{suffix} {_mem(i.dst_reg, i.off)}, r{i.src_reg}"


def _fmt_jmp(i: Insn) -> str:
    suffix = "32" if i.cls == BPF_JMP32 else ""
    src = f"r{i.src_reg}" if i.is_reg_src else _imm(i.imm)
    return f"{JMP_OP_NAMES[i.op]}{suffix} r{i.dst_reg}, {src}, {_rel(i.off)}"


def _fmt_call(i: Insn) -> str:
    if i.src_reg == 1:
        return f"call local {_rel(i.imm)}"
    if i.src_reg == 2:
        return f"call kfunc {i.imm}"
    name = _helper_name(i.imm)
    return f"call {i.imm}" + (f" # bpf_{name}" if name else "")


_ASM: dict[str, Callable[[Insn], str]] = {
    "alu": _fmt_alu, "alu64": _fmt_alu, "neg": _fmt_alu, "neg64": _fmt_alu,
    "end": _fmt_end, "atomic": _fmt_atomic, "jmp": _fmt_jmp, "jmp32": _fmt_jmp,
    "call": _fmt_call,
    "ldx": lambda i: f"ldx{SIZE_SUFFIX[i.size]} r{i.dst_reg}, {_mem(i.src_reg, i.off)}",
    "ldxsx": lambda i: f"ldxs{SIZE_SUFFIX[i.size]} r{i.dst_reg}, {_mem(i.src_reg, i.off)}",
    "st": lambda i: f"st{SIZE_SUFFIX[i.size]} {_mem(i.dst_reg, i.off)}, {_imm(i.imm)}",
    "stx": lambda i: f"stx{SIZE_SUFFIX[i.size]} {_mem(i.dst_reg, i.off)}, r{i.src_reg}",
    "ldabs": lambda i: f"ldabs{SIZE_SUFFIX[i.size]} {_imm(i.imm)}",
    "ldind": lambda i: f"ldind{SIZE_SUFFIX[i.size]} r{i.src_reg}, {_imm(i.imm)}",
    "ja": lambda i: f"ja {_rel(i.off)}",
    "ja32": lambda i: f"ja32 {_rel(i.imm)}",
    "callx": lambda i: f"callx r{i.dst_reg}",
    "exit": lambda i: "exit",
}


def format_insn(insn: Insn, second: Insn | None = None) -> str:
    """One instruction in assembler syntax (``second`` = lddw's next slot)."""
    try:
        return _format_insn(insn, second)
    except (KeyError, IndexError):  # fields no valid instruction has
        return f".invalid {insn.encode().hex(' ')}"


def _format_insn(insn: Insn, second: Insn | None) -> str:
    spec = OPCODES.get(insn.code)
    if spec is None:
        return f".invalid {insn.encode().hex(' ')}"
    if spec.kind == "lddw":
        hi = second.imm if second is not None else 0
        if insn.src_reg:
            args = str(insn.imm) + (f", {hi}" if insn.src_reg in (2, 6) or hi else "")
            return f"lddw r{insn.dst_reg}, {_PSEUDO_NAMES[insn.src_reg]}({args})"
        return f"lddw r{insn.dst_reg}, {hex(lddw_imm64(insn, second or Insn(0)))}"
    return _ASM[spec.kind](insn)


def _as_insns(code: bytes | Sequence[Insn]) -> list[Insn]:
    return decode(code) if isinstance(code, (bytes, bytearray)) else list(code)


def disassemble(code: bytes | Sequence[Insn]) -> str:
    """Bytecode to assembler text, one instruction a line. What the syntax
    cannot express (reserved fields set, unknown opcodes) shows as
    ``.invalid <bytes> # why``; everything else assembles back to the same
    bytes."""
    from .asm import assemble_insns  # the check below is the assembler itself
    from .errors import AsmError

    insns = _as_insns(code)
    lines, pc = [], 0
    while pc < len(insns):
        insn = insns[pc]
        second = insns[pc + 1] if insn.code == BPF_LDDW and pc + 1 < len(insns) else None
        text = format_insn(insn, second)
        try:
            exact = assemble_insns(text) == [insn] + ([second] if second is not None else [])
        except AsmError:
            exact = False
        if not exact:
            why = check_fields(insn) or (second and check_lddw_second(second)) or "not expressible"
            lines.append(f".invalid {insn.encode().hex(' ')} # {why}")
            pc += 1
            continue
        lines.append(text)
        pc += 2 if second is not None else 1
    return "\n".join(lines) + ("\n" if lines else "")


# --- llvm-objdump syntax -----------------------------------------------------

_LLVM_ALU = {"add": "+=", "sub": "-=", "mul": "*=", "div": "/=", "or": "|=",
             "and": "&=", "lsh": "<<=", "rsh": ">>=", "mod": "%=", "xor": "^=",
             "mov": "=", "arsh": "s>>="}
_LLVM_JMP = {"jeq": "==", "jgt": ">", "jge": ">=", "jset": "&", "jne": "!=",
             "jsgt": "s>", "jsge": "s>=", "jlt": "<", "jle": "<=", "jslt": "s<",
             "jsle": "s<="}
_LLVM_ATOMIC = {"add": "+=", "or": "|=", "and": "&=", "xor": "^="}
_USIZE = {4: "u32", 2: "u16", 1: "u8", 8: "u64"}


def _llvm_mem(reg: int, off: int) -> str:
    return f"(r{reg} {'-' if off < 0 else '+'} {abs(off)})"


def _llvm_alu(i: Insn) -> str:
    r = "w" if i.cls == BPF_ALU else "r"
    d = f"{r}{i.dst_reg}"
    if i.op == BPF_NEG:
        return f"{d} = -{d}"
    name = ALU_OP_NAMES[i.op]
    if name == "mov" and i.is_reg_src and i.off:
        return f"{d} = (s{i.off}){r}{i.src_reg}"
    op = _LLVM_ALU[name]
    if i.off == 1 and name in ("div", "mod"):
        op = "s" + op
    src = f"{r}{i.src_reg}" if i.is_reg_src else str(i.imm)
    if i.op == BPF_ARSH or name != "mov":
        return f"{d} {op} {src}"
    return f"{d} = {src}"


def _llvm_atomic(i: Insn) -> str:
    width = SIZE_BYTES[i.size]
    ptr = f"({_USIZE[width]} *){_llvm_mem(i.dst_reg, i.off)}"
    r = "r" if i.size == BPF_DW else "w"
    if i.imm == BPF_LOAD_ACQ:
        return f"r{i.dst_reg} = load_acquire(({_USIZE[width]} *){_llvm_mem(i.src_reg, i.off)})"
    if i.imm == BPF_STORE_REL:
        return f"store_release({ptr}, {r}{i.src_reg})"
    bits = width * 8
    mem = f"r{i.dst_reg} {'-' if i.off < 0 else '+'} {abs(i.off)}"
    if i.imm == BPF_XCHG:
        return f"{r}{i.src_reg} = xchg{'' if bits == 64 else '32'}_{bits}({mem}, {r}{i.src_reg})"
    if i.imm == BPF_CMPXCHG:
        return f"{r}0 = cmpxchg{'' if bits == 64 else '32'}_{bits}({mem}, {r}0, {r}{i.src_reg})"
    name = ATOMIC_ALU_OPS[i.imm & ~BPF_FETCH]
    if i.imm & BPF_FETCH:
        return f"{r}{i.src_reg} = atomic_fetch_{name}({ptr}, {r}{i.src_reg})"
    return f"lock *{ptr} {_LLVM_ATOMIC[name]} {r}{i.src_reg}"


def _llvm_jmp(i: Insn) -> str:
    r = "w" if i.cls == BPF_JMP32 else "r"
    src = f"{r}{i.src_reg}" if i.is_reg_src else str(i.imm)
    return f"if {r}{i.dst_reg} {_LLVM_JMP[JMP_OP_NAMES[i.op]]} {src} goto {_rel(i.off)}"


def _llvm_end(i: Insn) -> str:
    if i.cls == BPF_ALU64:
        kind = "bswap"
    else:
        kind = "be" if i.code & BPF_TO_BE else "le"
    return f"r{i.dst_reg} = {kind}{i.imm} r{i.dst_reg}"


_LLVM: dict[str, Callable[[Insn], str]] = {
    "alu": _llvm_alu, "alu64": _llvm_alu, "neg": _llvm_alu, "neg64": _llvm_alu,
    "end": _llvm_end, "atomic": _llvm_atomic, "jmp": _llvm_jmp, "jmp32": _llvm_jmp,
    "ldx": lambda i: f"r{i.dst_reg} = *({_USIZE[SIZE_BYTES[i.size]]} *){_llvm_mem(i.src_reg, i.off)}",
    "ldxsx": lambda i: f"r{i.dst_reg} = *(s{SIZE_BYTES[i.size] * 8} *){_llvm_mem(i.src_reg, i.off)}",
    "st": lambda i: f"*({_USIZE[SIZE_BYTES[i.size]]} *){_llvm_mem(i.dst_reg, i.off)} = {i.imm}",
    # llvm-objdump 14 names the source rN whatever the store size
    "stx": lambda i: f"*({_USIZE[SIZE_BYTES[i.size]]} *){_llvm_mem(i.dst_reg, i.off)} = r{i.src_reg}",
    "ldabs": lambda i: f"r0 = *({_USIZE[SIZE_BYTES[i.size]]} *)skb[{i.imm}]",
    "ldind": lambda i: f"r0 = *({_USIZE[SIZE_BYTES[i.size]]} *)skb[r{i.src_reg} + {i.imm}]",
    "ja": lambda i: f"goto {_rel(i.off)}",
    "ja32": lambda i: f"gotol {_rel(i.imm)}",
    "call": lambda i: f"call {i.imm}",
    "callx": lambda i: f"callx r{i.dst_reg}",
    "exit": lambda i: "exit",
}


def format_insn_llvm(insn: Insn, second: Insn | None = None) -> str:
    try:
        return _format_insn_llvm(insn, second)
    except (KeyError, IndexError):
        return "<unknown>"


def _format_insn_llvm(insn: Insn, second: Insn | None) -> str:
    spec = OPCODES.get(insn.code)
    if spec is None:
        return "<unknown>"
    if spec.kind == "lddw":
        if insn.src_reg:
            return f"r{insn.dst_reg} = {_PSEUDO_NAMES[insn.src_reg]}({insn.imm}) ll"
        return f"r{insn.dst_reg} = {hex(lddw_imm64(insn, second or Insn(0)))} ll"
    return _LLVM[spec.kind](insn)


def disassemble_llvm(code: bytes | Sequence[Insn]) -> str:
    """An ``llvm-objdump -d`` style listing: index, raw bytes, LLVM syntax."""
    insns = _as_insns(code)
    lines, pc = [], 0
    while pc < len(insns):
        insn = insns[pc]
        second = insns[pc + 1] if insn.code == BPF_LDDW and pc + 1 < len(insns) else None
        raw = insn.encode().hex(" ")
        lines.append(f"{pc:8d}:\t{raw}\t{format_insn_llvm(insn, second)}")
        if second is not None:
            lines.append(f"{pc + 1:8d}:\t{second.encode().hex(' ')}\t")
        pc += 2 if second is not None else 1
    return "\n".join(lines) + ("\n" if lines else "")
