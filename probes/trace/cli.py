"""`emu trace`: run a guest with kprobe events and print the trace as `cat trace_pipe`
would, streamed while the guest runs; and the `--event`/`--filter` options of `emu run`
(trace to --trace-out). The guest's own stdout goes to stderr (or --guest-output) so
stdout carries only the trace; the exit code is the guest's.

The stream is a trace_pipe reader woken in batches (tracefs TracePipeReader), so C commits
the records of events nothing else consumes; the lines still come out where they did when
every record was printed as committed: the reader drains before the guest's output, before
any other writer of the trace's stream (graph lines, BPF records: they get `reader.stream`),
at `--buffer-percent` of a CPU's buffer and at the end of the run.

Other layers add `emu trace` options here (the BPF layer's --bpf/--dump-maps): a module
named in PROVIDER_MODULES is imported when the parser is built and appends an object with
`add_options(parser)`, `setup(machine, tracefs, args)` (after the events exist, before the
run) and `finish(machine, tracefs, args, out)` (after the run) to TRACE_OPTION_PROVIDERS.
`emu run` options of every layer are listed in emu/cli.py (run_option_providers)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import IO, Any, Protocol

from emu.cli_streams import binary_of
from emu.errors import UsageError
from emu.machine import StopReason
from probes.trace.tracefs import Tracefs, tracefs_of


class TraceOptionProvider(Protocol):
    def add_options(self, p: argparse.ArgumentParser) -> None: ...
    def setup(self, machine, tracefs: Tracefs, args) -> None: ...
    def finish(self, machine, tracefs: Tracefs, args, out: IO[str]) -> None: ...


TRACE_OPTION_PROVIDERS: list[TraceOptionProvider] = []
PROVIDER_MODULES = ("probes.trace.bpf_cli", "probes.trace.trace_functions_graph")


def _load_providers() -> None:
    import importlib
    for name in PROVIDER_MODULES:       # an ImportError is a bug: it ends the command
        importlib.import_module(name)


class TraceCommandError(UsageError):
    """A refused --event/--filter: the error_log lines (message, command, caret)."""

    error_log = True      # the CLI prints these lines as they are, not folded into one


def _add_event_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-e", "--event", action="append", default=[], metavar="CMD",
                   help="a kprobe_events command, e.g. 'p:grp/ev do_sys_open dfd=$arg1', or "
                        "'tp:GRP/NAME' for a guest tracepoint's event (repeatable)")
    p.add_argument("--filter", action="append", default=[], nargs=2, metavar=("EVENT", "EXPR"),
                   help="an event filter in the kernel's grammar for [GRP/]EVENT (repeatable)")
    p.add_argument("--trigger", action="append", default=[], nargs=2, metavar=("EVENT", "TRIGGER"),
                   help="an event trigger for [GRP/]EVENT, as written to its trigger file: "
                        "traceon, traceoff, snapshot, stacktrace, enable_event:G:E, "
                        "disable_event:G:E, hist:keys=... (repeatable); hist files print at exit")
    p.add_argument("--buffer-size-kb", type=int, metavar="KB",
                   help="buffer_size_kb: each CPU's ring buffer (default 1408)")
    p.add_argument("--buffer-percent", type=int, metavar="P",
                   help="buffer_percent: the streamed trace is read when a CPU's buffer is P %% "
                        "full (0: at every record, 100: when full; default 50), before the "
                        "guest's output and at exit")


def add_subcommand(sub) -> None:
    p = sub.add_parser("trace", help="run a guest with kprobe events; print the trace (trace_pipe)")
    p.add_argument("--arch", default="auto", choices=["auto", "arm64", "x86_64"])
    p.add_argument("--bare", action="store_true", help="bare-metal firmware mode (no OS)")
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    p.add_argument("--guest-output", metavar="FILE", help="the guest's stdout (default: stderr)")
    p.add_argument("--profile", metavar="NAME", help="CPU profile of the cycle model")
    p.add_argument("--no-cycles", action="store_true",
                   help="no cycle model: time advances only by fixed event costs")
    p.add_argument("--max-insns", type=int, default=0, metavar="N")
    p.add_argument("--timeout", type=float, default=0.0, metavar="S")
    p.add_argument("--fs", metavar="DIR", help="grant the guest read access to host files under DIR")
    p.add_argument("--seed", type=int, default=0)
    from emu.linux.cli_options import add_cpus_option
    add_cpus_option(p)
    _add_event_options(p)
    _load_providers()
    for prov in TRACE_OPTION_PROVIDERS:
        prov.add_options(p)
    p.add_argument("file")
    p.add_argument("args", nargs="*", help="guest arguments (after --)")
    p.set_defaults(func=cmd_trace)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """`emu run --event/--filter` and --function-graph: the trace goes to --trace-out
    (default stderr)."""
    from probes.trace import trace_functions_graph as graph
    _add_event_options(p)
    graph.add_options(p)


# --- setting up events ---------------------------------------------------------------------------
def setup_events(machine, args) -> Tracefs:
    """Create and enable each --event (an event some --trigger's enable_event targets stays
    soft-disabled until that trigger fires), set each --filter and --trigger; refusals raise
    TraceCommandError with the lines error_log shows."""
    fs = tracefs_of(machine)
    set_buffer_options(fs, args)
    triggers = getattr(args, "trigger", None) or []
    soft = {t.split(":")[1] + "/" + t.split(":")[2] for _e, t in triggers
            if t.startswith("enable_event:") and t.count(":") >= 2}
    for cmd in getattr(args, "event", None) or []:
        if cmd.startswith("tp:"):               # a guest tracepoint's event
            from probes.trace.trace_tracepoint import tracepoint_event
            tp_call = tracepoint_event(fs, cmd[3:])
            if tp_call.full_name not in soft:
                tp_call.set_enabled(True)
            continue
        before = len(fs.error_log)
        ret = fs.write("kprobe_events", cmd, append=True)
        if ret:
            raise _refusal(fs, before, f"--event {cmd!r}", ret)
        call = fs.kprobes.probes[-1].call
        if call.full_name not in soft:
            call.set_enabled(True)
    for option, files in (("--filter", getattr(args, "filter", None) or []), ("--trigger", triggers)):
        for name, expr in files:
            call = find_event(fs, name, option)
            before = len(fs.error_log)
            ret = fs.write(f"events/{call.full_name}/{option[2:]}", expr, append=True)
            if ret:
                raise _refusal(fs, before, f"{option} {name} {expr!r}", ret)
    return fs


BUFFER_OPTIONS = (("--buffer-size-kb", "buffer_size_kb", "1 or more"),
                  ("--buffer-percent", "buffer_percent", "0 to 100"))


def set_buffer_options(fs: Tracefs, args) -> bool:
    """--buffer-size-kb and --buffer-percent into their files; True if either was given."""
    given = False
    for option, file, valid in BUFFER_OPTIONS:
        value = getattr(args, file, None)
        if value is None:
            continue
        given = True
        if fs.write(file, str(value)):
            raise TraceCommandError(f"{option} {value}: out of range ({valid})")
    return given


def hist_files(fs: Tracefs) -> str:
    """Every event's `hist` file that has content, as `cat events/*/*/hist` shows them."""
    from probes.trace.trace_events_hist import hist_show
    texts = [hist_show(c) for c in fs.events.values()]
    return "\n".join(t for t in texts if t)


def _refusal(fs: Tracefs, before: int, what: str, ret: int) -> TraceCommandError:
    if len(fs.error_log) > before or len(fs.error_log) == fs.error_log.maxlen:
        entry = fs.error_log[-1].rstrip("\n")
        return TraceCommandError(entry.split("] ", 1)[1])
    return TraceCommandError(f"{what}: {os.strerror(-ret)}")


def find_event(fs: Tracefs, name: str, option: str = "--filter"):
    """`GRP/EVENT`, or an EVENT name that is unique."""
    if "/" in name:
        call = fs.events.get(name)
    else:
        found = [c for c in fs.events.values() if c.name == name]
        call = found[0] if len(found) == 1 else None
    if call is None:
        raise TraceCommandError(f"{option}: no event {name!r} (give GRP/EVENT of an --event)")
    return call


# --- emu trace -----------------------------------------------------------------------------------
def cmd_trace(args) -> int:
    from emu.loader import GuestConfig, load_guest

    out, err = args.stdout, args.stderr
    err_bytes = binary_of(err)
    guest_out = open(args.guest_output, "wb") if args.guest_output else err_bytes
    try:
        cfg = GuestConfig(path=args.file, arch=args.arch, bare=args.bare, argv=args.args,
                          fs_root=args.fs, seed=args.seed, cpus=args.cpus)
        stdin = getattr(args, "stdin", None)
        guest = load_guest(cfg, stdout=guest_out, stderr=err_bytes,
                           stdin=getattr(stdin, "buffer", stdin))
        m = guest.machine
        if not args.no_cycles:
            from emu.cycles import enable_cycle_model
            enable_cycle_model(m, args.profile)   # time advances with guest work
        fs = setup_events(m, args)
        # the providers' lines mid-run (graph, BPF records) read the pipe first
        args.stdout = fs.stream_to(out, args.json).stream
        for prov in TRACE_OPTION_PROVIDERS:
            prov.setup(m, fs, args)
        result = m.run(max_insns=args.max_insns, timeout=args.timeout)
        out.write(fs.read_pipe(args.json))
        out.write(hist_files(fs))
        out.flush()
        guest_out.flush()
        for prov in TRACE_OPTION_PROVIDERS:
            prov.finish(m, fs, args, out)
    finally:
        args.stdout = out
        if args.guest_output:
            guest_out.close()
    if result.reason in (StopReason.FAULT, StopReason.LIMIT):
        print(f"emu: {result.message}", file=err)
    return result.exit_code


# --- emu run --event ------------------------------------------------------------------------------
def attach_from_args(session, args) -> None:
    from probes.trace import trace_functions_graph as graph
    m, events = session.machine, None
    if (getattr(args, "event", None) or getattr(args, "filter", None)
            or getattr(args, "trigger", None)):
        events = EventReport(m, setup_events(m, args), args)
    elif any(getattr(args, file, None) is not None for _o, file, _v in BUFFER_OPTIONS):
        set_buffer_options(tracefs_of(m), args)     # the function tracer's buffer
    if graph.wanted(args):           # reports (flushes) before the events close the file
        session.attach(GraphOut(m, args, events))
    if events is not None:
        session.attach(events)


class GraphOut:
    """`emu run --function-graph`: its lines share --trace-out with the events (one open
    file), else go to their own --trace-out, else to stderr."""

    def __init__(self, machine, args, events: "EventReport | None") -> None:
        from probes.trace.trace_functions_graph import GraphReport
        path = getattr(args, "trace_out", None)
        self.own = open(path, "w") if path and events is None else None
        out = self.own or (events.out if events else getattr(args, "stderr", None) or sys.stderr)
        try:
            self.graph = GraphReport(machine, args, out)
        except UsageError:
            if self.own is not None:
                self.own.close()
            raise

    def report(self, out: IO[str]) -> None:
        self.graph.report(out)
        if self.own is not None:
            self.own.close()
            self.own = None

    def stats(self) -> dict[str, Any]:
        return self.graph.stats()


class EventReport:
    """Streams the trace of `emu run --event` to --trace-out (or stderr); the events' hit
    counts in --stats. On stderr, the later layers' stderr (BPF output) reads the pipe
    first (args.stderr becomes the reader's stream)."""

    def __init__(self, machine, fs: Tracefs, args) -> None:
        self.m, self.fs = machine, fs
        path = getattr(args, "trace_out", None)
        self.own = None
        stderr = getattr(args, "stderr", None) or sys.stderr
        self.out: IO[str] = stderr
        if not fs.streaming:
            self.own = open(path, "w") if path else None
            self.out = fs.stream_to(self.own or stderr).stream
        reader = fs.reader
        if reader is not None and reader.out is stderr:
            args.stderr = reader.stream

    def report(self, out: IO[str]) -> None:
        self.fs.flush_stream()
        hist = hist_files(self.fs)
        if hist:
            self.out.write(hist)
            self.out.flush()
        if self.own is not None:
            self.own.close()
            self.own = None

    def stats(self) -> dict[str, Any]:
        events = {}
        for tk in self.fs.kprobes.probes:
            e = events.setdefault(tk.call.full_name, {"hits": 0, "misses": 0})
            e["hits"] += tk.nhit
            e["misses"] += tk.nmissed
        from probes.trace.trace_tracepoint import tracepoint_event_stats
        events.update(tracepoint_event_stats(self.fs))
        return {"trace_events": events, "trace_lost": self.fs.buffer.lost}
