"""kernel/trace/trace_events.c: trace_event_call (the event: id, fields, print fmt, the
`format` file) and its trace_event_file state (enable, filter), the events/ directory's
enable files. An event's printer (`print_line`) and its producer live with its kind
(trace_kprobe, the function tracer); this module only knows fields.
Soft mode (sm_ref, SOFT_MODE, SOFT_DISABLED) is the kernel's; the triggers themselves live
in trace_events_trigger.py. Left out: per-instance event files, pid filters."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from probes.trace.ring_buffer import TRACE_ENTRY

if TYPE_CHECKING:
    from probes.trace.trace_events_filter import EventFilter
    from probes.trace.trace_events_trigger import EventTriggerData, TriggerState


@dataclass(frozen=True)
class FtraceEventField:
    """struct ftrace_event_field: `ctype` as the format file spells it, `offset`, `size`,
    `signed`; `count` for arrays, `dynamic` for __data_loc strings."""
    name: str
    ctype: str
    offset: int
    size: int
    signed: bool
    count: int = 0
    dynamic: bool = False
    is_string: bool = False

    def format_line(self) -> str:
        decl = f"{self.ctype} {self.name}[{self.count}]" if self.count and not self.dynamic else \
            f"{self.ctype} {self.name}"
        return (f"\tfield:{decl};\toffset:{self.offset};\tsize:{self.size};"
                f"\tsigned:{int(self.signed)};")

    def value(self, data: bytes) -> Any:
        """The field's value in a record: int, bytes (a string), or a list (an array)."""
        if self.ctype.startswith("__data_loc"):
            vals = [_data_loc(data, self.offset + 4 * i) for i in range(self.count or 1)]
            return vals if self.count else vals[0]
        if self.count:
            esize = self.size // self.count
            return [_int(data, self.offset + i * esize, esize, self.signed) for i in range(self.count)]
        if self.is_string:               # char comm[16]
            return data[self.offset:self.offset + self.size].split(b"\0", 1)[0]
        return _int(data, self.offset, self.size, self.signed)


def _data_loc(data: bytes, at: int) -> bytes | None:
    """A __data_loc string: u32 (len << 16 | offset from the record start); len 0 = the
    fetch faulted."""
    (loc,) = struct.unpack_from("<I", data, at)
    off, ln = loc & 0xFFFF, loc >> 16
    if ln == 0:
        return None
    raw = data[off:off + ln]
    return raw[:-1] if raw.endswith(b"\0") else raw


def _int(data: bytes, off: int, size: int, signed: bool) -> int:
    return int.from_bytes(data[off:off + size], "little", signed=signed)


COMMON_FIELDS = (
    FtraceEventField("common_type", "unsigned short", 0, 2, False),
    FtraceEventField("common_flags", "unsigned char", 2, 1, False),
    FtraceEventField("common_preempt_count", "unsigned char", 3, 1, False),
    FtraceEventField("common_pid", "int", 4, 4, True),
)


@dataclass(eq=False)
class TraceEventCall:
    """struct trace_event_call + its trace_event_file (one instance here).

    Attributes: `system` (group), `name`, `id` (event type in records), `fields` (the
    event's own, after the common ones), `print_fmt`, `enabled`, `filter` (EventFilter or
    None), `filter_text` (what reading `filter` shows), `prog_array` (BPF programs run on
    every hit: None or a list the bpf_trace layer manages), `perf_refs` (perf/BPF users
    that keep the probes armed), `print_line(record) -> str` (the event's printer),
    `probes` (the trace_kprobes behind a dynamic event), `kind`."""
    system: str
    name: str
    id: int
    fields: list[FtraceEventField]
    print_fmt: str
    print_line: Callable[[Any], str]
    kind: str = "kprobe"
    enabled: bool = False
    filter: "EventFilter | None" = None
    filter_text: str = "none"
    prog_array: list | None = None
    perf_refs: int = 0
    probes: list = field(default_factory=list)
    on_enable: Callable[[bool], None] | None = None
    sm_ref: int = 0
    soft_mode: bool = False
    soft_disabled: bool = False
    trigger_state: "TriggerState | None" = None

    @property
    def full_name(self) -> str:
        return f"{self.system}/{self.name}"

    def all_fields(self) -> list[FtraceEventField]:
        return list(COMMON_FIELDS) + self.fields

    def find_field(self, name: str) -> FtraceEventField | None:
        for f in self.all_fields():
            if f.name == name:
                return f
        return None

    def format(self) -> str:
        """The events/GRP/EVENT/format file."""
        lines = [f"name: {self.name}", f"ID: {self.id}", "format:"]
        lines += [f.format_line() for f in COMMON_FIELDS]
        lines.append("")
        lines += [f.format_line() for f in self.fields]
        lines.append("")
        lines.append(f"print fmt: {self.print_fmt}")
        return "\n".join(lines) + "\n"

    def set_enabled(self, on: bool) -> None:
        """A write to the event's `enable` file."""
        self.enable_disable(on, soft=False)

    def enable_disable(self, on: bool, soft: bool = False) -> None:
        """__ftrace_event_enable_disable: register the event (arm its probes) or not; `soft`
        is a trigger's use (sm_ref): the event is registered but SOFT_DISABLED until a
        trigger or the enable file enables it."""
        was = self.enabled
        if on:
            if soft:
                self.sm_ref += 1
                if self.sm_ref > 1:
                    return
                self.soft_mode = True
            else:
                self.soft_disabled = False
            if not self.enabled:
                self.soft_disabled = soft
                self.enabled = True
        else:
            if soft:
                self.sm_ref = max(0, self.sm_ref - 1)
                if self.sm_ref > 0:
                    return
                disable = self.soft_disabled
                self.soft_mode = False
            else:
                disable = not self.soft_mode
            if disable and self.enabled:
                self.enabled = False
            self.soft_disabled = self.soft_mode
        if self.enabled != was and self.on_enable is not None:
            self.on_enable(self.active)

    def enable_text(self) -> str:
        """Reading `enable`: 1 if enabled and not soft-disabled, `*` in soft mode."""
        text = "1" if self.enabled and not self.soft_disabled else "0"
        return text + ("*" if self.soft_disabled or self.soft_mode else "") + "\n"

    @property
    def recording(self) -> bool:
        """The event makes records on a hit (TP_FLAG_TRACE: registered for tracing)."""
        return self.enabled

    def triggers(self) -> list["EventTriggerData"]:
        return self.trigger_state.triggers if self.trigger_state is not None else []

    @property
    def active(self) -> bool:
        """Someone wants hits: the trace file is enabled or perf/BPF is attached."""
        return self.enabled or self.perf_refs > 0

    def perf_register(self) -> None:
        """TRACE_REG_PERF_REGISTER: a perf event (and its BPF programs) wants the hits."""
        self.perf_refs += 1
        if self.perf_refs == 1 and not self.enabled and self.on_enable is not None:
            self.on_enable(True)

    def perf_unregister(self) -> None:
        self.perf_refs = max(0, self.perf_refs - 1)
        if self.perf_refs == 0 and not self.enabled and self.on_enable is not None:
            self.on_enable(False)


def pack_header(call_id: int, flags: int, preempt_count: int, pid: int) -> bytes:
    return TRACE_ENTRY.pack(call_id, flags, preempt_count, pid)
