"""Machine snapshots: save a whole machine in-process and put it back, as often as wanted
(`machine.snapshot()` / `machine.restore(snap)`), so many variants run from one point.

A snapshot holds:
- the CPUs: each vCPU's Unicorn context (every register it models: general, FP/SIMD, flags, segment
  bases, the system registers; uc_context_save copies the whole CPU state);
- memory: the mappings (Unicorn's and the named regions), their permissions, and their
  contents by 64 KiB chunk, all-zero chunks left out. A restore compares each chunk with
  the live one and writes back only those that differ, dropping translated code for
  executable chunks it rewrites, so code that did not change stays translated;
- the clock (cycle count, charges by reason, the work clock's counter, whether it started;
  with the cycle model on, its costed blocks and counter state: per-block execution
  counts, taken-branch and predictor state, the current block; emu/cycles/account.py),
  the guest's hardware RNG, the machine's registries (trap handlers, host entries, text
  patches, listeners, layers), the symbol table's IFUNC resolutions;
- the Linux process: fds (open file descriptions with their sharing, host file offsets,
  pipe buffers, directory positions), brk, creds, cwd, umask, comm, the RNG of getrandom,
  syscall counts; its threads through the "tasks" layer (emu/linux/task_snapshot.py: every
  task's registers, state, futex wait and deadline, robust list, clear-tid address, signal
  mask, pending signals and altstack, the scheduler's rotation, CPU placement and turn
  generator, dispositions, process-directed signals and timers), so a threaded guest on
  any number of CPUs restores too; guest streams rewound (a stream with `snapshot_state()` /
  `restore_state()`, such as the sweep's output digests, or any seekable stream; a
  non-seekable host stream, such as a terminal, is left as it is).

Not kept, by design: the contents of host files under `--fs` (a writable tree is not
rolled back; the sweep gives each run a scratch copy instead), and probe-layer state,
except for layers registered with `register_snapshot_layer` (static keys and tracepoints),
which keep their own, and the cycle model, whose state the clock keeps. Otherwise snapshots
are taken before probes are registered: `snapshot()` refuses a machine with probe or trace
state (SnapshotError), and `restore()` drops every layer, hook,
trap handler, text patch and slot page added since, so probes registered on a restored
machine start from nothing."""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from unicorn import UcError

from emu.clock import Accumulator
from emu.errors import KprobeEmuError
from emu.memory import PROT_EXEC, Region
from emu.ucfast import uclib

if TYPE_CHECKING:
    from emu.linux.fs import OpenFile
    from emu.linux.pipe import Pipe
    from emu.machine import Machine

CHUNK = 1 << 16
_ZERO = bytes(CHUNK)
ALLOWED_LAYERS = frozenset({"work-clock", "cycles"})     # layers a snapshot knows how to keep


@dataclass(frozen=True)
class LayerHooks:
    """How a layer that may exist at snapshot() keeps its state (register_snapshot_layer):
    `take(layer)` -> its state (SnapshotError if it cannot be kept now), `restore(machine,
    layer, state)` after memory and registries are back, `patches(layer)` -> the [start,
    end) ranges of guest text it may have patched (its live patches do not refuse)."""
    take: Callable[[Any], Any]
    restore: Callable[["Machine", Any, Any], None]
    patches: Callable[[Any], list[tuple[int, int]]] = lambda _layer: []


SNAPSHOT_LAYERS: dict[str, LayerHooks] = {}


def register_snapshot_layer(name: str, hooks: LayerHooks) -> None:
    """Let layer `name` exist when a snapshot is taken; its module registers it on import."""
    SNAPSHOT_LAYERS[name] = hooks


class SnapshotError(KprobeEmuError):
    """A machine that cannot be snapshotted or restored as asked. Attributes: `reason`."""

    exit_code = 2

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"snapshot: {reason}")


# --- memory ---------------------------------------------------------------------------------
Mapping = tuple[int, int, int]          # Unicorn mapping: begin, end (exclusive), perms


@dataclass(frozen=True)
class MemoryImage:
    """Mappings, the named regions, and the contents of every non-MMIO mapping by chunk."""
    layout: tuple[Mapping, ...]
    regions: tuple[Region, ...]
    mapped_bytes: int
    max_memory: int
    chunks: dict[Mapping, tuple[bytes | None, ...]]


def _layout(m: Machine) -> tuple[Mapping, ...]:
    return tuple((b, e + 1, p) for b, e, p in m.uc.mem_regions())


def _mmio(m: Machine) -> set[tuple[int, int]]:
    """Ranges of device callbacks (reading them would call the device)."""
    return set(getattr(m.uc, "_mmio_callbacks", {}))


def _is_mmio(mp: Mapping, mmio: set[tuple[int, int]]) -> bool:
    return any(lo < mp[1] and mp[0] < hi for lo, hi in mmio)


def take_memory(m: Machine) -> MemoryImage:
    layout, mmio, reader = _layout(m), _mmio(m), _Reader(m)
    chunks: dict[Mapping, tuple[bytes | None, ...]] = {}
    for mp in layout:
        if _is_mmio(mp, mmio):
            continue
        out: list[bytes | None] = []
        for addr in range(mp[0], mp[1], CHUNK):
            n = min(CHUNK, mp[1] - addr)
            reader.read(addr, n)
            out.append(None if reader.same(n, _ZERO) else reader.data(n))
        chunks[mp] = tuple(out)
    mem = m.memory
    return MemoryImage(layout, tuple(dataclasses.replace(r) for r in mem.regions),
                       mem.mapped_bytes, mem.max_memory, chunks)


class _Reader:
    """Chunks of guest memory read into one reused buffer and compared there (raw
    uc_mem_read and memcmp: no Python bytes per chunk unless it must be kept), so a
    restore over mostly unchanged memory costs little more than the copy itself."""

    def __init__(self, m: Machine) -> None:
        self.uch = m.uc._uch
        self.buf = ctypes.create_string_buffer(CHUNK)

    def read(self, addr: int, n: int) -> None:
        if _raw_read(self.uch, ctypes.c_uint64(addr), self.buf, ctypes.c_size_t(n)):
            raise SnapshotError(f"cannot read guest memory at {addr:#x}")

    def same(self, n: int, want: bytes) -> bool:
        return _memcmp(self.buf, want, n) == 0

    def data(self, n: int) -> bytes:
        return ctypes.string_at(self.buf, n)


_raw_read = ctypes.CDLL(uclib._name).uc_mem_read
_memcmp = ctypes.CDLL(None).memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]


def restore_memory(m: Machine, img: MemoryImage) -> None:
    now, mem = _layout(m), m.memory       # mappings go to every vCPU's Uc (emu/memory.py)
    fresh: set[Mapping] = set()
    if now != img.layout:
        keep = set(img.layout)
        for mp in now:
            if mp not in keep:
                mem.unmap_raw(mp[0], mp[1])
        have = set(now)
        for mp in img.layout:
            if mp not in have and mp in img.chunks:
                mem.map_raw(mp[0], mp[1], mp[2])
                fresh.add(mp)
    reader = _Reader(m)
    for mp, chunks in img.chunks.items():
        _restore_chunks(m, mp, chunks, mp in fresh, reader)
    mem.regions[:] = [dataclasses.replace(r) for r in img.regions]
    mem.mapped_bytes, mem.max_memory = img.mapped_bytes, img.max_memory
    mem._full_below.clear()             # find_free's memo of full prefixes: the layout changed
    mem.tlb_reset()                     # the TLB's table is Unicorn's layout again; flushed


def _restore_chunks(m: Machine, mp: Mapping, chunks: tuple[bytes | None, ...], fresh: bool,
                    reader: _Reader) -> None:
    """Write back the chunks that differ (all non-zero ones into fresh zero pages)."""
    uc, exec_ = m.uc, bool(mp[2] & PROT_EXEC)
    for i, want in enumerate(chunks):
        addr = mp[0] + i * CHUNK
        size = min(CHUNK, mp[1] - addr)
        if fresh:
            if want is not None:
                uc.mem_write(addr, want)
                if exec_:
                    m.memory.remove_cache(addr, addr + size)
            continue
        reader.read(addr, size)
        if want is None:
            want = _ZERO[:size] if size < CHUNK else _ZERO
        if reader.same(size, want):
            continue
        if exec_:
            _drop_code(m, addr, reader.data(size), want)
        uc.mem_write(addr, want)


def _drop_code(m: Machine, addr: int, got, want: bytes) -> None:
    """Drop translated code only around the bytes that differ (a probe's few patched
    bytes), so the rest of the text stays translated across restores."""
    step = 64
    for off in range(0, len(want), step):
        if got[off:off + step] != want[off:off + step]:
            m.memory.remove_cache(addr + off, addr + off + step)


# --- clock ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClockState:
    fp: int
    by_reason: dict[str, int]
    first_read: Any             # the pending on_first_read callback, None once it ran
    work: Any                   # the WorkClock layer, if time had started moving with code
    work_bytes: int
    model: Any = None           # the cycle model (emu/cycles/account.py), if it was on
    model_state: Any = None     # its CycleState


def take_clock(m: Machine) -> ClockState:
    c = m.clock
    work: Any = m.layers.get("work-clock")
    model: Any = m.layers.get("cycles")
    return ClockState(c.acc.fp, dict(c.by_reason), c.on_first_read, work,
                      work.state.bytes if work is not None else 0,
                      model, model.save_state() if model is not None else None)


def restore_clock(m: Machine, st: ClockState) -> None:
    c = m.clock
    if m.layers.get("cycles") is not st.model:
        raise SnapshotError("the cycle model was turned on since the snapshot; it cannot be undone")
    work: Any = m.layers.get("work-clock")
    if work is not st.work:
        if st.work is not None:
            raise SnapshotError("the work clock was replaced since the snapshot (cycle model?)")
        work.detach()                           # started after the snapshot: stop it
        del m.layers["work-clock"]
        c.acc, c.model_counts, c.pending = Accumulator(st.fp), None, None
    c.acc.fp = st.fp
    if st.work is not None:
        st.work.state.bytes = st.work_bytes
    c.by_reason = dict(st.by_reason)
    c.on_first_read = st.first_read


# --- the machine's registries -----------------------------------------------------------------
_LISTS = ("fault_notifiers", "patches", "text_listeners", "stop_listeners",
          "limit_checks", "cpu_listeners")
_DICTS = ("break_addrs", "live_patches", "layers")
_SCALARS = ("syscall_handler", "entry", "image", "task", "halt_allowed", "user_mode", "cpu",
            "nr_cpus", "busy_cpus")


@dataclass(frozen=True)
class Registries:
    values: dict[str, Any]
    break_handlers: dict[int, list]
    raw_hooks: frozenset[int]
    binding_hooks: tuple[frozenset[int], ...]    # per vCPU's Uc, in m.ucs order
    uc_setups: int                               # len(m._uc_setups)
    rng: tuple[int, int]
    symbols: Any
    resolved: dict[int, int]
    symbol_count: int
    syscall_counts: dict[str, int] | None


def _resolved(symbols) -> dict[int, int]:
    return dict(getattr(symbols, "_resolved", {}))


def _copy_table(table):
    """A copy of a symbol table that later adds and IFUNC resolutions leave alone (its
    symbols are frozen: copying the containers is enough)."""
    out = copy.copy(table)
    for name, value in vars(table).items():
        if isinstance(value, dict):
            value = {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
        elif isinstance(value, list):
            value = list(value)
        setattr(out, name, value)
    return out


def take_registries(m: Machine) -> Registries:
    values: dict[str, Any] = {n: list(getattr(m, n)) for n in _LISTS}
    values.update({n: dict(getattr(m, n)) for n in _DICTS})
    values.update({n: getattr(m, n) for n in _SCALARS})
    values["owned"] = list(m.owners.ranges)          # the claims (emu/owners.py; ranges are frozen)
    counts = getattr(m.syscall_handler, "counts", None)
    return Registries(values, {k: list(v) for k, v in m.break_handlers.items()},
                      frozenset(m.hooks.installed),
                      tuple(frozenset(getattr(uc, "_callbacks", {})) for uc in m.ucs),
                      len(m._uc_setups),
                      (m.random.rng.state, m.random.rng.draws), _copy_table(m.symbols),
                      _resolved(m.symbols), len(m.symbols),
                      dict(counts) if counts is not None else None)


def restore_registries(m: Machine, r: Registries) -> None:
    since = set(m.hooks.installed) - r.raw_hooks
    for h in since:
        m.hooks.delete(h)
    m.hooks.release(since)               # their callbacks: not kept restore after restore
    for uc, kept in zip(m.ucs, r.binding_hooks):
        for h in set(getattr(uc, "_callbacks", {})) - kept:
            uc.hook_del(h)
    del m._uc_setups[r.uc_setups:]       # no vCPU's Uc is made after a snapshot (Machine.snapshot)
    for n in _LISTS:
        getattr(m, n)[:] = r.values[n]
    m.owners.ranges = list(r.values["owned"])
    for n in _DICTS:
        d = getattr(m, n)
        d.clear()
        d.update(r.values[n])
    for n in _SCALARS:
        if n != "cpu":
            setattr(m, n, r.values[n])
    m.set_cpu(r.values["cpu"])           # per-CPU state kept by layers follows (PerCpu)
    m.break_handlers.clear()
    m.break_handlers.update({k: list(v) for k, v in r.break_handlers.items()})
    m.random.rng.state, m.random.rng.draws = r.rng
    if len(m.symbols) != r.symbol_count or _resolved(m.symbols) != r.resolved:
        m.symbols = _copy_table(r.symbols)          # probes added names or IFUNCs resolved
    counts = getattr(m.syscall_handler, "counts", None)
    if counts is not None and r.syscall_counts is not None:
        counts.clear()
        counts.update(r.syscall_counts)


# --- the Linux process ----------------------------------------------------------------------
@dataclass
class HostFile:
    """A host file open in the guest: the snapshot's own duplicate of its descriptor and
    the offset to seek back to."""
    fd: int
    offset: int


@dataclass(frozen=True)
class ProcessState:
    fields: dict[str, Any]
    files: dict[int, "OpenFile"]
    hosts: dict[int, HostFile]          # id(copy of the OpenFile) -> its host descriptor
    cloexec: set[int]
    fs: Any
    rng: Any


# The tasks, their scheduler and signals are the "tasks" layer (emu/linux/task_snapshot.py).
_PROC_SKIP = {"machine", "image", "fs", "fds", "rng", "sched", "signals", "dispatcher"}


def _copy_pipe(p: Pipe | None, memo: dict[int, Any]) -> Pipe | None:
    if p is None:
        return None
    if id(p) not in memo:
        from collections import deque
        memo[id(p)] = dataclasses.replace(p, slots=deque(bytearray(b) for b in p.slots))
    return memo[id(p)]


def _copy_files(files: dict[int, OpenFile], memo: dict[int, Any]) -> dict[int, OpenFile]:
    """A copy keeping which descriptors share an open file description, and pipes."""
    out = {}
    for fd, f in files.items():
        if id(f) not in memo:
            entries = list(f.dir_entries) if f.dir_entries is not None else None
            memo[id(f)] = dataclasses.replace(f, pipe=_copy_pipe(f.pipe, memo),
                                              dir_entries=entries)
        out[fd] = memo[id(f)]
    return out


def take_process(proc) -> ProcessState:
    values = {f.name: copy.copy(getattr(proc, f.name)) for f in dataclasses.fields(proc)
              if f.name not in _PROC_SKIP}
    files = _copy_files(proc.fds.files, {})
    hosts = {}
    for f in {id(f): f for f in files.values()}.values():
        if f.host_fd is not None:
            hosts[id(f)] = HostFile(os.dup(f.host_fd), os.lseek(f.host_fd, 0, os.SEEK_CUR))
            f.host_fd = None                    # the copy's descriptor is made on restore
    return ProcessState(values, files, hosts, set(proc.fds.cloexec), copy.copy(proc.fs),
                        proc.rng.getstate())


def restore_process(proc, st: ProcessState) -> None:
    for f in {id(f): f for f in proc.fds.files.values()}.values():
        if f.host_fd is not None:
            os.close(f.host_fd)
            f.host_fd = None
    memo: dict[int, Any] = {}
    files = _copy_files(st.files, memo)
    for old_id, host in st.hosts.items():
        f = memo[old_id]
        f.host_fd = os.dup(host.fd)
        os.lseek(f.host_fd, host.offset, os.SEEK_SET)
    proc.fds.files.clear()
    proc.fds.files.update(files)
    proc.fds.cloexec.clear()
    proc.fds.cloexec.update(st.cloexec)
    for name, value in st.fields.items():
        setattr(proc, name, copy.copy(value))
    for f in dataclasses.fields(st.fs):
        setattr(proc.fs, f.name, getattr(st.fs, f.name))
    proc.rng.setstate(st.rng)


# --- guest streams --------------------------------------------------------------------------
def _outputs(m: Machine) -> set[int]:
    return {id(m.stdout), id(m.stderr)}


def _streams(m: Machine, proc) -> list[Any]:
    found = [m.stdout, m.stderr]
    if proc is not None:
        found += [f.stream for f in proc.fds.files.values() if f.kind == "stream"]
    uniq: dict[int, Any] = {}
    for s in found:
        if s is not None:
            uniq.setdefault(id(s), s)
    return list(uniq.values())


def _stream_state(s: Any) -> tuple[str, Any] | None:
    if hasattr(s, "snapshot_state"):
        return ("own", s.snapshot_state())
    try:
        return ("pos", s.tell()) if s.seekable() else None
    except (OSError, ValueError, AttributeError):
        return None                             # closed, or not a file: left as it is


def _stream_restore(s: Any, kind: str, value: Any, output: bool) -> None:
    if kind == "own":
        s.restore_state(value)
        return
    s.seek(value)
    if output:
        try:
            s.truncate()                        # output written since the snapshot goes
        except (OSError, ValueError):
            pass


# --- the snapshot ---------------------------------------------------------------------------
@dataclass(eq=False)
class Snapshot:
    """Everything `restore` needs to put a machine back; see the module docstring. It
    holds duplicates of the guest's host file descriptors until `close()` (or collection)."""
    machine: "weakref.ref[Machine]"
    cpu: tuple[Any, ...]                        # every vCPU's UcContext, in m.ucs order
    memory: MemoryImage
    clock: ClockState
    registries: Registries
    process: ProcessState | None
    streams: list[tuple[Any, str, Any]] = field(default_factory=list)
    layers: dict[str, Any] = field(default_factory=dict)     # SNAPSHOT_LAYERS' states

    def __post_init__(self) -> None:
        fds = [h.fd for h in (self.process.hosts.values() if self.process else ())]
        self._finalizer = weakref.finalize(self, _close_all, fds)

    @property
    def restore_bytes(self) -> int:
        """Guest memory a restore reads to find what changed (its cost grows with it)."""
        return sum(mp[1] - mp[0] for mp in self.memory.chunks)

    def close(self) -> None:
        self._finalizer()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _process_of(m: Machine):
    return getattr(m.syscall_handler, "proc", None)


def _check_takeable(m: Machine) -> None:
    if m.running:
        raise SnapshotError("cannot snapshot from inside a run")
    extra = sorted(set(m.layers) - ALLOWED_LAYERS - set(SNAPSHOT_LAYERS))
    if extra:
        raise SnapshotError(f"take snapshots before probes, traces or the cycle model are set up "
                            f"(the machine has {', '.join(extra)} state)")
    kept = [r for n in m.layers if n in SNAPSHOT_LAYERS
            for r in SNAPSHOT_LAYERS[n].patches(m.layers[n])]
    if any(not any(lo <= a < hi for lo, hi in kept) for a in m.live_patches):
        raise SnapshotError("take snapshots before probes are registered (guest text is patched)")


def take(m: Machine) -> Snapshot:
    """The machine's state now, between runs."""
    _check_takeable(m)
    proc = _process_of(m)
    streams = [(s, *st) for s in _streams(m, proc) if (st := _stream_state(s)) is not None]
    try:
        cpu = tuple(uc.context_save() for uc in m.ucs)
    except UcError as e:
        raise SnapshotError(f"CPU context: {e}") from None
    layers = {n: SNAPSHOT_LAYERS[n].take(layer) for n, layer in m.layers.items()
              if n in SNAPSHOT_LAYERS}
    return Snapshot(weakref.ref(m), cpu, take_memory(m), take_clock(m), take_registries(m),
                    take_process(proc) if proc is not None else None, streams, layers)


def restore(m: Machine, snap: Snapshot) -> None:
    """Put `m` back in the state `snap` was taken in (the same machine only)."""
    if snap.machine() is not m:
        raise SnapshotError("a snapshot restores only the machine it was taken of")
    if m.running:
        raise SnapshotError("cannot restore from inside a run")
    restore_clock(m, snap.clock)                # before the layers: it stops a work clock
    restore_registries(m, snap.registries)      # drops the hooks of layers made since
    restore_memory(m, snap.memory)
    for name, state in snap.layers.items():     # the same layer objects, their state back
        SNAPSHOT_LAYERS[name].restore(m, m.layers[name], state)
    if snap.clock.model is not None:            # after the text: its blocks are the snapshot's
        snap.clock.model.restore_state(snap.clock.model_state)
    for uc, ctx in zip(m.ucs, snap.cpu):
        uc.context_restore(ctx)
    m.use_cpu(m.cpu)                            # `uc` and `regs` are the running CPU's again
    proc = _process_of(m)
    if proc is not None and snap.process is not None:
        restore_process(proc, snap.process)
    outputs = _outputs(m)
    for s, kind, value in snap.streams:
        _stream_restore(s, kind, value, id(s) in outputs)
    m.hooks.errors.clear()
