"""Trace events on guest tracepoints: `--event tp:GRP/NAME`, the format file, the
events/GRP/NAME/enable files driving the static key, filters, triggers and hist."""
from __future__ import annotations

import pytest

from conftest import firmware_elf, run_emu
from probes.testing import ProbeLab
from probes.trace.trace_tracepoint import render, tracepoint_events_of
from probes.trace.tracefs import tracefs_of
from probes.tracepoint import tracepoints_of


def _trace(arch: str, *opts: str, n: int = 6):
    return run_emu("trace", str(firmware_elf(arch, "tpdemo")), *opts, "--", str(n))


def _texts(out: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in out.splitlines() if ": tp_" in line]


def test_cli_tp_event_prints_the_arguments(arch):
    r = _trace(arch, "--event", "tp:tpdemo/tp_work", "--event", "tp:tp_done")
    assert r.rc == 0, r.err
    want = [f"tp_work: i={i} v={3 * i - 7}" for i in range(6)]
    assert _texts(r.out) == want + [f"tp_done: n=6 sum={sum(3 * i - 7 for i in range(6))}"]
    assert "tpdemo n=6 sum=3\n" in r.err                    # the guest's own output
    again = _trace(arch, "--event", "tp:tpdemo/tp_work", "--event", "tp:tp_done")
    assert again.out == r.out                                # deterministic


def test_unknown_tracepoint_is_a_usage_error(arch):
    r = _trace(arch, "--event", "tp:tpdemo/nope")
    assert r.rc == 2 and "no such tracepoint" in r.err and "tpdemo/tp_work" in r.err
    assert "Traceback" not in r.err


def test_filter_and_hist_on_a_tracepoint_event(arch):
    r = _trace(arch, "--event", "tp:tpdemo/tp_work", "--filter", "tp_work", "i >= 4",
               "--trigger", "tpdemo/tp_work", "hist:keys=i:vals=v:sort=i", n=8)
    assert r.rc == 0, r.err
    assert _texts(r.out) == [f"tp_work: i={i} v={3 * i - 7}" for i in (4, 5, 6, 7)]
    rows = [line for line in r.out.splitlines() if line.startswith("{ i:")]
    # the hist trigger sees every hit (the filter decides what is recorded)
    assert [int(x.split("}")[0].split(":")[1]) for x in rows] == list(range(8))
    assert all("hitcount:          1" in x for x in rows)
    assert "    Hits: 8" in r.out and "    Entries: 8" in r.out


def test_traceoff_and_soft_enabled_event(arch):
    # tp_done starts soft-disabled and is enabled by tp_work's trigger at i == 2;
    # traceoff at i == 4 stops the recording, so only tp_work 0..4 and nothing after.
    r = _trace(arch, "--event", "tp:tpdemo/tp_work", "--event", "tp:tpdemo/tp_done",
               "--trigger", "tpdemo/tp_work", "enable_event:tpdemo:tp_done:1 if i == 2",
               "--trigger", "tpdemo/tp_work", "traceoff if i == 4")
    assert r.rc == 0, r.err
    assert _texts(r.out) == [f"tp_work: i={i} v={3 * i - 7}" for i in range(5)]
    r = _trace(arch, "--event", "tp:tpdemo/tp_work", "--event", "tp:tpdemo/tp_done",
               "--trigger", "tpdemo/tp_work", "enable_event:tpdemo:tp_done:1 if i == 2")
    assert _texts(r.out)[-1].startswith("tp_done: n=6")
    r = _trace(arch, "--event", "tp:tpdemo/tp_work", "--event", "tp:tpdemo/tp_done",
               "--trigger", "tpdemo/tp_work", "enable_event:tpdemo:tp_done:1 if i == 99")
    assert not any(t.startswith("tp_done") for t in _texts(r.out))


def test_format_file_and_enable_files_drive_the_key(arch):
    lab = ProbeLab.load(str(firmware_elf(arch, "tpdemo")), argv=["3"])
    fs = tracefs_of(lab.machine)
    tracepoint_events_of(fs)
    fmt = fs.read("events/tpdemo/tp_work/format")
    assert "name: tp_work\n" in fmt
    assert "\tfield:int i;\toffset:8;\tsize:4;\tsigned:1;" in fmt
    assert "\tfield:long v;\toffset:16;\tsize:8;\tsigned:1;" in fmt
    assert fmt.endswith('print fmt: "i=%d v=%ld", REC->i, REC->v\n')
    key = tracepoints_of(lab.machine).lookup("tp_work").key
    assert fs.read("events/tpdemo/tp_work/enable") == "0\n" and key.enabled == 0
    assert fs.write("events/tpdemo/enable", "1") == 0           # the whole group
    assert key.enabled == 1 and fs.read("events/tpdemo/tp_done/enable") == "1\n"
    assert fs.write("events/tpdemo/tp_done/enable", "0") == 0
    lab.run()
    assert _texts(fs.read_pipe()) == ["tp_work: i=0 v=-7", "tp_work: i=1 v=-4",
                                      "tp_work: i=2 v=-1"]        # tp_done was disabled
    assert fs.write("events/tpdemo/tp_work/enable", "0") == 0 and key.enabled == 0


def test_render_follows_printf():
    assert render("a=%d b=%lu c=%lx %%", [-1, 2, 255], lambda a, n: b"") == "a=-1 b=2 c=ff %"
    assert render("s=%s", [0x1000], lambda a, n: b"hey") == "s=hey"


def test_tracefs_lists_the_events_at_creation(arch):
    lab = ProbeLab.load(str(firmware_elf(arch, "tpdemo")))
    fs = tracefs_of(lab.machine)                      # nothing asked for tracepoints
    assert fs.read("events/tpdemo/tp_done/enable") == "0\n"
    assert "name: tp_done\n" in fs.read("events/tpdemo/tp_done/format")
    assert fs.write("events/tpdemo/tp_done/enable", "1") == 0
    lab.run()
    assert _texts(fs.read_pipe()) == ["tp_done: n=16 sum=248"]


def test_a_jump_table_naming_data_is_refused(arch, tmp_path):
    import shutil
    import subprocess

    from conftest import CROSS_CC, ROOT
    cc = shutil.which(CROSS_CC[arch])
    if cc is None:
        pytest.skip(f"{CROSS_CC[arch]} not installed")
    exe = tmp_path / "bad_table"
    proc = subprocess.run([cc, "-O2", "-static", "-I", str(ROOT / "firmware" / "include"), "-o",
                           str(exe), str(ROOT / "tests" / "data" / "tracepoint" / "bad_table.c")],
                          capture_output=True, text=True)
    if proc.returncode and ("cannot find -lc" in proc.stderr or "crt1.o" in proc.stderr):
        pytest.skip(f"no static C library for {arch}")
    assert proc.returncode == 0, proc.stderr
    assert run_emu("run", str(exe)).rc == 0           # the table is only read when asked
    r = run_emu("trace", str(exe), "--event", "tp:kemu/ok")
    assert r.rc == 2 and "not in executable text" in r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    r = run_emu("trace", str(exe), "--event", "p:g/m main")   # kprobe events still work
    assert r.rc == 0 and "m: (main+0x0" in r.out


def test_stacktrace_trigger_names_the_tracepoint_caller(arch):
    r = _trace(arch, "--event", "tp:tp_done", "--trigger", "tp_done", "stacktrace", n=2)
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith("<stack trace>"))
    # the iterator, then the function whose trace_tp_done() branched to it
    assert lines[at + 1:at + 3] == [" => __traceiter_tp_done", " => work_loop"]


def test_emu_run_event_and_stats(arch, tmp_path):
    import json
    out, stats = tmp_path / "trace.txt", tmp_path / "stats.json"
    r = run_emu("run", "--event", "tp:tp_work", "--trace-out", str(out), "--stats", str(stats),
                str(firmware_elf(arch, "tpdemo")), "5")
    assert r.rc == 0 and r.out == "tpdemo n=5 sum=18446744073709551611\n"
    assert _texts(out.read_text()) == [f"tp_work: i={i} v={3 * i - 7}" for i in range(5)]
    assert json.loads(stats.read_text())["trace_events"] == {
        "tpdemo/tp_work": {"hits": 5, "misses": 0}}
