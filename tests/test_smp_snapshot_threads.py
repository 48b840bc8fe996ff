"""Snapshots of threaded guests (issue 19, emu/linux/task_snapshot.py): a snapshot taken
while threads wait in timed condition waits and sleeps, hold a robust mutex, have
handlers, masks, an altstack, a pending signal and two armed timers restores to a run
that prints exactly what the straight run prints (its output records its own
interleaving), with the same strace lines and cycles, on 1 and 2 CPUs, on both arches,
any number of times; and a sweep of a threaded guest from snapshots gives the verdicts of
the sweep that starts every run at the entry."""
from __future__ import annotations

import io
import json

import pytest

from conftest import ARCHES, ROOT, run_emu, run_reference
from emu.cycles import enable_cycle_model
from emu.linux import preempt
from emu.loader import GuestConfig, load_guest

SMP = ROOT / "tests" / "data" / "smp"
THREADS = ROOT / "tests" / "data" / "threads"
# In the order the guest first runs them: each snapshot is taken by running on.
FIRSTS = ("start_thread", "worker", "spin", "note", "on_usr1", "on_alarm")
HEAD = "threads=3 joined=2 ticks>0=1 usr1>0=1 on_alt=1 robust=130 log="


@pytest.fixture(scope="module")
def prog(c_prog):
    return lambda arch: c_prog(arch, SMP / "snapthreads.c", extra=("-pthread",))


def load(path, cpus: int, cycles: bool = False):
    out, err = io.BytesIO(), io.BytesIO()
    g = load_guest(GuestConfig(path=str(path), argv=["3"], cpus=cpus, seed=3, strace=True),
                   stdin=io.BytesIO(), stdout=out, stderr=err)
    if cycles:
        enable_cycle_model(g.machine, None)
    return g.machine, out, err


def finish(m, out, err) -> tuple:
    r = m.run(timeout=120)
    return r.reason.value, r.exit_code, out.getvalue(), err.getvalue(), m.clock.cycles


def straight(path, cpus: int, cycles: bool = False) -> tuple:
    want = finish(*load(path, cpus, cycles))
    assert want[:2] == ("exit", 0) and want[2].decode().startswith(HEAD), want[2][:200]
    return want


def to(m, sym: str) -> None:
    addr = m.symbols.lookup(sym).addr
    m.flush_code(addr, addr + 1)                 # no CPU's cached block may run past it
    r = m.run(until=addr, timeout=60)
    assert r.reason.value == "halt" and m.pc == addr, r


def tasks_of(m):
    return m.syscall_handler.proc.sched.tasks


@pytest.mark.parametrize("cpus", [1, 2])
@pytest.mark.parametrize("arch", ARCHES)
def test_restored_runs_are_the_straight_run(prog, arch, cpus):
    path = prog(arch)
    want = straight(path, cpus)
    m, out, err = load(path, cpus)
    to(m, "checkpoint")
    states = {t.state for t in tasks_of(m).values()}
    assert len(tasks_of(m)) == 4 and "blocked" in states, states     # waits with deadlines
    snap = m.snapshot()
    runs = []
    for _ in range(3):
        runs.append(finish(m, out, err))
        m.restore(snap)
    assert runs == [want] * 3
    assert b"[pid  1003]" in want[3]                  # strace -f lines of every thread


@pytest.mark.slow
@pytest.mark.parametrize("cpus", [1, 2])
@pytest.mark.parametrize("arch", ARCHES)
def test_restored_runs_give_the_straight_runs_cycles(prog, arch, cpus):
    path = prog(arch)
    want = straight(path, cpus, cycles=True)
    m, out, err = load(path, cpus, cycles=True)
    to(m, "checkpoint")
    snap = m.snapshot()
    first = finish(m, out, err)
    m.restore(snap)
    assert [first, finish(m, out, err)] == [want, want]


@pytest.mark.parametrize("counter", ["native", pytest.param("python", marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", ARCHES)
def test_snapshots_at_each_first_execution(prog, arch, counter, monkeypatch):
    """As the sweep takes them: at a thread's start, inside threads, in signal handlers
    (one aimed at a thread by a POSIX timer, one of a periodic itimer)."""
    if counter == "python":
        monkeypatch.setattr(preempt, "load", lambda: None)
    elif preempt.load() is None:
        pytest.skip("no C compiler for the native preemption counter")
    path = prog(arch)
    want = straight(path, 2)
    m, out, err = load(path, 2)
    for sym in FIRSTS:
        to(m, sym)
        snap = m.snapshot()
        assert finish(m, out, err) == want, sym
        m.restore(snap)


@pytest.mark.parametrize("arch", ARCHES)
def test_snapshot_before_the_threads_drops_them_on_restore(prog, arch):
    path = prog(arch)
    want = straight(path, 2)
    m, out, err = load(path, 2)
    to(m, "main")
    snap = m.snapshot()
    assert finish(m, out, err) == want
    assert len(tasks_of(m)) == 4
    m.restore(snap)
    assert list(tasks_of(m)) == [1000]
    assert finish(m, out, err) == want


def test_robust_mutex_owner_died_matches_native(prog):
    """The x86-64 reference (qemu-aarch64 7.2 has no set_robust_list, and glibc 2.36 no
    longer walks the list itself, so the arm64 reference hangs: arm64 is checked against
    the same expected line above)."""
    ref = run_reference("x86_64", [str(prog("x86_64")), "3"])
    assert ref.rc == 0 and ref.out.startswith(HEAD), ref.out[:200]


def _sweep(exe, funcs: tuple[str, ...], threads: str, *extra: str) -> dict:
    fargs = [a for f in funcs for a in ("--func", f)]
    r = run_emu("sweep", "--cpus", "2", "--jobs", "1", "--json", "--progress", "none", *fargs,
                *extra, str(exe), "--", threads)
    assert r.rc == 0, r.err
    return json.loads(r.out)


@pytest.mark.parametrize("arch,funcs,threads", [
    ("x86_64", ("bump_counter",), "2"),
    pytest.param("x86_64", ("worker", "bump_counter"), "3", marks=pytest.mark.slow),
    pytest.param("arm64", ("worker", "bump_counter"), "3", marks=pytest.mark.slow)])
def test_snapshot_sweep_gives_the_verdicts_of_runs_from_the_entry(c_prog, arch, funcs, threads):
    exe = c_prog(arch, THREADS / "pthreads.c", extra=("-pthread",))
    snap, fresh = _sweep(exe, funcs, threads), _sweep(exe, funcs, threads, "--no-snapshots")
    assert snap["mismatches"] == 0 and snap["checked"] >= 2, snap
    assert snap["functions"] == fresh["functions"]
    assert {r["hits"] for r in snap["functions"]["bump_counter"]} == {2000 * int(threads)}


def _probed_finish(m, out, err) -> tuple:
    """Finish with a kprobe on note(): which task on which CPU made each call."""
    from probes.kprobes import Kprobe, kprobes_of
    seen: list[tuple[int, int]] = []
    p = Kprobe(symbol_name="note", pre_handler=lambda kp, regs: seen.append((m.cpu, m.task[1])) or 0)
    kprobes_of(m).register_kprobe(p)
    return finish(m, out, err), seen, p.hits


@pytest.mark.parametrize("arch", ARCHES)
def test_probes_after_a_restore_see_the_straight_probed_run(prog, arch):
    """Per-CPU and per-task probe state after a restore: the same hits, in the same order,
    on the same CPUs and tasks as a probed run that was never snapshotted."""
    path = prog(arch)
    m, out, err = load(path, 2)
    to(m, "checkpoint")
    want = _probed_finish(m, out, err)
    assert want[2] > 900 and len({cpu for cpu, _ in want[1]}) == 2
    m, out, err = load(path, 2)
    to(m, "checkpoint")
    snap = m.snapshot()
    finish(m, out, err)
    m.restore(snap)
    assert _probed_finish(m, out, err) == want


@pytest.mark.parametrize("arch", ARCHES)
def test_restore_rearming_preemption_keeps_the_turn(prog, arch):
    """A snapshot taken while the preemption hook was on, restored after the hook ended:
    arming it again must not draw a new turn from the seed (the restored turn goes on)."""
    path = prog(arch)
    want = straight(path, 2, cycles=True)
    m, out, err = load(path, 2, cycles=True)
    to(m, "checkpoint")
    snap = m.snapshot()
    sched = m.syscall_handler.proc.sched
    sched._disarm_preemption()                  # as when the guest goes back to one task
    m.restore(snap)
    assert sched._hook is not None
    assert finish(m, out, err) == want
