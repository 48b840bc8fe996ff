"""A tracefs per machine (/sys/kernel/tracing): `write(path, text)` returns 0 or -errno as
the kernel's file operations do, `read(path)` returns the file's text.

Files: kprobe_events, dynamic_events, events/enable, events/GRP/enable,
events/GRP/EVENT/{enable,filter,format,id}, trace, trace_pipe, kprobe_profile, error_log,
tracing_on, buffer_size_kb, buffer_percent, options/overwrite. `write(..., append=False)` is
`>` (O_TRUNC: kprobe_events deletes every event first, trace clears the buffer), `append=True`
is `>>`. Producers (kprobe events, the function tracer, bpf_trace_printk) commit records
through `commit` (or C commits them); `on_commit` callbacks see each record Python commits
(a subscriber sends every record through Python). Reading an empty trace_pipe returns ""
where the kernel's would block.

The CLI's stream (`stream_to`) is a trace_pipe reader, as `cat trace_pipe` is: never called
per record, it is woken and drains in batches -- when a commit takes a CPU's buffer to
`buffer_percent` (C calls it once then, no Python per record), before the guest writes
output and before anything else writes to the stream (so the lines interleave as records
and output happened), before the live buffer is swapped or resized, and when a run ends."""
from __future__ import annotations

import errno
import struct
from collections import deque
from typing import IO, Any, Callable

from emu.machine import Machine
from probes.trace.ring_buffer import TRACE_FLAG_IRQS_OFF, RingBuffer, RingBufferRecord
from probes.trace.trace_events import FtraceEventField, TraceEventCall, pack_header
from probes.trace.trace_output import TRACE_HEADER, print_line, record_json
from probes.trace.trace_probe import TraceProbeError

ERROR_LOG_MAX = 8
BUFFER_PERCENT = 50                # tr->buffer_percent's default: wake a reader at half full
TRACE_FN = 1                       # the function tracer's entry type (kernel/trace/trace.h)
TRACE_STACK = 4                    # a kernel stack (struct stack_entry: size, caller[])
FTRACE_STACK_ENTRIES = 8           # callers a stacktrace trigger records, innermost first
SNAPSHOT_FREED = """\
# tracer: nop
#
#
# * Snapshot is freed *
#
# Snapshot commands:
# echo 0 > snapshot : Clears and frees snapshot buffer
# echo 1 > snapshot : Allocates snapshot buffer, if not already allocated.
#                      Takes a snapshot of the main buffer.
# echo 2 > snapshot : Clears snapshot buffer (but does not allocate or free)
#                      (Doesn't have to be '2' works with any number that
#                       is not a '0' or '1')
"""
FIRST_DYNAMIC_EVENT_ID = 2000      # after the static events; any fixed choice keeps runs alike
PREFIX = "/sys/kernel/tracing/"


class Tracefs:
    """Attributes: `machine`, `buffer` (RingBuffer), `events` ("GRP/EVENT" -> call),
    `kprobes` (TraceKprobeEvents), `error_log` (last 8 entries), `tracing_on`,
    `comms` (pid -> comm, saved_cmdlines), `on_commit` (callbacks after each record
    Python commits), `buffer_percent` (a waiting reader's mark)."""

    def __init__(self, machine: Machine, nr_cpus: int | None = None) -> None:
        from probes.trace.trace_kprobe import TraceKprobeEvents
        self.machine = machine
        # Start the work clock now (it starts at its first read): a timestamp must not
        # depend on whether a filter let an earlier event read the clock.
        machine.clock.now()
        self.buffer = RingBuffer(machine.nr_cpus if nr_cpus is None else nr_cpus)
        self.events: dict[str, TraceEventCall] = {}
        self.kprobes = TraceKprobeEvents(self)
        self.error_log: deque[str] = deque(maxlen=ERROR_LOG_MAX)
        self.tracing_on = True
        self.comms: dict[int, str] = {}
        self.on_commit: list[Callable[[TraceEventCall, RingBufferRecord], None]] = []
        self._next_id = FIRST_DYNAMIC_EVENT_ID
        self._by_id: dict[int, TraceEventCall] = {}
        self._streamer: TracePipeReader | None = None
        self.buffer_percent = BUFFER_PERCENT
        from probes.trace.trace_events_trigger import TriggerCommands
        self.trigger_commands = TriggerCommands(self)
        self.snapshot_buffer: RingBuffer | None = None
        # the hit being recorded (a dispatcher sets it): where a stacktrace trigger unwinds
        self.hit: tuple[object, bool] | None = None
        from probes.trace.trace_tracepoint import add_tracepoint_events
        add_tracepoint_events(self)        # events/<TRACE_SYSTEM>/<name>, as at boot

    # --- events -----------------------------------------------------------------------------
    def new_event(self, system: str, name: str, fields, print_fmt: str, printer,
                  kind: str = "kprobe", event_id: int | None = None) -> TraceEventCall:
        if event_id is None:
            event_id, self._next_id = self._next_id, self._next_id + 1
        call = TraceEventCall(system, name, event_id, fields, print_fmt, printer, kind)
        self.events[call.full_name] = call
        self._by_id[event_id] = call
        return call

    def remove_event(self, call: TraceEventCall) -> None:
        self.events.pop(call.full_name, None)
        self._by_id.pop(call.id, None)

    def find_event(self, system: str, name: str) -> TraceEventCall | None:
        return self.events.get(f"{system}/{name}")

    def event_by_id(self, event_id: int) -> TraceEventCall | None:
        return self._by_id.get(event_id)

    # --- producers --------------------------------------------------------------------------
    def commit(self, call: TraceEventCall, data: bytes, cpu: int | None = None) -> bool:
        """trace_event_buffer_commit (event_trigger_unlock_commit): a TRIGGER_COND event's
        triggers see the record first; a soft-disabled event or the filter discards it; it
        goes into the CPU's buffer stamped with the machine clock; post triggers run last."""
        comm, pid = self.machine.task
        if cpu is None:
            cpu = self.machine.cpu          # the CPU the event happens on
        ts_state = call.trigger_state
        tt = None
        if ts_state is not None and ts_state.cond:
            from probes.trace.trace_events_trigger import event_triggers_call
            tt = event_triggers_call(call, data, comm, cpu)
        ok = self._write(call, data, cpu, comm, pid)
        if tt:
            from probes.trace.trace_events_trigger import event_triggers_post_call
            event_triggers_post_call(call, tt)
        return ok

    def _write(self, call: TraceEventCall, data: bytes, cpu: int, comm: str, pid: int) -> bool:
        if not self.tracing_on or call.soft_disabled:
            return False
        if call.filter is not None and not call.filter.match(data, comm, cpu):
            return False
        self.comms[pid] = comm
        ts = self.machine.clock.monotonic_ns()
        buf = self.buffer
        if not buf.write(cpu, ts, data):
            return False
        if self.on_commit:
            rec = buf.cpus[cpu].entries[-1]
            for fn in list(self.on_commit):
                fn(call, rec)
        buf.poll_wake(cpu, len(data))
        return True

    # --- snapshot and stack traces (the snapshot and stacktrace triggers) ---------------------
    def alloc_snapshot(self) -> None:
        """tracing_alloc_snapshot_instance: a second buffer of the same shape."""
        if self.snapshot_buffer is None:
            b = self.buffer
            self.snapshot_buffer = RingBuffer(len(b.cpus), b.size_kb, b.overwrite)

    def tracing_snapshot(self) -> None:
        """update_max_tr: swap the live buffer with the snapshot buffer (a streaming
        reader has read the live one first, and goes on waiting on the new one)."""
        self.alloc_snapshot()
        assert self.snapshot_buffer is not None
        if self._streamer is not None:
            self._streamer.drain()
            self._move_waiter(self.buffer, self.snapshot_buffer)
        self.buffer, self.snapshot_buffer = self.snapshot_buffer, self.buffer

    def _move_waiter(self, old: RingBuffer, new: RingBuffer) -> None:
        wake, old_pct = old.waiter, old._wake_percent
        old.set_waiter(None)
        new.set_waiter(wake, old_pct)

    def _write_snapshot(self, text: str) -> int:
        """echo 0 (free), 1 (allocate and take a snapshot), other numbers (clear)."""
        try:
            v = int(text.strip())
        except ValueError:
            return -errno.EINVAL
        if v == 0:
            self.snapshot_buffer = None
        elif v == 1:
            self.tracing_snapshot()
        elif self.snapshot_buffer is not None:
            self.snapshot_buffer.reset()
        return 0

    def _read_snapshot(self) -> str:
        snap = self.snapshot_buffer
        if snap is None:
            return SNAPSHOT_FREED
        head = TRACE_HEADER.format(tracer="nop", entries=snap.entries, written=snap.written,
                                   ncpu=len(snap.cpus))
        return head + "".join(self.format_record(r) + "\n" for r in snap.records())

    def trace_stack(self) -> bool:
        """__trace_stack: a TRACE_STACK record of the guest's stack at the hit being
        recorded (a frame-pointer walk from the probed address)."""
        from probes.trace.bpf_trace import perf_callchain
        from probes.regs import PtRegs
        regs, at_entry = self.hit if self.hit is not None else (PtRegs(self.machine), False)
        ips = perf_callchain(self.machine, regs, at_entry, FTRACE_STACK_ENTRIES)  # type: ignore[arg-type]
        call = self._stack_event()
        data = pack_header(TRACE_STACK, TRACE_FLAG_IRQS_OFF, 0, self.machine.task[1]) + \
            struct.pack(f"<I{len(ips)}Q", len(ips), *ips)
        comm, pid = self.machine.task
        return self._write(call, data, 0, comm, pid)

    def _stack_event(self) -> TraceEventCall:
        call = self._by_id.get(TRACE_STACK)
        if call is None:
            syms = self.machine.symbols

            def name(ip: int) -> str:
                s = syms.find(ip)
                return s.name if s else f"0x{ip:x}"

            def printer(rec) -> str:
                (n,) = struct.unpack_from("<I", rec.data, 8)
                ips = struct.unpack_from(f"<{n}Q", rec.data, 12)
                return "<stack trace>" + "".join(f"\n => {name(ip)}" for ip in ips)

            fields = [FtraceEventField("size", "int", 8, 4, True),
                      FtraceEventField("caller", "unsigned long", 12, 8 * FTRACE_STACK_ENTRIES,
                                       False, FTRACE_STACK_ENTRIES)]
            call = self.new_event("ftrace", "kernel_stack", fields, '"\\t=> %ps\\n"', printer,
                                  kind="stack", event_id=TRACE_STACK)
            call.enabled = True
        return call

    def trace_function(self, ip: int, parent_ip: int) -> bool:
        """The function tracer's record (struct ftrace_entry: ip, parent_ip), TRACE_FN."""
        call = self._function_event()
        return self.commit(call, pack_header(TRACE_FN, 0, 0, self.machine.task[1]) +
                           struct.pack("<QQ", ip, parent_ip))

    def _function_event(self) -> TraceEventCall:
        call = self._by_id.get(TRACE_FN)
        if call is None:
            syms = self.machine.symbols

            def name(addr: int) -> str:
                s = syms.find(addr)
                return s.name if s else hex(addr)

            def printer(rec) -> str:
                ip, parent = struct.unpack_from("<QQ", rec.data, 8)
                return f"{name(ip)} <-{name(parent)}"

            fields = [FtraceEventField("ip", "unsigned long", 8, 8, False),
                      FtraceEventField("parent_ip", "unsigned long", 16, 8, False)]
            call = self.new_event("ftrace", "function", fields,
                                  '" %ps <-- %ps", (void *)REC->ip, (void *)REC->parent_ip',
                                  printer, kind="function", event_id=TRACE_FN)
            call.enabled = True
        return call

    def trace_bpf_printk(self, text: str) -> bool:
        """A bpf_trace_printk message as the bpf_trace:bpf_trace_printk event records it
        (a __data_loc string); its line reads `bpf_trace_printk: <text>`. The BPF layer's
        printk sink."""
        call = self._printk_event()
        msg = text[:-1] if text.endswith("\n") else text
        raw = msg.encode("latin-1", "replace")[:0xFFFE] + b"\0"
        head = pack_header(call.id, TRACE_FLAG_IRQS_OFF, 0, self.machine.task[1])
        return self.commit(call, head + struct.pack("<I", len(raw) << 16 | 12) + raw)

    def _printk_event(self) -> TraceEventCall:
        call = self.find_event("bpf_trace", "bpf_trace_printk")
        if call is None:
            field = FtraceEventField("bpf_string", "__data_loc char[]", 8, 4, True, 0, True, True)

            def printer(rec) -> str:
                v = field.value(rec.data)
                return "bpf_trace_printk: " + (v or b"").decode("latin-1")

            call = self.new_event("bpf_trace", "bpf_trace_printk", [field], '"%s", __get_str(bpf_string)',
                                  printer, kind="tracepoint")
            call.enabled = True            # bpf_trace_printk enables its event when used
        return call

    def stream_to(self, out: IO[str], as_json: bool = False) -> "TracePipeReader":
        """Print the records to `out` as `cat trace_pipe` would, read in batches (the
        module's docstring says when). One reader per tracefs: a second call returns the
        first. Whatever else writes to `out` while the guest runs goes through the
        reader's `stream`."""
        if self._streamer is None:
            self._streamer = TracePipeReader(self, out, as_json)
        return self._streamer

    @property
    def streaming(self) -> bool:
        return self._streamer is not None

    @property
    def reader(self) -> "TracePipeReader | None":
        return self._streamer

    def flush_stream(self) -> None:
        """Drain what is left into the reader's output and flush it."""
        if self._streamer is not None:
            self._streamer.drain()
            self._streamer.out.flush()

    # --- reading records ----------------------------------------------------------------------
    def format_record(self, rec: RingBufferRecord, as_json: bool = False) -> str:
        call = self._by_id.get(rec.type)
        pid = rec.header[3]
        comm = "<idle>" if pid == 0 else self.comms.get(pid, "<...>")   # trace_find_cmdline
        if call is None:
            return f"{comm}: Unknown type {rec.type}"
        return record_json(call, rec, comm) if as_json else print_line(call, rec, comm)

    def read_pipe(self, as_json: bool = False) -> str:
        """Everything in trace_pipe, consumed."""
        fmt = self.format_record
        return "".join(fmt(rec, as_json) + "\n" for rec in self.buffer.consume_all())

    def _read_trace(self) -> str:
        b = self.buffer
        head = TRACE_HEADER.format(tracer="nop", entries=b.entries, written=b.written,
                                   ncpu=len(b.cpus))
        return head + "".join(self.format_record(r) + "\n" for r in b.records())

    # --- the file interface ---------------------------------------------------------------------
    def write(self, path: str, text: str, append: bool = False) -> int:
        path = _norm(path)
        if path in ("kprobe_events", "dynamic_events"):
            if not append:
                ret = self.kprobes.release_all()
                if ret:
                    return ret
            return self._run_commands(text)
        if path.startswith("events/"):
            return self._write_events(path[len("events/"):], text, append)
        if path == "snapshot":
            return self._write_snapshot(text)
        if path == "set_ftrace_filter":                 # function probe commands
            from probes.trace.trace_functions import function_probes_of
            return function_probes_of(self).write(text)
        writer = {"trace": self._clear_trace, "error_log": self._clear_error_log,
                  "tracing_on": self._set_tracing_on, "buffer_size_kb": self._set_size,
                  "buffer_percent": self._set_buffer_percent,
                  "options/overwrite": self._set_overwrite}.get(path)
        return writer(text) if writer is not None else -errno.ENOENT

    def _clear_trace(self, _text: str) -> int:
        if self._streamer is not None:
            self._streamer.drain()       # the reader keeps up: it has what was there
        self.buffer.reset()
        return 0

    def _clear_error_log(self, _text: str) -> int:
        self.error_log.clear()
        return 0

    def _set_tracing_on(self, text: str) -> int:
        v = _bool(text)
        if v is None:
            return -errno.EINVAL
        self.tracing_on = v
        return 0

    def _set_overwrite(self, text: str) -> int:
        v = _bool(text)
        if v is None:
            return -errno.EINVAL
        self.buffer.overwrite = v
        return 0

    def _set_size(self, text: str) -> int:
        try:
            kb = int(text.strip())
        except ValueError:
            return -errno.EINVAL
        if kb <= 0:
            return -errno.EINVAL
        if self._streamer is not None:
            self._streamer.drain()       # a smaller budget would evict what it has not read
        self.buffer.resize(kb)
        return 0

    def _set_buffer_percent(self, text: str) -> int:
        """buffer_percent_write: 0 (wake at any data) to 100 (wake when full)."""
        try:
            v = int(text.strip())
        except ValueError:
            return -errno.EINVAL
        if not 0 <= v <= 100:
            return -errno.EINVAL
        self.buffer_percent = v
        if self._streamer is not None:
            self.buffer.set_waiter(self.buffer.waiter, v)
        return 0

    def read(self, path: str) -> str:
        path = _norm(path)
        simple = {
            "kprobe_events": self.kprobes.show, "dynamic_events": self.kprobes.show,
            "kprobe_profile": self.kprobes.profile, "trace": self._read_trace,
            "trace_pipe": self.read_pipe, "error_log": lambda: "".join(self.error_log),
            "tracing_on": lambda: f"{int(self.tracing_on)}\n", "snapshot": self._read_snapshot,
            "buffer_size_kb": lambda: f"{self.buffer.size_kb}\n",
            "buffer_percent": lambda: f"{self.buffer_percent}\n",
            "options/overwrite": lambda: f"{int(self.buffer.overwrite)}\n",
        }
        if path == "set_ftrace_filter":
            from probes.trace.trace_functions import function_probes_of
            return function_probes_of(self).show()
        if path in simple:
            return simple[path]()
        if path.startswith("events/"):
            return self._read_events(path[len("events/"):])
        raise FileNotFoundError(path)

    def _run_commands(self, text: str) -> int:
        """trace_parse_run_command: one command per line, '#' starts a comment."""
        for line in text.split("\n"):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            ret = self.run_command(line)
            if ret:
                return ret
        return 0

    def run_command(self, line: str) -> int:
        argv = line.split()
        if argv[0].startswith("-"):
            if not argv[0].startswith("-:"):
                return -errno.EINVAL
            group, _, event = argv[0][2:].rpartition("/")
            return self.kprobes.delete(group or None, event)
        if argv[0][0] not in "pr" or len(argv) < 2 or ("/" in argv[1] and ":" in argv[1]):
            return -errno.EINVAL        # -ECANCELED (not a kprobe command): nothing logged
        try:
            self.kprobes.create(argv)
        except TraceProbeError as e:
            e.place(argv)
            self.log_error(e.log_lines())
            return -e.errno
        return 0

    def log_error(self, lines: tuple[str, ...]) -> None:
        ns = self.machine.clock.monotonic_ns()
        stamp = f"[{ns // 1_000_000_000:5d}.{ns // 1000 % 1_000_000:06d}] "
        self.error_log.append(stamp + "\n".join(lines) + "\n")

    # --- events/ ------------------------------------------------------------------------------
    def _calls(self, system: str | None) -> list[TraceEventCall]:
        return [c for c in self.events.values() if system is None or c.system == system]

    def _write_events(self, rest: str, text: str, append: bool = False) -> int:
        parts = rest.split("/")
        if parts == ["enable"] or (len(parts) == 2 and parts[1] == "enable"):
            v = _bool(text)
            calls = self._calls(None if len(parts) == 1 else parts[0])
            if v is None:
                return -errno.EINVAL
            if not calls:
                return -errno.ENOENT
            for c in calls:
                c.set_enabled(v)
            return 0
        if len(parts) != 3:
            return -errno.ENOENT
        call = self.find_event(parts[0], parts[1])
        if call is None:
            return -errno.ENOENT
        if parts[2] == "enable":
            v = _bool(text)
            if v is None:
                return -errno.EINVAL
            call.set_enabled(v)
            return 0
        if parts[2] == "filter":
            return self._set_filter(call, text)
        if parts[2] == "trigger":
            from probes.trace.trace_events_trigger import event_trigger_write
            return event_trigger_write(self, call, text, append)
        return -errno.EACCES

    def _set_filter(self, call: TraceEventCall, text: str) -> int:
        from probes.trace.trace_events_filter import FilterError, create_filter
        text = text.strip()
        if text in ("", "0"):
            call.filter, call.filter_text = None, "none"
            return 0
        try:
            call.filter = create_filter(call, text)
        except FilterError as e:
            call.filter_text = e.file_text(text)
            self.log_error((f"event filter parse error: error: {e.message}",
                            f"  Command: {text}", " " * (11 + e.pos) + "^"))
            return -errno.EINVAL
        call.filter_text = text
        return 0

    def _read_events(self, rest: str) -> str:
        parts = rest.split("/")
        if parts == ["enable"] or (len(parts) == 2 and parts[1] == "enable"):
            states = {c.enabled for c in self._calls(None if len(parts) == 1 else parts[0])}
            return "X\n" if len(states) > 1 else f"{int(states.pop()) if states else 0}\n"
        if len(parts) == 3:
            call = self.find_event(parts[0], parts[1])
            if call is not None:
                from probes.trace.trace_events_hist import hist_show
                from probes.trace.trace_events_trigger import trigger_show
                files = {"enable": call.enable_text, "id": lambda: f"{call.id}\n",
                         "format": call.format, "filter": lambda: call.filter_text + "\n",
                         "trigger": lambda: trigger_show(call), "hist": lambda: hist_show(call)}
                if parts[2] in files:
                    return files[parts[2]]()
        raise FileNotFoundError("events/" + rest)


def _norm(path: str) -> str:
    return path[len(PREFIX):] if path.startswith(PREFIX) else path.lstrip("/")


def _bool(text: str) -> bool | None:
    t = text.strip()
    return {"0": False, "1": True}.get(t)


def tracefs_of(machine: Machine) -> Tracefs:
    return machine.layer("tracefs", Tracefs)


# --- the CLI's trace_pipe reader ------------------------------------------------------------------
class TracePipeReader:
    """`cat trace_pipe` into `out` (text or, `as_json`, one JSON object a line), woken rather
    than called per record: by the buffer's mark (RingBuffer.set_waiter, buffer_percent),
    by `stream` writes (its other writers), by the guest's output, by a swap, and at the
    end of each run. Drains inside a run that fail stop the run with the error (the hook
    convention: re-raised after emu_start) and end the streaming."""

    def __init__(self, fs: Tracefs, out: IO[str], as_json: bool = False) -> None:
        self.fs, self.out, self.as_json = fs, out, as_json
        self.m = fs.machine
        self.failed = False
        self.stream: IO[str] = DrainFirst(out, self)     # type: ignore[assignment]
        self._wake_entry = self._wake                     # one object: C holds its address
        fs.buffer.set_waiter(self._wake_entry, fs.buffer_percent)
        self.m.stop_listeners.append(self._run_ended)
        drain_before_guest_output(self.m, self)

    def drain(self) -> None:
        """Print what the pipe holds (the reader woke)."""
        if self.failed:
            return
        buf = self.fs.buffer
        if buf.pending():
            text = self.fs.read_pipe(self.as_json)
            buf.rearm()
            try:
                self.out.write(text)
            except BaseException:
                self.failed = True
                raise
        else:
            buf.rearm()

    def drain_in_run(self) -> None:
        """drain() from inside a hook or a guest's syscall: an error stops the run."""
        if not self.m.running:
            self.drain()
            return
        try:
            self.drain()
        except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
            self.m.hooks.fail(exc)

    def _wake(self, _cpu: int) -> int:
        """The waiter C and Python commits call at the mark."""
        self.drain_in_run()
        return 0

    def _run_ended(self) -> None:
        if not self.m.running:           # the outer run, not a handler's nested one
            self.drain()


class DrainFirst:
    """A stream whose writes read the trace pipe first: the reader's output for its other
    writers, and the guest's output streams. Everything else is the wrapped stream's."""

    def __init__(self, inner: Any, reader: TracePipeReader) -> None:
        self.inner, self.reader = inner, reader

    def write(self, data: Any) -> int:
        self.reader.drain_in_run()
        return self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def drain_before_guest_output(m: Machine, reader: TracePipeReader) -> None:
    """Wrap the guest's output streams (the machine's stdout/stderr and the open files
    over them) so that each write of the guest reads the pipe first."""
    wrapped: dict[int, DrainFirst] = {}

    def wrap(stream: Any) -> Any:
        if stream is None or isinstance(stream, DrainFirst):
            return stream
        if id(stream) not in wrapped:
            wrapped[id(stream)] = DrainFirst(stream, reader)
        return wrapped[id(stream)]

    originals = {id(m.stdout), id(m.stderr)}
    proc = getattr(m.syscall_handler, "proc", None)
    if proc is not None:
        for f in proc.fds.files.values():
            if f.kind == "stream" and id(f.stream) in originals:
                f.stream = wrap(f.stream)
    m.stdout, m.stderr = wrap(m.stdout), wrap(m.stderr)
