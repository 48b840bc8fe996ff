"""The issue-19 task/signal checklist items no other test shows (tests/data/smp/taskcheck.c),
each against the native / qemu-user run on both arches: set_tid_address, futex WAIT
(EAGAIN, relative, absolute and CLOCK_REALTIME timeouts on the modelled clock), WAKE,
CMP_REQUEUE and REQUEUE, WAKE_OP, a SIGEV_THREAD_ID timer's signal in its thread, SIGFPE
where the CPU traps a division by zero; robust mutexes of a dead thread (EOWNERDEAD);
SIGBUS on a file mapping's page past EOF; vfork refused with one note."""
from __future__ import annotations

import pytest

from conftest import ARCHES, ROOT, run_emu, run_reference

PROG = ROOT / "tests" / "data" / "smp" / "taskcheck.c"
COMMON = ("set_tid_address: returns_tid=1\n"
          "futex_wait: eagain=1 timedout=1 waited>=20ms=1 abs=1 past=1 realtime=1 wake_none=0\n"
          "requeue: moved=3 wake_f2=1 eagain=1 requeue=2 wake_f3=1 joined=3 rets=0\n"
          "wake_op: woke=1 f5=7\n"
          "timer_thread_id: rc=0 handler_in_target=1 code_si_timer=1\n")
# x86 traps an integer division by zero (#DE: SIGFPE, FPE_INTDIV); arm64's sdiv gives 0.
DIVIDE = {"x86_64": "divide: sig=8 code=1\n", "arm64": "divide: sig=0 code=0\n"}
ROBUST = "robust: first=EOWNERDEAD consistent=0 again=0\n"


@pytest.fixture(scope="module")
def prog(c_prog):
    return lambda arch: c_prog(arch, PROG, extra=("-pthread",))


@pytest.mark.parametrize("cpus", ["1", "2"])
@pytest.mark.parametrize("arch", ARCHES)
def test_checklist_matches_the_reference(prog, arch, cpus):
    p = prog(arch)
    want = COMMON + DIVIDE[arch]
    ref = run_reference(arch, [str(p)])
    assert (ref.rc, ref.out) == (0, want)
    r = run_emu("run", "--timeout", "120", "--cpus", cpus, str(p))
    assert (r.rc, r.out, r.err) == (0, want, "")


@pytest.mark.parametrize("arch", ARCHES)
def test_a_robust_mutex_of_a_dead_thread_is_owner_died(prog, arch):
    """FUTEX_OWNER_DIED from the dead thread's robust list (exit_robust_list). Checked
    against native x86-64; qemu-aarch64 7.2 has no set_robust_list and glibc 2.36 no
    longer walks the list itself, so the arm64 reference would wait for ever."""
    p = prog(arch)
    if arch == "x86_64":
        ref = run_reference(arch, [str(p), "robust"])
        assert (ref.rc, ref.out) == (0, ROBUST)
    r = run_emu("run", "--timeout", "60", str(p), "--", "robust")
    assert (r.rc, r.out, r.err) == (0, ROBUST, "")


@pytest.mark.parametrize("arch", ARCHES)
def test_sigbus_on_a_file_mapping_past_eof(prog, arch, tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello")
    p = prog(arch)
    want = "sigbus: first_page=h sig=7 code=2 addr_ok=1\n"
    ref = run_reference(arch, [str(p), "bus", str(small)])
    assert (ref.rc, ref.out) == (0, want)
    r = run_emu("run", "--timeout", "60", "--fs", str(tmp_path), str(p), "--", "bus", str(small))
    assert (r.rc, r.out, r.err) == (0, want, "")


@pytest.mark.parametrize("arch", ARCHES)
def test_vfork_is_refused_with_one_note(prog, arch):
    """glibc's vfork is the vfork syscall on x86-64 and clone(CLONE_VM|CLONE_VFORK) on arm64."""
    r = run_emu("run", "--timeout", "60", str(prog(arch)), "--", "vfork")
    assert (r.rc, r.out) == (0, "vfork: -1 Function not implemented\n")
    note = {"x86_64": "emu: vfork: processes are not supported yet\n",
            "arm64": "emu: clone: new processes (fork, vfork) are not supported yet\n"}
    assert r.err == note[arch]
