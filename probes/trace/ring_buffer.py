"""kernel/trace/ring_buffer.c, reduced to what tracefs shows: per-CPU buffers of binary
records with a byte budget (buffer_size_kb), overwrite or drop-newest when full, and the
lost/overrun counts. A record is (timestamp ns, bytes); the bytes start with the
trace_entry header (type u16, flags u8, preempt_count u8, pid s32) then the event's fields.
Left out: pages and sub-buffers (the budget is counted per record: header + data, rounded
to 4 bytes as the kernel's event headers are), time deltas, absolute-time events.

Each CPU's records live in one byte ring (`struct kn_rb`, a ctypes struct over a ctypes
array) that the C hit path (probes/native, kn_rb_write) writes as this module does:
reserve, evict the oldest (overwrite) or refuse (drop), commit, with the same counters.
Records become Python objects only when read. A ring entry is u32 total (its bytes, a
multiple of 8; 0 marks the unused end of the ring: go on at offset 0), u32 len, u64 ts,
then the data. The ring grows (Python only: C hands the write back) when its bytes run
out; the budget, not the ring's size, decides what is kept.

A reader that waits for data (trace_pipe streamed by the CLI) is woken as the kernel's
full-waiters are (rb_wakeups, `buffer_percent`): once, when a commit leaves a CPU's buffer
unable to take another record of that size without passing the mark (at 100 %: without
overwriting or dropping), and not again until it has read. C's commits check the mark as
Python's do (kn_rb_full_hit) and call the waiter only then: no Python per record."""
from __future__ import annotations

import ctypes
import heapq
import struct
from collections.abc import Iterator
from typing import Any, Callable, ClassVar

TRACE_ENTRY = struct.Struct("<HBBi")      # struct trace_entry
RB_EVNT_HDR_SIZE = 4                       # struct ring_buffer_event: type_len/time_delta
REC_HEAD = struct.Struct("<IIQ")           # ring entry: total, len, ts
_U32 = struct.Struct("<I")
RING_MIN = 4096                            # a new CPU buffer's ring bytes (it grows)

# trace_entry.flags (kernel/trace/trace.h)
TRACE_FLAG_IRQS_OFF = 0x01
TRACE_FLAG_IRQS_NOSUPPORT = 0x02
TRACE_FLAG_NEED_RESCHED = 0x04
TRACE_FLAG_HARDIRQ = 0x08
TRACE_FLAG_SOFTIRQ = 0x10
TRACE_FLAG_PREEMPT_RESCHED = 0x20
TRACE_FLAG_NMI = 0x40
TRACE_FLAG_BH_OFF = 0x80


class RingBufferRecord:
    """One event: `ts` (ns of the machine clock), `cpu`, `data` (trace_entry + fields)."""

    __slots__ = ("ts", "cpu", "data")

    def __init__(self, ts: int, cpu: int, data: bytes) -> None:
        self.ts, self.cpu, self.data = ts, cpu, data

    @property
    def type(self) -> int:
        return TRACE_ENTRY.unpack_from(self.data)[0]

    @property
    def header(self) -> tuple[int, int, int, int]:
        """(type, flags, preempt_count, pid)"""
        return TRACE_ENTRY.unpack_from(self.data)


def record_cost(n: int) -> int:
    """The budget a record of n data bytes uses (the kernel's event header, 4-byte aligned)."""
    return RB_EVNT_HDR_SIZE + (n + 3) // 4 * 4


def ring_need(n: int) -> int:
    """Ring bytes of a record of n data bytes."""
    return REC_HEAD.size + (n + 7) // 8 * 8


class KnRb(ctypes.Structure):
    """struct kn_rb of probes/native/kprobe_native.c, field for field."""
    buf: int
    cap: int
    head: int
    tail: int
    fill: int
    last: int
    size: int
    used: int
    nentries: int
    overrun: int
    dropped: int
    written: int
    read: int
    overwrite: int
    woken: int
    wake_at: int
    wake: int | None
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("buf", ctypes.c_void_p)] + [(n, ctypes.c_uint64) for n in (
            "cap", "head", "tail", "fill", "last", "size", "used", "nentries", "overrun",
            "dropped", "written", "read")] + [
        ("overwrite", ctypes.c_uint32), ("woken", ctypes.c_uint32),
        ("wake_at", ctypes.c_uint64), ("wake", ctypes.c_void_p)]


class CpuBuffer:
    """ring_buffer_per_cpu: `entries` (a view of the records, oldest first), `used` bytes of
    the `size` budget, `overrun` (overwritten), `dropped` (refused when full without
    overwrite), `written`, `read`; `rb` is the state C writes through."""

    def __init__(self, size: int, cpu: int = 0, overwrite: bool = True) -> None:
        self.cpu = cpu
        self.rb = KnRb(size=size, overwrite=int(overwrite))
        self._ring: Any = None
        self._mv: memoryview | None = None
        self._alloc(RING_MIN)

    def _alloc(self, cap: int) -> None:
        self._ring = (ctypes.c_ubyte * cap)()
        self._mv = memoryview(self._ring).cast("B")
        self.rb.buf, self.rb.cap = ctypes.addressof(self._ring), cap

    # the counters, kept where C updates them
    size = property(lambda self: self.rb.size, lambda self, v: setattr(self.rb, "size", v))
    used = property(lambda self: self.rb.used)
    overrun = property(lambda self: self.rb.overrun)
    dropped = property(lambda self: self.rb.dropped)
    written = property(lambda self: self.rb.written)
    read = property(lambda self: self.rb.read)

    @property
    def entries(self) -> "_Entries":
        return _Entries(self)

    def __len__(self) -> int:
        return self.rb.nentries

    # --- the ring ------------------------------------------------------------------------------
    def _record_at(self, pos: int) -> tuple[int, RingBufferRecord]:
        """The record at or after `pos` (a wrap marker sends it to 0) and its offset."""
        mv = self._mv
        assert mv is not None
        if _U32.unpack_from(mv, pos)[0] == 0:
            pos = 0
        _total, n, ts = REC_HEAD.unpack_from(mv, pos)
        start = pos + REC_HEAD.size
        return pos, RingBufferRecord(ts, self.cpu, bytes(mv[start:start + n]))

    def __iter__(self) -> Iterator[RingBufferRecord]:
        rb, pos = self.rb, self.rb.head
        for _ in range(rb.nentries):
            pos, rec = self._record_at(pos)
            yield rec
            pos = (pos + ring_need(len(rec.data))) % rb.cap

    def last(self) -> RingBufferRecord | None:
        return self._record_at(self.rb.last)[1] if self.rb.nentries else None

    def _pop(self) -> RingBufferRecord:
        """The oldest record out of the ring (kn_rb_pop)."""
        rb = self.rb
        pos, rec = self._record_at(rb.head)
        if pos != rb.head:                        # skip the ring's unused end
            rb.fill -= rb.cap - rb.head
        need = ring_need(len(rec.data))
        rb.head = (pos + need) % rb.cap
        rb.fill -= need
        rb.used -= record_cost(len(rec.data))
        rb.nentries -= 1
        if not rb.nentries:
            rb.head = rb.tail = rb.fill = 0
        return rec

    def _reserve(self, need: int) -> int | None:
        """Ring bytes for a new entry (kn_rb_reserve): its offset, or None if none left."""
        rb = self.rb
        gap = rb.cap - rb.tail if rb.cap - rb.tail < need else 0
        if rb.fill + gap + need > rb.cap:
            return None
        if gap:
            assert self._mv is not None
            _U32.pack_into(self._mv, rb.tail, 0)
            rb.fill += gap
            rb.tail = 0
        pos = rb.tail
        rb.tail = (pos + need) % rb.cap
        rb.fill += need
        return pos

    def _grow(self, need: int) -> None:
        """A bigger ring, the records copied to its start in order."""
        recs = list(self)
        cap = self.rb.cap * 2
        while sum(ring_need(len(r.data)) for r in recs) + need > cap:
            cap *= 2
        rb = self.rb
        n, used = rb.nentries, rb.used
        self._alloc(cap)
        rb.head = rb.tail = rb.fill = rb.nentries = 0
        for r in recs:
            self._put(r.ts, r.data)
        rb.nentries, rb.used = n, used

    def _put(self, ts: int, data: bytes) -> None:
        need = ring_need(len(data))
        pos = self._reserve(need)
        if pos is None:
            self._grow(need)
            pos = self._reserve(need)
            assert pos is not None
        mv = self._mv
        assert mv is not None
        REC_HEAD.pack_into(mv, pos, need, len(data), ts)
        mv[pos + REC_HEAD.size:pos + REC_HEAD.size + len(data)] = data
        self.rb.last = pos
        self.rb.nentries += 1

    # --- the buffer's operations -----------------------------------------------------------------
    def write(self, ts: int, data: bytes, overwrite: bool) -> bool:
        """rb_reserve_next_event + commit: evict the oldest while the budget is short."""
        rb = self.rb
        cost = record_cost(len(data))
        if cost > rb.size:
            rb.dropped += 1
            return False
        while rb.used + cost > rb.size:
            if not overwrite:
                rb.dropped += 1
                return False
            self._pop()
            rb.overrun += 1
        self._put(ts, data)
        rb.used += cost
        rb.written += 1
        return True

    def consume(self) -> RingBufferRecord | None:
        if not self.rb.nentries:
            return None
        rec = self._pop()
        self.rb.read += 1
        return rec

    def consume_all(self) -> list[RingBufferRecord]:
        """Every record, oldest first, removed in one pass (as many consume() calls)."""
        rb = self.rb
        out = list(self)
        rb.read += len(out)
        rb.head = rb.tail = rb.fill = rb.used = rb.nentries = 0
        return out

    def peek_ts(self) -> int | None:
        if not self.rb.nentries:
            return None
        return self._record_at(self.rb.head)[1].ts

    def evict_to_budget(self) -> None:
        while self.rb.used > self.rb.size:
            self._pop()
            self.rb.overrun += 1

    def reset(self) -> None:
        rb = self.rb
        rb.head = rb.tail = rb.fill = rb.used = rb.nentries = 0


class _Entries:
    """The records of a CpuBuffer as a read-only sequence (oldest first); [-1] is cheap."""

    def __init__(self, buf: CpuBuffer) -> None:
        self.buf = buf

    def __len__(self) -> int:
        return len(self.buf)

    def __bool__(self) -> bool:
        return len(self.buf) > 0

    def __iter__(self) -> Iterator[RingBufferRecord]:
        return iter(self.buf)

    def __getitem__(self, i: int) -> RingBufferRecord:
        if i == -1 and len(self.buf):
            rec = self.buf.last()
            assert rec is not None
            return rec
        return list(self.buf)[i]


class RingBuffer:
    """struct trace_buffer: one CpuBuffer per CPU. `size_kb` per CPU, as buffer_size_kb.
    `before_read` callbacks run before any record or counter is read (the C hit path
    settles what it owes the readers there). `waiter`: the reader woken at its mark."""

    def __init__(self, nr_cpus: int = 1, size_kb: int = 1408, overwrite: bool = True) -> None:
        self.size_kb = size_kb
        self.cpus = [CpuBuffer(size_kb * 1024, i, overwrite) for i in range(nr_cpus)]
        self._overwrite = overwrite
        self.before_read: list[Callable[[], None]] = []
        self.waiter: Callable[[int], int] | None = None
        self._wake_percent = 0

    # --- a waiting reader (ring_buffer_wait with `full`, rb_wakeups) ------------------------------
    def set_waiter(self, wake: Callable[[int], int] | None, percent: int = 0) -> None:
        """`wake(cpu)` is called (by Python's commits and C's alike; it returns 0 and never
        raises: C calls it straight from the hit) when a commit takes a CPU's buffer to
        `percent` of its size; None removes the waiter."""
        self.waiter, self._wake_percent = wake, percent
        for b in self.cpus:
            b.rb.woken = 0
            b.rb.wake = id(wake) if wake is not None else None   # the object C calls
            b.rb.wake_at = b.rb.size * percent // 100

    def full_hit(self, cpu: int, n: int) -> bool:
        """After a commit of n bytes on `cpu` (kn_rb_full_hit): is the waiter due? Once,
        until it reads (`rearm`): another record of that size would pass the mark."""
        rb = self.cpus[cpu].rb
        if not rb.wake or rb.woken or rb.used + record_cost(n) <= rb.wake_at:
            return False
        rb.woken = 1
        return True

    def poll_wake(self, cpu: int, n: int) -> None:
        if self.waiter is not None and self.full_hit(cpu, n):
            self.waiter(cpu)

    def rearm(self) -> None:
        """The reader has read: it waits again."""
        for b in self.cpus:
            b.rb.woken = 0

    @property
    def overwrite(self) -> bool:
        return self._overwrite

    @overwrite.setter
    def overwrite(self, on: bool) -> None:
        self._overwrite = bool(on)
        for b in self.cpus:
            b.rb.overwrite = int(bool(on))

    def _settle(self) -> None:
        for fn in self.before_read:
            fn()

    def write(self, cpu: int, ts: int, data: bytes) -> bool:
        return self.cpus[cpu].write(ts, data, self._overwrite)

    def resize(self, size_kb: int) -> None:
        self.size_kb = size_kb
        for b in self.cpus:
            b.size = size_kb * 1024
            b.evict_to_budget()
            b.rb.wake_at = b.rb.size * self._wake_percent // 100

    def records(self) -> list[RingBufferRecord]:
        """Every record, merged across CPUs by timestamp (the `trace` file's order)."""
        self._settle()
        out = [r for b in self.cpus for r in b]
        out.sort(key=lambda r: (r.ts, r.cpu))
        return out

    def consume(self) -> RingBufferRecord | None:
        """The oldest record of any CPU, removed (trace_pipe)."""
        self._settle()
        best, best_ts = None, 0
        for b in self.cpus:
            ts = b.peek_ts()
            if ts is not None and (best is None or ts < best_ts):
                best, best_ts = b, ts
        return best.consume() if best is not None else None

    def consume_all(self) -> list[RingBufferRecord]:
        """Every record, removed, in consume()'s order (oldest head first, ties to the
        lower CPU): a reader's batch, settled once."""
        self._settle()
        per_cpu = [recs for b in self.cpus if (recs := b.consume_all())]
        if len(per_cpu) <= 1:
            return per_cpu[0] if per_cpu else []
        return list(heapq.merge(*per_cpu, key=lambda r: (r.ts, r.cpu)))

    def pending(self) -> bool:
        """Any record to read (C's commits count here without settling)."""
        return any(b.rb.nentries for b in self.cpus)

    def reset(self) -> None:
        self._settle()
        for b in self.cpus:
            b.reset()

    @property
    def entries(self) -> int:
        self._settle()
        return sum(len(b) for b in self.cpus)

    @property
    def written(self) -> int:
        self._settle()
        return sum(b.written for b in self.cpus)

    @property
    def lost(self) -> int:
        self._settle()
        return sum(b.overrun + b.dropped for b in self.cpus)
