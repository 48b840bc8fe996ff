"""Program types and what each lets a program do (include/linux/bpf_types.h).

Each type says how its context may be accessed, which helpers it may call
(the kernel's per-type ``get_func_proto``), and how strict the verifier is.
``BPF_PROG_TYPE_UNSPEC`` is this machine's "conformance" type: the context
is the caller's writable memory with its length in r2, and the verifier
accepts what the ISA defines but the kernel refuses (division by an
immediate zero, shifts by an immediate >= width, unreachable code, callx).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

from .skb import sk_filter_is_valid_access


class BpfProgType(IntEnum):
    BPF_PROG_TYPE_UNSPEC = 0
    BPF_PROG_TYPE_SOCKET_FILTER = 1
    BPF_PROG_TYPE_KPROBE = 2
    BPF_PROG_TYPE_SCHED_CLS = 3
    BPF_PROG_TYPE_SCHED_ACT = 4
    BPF_PROG_TYPE_TRACEPOINT = 5
    BPF_PROG_TYPE_XDP = 6
    BPF_PROG_TYPE_PERF_EVENT = 7
    BPF_PROG_TYPE_RAW_TRACEPOINT = 17
    BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE = 24
    BPF_PROG_TYPE_TRACING = 26


# Helper groups by kernel id (see helpers.py for the protos)
BASE_HELPERS = frozenset({1, 2, 3, 5, 6, 7, 8, 12, 118, 125, 130, 131, 132, 133, 134, 160, 208})
TRACING_HELPERS = BASE_HELPERS | frozenset(
    {4, 14, 15, 16, 25, 27, 35, 36, 45, 67, 112, 113, 114, 115, 173, 174})
NET_HELPERS = BASE_HELPERS | frozenset({25})


@dataclass(frozen=True)
class ProgTypeInfo:
    """``ctx_writable``: the program may store into its context.
    ``helpers``: allowed helper ids (None = all known).
    ``lenient``: ISA-conformance verifier rules (see module doc).
    ``entry_regs``: registers initialised at entry besides r10.
    ``ctx_size``: bytes of context a load may touch, aligned to its size (the type's
    ``is_valid_access``); None leaves context bounds to run time. A program's own
    ``ctx_size`` (set at load for the target arch) wins over the type's. ``ctx_min``: the
    first offset a load may touch (a tracepoint record's common fields are not readable).
    ``ctx_access``: the type's field rule, (off, size, write) -> refusal or None."""

    ctx_writable: bool
    helpers: frozenset[int] | None
    lenient: bool = False
    entry_regs: tuple[int, ...] = (1,)
    ctx_size: int | None = None
    ctx_min: int = 0
    ctx_access: Callable[[int, int, bool], str | None] | None = None


# sizeof(struct pt_regs) per arch (kprobe_prog_is_valid_access bounds by the kernel
# struct): x86-64 168, arm64 336. Without a target arch the larger one applies.
KPROBE_CTX_SIZE = {"x86_64": 168, "arm64": 336}
PERF_MAX_TRACE_SIZE = 8192      # tp_prog_is_valid_access: [sizeof(void *), this)
MAX_BPF_FUNC_ARGS = 12          # raw_tp_prog_is_valid_access: [0, 12 * sizeof(u64))


def raw_tp_writable_prog_is_valid_access(off: int, size: int, write: bool) -> str | None:
    """A writable raw tracepoint's context is read-only u64 arguments; ctx[0], read
    whole, is the pointer to the tracepoint's buffer (PTR_TO_TP_BUFFER, the verifier's
    _ctx_load). The buffer, not the context, is what the program may write."""
    if off == 0 and (size != 8 or write):
        return f"invalid bpf_context access off={off} size={size}"
    return None


PROG_TYPES: dict[BpfProgType, ProgTypeInfo] = {
    BpfProgType.BPF_PROG_TYPE_UNSPEC: ProgTypeInfo(True, None, lenient=True, entry_regs=(1, 2)),
    BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER: ProgTypeInfo(True, NET_HELPERS | {26},
                                                          ctx_access=sk_filter_is_valid_access),
    BpfProgType.BPF_PROG_TYPE_SCHED_CLS: ProgTypeInfo(False, NET_HELPERS | {26}),
    BpfProgType.BPF_PROG_TYPE_SCHED_ACT: ProgTypeInfo(False, NET_HELPERS | {26}),
    BpfProgType.BPF_PROG_TYPE_XDP: ProgTypeInfo(False, NET_HELPERS),
    BpfProgType.BPF_PROG_TYPE_KPROBE: ProgTypeInfo(False, TRACING_HELPERS | {58},
                                                  ctx_size=max(KPROBE_CTX_SIZE.values())),
    BpfProgType.BPF_PROG_TYPE_TRACEPOINT: ProgTypeInfo(False, TRACING_HELPERS,
                                                      ctx_size=PERF_MAX_TRACE_SIZE, ctx_min=8),
    BpfProgType.BPF_PROG_TYPE_PERF_EVENT: ProgTypeInfo(False, TRACING_HELPERS),
    BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT: ProgTypeInfo(False, TRACING_HELPERS,
                                                          ctx_size=8 * MAX_BPF_FUNC_ARGS),
    BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE: ProgTypeInfo(
        False, TRACING_HELPERS, ctx_size=8 * MAX_BPF_FUNC_ARGS,
        ctx_access=raw_tp_writable_prog_is_valid_access),
    BpfProgType.BPF_PROG_TYPE_TRACING: ProgTypeInfo(False, TRACING_HELPERS),
}

# Types whose context the machine builds around a packet (xdp_md, __sk_buff)
PACKET_TYPES = frozenset({BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER, BpfProgType.BPF_PROG_TYPE_XDP,
                          BpfProgType.BPF_PROG_TYPE_SCHED_CLS, BpfProgType.BPF_PROG_TYPE_SCHED_ACT})
