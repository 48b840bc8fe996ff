"""`--timeout` bounds the wall time of the whole `emu run`: loading and probe set-up as well
as the guest's run (exit 124, one line), however the time is spent."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import LINUX_EXIT, ROOT, CliResult
from emu import session as session_mod
from emu.deadline import Deadline, WallClockLimit
from test_cli import emu_main

SPIN = {"arm64": "spin: b spin", "x86_64": "spin: jmp spin"}


@pytest.fixture
def spin_elf(arch, make_tiny):
    return str(make_tiny(arch, [("_start", SPIN[arch])]))


def limit_line(r: CliResult, during: str) -> None:
    assert r.rc == 124, (r.rc, r.err)
    assert "Traceback" not in r.err and len(r.err.splitlines()) == 1, r.err
    assert r.err.startswith("emu: wall-clock limit of ") and during in r.err, r.err


def slow_loader(seconds: float, swallow: bool = False):
    """A load_guest that first spends `seconds` of Python work (a huge symbol table, say);
    with `swallow`, inside an `except Exception` as a parser of hostile input has."""
    real = session_mod.load_guest

    def load(*a, **kw):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                sum(range(1000))
            except Exception:
                if not swallow:
                    raise
        return real(*a, **kw)
    return load


def test_timeout_while_loading(arch, spin_elf, monkeypatch):
    monkeypatch.setattr(session_mod, "load_guest", slow_loader(30, swallow=True))
    t0 = time.monotonic()
    r = emu_main("run", "--timeout", "0.3", spin_elf)
    assert time.monotonic() - t0 < 5
    limit_line(r, f"0.3 s reached while loading {spin_elf}")


@pytest.mark.slow
def test_timeout_counts_loading_time(arch, spin_elf, monkeypatch):
    """0.6 s of loading then a guest that never ends: the run gets what is left of 1.2 s,
    not a fresh 1.2 s."""
    monkeypatch.setattr(session_mod, "load_guest", slow_loader(0.6))
    t0 = time.monotonic()
    r = emu_main("run", "--timeout", "1.2", spin_elf)
    elapsed = time.monotonic() - t0
    limit_line(r, "wall-clock limit of 1.2 s reached at pc")
    assert 1.1 < elapsed < 1.7, elapsed


def test_timeout_of_a_spinning_guest(spin_elf):
    """The real command, start-up included (3 s: on a loaded host start-up alone has taken
    over 0.5 s, and the limit then fired while loading)."""
    # A hang would hit subprocess's own 60 s; a tighter wall-time bound flaked at load 15.
    p = subprocess.run([sys.executable, "-m", "emu.cli", "run", "--timeout", "3", spin_elf],
                       capture_output=True, cwd=ROOT, timeout=60)
    limit_line(CliResult(p.returncode, p.stdout, p.stderr), "reached at pc 0x401000 <_start+0x0>")


def test_no_timeout_is_no_alarm(arch, make_tiny):
    """Without --timeout nothing is armed: a guest that exits is unaffected."""
    import signal
    before = signal.getsignal(signal.SIGALRM)
    r = emu_main("run", str(make_tiny(arch, [("_start", LINUX_EXIT[arch].format(code=4))])))
    assert (r.rc, r.err) == (4, "")
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# --- Deadline itself ---------------------------------------------------------------------------
def test_deadline_interrupts_python_work():
    t0 = time.monotonic()
    with pytest.raises(WallClockLimit, match="limit of 0.2 s reached while spinning") as e:
        with Deadline(0.2).interrupting("spinning"):
            while True:
                try:
                    pass
                except Exception:       # noqa: BLE001 - the point: it must not catch the alarm
                    pass
    assert (e.value.seconds, e.value.during, e.value.exit_code) == (0.2, "spinning", 124)
    assert time.monotonic() - t0 < 2


def test_deadline_restores_the_alarm_and_handler():
    import signal
    before = signal.getsignal(signal.SIGALRM)
    with Deadline(5).interrupting("quick"):
        pass
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_deadline_values():
    assert Deadline(0).at is None and Deadline(0).remaining() == float("inf")
    past = Deadline(10, start=time.monotonic() - 20)
    assert past.at == past.start + 10 and past.remaining() == 0.0
    assert 9 < Deadline(10).remaining() <= 10


READ_STDIN = {  # read(0, sp - 64, 16); exit(42)
    "arm64": "mov x0, #0; sub x1, sp, #64; mov x2, #16; mov x8, #63; svc #0; "
             "mov x0, #42; mov x8, #94; svc #0",
    "x86_64": "mov edi, 0; lea rsi, [rsp - 64]; mov edx, 16; mov eax, 0; syscall; "
              "mov edi, 42; mov eax, 231; syscall",
}


@pytest.mark.slow
def test_timeout_while_the_guest_blocks_in_a_host_read(arch, make_tiny):
    """stdin is a pipe whose writer never writes nor closes: the read blocks in the host."""
    import os
    elf = str(make_tiny(arch, [("_start", READ_STDIN[arch])]))
    r, w = os.pipe()
    try:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "emu.cli", "run", "--timeout", "0.5", elf],
                           stdin=r, capture_output=True, cwd=ROOT, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        os.close(r)
        os.close(w)
    res = CliResult(p.returncode, p.stdout, p.stderr)
    assert res.rc == 124 and "Traceback" not in res.err and len(res.err.splitlines()) == 1, res.err
    assert res.err.startswith("emu: wall-clock limit") and res.err.count("\n") == 1, res.err
    assert elapsed < 10


def test_blocked_read_answered_in_time_is_not_a_limit(arch, make_tiny):
    elf = str(make_tiny(arch, [("_start", READ_STDIN[arch])]))
    r = emu_main("run", "--timeout", "30", elf, stdin=b"data")
    assert (r.rc, r.err) == (42, "")
