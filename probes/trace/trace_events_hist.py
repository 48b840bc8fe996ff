"""kernel/trace/trace_events_hist.c: `hist` triggers. `hist:keys=K[.mod],...[:vals=V,...]
[:sort=F[.descending],...][:size=N][:name=N][:pause|:cont|:clear][:nohitcount] [if FILTER]`
aggregates an event's records into a map keyed by field values (hitcount and sums of the
values), printed by the event's `hist` file in the kernel's layout.

Keys: numeric fields (sign-extended as the kernel's hist_field_s* do) with .hex, .sym,
.sym-offset, .log2, .buckets=N, .execname (common_pid); string fields. Values: hitcount
and numeric fields (.hex). Ties in the sort order are broken by the key, ascending (the
kernel's heap sort leaves them in no defined order). Left out: variables, expressions,
actions (onmatch/onmax/onchange), synthetic events, .stacktrace, .usecs, .percent, .graph,
common_timestamp, named hist sharing."""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from probes.trace.trace_events_trigger import (
    EventTriggerData, EventTriggerType, TriggerError, parse_trigger_filter, register_trigger,
)
from probes.trace.trace_probe import kstrtoul

if TYPE_CHECKING:
    from probes.trace.trace_events import FtraceEventField, TraceEventCall
    from probes.trace.tracefs import Tracefs

TRACING_MAP_BITS_DEFAULT, TRACING_MAP_BITS_MIN, TRACING_MAP_BITS_MAX = 11, 7, 17
TRACING_MAP_KEYS_MAX, TRACING_MAP_VALS_MAX, TRACING_MAP_SORT_KEYS_MAX = 3, 3, 2
U64 = (1 << 64) - 1
KEY_MODIFIERS = ("hex", "sym", "sym-offset", "execname", "log2", "buckets")
VAL_MODIFIERS = ("hex",)

# hist_err_text entries this module reports
HIST_ERRORS = {
    "TRIGGER_EEXIST": "Hist trigger already exists",
    "TRIGGER_ENOENT_CLEAR": "Can't clear or continue a nonexistent hist trigger",
    "BAD_FIELD_MODIFIER": "Invalid field modifier",
    "FIELD_NOT_FOUND": "Couldn't find field",
    "INVALID_SORT_MODIFIER": "Invalid sort modifier",
    "EMPTY_SORT_FIELD": "Empty sort field",
    "TOO_MANY_SORT_FIELDS": "Too many sort fields (Max = 2)",
    "INVALID_SORT_FIELD": "Sort field must be a key or a val",
}


@dataclass(frozen=True)
class HistField:
    """struct hist_field, reduced: the event field, its modifier and bucket size."""
    field: "FtraceEventField"
    modifier: str = ""
    buckets: int = 0

    @property
    def name(self) -> str:
        return self.field.name

    def spec(self) -> str:
        """hist_field_print."""
        text = self.name + (f".{self.modifier}" if self.modifier else "")
        return text + (f"={self.buckets}" if self.buckets else "")

    def value(self, rec: bytes) -> Any:
        v = self.field.value(rec)
        if isinstance(v, (bytes, bytearray)) or v is None:
            return bytes(v or b"")
        if isinstance(v, list):
            v = v[0] if v else 0
        v &= U64                                 # (u64)(s32) etc.: sign-extended
        if self.modifier == "log2":
            return 0 if v <= 1 else (v - 1).bit_length()
        if self.modifier == "buckets":
            return v // self.buckets * self.buckets
        return v


@dataclass(eq=False)
class HistTrigger:
    """struct hist_trigger_data + its tracing_map: `keys`, `vals` (after hitcount),
    `sort` [(index: 0 hitcount, 1.. vals, -1.. keys), descending], `map` key -> sums,
    `hits`, `drops`, `paused`, `name`, `filter_str`."""
    call: "TraceEventCall"
    keys: list[HistField]
    vals: list[HistField]
    sort: list[tuple[int, bool]]
    map_bits: int = TRACING_MAP_BITS_DEFAULT
    name: str = ""
    filter_str: str | None = None
    map: dict[tuple, list[int]] = field(default_factory=dict)
    comms: dict[tuple, str] = field(default_factory=dict)
    hits: int = 0
    drops: int = 0
    trigger: EventTriggerData | None = None
    comm_of: Any = None

    def spec(self) -> str:
        return (f"keys={','.join(k.spec() for k in self.keys)}:vals="
                + ",".join(["hitcount"] + [v.spec() for v in self.vals]) + ":sort="
                + ",".join(self._sort_name(i) + (".descending" if d else "") for i, d in self.sort)
                + f":size={1 << self.map_bits}")

    def _sort_name(self, idx: int) -> str:
        return "hitcount" if idx == 0 else self.vals[idx - 1].spec() if idx > 0 \
            else self.keys[-idx - 1].spec()

    def trigger_info(self) -> str:
        """event_hist_trigger_print."""
        paused = self.trigger is not None and self.trigger.paused
        return ("hist:" + (f"{self.name}:" if self.name else "") + self.spec()
                + (f" if {self.filter_str}" if self.filter_str else "")
                + (" [paused]" if paused else " [active]") + "\n")

    # --- a hit (event_hist_trigger) ---------------------------------------------------------
    def update(self, rec: bytes) -> None:
        key = tuple(k.value(rec) for k in self.keys)
        sums = self.map.get(key)
        if sums is None:
            if len(self.map) >= 1 << self.map_bits:
                self.drops += 1
                return
            sums = self.map[key] = [0] * (1 + len(self.vals))
            if self.comm_of is not None:
                self.comms[key] = self.comm_of(rec)
        self.hits += 1
        sums[0] += 1
        for i, v in enumerate(self.vals, 1):
            x = v.value(rec)
            sums[i] = (sums[i] + (x if isinstance(x, int) else 0)) & U64

    def clear(self) -> None:
        self.map.clear()
        self.comms.clear()
        self.hits = self.drops = 0

    # --- the hist file ------------------------------------------------------------------------
    def show(self) -> str:
        out = ["# event histogram\n#\n# trigger info: ", self.trigger_info(), "#\n\n"]
        entries = self._sorted()
        for key, sums in entries:
            out.append(self._key_text(key) + f" hitcount: {sums[0]:>10}")
            for v, s in zip(self.vals, sums[1:]):
                out.append(f"  {v.name}: " + (f"{s:>10x}" if v.modifier == "hex" else f"{s:>10}"))
            out.append("\n")
        out.append(f"\nTotals:\n    Hits: {self.hits}\n    Entries: {len(entries)}\n"
                   f"    Dropped: {self.drops}\n")
        return "".join(out)

    def _sorted(self) -> list[tuple[tuple, list[int]]]:
        items = sorted(self.map.items(), key=lambda kv: _key_order(kv[0]))
        for idx, desc in reversed(self.sort):     # stable: primary key sorted last
            if idx >= 0:
                items.sort(key=lambda kv: kv[1][idx], reverse=desc)  # noqa: B023 (used at once)
            else:                                  # tracing_map_cmp_num: signed if the field is
                k, pos = self.keys[-idx - 1], -idx - 1
                items.sort(key=lambda kv: _order(kv[0][pos], k.field.signed), reverse=desc)
        return items

    def _key_text(self, key: tuple) -> str:
        syms = self.call_symbols
        parts = []
        for k, v in zip(self.keys, key):
            name, mod = k.name, k.modifier
            if isinstance(v, bytes):
                parts.append(f"{name}: {v.decode('latin-1'):<50}")
            elif mod == "hex":
                parts.append(f"{name}: {v:x}")
            elif mod == "sym":
                s = syms.find(v) if syms is not None else None
                parts.append(f"{name}: [{v:x}] {(s.name if s else f'0x{v:x}'):<45}")
            elif mod == "sym-offset":
                parts.append(f"{name}: [{v:x}] {syms.format(v) if syms else hex(v):<55}")
            elif mod == "execname":
                parts.append(f"{name}: {self.comms.get(key, ''):<16}[{v:>10}]")
            elif mod == "log2":
                parts.append(f"{name}: ~ 2^{v:<2}")
            elif mod == "buckets":
                parts.append(f"{name}: ~ {v}-{v + k.buckets - 1}")
            else:
                parts.append(f"{name}: {v:>10}")
        return "{ " + ", ".join(parts) + " }"

    call_symbols: Any = None


def _order(v: Any, signed: bool = False) -> Any:
    if isinstance(v, bytes):
        return (1, v)
    return (0, v - (1 << 64) if signed and v >> 63 else v)


def _key_order(key: tuple) -> tuple:
    return tuple(_order(v) for v in key)


# --- parsing (event_hist_trigger_parse) --------------------------------------------------------
class _HistParse:
    """One hist command: its text for error_log positions (last_cmd = "hist:" + param)."""

    def __init__(self, fs: "Tracefs", call: "TraceEventCall", param: str) -> None:
        self.fs, self.call, self.cmd = fs, call, "hist:" + param

    def err(self, code: str, token: str | None = None, err: int = errno.EINVAL) -> TriggerError:
        pos = self.cmd.find(token) if token else 0
        self.fs.log_error((f"hist:{self.call.system}:{self.call.name}: error: {HIST_ERRORS[code]}",
                           f"  Command: {self.cmd}", " " * (11 + max(pos, 0)) + "^"))
        return TriggerError(err)

    def field(self, text: str, modifiers: tuple[str, ...]) -> HistField:
        """parse_field: `name[.modifier]`."""
        name, _, mod = text.partition(".")
        buckets = 0
        if mod.startswith("buckets="):
            n = kstrtoul(mod[len("buckets="):])
            if not n:
                raise self.err("BAD_FIELD_MODIFIER", mod)
            mod, buckets = "buckets", n
        if mod and (mod not in modifiers or (mod == "execname" and name != "common_pid")):
            raise self.err("BAD_FIELD_MODIFIER", mod)
        f = self.call.find_field(name) if name else None
        if f is None:
            raise self.err("FIELD_NOT_FOUND", name or None)
        return HistField(f, mod, buckets)

    def sort_keys(self, text: str | None, keys: list[HistField],
                  vals: list[HistField]) -> list[tuple[int, bool]]:
        """create_sort_keys: default hitcount ascending."""
        if text is None:
            return [(0, False)]
        items = text.split(",")
        if len(items) > TRACING_MAP_SORT_KEYS_MAX:
            raise self.err("TOO_MANY_SORT_FIELDS")
        out = []
        for item in items:
            name, _, mod = item.partition(".")
            if not name:
                raise self.err("EMPTY_SORT_FIELD")
            if mod not in ("", "ascending", "descending"):
                raise self.err("INVALID_SORT_MODIFIER", mod)
            if name == "hitcount":
                idx = 0
            elif any(v.name == name for v in vals):
                idx = 1 + [v.name for v in vals].index(name)
            elif any(k.name == name for k in keys):
                idx = -1 - [k.name for k in keys].index(name)
            else:
                raise self.err("INVALID_SORT_FIELD", name)
            out.append((idx, mod == "descending"))
        return out


def _split_filter(param: str) -> tuple[str, str | None]:
    """The trigger and its filter: `if` after a blank, followed by one."""
    at = 0
    while True:
        p = param.find("if", at)
        if p < 0:
            return param.strip(), None
        if p == 0:
            raise TriggerError(errno.EINVAL)
        if param[p - 1] not in " \t" or param[p + 2:p + 3] not in (" ", "\t"):
            at = p + 1
            continue
        return param[:p - 1].strip(), param[p:].strip()


def event_hist_trigger_parse(fs: "Tracefs", call: "TraceEventCall", remove: bool,
                             param: str) -> None:
    if not param:
        raise TriggerError(errno.EINVAL)
    hp = _HistParse(fs, call, param)
    spec, flt = _split_filter(param)
    attrs: dict[str, Any] = {"pause": False, "cont": False, "clear": False}
    for item in spec.split(":"):
        key, eq, value = item.partition("=")
        if eq and key in ("key", "keys"):
            attrs["keys"] = value
        elif eq and key in ("val", "vals", "values"):
            attrs["vals"] = value
        elif eq and key in ("sort", "name", "size"):
            attrs[key] = value
        elif item in ("pause", "clear"):
            attrs[item] = True
        elif item in ("cont", "continue"):
            attrs["cont"] = True
        elif item in ("nohitcount", "NOHC"):
            raise TriggerError(errno.EINVAL)       # needs another value: not modelled
        else:
            raise TriggerError(errno.EINVAL)
    map_bits = TRACING_MAP_BITS_DEFAULT
    if "size" in attrs:
        n = kstrtoul(attrs["size"])
        map_bits = (n - 1).bit_length() if n else 0
        if not (TRACING_MAP_BITS_MIN <= map_bits <= TRACING_MAP_BITS_MAX):
            raise TriggerError(errno.EINVAL)
    if not attrs.get("keys"):
        raise TriggerError(errno.EINVAL)
    key_texts = attrs["keys"].split(",")
    val_texts = [v for v in attrs.get("vals", "").split(",") if v and v != "hitcount"]
    if len(key_texts) > TRACING_MAP_KEYS_MAX or len(val_texts) + 1 > TRACING_MAP_VALS_MAX:
        raise TriggerError(errno.EINVAL)
    keys = [hp.field(k, KEY_MODIFIERS) for k in key_texts]
    vals = [hp.field(v, VAL_MODIFIERS) for v in val_texts]
    sort = hp.sort_keys(attrs.get("sort"), keys, vals)
    filt, filt_str = parse_trigger_filter(fs, call, flt)
    hist = HistTrigger(call, keys, vals, sort, map_bits, attrs.get("name", ""), filt_str)
    hist.call_symbols = fs.machine.symbols
    if any(k.modifier == "execname" for k in keys):
        pid_field = call.find_field("common_pid")
        assert pid_field is not None
        hist.comm_of = lambda rec: fs.comms.get(pid_field.value(rec), fs.machine.task[0])
    _register(hp, call, hist, filt, attrs, remove)


def _register(hp: _HistParse, call: "TraceEventCall", hist: HistTrigger, filt: Any,
              attrs: dict[str, Any], remove: bool) -> None:
    """hist_register_trigger: an identical trigger is paused, continued or cleared (or is
    -EEXIST); `!hist:...` removes it."""
    same = next((t for t in call.triggers() if t.hist is not None
                 and t.hist.spec() == hist.spec() and t.hist.name == hist.name  # type: ignore
                 and t.filter_str == hist.filter_str), None)
    if remove:
        if same is not None:
            from probes.trace.trace_events_trigger import _unregister
            _unregister(call, same)
        return
    if same is not None:
        if attrs["pause"]:
            same.paused = True
        elif attrs["cont"]:
            same.paused = False
        elif attrs["clear"]:
            same.hist.clear()                                  # type: ignore[attr-defined]
        else:
            raise hp.err("TRIGGER_EEXIST", err=errno.EEXIST)
        return
    if attrs["cont"] or attrs["clear"]:
        raise hp.err("TRIGGER_ENOENT_CLEAR", err=errno.ENOENT)
    t = EventTriggerData("hist", EventTriggerType.ETT_EVENT_HIST, lambda _t: None, -1, filt,
                         hist.filter_str, needs_rec=True, paused=attrs["pause"], hist=hist,
                         on_record=hist.update)
    hist.trigger = t
    register_trigger(call, t)


def hist_show(call: "TraceEventCall") -> str:
    """The `hist` file: every hist trigger of the event, newest first, two blank lines
    between them."""
    hists = [t.hist for t in call.triggers() if t.hist is not None]
    return "\n\n".join(h.show() for h in hists)             # type: ignore[attr-defined]
