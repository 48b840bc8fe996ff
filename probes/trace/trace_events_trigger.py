"""kernel/trace/trace_events_trigger.c: event triggers, written to an event's `trigger`
file and run on its hits: traceon, traceoff, snapshot, stacktrace, enable_event and
disable_event (soft mode: sm_ref/tm_ref), each with a count `:N` and a filter `if EXPR`;
`hist` triggers live in trace_events_hist.py.

A trigger without a filter that needs no record runs before the record is made (and a
soft-disabled event then writes nothing); one with a filter, a post trigger (traceoff,
stacktrace) or hist makes the event TRIGGER_COND: the record is built, the triggers whose
filter matches it run, then it is committed or discarded, then the post triggers run.
Left out: enable_hist/disable_hist, snapshot conditions, per-instance files. The record a
TRIGGER_COND event builds is made even while tracing is off (the kernel builds it in its
per-CPU trace_buffered_event), so `traceon if EXPR` can turn tracing back on."""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import IntFlag
from typing import TYPE_CHECKING, Callable

from probes.trace.trace_probe import kstrtoul

if TYPE_CHECKING:
    from probes.trace.trace_events import TraceEventCall
    from probes.trace.trace_events_filter import EventFilter
    from probes.trace.tracefs import Tracefs


class EventTriggerType(IntFlag):
    """enum event_trigger_type: traceon and traceoff share ETT_TRACE_ONOFF."""
    ETT_NONE = 0
    ETT_TRACE_ONOFF = 1
    ETT_SNAPSHOT = 2
    ETT_STACKTRACE = 4
    ETT_EVENT_ENABLE = 8
    ETT_EVENT_HIST = 16
    ETT_HIST_ENABLE = 32


AVAILABLE = ("# Available triggers:\n# traceon traceoff snapshot stacktrace enable_event "
             "disable_event enable_hist disable_hist hist\n")


@dataclass(eq=False)
class EventTriggerData:
    """struct event_trigger_data: the command, `count` (-1 = unlimited), `filter` and its
    text, `paused`, and for enable/disable_event the target event and direction."""
    cmd: str
    trigger_type: EventTriggerType
    fire: Callable[["EventTriggerData"], None]
    count: int = -1
    filter: "EventFilter | None" = None
    filter_str: str | None = None
    post: bool = False
    needs_rec: bool = False
    paused: bool = False
    target: "TraceEventCall | None" = None
    enable: bool = True
    hist: object = None
    on_record: Callable[[bytes], None] | None = None

    def show(self) -> str:
        """event_trigger_print / event_enable_trigger_print."""
        if self.hist is not None:
            return self.hist.trigger_info()          # type: ignore[attr-defined]
        name = self.cmd
        if self.target is not None:
            name += f":{self.target.system}:{self.target.name}"
        name += ":unlimited" if self.count == -1 else f":count={self.count}"
        return name + (f" if {self.filter_str}" if self.filter_str else "") + "\n"


@dataclass
class TriggerState:
    """The trigger side of a trace_event_file: `triggers` (newest first), `tm_ref`."""
    triggers: list[EventTriggerData] = field(default_factory=list)
    tm_ref: int = 0

    @property
    def trigger_mode(self) -> bool:
        return self.tm_ref > 0

    @property
    def cond(self) -> bool:
        """EVENT_FILE_FL_TRIGGER_COND (update_cond_flag)."""
        return any(t.filter is not None or t.post or t.needs_rec for t in self.triggers)


# --- running ---------------------------------------------------------------------------------
def trace_trigger_soft_disabled(call: "TraceEventCall") -> bool:
    """Before a record is made: run the triggers of a non-COND event; True if the event
    is soft-disabled and nothing is to be recorded (trace_trigger_soft_disabled)."""
    ts = call.trigger_state
    if ts is None or not ts.cond:
        if ts is not None and ts.trigger_mode:
            event_triggers_call(call, None)
        return call.soft_disabled
    return False


def event_triggers_call(call: "TraceEventCall", rec: bytes | None, comm: str = "",
                        cpu: int = 0) -> EventTriggerType:
    """Run the triggers whose filter matches `rec` (all of them without a record); post
    triggers are not run but returned, for event_triggers_post_call."""
    tt = EventTriggerType.ETT_NONE
    ts = call.trigger_state
    for t in list(ts.triggers) if ts is not None else []:
        if t.paused:
            continue
        if rec is None:
            t.fire(t)
            continue
        if t.filter is not None and not t.filter.match(rec, comm, cpu):
            continue
        if t.post:
            tt |= t.trigger_type
            continue
        if t.on_record is not None:
            t.on_record(rec)
        else:
            t.fire(t)
    return tt


def event_triggers_post_call(call: "TraceEventCall", tt: EventTriggerType) -> None:
    ts = call.trigger_state
    for t in list(ts.triggers) if ts is not None else []:
        if not t.paused and t.trigger_type & tt:
            t.fire(t)


# --- the commands' actions (the *_count_trigger variants are the count checks) ----------------
def _counted(t: EventTriggerData) -> bool:
    if not t.count:
        return False
    if t.count != -1:
        t.count -= 1
    return True


class TriggerCommands:
    """The trigger commands of one tracefs; `fs` is where they act."""

    def __init__(self, fs: "Tracefs") -> None:
        self.fs = fs

    def traceon(self, t: EventTriggerData) -> None:
        if self.fs.tracing_on == (t.cmd == "traceon"):
            return                              # the count drops only when the state changes
        if _counted(t):
            self.fs.tracing_on = t.cmd == "traceon"

    def snapshot(self, t: EventTriggerData) -> None:
        if _counted(t):
            self.fs.tracing_snapshot()

    def stacktrace(self, t: EventTriggerData) -> None:
        if _counted(t):
            self.fs.trace_stack()

    def event_enable(self, t: EventTriggerData) -> None:
        target = t.target
        assert target is not None
        if t.enable == (not target.soft_disabled):
            return                              # already in the state to switch to
        if _counted(t):
            target.soft_disabled = not t.enable


# --- parsing (event_trigger_write / trigger_process_regex) ------------------------------------
class TriggerError(Exception):
    def __init__(self, err: int) -> None:
        self.errno = err
        super().__init__(err)


def _separate_filter(rest: str | None, param_required: bool) -> tuple[str | None, str | None]:
    """event_trigger_separate_filter: `[param] [if filter]`; an optional param must start
    with a digit."""
    if rest is None:
        if param_required:
            raise TriggerError(errno.EINVAL)
        return None, None
    if not param_required and not rest[:1].isdigit():
        return None, rest
    param, _, flt = rest.partition(" ")
    if "\t" in param:
        param, _, more = param.partition("\t")
        flt = more + (" " + flt if flt else "")
    return param, flt.strip() or None


def _parse_num(param: str | None) -> int:
    """event_trigger_parse_num: `N` of `cmd:N`."""
    if param is None:
        return -1
    number = param.split(":", 1)[0]
    n = kstrtoul(number) if number else None
    if n is None:
        raise TriggerError(errno.EINVAL)
    return n


def parse_trigger_filter(fs: "Tracefs", call: "TraceEventCall",
                         text: str | None) -> tuple["EventFilter | None", str | None]:
    """set_trigger_filter: `if EXPR` in the grammar of the triggering event's filter."""
    if text is None:
        return None, None
    word, _, expr = text.partition(" ")
    expr = expr.strip()
    if word != "if" or not expr:
        raise TriggerError(errno.EINVAL)
    from probes.trace.trace_events_filter import FilterError, create_filter
    try:
        return create_filter(call, expr), expr
    except FilterError as e:
        fs.log_error((f"event filter parse error: error: {e.message}", f"  Command: {expr}",
                      " " * (11 + e.pos) + "^"))
        raise TriggerError(errno.EINVAL) from None


GENERIC = {"traceon": (EventTriggerType.ETT_TRACE_ONOFF, False),
           "traceoff": (EventTriggerType.ETT_TRACE_ONOFF, True),
           "snapshot": (EventTriggerType.ETT_SNAPSHOT, False),
           "stacktrace": (EventTriggerType.ETT_STACKTRACE, True)}


def event_trigger_write(fs: "Tracefs", call: "TraceEventCall", text: str,
                        append: bool = True) -> int:
    """A write to events/GRP/EVENT/trigger: 0 or -errno. Without `append` (O_TRUNC) every
    trigger of the event is removed first."""
    if not append:
        for t in list(call.triggers()):
            _unregister(call, t)
    buff = text.strip()
    if not buff:
        return 0
    cut = min((i for i in (buff.find(c) for c in ": \t") if i >= 0), default=len(buff))
    command, rest = buff[:cut], buff[cut + 1:].lstrip() or None
    remove = command.startswith("!")
    name = command[1:] if remove else command
    try:
        if name in GENERIC:
            _parse_generic(fs, call, name, remove, rest)
        elif name in ("enable_event", "disable_event"):
            _parse_enable(fs, call, name, remove, rest)
        elif name == "hist":
            from probes.trace.trace_events_hist import event_hist_trigger_parse
            event_hist_trigger_parse(fs, call, remove, rest or "")
        else:
            return -errno.EINVAL
    except TriggerError as e:
        return -e.errno
    return 0


def _parse_generic(fs: "Tracefs", call: "TraceEventCall", name: str, remove: bool,
                   rest: str | None) -> None:
    ttype, post = GENERIC[name]
    param, flt = _separate_filter(rest, False)
    if remove:
        for t in call.triggers():
            if t.trigger_type == ttype:
                _unregister(call, t)
                break
        return
    count = _parse_num(param)
    filt, filt_str = parse_trigger_filter(fs, call, flt)
    cmds = fs.trigger_commands
    fire = {"traceon": cmds.traceon, "traceoff": cmds.traceon, "snapshot": cmds.snapshot,
            "stacktrace": cmds.stacktrace}[name]
    if name == "snapshot":
        fs.alloc_snapshot()
    register_trigger(call, EventTriggerData(name, ttype, fire, count, filt, filt_str, post))


def _parse_enable(fs: "Tracefs", call: "TraceEventCall", name: str, remove: bool,
                  rest: str | None) -> None:
    """event_enable_trigger_parse: `SYS:EVENT[:N] [if FILTER]`, the target soft-enabled."""
    param, flt = _separate_filter(rest, True)
    system, sep, tail = (param or "").partition(":")
    if not sep:
        raise TriggerError(errno.EINVAL)
    event, _, num = tail.partition(":")
    target = fs.find_event(system, event)
    if target is None:
        raise TriggerError(errno.EINVAL)
    ttype = EventTriggerType.ETT_EVENT_ENABLE
    if remove:
        for t in call.triggers():
            if t.trigger_type == ttype and t.target is target:
                _unregister(call, t)
                break
        return
    count = _parse_num(num or None)
    filt, filt_str = parse_trigger_filter(fs, call, flt)
    if any(t.trigger_type == ttype and t.target is target for t in call.triggers()):
        raise TriggerError(errno.EEXIST)
    target.enable_disable(True, soft=True)
    t = EventTriggerData(name, ttype, fs.trigger_commands.event_enable, count, filt, filt_str,
                         target=target, enable=name == "enable_event")
    register_trigger(call, t)


def register_trigger(call: "TraceEventCall", t: EventTriggerData) -> None:
    """register_trigger: one trigger of a type per event (-EEXIST), newest first; the
    event enters trigger mode (tm_ref) and soft mode."""
    shared = (EventTriggerType.ETT_EVENT_ENABLE, EventTriggerType.ETT_EVENT_HIST)
    if t.trigger_type not in shared and any(x.trigger_type == t.trigger_type
                                            for x in call.triggers()):
        if t.target is not None:
            t.target.enable_disable(False, soft=True)
        raise TriggerError(errno.EEXIST)
    ts = call.trigger_state
    if ts is None:
        ts = call.trigger_state = TriggerState()
    ts.triggers.insert(0, t)
    ts.tm_ref += 1
    if ts.tm_ref == 1:
        call.enable_disable(True, soft=True)


def _unregister(call: "TraceEventCall", t: EventTriggerData) -> None:
    ts = call.trigger_state
    assert ts is not None
    ts.triggers.remove(t)
    if t.target is not None:
        t.target.enable_disable(False, soft=True)
    ts.tm_ref -= 1
    if ts.tm_ref == 0:
        call.enable_disable(False, soft=True)


def trigger_show(call: "TraceEventCall") -> str:
    """Reading the trigger file."""
    triggers = call.triggers()
    return "".join(t.show() for t in triggers) if triggers else AVAILABLE
