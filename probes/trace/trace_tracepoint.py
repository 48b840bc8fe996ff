"""Trace events on static tracepoints (include/trace/trace_events.h, trace_event_raw_event_*):
each guest tracepoint is an event `events/<TRACE_SYSTEM>/<name>` whose fields are its
TP_PROTO arguments laid out as a TP_STRUCT__entry would be (natural alignment after the
common fields), with the TP_printk format as its `print fmt`. Enabling the event
registers its probe function on the tracepoint (so the static key turns the sites into
branches); a hit records the arguments through the same commit path as kprobe events
(filters, triggers, soft mode, hist)."""
from __future__ import annotations

import re
import struct
from typing import Any, Callable

from emu.uaccess import strncpy_from_user
from probes.regs import PtRegs
from probes.trace.trace_events import FtraceEventField, TraceEventCall
from probes.trace.trace_events_trigger import trace_trigger_soft_disabled
from probes.trace.tracefs import Tracefs
from probes.tracepoint import Tracepoint, TpArg, tracepoints_of

HIT_FLAGS = 0x01                     # TRACE_FLAG_IRQS_OFF: a trap handler's context
COMMON_SIZE = 8
_CONV = re.compile(r"%[-+ #0]*\d*(?:\.\d+)?(?:ll|l|z|h|hh)?[diuxXcsp%](?:[SsBbFfKx])?")
_CTYPES = {(1, True): "signed char", (1, False): "unsigned char", (2, True): "short",
           (2, False): "unsigned short", (4, True): "int", (4, False): "unsigned int",
           (8, True): "long", (8, False): "unsigned long"}


def layout_fields(args: list[TpArg]) -> list[FtraceEventField]:
    """The record's own fields: each argument at its natural alignment."""
    off, out = COMMON_SIZE, []
    for a in args:
        off = (off + a.size - 1) // a.size * a.size
        out.append(FtraceEventField(a.name, a.ctype, off, a.size, a.signed))
        off += a.size
    return out


def print_fmt_of(tp: Tracepoint) -> str:
    """The format file's `print fmt:` line: the TP_printk string, arguments as REC->x."""
    recs = [re.sub(r"\b(%s)\b" % "|".join(map(re.escape, (a.name for a in tp.args))),
                   r"REC->\1", x) if tp.args else x for x in tp.fmt_args]
    return f'"{tp.fmt}"' + "".join(f", {r}" for r in recs)


def render(fmt: str, values: list[int], read_str) -> str:
    """TP_printk output: each conversion formatted as trace_printk does, one at a time."""
    # imported here: probes.bpf costs ~0.2 s to import, and Tracefs imports this module
    from probes.bpf.printk import FormatError, trace_printk_format
    out, pos, used = [], 0, 0
    text = fmt.encode().decode("unicode_escape")
    for m in _CONV.finditer(text):
        out.append(text[pos:m.start()])
        pos = m.end()
        spec = m.group(0)
        if spec == "%%":
            out.append("%")
            continue
        spec = re.sub(r"h+(?=[diuxX])", "", spec)
        if spec[-1] in "SsBbFfK" and "p" in spec:
            spec = spec[:-1]             # %pS and friends: the plain pointer
        value = values[used] if used < len(values) else 0
        used += 1
        try:
            out.append(trace_printk_format(spec.encode(), [value], read_str))
        except FormatError:
            out.append(spec)
    out.append(text[pos:])
    return "".join(out)


class TraceTracepointEvents:
    """The tracepoint events of one Tracefs, made for every tracepoint the machine has."""

    def __init__(self, fs: Tracefs) -> None:
        self.fs, self.m = fs, fs.machine
        self.tps = tracepoints_of(self.m)
        self.calls: dict[int, TraceEventCall] = {}       # tracepoint addr -> event
        self._packers: dict[int, Callable[[int, int, tuple[int, ...]], bytes]] = {}
        self.add_all()

    def add_all(self) -> list[TraceEventCall]:
        """Create the events of tracepoints that have none yet (a module's, later)."""
        made = []
        for tp in self.tps.tps:
            if tp.addr not in self.calls and self.fs.find_event(tp.system, tp.name) is None:
                made.append(self._make(tp))
        return made

    def remove(self, tp: Tracepoint) -> None:
        call = self.calls.pop(tp.addr, None)
        if call is not None:
            self.fs.remove_event(call)

    def _make(self, tp: Tracepoint) -> TraceEventCall:
        fields = layout_fields(tp.args)
        names = [a.name for a in tp.args]
        fmt_index = [names.index(x) if x in names else -1 for x in tp.fmt_args]
        read_str = self._read_str

        def print_line(rec: Any) -> str:
            vals = [f.value(rec.data) for f in fields]
            shown = [vals[i] if i >= 0 else 0 for i in fmt_index]
            return f"{tp.name}: " + render(tp.fmt, shown, read_str)

        call = self.fs.new_event(tp.system, tp.name, fields, print_fmt_of(tp), print_line,
                                 kind="tracepoint")
        call.on_enable = lambda on: self._reg(tp, call, on)
        self._packers[call.id] = record_packer(fields)
        self.calls[tp.addr] = call
        return call

    def _read_str(self, addr: int, limit: int) -> bytes:
        return strncpy_from_user(self.m.memory, addr, limit)

    def _reg(self, tp: Tracepoint, call: TraceEventCall, on: bool) -> None:
        """TRACE_REG_REGISTER / UNREGISTER: the event's probe on its tracepoint."""
        if on:
            self.tps.tracepoint_probe_register(tp, self.trace_event_raw_event, call)
        else:
            self.tps.tracepoint_probe_unregister(tp, self.trace_event_raw_event, call)

    def trace_event_raw_event(self, call: TraceEventCall, args: tuple[int, ...]) -> None:
        """The probe: run the event's BPF programs (perf), then record unless soft-disabled."""
        data = self._packers[call.id](call.id, self.m.task[1], args)
        if call.prog_array:
            from probes.trace.bpf_tracepoint import perf_trace_run_bpf
            perf_trace_run_bpf(self.m, call, data)
        self._commit(call, data)

    def raw_event_without_bpf(self, call: TraceEventCall, args: tuple[int, ...]) -> bytes:
        """The probe's work but the programs, which a guest stub runs (jit_direct.py)
        with the record this returns as their context."""
        data = self._packers[call.id](call.id, self.m.task[1], args)
        self._commit(call, data)
        return data

    def _commit(self, call: TraceEventCall, data: bytes) -> None:
        if not call.enabled or trace_trigger_soft_disabled(call):
            return
        fs = self.fs
        fs.hit = (PtRegs(self.m), True)      # at the iterator's entry: its caller is next
        try:
            fs.commit(call, data)
        finally:
            fs.hit = None


def record_packer(fields: list[FtraceEventField]) -> Callable[[int, int, tuple[int, ...]], bytes]:
    """The record of one hit, packed in one go: header, then each argument at its offset
    (as its unsigned image), padded to 8 bytes."""
    fmt, off = "<HBBi", COMMON_SIZE
    for f in fields:
        fmt += "x" * (f.offset - off) + {1: "B", 2: "H", 4: "I", 8: "Q"}[f.size]
        off = f.offset + f.size
    fmt += "x" * (-off % 8)
    pack = struct.Struct(fmt).pack
    masks = [(1 << (8 * f.size)) - 1 for f in fields]

    def packer(call_id: int, pid: int, args: tuple[int, ...]) -> bytes:
        return pack(call_id, HIT_FLAGS, 0, pid, *[v & mk for v, mk in zip(args, masks)])
    return packer


def tracepoint_events_of(fs: Tracefs) -> TraceTracepointEvents:
    """The Tracefs's tracepoint events (made, all disabled, on first use)."""
    events = getattr(fs, "_tracepoint_events", None)
    if events is None:
        events = TraceTracepointEvents(fs)
        setattr(fs, "_tracepoint_events", events)
    return events



def tracepoint_event(fs: Tracefs, name: str) -> TraceEventCall:
    """`GRP/NAME` (or a unique NAME) of a guest tracepoint's event; UsageError if none."""
    from emu.errors import UsageError
    events = tracepoint_events_of(fs)
    calls = list(events.calls.values())
    found = [c for c in calls if c.full_name == name] or [c for c in calls if c.name == name]
    if len(found) != 1:
        known = ", ".join(c.full_name for c in calls) or "none in this guest"
        raise UsageError(f"--event 'tp:{name}': no such tracepoint (tracepoints: {known})")
    return found[0]


def add_tracepoint_events(fs: Tracefs) -> None:
    """At Tracefs creation: the guest's tracepoint events, if it has tracepoints. A table
    that cannot be read leaves them out here; `--event tp:` reports it."""
    from probes.errors import ProbeError
    from probes.jump_label import image_section
    from probes.tracepoint import TRACEPOINTS_PTRS
    image = fs.machine.image
    if image is None or image_section(fs.machine, image, TRACEPOINTS_PTRS) is None:
        return
    try:
        tracepoint_events_of(fs)
    except ProbeError:
        pass


def tracepoint_event_stats(fs: Tracefs) -> dict[str, dict[str, int]]:
    """`--stats` trace_events entries of the enabled tracepoint events: the tracepoint's
    hits (its iterator's calls)."""
    events = getattr(fs, "_tracepoint_events", None)
    if events is None:
        return {}
    by_addr = {tp.addr: tp for tp in events.tps.tps}
    return {c.full_name: {"hits": by_addr[a].hits, "misses": 0}
            for a, c in events.calls.items() if c.enabled and a in by_addr}
