"""Helper functions by their kernel ids, with the protos the verifier checks.

Mirrors the ``bpf_func_proto`` tables of kernel/bpf/helpers.c,
kernel/trace/bpf_trace.c, kernel/bpf/ringbuf.c and stackmap.c: each helper
has an id, argument kinds, a return kind, a GPL-only flag and, for a map
argument, the map types it accepts (check_map_func_compatibility). An
implementation is ``impl(run, r1, r2, r3, r4, r5) -> int``; it returns
the helper's result, negative errnos included (the machine masks to u64).
Arguments typed as pointers are read from the machine's own memory
(``run.mem``); only the source of probe_read* and ``%s`` strings may be
guest memory, and every destination is bounds-checked before anything is
read, so a hostile size can never make the host allocate.

A caller may run a program with its own table (``helpers=``) to add or
replace helpers; ``KERNEL_HELPERS`` is the default.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable

from .errors import BpfRuntimeError
from .isa import MAX_TAIL_CALL_CNT, U64, sext64
from .maps import (
    BPF_F_CURRENT_CPU, BPF_F_FAST_STACK_CMP, BPF_F_INDEX_MASK, BPF_F_REUSE_STACKID,
    BPF_F_SKIP_FIELD_MASK, BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_CONS_POS,
    BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_PROD_POS, BPF_RB_RING_SIZE, BpfMap,
    BpfMapType as T, PerfEventArrayMap, ProgArrayMap, RingbufMap, StackTraceMap,
)
from .memory import MemoryFault
from .printk import FormatError, trace_printk_format

if TYPE_CHECKING:
    from .runtime import BpfRun


class BpfArgType(Enum):
    """enum bpf_arg_type (the subset our helpers use)."""

    ARG_DONTCARE = "unused"
    ARG_ANYTHING = "anything"
    ARG_CONST_MAP_PTR = "map"
    ARG_PTR_TO_MAP_KEY = "map key"
    ARG_PTR_TO_MAP_VALUE = "map value"
    ARG_PTR_TO_MEM = "readable memory"
    ARG_PTR_TO_UNINIT_MEM = "writable memory"
    ARG_CONST_SIZE = "size"
    ARG_CONST_SIZE_OR_ZERO = "size or zero"
    ARG_CONST_ALLOC_SIZE_OR_ZERO = "alloc size"
    ARG_PTR_TO_CTX = "ctx"
    ARG_PTR_TO_RINGBUF_MEM = "ringbuf record"


class BpfRetType(Enum):
    RET_INTEGER = "integer"
    RET_VOID = "void"
    RET_PTR_TO_MAP_VALUE_OR_NULL = "map_value_or_null"
    RET_PTR_TO_RINGBUF_MEM_OR_NULL = "ringbuf_mem_or_null"


A = BpfArgType
R = BpfRetType
HelperImpl = Callable[..., int]

GENERIC_MAPS = frozenset({T.BPF_MAP_TYPE_HASH, T.BPF_MAP_TYPE_ARRAY, T.BPF_MAP_TYPE_PERCPU_HASH,
                          T.BPF_MAP_TYPE_PERCPU_ARRAY, T.BPF_MAP_TYPE_LRU_HASH,
                          T.BPF_MAP_TYPE_LRU_PERCPU_HASH})


@dataclass(frozen=True)
class BpfFuncProto:
    """struct bpf_func_proto plus the implementation. ``args`` lists the kinds
    of r1.. (unlisted registers are unused); ``map_types`` restricts the
    ARG_CONST_MAP_PTR argument."""

    func_id: int
    name: str
    impl: HelperImpl
    args: tuple[BpfArgType, ...] = ()
    ret: BpfRetType = BpfRetType.RET_INTEGER
    gpl_only: bool = False
    map_types: frozenset[T] = GENERIC_MAPS


# --- small tools -----------------------------------------------------------

def _map(run: "BpfRun", ptr: int, kind: type | None = None) -> BpfMap:
    m = run.map_at(ptr)
    if m is None or (kind is not None and not isinstance(m, kind)):
        raise BpfRuntimeError(f"{ptr:#x} is not a pointer to a suitable map")
    return m


def _cpu_arg(run: "BpfRun", m: BpfMap) -> int | None:
    """Per-CPU maps update only the running CPU's copy from a program."""
    percpu = {T.BPF_MAP_TYPE_PERCPU_ARRAY, T.BPF_MAP_TYPE_PERCPU_HASH,
              T.BPF_MAP_TYPE_LRU_PERCPU_HASH}
    return run.env.cpu if m.map_type in percpu else None


def _fill(run: "BpfRun", dst: int, size: int, data: bytes) -> None:
    run.check_write(dst, size)
    run.write(dst, data.ljust(size, b"\0")[:size])


# --- maps -------------------------------------------------------------------

def bpf_map_lookup_elem(run: "BpfRun", r1: int, r2: int, *_: int) -> int:
    m = _map(run, r1)
    return run.map_value_ptr(m, run.mem.read(r2, m.key_size))


def bpf_map_update_elem(run: "BpfRun", r1: int, r2: int, r3: int, r4: int, *_: int) -> int:
    m = _map(run, r1)
    key, value = run.mem.read(r2, m.key_size), run.mem.read(r3, m.value_size)
    return m.update_elem(key, value, r4, _cpu_arg(run, m))


def bpf_map_delete_elem(run: "BpfRun", r1: int, r2: int, *_: int) -> int:
    m = _map(run, r1)
    return m.delete_elem(run.mem.read(r2, m.key_size))


# --- memory -------------------------------------------------------------------

def _probe_read(run: "BpfRun", dst: int, size: int, src: int, *_: int) -> int:
    from .runtime import GuestFault

    run.check_write(dst, size)  # bounds the read: the buffer must exist first
    try:
        data = run.read(src, size)
    except (MemoryFault, GuestFault):
        _fill(run, dst, size, b"")
        return -errno.EFAULT
    run.write(dst, data)
    return 0


def _probe_read_str(run: "BpfRun", dst: int, size: int, src: int, *_: int) -> int:
    from .runtime import GuestFault

    if size == 0:
        return 0
    run.check_write(dst, size)
    try:
        text = run.read_str(src, size - 1)
    except (MemoryFault, GuestFault):
        _fill(run, dst, size, b"")
        return -errno.EFAULT
    run.write(dst, text + b"\0")
    return len(text) + 1


def _probe_write_user(run: "BpfRun", dst: int, src: int, size: int, *_: int) -> int:
    data = run.mem.read(src, size)  # from the program's memory, so size is bounded
    guest = run.env.memory
    writer = getattr(guest, "write", None)
    if writer is None:
        return -errno.EFAULT
    try:
        writer(dst, data)
    except Exception:
        return -errno.EFAULT
    return 0


# --- time, task, cpu ------------------------------------------------------------

def _ktime(run: "BpfRun", *_: int) -> int:
    return run.env.ktime_ns()


def _jiffies64(run: "BpfRun", *_: int) -> int:
    return run.env.ktime_ns() * run.env.hz // 1_000_000_000


def _prandom(run: "BpfRun", *_: int) -> int:
    return run.env.prandom_u32()


def _cpu(run: "BpfRun", *_: int) -> int:
    return run.env.cpu


def _pid_tgid(run: "BpfRun", *_: int) -> int:
    return (run.env.tgid << 32) | (run.env.pid & 0xFFFFFFFF)


def _uid_gid(run: "BpfRun", *_: int) -> int:
    return (run.env.gid << 32) | (run.env.uid & 0xFFFFFFFF)


def _comm(run: "BpfRun", buf: int, size: int, *_: int) -> int:
    run.check_write(buf, size)
    comm = run.env.comm[:15][:max(size - 1, 0)]
    _fill(run, buf, size, comm)
    return 0


def _current_task(run: "BpfRun", *_: int) -> int:
    return run.env.task


def _func_ip(run: "BpfRun", *_: int) -> int:
    return run.env.func_ip


def _attach_cookie(run: "BpfRun", *_: int) -> int:
    return run.env.attach_cookie


def _numa_node(run: "BpfRun", *_: int) -> int:
    return 0


# --- tracing output -----------------------------------------------------------------

def _trace_printk(run: "BpfRun", fmt: int, size: int, a1: int, a2: int, a3: int) -> int:
    raw = run.mem.read(fmt, size)
    if not raw or raw[-1] != 0:
        return -errno.EINVAL  # the format must be NUL-terminated within fmt_size
    try:
        text = trace_printk_format(raw, [a1, a2, a3], run.read_str)
    except FormatError:
        return -errno.EINVAL
    run.env.trace_printk.append(text)
    return len(text)


def _perf_event_output(run: "BpfRun", ctx: int, mp: int, flags: int, data: int, size: int) -> int:
    m = _map(run, mp, PerfEventArrayMap)
    if flags & ~BPF_F_INDEX_MASK:
        return -errno.EINVAL
    index = run.env.cpu if flags == BPF_F_CURRENT_CPU else flags
    return m.output(index, run.mem.read(data, size))  # type: ignore[attr-defined]


def _stack(run: "BpfRun", flags: int) -> list[int]:
    if run.env.stack_trace is None:
        return []
    return [ip & U64 for ip in run.env.stack_trace(bool(flags & BPF_F_USER_STACK))]


def _get_stackid(run: "BpfRun", ctx: int, mp: int, flags: int, *_: int) -> int:
    m = _map(run, mp, StackTraceMap)
    known = BPF_F_SKIP_FIELD_MASK | BPF_F_USER_STACK | BPF_F_FAST_STACK_CMP | BPF_F_REUSE_STACKID
    if flags & ~known:
        return -errno.EINVAL
    return m.get_stackid(_stack(run, flags), flags)  # type: ignore[attr-defined]


def _get_stack(run: "BpfRun", ctx: int, buf: int, size: int, flags: int, *_: int) -> int:
    run.check_write(buf, size)
    if flags & ~(BPF_F_SKIP_FIELD_MASK | BPF_F_USER_STACK) or size % 8:
        _fill(run, buf, size, b"")
        return -errno.EINVAL
    ips = _stack(run, flags)[flags & BPF_F_SKIP_FIELD_MASK:][:size // 8]
    _fill(run, buf, size, b"".join(ip.to_bytes(8, "little") for ip in ips))
    return len(ips) * 8


def _override_return(run: "BpfRun", regs: int, rc: int, *_: int) -> int:
    run.env.override_rc = sext64(rc)
    return 0


# --- tail calls, ring buffers, packets -------------------------------------------------

def _tail_call(run: "BpfRun", ctx: int, mp: int, index: int, *_: int) -> int:
    m = _map(run, mp, ProgArrayMap)
    index &= 0xFFFFFFFF
    prog = m.get_prog(index) if index < m.max_entries else None  # type: ignore[attr-defined]
    if prog is None or run.tail_calls >= MAX_TAIL_CALL_CNT:
        return -errno.ENOENT  # failure: the program goes on with the next insn
    run.tail_calls += 1
    run.pending_tail_call = prog
    return 0


def _ringbuf_output(run: "BpfRun", mp: int, data: int, size: int, flags: int, *_: int) -> int:
    m = _map(run, mp, RingbufMap)
    if flags & ~(BPF_RB_NO_WAKEUP | BPF_RB_FORCE_WAKEUP):
        return -errno.EINVAL
    return m.output(run.mem.read(data, size))  # type: ignore[attr-defined]


def _ringbuf_reserve(run: "BpfRun", mp: int, size: int, flags: int, *_: int) -> int:
    m = _map(run, mp, RingbufMap)
    if flags:
        return 0
    return run.reserve(m, size)


def _ringbuf_submit(run: "BpfRun", data: int, flags: int, *_: int) -> int:
    run.release(data, discard=False)
    return 0


def _ringbuf_discard(run: "BpfRun", data: int, flags: int, *_: int) -> int:
    run.release(data, discard=True)
    return 0


def _ringbuf_query(run: "BpfRun", mp: int, flags: int, *_: int) -> int:
    m = _map(run, mp, RingbufMap)
    return {BPF_RB_AVAIL_DATA: m.avail_data(), BPF_RB_RING_SIZE: m.max_entries,  # type: ignore
            BPF_RB_CONS_POS: m.cons_pos, BPF_RB_PROD_POS: m.prod_pos}.get(flags, 0)  # type: ignore


def _skb_load_bytes(run: "BpfRun", skb: int, off: int, to: int, size: int, *_: int) -> int:
    run.check_write(to, size)
    packet = run.packet if run.packet is not None else run.env.packet
    off = sext64(off)
    if packet is None or off < 0 or off + size > len(packet):
        _fill(run, to, size, b"")
        return -errno.EFAULT
    run.write(to, bytes(packet[off:off + size]))
    return 0


# --- the table ----------------------------------------------------------------------

_MEM_SIZE = (A.ARG_PTR_TO_UNINIT_MEM, A.ARG_CONST_SIZE_OR_ZERO, A.ARG_ANYTHING)
_STR_SIZE = (A.ARG_PTR_TO_UNINIT_MEM, A.ARG_CONST_SIZE_OR_ZERO, A.ARG_ANYTHING)
_RINGBUF = frozenset({T.BPF_MAP_TYPE_RINGBUF})

_PROTOS = [
    BpfFuncProto(1, "map_lookup_elem", bpf_map_lookup_elem,
                 (A.ARG_CONST_MAP_PTR, A.ARG_PTR_TO_MAP_KEY), R.RET_PTR_TO_MAP_VALUE_OR_NULL),
    BpfFuncProto(2, "map_update_elem", bpf_map_update_elem,
                 (A.ARG_CONST_MAP_PTR, A.ARG_PTR_TO_MAP_KEY, A.ARG_PTR_TO_MAP_VALUE,
                  A.ARG_ANYTHING)),
    BpfFuncProto(3, "map_delete_elem", bpf_map_delete_elem,
                 (A.ARG_CONST_MAP_PTR, A.ARG_PTR_TO_MAP_KEY)),
    BpfFuncProto(4, "probe_read", _probe_read, _MEM_SIZE, gpl_only=True),
    BpfFuncProto(5, "ktime_get_ns", _ktime),
    # r3-r5 are variadic: the kernel's proto leaves them unchecked
    BpfFuncProto(6, "trace_printk", _trace_printk, (A.ARG_PTR_TO_MEM, A.ARG_CONST_SIZE),
                 gpl_only=True),
    BpfFuncProto(7, "get_prandom_u32", _prandom),
    BpfFuncProto(8, "get_smp_processor_id", _cpu),
    BpfFuncProto(12, "tail_call", _tail_call,
                 (A.ARG_PTR_TO_CTX, A.ARG_CONST_MAP_PTR, A.ARG_ANYTHING), R.RET_VOID,
                 map_types=frozenset({T.BPF_MAP_TYPE_PROG_ARRAY})),
    BpfFuncProto(14, "get_current_pid_tgid", _pid_tgid),
    BpfFuncProto(15, "get_current_uid_gid", _uid_gid),
    BpfFuncProto(16, "get_current_comm", _comm, (A.ARG_PTR_TO_UNINIT_MEM, A.ARG_CONST_SIZE)),
    BpfFuncProto(25, "perf_event_output", _perf_event_output,
                 (A.ARG_PTR_TO_CTX, A.ARG_CONST_MAP_PTR, A.ARG_ANYTHING, A.ARG_PTR_TO_MEM,
                  A.ARG_CONST_SIZE_OR_ZERO), gpl_only=True,
                 map_types=frozenset({T.BPF_MAP_TYPE_PERF_EVENT_ARRAY})),
    BpfFuncProto(26, "skb_load_bytes", _skb_load_bytes,
                 (A.ARG_PTR_TO_CTX, A.ARG_ANYTHING, A.ARG_PTR_TO_UNINIT_MEM, A.ARG_CONST_SIZE)),
    BpfFuncProto(27, "get_stackid", _get_stackid,
                 (A.ARG_PTR_TO_CTX, A.ARG_CONST_MAP_PTR, A.ARG_ANYTHING), gpl_only=True,
                 map_types=frozenset({T.BPF_MAP_TYPE_STACK_TRACE})),
    BpfFuncProto(35, "get_current_task", _current_task, gpl_only=True),
    BpfFuncProto(36, "probe_write_user", _probe_write_user,
                 (A.ARG_ANYTHING, A.ARG_PTR_TO_MEM, A.ARG_CONST_SIZE), gpl_only=True),
    BpfFuncProto(42, "get_numa_node_id", _numa_node),
    BpfFuncProto(45, "probe_read_str", _probe_read_str, _STR_SIZE, gpl_only=True),
    BpfFuncProto(58, "override_return", _override_return,
                 (A.ARG_PTR_TO_CTX, A.ARG_ANYTHING), gpl_only=True),
    BpfFuncProto(67, "get_stack", _get_stack,
                 (A.ARG_PTR_TO_CTX, A.ARG_PTR_TO_UNINIT_MEM, A.ARG_CONST_SIZE_OR_ZERO,
                  A.ARG_ANYTHING), gpl_only=True),
    BpfFuncProto(112, "probe_read_user", _probe_read, _MEM_SIZE, gpl_only=True),
    BpfFuncProto(113, "probe_read_kernel", _probe_read, _MEM_SIZE, gpl_only=True),
    BpfFuncProto(114, "probe_read_user_str", _probe_read_str, _STR_SIZE, gpl_only=True),
    BpfFuncProto(115, "probe_read_kernel_str", _probe_read_str, _STR_SIZE, gpl_only=True),
    BpfFuncProto(118, "jiffies64", _jiffies64),
    BpfFuncProto(125, "ktime_get_boot_ns", _ktime),
    BpfFuncProto(130, "ringbuf_output", _ringbuf_output,
                 (A.ARG_CONST_MAP_PTR, A.ARG_PTR_TO_MEM, A.ARG_CONST_SIZE_OR_ZERO,
                  A.ARG_ANYTHING), map_types=_RINGBUF),
    BpfFuncProto(131, "ringbuf_reserve", _ringbuf_reserve,
                 (A.ARG_CONST_MAP_PTR, A.ARG_CONST_ALLOC_SIZE_OR_ZERO, A.ARG_ANYTHING),
                 R.RET_PTR_TO_RINGBUF_MEM_OR_NULL, map_types=_RINGBUF),
    BpfFuncProto(132, "ringbuf_submit", _ringbuf_submit,
                 (A.ARG_PTR_TO_RINGBUF_MEM, A.ARG_ANYTHING), R.RET_VOID),
    BpfFuncProto(133, "ringbuf_discard", _ringbuf_discard,
                 (A.ARG_PTR_TO_RINGBUF_MEM, A.ARG_ANYTHING), R.RET_VOID),
    BpfFuncProto(134, "ringbuf_query", _ringbuf_query,
                 (A.ARG_CONST_MAP_PTR, A.ARG_ANYTHING), map_types=_RINGBUF),
    BpfFuncProto(160, "ktime_get_coarse_ns", _ktime),
    BpfFuncProto(173, "get_func_ip", _func_ip, (A.ARG_PTR_TO_CTX,)),
    BpfFuncProto(174, "get_attach_cookie", _attach_cookie, (A.ARG_PTR_TO_CTX,)),
    BpfFuncProto(208, "ktime_get_tai_ns", _ktime),
]

KERNEL_HELPERS: dict[int, BpfFuncProto] = {p.func_id: p for p in _PROTOS}
HELPER_NAMES: dict[int, str] = {p.func_id: p.name for p in _PROTOS}
BPF_FUNC_trace_printk = 6
BPF_FUNC_tail_call = 12
BPF_FUNC_perf_event_output = 25
BPF_FUNC_ringbuf_output = 130

GPL_COMPATIBLE = frozenset({"GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL",
                            "Dual MIT/GPL", "Dual MPL/GPL"})
