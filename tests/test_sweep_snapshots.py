"""Sweeps from snapshots (probes/sweep.py): the same verdicts as running every offset from
_start, on both arches and in every mode; offsets the unprobed run never executed nor read
are not run; the snapshot point is the function's first execution."""
from __future__ import annotations

import pytest

from conftest import ARCHES, ROOT, firmware_elf
from probes import sweep as sweep_mod
from probes.sweep import SweepConfig, sweep

SRC = ROOT / "tests" / "data" / "sweep" / "cold.c"


@pytest.fixture(scope="module")
def cold_prog(c_prog):
    def build(arch: str) -> str:
        return str(c_prog(arch, SRC))
    return build


def both(cfg: SweepConfig):
    fast = sweep(cfg)
    cfg.snapshots = False
    slow = sweep(cfg)
    return fast, slow


# Every run twice (from snapshots and from _start): x86-64 kprobe and kretprobe are the quick
# check, the rest is slow.
@pytest.mark.parametrize("arch,mode", [
    pytest.param(a, m, marks=() if a == "x86_64" and m != "optprobe" else pytest.mark.slow)
    for a in ARCHES for m in ("kprobe", "optprobe", "kretprobe")])
def test_same_verdicts_as_runs_from_start(cold_prog, arch, mode):
    fast, slow = both(SweepConfig(path=cold_prog(arch), funcs=["work", "main"], mode=mode))
    assert fast.to_json() == slow.to_json()
    assert fast.mismatches == 0 and fast.checked >= (2 if mode == "kretprobe" else 10)


# The whole of insns is a long sweep (twice): slow; demo's two functions are the quick check.
@pytest.mark.parametrize("prog,funcs", [pytest.param("insns", [], marks=pytest.mark.slow),
                                        ("demo", ["do_sys_open", "main"])])
@pytest.mark.parametrize("arch", ARCHES)
def test_same_verdicts_on_firmware(arch, prog, funcs):
    """insns has the text-reads (arm64 literal pools, t_adr reading its own code)."""
    cfg = SweepConfig(path=str(firmware_elf(arch, prog)), funcs=funcs,
                      mode="optprobe" if prog == "insns" else "kprobe")
    fast, slow = both(cfg)
    assert fast.to_json() == slow.to_json()
    assert fast.mismatches == 0
    if arch == "arm64" and prog == "insns":
        assert fast.text_reads > 0


@pytest.mark.parametrize("arch", ARCHES)
def test_offsets_never_reached_are_not_run(cold_prog, arch, monkeypatch):
    """Runs happen only where the unprobed run executed (or read) the patched bytes: the
    cold path of `work` and all of `never` are verdicts without a run, `ok` with no hits."""
    runs = []
    real = sweep_mod._outcome
    monkeypatch.setattr(sweep_mod, "_outcome", lambda *a: runs.append(1) or real(*a))
    res = sweep(SweepConfig(path=cold_prog(arch), funcs=["work"]))
    probed_runs = len(runs) - 1                         # the first is the baseline
    executed = [r for r in res.results if r.hits]
    cold = [r for r in res.results if r.verdict == "ok" and not r.hits]
    assert executed and cold and res.mismatches == 0
    assert probed_runs == len(executed) + res.text_reads
    # A function the guest never runs (swept when every function is): no run at all.
    from emu.elf import load_elf
    from emu.symbols import SymbolTable
    prepared = sweep_mod.prepare(SweepConfig(path=cold_prog(arch), funcs=["work", "never"]))
    image = load_elf(cold_prog(arch))
    never = SymbolTable(image.symbols).lookup("never")
    task = sweep_mod.Task(0, "never", never.addr,
                          tuple(sweep_mod.instruction_boundaries(image, never)))
    runs.clear()
    verdicts = sweep_mod.check_task(prepared.plan, task)
    assert len(verdicts) >= 2 and not runs
    assert all(r.verdict in ("ok", "rejected") and r.hits == 0 for r in verdicts)


@pytest.mark.parametrize("arch", ARCHES)
def test_snapshot_point_is_the_first_execution(cold_prog, arch):
    from emu.elf import load_elf
    from emu.symbols import SymbolTable
    path = cold_prog(arch)
    prepared = sweep_mod.prepare(SweepConfig(path=path, funcs=["work", "main", "never"]))
    trace, syms = prepared.plan.trace, SymbolTable(load_elf(path).symbols)
    work, main = syms.lookup("work"), syms.lookup("main")
    assert trace.first[work.addr] == work.addr                 # reached through its entry
    assert trace.rank[main.addr] < trace.rank[work.addr]       # main ran first
    assert prepared.not_executed == ["never"]
    order = [t.function for t in prepared.dispatch_order()]
    assert order.index("main") < order.index("work")


BARE_FUNCS = {"arm64": ["t_adr", "t_ldr_lit", "main"], "x86_64": ["t_rip_store", "t_loop", "main"]}


@pytest.mark.parametrize("arch", ARCHES)
def test_bare_metal_ram_loads_afresh(arch, monkeypatch):
    """128 MiB of bare-metal RAM is dearer to compare than to load: runs start at the entry,
    offsets never reached are still not run, and the verdicts are the same."""
    runners = []
    real = sweep_mod.SnapshotRunner.run

    def run(self, *a):
        runners.append(self)
        return real(self, *a)
    monkeypatch.setattr(sweep_mod.SnapshotRunner, "run", run)
    fast, slow = both(SweepConfig(path=str(firmware_elf(arch, "insns.bare")), bare=True,
                                  funcs=BARE_FUNCS[arch]))
    assert fast.to_json() == slow.to_json() and fast.mismatches == 0
    assert runners and runners[-1].fresh and runners[-1].snap.restore_bytes > 64 << 20


def test_fs_write_and_max_insns_run_from_start():
    """Host files are not rolled back and an instruction budget counts from _start: those
    sweeps start every run at the entry."""
    cfg = SweepConfig(path=str(firmware_elf("x86_64", "demo")), max_insns=10_000_000)
    plan = sweep_mod.prepare(cfg).plan
    assert not plan.resumable
    cfg2 = SweepConfig(path=str(firmware_elf("x86_64", "demo")))
    assert sweep_mod.prepare(cfg2).plan.resumable
