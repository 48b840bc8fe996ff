"""kernel/trace/ring_buffer.c, reduced to what tracefs shows: per-CPU buffers of binary
records with a byte budget (buffer_size_kb), overwrite or drop-newest when full, and the
lost/overrun counts. A record is (timestamp ns, bytes); the bytes start with the
trace_entry header (type u16, flags u8, preempt_count u8, pid s32) then the event's fields.
Left out: pages and sub-buffers (the budget is counted per record: header + data, rounded
to 4 bytes as the kernel's event headers are), time deltas, absolute-time events."""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

TRACE_ENTRY = struct.Struct("<HBBi")      # struct trace_entry
RB_EVNT_HDR_SIZE = 4                       # struct ring_buffer_event: type_len/time_delta

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


def record_cost(data: bytes) -> int:
    return RB_EVNT_HDR_SIZE + (len(data) + 3) // 4 * 4


@dataclass
class CpuBuffer:
    """ring_buffer_per_cpu: `entries` in order, `used` bytes, `overrun` (overwritten),
    `dropped` (refused when full without overwrite), `written`."""
    size: int
    entries: deque = field(default_factory=deque)
    used: int = 0
    overrun: int = 0
    dropped: int = 0
    written: int = 0
    read: int = 0

    def write(self, rec: RingBufferRecord, overwrite: bool) -> bool:
        cost = record_cost(rec.data)
        if cost > self.size:
            self.dropped += 1
            return False
        while self.used + cost > self.size:
            if not overwrite:
                self.dropped += 1
                return False
            old = self.entries.popleft()
            self.used -= record_cost(old.data)
            self.overrun += 1
        self.entries.append(rec)
        self.used += cost
        self.written += 1
        return True

    def consume(self) -> RingBufferRecord | None:
        if not self.entries:
            return None
        rec = self.entries.popleft()
        self.used -= record_cost(rec.data)
        self.read += 1
        return rec

    def reset(self) -> None:
        self.entries.clear()
        self.used = 0


class RingBuffer:
    """struct trace_buffer: one CpuBuffer per CPU. `size_kb` per CPU, as buffer_size_kb."""

    def __init__(self, nr_cpus: int = 1, size_kb: int = 1408, overwrite: bool = True) -> None:
        self.overwrite = overwrite
        self.size_kb = size_kb
        self.cpus = [CpuBuffer(size_kb * 1024) for _ in range(nr_cpus)]

    def write(self, cpu: int, ts: int, data: bytes) -> bool:
        return self.cpus[cpu].write(RingBufferRecord(ts, cpu, data), self.overwrite)

    def resize(self, size_kb: int) -> None:
        self.size_kb = size_kb
        for b in self.cpus:
            b.size = size_kb * 1024
            while b.used > b.size:
                old = b.entries.popleft()
                b.used -= record_cost(old.data)
                b.overrun += 1

    def records(self) -> list[RingBufferRecord]:
        """Every record, merged across CPUs by timestamp (the `trace` file's order)."""
        out = [r for b in self.cpus for r in b.entries]
        out.sort(key=lambda r: (r.ts, r.cpu))
        return out

    def consume(self) -> RingBufferRecord | None:
        """The oldest record of any CPU, removed (trace_pipe)."""
        best = None
        for b in self.cpus:
            if b.entries and (best is None or b.entries[0].ts < best.entries[0].ts):
                best = b
        return best.consume() if best is not None else None

    def reset(self) -> None:
        for b in self.cpus:
            b.reset()

    @property
    def entries(self) -> int:
        return sum(len(b.entries) for b in self.cpus)

    @property
    def written(self) -> int:
        return sum(b.written for b in self.cpus)

    @property
    def lost(self) -> int:
        return sum(b.overrun + b.dropped for b in self.cpus)
