"""kernel/trace/trace_output.c: the text of /sys/kernel/tracing/trace and trace_pipe, made
from ring-buffer records (never from strings made at hit time), and one JSON object per
record for `--json`.

A line is `%16s-%-7d [%03d] FFFFF %5lu.%06lu: ` (comm, pid, cpu, the five flag characters,
timestamp) and then the event's own text."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from probes.trace.ring_buffer import (
    TRACE_FLAG_BH_OFF, TRACE_FLAG_HARDIRQ, TRACE_FLAG_IRQS_NOSUPPORT, TRACE_FLAG_IRQS_OFF,
    TRACE_FLAG_NEED_RESCHED, TRACE_FLAG_NMI, TRACE_FLAG_PREEMPT_RESCHED, TRACE_FLAG_SOFTIRQ,
    RingBufferRecord,
)

if TYPE_CHECKING:
    from emu.symbols import SymbolTable
    from probes.trace.trace_events import TraceEventCall

FAULT_STRING = "(fault)"

TRACE_HEADER = """\
# tracer: {tracer}
#
# entries-in-buffer/entries-written: {entries}/{written}   #P:{ncpu}
#
#                                _-----=> irqs-off/BH-disabled
#                               / _----=> need-resched
#                              | / _---=> hardirq/softirq
#                              || / _--=> preempt-depth
#                              ||| / _-=> migrate-disable
#                              |||| /     delay
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
"""


def lat_flags(flags: int, preempt_count: int) -> str:
    """trace_print_lat_fmt: irqs-off, need-resched, hard/soft irq, preempt depth (low and
    high nibble of preempt_count)."""
    irqs_off, bh_off = flags & TRACE_FLAG_IRQS_OFF, flags & TRACE_FLAG_BH_OFF
    c1 = "D" if irqs_off and bh_off else "d" if irqs_off else "b" if bh_off else \
        "X" if flags & TRACE_FLAG_IRQS_NOSUPPORT else "."
    nr, pr = flags & TRACE_FLAG_NEED_RESCHED, flags & TRACE_FLAG_PREEMPT_RESCHED
    c2 = "N" if nr and pr else "n" if nr else "p" if pr else "."
    nmi, hard, soft = flags & TRACE_FLAG_NMI, flags & TRACE_FLAG_HARDIRQ, flags & TRACE_FLAG_SOFTIRQ
    c3 = "Z" if nmi and hard else "z" if nmi else "H" if hard and soft else "h" if hard else \
        "s" if soft else "."
    c4 = f"{preempt_count & 0xF:x}" if preempt_count & 0xF else "."
    c5 = f"{preempt_count >> 4 & 0xF:x}" if preempt_count & 0xF0 else "."
    return c1 + c2 + c3 + c4 + c5


def format_ts(ns: int) -> str:
    return f"{ns // 1_000_000_000:5d}.{ns // 1000 % 1_000_000:06d}"


def print_prefix(rec: RingBufferRecord, comm: str) -> str:
    _type, flags, pc, pid = rec.header
    return f"{comm[:16]:>16}-{pid:<7} [{rec.cpu:03d}] {lat_flags(flags, pc)} {format_ts(rec.ts)}: "


def format_value(kind: str, signed: bool, size: int, v: Any, symbols: "SymbolTable") -> str:
    """One value as the kernel's print_type_* functions print it."""
    if isinstance(v, list):
        return "{" + ",".join(format_value(kind, signed, size, x, symbols) for x in v) + "}"
    if kind == "string":
        return FAULT_STRING if v is None else '"' + v.decode("latin-1") + '"'
    if kind == "x":
        return f"0x{v & ((1 << 8 * size) - 1):x}"
    if kind == "char":
        return "'" + chr(v & 0xFF) + "'"
    if kind == "symbol":
        return symbols.format(v)
    return str(v)


def print_line(call: "TraceEventCall", rec: RingBufferRecord, comm: str) -> str:
    """One line of `trace` / `trace_pipe` for a record of `call`."""
    return print_prefix(rec, comm) + call.print_line(rec)


def _jsonable(v: Any) -> Any:
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v.decode("latin-1") if isinstance(v, bytes) else v


def record_json(call: "TraceEventCall", rec: RingBufferRecord, comm: str) -> str:
    """One JSON object: the header, the event's name and every field's value."""
    _type, flags, pc, pid = rec.header
    out: dict[str, Any] = {"comm": comm, "pid": pid, "cpu": rec.cpu, "flags": lat_flags(flags, pc),
                           "ts_ns": rec.ts, "event": call.full_name}
    out["fields"] = {f.name: _jsonable(f.value(rec.data)) for f in call.fields}
    out["text"] = call.print_line(rec)
    return json.dumps(out, sort_keys=False)
