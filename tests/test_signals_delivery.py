"""Signals delivered as Linux delivers them (issue 19): handlers with the arch's
rt_sigframe and rt_sigreturn, masks, raise/kill/tgkill to threads, sigaltstack, alarm,
setitimer and POSIX timers on the modelled clock, and synchronous signals for faults,
each against the native / qemu-user run, on both arches."""
from __future__ import annotations


import pytest

from conftest import ROOT, run_emu, run_reference

DATA = ROOT / "tests" / "data" / "threads"
ARCHES = ["x86_64", "arm64"]


@pytest.fixture(scope="module")
def prog(c_prog):
    return lambda arch, name: c_prog(arch, DATA / f"{name}.c", extra=("-O1", "-pthread"))


SIGNALS_OUT = ("raise: sig=10 code=SI_TKILL fp_kept=1\n"
               "blocked: got=0 pending=1\n"
               "unblocked: got=10 code=SI_USER\n"
               "altstack: sig=12 on_alt=1\n"
               "pthread_kill: got=10 in_main_thread=0\n"
               "alarm+pause: ticks=1\n"
               "setitimer: ticks>=6=1\n"
               "timer_create: got=10 code=SI_TIMER\n")


@pytest.mark.parametrize("arch", ARCHES)
def test_handlers_masks_altstack_threads_timers(prog, arch):
    p = prog(arch, "signals")
    ref = run_reference(arch, [str(p)])
    assert (ref.rc, ref.out) == (0, SIGNALS_OUT)
    r = run_emu("run", "--timeout", "120", str(p))
    assert (r.rc, r.out, r.err) == (0, SIGNALS_OUT, "")


FAULTS_OUT = ("read_unmapped: sig=11 addr=0x1230 code=1\n"
              "write_rodata: sig=11 addr_ok=1 code=2\n"
              "undefined: sig=4\n"
              "breakpoint: sig=5\n"
              "again: sig=11\n")


@pytest.mark.parametrize("arch", ARCHES)
def test_fault_signals_reach_handlers(prog, arch):
    p = prog(arch, "faults")
    ref = run_reference(arch, [str(p)])
    assert (ref.rc, ref.out) == (0, FAULTS_OUT)
    r = run_emu("run", "--timeout", "120", str(p))
    assert (r.rc, r.out, r.err) == (0, FAULTS_OUT, "")


@pytest.mark.parametrize("arch", ARCHES)
def test_fault_without_handler_is_still_reported(prog, arch):
    r = run_emu("run", "--timeout", "120", str(prog(arch, "faults")), "--", "die")
    assert r.rc == 139 and r.out == FAULTS_OUT
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "emu: guest fault: read of unmapped address 0x1230 at pc 0x"), r.err


@pytest.mark.parametrize("arch", ARCHES)
def test_signal_runs_are_deterministic(prog, arch):
    p = prog(arch, "signals")
    a = run_emu("run", "--seed", "3", "--strace", str(p))
    b = run_emu("run", "--seed", "3", "--strace", str(p))
    assert (a.rc, a.out, a.err) == (b.rc, b.out, b.err)
    assert "rt_sigreturn(" in a.err


@pytest.mark.parametrize("name, expected", [("signals", SIGNALS_OUT), ("faults", FAULTS_OUT)])
def test_musl_signals_match_native(c_prog, name, expected):
    """musl's sigaction always sets SA_RESTORER (its __restore_rt); glibc's arm64 build
    leaves the trampoline to the kernel (here the [sigpage])."""
    out = c_prog("x86_64", DATA / f"{name}.c", extra=("-O1", "-pthread"), cc="musl-gcc")
    ref = run_reference("x86_64", [str(out)])
    assert (ref.rc, ref.out) == (0, expected)
    r = run_emu("run", "--timeout", "120", str(out))
    assert (r.rc, r.out, r.err) == (0, expected, "")


@pytest.mark.parametrize("arch", ARCHES)
def test_no_room_for_the_frame_kills_with_sigsegv(prog, arch):
    p = prog(arch, "badstack")
    ref = run_reference(arch, [str(p)])
    assert (ref.rc, ref.out) == (139, "")
    r = run_emu("run", "--timeout", "60", str(p))
    assert (r.rc, r.out) == (139, "")
    assert r.err == ("emu: guest killed by SIGSEGV: cannot write the signal frame for signal "
                     "10 below sp 0x10\n")
