"""The CLI's trace stream as a trace_pipe reader (issue 14): `emu trace` and `emu run
--event` no longer subscribe to every commit, so C commits their kprobe and kretprobe
records; the reader is woken at `buffer_percent` of a CPU's buffer (once per crossing, by
C or by Python's commits), before the guest's output, before other writers of its stream
and at the end of the run. Over runs that fill the buffer many times nothing is lost, and
the bytes are those of a reader woken at every record (`--buffer-percent 0`, what the
stream printed before) and of the Python hit path, on both arches, with and without the
cycle model."""
from __future__ import annotations

import io
import json
import re

import pytest

from conftest import ARCHES, firmware_elf, needs_native
from emu.cli import main
from emu.loader import GuestConfig, load_guest
from probes.kprobes import kprobes_of
from probes.trace import cli as trace_cli
from probes.trace.ring_buffer import record_cost
from probes.trace.tracefs import Tracefs, TracePipeReader, tracefs_of

LEAF = "p:s/leaf hot_leaf x=$arg1:u64"       # demo: hot_call(1000) calls hot_leaf(0..999)
RLEAF = "r:s/rleaf hot_leaf r=$retval:x64"
CALLS = 1000
X = re.compile(r" leaf: \(hot_leaf\+0x0/0x[0-9a-f]+\) x=(\d+)$")
MODES = {                                    # the CLI, with and without the cycle model
    "trace": ["trace"], "trace-no-cycles": ["trace", "--no-cycles"],
    "run": ["run"], "run-cycles": ["run", "--cycles"],
}


_ORIGINALS = (trace_cli.setup_events, Tracefs.commit, TracePipeReader._wake)


class Seen:
    """What one in-process CLI run did: its tracefs, Python's commits, the reader's wakes."""

    def __init__(self, monkeypatch) -> None:
        self.fs: Tracefs | None = None
        self.py_commits = 0
        self.wakes = 0
        self.c_commits = 0
        setup, commit, wake = _ORIGINALS

        def setup_events(m, args):
            self.fs = setup(m, args)
            return self.fs

        def counted_commit(fs, *a, **kw):
            self.py_commits += 1
            return commit(fs, *a, **kw)

        def counted_wake(reader, cpu):
            self.wakes += 1
            return wake(reader, cpu)

        monkeypatch.setattr(trace_cli, "setup_events", setup_events)
        monkeypatch.setattr(Tracefs, "commit", counted_commit)
        monkeypatch.setattr(TracePipeReader, "_wake", counted_wake)

    def take_c_commits(self) -> None:
        """The records C committed (read at once: the hit path is chosen per run)."""
        assert self.fs is not None
        native = kprobes_of(self.fs.machine).native
        ts = native.tstate if native is not None else None
        self.c_commits = ts.committed if ts is not None else 0


def _cli(monkeypatch, argv: list[str], native: bool | None = None, shared: bool = False):
    """(rc, stdout, stderr, Seen); `shared`: stdout and stderr are one stream (2>&1);
    `native` False: the Python hit path (None: as the environment says)."""
    if native is not None:
        monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    seen = Seen(monkeypatch)
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
                for _ in range(2))
    if shared:
        err = out
    rc = main(argv, stdin=io.TextIOWrapper(io.BytesIO(b"")), stdout=out, stderr=err)
    if seen.fs is not None:
        seen.take_c_commits()
    return rc, out.buffer.getvalue().decode(), err.buffer.getvalue().decode(), seen


def _argv(mode: str, arch: str, *extra: str, events=(LEAF,)) -> list[str]:
    ev = [w for e in events for w in ("--event", e)]
    return [*MODES[mode], *extra, *ev, str(firmware_elf(arch, "demo"))]


def _trace_of(mode: str, out: str, err: str) -> str:
    return out if mode.startswith("trace") else err


# --- C commits the CLI's records, the reader loses none ------------------------------------------
@needs_native
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHES)
def test_cli_records_are_committed_by_c_and_none_is_lost(arch, mode, monkeypatch):
    rc, out, err, seen = _cli(monkeypatch, _argv(mode, arch, "--buffer-size-kb", "1"))
    trace = _trace_of(mode, out, err)
    xs = [int(m.group(1)) for line in trace.splitlines() if (m := X.search(line))]
    assert rc == 0 and xs == list(range(CALLS))             # every record, in order
    fs = seen.fs
    assert fs is not None and fs.buffer.lost == 0 and fs.buffer.written == CALLS
    size = fs.buffer.cpus[0].size
    assert CALLS * record_cost(24) > 20 * size       # the 1 KiB buffer filled 20+ times
    # C wrote the records; Python committed at most the cycle model's first hit of a block
    assert seen.c_commits + seen.py_commits == CALLS and seen.c_commits >= CALLS - 2
    # woken once per half buffer (C called Python only then), not per record
    marks = CALLS * record_cost(24) // (size // 2)
    assert marks // 2 <= seen.wakes <= marks + 1


@needs_native
@pytest.mark.parametrize("mode,event", [("trace", LEAF), ("run-cycles", LEAF),
                                        ("trace-no-cycles", RLEAF), ("run", RLEAF)])
@pytest.mark.parametrize("arch", ARCHES)
def test_bytes_equal_a_reader_woken_per_record_and_the_python_path(arch, mode, event,
                                                                  monkeypatch):
    argv = _argv(mode, arch, "--buffer-size-kb", "1", events=(event,))
    batched = _cli(monkeypatch, argv)
    per_record = _cli(monkeypatch, argv[:1] + ["--buffer-percent", "0"] + argv[1:])
    python = _cli(monkeypatch, argv, native=False)
    assert batched[:3] == per_record[:3] == python[:3]
    name = event.split()[0].split("/")[1]
    assert _trace_of(mode, *batched[1:3]).count(f" {name}: (") == CALLS
    assert batched[3].c_commits >= CALLS - 2 and python[3].c_commits == 0
    assert batched[3].wakes < per_record[3].wakes // 10     # per record: 1000 wakes


@pytest.mark.parametrize("arch", ARCHES)
def test_trace_and_guest_output_on_one_stream_interleave_as_they_happened(arch, monkeypatch):
    """2>&1: the guest's output reads the pipe first, so its lines come after the records
    committed before it and before the later ones, whatever the buffer's mark."""
    argv = ["trace", "--buffer-percent", "100", *_argv("trace", arch)[1:]]
    rc, out, _err, _seen = _cli(monkeypatch, argv, shared=True)
    lines = out.splitlines()
    leaf = [i for i, line in enumerate(lines) if X.search(line)]
    assert rc == 0 and len(leaf) == CALLS
    assert lines[leaf[0] - 1].startswith("hot_loop(")      # printed before hot_call ran
    assert lines[leaf[-1] + 1].startswith("hot_call(1000) = ")   # its line, once it returned
    assert leaf == list(range(leaf[0], leaf[0] + CALLS))
    per_record = _cli(monkeypatch, ["trace", "--buffer-percent", "0", *argv[3:]], shared=True)
    assert per_record[1] == out


@pytest.mark.parametrize("arch", ARCHES)
def test_strace_lines_and_events_share_stderr_in_order(arch, monkeypatch):
    argv = ["run", "--strace", "--event", "p:g/open do_sys_open", "--event", LEAF,
            str(firmware_elf(arch, "demo"))]
    rc, _out, err, _seen = _cli(monkeypatch, argv)
    _rc, _o, err0, _s = _cli(monkeypatch, argv[:1] + ["--buffer-percent", "0"] + argv[1:])
    assert rc == 0 and err == err0
    lines = err.splitlines()
    last_leaf = max(i for i, line in enumerate(lines) if X.search(line))
    assert lines[last_leaf + 1].startswith("write(1, ")       # hot_call's result line


# --- the files and options ------------------------------------------------------------------------
def test_buffer_percent_file():
    m = load_guest(GuestConfig(path=str(firmware_elf("x86_64", "demo")))).machine
    fs = tracefs_of(m)
    assert fs.read("buffer_percent") == "50\n"
    for bad in ("101", "-1", "half"):
        assert fs.write("buffer_percent", bad) < 0
    assert fs.write("buffer_percent", "100") == 0 and fs.read("buffer_percent") == "100\n"
    assert fs.write("/sys/kernel/tracing/buffer_percent", "0") == 0 and fs.buffer_percent == 0


@pytest.mark.parametrize("option,value", [("--buffer-percent", "101"), ("--buffer-size-kb", "0")])
def test_bad_buffer_options_exit_2(option, value, monkeypatch):
    rc, out, err, _seen = _cli(monkeypatch, ["trace", option, value, "-e", LEAF,
                                             str(firmware_elf("arm64", "demo"))])
    assert rc == 2 and out == "" and err.startswith(f"emu: {option} {value}: ")
    assert len(err.splitlines()) == 1


def test_wake_once_per_crossing_until_read():
    """RingBuffer.full_hit, the Python twin of C's kn_rb_full_hit: due once when another
    record of the size would pass the mark, not again before the reader has read."""
    from probes.trace.ring_buffer import RingBuffer
    buf, woke = RingBuffer(1, size_kb=1), []
    buf.set_waiter(lambda cpu: woke.append(cpu) or 0, 50)
    data = bytes(28)                                       # cost 32: 16 records to 512 bytes
    for i in range(40):
        buf.write(0, i, data)
        buf.poll_wake(0, len(data))
    assert woke == [0] and buf.cpus[0].used == 1024        # once, then never again unread
    assert len(buf.consume_all()) == 32 and buf.cpus[0].read == 32
    buf.rearm()
    for i in range(16):
        buf.write(0, i, data)
        buf.poll_wake(0, len(data))
    assert woke == [0, 0]                                  # at the 16th record: 480 + 32 > 512


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_default_buffer_filled_several_times(arch, monkeypatch):
    """The default 1408 KiB buffer, 200,000 records of a hot function: four buffers' worth."""
    n = 200_000
    rc, out, _err, seen = _cli(monkeypatch, ["trace", "--event", LEAF,
                                             str(firmware_elf(arch, "hotloop")), "--", "10", str(n)])
    xs = [int(m.group(1)) for line in out.splitlines() if (m := X.search(line))]
    assert rc == 0 and xs == list(range(n))
    fs = seen.fs
    assert fs is not None and fs.buffer.lost == 0 and n * 28 > 3 * fs.buffer.cpus[0].size
    # Python commits a record when the ring's bytes run out (it grows them: 4 KiB doubling
    # to the budget) and the cycle model's first hit of a block
    assert seen.c_commits + seen.py_commits == n and seen.py_commits <= 20
    assert 6 <= seen.wakes <= 9, seen.wakes                # n * 28 / (704 KiB)


@needs_native
@pytest.mark.parametrize("arch", ARCHES)
def test_run_stats_report_nothing_lost(arch, monkeypatch, tmp_path):
    stats, trace = tmp_path / "s.json", tmp_path / "t.txt"
    rc, _out, _err, seen = _cli(monkeypatch, ["run", "--buffer-size-kb", "1", "--event", LEAF,
                                              "--trace-out", str(trace), "--stats", str(stats),
                                              str(firmware_elf(arch, "demo"))])
    data = json.loads(stats.read_text())
    assert rc == 0 and data["trace_lost"] == 0
    assert data["trace_events"] == {"s/leaf": {"hits": CALLS, "misses": 0}}
    assert len(trace.read_text().splitlines()) == CALLS and seen.c_commits >= CALLS - 2
