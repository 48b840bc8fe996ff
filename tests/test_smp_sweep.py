"""The probe-everywhere sweep of threaded guests on two CPUs (issue 19): runs start from
snapshots that keep the tasks, and probing any instruction of the threads' code,
glibc's start_thread included (a probed x86 `syscall` that ends a thread switches tasks),
changes nothing: 0 mismatches."""
from __future__ import annotations

import json

import pytest

from conftest import ARCHES, ROOT, run_emu

SMP = ROOT / "tests" / "data" / "smp"
THREADS = ROOT / "tests" / "data" / "threads"


def _sweep(exe, *funcs: str, args=("3",), cpus: int = 2) -> dict:
    fargs = [a for f in funcs for a in ("--func", f)]
    r = run_emu("sweep", "--cpus", str(cpus), "--jobs", "1", "--json", "--progress", "none", *fargs,
                str(exe), "--", *args)
    assert r.rc == 0, r.err
    return json.loads(r.out)


@pytest.mark.parametrize("arch", ["x86_64", pytest.param("arm64", marks=pytest.mark.slow)])
def test_sweep_of_a_function_threads_run_on_two_cpus(c_prog, arch):
    s = _sweep(c_prog(arch, SMP / "percpu.c", extra=("-pthread",)), "work")
    assert s["mismatches"] == 0 and s["checked"] >= 4, s
    hits = {r["hits"] for r in s["functions"]["work"]}
    assert hits == {300 + 400 + 500}             # every instruction, every call, 3 threads


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_sweep_of_thread_start_and_workers_on_two_cpus(c_prog, arch):
    exe = c_prog(arch, THREADS / "pthreads.c", extra=("-pthread",))
    s = _sweep(exe, "worker", "bump_counter", "start_thread")
    assert s["mismatches"] == 0 and s["checked"] > 200, s


def test_sweeps_with_other_cpu_counts_in_one_process_keep_their_own_baseline(c_prog):
    """A worker keeps the snapshots of the plan it works on; a sweep with other --cpus is
    another plan (its baseline interleaves the threads differently), never the same one."""
    exe = c_prog("x86_64", THREADS / "pthreads.c", extra=("-pthread",))
    for cpus in (2, 1):
        s = _sweep(exe, "bump_counter", cpus=cpus)
        assert s["mismatches"] == 0 and s["checked"] == 2, (cpus, s)
