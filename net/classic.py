"""A direct classic BPF interpreter: the reference the conversion is checked against.

It runs a program that passed ``bpf_check_classic`` on an skb with the
semantics the kernel gives classic filters today (through the converted
program): 32-bit A and X, packet loads big-endian through
bpf_skb_load_helper (SKF_NET_OFF / SKF_LL_OFF bases, a failed load returns
0), division or modulo by a zero X returns 0, shifts by X use its low 5 bits
(as eBPF's 32-bit shifts do), ``ifindex``/``hatype`` with no device return
A, and the result is a u32. It shares no code with the conversion but the
skb model, the flow dissector and the netlink helpers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from .filter import (
    BPF_A, BPF_ABS, BPF_ADD, BPF_ALU, BPF_AND, BPF_DIV, BPF_IMM, BPF_IND, BPF_JA, BPF_JEQ,
    BPF_JGE, BPF_JGT, BPF_JMP, BPF_JSET, BPF_LD, BPF_LDX, BPF_LEN, BPF_LSH, BPF_MEM, BPF_MISC,
    BPF_MEMWORDS, BPF_MOD, BPF_MSH, BPF_MUL, BPF_NEG, BPF_OR, BPF_RET, BPF_RSH, BPF_ST, BPF_STX,
    BPF_SUB, BPF_TAX, BPF_X, BPF_XOR, SIZE_BYTES, SKF_AD_ALU_XOR_X, SKF_AD_CPU, SKF_AD_HATYPE,
    SKF_AD_IFINDEX, SKF_AD_MARK, SKF_AD_NLATTR, SKF_AD_NLATTR_NEST, SKF_AD_PAY_OFFSET,
    SKF_AD_PKTTYPE, SKF_AD_PROTOCOL, SKF_AD_QUEUE, SKF_AD_RANDOM, SKF_AD_RXHASH,
    SKF_AD_VLAN_TAG, SKF_AD_VLAN_TAG_PRESENT, SKF_AD_VLAN_TPID, U32, SockFilter,
)
from .filter_helpers import bpf_skb_get_nlattr, bpf_skb_get_nlattr_nest
from .flow_dissector import skb_get_poff
from .skbuff import SkBuff, skb_load


class _Return(Exception):
    def __init__(self, value: int):
        self.value = value & U32


@dataclass
class ClassicMachine:
    """A, X and M[] of one run, with the run's CPU and random source."""

    skb: SkBuff
    cpu: int = 0
    random_u32: Callable[[], int] = lambda: 0
    a: int = 0
    x: int = 0
    mem: list[int] = field(default_factory=lambda: [0] * BPF_MEMWORDS)


def _s32(v: int) -> int:
    v &= U32
    return v - (1 << 32) if v >> 31 else v


def _alu(m: ClassicMachine, f: SockFilter) -> None:
    op = f.code & 0xF0
    b = m.x if f.code & BPF_X else f.k
    a = m.a
    if op in (BPF_DIV, BPF_MOD) and b == 0:
        raise _Return(0)
    result = {BPF_ADD: lambda: a + b, BPF_SUB: lambda: a - b, BPF_MUL: lambda: a * b,
              BPF_DIV: lambda: a // b if b else 0, BPF_MOD: lambda: a % b if b else 0,
              BPF_OR: lambda: a | b, BPF_AND: lambda: a & b, BPF_XOR: lambda: a ^ b,
              BPF_LSH: lambda: a << (b & 31), BPF_RSH: lambda: a >> (b & 31),
              BPF_NEG: lambda: -a}[op]()
    m.a = result & U32


def _ancillary(m: ClassicMachine, anc: int) -> int:
    skb = m.skb
    if anc in (SKF_AD_IFINDEX, SKF_AD_HATYPE):
        if skb.dev is None:
            raise _Return(m.a)
        return skb.dev.ifindex & U32 if anc == SKF_AD_IFINDEX else skb.dev.type & 0xFFFF
    values: dict[int, Callable[[], int]] = {
        SKF_AD_PROTOCOL: lambda: skb.protocol & 0xFFFF,
        SKF_AD_PKTTYPE: lambda: skb.pkt_type & 7,
        SKF_AD_MARK: lambda: skb.mark, SKF_AD_RXHASH: lambda: skb.hash,
        SKF_AD_QUEUE: lambda: skb.queue_mapping & 0xFFFF,
        SKF_AD_VLAN_TAG: lambda: skb.vlan_tci & 0xFFFF,
        SKF_AD_VLAN_TAG_PRESENT: lambda: int(skb.vlan_tag_present()),
        SKF_AD_VLAN_TPID: lambda: skb.vlan_proto & 0xFFFF,
        SKF_AD_PAY_OFFSET: lambda: skb_get_poff(skb),
        SKF_AD_NLATTR: lambda: bpf_skb_get_nlattr(skb, m.a, m.x),
        SKF_AD_NLATTR_NEST: lambda: bpf_skb_get_nlattr_nest(skb, m.a, m.x),
        SKF_AD_CPU: lambda: m.cpu, SKF_AD_RANDOM: m.random_u32,
        SKF_AD_ALU_XOR_X: lambda: m.a ^ m.x,
    }
    return values[anc]() & U32


def _load(m: ClassicMachine, f: SockFilter) -> int:
    """LD ABS/IND: an ancillary value or a big-endian packet load."""
    anc = f.ancillary
    if anc is not None:
        return _ancillary(m, anc)
    offset = _s32(f.k) if f.code & 0xE0 == BPF_ABS else _s32(m.x + f.k)
    value = skb_load(m.skb, offset, SIZE_BYTES[f.code & 0x18])
    if value is None:
        raise _Return(0)
    return value


def _ld(m: ClassicMachine, f: SockFilter) -> None:
    mode = f.code & 0xE0
    if f.code & 0x07 == BPF_LD:
        if mode in (BPF_ABS, BPF_IND):
            m.a = _load(m, f)
        else:
            m.a = {BPF_IMM: f.k, BPF_MEM: m.mem[f.k] if mode == BPF_MEM else 0,
                   BPF_LEN: m.skb.len}[mode] & U32
        return
    if mode == BPF_MSH:
        value = skb_load(m.skb, _s32(f.k), 1)
        if value is None:
            raise _Return(0)
        m.x = (value & 0xF) << 2
        return
    m.x = {BPF_IMM: f.k, BPF_MEM: m.mem[f.k] if mode == BPF_MEM else 0,
           BPF_LEN: m.skb.len}[mode] & U32


def _jump(m: ClassicMachine, f: SockFilter, pc: int) -> int:
    op = f.code & 0xF0
    if op == BPF_JA:
        return pc + 1 + f.k
    b = m.x if f.code & BPF_X else f.k
    taken = {BPF_JEQ: m.a == b, BPF_JGT: m.a > b, BPF_JGE: m.a >= b,
             BPF_JSET: bool(m.a & b)}[op]
    return pc + 1 + (f.jt if taken else f.jf)


def _step(m: ClassicMachine, f: SockFilter, pc: int) -> int:
    """Run one instruction; the next pc."""
    cls = f.code & 0x07
    if cls == BPF_ALU:
        _alu(m, f)
    elif cls in (BPF_LD, BPF_LDX):
        _ld(m, f)
    elif cls == BPF_ST:
        m.mem[f.k] = m.a
    elif cls == BPF_STX:
        m.mem[f.k] = m.x
    elif cls == BPF_JMP:
        return _jump(m, f, pc)
    elif cls == BPF_RET:
        raise _Return(m.a if f.code & BPF_A else f.k)
    elif cls == BPF_MISC:
        if f.code & 0xF8 == BPF_TAX:
            m.x = m.a
        else:
            m.a = m.x
    return pc + 1


def run_classic(prog: Sequence[SockFilter], skb: SkBuff, *, cpu: int = 0,
                random_u32: Callable[[], int] = lambda: 0) -> int:
    """Run a checked program on ``skb``; the u32 it returns (0 = drop)."""
    m = ClassicMachine(skb, cpu, random_u32)
    pc = 0
    try:
        while True:
            pc = _step(m, prog[pc], pc)
    except _Return as r:
        return r.value
