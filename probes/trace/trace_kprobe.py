"""kernel/trace/trace_kprobe.c: kprobe events. `p`/`r`/`-` commands written to
kprobe_events or dynamic_events create trace_kprobes over the probe core's
register_kprobe/register_kretprobe; their dispatchers run BPF programs attached to the
event and record the event's fields into the ring buffer.

A hit is modelled as the kernel's breakpoint handler sees it: interrupts masked, so the
trace_entry flags are IRQS_OFF and the preempt count 0 (`d....`).
An event on `MOD:SYM` of a module not loaded yet is defined but not registered, and is
registered (armed if enabled) when the module comes (trace_kprobe_module_callback); a
module going leaves its probes GONE (probes/module.py) until it comes again.
Left out: BTF args, `%return` on fprobes, hashed %p."""
from __future__ import annotations

import ctypes
import errno
import importlib
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emu.module import find_module
from probes.errors import KprobeError
from probes.kprobes import KPROBE_FLAG_DISABLED, KPROBE_FLAG_GONE, Kprobe, kprobes_of
from probes.native import KnTevent, KnTstate
from probes.trace.ring_buffer import TRACE_FLAG_IRQS_OFF
from probes.trace.trace_events import FtraceEventField, TraceEventCall, pack_header
from probes.trace.trace_events_trigger import trace_trigger_soft_disabled
from probes.trace.trace_output import format_value
from probes.trace.trace_probe import (
    MAX_EVENT_NAME_LEN, MAX_EVENT_SIZE, MAX_TRACE_ARGS, KRETPROBE_MAXACTIVE_MAX, FetchArg,
    FetchContext, ParseContext, TraceProbeError, compile_fetch_program, is_good_name,
    is_good_system_name, kstrtoul, parse_probe_location, traceprobe_parse_probe_arg,
)

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.regs import PtRegs
    from probes.trace.tracefs import Tracefs

KPROBE_EVENT_SYSTEM = "kprobes"
_Q = struct.Struct("<Q")
HIT_FLAGS, HIT_PREEMPT_COUNT = TRACE_FLAG_IRQS_OFF, 0


@dataclass(eq=False)
class TraceKprobe:
    """struct trace_kprobe: one probe point of an event. `symbol`/`offset` or `addr`,
    `is_return`, `maxactive`, `args`, the core's `kp` (or `rp` for return probes), `nhit`,
    and the `call` (event) it records into."""
    group: str
    event: str
    symbol: str | None
    offset: int
    addr: int | None
    is_return: bool
    maxactive: int
    args: list[FetchArg]
    call: TraceEventCall | None = None
    kp: Kprobe | None = None
    rp: object = None
    nhit: int = 0
    entry_args: int = 0          # $argN a return probe saves at entry (highest N)

    @property
    def probe(self) -> Kprobe:
        return self.rp.kp if self.rp is not None else self.kp

    @property
    def nmissed(self) -> int:
        n = self.probe.nmissed
        return n + self.rp.nmissed if self.rp is not None else n

    def show(self) -> str:
        """trace_kprobe_show: the kprobe_events line."""
        head = "r" if self.is_return else "p"
        if self.is_return and self.rp is not None and self.rp.maxactive:
            head += str(self.rp.maxactive)
        if self.symbol is None:
            where = f"0x{self.addr:x}"
        elif self.offset:
            where = f"{self.symbol}+{self.offset}"
        else:
            where = self.symbol
        args = "".join(f" {a.name}={a.comm}" for a in self.args)
        gone = " [GONE]" if self.probe.flags & KPROBE_FLAG_GONE else ""   # its module went
        return f"{head}:{self.group}/{self.event} {where}{args}{gone}"

    def same_probe(self, other: "TraceKprobe") -> bool:
        return (self.symbol, self.offset, self.addr) == (other.symbol, other.offset, other.addr) \
            and [a.comm for a in self.args] == [a.comm for a in other.args]


def compare_arg_type(a: list[FetchArg], b: list[FetchArg]) -> int:
    """trace_probe_compare_arg_type: 0 if alike, else the 1-based index of the first
    difference."""
    if len(a) != len(b):
        return min(len(a), len(b)) + 1
    for i, (x, y) in enumerate(zip(a, b)):
        if (x.name, x.type.name, x.count) != (y.name, y.type.name, y.count):
            return i + 1
    return 0


def trace_kprobe_module_exist(m: "Machine", symbol: str | None) -> bool:
    """trace_kprobe_module_exist: is the module a `MOD:SYM` names loaded? (A plain symbol's
    is the image, always there.)"""
    if symbol is None:
        return False
    mod, sep, _sym = symbol.partition(":")
    return not sep or find_module(m, mod) is not None


def trace_kprobe_within_module(tk: TraceKprobe, mod_name: str) -> bool:
    return tk.symbol is not None and tk.symbol.startswith(mod_name + ":")


def sanitize_event_name(name: str) -> str:
    return name[:1] + re.sub(r"[:.*]", "_", name[1:])


# --- parsing a command (trace_kprobe_create) ------------------------------------------------------
@dataclass
class KprobeCommand:
    group: str
    event: str | None
    location: object
    is_return: bool
    maxactive: int
    args: list[FetchArg] = field(default_factory=list)


def _parse_maxactive(word: str, is_return: bool) -> int:
    if not word[1:2].isdigit():
        return 0
    if not is_return:
        raise TraceProbeError("BAD_MAXACT_TYPE", 0, 1)
    text = word[1:].split(":", 1)[0]
    n = kstrtoul(text) if len(text) <= MAX_EVENT_NAME_LEN - 1 else None
    if not n:
        raise TraceProbeError("BAD_MAXACT", 0, 1)
    if n > KRETPROBE_MAXACTIVE_MAX:
        raise TraceProbeError("MAXACT_TOO_BIG", 0, 1)
    return n


def parse_event_name(text: str, offset: int) -> tuple[str | None, str | None]:
    """traceprobe_parse_event_name: `[GRP/|GRP.]EVENT` at column `offset` of word 0."""
    group = None
    slash = text.find("/")
    if slash < 0:
        slash = text.find(".")
    if slash >= 0:
        if slash == 0:
            raise TraceProbeError("NO_GROUP_NAME", 0, offset)
        if slash + 1 > MAX_EVENT_NAME_LEN:
            raise TraceProbeError("GROUP_TOO_LONG", 0, offset)
        group = text[:slash]
        if not is_good_system_name(group):
            raise TraceProbeError("BAD_GROUP_NAME", 0, offset)
        offset += slash + 1
        text = text[slash + 1:]
    if not text:
        if slash >= 0:
            return group, None
        raise TraceProbeError("NO_EVENT_NAME", 0, offset)
    if len(text) >= MAX_EVENT_NAME_LEN:
        raise TraceProbeError("EVENT_TOO_LONG", 0, offset)
    if not is_good_name(text):
        raise TraceProbeError("BAD_EVENT_NAME", 0, offset)
    return group, text


def argv_has_var_arg(args: list[str], fentry_or_return: bool) -> None:
    """argv_has_var_arg, before any argument is parsed: a bare `$arg...` argument needs a
    function entry or exit, and a number (`$arg*` needs BTF, which guests do not have)."""
    last = None
    for i, text in enumerate(args):
        if not text.startswith("$arg"):
            continue
        last = i
        if not fentry_or_return:
            raise TraceProbeError("NOFENTRY_ARGS", i + 2, 0)
        if not text[4:5].isdigit() and text[4:5] != "*":
            raise TraceProbeError("BAD_VAR", i + 2, 0)
    if last is not None and any(t.startswith("$arg*") for t in args):
        raise TraceProbeError("NOSUP_BTFARG", last + 2, 0, errno.EOPNOTSUPP)


def parse_kprobe_command(argv: list[str], tracefs: "Tracefs") -> KprobeCommand:
    """argv of a `p`/`r` command -> KprobeCommand; TraceProbeError with index/offset, in
    the order trace_kprobe_create checks: maxactive, probe point, event name, $arg use,
    argument count, each argument."""
    m = tracefs.machine
    word = argv[0]
    is_return = word[0] == "r"
    maxactive = _parse_maxactive(word, is_return)
    loc = parse_probe_location(argv[1], m.symbols, lambda mod: find_module(m, mod) is not None)
    is_return = is_return or loc.is_return
    on_entry = False
    if loc.symbol is not None:
        deferred = False
        try:
            _addr, on_entry = kprobes_of(m)._kprobe_addr(Kprobe(symbol_name=loc.symbol, offset=loc.offset))
        except KprobeError as e:
            # kprobe_on_func_entry: -ENOENT is left to registration. An IFUNC not resolved
            # yet is a function, so offset 0 is its entry; a symbol of a module not loaded
            # is nothing yet (no $argN, as the kernel)
            deferred = e.errno == errno.ENOENT and not trace_kprobe_module_exist(m, loc.symbol)
            on_entry = e.errno == errno.ENOENT and loc.offset == 0 and not deferred
        if is_return and not on_entry and not deferred:
            raise TraceProbeError("BAD_RETPROBE", 1, 0)
    group, event = KPROBE_EVENT_SYSTEM, None
    colon = word.find(":", 1)
    if colon >= 0:
        g, event = parse_event_name(word[colon + 1:], colon + 1)
        group = g or group
    if event is None:
        if loc.symbol is not None:
            event = f"{'r' if is_return else 'p'}_{loc.symbol}_{loc.offset}"
        else:
            event = f"{'r' if is_return else 'p'}_0x{loc.addr:x}"
        event = sanitize_event_name(event)[:MAX_EVENT_NAME_LEN - 1]
    argv_has_var_arg(argv[2:], on_entry or is_return)
    if len(argv) - 2 > MAX_TRACE_ARGS:
        raise TraceProbeError("TOO_MANY_ARGS", 2, 0, errno.E2BIG)
    ptrace = importlib.import_module(f"probes.arch.{m.arch.name}.ptrace")   # its pt_regs names
    ctx = ParseContext(m.arch, m.symbols, is_return=is_return, on_entry=on_entry and not is_return,
                       reg_names=ptrace.REGS_OFFSET_NAMES, reg_consts=ptrace.PT_REGS_CONST)
    cmd = KprobeCommand(group, event, loc, is_return, maxactive)
    size = 0
    for i, text in enumerate(argv[2:]):
        arg = traceprobe_parse_probe_arg(text, i, cmd.args, ctx)
        size += arg.size
        if size > MAX_EVENT_SIZE:         # the fields after the probe's own
            body_at = text.find("=") + 1 if "=" in text else 0
            raise TraceProbeError("EVENT_TOO_BIG", i + 2, body_at, errno.E2BIG)
        cmd.args.append(arg)
    return cmd


# --- the event: fields, print fmt, printer -------------------------------------------------------
def _head_fields(is_return: bool) -> list[FtraceEventField]:
    if is_return:
        return [FtraceEventField("__probe_func", "unsigned long", 8, 8, False),
                FtraceEventField("__probe_ret_ip", "unsigned long", 16, 8, False)]
    return [FtraceEventField("__probe_ip", "unsigned long", 8, 8, False)]


def layout_fields(args: list[FetchArg], is_return: bool) -> list[FtraceEventField]:
    """Fields packed in argument order after the header and probe fields, no padding."""
    fields = _head_fields(is_return)
    off = 24 if is_return else 16
    for a in args:
        a.offset = off
        if a.dynamic:
            ctype = "__data_loc char[]"
            size = 4 * (a.count or 1)
            fields.append(FtraceEventField(a.name, ctype, off, size, True, a.count, a.count == 0, True))
        else:
            t = a.type
            fields.append(FtraceEventField(a.name, t.fmttype, off, a.size, t.signed, a.count))
        off += fields[-1].size
    return fields


def set_print_fmt(args: list[FetchArg], is_return: bool) -> str:
    """__set_print_fmt: `"(%lx) a=fmt ...", REC->__probe_ip, REC->a, ...`."""
    fmt = "(%lx <- %lx)" if is_return else "(%lx)"
    recs = ["REC->__probe_func", "REC->__probe_ret_ip"] if is_return else ["REC->__probe_ip"]
    for a in args:
        one = a.type.print_fmt()
        if a.count:
            fmt += f" {a.name}={{" + ",".join([one] * a.count) + "}"
            recs += [f"__get_str({a.name}[{i}])" if a.dynamic else f"REC->{a.name}[{i}]"
                     for i in range(a.count)]
        else:
            fmt += f" {a.name}={one}"
            recs.append(f"__get_str({a.name})" if a.dynamic else f"REC->{a.name}")
    return f'"{fmt}", ' + ", ".join(recs)


def make_printer(name: str, fields: list[FtraceEventField], args: list[FetchArg],
                 is_return: bool, symbols):
    """print_kprobe_event / print_kretprobe_event over a record's bytes."""
    arg_fields = fields[2:] if is_return else fields[1:]

    def print_line(rec) -> str:
        data = rec.data
        if is_return:
            func, ret_ip = struct.unpack_from("<QQ", data, 8)
            head = f"{name}: ({symbols.format(ret_ip)} <- {symbols.format(func, with_size=False).split('+')[0]})"
        else:
            (ip,) = struct.unpack_from("<Q", data, 8)
            head = f"{name}: ({symbols.format(ip)})"
        parts = [head]
        for a, f in zip(args, arg_fields):
            v = f.value(data)
            parts.append(f" {a.name}={format_value(a.type.kind, a.type.signed, a.type.size, v, symbols)}")
        return "".join(parts)

    return print_line


# --- recording (kprobe_trace_func / kretprobe_trace_func) -------------------------------------------
def store_trace_args(tk: TraceKprobe, regs: "PtRegs", fctx: FetchContext, head: bytes) -> bytes:
    """The record: trace_entry, the probe fields, each argument; strings after the fixed
    part as __data_loc (len << 16 | offset), len counting the NUL, 0 on a fault."""
    call = tk.call
    assert call is not None              # set when the event is created
    fixed_end = call.fields[-1].offset + call.fields[-1].size if call.fields else 8
    buf = bytearray(fixed_end)
    buf[0:len(head)] = head
    for a in tk.args:
        v = a.fetch(regs, fctx)
        if a.plain:
            end = a.offset + a.type.size
            buf[a.offset:end] = v.to_bytes(end - a.offset, "little")
        elif a.type.is_string:
            for i, s in enumerate(v if a.count else [v]):
                if isinstance(s, str):
                    s = s.encode()
                if s is None:
                    loc = len(buf)                       # len 0: the fault marker
                else:
                    s = bytes(s)[: 0xFFFE] + b"\0"
                    loc = (len(s) << 16) | len(buf)
                    buf += s
                struct.pack_into("<I", buf, a.offset + 4 * i, loc)
        else:
            esize = a.type.size
            for i, x in enumerate(v if a.count else [v]):
                buf[a.offset + i * esize: a.offset + (i + 1) * esize] = \
                    (x & ((1 << 8 * esize) - 1)).to_bytes(esize, "little")
    return bytes(buf)


class TraceKprobeEvents:
    """The kprobe events of one tracefs: create/delete commands, the dispatchers, the
    kprobe_events and kprobe_profile text."""

    def __init__(self, tracefs: "Tracefs") -> None:
        self.fs = tracefs
        self.m = tracefs.machine
        self.probes: list[TraceKprobe] = []
        self._ctx: FetchContext | None = None
        # events whose records C may commit: id(tk) -> (tk, its KnTevent)
        self._native_events: dict[int, tuple[TraceKprobe, KnTevent]] = {}
        self._rbs: dict[int, tuple[object, ctypes.Array]] = {}  # buffer -> C's CPU pointers
        self._synced: tuple[int, str, int] | None = None       # pid, comm, commits seen
        self.m.stop_listeners.append(self._settle)

    # --- commands ---------------------------------------------------------------------------
    def create(self, argv: list[str]) -> None:
        cmd = parse_kprobe_command(argv, self.fs)
        tk = TraceKprobe(cmd.group, cmd.event, cmd.location.symbol, cmd.location.offset,
                         cmd.location.addr, cmd.is_return, cmd.maxactive, cmd.args)
        tk.entry_args = max((a.base[1] for a in cmd.args if a.base[0] == "arg"), default=0) \
            if cmd.is_return else 0
        old = self.fs.find_event(cmd.group, cmd.event)
        if old is not None:
            self._append(tk, old)
            return
        fields = layout_fields(tk.args, tk.is_return)
        call = self.fs.new_event(cmd.group, cmd.event, fields, set_print_fmt(tk.args, tk.is_return),
                                 make_printer(cmd.event, fields, tk.args, tk.is_return, self.m.symbols),
                                 kind="kretprobe" if tk.is_return else "kprobe")
        tk.call = call
        call.on_enable = lambda on, c=call: self._arm_event(c, on)
        try:
            self._register(tk)
        except TraceProbeError:
            self.fs.remove_event(call)
            raise
        call.probes.append(tk)
        self.probes.append(tk)

    def _append(self, tk: TraceKprobe, call: TraceEventCall) -> None:
        """append_trace_kprobe: same kind, same argument names and types, not the same probe."""
        if call.kind not in ("kprobe", "kretprobe"):
            raise TraceProbeError("EVENT_EXIST", 0, 0, errno.EEXIST)
        first = call.probes[0]
        if first.is_return != tk.is_return:
            raise TraceProbeError("DIFF_PROBE_TYPE", 0, 0, errno.EEXIST)
        diff = compare_arg_type(tk.args, first.args)
        if diff:
            raise TraceProbeError("DIFF_ARG_TYPE", diff + 1, 0, errno.EEXIST)
        if any(p.same_probe(tk) for p in call.probes):
            raise TraceProbeError("SAME_PROBE", 0, 0, errno.EEXIST)
        for a, b in zip(tk.args, first.args):
            a.offset = b.offset
        tk.call, tk.entry_args = call, max(tk.entry_args, first.entry_args)
        self._register(tk)
        call.probes.append(tk)
        self.probes.append(tk)
        if call.active:
            self._arm_probe(tk, True)

    def _register(self, tk: TraceKprobe) -> None:
        """register_trace_kprobe, disabled until the event is enabled; failures are logged
        against the probe point as the kernel maps them. -ENOENT for a module not loaded
        is no failure: the probe waits for it (trace_kprobe_module_callback)."""
        kp = Kprobe(symbol_name=tk.symbol, offset=tk.offset, addr=tk.addr, flags=KPROBE_FLAG_DISABLED)
        if tk.is_return:
            from probes.kretprobes import Kretprobe
            rp = Kretprobe(kp=kp, handler=lambda ri, regs, t=tk: self.kretprobe_dispatcher(t, ri, regs),
                           maxactive=tk.maxactive, data_size=8 * tk.entry_args)
            if tk.entry_args:
                rp.entry_handler = lambda ri, regs, t=tk: self._save_entry_args(t, ri, regs)
            tk.rp = rp
        else:
            kp.pre_handler = lambda p, regs, t=tk: self.kprobe_dispatcher(t, p, regs)
            tk.kp = kp
        try:
            self._register_probe(tk)
        except KprobeError as e:
            # "This probe might be able to register after target module is loaded" (only
            # for a symbol: a raw address is -ENOENT here where the kernel says -EINVAL)
            if e.errno == errno.ENOENT and tk.symbol is not None \
                    and not trace_kprobe_module_exist(self.m, tk.symbol):
                return
            code = {errno.EILSEQ: "BAD_INSN_BNDRY", errno.ENOENT: "BAD_PROBE_ADDR"}.get(e.errno, "FAIL_REG_PROBE")
            raise TraceProbeError(code, 1, 0, e.errno) from None

    def _register_probe(self, tk: TraceKprobe) -> None:
        """__register_trace_kprobe: the core's register_kprobe / register_kretprobe."""
        if tk.rp is not None:
            from probes.kretprobes import Kretprobe, kretprobes_of
            assert isinstance(tk.rp, Kretprobe)
            if not tk.entry_args:
                self._native_fetch(tk, tk.rp)
            kretprobes_of(self.m).register_kretprobe(tk.rp)
        else:
            assert tk.kp is not None
            self._native_fetch(tk, tk.kp)
            kprobes_of(self.m).register_kprobe(tk.kp)

    def trace_kprobe_module_callback(self, mod_name: str) -> list[str]:
        """MODULE_STATE_COMING: every event on the module's `MOD:SYM` is registered again,
        armed if its event is enabled: one that waited for the module, or one left GONE when
        it went (its text is new). Returns the kernel's warnings for those that fail."""
        warnings = []
        for tk in self.probes:
            if not trace_kprobe_within_module(tk, mod_name):
                continue
            self._unregister(tk)               # __unregister_trace_kprobe
            p = tk.probe
            p.addr = None                      # found again by symbol
            on = tk.call is not None and tk.call.active
            p.flags = p.flags & ~KPROBE_FLAG_DISABLED if on else p.flags | KPROBE_FLAG_DISABLED
            try:
                self._register_probe(tk)
            except KprobeError as e:
                warnings.append(f"Failed to re-register probe {tk.event} on {mod_name}: "
                                f"{-e.errno}")
        return warnings

    def _unregister(self, tk: TraceKprobe) -> None:
        if tk.rp is not None:
            from probes.kretprobes import kretprobes_of
            kretprobes_of(self.m).unregister_kretprobe(tk.rp)
        elif tk.kp is not None:
            kprobes_of(self.m).unregister_kprobe(tk.kp)

    def delete(self, group: str | None, event: str) -> int:
        """`-:[GRP/]EVENT`: 0, -ENOENT (no such kprobe event) or -EBUSY (enabled)."""
        call = next((tk.call for tk in self.probes
                     if tk.event == event and (group is None or tk.group == group)), None)
        if call is None:
            return -errno.ENOENT
        if call.active:
            return -errno.EBUSY
        self._settle()
        for tk in list(call.probes):
            self._unregister(tk)
            self.probes.remove(tk)
            self._native_events.pop(id(tk), None)
        call.probes.clear()
        self.fs.remove_event(call)
        return 0

    def release_all(self) -> int:
        """O_TRUNC: delete every kprobe event, or none (-EBUSY) if one is in use."""
        calls = list(dict.fromkeys(tk.call for tk in self.probes))
        if any(c.active for c in calls):
            return -errno.EBUSY
        for c in calls:
            self.delete(c.system, c.name)
        return 0

    # --- enable -----------------------------------------------------------------------------
    def _arm_event(self, call: TraceEventCall, on: bool) -> None:
        for tk in call.probes:
            self._arm_probe(tk, on)

    def _arm_probe(self, tk: TraceKprobe, on: bool) -> None:
        kps = kprobes_of(self.m)
        p = tk.probe
        try:
            (kps.enable_kprobe if on else kps.disable_kprobe)(p)
        except KprobeError:
            # Not registered yet (an IFUNC the guest has not resolved): its DISABLED flag
            # decides whether the registration arms it.
            p.flags = p.flags & ~KPROBE_FLAG_DISABLED if on else p.flags | KPROBE_FLAG_DISABLED

    # --- dispatchers ------------------------------------------------------------------------
    def _fetch_context(self, entry_args=None) -> FetchContext:
        # One context reused by every hit (a hit never nests inside another's fetch).
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = FetchContext(self.m.memory, self.m.symbols, self.m.arch)
        ctx.comm, ctx.entry_args = self.m.task[0], entry_args
        return ctx

    def kprobe_dispatcher(self, tk: TraceKprobe, kp: Kprobe, regs: "PtRegs") -> int:
        """kprobe_dispatcher: count, run the event's BPF programs (their AND decides
        whether the event is recorded), record; 1 if a program moved ip (skip the step)."""
        tk.nhit += 1
        call = tk.call
        assert call is not None              # set when the event is created
        record, ret = call.enabled, 0
        if call.prog_array:
            from probes.trace.bpf_trace import trace_call_bpf
            if not trace_call_bpf(call, regs):
                record = False
            if regs.ip_changed():
                ret = 1
        if record and not trace_trigger_soft_disabled(call):
            head = pack_header(call.id, HIT_FLAGS, HIT_PREEMPT_COUNT, self.m.task[1]) + _Q.pack(kp.addr)
            data = store_trace_args(tk, regs, self._fetch_context(), head) if tk.args else head
            self._commit(call, data, regs, True)
        return ret

    def _native_fetch(self, tk: TraceKprobe, kp: object) -> None:
        """Give the C hit path the event's fetch program (on its Kprobe, or its Kretprobe):
        C builds the record's fields and strings and commits them when it may
        (kn_trace_commit), else `native_record` / kretprobe_dispatcher does (identical
        bytes)."""
        if kprobes_of(self.m).native is None:
            return
        call = tk.call
        assert call is not None              # set when the event is created
        fixed_end = call.fields[-1].offset + call.fields[-1].size if call.fields else 8
        prog = compile_fetch_program(tk.args, self.m.arch, fixed_end, tk.is_return)
        if prog is None:
            return
        kp.__dict__["native_tprog"] = (ctypes.c_uint64 * len(prog))(*prog)
        if not tk.is_return:
            kp.__dict__["native_trace"] = lambda p, regs, body, t=tk: self.native_record(t, p, regs, body)
        native = kprobes_of(self.m).native
        assert native is not None
        if native.trace_state(self._revalidate) is not None:
            tev = self._native_events.get(id(tk))
            if tev is None:
                tev = self._native_events[id(tk)] = (tk, KnTevent())
            kp.__dict__["native_tev"] = tev[1]

    # --- records committed in C (probes/native kn_trace_commit) ------------------------------
    def _revalidate(self, ts: KnTstate) -> None:
        """C asks, after Python ran: may it commit each event's records, and into what?
        Only when the ring buffer is the record's one consumer, as kprobe_dispatcher and
        Tracefs.commit would leave it: enabled, no BPF program, no trigger, not
        soft-disabled, no on_commit subscriber, a filter C evaluates or none, and a clock
        whose time C can read (no cycle model's pending block). A streaming reader (the
        CLI's trace_pipe) is no subscriber: C wakes it at the buffer's mark."""
        self._settle()
        m, fs, clock = self.m, self.fs, self.m.clock
        ts.pid, ts.cpu, ts.freq_hz = m.task[1], m.cpu, clock.freq_hz
        self._synced = (m.task[1], m.task[0], ts.committed)
        buf = fs.buffer
        if self._settle not in buf.before_read:
            buf.before_read.append(self._settle)
        rbs = self._rbs.get(id(buf))
        if rbs is None or rbs[0] is not buf:
            arr = (ctypes.c_void_p * len(buf.cpus))(*(ctypes.addressof(b.rb) for b in buf.cpus))
            rbs = self._rbs[id(buf)] = (buf, arr)
        model: Any = m.layers.get("cycles")
        ts.cm_cur = model.cur_address() if model is not None and clock.pending is not None else None
        base = ((clock.pending is None or ts.cm_cur) and clock.on_first_read is None
                and clock.freq_hz > 0 and not fs.on_commit and 0 <= m.cpu < len(buf.cpus))
        for tk, ev in self._native_events.values():
            call = tk.call
            assert call is not None
            flt, trig = call.filter, call.trigger_state
            prog = flt.native() if flt is not None else None
            ev.ok = int(base and call.enabled and not call.prog_array and not call.soft_disabled
                        and (trig is None or not (trig.cond or trig.trigger_mode))
                        and (flt is None or prog is not None))
            ev.type, ev.flags, ev.tracing_on = call.id, HIT_FLAGS | HIT_PREEMPT_COUNT << 8, int(fs.tracing_on)
            ev.rbs, ev.nrbs = ctypes.addressof(rbs[1]), len(buf.cpus)
            ev.filter = ctypes.addressof(prog) if prog is not None else None

    def _learn_pending(self, tk: TraceKprobe) -> None:
        """The cycle model's share of the running block after the probed instruction, for C
        to subtract while the same block runs the probe (Clock.now)."""
        native = kprobes_of(self.m).native
        entry = self._native_events.get(id(tk))
        ts = native.tstate if native is not None else None
        if entry is None or ts is None or not ts.cm_cur or not entry[1].ok:
            return
        ev, clock = entry[1], self.m.clock
        cur = ctypes.c_void_p.from_address(ts.cm_cur).value
        model: Any = self.m.layers["cycles"]
        addr, size = model.current_block()
        assert clock.pending is not None
        ev.pend_entry, ev.pend_addr, ev.pend_size = cur or 0, addr, size
        ev.pend_fp, ev.pend_valid = clock.pending(), 1

    def _settle(self) -> None:
        """What C's commits owe Python: the events' hit counts, and the comm of the task
        they recorded (saved_cmdlines, as each commit's `comms[pid] = comm`)."""
        for tk, ev in self._native_events.values():
            if ev.nhit:
                tk.nhit += ev.nhit
                ev.nhit = 0
        native = kprobes_of(self.m).native
        ts = native.tstate if native is not None else None
        if ts is not None and self._synced is not None and ts.committed != self._synced[2]:
            pid, comm, _n = self._synced
            self.fs.comms[pid] = comm
            self._synced = (pid, comm, ts.committed)

    def native_record(self, tk: TraceKprobe, kp: Kprobe, regs: "PtRegs", body: bytes) -> int:
        """kprobe_dispatcher with the record's fields and strings built by C (`body`, its
        first 16 bytes left for the header and probe ip)."""
        call = tk.call
        assert call is not None              # set when the event is created
        if call.prog_array:                    # programs first: Python's whole path
            return self.kprobe_dispatcher(tk, kp, regs)
        tk.nhit += 1
        if call.enabled and not trace_trigger_soft_disabled(call):
            head = pack_header(call.id, HIT_FLAGS, HIT_PREEMPT_COUNT, self.m.task[1]) + _Q.pack(kp.addr)
            self._commit(call, head + body[16:], regs, True)
        if self.m.clock.pending is not None:
            self._learn_pending(tk)
        return 0

    def _commit(self, call: TraceEventCall, data: bytes, regs: "PtRegs", at_entry: bool) -> None:
        fs = self.fs
        fs.hit = (regs, at_entry)          # where a stacktrace trigger unwinds from
        try:
            fs.commit(call, data)
        finally:
            fs.hit = None

    def _save_entry_args(self, tk: TraceKprobe, ri, regs: "PtRegs") -> int:
        ri.data[:] = b"".join(struct.pack("<Q", regs.arg(n)) for n in range(1, tk.entry_args + 1))
        return 0

    def kretprobe_dispatcher(self, tk: TraceKprobe, ri, regs: "PtRegs") -> int:
        tk.nhit += 1
        call = tk.call
        assert call is not None              # set when the event is created
        record = call.enabled
        if call.prog_array:
            from probes.trace.bpf_trace import trace_call_bpf
            if not trace_call_bpf(call, regs):
                record = False
        if record and not trace_trigger_soft_disabled(call):
            entry = struct.unpack(f"<{tk.entry_args}Q", bytes(ri.data[:8 * tk.entry_args])) \
                if tk.entry_args else None
            head = pack_header(call.id, HIT_FLAGS, HIT_PREEMPT_COUNT, self.m.task[1]) + \
                struct.pack("<QQ", tk.probe.addr, ri.ret_addr)
            self._commit(call, store_trace_args(tk, regs, self._fetch_context(entry), head), regs,
                         False)
        if self.m.clock.pending is not None and id(tk) in self._native_events:
            self._learn_pending(tk)
        return 0

    # --- files ------------------------------------------------------------------------------
    def show(self) -> str:
        return "".join(tk.show() + "\n" for tk in self.probes)

    def profile(self) -> str:
        """kprobe_profile: event, hits, misses."""
        self._settle()
        return "".join(f"  {tk.event:<44} {tk.nhit:>15} {tk.nmissed:>15}\n" for tk in self.probes)
