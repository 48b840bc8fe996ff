"""Signals meeting blocked calls (issue 19): a pipe read interrupted by a handled signal
runs again with SA_RESTART and fails with EINTR without it, on one CPU and on two; an x86-64
handler installed without SA_RESTORER kills the process with SIGSEGV at delivery, as
x64_setup_rt_frame refuses the frame, while arm64 returns through the vDSO sigtramp. The
output and exit code are the native / qemu-user ones."""
from __future__ import annotations

import pytest

from conftest import ARCHES, ROOT, run_emu, run_reference

SMP = ROOT / "tests" / "data" / "smp"


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("cpus", ["1", "2"])
def test_sa_restart_runs_an_interrupted_pipe_read_again(c_prog, arch, cpus):
    exe = c_prog(arch, SMP / "sarestart.c", extra=("-pthread",))
    for args, want in (([], "handled=1 read=5 hello\n"),
                       (["norestart"], "handled=1 read=-1 EINTR\nthen read=5 hello\n")):
        # The reference runs on host time: under load the signal may come before the read
        # starts (100 ms later), so it gets a second try.
        ref = run_reference(arch, [str(exe), *args])
        if (ref.rc, _text(ref.out)) != (0, want):
            ref = run_reference(arch, [str(exe), *args])
        assert (ref.rc, _text(ref.out)) == (0, want), ref
        r = run_emu("run", "--cpus", cpus, str(exe), "--", *args)
        assert (r.rc, r.out, r.err) == (0, want, "")


@pytest.mark.parametrize("arch", ARCHES)
def test_sa_restart_runs_an_untimed_futex_wait_again(c_prog, arch):
    """futex_wait: -ERESTARTSYS untimed (SA_RESTART runs it again), -ERESTART_RESTARTBLOCK
    with a timeout (EINTR whenever a handler runs)."""
    exe = c_prog(arch, SMP / "sarestart.c", extra=("-pthread",))
    for args, want in ((["futex"], "handled=1 wait=0\n"),
                       (["futex", "norestart"], "handled=1 wait=-1 EINTR\n"),
                       (["futex", "timeout"], "handled=1 wait=-1 EINTR\n")):
        ref = run_reference(arch, [str(exe), *args])
        if (ref.rc, _text(ref.out)) != (0, want):        # host load: a second try
            ref = run_reference(arch, [str(exe), *args])
        assert (ref.rc, _text(ref.out)) == (0, want), ref
        r = run_emu("run", str(exe), "--", *args)
        assert (r.rc, r.out, r.err) == (0, want, "")


def _text(out) -> str:
    return out.decode() if isinstance(out, bytes) else out


@pytest.mark.parametrize("arch", ARCHES)
def test_handler_without_sa_restorer(c_prog, arch):
    exe = c_prog(arch, SMP / "norestorer.c")
    ref = run_reference(arch, [str(exe)])
    r = run_emu("run", str(exe))
    assert (r.rc, r.out) == (ref.rc, _text(ref.out))
    if arch == "x86_64":
        assert (r.rc, r.out) == (139, "installed\n")
        assert r.err == ("emu: guest killed by SIGSEGV: the handler of signal 10 has no "
                         "SA_RESTORER (x86-64 signal frames need one)\n")
    else:
        assert (r.rc, r.out, r.err) == (0, "installed\nhandled=10\n", "")

