"""Classic BPF socket filters (net/core/filter.c, uapi linux/filter.h, bpf_common.h).

``parse_filter`` reads ``tcpdump -ddd`` (count line, then ``code jt jf k``)
and ``tcpdump -dd`` (C array) text; ``sock_filters`` takes raw arrays from
Python. ``bpf_check_classic`` applies the kernel's rules (it returns only
-EINVAL; the reasons here name which rule failed). ``bpf_convert_filter``
produces the eBPF program in the kernel's manner; ``net.sk_filter`` runs it.

Where the conversion departs from the kernel's bytes (the semantics are the
same; each lets the converted program pass this machine's verifier, which the
kernel never runs on converted classic code):

* A and X are cleared with ``mov32 r, 0``, not ``xor32 r, r`` (which reads
  an uninitialised register).
* The context is the uapi ``__sk_buff`` view plus a model tail (see
  skbuff.py): skb->data is the u32 ``data`` field, so the verifier types it a
  packet pointer; ``dev`` is tested through a presence word.
* Operands an opcode does not use are zero (the kernel copies A/X and k into
  every ALU instruction; its interpreter ignores them).
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from emu.errors import UsageError
from probes.bpf import isa
from probes.bpf.isa import Insn
from probes.bpf.memory import PACKET_ADDR
from probes.bpf.program import BpfProg
from probes.bpf.prog_types import BpfProgType, ProgTypeInfo

from . import filter_helpers as fh
from . import skbuff

# Classes, sizes, modes, ops (bpf_common.h)
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD, BPF_XOR = 0x60, 0x70, 0x80, 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
BPF_MEMWORDS = 16
BPF_MAXINSNS = 4096

SIZE_BYTES = {BPF_W: 4, BPF_H: 2, BPF_B: 1}

# Ancillary loads: LD ABS at SKF_AD_OFF + n (uapi linux/filter.h)
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8
SKF_AD_NLATTR = 12
SKF_AD_NLATTR_NEST = 16
SKF_AD_MARK = 20
SKF_AD_QUEUE = 24
SKF_AD_HATYPE = 28
SKF_AD_RXHASH = 32
SKF_AD_CPU = 36
SKF_AD_ALU_XOR_X = 40
SKF_AD_VLAN_TAG = 44
SKF_AD_VLAN_TAG_PRESENT = 48
SKF_AD_PAY_OFFSET = 52
SKF_AD_RANDOM = 56
SKF_AD_VLAN_TPID = 60
SKF_AD_MAX = 64
ANCILLARY = {SKF_AD_PROTOCOL: "protocol", SKF_AD_PKTTYPE: "pkttype",
             SKF_AD_IFINDEX: "ifindex", SKF_AD_NLATTR: "nla", SKF_AD_NLATTR_NEST: "nlan",
             SKF_AD_MARK: "mark", SKF_AD_QUEUE: "queue", SKF_AD_HATYPE: "hatype",
             SKF_AD_RXHASH: "rxhash", SKF_AD_CPU: "cpu", SKF_AD_ALU_XOR_X: "xor_x",
             SKF_AD_VLAN_TAG: "vlan_tci", SKF_AD_VLAN_TAG_PRESENT: "vlanp",
             SKF_AD_PAY_OFFSET: "poff", SKF_AD_RANDOM: "rand", SKF_AD_VLAN_TPID: "vlan_tpid"}
U32 = 0xFFFFFFFF
SKF_NET_OFF, SKF_LL_OFF = skbuff.SKF_NET_OFF, skbuff.SKF_LL_OFF
SKF_NET_OFF_K, SKF_LL_OFF_K = SKF_NET_OFF & U32, SKF_LL_OFF & U32   # as a sock_filter's k
_AD_BASE = SKF_AD_OFF & U32          # k >= this (as u32) is an ancillary load


@dataclass(frozen=True)
class SockFilter:
    """struct sock_filter: ``code`` u16, ``jt``/``jf`` u8, ``k`` u32."""

    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0

    @property
    def cls(self) -> int:
        return self.code & 0x07

    @property
    def ancillary(self) -> int | None:
        """The SKF_AD_* index of an LD ABS at SKF_AD_OFF + n, else None."""
        if self.code & 0xE7 != BPF_LD | BPF_ABS or self.k < _AD_BASE:
            return None
        return self.k - _AD_BASE


class FilterError(UsageError):
    """A classic program was refused (setsockopt SO_ATTACH_FILTER fails).

    Attributes: ``errno`` (EINVAL as in the kernel), ``reason``, ``pc`` (the
    instruction, None when the whole program is at fault), ``line`` (input
    line for parse errors, else 0).
    """

    def __init__(self, reason: str, pc: int | None = None, err: int = errno.EINVAL,
                 line: int = 0):
        self.reason, self.pc, self.errno, self.line = reason, pc, err, line
        where = f"line {line}: " if line else (f"insn {pc}: " if pc is not None else "")
        super().__init__(f"classic BPF: {where}{reason}")


# --- input forms ---------------------------------------------------------------------------

def sock_filters(rows: Iterable[SockFilter | Sequence[int]]) -> list[SockFilter]:
    """Raw sock_filter arrays from Python: SockFilter or (code, jt, jf, k)."""
    out = []
    for pc, row in enumerate(rows):
        if isinstance(row, SockFilter):
            row = (row.code, row.jt, row.jf, row.k)
        if len(row) != 4 or not all(isinstance(v, int) for v in row):
            raise FilterError("a sock_filter is four integers (code, jt, jf, k)", pc)
        code, jt, jf, k = row
        if not (0 <= code <= 0xFFFF and 0 <= jt <= 0xFF and 0 <= jf <= 0xFF
                and -(1 << 31) <= k <= U32):
            raise FilterError(f"field out of range in {tuple(row)} (code u16, jt/jf u8, k u32)",
                              pc)
        out.append(SockFilter(code, jt, jf, k & U32))
    return out


_DD_ROW = re.compile(r"\{\s*([^,{}]+),\s*([^,{}]+),\s*([^,{}]+),\s*([^,{}]+?)\s*\}")


def _int(text: str, line: int) -> int:
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise FilterError(f"not a number: {text.strip()!r}", line=line) from None


def parse_ddd(text: str) -> list[SockFilter]:
    """``tcpdump -ddd``: the instruction count, then one ``code jt jf k`` per line."""
    lines = [(n, s.strip()) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
    if not lines:
        raise FilterError("empty program text")
    count = _int(lines[0][1], lines[0][0])
    rows = []
    for n, line in lines[1:]:
        fields = line.split()
        if len(fields) != 4:
            raise FilterError(f"expected 'code jt jf k', got {line[:60]!r}", line=n)
        rows.append(tuple(_int(f, n) for f in fields))
    if count != len(rows):
        raise FilterError(f"the count line says {count} instructions, {len(rows)} follow",
                          line=lines[0][0])
    return sock_filters(rows)


def parse_dd(text: str) -> list[SockFilter]:
    """``tcpdump -dd``: ``{ 0x28, 0, 0, 0x0000000c },`` rows (a C initialiser)."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in _DD_ROW.finditer(line):
            rows.append(tuple(_int(g, n) for g in m.groups()))
        rest = _DD_ROW.sub("", line).strip(" \t,;{}")
        if rest and not rest.startswith(("//", "/*", "struct", "static", "#")):
            raise FilterError(f"not a sock_filter row: {line.strip()[:60]!r}", line=n)
    if not rows:
        raise FilterError("no { code, jt, jf, k } rows found")
    return sock_filters(rows)


def parse_filter(text: str) -> list[SockFilter]:
    """Either text form, told apart by the braces of ``-dd``."""
    return parse_dd(text) if "{" in text else parse_ddd(text)


# --- bpf_check_classic -----------------------------------------------------------------------

_ALU_OPS = (BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_MOD, BPF_AND, BPF_OR, BPF_XOR, BPF_LSH,
            BPF_RSH)
_JCC = (BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET)
# chk_code_allowed
CODES_ALLOWED = frozenset(
    [BPF_ALU | op | src for op in _ALU_OPS for src in (BPF_K, BPF_X)] + [BPF_ALU | BPF_NEG]
    + [BPF_LD | size | mode for size in (BPF_W, BPF_H, BPF_B) for mode in (BPF_ABS, BPF_IND)]
    + [BPF_LD | BPF_W | BPF_LEN, BPF_LD | BPF_IMM, BPF_LD | BPF_MEM,
       BPF_LDX | BPF_W | BPF_LEN, BPF_LDX | BPF_B | BPF_MSH, BPF_LDX | BPF_IMM,
       BPF_LDX | BPF_MEM, BPF_ST, BPF_STX, BPF_MISC | BPF_TAX, BPF_MISC | BPF_TXA,
       BPF_RET | BPF_K, BPF_RET | BPF_A, BPF_JMP | BPF_JA]
    + [BPF_JMP | op | src for op in _JCC for src in (BPF_K, BPF_X)])
_MEM_CODES = frozenset({BPF_LD | BPF_MEM, BPF_LDX | BPF_MEM, BPF_ST, BPF_STX})
_JCC_CODES = frozenset(BPF_JMP | op | src for op in _JCC for src in (BPF_K, BPF_X))


def _check_insn(f: SockFilter, pc: int, flen: int) -> str | None:
    """The per-instruction rules of bpf_check_classic; a reason or None."""
    if f.code not in CODES_ALLOWED:
        return f"opcode {f.code:#04x} is not allowed in a classic program"
    if f.code in (BPF_ALU | BPF_DIV | BPF_K, BPF_ALU | BPF_MOD | BPF_K) and f.k == 0:
        return "division by a zero constant"
    if f.code in (BPF_ALU | BPF_LSH | BPF_K, BPF_ALU | BPF_RSH | BPF_K) and f.k >= 32:
        return f"shift by {f.k} (at most 31)"
    if f.code in _MEM_CODES and f.k >= BPF_MEMWORDS:
        return f"scratch memory M[{f.k}] is outside M[0..{BPF_MEMWORDS - 1}]"
    if f.code == BPF_JMP | BPF_JA and f.k >= flen - pc - 1:
        return f"ja +{f.k} jumps past the end"
    if f.code in _JCC_CODES and (pc + f.jt + 1 >= flen or pc + f.jf + 1 >= flen):
        return f"conditional jump (jt {f.jt}, jf {f.jf}) past the end"
    if f.code & 0xE7 == BPF_LD | BPF_ABS and f.k >= _AD_BASE and f.ancillary not in ANCILLARY:
        return f"unknown ancillary load SKF_AD_OFF+{f.k - _AD_BASE}"
    return None


def check_load_and_stores(prog: Sequence[SockFilter]) -> int | None:
    """The pc of a scratch-memory read some path reaches before any write, else None."""
    masks = [0xFFFF] * len(prog)
    memvalid = 0
    for pc, f in enumerate(prog):
        memvalid &= masks[pc]
        if f.code in (BPF_ST, BPF_STX):
            memvalid |= 1 << f.k
        elif f.code in (BPF_LD | BPF_MEM, BPF_LDX | BPF_MEM):
            if not memvalid & (1 << f.k):
                return pc
        elif f.code == BPF_JMP | BPF_JA:
            masks[pc + 1 + f.k] &= memvalid
            memvalid = 0xFFFF
        elif f.code in _JCC_CODES:
            masks[pc + 1 + f.jt] &= memvalid
            masks[pc + 1 + f.jf] &= memvalid
            memvalid = 0xFFFF
    return None


def bpf_check_classic(prog: Sequence[SockFilter]) -> None:
    """Refuse what the kernel refuses (always -EINVAL), naming the rule."""
    flen = len(prog)
    if flen == 0 or flen > BPF_MAXINSNS:
        raise FilterError(f"a program has 1 to {BPF_MAXINSNS} instructions, not {flen}")
    for pc, f in enumerate(prog):
        reason = _check_insn(f, pc, flen)
        if reason:
            raise FilterError(reason, pc)
    if prog[-1].code not in (BPF_RET | BPF_K, BPF_RET | BPF_A):
        raise FilterError("the last instruction is not a return", flen - 1)
    bad = check_load_and_stores(prog)
    if bad is not None:
        raise FilterError(f"M[{prog[bad].k}] may be read before it is written", bad)


# --- bpf_convert_filter ----------------------------------------------------------------------

REG_A, REG_X, REG_TMP, REG_CTX, REG_D, REG_H, REG_FP = 0, 7, 2, 6, 8, 9, 10
REG_ARG1, REG_ARG2, REG_ARG3, REG_ARG4 = 1, 2, 3, 4
S16_MAX = 0x7FFF


def _s32(k: int) -> int:
    k &= U32
    return k - (1 << 32) if k >> 31 else k


@dataclass(frozen=True)
class _Jump:
    """A jump whose offset is known once every instruction has its address:
    to classic instruction ``target``; ``code``/``dst``/``src``/``imm`` as emitted."""

    code: int
    target: int
    dst: int = 0
    src: int = 0
    imm: int = 0


# Builders for the eBPF instructions the conversion uses (the filter.h macros)

def e_alu32_imm(op: int, dst: int, imm: int) -> Insn:
    return Insn(isa.BPF_ALU | op | isa.BPF_K, dst, 0, 0, _s32(imm))


def e_alu32_reg(op: int, dst: int, src: int) -> Insn:
    return Insn(isa.BPF_ALU | op | isa.BPF_X, dst, src)


def e_alu64_imm(op: int, dst: int, imm: int) -> Insn:
    return Insn(isa.BPF_ALU64 | op | isa.BPF_K, dst, 0, 0, _s32(imm))


def e_mov64(dst: int, src: int) -> Insn:
    return Insn(isa.BPF_ALU64 | isa.BPF_MOV | isa.BPF_X, dst, src)


def e_mov32_imm(dst: int, imm: int) -> Insn:
    return e_alu32_imm(isa.BPF_MOV, dst, imm)


def e_ldx(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(isa.BPF_LDX | size | isa.BPF_MEM, dst, src, off)


def e_stx(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(isa.BPF_STX | size | isa.BPF_MEM, dst, src, off)


def e_jmp_imm(op: int, dst: int, imm: int, off: int) -> Insn:
    return Insn(isa.BPF_JMP | op | isa.BPF_K, dst, 0, off, _s32(imm))


def e_ja(off: int) -> Insn:
    return Insn(isa.BPF_JMP | isa.BPF_JA, 0, 0, off)


def e_from_be(dst: int, bits: int) -> Insn:
    return Insn(isa.BPF_ALU | isa.BPF_END | isa.BPF_TO_BE, dst, 0, 0, bits)


def e_call(func_id: int) -> Insn:
    return Insn(isa.BPF_JMP | isa.BPF_CALL, 0, 0, 0, func_id)


def e_exit() -> Insn:
    return Insn(isa.BPF_JMP | isa.BPF_EXIT)


# --- the conversion proper -------------------------------------------------------------------

_Item = Insn | _Jump
_AD_FIELDS = {   # ancillary loads that read one skb field: (size, ctx offset, mask, from_be)
    SKF_AD_PROTOCOL: (isa.BPF_H, skbuff.SKB_PROTOCOL_OFF, None, True),
    SKF_AD_PKTTYPE: (isa.BPF_B, skbuff.SKB_PKT_TYPE_OFF, 7, False),
    SKF_AD_MARK: (isa.BPF_W, skbuff.SKB_MARK_OFF, None, False),
    SKF_AD_RXHASH: (isa.BPF_W, skbuff.SKB_HASH_OFF, None, False),
    SKF_AD_QUEUE: (isa.BPF_H, skbuff.SKB_QUEUE_MAPPING_OFF, None, False),
    SKF_AD_VLAN_TAG: (isa.BPF_H, skbuff.SKB_VLAN_TCI_OFF, None, False),
    SKF_AD_VLAN_TAG_PRESENT: (isa.BPF_B, skbuff.SKB_VLAN_PRESENT_OFF, 1, False),
    SKF_AD_VLAN_TPID: (isa.BPF_H, skbuff.SKB_VLAN_PROTO_OFF, None, True),
}
_AD_CALLS = {SKF_AD_PAY_OFFSET: fh.BPF_SKB_GET_PAY_OFFSET, SKF_AD_NLATTR: fh.BPF_SKB_GET_NLATTR,
             SKF_AD_NLATTR_NEST: fh.BPF_SKB_GET_NLATTR_NEST, SKF_AD_CPU: fh.BPF_GET_RAW_CPU_ID,
             SKF_AD_RANDOM: fh.BPF_USER_RND_U32}
_LOAD_HELPER = {BPF_B: fh.BPF_SKB_LOAD_HELPER_8, BPF_H: fh.BPF_SKB_LOAD_HELPER_16,
                BPF_W: fh.BPF_SKB_LOAD_HELPER_32}


def convert_bpf_extensions(anc: int) -> list[_Item]:
    """An ancillary load (convert_bpf_extensions) into A."""
    if anc in _AD_FIELDS:
        size, off, mask, be = _AD_FIELDS[anc]
        out: list[_Item] = [e_ldx(size, REG_A, REG_CTX, off)]
        if mask is not None:
            out.append(e_alu32_imm(isa.BPF_AND, REG_A, mask))
        if be:
            out.append(e_from_be(REG_A, 16))
        return out
    if anc in (SKF_AD_IFINDEX, SKF_AD_HATYPE):
        # No device: exit with A as it is (the kernel tests skb->dev for NULL)
        load = (e_ldx(isa.BPF_W, REG_A, REG_CTX, skbuff.SKB_IFINDEX_OFF) if anc == SKF_AD_IFINDEX
                else e_ldx(isa.BPF_H, REG_A, REG_CTX, skbuff.SKB_DEV_TYPE_OFF))
        return [e_ldx(isa.BPF_W, REG_TMP, REG_CTX, skbuff.SKB_DEV_OFF),
                e_jmp_imm(isa.BPF_JNE, REG_TMP, 0, 1), e_exit(), load]
    if anc in _AD_CALLS:
        return [e_mov64(REG_ARG1, REG_CTX), e_mov64(REG_ARG2, REG_A),
                e_mov64(REG_ARG3, REG_X), e_call(_AD_CALLS[anc])]
    assert anc == SKF_AD_ALU_XOR_X, anc
    return [e_alu32_reg(isa.BPF_XOR, REG_A, REG_X)]


def convert_bpf_ld_abs(f: SockFilter) -> list[_Item]:
    """A packet load into A: inline from the linear data when an absolute
    offset fits headlen, else through bpf_skb_load_helper_{8,16,32}; a
    failed load ends the program with 0."""
    size = SIZE_BYTES[f.code & 0x18]
    endian = size > 1
    indirect = f.code & 0xE0 == BPF_IND
    offset = _s32(f.k)
    out: list[_Item] = []
    if not indirect and offset >= 0:       # unaligned loads are fine on x86-64 and arm64
        ldx_off_ok = offset <= S16_MAX
        out.append(e_mov64(REG_TMP, REG_H))
        if offset:
            out.append(e_alu64_imm(isa.BPF_SUB, REG_TMP, offset))
        out.append(e_jmp_imm(isa.BPF_JSLT, REG_TMP, size, 2 + endian + (not ldx_off_ok) * 2))
        if ldx_off_ok:
            out.append(e_ldx(f.code & 0x18, REG_A, REG_D, offset))
        else:
            out += [e_mov64(REG_TMP, REG_D), e_alu64_imm(isa.BPF_ADD, REG_TMP, offset),
                    e_ldx(f.code & 0x18, REG_A, REG_TMP, 0)]
        if endian:
            out.append(e_from_be(REG_A, size * 8))
        out.append(e_ja(8))
    out += [e_mov64(REG_ARG1, REG_CTX), e_mov64(REG_ARG2, REG_D), e_mov64(REG_ARG3, REG_H)]
    if not indirect:
        out.append(e_alu64_imm(isa.BPF_MOV, REG_ARG4, offset))
    else:
        out.append(e_mov64(REG_ARG4, REG_X))
        if f.k:
            out.append(e_alu64_imm(isa.BPF_ADD, REG_ARG4, offset))
    out += [e_call(_LOAD_HELPER[f.code & 0x18]), e_jmp_imm(isa.BPF_JSGE, REG_A, 0, 2),
            e_alu32_reg(isa.BPF_XOR, REG_A, REG_A), e_exit()]
    return out


def _convert_jcc(f: SockFilter, pc: int) -> list[_Item]:
    """Jcc with jt/jf: one jump when a branch falls through, else Jcc + JA.
    A K operand with the sign bit set goes through TMP (eBPF immediates are
    sign-extended, classic ones are u32)."""
    out: list[_Item] = []
    op = f.code & 0xF0
    if f.code & BPF_X:
        src, imm, bpf_src = REG_X, 0, isa.BPF_X
    elif _s32(f.k) < 0:
        out.append(e_mov32_imm(REG_TMP, f.k))
        src, imm, bpf_src = REG_TMP, 0, isa.BPF_X
    else:
        src, imm, bpf_src = 0, f.k, isa.BPF_K
    inverse = {BPF_JEQ: isa.BPF_JNE, BPF_JGT: isa.BPF_JLE, BPF_JGE: isa.BPF_JLT}
    if f.jf == 0:
        out.append(_Jump(isa.BPF_JMP | op | bpf_src, pc + f.jt + 1, REG_A, src, imm))
    elif f.jt == 0 and op in inverse:
        out.append(_Jump(isa.BPF_JMP | inverse[op] | bpf_src, pc + f.jf + 1, REG_A, src, imm))
    else:
        out.append(_Jump(isa.BPF_JMP | op | bpf_src, pc + f.jt + 1, REG_A, src, imm))
        out.append(_Jump(isa.BPF_JMP | isa.BPF_JA, pc + f.jf + 1))
    return out


def _convert_alu(f: SockFilter) -> list[_Item]:
    out: list[_Item] = []
    if f.code in (BPF_ALU | BPF_DIV | BPF_X, BPF_ALU | BPF_MOD | BPF_X):
        # X = (u32)X; division by zero returns 0, as classic BPF always did
        out += [Insn(isa.BPF_ALU | isa.BPF_MOV | isa.BPF_X, REG_X, REG_X),
                e_jmp_imm(isa.BPF_JNE, REG_X, 0, 2), e_alu32_reg(isa.BPF_XOR, REG_A, REG_A),
                e_exit()]
    if f.code == BPF_ALU | BPF_NEG:
        out.append(Insn(f.code, REG_A))
    elif f.code & BPF_X:
        out.append(Insn(f.code, REG_A, REG_X))
    else:
        out.append(Insn(f.code, REG_A, 0, 0, _s32(f.k)))
    return out


def _convert_one(f: SockFilter, pc: int) -> list[_Item]:
    """One classic instruction's eBPF sequence (the switch of bpf_convert_filter)."""
    code, cls = f.code, f.cls
    if cls == BPF_ALU:
        return _convert_alu(f)
    if cls == BPF_LD and code & 0xE0 in (BPF_ABS, BPF_IND):
        anc = f.ancillary
        return convert_bpf_extensions(anc) if anc is not None else convert_bpf_ld_abs(f)
    if code == BPF_JMP | BPF_JA:
        return [_Jump(isa.BPF_JMP | isa.BPF_JA, pc + f.k + 1)]
    if cls == BPF_JMP:
        return _convert_jcc(f, pc)
    if code == BPF_LDX | BPF_B | BPF_MSH:       # X = 4 * ([k] & 0xf), A kept
        load = convert_bpf_ld_abs(SockFilter(BPF_LD | BPF_ABS | BPF_B, k=f.k))
        return [e_mov64(REG_X, REG_A), *load, e_alu32_imm(isa.BPF_AND, REG_A, 0xF),
                e_alu32_imm(isa.BPF_LSH, REG_A, 2), e_mov64(REG_TMP, REG_X),
                e_mov64(REG_X, REG_A), e_mov64(REG_A, REG_TMP)]
    if cls == BPF_RET:
        ret: list[_Item] = [e_mov32_imm(REG_A, f.k)] if code & BPF_A == 0 else []
        return ret + [e_exit()]
    if code == BPF_MISC | BPF_TAX:
        return [e_mov64(REG_X, REG_A)]
    if code == BPF_MISC | BPF_TXA:
        return [e_mov64(REG_A, REG_X)]
    reg = REG_A if cls in (BPF_LD, BPF_ST) else REG_X
    if cls in (BPF_ST, BPF_STX):
        return [e_stx(isa.BPF_W, REG_FP, reg, -(f.k * 4 + 4))]
    mode = code & 0xE0
    if mode == BPF_MEM:
        return [e_ldx(isa.BPF_W, reg, REG_FP, -(f.k * 4 + 4))]
    if mode == BPF_IMM and cls in (BPF_LD, BPF_LDX):
        return [e_mov32_imm(reg, f.k)]
    if mode == BPF_LEN:
        return [e_ldx(isa.BPF_W, reg, REG_CTX, skbuff.SKB_LEN_OFF)]
    raise FilterError(f"opcode {code:#04x} cannot be converted", pc)


def _prologue(seen_ld_abs: bool) -> list[Insn]:
    out = [e_mov32_imm(REG_A, 0), e_mov32_imm(REG_X, 0), e_mov64(REG_CTX, REG_ARG1)]
    if seen_ld_abs:       # cache skb->data in R8 and headlen in R9 for packet loads
        out += [e_ldx(isa.BPF_W, REG_D, REG_CTX, skbuff.SKB_DATA_OFF),
                e_ldx(isa.BPF_W, REG_H, REG_CTX, skbuff.SKB_LEN_OFF),
                e_ldx(isa.BPF_W, REG_TMP, REG_CTX, skbuff.SKB_DATA_LEN_OFF),
                e_alu32_reg(isa.BPF_SUB, REG_H, REG_TMP)]
    return out


def _seen_ld_abs(prog: Sequence[SockFilter]) -> bool:
    return any((f.cls == BPF_LD and f.code & 0xE0 in (BPF_ABS, BPF_IND) and f.ancillary is None)
               or f.code == BPF_LDX | BPF_B | BPF_MSH for f in prog)


def bpf_convert_filter(prog: Sequence[SockFilter]) -> list[Insn]:
    """Classic -> eBPF (A = r0, X = r7, ctx r6, M[k] at fp-4k-4). The program
    must have passed bpf_check_classic. Raises FilterError for a jump whose
    offset does not fit in 16 bits, as the kernel does."""
    prologue = _prologue(_seen_ld_abs(prog))
    seqs = [_convert_one(f, pc) for pc, f in enumerate(prog)]
    addrs, at = [], len(prologue)
    for seq in seqs:
        addrs.append(at)
        at += len(seq)
    out: list[Insn] = list(prologue)
    for pc, seq in enumerate(seqs):
        for item in seq:
            if isinstance(item, _Jump):
                off = addrs[item.target] - len(out) - 1
                if not -0x8000 <= off <= S16_MAX:
                    raise FilterError(f"jump offset {off} does not fit in 16 bits", pc)
                item = Insn(item.code, item.dst, item.src, off, _s32(item.imm))
            out.append(item)
    return out


# --- attaching and running ---------------------------------------------------------------------

def socket_prog_run(prog: BpfProg, skb: skbuff.SkBuff, env: fh.SkbRunContext | None = None,
                    engine: str = "jit") -> int:
    """bpf_prog_run on an skb: a converted classic program or a SEC("socket")
    eBPF program; the u32 it returns (0 drops, else the bytes to keep).
    ``env`` may be reused across packets (its random state goes on, as the
    kernel's does); it now holds ``skb``."""
    env = env if env is not None else fh.SkbRunContext()
    env.skb = skb
    ctx = skb.ctx_image(PACKET_ADDR)
    return prog.run(ctx, env, packet=bytearray(skb.data), engine=engine) & U32


def sk_filter_trim_cap(result: int, skb: skbuff.SkBuff, cap: int = 0) -> int:
    """The bytes a socket keeps: 0 (dropped) or the packet trimmed to
    max(cap, result) (pskb_trim leaves a shorter packet whole)."""
    if result == 0:
        return 0
    return min(skb.len, max(cap, result))


@dataclass(eq=False)
class SkFilter:
    """struct sk_filter: the classic program as attached and its eBPF
    conversion (``prog``, type SOCKET_FILTER with the internal helpers)."""

    insns: list[SockFilter]
    prog: BpfProg

    def verify(self, log_level: int = 0) -> str:
        """Run this machine's verifier over the conversion (the kernel does
        not); returns the log or raises VerifierError."""
        return self.prog.load(log_level)

    def run(self, skb: skbuff.SkBuff, env: fh.SkbRunContext | None = None,
            engine: str = "jit") -> int:
        return socket_prog_run(self.prog, skb, env, engine)


# What the verifier holds a conversion to: it reads the kernel's struct sk_buff,
# not the uapi view (so sk_filter_is_valid_access does not apply), and only
# reads; every context load must lie inside the skb image, aligned to its size.
CONVERTED_PROG_TYPE = ProgTypeInfo(False, None, ctx_size=skbuff.SKB_CTX_SIZE)


@dataclass(eq=False)
class ConvertedProg(BpfProg):
    """A converted classic program: a socket filter (packet pointers from the
    context, as for SOCKET_FILTER) with the context rules above."""

    @property
    def type_info(self) -> ProgTypeInfo:
        return CONVERTED_PROG_TYPE


def sk_attach_filter(rows: Iterable[SockFilter | Sequence[int]]) -> SkFilter:
    """SO_ATTACH_FILTER: check (FilterError), convert, and return the filter.
    Like the kernel, the converted program runs without the eBPF verifier."""
    insns = sock_filters(rows)
    bpf_check_classic(insns)
    prog = ConvertedProg(bpf_convert_filter(insns),
                         prog_type=BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER, name="classic",
                         helpers=fh.SK_FILTER_HELPERS)
    prog.loaded = True
    return SkFilter(insns, prog)
