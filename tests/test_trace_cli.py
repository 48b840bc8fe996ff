"""`emu trace` and `emu run --event`: the trace on stdout as trace_pipe prints it (the
guest's output on stderr or --guest-output), the guest's exit code, refused commands as
error_log's lines with exit 2, byte-identical reruns, time that advances with guest work,
JSON; on firmware and on a static glibc program compiled here (both arches)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from emu.elf import load_elf

from conftest import ARCHES, firmware_elf, run_emu

DATA = Path(__file__).parent / "data" / "trace"
OPEN = "p:grp/open do_sys_open dfd=$arg1:s32 name=+0($arg2):string"
OPENR = "r:grp/openr do_sys_open ret=$retval:s32"
PREFIX = re.compile(r"^ {8}demo\.elf-1000    \[000\] d\.\.\.\. +(\d+\.\d{6}): ")


@pytest.fixture(scope="session")
def score_elf(c_prog):
    return lambda arch: c_prog(arch, DATA / "score.c")


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.slow
def test_trace_firmware_stdout_is_the_trace(arch):
    path = str(firmware_elf(arch, "demo"))
    r = run_emu("trace", path, "--event", OPEN, "--event", OPENR)
    assert r.rc == 0
    lines = r.out.splitlines()
    assert len(lines) == 32 and all(PREFIX.match(x) for x in lines)
    size = next(s.size for s in load_elf(path).symbols if s.name == "do_sys_open")
    assert lines[0].endswith(f'open: (do_sys_open+0x0/{size:#x}) dfd=-100 name="/etc/passwd"')
    assert re.search(r"openr: \(sys_open\+0x[0-9a-f]+/0x[0-9a-f]+ <- do_sys_open\) ret=3$", lines[1])
    assert "== callpath ==" in r.err and "== callpath ==" not in r.out   # guest output on stderr
    again = run_emu("trace", path, "--event", OPEN, "--event", OPENR)
    assert again.stdout == r.stdout                                      # byte-identical


@pytest.mark.parametrize("arch", ARCHES)
def test_time_advances_with_guest_work(arch):
    path = str(firmware_elf(arch, "demo"))
    ev = ["--event", "p:t/a hotloop_run", "--event", "r:t/b hotloop_run"]
    ts = lambda out: [float(PREFIX.match(x).group(1)) for x in out.splitlines()]
    cycles = ts(run_emu("trace", path, *ev).out)
    fixed = ts(run_emu("trace", "--no-cycles", path, *ev).out)
    # hotloop_run runs ~10^5 instructions: modelled cycles see tens of microseconds pass,
    # without the cycle model the work clock (a cycle per 4 bytes of each block) moves too.
    assert cycles[1] - cycles[0] > 10e-6 and fixed[1] - fixed[0] > 10e-6


@pytest.mark.parametrize("arch", ARCHES)
def test_trace_errors_exit_2_with_caret(arch):
    path = str(firmware_elf(arch, "demo"))
    r = run_emu("trace", path, "--event", "p:grp/open do_sys_open x=$arg1:u33")
    assert r.rc == 2 and r.out == ""
    assert r.err.splitlines() == [
        "emu: trace_kprobe: error: Unknown type is specified",
        "  Command: p:grp/open do_sys_open x=$arg1:u33",
        " " * (11 + len("p:grp/open do_sys_open x=$arg1:")) + "^"]
    r = run_emu("trace", path, "--event", OPEN, "--filter", "grp/open", "name < 3")
    assert r.rc == 2 and r.err.startswith("emu: event filter parse error: error: Illegal operation")
    r = run_emu("trace", path, "--event", OPEN, "--filter", "nope", "dfd == 1")
    assert r.rc == 2 and "no event 'nope'" in r.err and "Traceback" not in r.err
    r = run_emu("trace", path + ".missing", "--event", OPEN)
    assert r.rc == 2 and "Traceback" not in r.err


@pytest.mark.parametrize("arch", ARCHES)
def test_trace_json_filter_and_guest_output(arch, tmp_path):
    path = str(firmware_elf(arch, "demo"))
    gout = tmp_path / "guest.txt"
    r = run_emu("trace", "--json", "--guest-output", str(gout), path, "--event", OPEN,
                "--filter", "open", 'name ~ "/dev/*"')
    assert r.rc == 0 and "== callpath ==" in gout.read_text() and "callpath" not in r.err
    recs = [json.loads(x) for x in r.out.splitlines()]
    assert [x["fields"]["name"] for x in recs] == ["/dev/null"] * 3
    assert all(x["event"] == "grp/open" and x["fields"]["dfd"] == -100 for x in recs)


@pytest.mark.parametrize("arch", ARCHES)
def test_run_event_trace_out(arch, tmp_path):
    path = str(firmware_elf(arch, "demo"))
    out, stats = tmp_path / "trace.txt", tmp_path / "s.json"
    r = run_emu("run", "--event", OPENR, "--trace-out", str(out), "--stats", str(stats), path)
    assert r.rc == 0 and "== callpath ==" in r.out
    lines = out.read_text().splitlines()
    assert len(lines) == 16 and lines[0].endswith("<- do_sys_open) ret=3")
    assert json.loads(stats.read_text())["trace_events"] == {"grp/openr": {"hits": 16, "misses": 0}}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.slow
def test_trace_glibc_program(arch, score_elf):
    exe = str(score_elf(arch))
    ev = ("p:s/score score name=+0(+0($arg1)):string w=+8($arg1):s32 fl=+12($arg1):x16 "
          "bonus=$arg2:s32 tot=@total:s64")
    r = run_emu("trace", exe, "--event", ev, "--event", "r:s/scorer score ret=$retval:s64 w=+8($arg1):s32")
    assert r.rc == 13                                   # the guest's exit code
    assert r.err == "alpha 36\nbeta -65\ngamma 426\n"
    size = next(s.size for s in load_elf(exe).symbols if s.name == "score")
    comm = Path(exe).name[:15]
    head = rf"^ *{re.escape(comm)}-\d+ +\[000\] d\.\.\.\. +\d+\.\d{{6}}: "
    want = [
        (f"score: (score+0x0/{size:#x}) name=\"alpha\" w=3 fl=0x1 bonus=1 tot=0", None),
        ("scorer: (main+0x", "<- score) ret=36 w=3"),
        (f"score: (score+0x0/{size:#x}) name=\"beta\" w=-7 fl=0x12 bonus=1 tot=36", None),
        ("scorer: (main+0x", "<- score) ret=-65 w=-7"),
        (f"score: (score+0x0/{size:#x}) name=\"gamma\" w=42 fl=0x300 bonus=1 tot=-29", None),
        ("scorer: (main+0x", "<- score) ret=426 w=42"),
    ]
    lines = r.out.splitlines()
    assert len(lines) == len(want)
    for line, (start, end) in zip(lines, want):
        m = re.match(head, line)
        assert m, line
        body = line[m.end():]
        assert body == start if end is None else (body.startswith(start) and body.endswith(end)), line


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.slow
def test_trace_bare_metal_idle_task(arch):
    r = run_emu("trace", "--bare", str(firmware_elf(arch, "demo.bare")), "--event",
                "r:t/rd vfs_read ret=$retval:s64")
    lines = r.out.splitlines()
    assert r.rc == 0 and len(lines) == 7
    assert all(re.match(r"^ {10}<idle>-0 {7}\[000\] d\.\.\.\. ", x) for x in lines)   # pid 0


@pytest.mark.parametrize("arch", ARCHES)
def test_function_tracer_and_events_share_the_buffer(arch, tmp_path):
    """The function tracer is one more producer: its lines and the kprobe events' come out
    of one ring buffer in time order."""
    out = tmp_path / "t.txt"
    r = run_emu("run", "--ftrace-filter", "is_*", "--event", "p:t/fib fib n=$arg1:u32",
                "--trace-out", str(out), str(firmware_elf(arch, "recurse.ftrace")))
    assert r.rc == 0
    lines = out.read_text().splitlines()
    kinds = {("fn" if " <-" in x else "ev") for x in lines}
    assert kinds == {"fn", "ev"}
    stamps = [float(x.split("] ")[1].split()[1].rstrip(":")) for x in lines]
    assert stamps == sorted(stamps)
    assert any(x.endswith(": is_even <-recurse_main") for x in lines)
    assert any(re.search(r"fib: \(fib\+0x0/0x[0-9a-f]+\) n=\d+$", x) for x in lines)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.slow
def test_trace_guest_fault_and_limit(arch, glibc_prog):
    r = run_emu("trace", str(glibc_prog(arch, "crash")), "--event", "p:t/poke poke_wild p=$arg1")
    assert r.rc == 139 and re.search(r"\] d\.\.\.\. +\d+\.\d{6}: poke: \(poke_wild\+0x0/0x[0-9a-f]+\) "
                                     r"p=0xdead0000$", r.out)
    assert r.err.count("emu: guest fault:") == 1 and "Traceback" not in r.err
    r = run_emu("trace", "--max-insns", "20000", str(firmware_elf(arch, "hotloop")), "--event",
                "p:t/loop hot_loop")
    assert r.rc == 124 and "Traceback" not in r.err and r.out.count("loop: (hot_loop+0x0/") == 1


def test_option_providers_extend_emu_trace(monkeypatch, capsys):
    """The place other layers (BPF: --bpf, --dump-maps) plug into `emu trace`."""
    from emu.cli import main
    from probes.trace import cli as trace_cli

    seen = []

    class Provider:
        def add_options(self, p):
            p.add_argument("--shout", action="store_true")

        def setup(self, machine, tracefs, args):
            seen.append(("setup", args.shout, sorted(tracefs.events)))

        def finish(self, machine, tracefs, args, out):
            out.write(f"finished after {tracefs.buffer.written} records\n")

    monkeypatch.setattr(trace_cli, "TRACE_OPTION_PROVIDERS", [Provider()])
    rc = main(["trace", "--shout", str(firmware_elf("x86_64", "demo")), "--event", OPENR])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and seen == [("setup", True, ["grp/openr"])]
    assert len(out) == 17 and out[-1] == "finished after 16 records"
