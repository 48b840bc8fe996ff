"""BPF on tracepoints (kernel/trace/bpf_trace.c: bpf_raw_event_map, __bpf_trace_run,
bpf_probe_register; kernel/bpf/syscall.c: bpf_raw_tp_link_attach; perf_trace_run_bpf).

Raw tracepoints: a guest's `__bpf_raw_tp_map` lists `struct bpf_raw_event_map {tp,
bpf_func, num_args, writable_size}` (32-byte aligned), one per tracepoint; a module brings
its own. `bpf_get_raw_tracepoint(name)` looks in the core table first, then in modules,
newest first. Attaching a RAW_TRACEPOINT program checks what the verifier recorded
(max_ctx_offset ≤ num_args·8) and registers `__bpf_trace_run` on the tracepoint: each
hit gives the program the arguments zero-extended to u64 (args[0] first), under the
program's own recursion counter (a nested hit counts a miss). A writable raw tracepoint
(writable_size > 0, TRACE_EVENT_WRITABLE) passes a buffer in args[0] that
BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE programs (`raw_tracepoint.w/`) load from and store
to; the verifier's max_tp_access must fit writable_size at attach, and the guest sees
the stores when the tracepoint returns.
Tracepoint programs (SEC("tracepoint/GRP/NAME")) join the event's prog_array through a
perf event and get the record (common fields first) as context."""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emu.machine import Machine
from emu.uaccess import UserFault, copy_from_user, copy_to_user
from probes.bpf.memory import Region
from probes.bpf.prog_types import BpfProgType
from probes.jump_label import image_section
from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, bpf_trace_of,
                                    perf_event_attach_bpf_prog, perf_event_detach_bpf_prog,
                                    prog_stats)
from probes.tracepoint import (TRACEPOINT_DEFAULT_PRIO, Tracepoint, TracepointError,
                               tracepoints_of)

if TYPE_CHECKING:
    from probes.bpf.program import BpfProg
    from probes.trace.trace_events import TraceEventCall

BPF_RAW_TP_MAP = "__bpf_raw_tp_map"
RAW_EVENT_MAP_SIZE = 32
BPF_OBJ_NAME_LEN = 128           # the attach name is copied with this bound (127 + NUL)
_MAP = struct.Struct("<QQII")


@dataclass(frozen=True)
class BpfRawEventMap:
    tp: Tracepoint
    bpf_func: int
    num_args: int
    writable_size: int
    module: Any = None


class BpfRawTracepoints:
    """The raw tracepoint tables of one machine."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.core: list[BpfRawEventMap] = []
        self.modules: list[tuple[Any, list[BpfRawEventMap]]] = []   # newest first
        if machine.image is not None:
            self.core = self._read(machine.image, None)

    def _read(self, image: Any, module: Any) -> list[BpfRawEventMap]:
        sec = image_section(self.m, image, BPF_RAW_TP_MAP)
        if sec is None:
            return []
        base, data = sec
        by_addr = {tp.addr: tp for tp in tracepoints_of(self.m).tps}
        out = []
        for at in range(0, len(data) - _MAP.size + 1, RAW_EVENT_MAP_SIZE):
            tp_addr, func, nargs, wsize = _MAP.unpack_from(data, at)
            tp = by_addr.get(tp_addr)
            if tp is None:
                raise TracepointError(errno.EINVAL, f"bpf_raw_event_map at {base + at:#x} "
                                                    f"names no tracepoint ({tp_addr:#x})")
            out.append(BpfRawEventMap(tp, func, nargs, wsize, module))
        return out

    def add_module(self, module: Any, image: Any) -> list[BpfRawEventMap]:
        """MODULE_STATE_COMING: the module's bpf_raw_events become findable."""
        maps = self._read(image, module)
        self.modules.insert(0, (module, maps))
        return maps

    def remove_module(self, module: Any) -> None:
        """MODULE_STATE_GOING."""
        self.modules = [(mod, maps) for mod, maps in self.modules if mod is not module]

    def bpf_get_raw_tracepoint(self, name: str) -> BpfRawEventMap | None:
        """The core's first, then the modules' (a lookup: the module reference the kernel
        takes here is taken by `bpf_raw_tp_get`, which attach uses)."""
        for btp in self.core:
            if btp.tp.name == name:
                return btp
        for _mod, maps in self.modules:
            for btp in maps:
                if btp.tp.name == name:
                    return btp
        return None

    def bpf_raw_tp_get(self, name: str) -> BpfRawEventMap | None:
        """bpf_get_raw_tracepoint with its try_module_get: a module's raw tracepoint keeps
        the module from being unloaded until bpf_put_raw_tracepoint."""
        btp = self.bpf_get_raw_tracepoint(name)
        if btp is None or btp.module is None or not hasattr(btp.module, "refcnt"):
            return btp                   # the core's, or a stand-in image with no count
        from emu.module import try_module_get
        return btp if try_module_get(btp.module) else None

    def bpf_put_raw_tracepoint(self, btp: BpfRawEventMap) -> None:
        if btp.module is not None and hasattr(btp.module, "refcnt"):
            from emu.module import module_put
            module_put(btp.module)


def bpf_raw_tracepoints_of(machine: Machine) -> BpfRawTracepoints:
    raw: BpfRawTracepoints = machine.layer("bpf_raw_tp", BpfRawTracepoints)
    return raw


def _register_snapshot_layer() -> None:
    """Snapshots keep the module tables (the core's never changes)."""
    from emu.snapshot import LayerHooks, register_snapshot_layer

    def restore(_m: Machine, raw: BpfRawTracepoints, mods: list) -> None:
        raw.modules = list(mods)
    register_snapshot_layer("bpf_raw_tp", LayerHooks(lambda raw: list(raw.modules), restore))


_register_snapshot_layer()


@dataclass(eq=False)
class BpfRawTpLink:
    """struct bpf_raw_tp_link: the program on its tracepoint until `destroy`."""
    machine: Machine
    btp: BpfRawEventMap
    prog: "BpfProg"
    cookie: int = 0
    active: int = 0                  # prog->active (one CPU)
    misses: int = field(default=0)
    _before: bytes = field(default=b"", repr=False)
    released: bool = False

    def run(self, _data: Any, args: tuple[int, ...]) -> None:
        """__bpf_trace_runN: each argument zero-extended from its size into a u64."""
        st = prog_stats(self.prog)
        if self.active:
            st.misses += 1
            self.misses += 1
            return
        self.active += 1
        try:
            tp = self.btp.tp
            vals = [v & ((1 << (8 * a.size)) - 1) for a, v in zip(tp.args, args)]
            ctx = bytearray(struct.pack(f"<{len(vals)}Q", *vals))
            buffer = self._tp_buffer(vals[0]) if self.writable else None
            bpf_trace_of(self.machine).run_prog(self.prog, ctx, tp.iterator, self.cookie,
                                                buffer)
            if buffer is not None and buffer.data != self._before:
                copy_to_user(self.machine.memory, buffer.base, bytes(buffer.data))
        finally:
            self.active -= 1

    @property
    def writable(self) -> bool:
        return (self.prog.prog_type == BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE
                and self.btp.writable_size > 0)

    def _tp_buffer(self, addr: int) -> Region | None:
        """The guest's buffer behind args[0], as a region at its guest address (copied in
        here, back after the run when the program changed it). An unreadable pointer
        gives none: the program's first access faults as any bad access does."""
        size = self.btp.writable_size
        if (addr >> 32) != ((addr + size - 1) >> 32):
            return None                  # a region never spans a 4 GiB boundary
        try:
            data = copy_from_user(self.machine.memory, addr, size)
        except UserFault:
            return None
        self._before = data
        return Region(addr, bytearray(data), True, "tp_buffer")

    def destroy(self) -> None:
        """bpf_raw_tp_link_release: off the tracepoint, the module's reference dropped."""
        if self.released:
            return
        self.released = True
        tracepoints_of(self.machine).tracepoint_probe_unregister(self.btp.tp, self.run, self)
        bpf_raw_tracepoints_of(self.machine).bpf_put_raw_tracepoint(self.btp)


def bpf_raw_tp_link_attach(machine: Machine, prog: "BpfProg", name: str,
                           cookie: int = 0) -> BpfRawTpLink:
    """BPF_RAW_TRACEPOINT_OPEN / BPF_LINK_CREATE for a raw tracepoint program."""
    if prog.prog_type not in (BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT,
                              BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE,
                              BpfProgType.BPF_PROG_TYPE_TRACING):
        raise TracepointError(errno.EINVAL, f"{prog.section}: not a raw tracepoint program")
    if not name or len(name.encode()) >= BPF_OBJ_NAME_LEN:
        raise TracepointError(errno.EINVAL, f"raw tracepoint name {name!r} is empty or too long")
    raw = bpf_raw_tracepoints_of(machine)
    btp = raw.bpf_raw_tp_get(name)
    if btp is None:
        raise TracepointError(errno.ENOENT, f"no raw tracepoint {name!r}")
    try:
        prog.ensure_loaded()             # the verifier records max_ctx_offset
        link = BpfRawTpLink(machine, btp, prog, cookie)
        bpf_probe_register(machine, btp, link)
    except BaseException:
        raw.bpf_put_raw_tracepoint(btp)
        raise
    return link


def bpf_probe_register(machine: Machine, btp: BpfRawEventMap, link: BpfRawTpLink) -> None:
    prog = link.prog
    if prog.max_ctx_offset > btp.num_args * 8:
        raise TracepointError(errno.EINVAL, f"{prog.section}: reads context byte "
                                            f"{prog.max_ctx_offset - 1} of a tracepoint "
                                            f"with {btp.num_args} arguments")
    if prog.max_tp_access > btp.writable_size:
        raise TracepointError(errno.EINVAL, f"{prog.section}: accesses byte "
                                            f"{prog.max_tp_access - 1} of the tracepoint's "
                                            f"buffer ({btp.writable_size} writable bytes)")
    ret = tracepoints_of(machine).tracepoint_probe_register_prio(
        btp.tp, link.run, link, TRACEPOINT_DEFAULT_PRIO, may_exist=True)
    if ret:
        raise TracepointError(-ret, f"{btp.tp.name}: cannot register the program")


# --- tracepoint (perf) programs ----------------------------------------------------------------
@dataclass(eq=False)
class TracepointPerfLink:
    """A perf event on a tracepoint event with a TRACEPOINT program (PERF_EVENT_IOC_SET_BPF)."""
    event: PerfEvent
    call: "TraceEventCall"
    prog: "BpfProg"

    def destroy(self) -> None:
        perf_event_detach_bpf_prog(self.event)
        self.call.perf_unregister()


def attach_tracepoint_prog(machine: Machine, prog: "BpfProg", group: str, name: str,
                           cookie: int = 0) -> TracepointPerfLink:
    """bpf_program__attach_tracepoint: the event events/GRP/NAME gets the program."""
    from probes.trace.trace_tracepoint import tracepoint_events_of
    from probes.trace.tracefs import tracefs_of
    fs = tracefs_of(machine)
    tracepoint_events_of(fs)
    call = fs.find_event(group, name)
    if call is None or call.kind != "tracepoint":
        raise TracepointError(errno.ENOENT, f"no tracepoint event {group}/{name}")
    event = PerfEvent(call, PerfType.PERF_TYPE_TRACEPOINT, EventKind.TRACEPOINT)
    err = perf_event_attach_bpf_prog(event, prog, cookie)
    if err:
        raise TracepointError(-err, f"{prog.section}: attach to {group}/{name}")
    call.perf_register()
    return TracepointPerfLink(event, call, prog)


def perf_trace_run_bpf(machine: Machine, call: "TraceEventCall", record: bytes) -> int:
    """perf_trace_run_bpf_submit → trace_call_bpf with the record as context: the AND of
    the programs' results; a nested hit counts a miss for each program."""
    st = bpf_trace_of(machine)
    array: Any = call.prog_array
    if array is None:
        return 1
    if st.bpf_prog_active:
        for prog in array.progs():
            prog_stats(prog).misses += 1
        return 0
    st.bpf_prog_active += 1
    ret = 1
    try:
        for item in array.items:
            r0 = st.run_prog(item.prog, bytearray(record), 0, item.bpf_cookie)
            ret &= r0 & 0xFFFFFFFF
    finally:
        st.bpf_prog_active -= 1
    return ret


def attach_tracepoint_link(machine: Machine, prog: "BpfProg", kind: str, point: str,
                           cookie: int = 0) -> Any:
    """libbpf's attach by SEC name: `raw_tp/NAME` or `tracepoint/GRP/NAME`; refusals as
    LibbpfError with the kernel's errno."""
    from probes.bpf.libbpf import LibbpfError
    try:
        if kind == "raw_tp":
            return bpf_raw_tp_link_attach(machine, prog, point, cookie)
        group, _, name = point.partition("/")
        if not name:
            raise TracepointError(errno.EINVAL, f"section {prog.section!r} names no GRP/NAME")
        return attach_tracepoint_prog(machine, prog, group, name, cookie)
    except TracepointError as e:
        raise LibbpfError(e.errno, f"program {prog.name or prog.section}: {e.reason}") from None
