"""The function_graph tracer (kernel/trace/fgraph.c, kernel/trace/trace_functions_graph.c).

Entry: an ftrace op on each function's patch site (as the kernel's fgraph ops sit on
ftrace). Return: the entry hijacks the return address through the return-probe layer's
instances and trampoline (rethook), so a kretprobe on the same function chains with it
instead of fighting over the slot. Times come from the modelled clock, so durations are
the same run to run.

The printer follows print_graph_function with the default flags (funcgraph-cpu,
-overhead, -duration on; -abstime, -tail, -retval off; funcgraph-proc as asked): an entry
whose next event on its CPU is its own return (same task, same function) prints as a leaf
`func();` with its duration; other entries print `func() {`, their returns `}` (or
`} /* func */` when the entry was not seen). When the task on a CPU changes between two
lines, verif_pid's context-switch block comes first:

 ------------------------------------------
 1)   prog-1000    =>    prog-1001
 ------------------------------------------
"""
from __future__ import annotations

import fnmatch
import struct
from dataclasses import dataclass, field
from typing import IO, Any

from emu.errors import UsageError
from emu.machine import Machine
from probes.arch.common import RpCheck
from probes.ftrace import FtraceOps, ftrace_of
from probes.kprobes import Kprobe
from probes.kretprobes import Kretprobe, KretprobeInstance, Kretprobes, kretprobes_of
from probes.regs import PtRegs

FTRACE_RETFUNC_DEPTH = 50          # the shadow return stack's depth; deeper calls overrun
TRACE_GRAPH_INDENT = 2
NR_CPUS = 1
_DATA = struct.Struct("<QQI")      # ri.data: func, calltime (ns), depth

# trace_find_mark: the first threshold a duration (ns) strictly exceeds.
MARKS = ((1_000_000_000, "$"), (100_000_000, "@"), (10_000_000, "*"), (1_000_000, "#"),
         (100_000, "!"), (10_000, "+"))


def trace_find_mark(duration: int) -> str:
    return next((mark for limit, mark in MARKS if duration > limit), " ")


def trace_print_graph_duration(duration: int) -> str:
    """µs with 3 decimals, but at most 7 digits in all; ` us `; padded to 8 columns."""
    usecs, nsecs = divmod(duration, 1000)
    text = str(usecs)
    width = len(text)
    if width < 7:
        frac = f"{nsecs:03d}"[:min(5, 8 - width) - 1]
        text += "." + frac
        width += len(frac) + 1
    return text + " us " + " " * max(0, 8 - width)


def print_graph_duration(duration: int | None) -> str:
    """The DURATION column and its bar; None fills it (FLAGS_FILL_FULL)."""
    if duration is None:
        return "              |  "
    return f"{trace_find_mark(duration)} " + trace_print_graph_duration(duration) + "|  "


def print_graph_cpu(cpu: int) -> str:
    return f" {cpu:>{len(str(NR_CPUS - 1))}d}) "


TRACE_GRAPH_PROCINFO_LENGTH = 14
SWITCH_RULE = " ------------------------------------------\n"


def print_graph_proc(comm: str, pid: int) -> str:
    """`comm-pid` centred in 14 columns, comm cut to 7 characters (print_graph_proc)."""
    text = f"{comm[:7]}-{pid}"
    spaces = max(0, TRACE_GRAPH_PROCINFO_LENGTH - len(text))
    return " " * (spaces // 2) + text + " " * (spaces - spaces // 2)


def graph_header(proc: bool = False) -> str:
    """`cat trace`'s header with the default flags, and funcgraph-proc's TASK/PID column
    when `proc` (s_show + __print_graph_headers_flags)."""
    return ("# tracer: function_graph\n#\n"
            "# CPU" + ("  TASK/PID       " if proc else "") + "  DURATION                  FUNCTION CALLS\n"
            "# |  " + ("   |    |        " if proc else "") + "   |   |                     |   |   |   |\n")


@dataclass
class GraphEnt:
    """struct ftrace_graph_ent, with the task that made it (trace_entry's pid, its comm)."""
    func: str
    depth: int
    pid: int = 0
    comm: str = ""


@dataclass
class GraphRet:
    """struct ftrace_graph_ret."""
    func: str
    depth: int
    calltime: int
    rettime: int
    pid: int = 0
    comm: str = ""


@dataclass
class GraphPrinter:
    """print_graph_function for one CPU: holds an entry back until the next event says
    whether it is a leaf (get_return_for_leaf's peek at the ring buffer)."""
    out: IO[str]
    cpu: int = 0
    pending: GraphEnt | None = None
    enter_funcs: dict[int, str] = field(default_factory=dict)
    lines: int = 0
    proc: bool = False                      # funcgraph-proc: the TASK/PID column
    last: tuple[int, str] | None = None     # the task of the last line (verif_pid's last_pid)
    switches: int = 0

    def _line(self, ev: GraphEnt | GraphRet, duration: int | None, depth: int, text: str) -> None:
        self._verif_pid(ev.pid, ev.comm)
        task = print_graph_proc(ev.comm, ev.pid) + " | " if self.proc else ""
        self.out.write(print_graph_cpu(self.cpu) + task + print_graph_duration(duration)
                       + " " * (depth * TRACE_GRAPH_INDENT) + text + "\n")
        self.lines += 1

    def _verif_pid(self, pid: int, comm: str) -> None:
        """The context-switch block when this CPU's lines move to another task."""
        prev, self.last = self.last, (pid, comm)
        if prev is None or prev[0] == pid:
            return
        self.switches += 1
        self.out.write(SWITCH_RULE + print_graph_cpu(self.cpu) + print_graph_proc(prev[1], prev[0])
                       + " => " + print_graph_proc(comm, pid) + "\n" + SWITCH_RULE + "\n")

    def entry(self, ent: GraphEnt) -> None:
        self.flush()
        self.pending = ent

    def ret(self, ret: GraphRet) -> None:
        ent, self.pending = self.pending, None
        if ent is not None and ent.func == ret.func and ent.pid == ret.pid:
            self.enter_funcs.pop(ent.depth, None)              # print_graph_entry_leaf
            self._line(ent, ret.rettime - ret.calltime, ret.depth, f"{ret.func}();")
            return
        if ent is not None:
            self._nested(ent)
        seen = self.enter_funcs.pop(ret.depth, None) == ret.func
        self._line(ret, ret.rettime - ret.calltime, ret.depth,
                   "}" if seen else f"}} /* {ret.func} */")

    def _nested(self, ent: GraphEnt) -> None:                  # print_graph_entry_nested
        self.enter_funcs[ent.depth] = ent.func
        self._line(ent, None, ent.depth, f"{ent.func}() {{")

    def flush(self) -> None:
        """No next event yet (end of the buffer): the entry prints as nested."""
        ent, self.pending = self.pending, None
        if ent is not None:
            self._nested(ent)


class FunctionGraphTracer:
    """current_tracer = function_graph on every function with an ftrace site.
    `graph_filter` is set_graph_function (those functions and what they call);
    `max_depth` is max_graph_depth (0: no limit)."""

    def __init__(self, machine: Machine, out: IO[str], graph_filter: list[str] | None = None,
                 max_depth: int = 0, proc: bool = False) -> None:
        self.m = machine
        self.proc = proc
        self.graph_filter = list(graph_filter or [])
        self.max_depth = max_depth
        self.out = out
        self.printers: dict[int, GraphPrinter] = {}    # per CPU, as the per-CPU buffers
        self.krp: Kretprobes = kretprobes_of(machine)
        self.rp = Kretprobe(kp=Kprobe(symbol_name="function_graph"), handler=self._graph_return,
                            data_size=_DATA.size, maxactive=FTRACE_RETFUNC_DEPTH)
        self.rp.kp.kretprobe = self.rp
        self.rp.free_instances = [KretprobeInstance(self.rp, data=bytearray(_DATA.size))
                                  for _ in range(FTRACE_RETFUNC_DEPTH)]
        self.graph_depths: dict[int, int] = {}  # per task: TRACE_GRAPH_BIT's depth, inside a filtered func
        self._filter_hits: dict[str, bool] = {}
        self.entries = self.returns = self.overrun = 0
        self.ftrace = ftrace_of(machine)
        self._check_filter()
        self.ops = FtraceOps(self._graph_entry, wants_parent=False)
        self.enabled_sites = self.ftrace.register_ftrace_function(self.ops)

    def _check_filter(self) -> None:
        for pattern in self.graph_filter:
            if not any(fnmatch.fnmatchcase(s.func, pattern) for s in self.ftrace.sites.values()):
                raise UsageError(f"--graph-filter {pattern}: no function with an ftrace site "
                                 "matches")

    def stop(self) -> None:
        """unregister_ftrace_graph: no more entries; calls still pending return through
        the trampoline to their callers, unrecorded."""
        self.ftrace.unregister_ftrace_function(self.ops)
        self.rp.handler = None
        self.flush()

    def flush(self) -> None:
        for printer in self.printers.values():
            printer.flush()

    @property
    def printer(self) -> GraphPrinter:
        """This CPU's printer: a leaf is decided by the next event on the same CPU."""
        cpu = self.m.cpu
        printer = self.printers.get(cpu)
        if printer is None:
            printer = self.printers[cpu] = GraphPrinter(self.out, cpu, proc=self.proc)
        return printer

    @property
    def graph_depth(self) -> int | None:
        return self.graph_depths.get(self.m.task[1])

    @graph_depth.setter
    def graph_depth(self, depth: int | None) -> None:
        if depth is None:
            self.graph_depths.pop(self.m.task[1], None)
        else:
            self.graph_depths[self.m.task[1]] = depth

    # --- entry and return -------------------------------------------------------------------
    def _depth(self, sp: int) -> int:
        """curr_ret_depth: our frames still on the stack below this call."""
        alive = self.krp.arch.kretprobe_is_alive
        return sum(1 for ri in self.krp.instances
                   if ri.rp is self.rp and alive(ri, RpCheck.CALL, sp))

    def _ignore(self, func: str, depth: int) -> bool:
        """ftrace_graph_ignore_func: outside set_graph_function, or too deep."""
        if self.max_depth and depth >= self.max_depth:
            return True
        if not self.graph_filter or (self.graph_depth is not None and depth > self.graph_depth):
            return False
        if self._filtered(func):
            self.graph_depth = depth
            return False
        return True

    def _filtered(self, func: str) -> bool:
        """func matches a set_graph_function glob: decided once per function, not per call."""
        hit = self._filter_hits.get(func)
        if hit is None:
            hit = self._filter_hits[func] = any(fnmatch.fnmatchcase(func, p)
                                                 for p in self.graph_filter)
        return hit

    def _graph_entry(self, ip: int, _parent: int, _ops: FtraceOps, regs: PtRegs) -> None:
        func = self.ftrace.sites[ip].func
        depth = self._depth(regs.sp)
        if self.graph_depth is not None and depth <= self.graph_depth:
            self.graph_depth = None                 # that call was left without a return
        if self._ignore(func, depth):
            return
        if not self.rp.free_instances:
            self.overrun += 1                       # ftrace_push_return_trace: -EBUSY
            return
        ri = self.rp.free_instances[-1]
        calltime = self.m.clock.monotonic_ns()
        ri.data[:] = _DATA.pack(ip, calltime, depth)
        self.krp._pre_handler_kretprobe(self.rp.kp, regs)      # the rethook hijack
        if ri in self.rp.free_instances:            # stack unreadable: no hook, no record
            if self.graph_depth == depth:
                self.graph_depth = None
            return
        self.entries += 1
        comm, pid = self.m.task
        self.printer.entry(GraphEnt(func, depth, pid, comm))

    def _graph_return(self, ri: KretprobeInstance, _regs: PtRegs) -> int:
        ip, calltime, depth = _DATA.unpack(ri.data)
        if self.graph_depth == depth:
            self.graph_depth = None                 # ftrace_graph_addr_finish
        self.returns += 1
        site = self.ftrace.sites.get(ip)             # gone with its module: by address
        name = site.func if site else self._name(ip)
        comm, pid = self.m.task
        self.printer.ret(GraphRet(name, depth, calltime, self.m.clock.monotonic_ns(), pid, comm))
        return 0

    def _name(self, addr: int) -> str:
        sym = self.m.symbols.find(addr)
        return sym.name if sym else f"{addr:#x}"

    def stats(self) -> dict[str, Any]:
        return {"sites": self.enabled_sites, "entries": self.entries, "returns": self.returns,
                "overrun": self.overrun,
                "lines": sum(p.lines for p in self.printers.values()),
                "switches": sum(p.switches for p in self.printers.values())}


# --- the CLI: `emu run` and `emu trace` options ------------------------------------------------
def add_options(p) -> None:
    from emu.cli_checks import glob_list, non_negative

    def globs(text: str) -> str:
        glob_list([text])
        return text
    p.add_argument("--function-graph", action="store_true",
                   help="the function_graph tracer on every function with an ftrace site")
    p.add_argument("--graph-filter", action="append", default=[], metavar="GLOB", type=globs,
                   help="set_graph_function: graph only these functions and their callees "
                        "(repeatable or comma-separated; implies --function-graph)")
    p.add_argument("--max-graph-depth", type=non_negative, default=0, metavar="N",
                   help="max_graph_depth: calls nested deeper than N are not graphed (0: no limit)")
    p.add_argument("--funcgraph-proc", action="store_true",
                   help="trace option funcgraph-proc: a TASK/PID (comm-pid) column on every line")


def wanted(args) -> bool:
    return bool(getattr(args, "function_graph", False) or getattr(args, "graph_filter", None)
                or getattr(args, "max_graph_depth", 0) or getattr(args, "funcgraph_proc", False))


class GraphReport:
    """The tracer of `emu run --function-graph`: its lines go to `out` after the header
    `cat trace` prints; its counts go to --stats."""

    def __init__(self, machine: Machine, args, out: IO[str]) -> None:
        if getattr(args, "ftrace_filter", None):
            raise UsageError("--ftrace-filter is the function tracer; one tracer at a time "
                             "(use --graph-filter with --function-graph)")
        filters = [f for spec in getattr(args, "graph_filter", None) or []
                   for f in spec.split(",") if f]
        self.out = out
        proc = bool(getattr(args, "funcgraph_proc", False))
        self.tracer = FunctionGraphTracer(machine, out, filters, getattr(args, "max_graph_depth", 0),
                                          proc)
        if not self.tracer.enabled_sites:
            raise UsageError("--function-graph: the guest has no ftrace site (build with -pg "
                             "-mfentry -mnop-mcount / -fpatchable-function-entry=2)")
        out.write(graph_header(proc))

    def report(self, _out: IO[str]) -> None:
        self.tracer.flush()
        self.out.flush()

    def stats(self) -> dict[str, Any]:
        return {"function_graph": self.tracer.stats()}


class TraceGraphProvider:
    """`emu trace --function-graph`: the graph lines go to stdout with the events."""

    def add_options(self, p) -> None:
        add_options(p)

    def setup(self, machine, tracefs, args) -> None:
        if not wanted(args):
            return
        if getattr(args, "json", False):
            raise UsageError("--function-graph: the graph is text; drop --json")
        args._graph_report = GraphReport(machine, args, args.stdout)

    def finish(self, machine, tracefs, args, out: IO[str]) -> None:
        report = getattr(args, "_graph_report", None)
        if report is not None:
            report.report(out)


def _register_trace_provider() -> None:
    from probes.trace.cli import TRACE_OPTION_PROVIDERS
    if not any(isinstance(p, TraceGraphProvider) for p in TRACE_OPTION_PROVIDERS):
        TRACE_OPTION_PROVIDERS.append(TraceGraphProvider())


_register_trace_provider()
