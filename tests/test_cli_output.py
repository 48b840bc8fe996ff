"""Output errors: an output file that cannot be created or written, a full device, a reader
that goes away (EPIPE). One line on stderr, a non-zero exit (2; 141 for a broken pipe, as a
shell reports SIGPIPE), no traceback and no "Exception ignored" at interpreter shutdown."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, CliResult, firmware_elf
from test_cli import emu_main

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
EPIPE_LINE = "emu: output closed early (broken pipe)\n"


def one_line(r: CliResult, rc: int, line: str) -> None:
    assert "Traceback" not in r.err and "Exception ignored" not in r.err, r.err
    assert (r.rc, r.err) == (rc, line), (r.rc, r.err)


def emu_into(stdout, *argv: str) -> CliResult:
    """The real `emu` with stdout on a given descriptor or file (subprocess: what a shell
    does at exit is part of the test)."""
    p = subprocess.run([sys.executable, "-m", "emu.cli", *argv], stdout=stdout,
                       stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT, timeout=120)
    return CliResult(p.returncode, b"", p.stderr)


def emu_closed_pipe(*argv: str) -> CliResult:
    """stdout is a pipe whose reader has already gone: the first write fails with EPIPE
    (`emu ... | head -0`, without the race)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return emu_into(w, *argv)
    finally:
        os.close(w)


# --- files named by options -----------------------------------------------------------------
def test_stats_missing_directory_refused_before_the_run(arch, tmp_path):
    missing = tmp_path / "no"
    r = emu_main("run", "--stats", str(missing / "s.json"), str(firmware_elf(arch, "hotloop")))
    one_line(r, 2, f"emu: argument --stats: {missing}/s.json: {missing}: no such directory\n")
    assert r.out == ""                              # the guest was not run for nothing


@needs_dev_full
def test_stats_on_a_full_device(arch):
    r = emu_main("run", "--stats", "/dev/full", str(firmware_elf(arch, "hotloop")))
    one_line(r, 2, "emu: --stats /dev/full: No space left on device\n")
    assert "hot_call(100000) = " in r.out           # the run itself happened


def test_stats_still_written(arch, tmp_path):
    out = tmp_path / "s.json"
    r = emu_main("run", "--stats", str(out), str(firmware_elf(arch, "hotloop")))
    assert (r.rc, r.err) == (0, "")
    assert json.loads(out.read_text())["stop_reason"] == "exit"


@needs_dev_full
def test_trace_out_on_a_full_device(arch):
    r = emu_main("run", "--ftrace-filter", "*", "--trace-out", "/dev/full",
                 str(firmware_elf(arch, "recurse.ftrace")))
    one_line(r, 2, "emu: --trace-out /dev/full: No space left on device\n")


def test_trace_out_missing_directory(arch, tmp_path):
    r = emu_main("run", "--ftrace-filter", "fib", "--trace-out", str(tmp_path / "a" / "t"),
                 str(firmware_elf(arch, "recurse.ftrace")))
    one_line(r, 2, f"emu: argument --trace-out: {tmp_path}/a/t: {tmp_path}/a: no such directory\n")
    assert r.out == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_stats_unwritable_directory(arch, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    r = emu_main("run", "--stats", str(ro / "s.json"), str(firmware_elf(arch, "hotloop")))
    one_line(r, 2, f"emu: argument --stats: {ro}/s.json: {ro}: permission denied\n")


# --- stdout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["disasm", "{elf}", "hot_call"],
    ["info", "{elf}"],
    ["run", "{elf}"],                       # the guest's write(1, ...)
    ["run", "--kprobe", "hot_call", "{elf}"],
    ["inspect", "{elf}", "hot_call"],
    ["bpf", "disasm", "--hex", "b7 00 00 00 2a 00 00 00 95 00 00 00 00 00 00 00"],
    ["bpf", "run", "--hex", "b7 00 00 00 2a 00 00 00 95 00 00 00 00 00 00 00"],
], ids=lambda a: " ".join(a[:2]))
@pytest.mark.slow
def test_broken_pipe(arch, argv):
    elf = str(firmware_elf(arch, "hotloop"))
    one_line(emu_closed_pipe(*[a.format(elf=elf) for a in argv]), 141, EPIPE_LINE)


def test_broken_pipe_glibc_guest(arch, glibc_prog):
    r = emu_closed_pipe("run", str(glibc_prog(arch, "hello")))
    assert (r.rc, r.err) == (141, "to stderr\n" + EPIPE_LINE)  # its stdout is flushed at exit


def test_broken_pipe_standalone_bpf():
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run([sys.executable, "-m", "probes.bpf.cli", "disasm", "--hex", "95" + "00" * 7],
                       stdout=w, stderr=subprocess.PIPE, cwd=ROOT, timeout=60)
    os.close(w)
    assert (p.returncode, p.stderr) == (141, b"error: output closed early (broken pipe)\n")


@needs_dev_full
@pytest.mark.parametrize("argv", [["info", "{elf}"], ["disasm", "{elf}", "hot_call"]],
                         ids=lambda a: a[0])
@pytest.mark.slow
def test_stdout_on_a_full_device(arch, argv):
    elf = str(firmware_elf(arch, "hotloop"))
    with open("/dev/full", "wb") as full:
        r = emu_into(full, *[a.format(elf=elf) for a in argv])
    one_line(r, 2, "emu: write error: No space left on device\n")


def test_closed_stderr_is_not_a_crash(arch, tmp_path):
    """Nobody to tell: the exit code alone says it (2 for a missing --stats directory)."""
    p = subprocess.run([sys.executable, "-m", "emu.cli", "run", "--stats",
                        str(tmp_path / "x" / "y"), str(firmware_elf(arch, "hotloop"))],
                       stderr=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, cwd=ROOT, timeout=60,
                       preexec_fn=lambda: os.close(2))
    assert (p.returncode, p.stdout) == (2, b"")


def test_closed_stdout_is_ebadf(arch):
    """`emu run prog >&-`: the guest's writes fail with EBADF as they would natively (the
    firmware guest ignores write errors and exits 0); our own output error is one line."""
    elf = str(firmware_elf(arch, "hotloop"))
    p = subprocess.run([sys.executable, "-m", "emu.cli", "run", elf], stderr=subprocess.PIPE,
                       cwd=ROOT, timeout=60, preexec_fn=lambda: os.close(1))
    assert (p.returncode, p.stderr) == (0, b"")
    p = subprocess.run([sys.executable, "-m", "emu.cli", "info", elf], stderr=subprocess.PIPE,
                       cwd=ROOT, timeout=60, preexec_fn=lambda: os.close(1))
    assert (p.returncode, p.stderr) == (2, b"emu: write error: Bad file descriptor\n")


def test_bench_plot_missing_directory(tmp_path):
    r = emu_main("bench", "--plot", str(tmp_path / "no" / "p.png"))
    one_line(r, 2, f"emu: argument --plot: {tmp_path}/no/p.png: {tmp_path}/no: no such directory\n")


def test_internal_error_is_one_line(monkeypatch, arch):
    """A bug of ours still ends as one line (exit 70) unless --traceback asks for more."""
    import emu.disasm

    def broken(*_a, **_k):
        raise KeyError("oops")
    monkeypatch.setattr(emu.disasm, "disassemble_symbol", broken)
    elf = str(firmware_elf(arch, "hotloop"))
    one_line(emu_main("disasm", elf, "hot_call"), 70,
             "emu: internal error: KeyError: 'oops' (emu --traceback ... shows where)\n")
    r = emu_main("--traceback", "disasm", elf, "hot_call")
    assert r.rc == 70 and "Traceback" in r.err and r.err.endswith("shows where)\n")


def test_no_guest_output_file_left_behind(arch, tmp_path):
    """A refused run creates no output files (the checks do not create them)."""
    out = tmp_path / "s.json"
    r = emu_main("run", "--stats", str(out), "--timeout", "nan", str(firmware_elf(arch, "hotloop")))
    assert r.rc == 2 and not out.exists()


@needs_dev_full
def test_trace_out_full_device_real_process(arch, tmp_path):
    """What is left in the trace file's buffer must not fail again at interpreter exit."""
    r = emu_into(subprocess.DEVNULL, "run", "--ftrace-filter", "fib", "--trace-out", "/dev/full",
                 str(firmware_elf(arch, "recurse.ftrace")))
    one_line(r, 2, "emu: --trace-out /dev/full: No space left on device\n")
