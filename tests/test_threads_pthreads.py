"""Threads of a static guest (issue 19): pthread programs compiled here for both arches
(glibc; musl on the host arch) give the native / qemu-user output; spinning threads need
preemption; a deadlock ends as a limit; timeouts run on the modelled clock; kprobes on a
function every thread runs count exactly; the same seed gives byte-identical runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_emu, run_reference

DATA = ROOT / "tests" / "data" / "threads"
ARCHES = ["x86_64", "arm64"]


@pytest.fixture(scope="module")
def thread_prog(c_prog):
    """thread_prog(arch, name, cc=None) -> a static -pthread build of tests/data/threads/<name>.c."""
    return lambda arch, name, cc=None: c_prog(arch, DATA / f"{name}.c", extra=("-pthread",), cc=cc)


def _same_as_reference(arch: str, prog: Path, *args: str) -> None:
    ref = run_reference(arch, [str(prog), *args])
    r = run_emu("run", "--timeout", "120", str(prog), "--", *args)
    assert (r.rc, r.out) == (ref.rc, ref.out), r.err
    assert r.err == ""


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("n", ["2", "4", "8"])
def test_mutex_condvar_atomics_match_reference(thread_prog, arch, n):
    prog = thread_prog(arch, "pthreads")
    _same_as_reference(arch, prog, n)
    r = run_emu("run", str(prog), "--", n)
    assert f"threads={n} counter={int(n) * 2000} atomic={int(n) * 2000}" in r.out
    assert "distinct_tids=1 main_tls=0" in r.out


def test_musl_threads_match_native(thread_prog):
    prog = thread_prog("x86_64", "pthreads", cc="musl-gcc")
    for n in ("2", "8"):
        _same_as_reference("x86_64", prog, n)


@pytest.mark.parametrize("arch", ARCHES)
def test_spinning_threads_need_preemption(thread_prog, arch):
    """No syscall in the wait loops: each thread's turn comes only by preemption."""
    prog = thread_prog(arch, "spin")
    _same_as_reference(arch, prog, "3")
    r = run_emu("run", str(prog), "--", "5")
    assert (r.rc, r.out) == (0, "turns=15 total=45\n"), r.err


@pytest.mark.parametrize("arch", ARCHES)
def test_timeouts_on_the_modelled_clock(thread_prog, arch):
    prog = thread_prog(arch, "timedwait")
    _same_as_reference(arch, prog)


@pytest.mark.parametrize("arch", ARCHES)
def test_deadlock_is_reported_as_a_limit(thread_prog, arch):
    r = run_emu("run", "--timeout", "60", str(thread_prog(arch, "deadlock")))
    assert r.rc == 124
    assert r.out == "locked a, waiting for b\n"
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "emu: deadlock: all 2 threads blocked for ever, no timer armed (at pc 0x"), r.err


@pytest.mark.parametrize("arch", ARCHES)
def test_kprobe_on_a_function_all_threads_run_counts_exactly(thread_prog, arch, tmp_path):
    stats = tmp_path / "stats.json"
    r = run_emu("run", "--kprobe", "bump_counter", "--stats", str(stats),
                str(thread_prog(arch, "pthreads")), "--", "4")
    assert r.rc == 0 and "counter=8000 atomic=8000" in r.out, r.err
    (probe,) = json.loads(stats.read_text())["probes"]
    assert (probe["symbol"], probe["hits"], probe["nmissed"]) == ("bump_counter", 8000, 0)


@pytest.mark.parametrize("arch", ARCHES)
def test_same_seed_is_byte_identical(thread_prog, arch, tmp_path):
    prog = thread_prog(arch, "pthreads")
    runs = []
    for i in range(2):
        stats = tmp_path / f"s{i}.json"
        r = run_emu("run", "--seed", "7", "--strace", "--stats", str(stats), str(prog), "--", "3")
        assert r.rc == 0
        runs.append((r.out, r.err, stats.read_text()))
    assert runs[0] == runs[1]
    assert "clone" in runs[0][1] and "futex(" in runs[0][1]
    assert "[pid  1001] " in runs[0][1] and "[pid  1003] exit(0) = ?" in runs[0][1]   # strace -f


@pytest.mark.parametrize("arch", ARCHES)
def test_kretprobes_keep_per_task_instances(thread_prog, arch, tmp_path):
    """Threads preempted inside a probed function: each task returns through its own
    instances (Linux keeps them per task), so every return is counted and none is lost."""
    stats = tmp_path / "stats.json"
    r = run_emu("run", "--kretprobe", "bump_counter", "--kretprobe", "worker", "--stats",
                str(stats), str(thread_prog(arch, "pthreads")), "--", "8")
    assert r.rc == 0 and "counter=16000 atomic=16000 sum=288" in r.out, r.err
    hits = {p["symbol"]: (p["hits"], p["nmissed"]) for p in json.loads(stats.read_text())["probes"]}
    assert hits == {"bump_counter": (16000, 0), "worker": (8, 0)}


MISC_OUT = ("affinity: rc=0 cpus=1 cpu0=1\n"
            "tid==pid: 1\n"
            "robust: rc=0 len=24 set=1\n"
            "sched_yield: 0\n"
            "fork: -1 Function not implemented\n"
            "clone3: new_tid=1 parent_settid=1 cleared=1\n")


@pytest.mark.parametrize("arch", ARCHES)
def test_affinity_tids_robust_list_fork_and_raw_clone3(thread_prog, arch):
    """One CPU in the affinity mask; fork refused with one note; a raw clone3 thread sets
    the parent's tid word, and its exit clears and wakes the CHILD_CLEARTID word."""
    r = run_emu("run", "--timeout", "60", str(thread_prog(arch, "misc")))
    assert (r.rc, r.out) == (0, MISC_OUT)
    assert r.err == "emu: clone: new processes (fork, vfork) are not supported yet\n"
