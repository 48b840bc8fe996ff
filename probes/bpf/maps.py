"""BPF maps: the kernel's map types with their user-space API and errors.

Mirrors kernel/bpf/{arraymap,hashtab,bpf_lru_list,ringbuf,stackmap}.c and
the perf event array of kernel/trace/bpf_trace.c as far as a program and a
user see them. User-space calls (``lookup``, ``update``, ``delete``,
``get_next_key``) raise ``MapError`` with the kernel's errno; the
program-side calls used by helpers return ``-errno`` as the helpers do.
Keys and values are bytes; ints are accepted and packed little-endian.

A map owns its value buffers (bytearrays); a program gets a pointer into
one through the machine's ``VmMemory``, so its writes land in the map.
Left out: map-in-map, queue/stack, bloom filter, the BPF_F_LOCK spin lock
(BPF_F_LOCK gets -EINVAL, as on a map without one). Modelled differently: an
update of a present key in a hash map writes its element in place, where a
preallocated htab links in a spare element (extra_elems; an LRU one a fresh
element) so that a pointer from an earlier lookup keeps the old value.
"""
from __future__ import annotations

import errno
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, ClassVar, Protocol

from .errors import MapError

ENOTSUPP = 524  # kernel-internal errno the ring buffer returns for lookups


class BpfMapType(IntEnum):
    BPF_MAP_TYPE_UNSPEC = 0
    BPF_MAP_TYPE_HASH = 1
    BPF_MAP_TYPE_ARRAY = 2
    BPF_MAP_TYPE_PROG_ARRAY = 3
    BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
    BPF_MAP_TYPE_PERCPU_HASH = 5
    BPF_MAP_TYPE_PERCPU_ARRAY = 6
    BPF_MAP_TYPE_STACK_TRACE = 7
    BPF_MAP_TYPE_LRU_HASH = 9
    BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
    BPF_MAP_TYPE_RINGBUF = 27


# update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4
# map_flags
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_WRONLY_PROG = 1 << 8
BPF_F_MMAPABLE = 1 << 10
# get_stackid flags
BPF_F_SKIP_FIELD_MASK = 0xFF
BPF_F_USER_STACK = 1 << 8
BPF_F_FAST_STACK_CMP = 1 << 9
BPF_F_REUSE_STACKID = 1 << 10
# perf_event_output flags
BPF_F_INDEX_MASK = 0xFFFFFFFF
BPF_F_CURRENT_CPU = BPF_F_INDEX_MASK
# ring buffer flags
BPF_RB_NO_WAKEUP = 1
BPF_RB_FORCE_WAKEUP = 2
BPF_RB_AVAIL_DATA = 0
BPF_RB_RING_SIZE = 1
BPF_RB_CONS_POS = 2
BPF_RB_PROD_POS = 3
BPF_RINGBUF_HDR_SZ = 8
PAGE_SIZE = 4096
PERF_MAX_STACK_DEPTH = 127


def _round8(n: int) -> int:
    return (n + 7) & ~7


def _raise(err: int) -> None:
    if err < 0:
        raise MapError(-err)


class MapBacking(Protocol):
    """Guest memory that holds a map's values while a JIT runs programs in the guest."""

    def pull(self, m: "BpfMap") -> None: ...     # the guest's bytes -> the map
    def push(self, m: "BpfMap") -> None: ...     # the map's bytes -> the guest


@dataclass(eq=False)
class BpfMap:
    """struct bpf_map: what every map has. Attributes mirror the kernel's
    bpf_map_def/bpf_attr (map_type, key_size, value_size, max_entries,
    map_flags), plus ``name``, ``nr_cpus`` (for per-CPU maps) and ``fd``
    (set by whoever installs the map in a program's fd table)."""

    map_type: BpfMapType
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int = 0
    name: str = ""
    nr_cpus: int = 1
    fd: int | None = None

    # -- key/value coercion --
    def _key(self, key: bytes | int | None) -> bytes:
        if isinstance(key, int):
            key = key.to_bytes(self.key_size, "little", signed=key < 0)
        if key is None or len(key) != self.key_size:
            raise MapError(errno.EINVAL, f"key must be {self.key_size} bytes")
        return bytes(key)

    def _value(self, value: bytes | int) -> bytes:
        if isinstance(value, int):
            value = value.to_bytes(self.value_size, "little", signed=value < 0)
        if len(value) != self.value_size:
            raise MapError(errno.EINVAL, f"value must be {self.value_size} bytes")
        return bytes(value)

    @property
    def prog_writable(self) -> bool:
        return not self.map_flags & BPF_F_RDONLY_PROG

    # -- program side: overridden per type; defaults say "not supported" --
    def value_slot(self, key: bytes, cpu: int) -> tuple[bytearray, int] | None:
        """The (buffer, offset) of the value for ``key`` on ``cpu``, or None."""
        return None

    def update_elem(self, key: bytes, value: bytes, flags: int, cpu: int | None = None) -> int:
        return -errno.EINVAL

    def delete_elem(self, key: bytes) -> int:
        return -errno.EINVAL

    def next_key(self, key: bytes | None) -> bytes | int:
        return -errno.EINVAL

    # Where a JIT in a traced guest holds the values (jit_guest's windows): user-space
    # reads take the guest's bytes first, writes hand theirs over after. A plain class
    # attribute, not a field: a map's identity and its repr do not change with it.
    backing = None  # type: MapBacking | None

    # -- user-space API --
    def lookup(self, key: bytes | int) -> Any:
        if self.backing is not None:
            self.backing.pull(self)
        slot = self.value_slot(self._key(key), 0)
        if slot is None:
            raise MapError(errno.ENOENT)
        buf, off = slot
        return bytes(buf[off:off + self.value_size])

    def update(self, key: bytes | int, value: Any, flags: int = BPF_ANY) -> None:
        _check_user_flags(flags)
        if self.backing is not None:
            self.backing.pull(self)
        _raise(self.update_elem(self._key(key), self._value(value), flags))
        if self.backing is not None:
            self.backing.push(self)

    def delete(self, key: bytes | int) -> None:
        if self.backing is not None:
            self.backing.pull(self)
        _raise(self.delete_elem(self._key(key)))
        if self.backing is not None:
            self.backing.push(self)

    def get_next_key(self, key: bytes | int | None = None) -> bytes:
        res = self.next_key(None if key is None else self._key(key))
        if isinstance(res, int):
            raise MapError(-res)
        return res

    def keys(self) -> list[bytes]:
        out, key = [], None
        while True:
            try:
                key = self.get_next_key(key)
            except MapError:
                return out
            out.append(key)

    def items(self) -> list[tuple[bytes, Any]]:
        return [(k, self.lookup(k)) for k in self.keys()]


def _check_update_flags(flags: int) -> int:
    """The map ops' first check (htab_*_update_elem, array_map_update_elem): flags other
    than ANY/NOEXIST/EXIST, and BPF_F_LOCK (no map here has a bpf_spin_lock), give
    -EINVAL. An array checks BPF_F_LOCK later (ArrayMap._update_offset)."""
    return -errno.EINVAL if flags > BPF_EXIST else 0


def _check_user_flags(flags: int) -> None:
    """bpf(BPF_MAP_UPDATE_ELEM) rejects BPF_F_LOCK on a map without a spin lock before
    the map sees the call (syscall.c map_update_elem)."""
    if flags & BPF_F_LOCK:
        raise MapError(errno.EINVAL, "BPF_F_LOCK on a map without a bpf_spin_lock")


# --- arrays --------------------------------------------------------------------

@dataclass(eq=False)
class ArrayMap(BpfMap):
    """BPF_MAP_TYPE_ARRAY: preallocated, zero-filled, u32 index keys; one
    contiguous buffer with 8-byte aligned elements as in arraymap.c."""

    values: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.elem_size = _round8(self.value_size)
        if not self.values:
            self.values = bytearray(self.elem_size * self.max_entries)

    def _index(self, key: bytes) -> int:
        return int.from_bytes(key, "little")

    def value_slot(self, key: bytes, cpu: int) -> tuple[bytearray, int] | None:
        idx = self._index(key)
        if idx >= self.max_entries:
            return None
        return self.values, idx * self.elem_size

    def _update_offset(self, key: bytes, flags: int) -> int:
        """Byte offset of the element an update writes, or -errno, in
        array_map_update_elem's order: BPF_F_LOCK is refused last."""
        if flags & ~BPF_F_LOCK > BPF_EXIST:
            return -errno.EINVAL
        idx = self._index(key)
        if idx >= self.max_entries:
            return -errno.E2BIG
        if flags & BPF_NOEXIST:
            return -errno.EEXIST  # every element of an array always exists
        if flags & BPF_F_LOCK:
            return -errno.EINVAL  # no bpf_spin_lock in the value
        return idx * self.elem_size

    def update_elem(self, key: bytes, value: bytes, flags: int, cpu: int | None = None) -> int:
        off = self._update_offset(key, flags)
        if off < 0:
            return off
        self.values[off:off + self.value_size] = value
        return 0

    def delete_elem(self, key: bytes) -> int:
        return -errno.EINVAL

    def next_key(self, key: bytes | None) -> bytes | int:
        idx = self._index(key) if key is not None else self.max_entries
        if idx >= self.max_entries:
            nxt = 0
        elif idx == self.max_entries - 1:
            return -errno.ENOENT
        else:
            nxt = idx + 1
        return nxt.to_bytes(4, "little")


@dataclass(eq=False)
class PercpuArrayMap(ArrayMap):
    """BPF_MAP_TYPE_PERCPU_ARRAY: one array per CPU. User lookups return a
    list with one value per CPU; an update takes one value (set on every
    CPU) or a list of per-CPU values."""

    percpu: list[bytearray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.elem_size = _round8(self.value_size)
        self.percpu = [bytearray(self.elem_size * self.max_entries) for _ in range(self.nr_cpus)]
        self.values = self.percpu[0]

    def value_slot(self, key: bytes, cpu: int) -> tuple[bytearray, int] | None:
        idx = self._index(key)
        if idx >= self.max_entries or not 0 <= cpu < self.nr_cpus:
            return None
        return self.percpu[cpu], idx * self.elem_size

    def update_elem(self, key: bytes, value: bytes, flags: int, cpu: int | None = None) -> int:
        off = self._update_offset(key, flags)
        if off < 0:
            return off
        for c, buf in enumerate(self.percpu):
            if cpu is None or c == cpu:
                buf[off:off + self.value_size] = value
        return 0

    def lookup(self, key: bytes | int) -> list[bytes]:
        k = self._key(key)
        if self._index(k) >= self.max_entries:
            raise MapError(errno.ENOENT)
        if self.backing is not None:
            self.backing.pull(self)
        return [bytes(b[o:o + self.value_size]) for b, o in
                (self.value_slot(k, c) for c in range(self.nr_cpus))]  # type: ignore[misc]

    def update(self, key: bytes | int, value: Any, flags: int = BPF_ANY) -> None:
        _check_user_flags(flags)
        k = self._key(key)
        if self.backing is not None:
            self.backing.pull(self)
        try:
            if isinstance(value, (list, tuple)):
                if len(value) != self.nr_cpus:
                    raise MapError(errno.EINVAL, "need one value per CPU")
                _raise(self.update_elem(k, self._value(value[0]), flags))
                for c, v in enumerate(value):
                    _raise(self.update_elem(k, self._value(v), BPF_ANY, c))
            else:
                _raise(self.update_elem(k, self._value(value), flags))
        finally:
            if self.backing is not None:
                self.backing.push(self)


# --- hashes ----------------------------------------------------------------------

@dataclass(eq=False)
class HashMap(BpfMap):
    """BPF_MAP_TYPE_HASH. Iteration (get_next_key) follows insertion order;
    a key that is not present restarts iteration at the first key, as the
    kernel does.

    The elements are preallocated in C as hashtab.c preallocates them
    (probes/native/bpf_native.c: ``native``, a NativeHtab): a program's
    pointer to a value is a view of that pool, and the helper trampoline's
    C entry updates the same bytes. Without the C library (no compiler,
    ``KPROBE_EMU_NATIVE=0``), with BPF_F_NO_PREALLOC or for a pool too
    large to preallocate, ``table`` holds them instead (key -> one
    bytearray per CPU), with the same results."""

    table: "OrderedDict[bytes, list[bytearray]]" = field(default_factory=OrderedDict)
    lru: ClassVar[bool] = False         # LRU maps: use moves to the end, full evicts the head
    percpu: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.native: Any = None
        if not self.map_flags & BPF_F_NO_PREALLOC:
            from probes.native.bpf_native import NativeHtab
            self.native = NativeHtab.new(self.key_size, self.value_size, self.max_entries,
                                         self._cpus(), self.lru, self.percpu)

    def _cpus(self) -> int:
        return 1

    def value_slot(self, key: bytes, cpu: int) -> tuple[Any, int] | None:
        ncpus = self._cpus()
        if ncpus == 1:
            cpu = 0
        elif not 0 <= cpu < ncpus:
            return None
        n = self.native
        if n is not None:
            view = n.view(key, cpu, self.lru)
            return None if view is None else (view, 0)
        vals = self.table.get(key)
        if vals is None:
            return None
        if self.lru:
            self.table.move_to_end(key)
        return vals[cpu], 0

    def update_elem(self, key: bytes, value: bytes, flags: int, cpu: int | None = None) -> int:
        if _check_update_flags(flags):
            return -errno.EINVAL
        if self.native is not None:
            return self.native.update(key, value, flags, cpu)
        if self.lru and (not self.percpu or flags != BPF_EXIST) \
                and len(self.table) >= self.max_entries:
            self.table.popitem(last=False)     # prealloc_lru_pop, before the key's look-up
        vals = self.table.get(key)
        if vals is not None and flags == BPF_NOEXIST:
            return -errno.EEXIST
        if vals is None and flags == BPF_EXIST:
            return -errno.ENOENT
        if vals is None:
            if len(self.table) >= self.max_entries:
                return -errno.E2BIG            # (an LRU map made room above)
            vals = [bytearray(self.value_size) for _ in range(self._cpus())]
            self.table[key] = vals
        for c, buf in enumerate(vals):
            if cpu is None or c == cpu:
                buf[:] = value
        if self.lru:
            self.table.move_to_end(key)
        return 0

    def delete_elem(self, key: bytes) -> int:
        if self.native is not None:
            return self.native.delete(key)
        if self.table.pop(key, None) is None:
            return -errno.ENOENT
        return 0

    def next_key(self, key: bytes | None) -> bytes | int:
        n = self.native
        if n is not None:
            slot = n.next(key)
            return n.key(slot) if slot >= 0 else slot
        keys = list(self.table)
        if key is None or key not in self.table:
            return keys[0] if keys else -errno.ENOENT
        pos = keys.index(key)
        return keys[pos + 1] if pos + 1 < len(keys) else -errno.ENOENT

    def lookup(self, key: bytes | int) -> Any:
        """bpf(BPF_MAP_LOOKUP_ELEM): no LRU use (htab_lru_map_lookup_elem_sys), so a
        dump (get_next_key, then lookup) walks every key; a program's lookup
        (value_slot) does use the element."""
        if self.backing is not None:
            self.backing.pull(self)
        vals = self._values(self._key(key))
        if vals is None:
            raise MapError(errno.ENOENT)
        return vals[0]

    def _values(self, key: bytes) -> list[bytes] | None:
        """Every CPU's value of ``key`` (no LRU use), or None."""
        n = self.native
        if n is not None:
            slot = n.find(key, False)
            return None if slot < 0 else [bytes(n.value(slot, c)) for c in range(self._cpus())]
        vals = self.table.get(key)
        return None if vals is None else [bytes(v) for v in vals]


@dataclass(eq=False)
class PercpuHashMap(HashMap):
    """BPF_MAP_TYPE_PERCPU_HASH: a value per CPU under each key."""

    percpu: ClassVar[bool] = True

    def _cpus(self) -> int:
        return self.nr_cpus

    def lookup(self, key: bytes | int) -> list[bytes]:
        vals = self._values(self._key(key))
        if vals is None:
            raise MapError(errno.ENOENT)
        return vals

    def update(self, key: bytes | int, value: Any, flags: int = BPF_ANY) -> None:
        _check_user_flags(flags)
        k = self._key(key)
        if not isinstance(value, (list, tuple)):
            _raise(self.update_elem(k, self._value(value), flags))
            return
        if len(value) != self.nr_cpus:
            raise MapError(errno.EINVAL, "need one value per CPU")
        _raise(self.update_elem(k, self._value(value[0]), flags))
        for c, v in enumerate(value):   # one update in the kernel: EXIST takes no LRU element
            _raise(self.update_elem(k, self._value(v), BPF_EXIST, c))


@dataclass(eq=False)
class LruHashMap(HashMap):
    """BPF_MAP_TYPE_LRU_HASH: a full map drops its least recently used entry
    instead of failing with E2BIG (bpf_lru_list.c as one strict LRU list,
    without its per-CPU free lists, batches and reference bits). A program's
    lookup or an update makes an entry the most recent; bpf(2)'s lookup does
    not. An update on a full map evicts first, as prealloc_lru_pop does, even
    when the key is present or the flags then fail."""

    lru: ClassVar[bool] = True


@dataclass(eq=False)
class LruPercpuHashMap(PercpuHashMap):
    """BPF_MAP_TYPE_LRU_PERCPU_HASH."""

    lru: ClassVar[bool] = True


# --- fd arrays: program array, perf event array ---------------------------------------

@dataclass(eq=False)
class _FdArrayMap(BpfMap):
    """What the fd arrays share: slots indexed by a u32 key, kept in `slots()` (a dict
    index -> object), iterated like an array."""

    def slots(self) -> dict[int, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def delete_elem(self, key: bytes) -> int:
        return 0 if self.slots().pop(int.from_bytes(key, "little"), None) is not None \
            else -errno.ENOENT

    def next_key(self, key: bytes | None) -> bytes | int:
        return ArrayMap.next_key(self, key)  # type: ignore[arg-type]

    def _index(self, key: bytes) -> int:
        return int.from_bytes(key, "little")


@dataclass(eq=False)
class ProgArrayMap(_FdArrayMap):
    """BPF_MAP_TYPE_PROG_ARRAY: slots of programs for bpf_tail_call. User
    updates take a BpfProg, or a prog fd resolved by ``prog_resolver``."""

    progs: dict[int, Any] = field(default_factory=dict)
    prog_resolver: Callable[[int], Any] | None = None
    # told of every update and delete (the guest JIT's copy of the entries; its stubs
    # whose tail calls reach this array re-check it)
    listeners: list[Callable[[Any], None]] = field(default_factory=list)

    def update(self, key: bytes | int, value: Any, flags: int = BPF_ANY) -> None:
        idx = int.from_bytes(self._key(key), "little")
        if flags != BPF_ANY:                # bpf_fd_array_map_update_elem
            raise MapError(errno.EINVAL)
        if idx >= self.max_entries:
            raise MapError(errno.E2BIG)
        prog = value
        if isinstance(value, (bytes, int)):
            fd = int.from_bytes(value, "little") if isinstance(value, bytes) else value
            prog = self.prog_resolver(fd) if self.prog_resolver else None
            if prog is None:
                raise MapError(errno.EBADF, f"no program with fd {fd}")
        prog.ensure_loaded()  # only loaded (verified) programs have fds to store
        self.progs[idx] = prog
        self._changed()

    def delete_elem(self, key: bytes) -> int:
        err = super().delete_elem(key)
        self._changed()
        return err

    def _changed(self) -> None:
        for fn in list(self.listeners):
            fn(self)

    def lookup(self, key: bytes | int) -> Any:
        prog = self.progs.get(int.from_bytes(self._key(key), "little"))
        if prog is None:
            raise MapError(errno.ENOENT)
        return prog

    def slots(self) -> dict[int, Any]:
        return self.progs

    def get_prog(self, index: int) -> Any:
        return self.progs.get(index)


# --- perf event array --------------------------------------------------------------

@dataclass(eq=False)
class PerfEventArrayMap(_FdArrayMap):
    """BPF_MAP_TYPE_PERF_EVENT_ARRAY: per-CPU output buffers. A slot must be
    opened (user update with any fd, or ``open_all()``, as perf_buffer__new
    does) before bpf_perf_event_output can write to it (else -ENOENT).
    ``events`` holds (cpu, bytes) samples in output order."""

    opened: dict[int, int] = field(default_factory=dict)
    events: list[tuple[int, bytes]] = field(default_factory=list)

    def update_elem(self, key: bytes, value: bytes, flags: int, cpu: int | None = None) -> int:
        idx = int.from_bytes(key, "little")
        if flags != BPF_ANY:                # bpf_fd_array_map_update_elem
            return -errno.EINVAL
        if idx >= self.max_entries:
            return -errno.E2BIG
        self.opened[idx] = int.from_bytes(value, "little")
        return 0

    def slots(self) -> dict[int, Any]:
        return self.opened

    def open_all(self) -> None:
        for idx in range(self.max_entries):
            self.opened.setdefault(idx, idx)

    def output(self, index: int, data: bytes) -> int:
        if index >= self.max_entries:
            return -errno.E2BIG
        if index not in self.opened:
            return -errno.ENOENT
        self.events.append((index, bytes(data)))
        return 0

    def drain(self) -> list[tuple[int, bytes]]:
        out, self.events = self.events, []
        return out


# --- ring buffer --------------------------------------------------------------------

@dataclass(eq=False)
class RingbufRecord:
    data: bytearray
    pos: int
    state: str = "busy"  # busy -> committed | discarded


@dataclass(eq=False)
class RingbufMap(BpfMap):
    """BPF_MAP_TYPE_RINGBUF: max_entries is the data size in bytes (a power
    of 2 and a multiple of the page size). Each record takes its length
    plus an 8-byte header, rounded up to 8, until consumed. ``consume()``
    returns committed records in reservation order, stopping at a record
    still reserved (as a user-space consumer would)."""

    records: list[RingbufRecord] = field(default_factory=list)
    prod_pos: int = 0
    cons_pos: int = 0

    def lookup(self, key: bytes | int) -> Any:
        raise MapError(ENOTSUPP, "ring buffers have no lookup")

    def update(self, key: bytes | int, value: Any, flags: int = BPF_ANY) -> None:
        raise MapError(ENOTSUPP, "ring buffers have no update")

    def next_key(self, key: bytes | None) -> bytes | int:
        return -ENOTSUPP

    def reserve(self, size: int) -> RingbufRecord | None:
        need = _round8(size + BPF_RINGBUF_HDR_SZ)
        if size > self.max_entries or self.prod_pos + need - self.cons_pos > self.max_entries:
            return None
        rec = RingbufRecord(bytearray(size), self.prod_pos)
        self.prod_pos += need
        self.records.append(rec)
        return rec

    def commit(self, rec: RingbufRecord, discard: bool) -> None:
        rec.state = "discarded" if discard else "committed"

    def output(self, data: bytes) -> int:
        rec = self.reserve(len(data))
        if rec is None:
            return -errno.EAGAIN
        rec.data[:] = data
        self.commit(rec, False)
        return 0

    def avail_data(self) -> int:
        return self.prod_pos - self.cons_pos

    def consume(self) -> list[bytes]:
        out = []
        while self.records and self.records[0].state != "busy":
            rec = self.records.pop(0)
            self.cons_pos += _round8(len(rec.data) + BPF_RINGBUF_HDR_SZ)
            if rec.state == "committed":
                out.append(bytes(rec.data))
        return out


# --- stack traces -----------------------------------------------------------------

@dataclass(eq=False)
class StackTraceMap(BpfMap):
    """BPF_MAP_TYPE_STACK_TRACE: stack id -> array of u64 instruction
    pointers (value_size / 8 of them). Ids are a hash of the stack modulo
    max_entries; a different stack in a taken bucket gives -EEXIST unless
    BPF_F_REUSE_STACKID."""

    buckets: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def get_stackid(self, ips: list[int], flags: int) -> int:
        depth = self.value_size // 8
        ips = tuple(ips[flags & BPF_F_SKIP_FIELD_MASK:][:depth])
        if not ips:
            return -errno.EFAULT
        raw = b"".join((ip & ((1 << 64) - 1)).to_bytes(8, "little") for ip in ips)
        bucket = zlib.crc32(raw) % self.max_entries
        old = self.buckets.get(bucket)
        if old is not None and old != ips and not flags & BPF_F_REUSE_STACKID:
            return -errno.EEXIST
        self.buckets[bucket] = ips
        return bucket

    def lookup(self, key: bytes | int) -> bytes:
        ips = self.buckets.get(int.from_bytes(self._key(key), "little"))
        if ips is None:
            raise MapError(errno.ENOENT)
        raw = b"".join(ip.to_bytes(8, "little") for ip in ips)
        return raw.ljust(self.value_size, b"\0")

    def delete_elem(self, key: bytes) -> int:
        return 0 if self.buckets.pop(int.from_bytes(key, "little"), None) is not None \
            else -errno.ENOENT

    def next_key(self, key: bytes | None) -> bytes | int:
        ids = sorted(self.buckets)
        cur = int.from_bytes(key, "little") if key is not None else -1
        later = [i for i in ids if i > cur]
        return later[0].to_bytes(4, "little") if later else -errno.ENOENT


# --- creation ------------------------------------------------------------------------

_CLASSES: dict[BpfMapType, type[BpfMap]] = {
    BpfMapType.BPF_MAP_TYPE_HASH: HashMap,
    BpfMapType.BPF_MAP_TYPE_ARRAY: ArrayMap,
    BpfMapType.BPF_MAP_TYPE_PROG_ARRAY: ProgArrayMap,
    BpfMapType.BPF_MAP_TYPE_PERF_EVENT_ARRAY: PerfEventArrayMap,
    BpfMapType.BPF_MAP_TYPE_PERCPU_HASH: PercpuHashMap,
    BpfMapType.BPF_MAP_TYPE_PERCPU_ARRAY: PercpuArrayMap,
    BpfMapType.BPF_MAP_TYPE_STACK_TRACE: StackTraceMap,
    BpfMapType.BPF_MAP_TYPE_LRU_HASH: LruHashMap,
    BpfMapType.BPF_MAP_TYPE_LRU_PERCPU_HASH: LruPercpuHashMap,
    BpfMapType.BPF_MAP_TYPE_RINGBUF: RingbufMap,
}
_ARRAY_LIKE = {BpfMapType.BPF_MAP_TYPE_ARRAY, BpfMapType.BPF_MAP_TYPE_PERCPU_ARRAY,
               BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, BpfMapType.BPF_MAP_TYPE_PERF_EVENT_ARRAY}
KMALLOC_MAX_SIZE = 1 << 22


def _check_attr(t: BpfMapType, key_size: int, value_size: int, max_entries: int) -> str:
    """Why bpf(BPF_MAP_CREATE) would say EINVAL, or ''."""
    if t == BpfMapType.BPF_MAP_TYPE_RINGBUF:
        if key_size or value_size:
            return "ring buffer key_size and value_size must be 0"
        if max_entries < PAGE_SIZE or max_entries & (max_entries - 1):
            return "ring buffer size must be a power of 2 and a multiple of the page size"
        return ""
    if max_entries == 0:
        return "max_entries must be > 0"
    if t in _ARRAY_LIKE and key_size != 4:
        return "array maps need key_size 4"
    if t in (BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, BpfMapType.BPF_MAP_TYPE_PERF_EVENT_ARRAY) \
            and value_size != 4:
        return "value_size must be 4 (an fd)"
    if t == BpfMapType.BPF_MAP_TYPE_STACK_TRACE and (key_size != 4 or value_size % 8
                                                      or value_size // 8 > PERF_MAX_STACK_DEPTH):
        return "stack trace maps need key_size 4 and value_size a multiple of 8"
    if key_size == 0 or value_size == 0 or value_size > KMALLOC_MAX_SIZE:
        return "key_size and value_size must be > 0"
    return ""


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int,
               map_flags: int = 0, name: str = "", nr_cpus: int = 1) -> BpfMap:
    """bpf(BPF_MAP_CREATE): a new map, or MapError(EINVAL) for bad attributes."""
    try:
        t = BpfMapType(map_type)
    except ValueError:
        raise MapError(errno.EINVAL, f"unsupported map type {map_type}") from None
    if t not in _CLASSES:
        raise MapError(errno.EINVAL, f"unsupported map type {t.name}")
    if t == BpfMapType.BPF_MAP_TYPE_PERF_EVENT_ARRAY and max_entries == 0:
        max_entries = nr_cpus  # the kernel sizes it to the possible CPUs
    why = _check_attr(t, key_size, value_size, max_entries)
    if why:
        raise MapError(errno.EINVAL, why)
    return _CLASSES[t](t, key_size, value_size, max_entries, map_flags, name, nr_cpus)
