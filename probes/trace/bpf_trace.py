"""BPF programs on probe hits (kernel/trace/bpf_trace.c, the prog-array part of
kernel/bpf/core.c and perf_event_{attach,detach,query}_bpf_prog).

A trace event call (anything with a ``prog_array`` attribute: the trace layer's
trace_event_call, or the kprobe-PMU event of ``probes.bpf.libbpf``) holds an immutable
``BpfProgArray``; attaching or detaching builds a new one (the kernel's RCU
copy-on-update), so a hit that is running the old array is never disturbed.
``trace_call_bpf(call, regs)`` runs every program of the array with ctx = the arch's
``struct pt_regs`` image, under the per-CPU ``bpf_prog_active`` recursion guard, and
returns the AND of their u32 results (1 for no array): the trace layer records the event
only if it is non-zero.

Left out: sleepable programs, uprobe/tracepoint/syscall events (only the checks that
name them), the dummy-program replacement on allocation failure, kprobe_multi.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import importlib
import itertools
import struct
import sys
import weakref
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any, Callable

from emu.errors import KprobeEmuError
from emu.uaccess import UserFault, copy_from_user, copy_to_user, get_user
from probes.bpf import BpfRunContext
from probes.bpf.errors import BpfRuntimeError
from probes.bpf.isa import BPF_CALL_OP
from probes.bpf.maps import PerfEventArrayMap, RingbufMap
from probes.bpf.memory import CTX_ADDR, Region
from probes.bpf.prog_types import BpfProgType
from probes.bpf.runtime import BpfRun

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.bpf.program import BpfProg
    from probes.regs import PtRegs

BPF_TRACE_MAX_PROGS = 64
PERF_MAX_STACK_DEPTH = 127
BPF_FUNC_override_return = 58


class PerfType(IntEnum):
    """perf_event_attr.type. The kprobe PMU's type is dynamic in the kernel (read from
    /sys/bus/event_source/devices/kprobe/type); this machine registers it as 6."""
    PERF_TYPE_TRACEPOINT = 2
    PERF_TYPE_KPROBE = 6


class EventKind(StrEnum):
    """What the perf event's trace event is (TRACE_EVENT_FL_KPROBE/UPROBE, tracepoint)."""
    KPROBE = "kprobe"
    UPROBE = "uprobe"
    TRACEPOINT = "tracepoint"
    SYSCALL = "syscall"
    OTHER = "other"


class BpfTraceError(KprobeEmuError):
    """A BPF program attached to a probe could not run (a run-time fault the verifier
    let through, or its budget ran out). `prog` names the program."""

    exit_code = 2

    def __init__(self, prog: str, reason: str) -> None:
        self.prog, self.reason = prog, reason
        super().__init__(f"bpf program {prog}: {reason}")


# --- bpf_prog_array --------------------------------------------------------------------

@dataclass(frozen=True)
class BpfProgArrayItem:
    """struct bpf_prog_array_item: the program and its attach cookie."""
    prog: "BpfProg"
    bpf_cookie: int = 0


@dataclass(frozen=True)
class BpfProgArray:
    """struct bpf_prog_array: immutable; every update makes a new array."""
    items: tuple[BpfProgArrayItem, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    def progs(self) -> list["BpfProg"]:
        return [it.prog for it in self.items]


def bpf_prog_array_length(array: BpfProgArray | None) -> int:
    return 0 if array is None else len(array)


def bpf_prog_array_copy(old: BpfProgArray | None, exclude: "BpfProg | None",
                        include: "BpfProg | None", cookie: int = 0) -> BpfProgArray | int:
    """A new array: `old` without `exclude`, with `include` appended. -EEXIST if `include`
    is already there, -ENOENT if `exclude` is not (kernel/bpf/core.c)."""
    items = list(old.items) if old is not None else []
    if include is not None and any(it.prog is include for it in items):
        return -errno.EEXIST
    if exclude is not None:
        kept = [it for it in items if it.prog is not exclude]
        if len(kept) == len(items):
            return -errno.ENOENT
        items = kept
    if include is not None:
        items.append(BpfProgArrayItem(include, cookie))
    return BpfProgArray(tuple(items))


# --- per-program facts the kernel keeps in bpf_prog / bpf_prog_aux ----------------------

@dataclass
class BpfProgStats:
    """prog->aux->id, run counts (bpf_prog_stats) and recursion misses."""
    id: int
    run_cnt: int = 0
    run_insns: int = 0
    misses: int = 0


_STATS: "weakref.WeakKeyDictionary[BpfProg, BpfProgStats]" = weakref.WeakKeyDictionary()
_NEXT_ID = itertools.count(1)


def prog_stats(prog: "BpfProg") -> BpfProgStats:
    """The program's stats; the first call allocates its id (the kernel's prog idr)."""
    st = _STATS.get(prog)
    if st is None:
        st = _STATS[prog] = BpfProgStats(next(_NEXT_ID))
    return st


def kprobe_override(prog: "BpfProg") -> bool:
    """prog->kprobe_override: the verifier sets it when it sees bpf_override_return."""
    return any(i.code == BPF_CALL_OP and i.src_reg == 0 and i.imm == BPF_FUNC_override_return
               for i in prog.insns)


# --- perf events carrying programs --------------------------------------------------------

@dataclass(eq=False)
class PerfEvent:
    """The part of struct perf_event the attach path reads. `tp_event` is the trace event
    call whose `prog_array` runs on each hit; `func_entry` / `error_injectable` answer
    trace_kprobe_on_func_entry / trace_kprobe_error_injectable for kprobe events."""
    tp_event: Any
    attr_type: PerfType = PerfType.PERF_TYPE_TRACEPOINT
    kind: EventKind = EventKind.KPROBE
    prog: "BpfProg | None" = None
    func_entry: bool = False
    error_injectable: bool = False


_PROG_TYPE_FOR = {EventKind.KPROBE: BpfProgType.BPF_PROG_TYPE_KPROBE,
                  EventKind.UPROBE: BpfProgType.BPF_PROG_TYPE_KPROBE,
                  EventKind.TRACEPOINT: BpfProgType.BPF_PROG_TYPE_TRACEPOINT,
                  EventKind.SYSCALL: BpfProgType.BPF_PROG_TYPE_TRACEPOINT}


def perf_event_attach_bpf_prog(event: PerfEvent, prog: "BpfProg", bpf_cookie: int = 0) -> int:
    """PERF_EVENT_IOC_SET_BPF (perf_event_set_bpf_prog + perf_event_attach_bpf_prog):
    0 or -errno, checked in the kernel's order."""
    want = _PROG_TYPE_FOR.get(event.kind)
    if want is None or prog.prog_type != want:
        return -errno.EINVAL
    override = kprobe_override(prog)
    if override and event.kind != EventKind.KPROBE:
        return -errno.EINVAL
    if override and not (event.func_entry and event.error_injectable):
        return -errno.EINVAL
    if event.prog is not None:
        return -errno.EEXIST
    call = event.tp_event
    if bpf_prog_array_length(call.prog_array) >= BPF_TRACE_MAX_PROGS:
        return -errno.E2BIG
    new = bpf_prog_array_copy(call.prog_array, None, prog, bpf_cookie)
    if isinstance(new, int):
        return new
    prog_stats(prog)
    event.prog = prog
    call.prog_array = new
    _programs_changed(call)
    return 0


def _programs_changed(call: Any) -> None:
    """Probes whose thunk calls this call's old programs go back to the host path."""
    machine = getattr(call, "machine", None)
    if machine is None:
        return
    from probes.bpf.jit_direct import direct_calls_of
    dc = direct_calls_of(machine)
    if dc is not None:
        dc.forget_event(call)


def perf_event_detach_bpf_prog(event: PerfEvent) -> None:
    """Closing the event (or SET_BPF -1): its program leaves the call's array."""
    if event.prog is None:
        return
    call = event.tp_event
    new = bpf_prog_array_copy(call.prog_array, event.prog, None)
    if not isinstance(new, int):
        call.prog_array = new if len(new) else None
    event.prog = None
    _programs_changed(call)


@dataclass
class PerfEventQueryBpf:
    """struct perf_event_query_bpf {u32 ids_len; u32 prog_cnt; u32 ids[]}."""
    ids_len: int
    prog_cnt: int = 0
    ids: list[int] = field(default_factory=list)


def perf_event_query_prog_array(event: PerfEvent, query: PerfEventQueryBpf,
                                perfmon: bool = True) -> int:
    """PERF_EVENT_IOC_QUERY_BPF: fills prog_cnt and up to ids_len ids in run order;
    -ENOSPC (after filling) when more programs than ids_len > 0."""
    if not perfmon:
        return -errno.EPERM
    if event.attr_type != PerfType.PERF_TYPE_TRACEPOINT:
        return -errno.EINVAL
    if query.ids_len > BPF_TRACE_MAX_PROGS:
        return -errno.E2BIG
    progs = event.tp_event.prog_array.progs() if event.tp_event.prog_array else []
    query.prog_cnt = len(progs)
    if not query.ids_len or not progs:
        query.ids = []
        return 0
    query.ids = [prog_stats(p).id for p in progs[:query.ids_len]]
    return -errno.ENOSPC if len(progs) > query.ids_len else 0


# --- the run state of one machine -----------------------------------------------------------

def arch_ptrace(machine: "Machine") -> ModuleType:
    """The arch's pt_regs module (probes/arch/<arch>/ptrace.py)."""
    return importlib.import_module(f"probes.arch.{machine.arch.name}.ptrace")


class UserMemory:
    """GuestMemory for helpers: every access through emu/uaccess.py."""

    def __init__(self, machine: "Machine") -> None:
        self.mem = machine.memory

    def read(self, addr: int, size: int) -> bytes:
        return copy_from_user(self.mem, addr, size)

    def write(self, addr: int, data: bytes) -> None:
        copy_to_user(self.mem, addr, data)


@functools.cache
def _uc_reg_read_batch() -> Any:
    """libunicorn's uc_reg_read_batch without the binding's argument conversion (a second
    handle on the library, as emu/ucfast.py takes one)."""
    import unicorn.unicorn_py3.unicorn as ucmod
    fn = ctypes.CDLL(ucmod.uclib._name).uc_reg_read_batch
    fn.restype = ctypes.c_int
    return fn


class PtRegsImage:
    """Builds the arch's pt_regs image on a hit in one raw `uc_reg_read_batch` straight into
    the slots of one reused bytearray (~1 µs; 34 single reads through the binding cost
    ~20 µs), then lays the view's own values (the ip it presents, registers a handler changed) over them.
    Equal to the arch module's `pack_pt_regs`, which is the readable reference."""

    def __init__(self, machine: "Machine", ptrace: ModuleType) -> None:
        self._read = _uc_reg_read_batch()
        self._regs = machine.regs          # its handle follows the running vCPU's Uc
        self._template = ptrace.PT_REGS_TEMPLATE
        self.image = bytearray(self._template)
        self._buf = (ctypes.c_char * len(self.image)).from_buffer(self.image)  # reads land in it
        base = ctypes.addressof(self._buf)
        ids = machine.arch.regs
        slots = ptrace.PT_REGS_SLOTS
        self._n = ctypes.c_int(len(slots))
        self._ids = (ctypes.c_int * len(slots))(*[ids[name] for _off, name in slots])
        self._ptrs = (ctypes.c_void_p * len(slots))(*[base + off for off, _name in slots])
        self._offset = {name: off for off, name in slots}
        self._narrow = ptrace.NARROW

    def pack(self, regs: "PtRegs") -> bytearray:
        """A copy of this hit's image."""
        return bytearray(self.fill(regs))

    def fill(self, regs: "PtRegs") -> bytearray:
        """This hit's image in `image`, the one buffer every hit reuses (a kprobe program's
        context is read-only, and nothing keeps it after the programs ran)."""
        image = self.image
        image[:] = self._template
        if self._read(self._regs._uch, self._ids, self._ptrs, self._n):
            raise RuntimeError("uc_reg_read_batch failed")
        offset = self._offset
        for name, value in regs.shown().items():
            off = offset.get(name)
            if off is not None:
                mask = self._narrow.get(name, 0xFFFFFFFFFFFFFFFF)
                struct.pack_into("<Q", image, off, value & mask)
        return image


PrintkSink = Callable[[str], None]
Consumer = Callable[[bytes], None]
PerfConsumer = Callable[[int, bytes], None]


class BpfTrace:
    """Per machine: the per-CPU bpf_prog_active counters, the reused run environment,
    the trace_printk sink and the user-space consumers of ring buffers and perf buffers.

    `printk_sink(text)` receives each bpf_trace_printk message; the default appends to
    `printk_lines` (the trace layer plugs its trace_pipe writer in instead)."""

    def __init__(self, machine: "Machine") -> None:
        self.m = machine
        self.ptrace = arch_ptrace(machine)
        self.image = PtRegsImage(machine, self.ptrace)
        self._prog_active: dict[int, int] = {}      # cpu -> its bpf_prog_active count
        self.printk_lines: list[str] = []
        self.printk_sink: PrintkSink = self.printk_lines.append
        self.ringbufs: list[tuple[RingbufMap, Consumer]] = []
        self.perfbufs: list[tuple[PerfEventArrayMap, PerfConsumer]] = []
        self.regs: "PtRegs | None" = None
        self.at_entry = False
        self.env = BpfRunContext(ktime_ns=machine.clock.monotonic_ns, memory=UserMemory(machine),
                                 stack_trace=self._stack_trace)
        self._runs: "weakref.WeakKeyDictionary[BpfProg, tuple[BpfRun, Any, BpfProgStats]]" = \
            weakref.WeakKeyDictionary()
        self._comm: str | None = None
        self._comm_bytes: bytes | None = None
        self._tgid: int | None = None          # the process's pid, once there is a process
        self._entry: dict[int, bool] = {}
        self.runner: Callable[..., int] | None = None   # --bpf-engine: (prog, ctx, env) -> r0

    @property
    def bpf_prog_active(self) -> int:
        """DEFINE_PER_CPU(int, bpf_prog_active): the running CPU's count (a hit on one CPU
        does not see another CPU's program)."""
        return self._prog_active.get(self.m.cpu, 0)

    @bpf_prog_active.setter
    def bpf_prog_active(self, value: int) -> None:
        self._prog_active[self.m.cpu] = value

    # -- consumers --
    def ring_buffer(self, m: RingbufMap, callback: Consumer) -> None:
        """ring_buffer__new: `callback(bytes)` for each record, after each hit."""
        self.ringbufs.append((m, callback))

    def perf_buffer(self, m: PerfEventArrayMap, callback: PerfConsumer) -> None:
        """perf_buffer__new: opens every CPU slot; `callback(cpu, bytes)` per sample."""
        m.open_all()
        self.perfbufs.append((m, callback))

    def poll(self) -> None:
        """ring_buffer__poll / perf_buffer__poll: deliver what the programs produced."""
        for rb, cb in self.ringbufs:
            for rec in rb.consume():
                cb(rec)
        for pb, pcb in self.perfbufs:
            for cpu, data in pb.drain():
                pcb(cpu, data)

    # -- a hit --
    def _task(self, func_ip: int) -> BpfRunContext:
        env = self.current_task(self.env)
        env.func_ip = func_ip
        return env

    def current_task(self, env: BpfRunContext) -> BpfRunContext:
        """``current`` as the helpers see it: the pid, tgid, comm and CPU of the task on
        the CPU that hit (asked at every host hit, and by a program called from guest code
        at each helper call that reads them: the last host hit's may be another thread's
        or CPU's)."""
        comm, pid = self.m.task
        env.pid = pid                          # the thread; tgid is its process's pid
        if self._tgid is None:
            proc = getattr(self.m.syscall_handler, "proc", None)
            self._tgid = proc.creds.pid if proc is not None else None
        env.tgid = pid if self._tgid is None else self._tgid
        env.cpu = self.m.cpu
        if comm is not self._comm or env.comm is not self._comm_bytes:
            self._comm, env.comm = comm, comm.encode()[:15]
            self._comm_bytes = env.comm
        return env

    def _run_state(self, prog: BpfProg) -> tuple[BpfRun, Any, BpfProgStats]:
        """The program's run state, compiled code and stats, made at its first hit and
        reused by every later one (verifying, compiling, the address space, map handles)."""
        state = self._runs.get(prog)
        if state is None:
            prog.ensure_loaded()
            run = BpfRun(prog, self.image.image, self.env).prepare_reuse()
            state = self._runs[prog] = (run, prog.compiled(), prog_stats(prog))
        return state

    def at_entry_of(self, addr: int) -> bool:
        """Whether `addr` is a function's first instruction (cached: asked on every hit)."""
        entry = self._entry.get(addr)
        if entry is None:
            sym = self.m.symbols.find(addr)
            entry = self._entry[addr] = sym is not None and sym.addr == addr
        return entry

    def run_array(self, array: BpfProgArray, regs: "PtRegs", func_ip: int,
                  at_entry: bool) -> int:
        """The body of trace_call_bpf once the guard is taken: AND of the u32 results."""
        env = self._task(func_ip)
        self.regs, self.at_entry = regs, at_entry
        try:
            ret = self._run_items(array, regs, env)
        finally:
            self.regs = None          # a later program outside a hit walks no stale regs
        self.deliver()
        return ret

    def _run_items(self, array: BpfProgArray, regs: "PtRegs", env: BpfRunContext) -> int:
        ctx = self.image.fill(regs)
        clock, ret = self.m.clock, 1
        for item in array.items:
            env.attach_cookie, env.override_rc = item.bpf_cookie, None
            run, compiled, st = self._run_state(item.prog)
            try:
                if self.runner is None:
                    r0 = compiled.execute(run.reset(ctx), CTX_ADDR, len(ctx))
                    run.finish()
                else:
                    r0 = self.runner(item.prog, ctx, env)
            except BpfRuntimeError as e:
                raise BpfTraceError(item.prog.name or item.prog.section, str(e)) from None
            st.run_cnt += 1
            st.run_insns += env.insn_count
            clock.charge_bpf(env.insn_count)
            ret &= r0 & 0xFFFFFFFF
            if env.override_rc is not None:       # bpf_override_return changed regs
                regs.return_value = env.override_rc
                self.ptrace.override_function_with_return(regs)
                ctx = self.image.fill(regs)
        return ret

    def run_prog(self, prog: "BpfProg", ctx: bytearray, func_ip: int = 0,
                 cookie: int = 0, buffer: Region | None = None) -> int:
        """One program over a context its caller built (a raw tracepoint's u64 arguments,
        a tracepoint's record), outside the pt_regs path: r0. The caller holds the
        recursion guard it needs. `buffer`: guest memory at its guest address that the
        program may load from and store to directly (a writable raw tracepoint's); the
        in-guest JIT reaches the guest's pages as they are, the Python engines get it as
        one more region for this run."""
        env = self._task(func_ip)
        env.attach_cookie, env.override_rc = cookie, None
        run, compiled, st = self._run_state(prog)
        try:
            if self.runner is None or (buffer is not None and not self._runner_in_guest()):
                run.reset(ctx)
                if buffer is not None:
                    run.mem.add(buffer)
                try:
                    r0 = compiled.execute(run, CTX_ADDR, len(ctx))
                finally:
                    if buffer is not None:
                        run.mem.remove(buffer)
                run.finish()
            else:
                r0 = self.runner(prog, ctx, env)
        except BpfRuntimeError as e:
            raise BpfTraceError(prog.name or prog.section, str(e)) from None
        st.run_cnt += 1
        st.run_insns += env.insn_count
        self.m.clock.charge_bpf(env.insn_count)
        self.deliver()
        return int(r0)

    def _runner_in_guest(self) -> bool:
        from probes.bpf.jit_guest import ProbeJit
        return isinstance(self.runner, ProbeJit)

    def deliver(self) -> None:
        """The programs' printk lines and records to their consumers: after each host run,
        and at the call for a helper called from guest code (a thunk's or stub's program),
        as the kernel's land in the trace and ring buffers at the call, so they stay in
        order with the trace events around the hit."""
        lines = self.env.trace_printk
        if lines:
            for text in lines:
                self.printk_sink(text)
            lines.clear()
        if self.ringbufs or self.perfbufs:
            self.poll()

    # -- stacks --
    def _stack_trace(self, user: bool) -> list[int]:
        """bpf_get_stack / get_stackid's walk (get_perf_callchain(regs)): from the pt_regs
        the hit saved, the image the programs get as ctx, never from the CPU's registers:
        while a JITed program runs nested they are the image's own (its lr, sp and frame
        pointer would add its frames to the walk). At a function's entry the return
        address is a frame only where the arch's unwinder finds it (x86 ORC, not arm64)."""
        if self.regs is None:
            return []
        at_entry = self.at_entry and self.ptrace.CALLCHAIN_ENTRY_RETURN
        return perf_callchain(self.m, saved_regs(self.m, self.image.image), at_entry)


def perf_callchain(machine: "Machine", regs: "PtRegs", at_entry: bool,
                   max_depth: int = PERF_MAX_STACK_DEPTH) -> list[int]:
    """A frame-pointer walk, innermost first: ip, then (at a function's first instruction,
    before its prologue) the arch's entry return address, then the return address of each
    frame record [fp] = caller's fp, [fp + 8] = return address (the same on both arches).
    A return address a kretprobe hijacked is shown as the real one, as the kernel's
    unwinders recover it (kretprobe_find_ret_addr). Stops at a zero or unreadable frame,
    one that does not move up the stack, or a trampoline with no pending instance."""
    ptrace, mem = arch_ptrace(machine), machine.memory
    ips = [regs.ip]
    recover = KretprobeUnwind.of(machine)
    try:
        fp = regs[ptrace.FRAME_POINTER]
        if at_entry:
            ips.append(recover(ptrace.entry_return_address(regs), regs.sp, fp))
        while fp and ips[-1] and len(ips) < max_depth:
            next_fp, ret = get_user(mem, fp), get_user(mem, fp + 8)
            ret = recover(ret, fp + 8, next_fp)
            if not ret:
                break
            ips.append(ret)
            if next_fp <= fp:
                break
            fp = next_fp
    except UserFault:
        pass
    if not ips[-1]:
        ips.pop()
    return ips[:max_depth]


@dataclass
class KretprobeUnwind:
    """kretprobe_find_ret_addr over one walk: a return address that is the kretprobe
    trampoline becomes the real one of the next pending instance (top first) whose frame
    key matches: the hijacked slot where the arch keeps the return address on the stack
    (x86), else the caller's frame pointer the instance saved (arm64). 0 when none does
    (the kernel's unwinders stop there). The task's instances are read at the first
    trampoline met (with the C hit path that takes C's LIFO back and forth)."""
    kretprobes: Any
    by_slot: bool
    lifo: list[Any] | None = None
    cur: int = 0

    @classmethod
    def of(cls, machine: "Machine") -> Callable[[int, int, int], int]:
        kr: Any = machine.layers.get("kretprobes")     # none made if no kretprobe was
        if kr is None:
            return lambda ret, slot, frame: ret
        return cls(kr, getattr(kr.arch, "ret_addr_on_stack", False))

    def __call__(self, ret: int, slot: int, frame: int) -> int:
        trampoline = self.kretprobes.trampoline
        if ret != trampoline:
            return ret
        if self.lifo is None:
            self.lifo = self.kretprobes.pending()
        key = slot if self.by_slot else frame
        while self.cur < len(self.lifo):
            ri = self.lifo[self.cur]
            self.cur += 1
            if ri.ret_addr != trampoline and ri.fp == key:
                return int(ri.ret_addr)
        return 0


def saved_regs(machine: "Machine", image: bytes | bytearray) -> "PtRegs":
    """A register view that answers every read from a pt_regs image (what the probe
    saved) and none from the CPU."""
    from probes.regs import PtRegs
    view = PtRegs(machine)
    for off, name in arch_ptrace(machine).PT_REGS_SLOTS:
        view.present(name, struct.unpack_from("<Q", image, off)[0])
    return view


def symbolize_stack(machine: "Machine", ips: list[int]) -> list[str]:
    """`sym+0xoff/0xsize` per frame (%pS), as bpftrace's kstack prints them."""
    return [machine.symbols.format(ip) for ip in ips]


def bpf_trace_of(machine: "Machine") -> BpfTrace:
    """The machine's BPF trace state, created on first use."""
    return machine.layer("bpf_trace", BpfTrace)


def _func_ip(st: BpfTrace, call: Any, regs: "PtRegs") -> tuple[int, bool]:
    """bpf_get_func_ip's answer and whether the hit is at a function's first instruction:
    the call's own `func_ip` if it has one, else the kprobe being handled."""
    ip = getattr(call, "func_ip", None)
    entry = bool(getattr(call, "at_entry", False))
    if ip is None:
        from probes.kprobes import kprobes_of
        kp = kprobes_of(st.m)
        cur = kp.kcb.current
        ip = cur.addr if cur is not None else regs.ip
        if cur is not None and regs.ip == kp.arch.handler_ip(cur):   # a pre handler, not a return
            entry = st.at_entry_of(ip)
    return ip, entry


def trace_call_bpf(call: Any, regs: "PtRegs") -> int:
    """Run `call.prog_array` on this hit; the event is recorded only if the result is
    non-zero. Re-entered on the same CPU (a probe hit while a program runs), it counts a
    miss for every program and returns 0, as the kernel's bpf_prog_active guard does."""
    array = call.prog_array
    machine = regs.machine
    st = bpf_trace_of(machine)
    if st.bpf_prog_active:
        for prog in array.progs() if array else []:
            prog_stats(prog).misses += 1
        return 0
    if not array:
        return 1
    st.bpf_prog_active += 1
    try:
        func_ip, entry = _func_ip(st, call, regs)
        return st.run_array(array, regs, func_ip, entry)
    finally:
        st.bpf_prog_active -= 1


def stderr_sink(out: IO[str] | None = None) -> PrintkSink:
    """A printk sink writing each message as one line (default: stderr)."""
    def sink(text: str) -> None:
        (out or sys.stderr).write(text if text.endswith("\n") else text + "\n")
    return sink
