"""Function probe commands, the triggers of function calls (kernel/trace/ftrace.c:
ftrace_process_regex, register_ftrace_function_probe; trace_functions.c: traceon,
traceoff, stacktrace; trace.c: snapshot; trace_events.c: enable_event, disable_event).

Written to `set_ftrace_filter` as `GLOB:COMMAND[:PARAM]` (`!GLOB:COMMAND` removes it):
each is an ftrace_ops on the functions with ftrace sites that GLOB matches, whose callback
runs the command at each call. `traceon`/`traceoff`/`stacktrace`/`snapshot` take an
optional count, kept per function (the kernel's ftrace_func_mapper); `enable_event:SYS:
EVENT[:N]` / `disable_event:…` put EVENT in soft mode while registered and flip its
SOFT_DISABLED bit, their count shared by every function. Reading the file lists the
probes (`func:traceoff:count=2`, `func:enable_event:grp:ev:unlimited`) as the kernel's
probe lines. Left out: plain function filters (the function tracer's --ftrace-filter),
`dump`, `cpudump`, `mod:` globs."""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from probes.ftrace import FtraceOps, ftrace_of
from probes.trace.trace_probe import kstrtoul

if TYPE_CHECKING:
    from probes.regs import PtRegs
    from probes.trace.trace_events import TraceEventCall
    from probes.trace.tracefs import Tracefs

UNLIMITED = -1
COMMANDS = ("traceon", "traceoff", "stacktrace", "snapshot", "enable_event", "disable_event")


@dataclass(eq=False)
class FuncProbe:
    """One registered command: its glob, the functions it took (ip -> remaining count,
    UNLIMITED without one), the event an enable/disable_event command switches."""
    glob: str
    cmd: str
    count: int
    ops: FtraceOps
    counts: dict[int, int] = field(default_factory=dict)
    target: "TraceEventCall | None" = None

    @property
    def enable(self) -> bool:
        return self.cmd == "enable_event"


class FunctionProbes:
    """The function probes of one Tracefs."""

    def __init__(self, fs: "Tracefs") -> None:
        self.fs = fs
        self.probes: list[FuncProbe] = []

    # --- set_ftrace_filter ---------------------------------------------------------------
    def write(self, text: str) -> int:
        """ftrace_regex_write: whitespace-separated `[!]GLOB:COMMAND[:PARAM]`; 0 or -errno
        at the first that fails."""
        for word in text.split():
            ret = self.process(word)
            if ret:
                return ret
        return 0

    def process(self, word: str) -> int:
        """ftrace_process_regex for a command (a plain glob is a filter: not here)."""
        glob, sep, rest = word.partition(":")
        if not sep:
            return -errno.EINVAL
        cmd, _, param = rest.partition(":")
        if cmd not in COMMANDS:
            return -errno.EINVAL
        remove = glob.startswith("!")
        glob = glob[1:] if remove else glob
        if not glob:
            return -errno.EINVAL
        if remove:
            return self.unregister(glob, cmd, param)
        try:
            target, count = self._parse_param(cmd, param)
        except ValueError:
            return -errno.EINVAL
        return self.register(glob, cmd, count, target)

    def _parse_param(self, cmd: str, param: str) -> tuple["TraceEventCall | None", int]:
        target = None
        if cmd in ("enable_event", "disable_event"):       # event_enable_func: SYS:EVENT[:N]
            system, sep, param = param.partition(":")
            event, _, param = param.partition(":")
            target = self.fs.find_event(system, event) if sep and event else None
            if target is None:
                raise ValueError(param)
        number = param.split(":", 1)[0]
        if not number:
            return target, UNLIMITED
        n = kstrtoul(number)
        if n is None:
            raise ValueError(number)
        return target, n

    def register(self, glob: str, cmd: str, count: int,
                 target: "TraceEventCall | None" = None) -> int:
        """register_ftrace_function_probe: -EINVAL when GLOB matches no function."""
        ft = ftrace_of(self.fs.machine)
        probe = FuncProbe(glob, cmd, count, FtraceOps(self._hit, [glob], wants_parent=False),
                          target=target)
        taken = {ip for p in self.probes if p.cmd == cmd and p.target is target
                 for ip in p.counts}
        ips = [a for a, s in ft.sites.items() if probe.ops.wants(s.func) and a not in taken]
        if not ips:
            return -errno.EINVAL
        probe.ops.filters = [ft.sites[a].func for a in ips]
        probe.counts = {ip: count for ip in ips}
        if target is not None:
            target.enable_disable(True, soft=True)        # soft mode while registered
        self.probes.append(probe)
        ft.register_ftrace_function(probe.ops)
        return 0

    def unregister(self, glob: str, cmd: str, param: str) -> int:
        """unregister_ftrace_function_probe_func: every probe of COMMAND on GLOB goes."""
        import fnmatch
        gone = [p for p in self.probes if p.cmd == cmd
                and any(fnmatch.fnmatchcase(f, glob) for f in p.ops.filters)]
        if cmd in ("enable_event", "disable_event") and param:
            system, _, event = param.partition(":")
            gone = [p for p in gone if p.target is not None
                    and (p.target.system, p.target.name) == (system, event.split(":")[0])]
        if not gone:
            return -errno.EINVAL
        ft = ftrace_of(self.fs.machine)
        for p in gone:
            ft.unregister_ftrace_function(p.ops)
            self.probes.remove(p)
            if p.target is not None:
                p.target.enable_disable(False, soft=True)
        return 0

    def show(self) -> str:
        """The probe lines of set_ftrace_filter (t_probe_show: ops->print)."""
        syms = self.fs.machine.symbols
        out = []
        for p in self.probes:
            what = p.cmd
            if p.target is not None:
                what += f":{p.target.system}:{p.target.name}"
            for ip, left in sorted(p.counts.items()):
                sym = syms.find(ip)
                n = p.count if p.target is not None else left
                tail = "unlimited" if n == UNLIMITED else f"count={n}"
                out.append(f"{sym.name if sym else hex(ip)}:{what}:{tail}\n")
        return "".join(out)

    # --- a call ----------------------------------------------------------------------------
    def _hit(self, ip: int, _parent_ip: int, ops: FtraceOps, regs: "PtRegs") -> None:
        probe = next(p for p in self.probes if p.ops is ops)
        fs = self.fs
        fs.hit = (regs, True)              # a stacktrace unwinds from the function's entry
        try:
            _RUN[probe.cmd](self, probe, ip)
        finally:
            fs.hit = None

    def _onoff(self, probe: FuncProbe, ip: int) -> None:
        """ftrace_traceon/off(_count): nothing when tracing is already so, else switch and
        count one down."""
        on = probe.cmd == "traceon"
        left = probe.counts.get(ip, 0)
        if left == 0 or self.fs.tracing_on == on:
            return
        self.fs.tracing_on = on
        if left != UNLIMITED:
            probe.counts[ip] = left - 1

    def _stacktrace(self, probe: FuncProbe, ip: int) -> None:
        """ftrace_stacktrace_count: nothing (and no count used) while tracing is off."""
        left = probe.counts.get(ip, 0)
        if left == 0 or not self.fs.tracing_on:
            return
        if left != UNLIMITED:
            probe.counts[ip] = left - 1
        self.fs.trace_stack()

    def _snapshot(self, probe: FuncProbe, ip: int) -> None:
        left = probe.counts.get(ip, 0)
        if left == 0:
            return
        if left != UNLIMITED:
            probe.counts[ip] = left - 1
        self.fs.tracing_snapshot()

    def _event_enable(self, probe: FuncProbe, _ip: int) -> None:
        """event_enable_count_probe: the count is the command's, not the function's."""
        target = probe.target
        assert target is not None
        if probe.count == 0 or probe.enable == (not target.soft_disabled):
            return
        if probe.count != UNLIMITED:
            probe.count -= 1
        target.soft_disabled = not probe.enable


_RUN: dict[str, Any] = {
    "traceon": FunctionProbes._onoff, "traceoff": FunctionProbes._onoff,
    "stacktrace": FunctionProbes._stacktrace, "snapshot": FunctionProbes._snapshot,
    "enable_event": FunctionProbes._event_enable, "disable_event": FunctionProbes._event_enable,
}


def function_probes_of(fs: "Tracefs") -> FunctionProbes:
    probes = getattr(fs, "_function_probes", None)
    if probes is None:
        probes = fs._function_probes = FunctionProbes(fs)   # type: ignore[attr-defined]
    return probes
