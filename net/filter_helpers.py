"""The kernel-internal helpers converted classic programs call (net/core/filter.c).

The kernel emits ``call`` with imm = fn - __bpf_call_base for these; they are
not in the helper-id table a loaded eBPF program may use. Here they get ids
from ``INTERNAL_BASE`` up, and ``SK_FILTER_HELPERS`` is the kernel table plus
them: the table a converted program (and only it) runs with. Each helper
reads the skb model from the run's environment (``SkbRunContext.skb``).
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from probes.bpf.context import BpfRunContext
from probes.bpf.helpers import KERNEL_HELPERS, BpfArgType as A, BpfFuncProto

from .flow_dissector import skb_get_poff
from .skbuff import SkBuff, skb_load

if TYPE_CHECKING:
    from probes.bpf.runtime import BpfRun

INTERNAL_BASE = 0x10000
BPF_SKB_LOAD_HELPER_8 = INTERNAL_BASE + 0
BPF_SKB_LOAD_HELPER_16 = INTERNAL_BASE + 1
BPF_SKB_LOAD_HELPER_32 = INTERNAL_BASE + 2
BPF_SKB_GET_PAY_OFFSET = INTERNAL_BASE + 3
BPF_SKB_GET_NLATTR = INTERNAL_BASE + 4
BPF_SKB_GET_NLATTR_NEST = INTERNAL_BASE + 5
BPF_GET_RAW_CPU_ID = INTERNAL_BASE + 6
BPF_USER_RND_U32 = INTERNAL_BASE + 7

NLA_HDRLEN = 4
NLA_TYPE_MASK = 0x3FFF        # ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)


@dataclass
class SkbRunContext(BpfRunContext):
    """A run environment that also carries the skb the program filters."""

    skb: SkBuff | None = None


def _skb(run: "BpfRun") -> SkBuff:
    skb = getattr(run.env, "skb", None)
    if skb is None:
        raise LookupError("a socket filter runs with an SkbRunContext that holds the skb")
    return skb


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def _load_helper(size: int):
    def load(run: "BpfRun", skb: int, data: int, headlen: int, offset: int, *_: int) -> int:
        value = skb_load(_skb(run), _s32(offset), size)   # the helper's `int offset`
        return -errno.EFAULT if value is None else value
    return load


def nla_find(data: bytes, start: int, length: int, attrtype: int) -> int | None:
    """nla_find over [start, start+length): the matching attribute's offset."""
    pos, rem = start, length
    while rem >= NLA_HDRLEN:
        nla_len, nla_type = struct.unpack_from("<HH", data, pos)
        if nla_len < NLA_HDRLEN or nla_len > rem:
            return None
        if nla_type & NLA_TYPE_MASK == attrtype:
            return pos
        step = (nla_len + 3) & ~3
        pos, rem = pos + step, rem - step
    return None


def bpf_skb_get_nlattr(skb: SkBuff, a: int, x: int) -> int:
    if skb.data_len or skb.len < NLA_HDRLEN or a > skb.len - NLA_HDRLEN:
        return 0
    return nla_find(skb.data, a, skb.len - a, x) or 0


def bpf_skb_get_nlattr_nest(skb: SkBuff, a: int, x: int) -> int:
    if skb.data_len or skb.len < NLA_HDRLEN or a > skb.len - NLA_HDRLEN:
        return 0
    nla_len = struct.unpack_from("<H", skb.data, a)[0]
    if nla_len > skb.len - a:
        return 0
    return nla_find(skb.data, a + NLA_HDRLEN, nla_len - NLA_HDRLEN, x) or 0


def _pay_offset(run: "BpfRun", *_: int) -> int:
    return skb_get_poff(_skb(run))


def _nlattr(run: "BpfRun", ctx: int, a: int, x: int, *_: int) -> int:
    return bpf_skb_get_nlattr(_skb(run), a & 0xFFFFFFFF, x & 0xFFFFFFFF)


def _nlattr_nest(run: "BpfRun", ctx: int, a: int, x: int, *_: int) -> int:
    return bpf_skb_get_nlattr_nest(_skb(run), a & 0xFFFFFFFF, x & 0xFFFFFFFF)


def _raw_cpu_id(run: "BpfRun", *_: int) -> int:
    return run.env.cpu


def _user_rnd_u32(run: "BpfRun", *_: int) -> int:
    return run.env.prandom_u32()


_CALL3 = (A.ARG_PTR_TO_CTX, A.ARG_ANYTHING, A.ARG_ANYTHING)
_LOAD = (A.ARG_PTR_TO_CTX, A.ARG_ANYTHING, A.ARG_ANYTHING, A.ARG_ANYTHING)
INTERNAL_HELPERS = {p.func_id: p for p in [
    BpfFuncProto(BPF_SKB_LOAD_HELPER_8, "skb_load_helper_8", _load_helper(1), _LOAD),
    BpfFuncProto(BPF_SKB_LOAD_HELPER_16, "skb_load_helper_16", _load_helper(2), _LOAD),
    BpfFuncProto(BPF_SKB_LOAD_HELPER_32, "skb_load_helper_32", _load_helper(4), _LOAD),
    BpfFuncProto(BPF_SKB_GET_PAY_OFFSET, "skb_get_pay_offset", _pay_offset, _CALL3),
    BpfFuncProto(BPF_SKB_GET_NLATTR, "skb_get_nlattr", _nlattr, _CALL3),
    BpfFuncProto(BPF_SKB_GET_NLATTR_NEST, "skb_get_nlattr_nest", _nlattr_nest, _CALL3),
    BpfFuncProto(BPF_GET_RAW_CPU_ID, "get_raw_cpu_id", _raw_cpu_id, _CALL3),
    BpfFuncProto(BPF_USER_RND_U32, "user_rnd_u32", _user_rnd_u32, _CALL3),
]}
SK_FILTER_HELPERS = {**KERNEL_HELPERS, **INTERNAL_HELPERS}
