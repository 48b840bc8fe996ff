"""One Unicorn per vCPU with threaded guests (issue 19): a probe hit runs on the Uc of the
CPU whose thread hit it; a CPU's turn is a quantum of modelled cycles, so what the probe
layer costs a CPU (its traps, slots and handlers) uses up that CPU's turn; the schedule is
a function of the inputs and the seed."""
from __future__ import annotations

import io

import pytest

from conftest import ROOT, run_emu
from emu.linux.tasks import TurnUnit
from emu.loader import GuestConfig, load_guest
from probes.kprobes import Kprobe, kprobes_of

SMP = ROOT / "tests" / "data" / "smp"
TURNS = ROOT / "tests" / "data" / "smp_uc" / "turns.c"
BOTH = ["x86_64", pytest.param("arm64", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def prog(c_prog):
    return lambda arch, path: c_prog(arch, path, extra=("-pthread",))


def _guest(exe, argv, cpus=2, seed=0):
    return load_guest(GuestConfig(path=str(exe), argv=argv, cpus=cpus, seed=seed),
                      stdout=io.BytesIO(), stderr=io.BytesIO())


@pytest.mark.parametrize("arch", BOTH)
def test_a_hit_runs_on_the_uc_of_the_cpu_that_hit(prog, arch):
    g = _guest(prog(arch, SMP / "percpu.c"), ["4"])
    m = g.machine
    hits: dict[int, set[tuple[int, bool]]] = {}

    def pre(_p, _regs):
        hits.setdefault(m.task[1], set()).add((m.cpu, m.uc is m.uc_of(m.cpu)))
        return 0
    kprobes_of(m).register_kprobe(Kprobe(symbol_name="work", pre_handler=pre))
    r = m.run(timeout=60)
    assert r.exit_code == 0, r
    assert len(m.ucs) == 2 and m.handoffs > 0
    # the k-th thread created (tid pid + k) is on CPU k % 2, and ran on that CPU's Uc
    pid = g.process.creds.pid
    assert hits == {pid + k: {(k % 2, True)} for k in range(1, 5)}


def _turns(exe, probe: bool, unit: TurnUnit, seed: int = 0):
    g = _guest(exe, ["4000"], seed=seed)
    g.process.sched.turn_unit = unit
    m = g.machine
    if probe:
        kprobes_of(m).register_kprobe(Kprobe(symbol_name="tick"))
    order: list[tuple[int, int]] = []
    m.cpu_listeners.append(lambda cpu: order.append((cpu, m.clock.cycles)))
    r = m.run(timeout=60)
    assert (r.exit_code, m.stdout.getvalue()) == (0, b"a=14000 b=14000\n"), r
    return g.process.sched.preemptions, order


@pytest.mark.parametrize("arch", BOTH)
def test_probe_costs_use_up_the_cpus_turn(prog, arch):
    exe = prog(arch, TURNS)
    plain, _ = _turns(exe, False, TurnUnit.CYCLES)
    probed, _ = _turns(exe, True, TurnUnit.CYCLES)
    assert plain > 0
    # each of the 8000 hits costs a trap round trip and a handler, hundreds of cycles
    assert probed > 5 * plain, (plain, probed)
    # counted in code bytes, a hit costs only its slot's few bytes: about the same turns
    code_plain, _ = _turns(exe, False, TurnUnit.CODE)
    code_probed, _ = _turns(exe, True, TurnUnit.CODE)
    assert code_plain <= code_probed < 2 * code_plain, (code_plain, code_probed)


def test_the_schedule_is_a_function_of_the_seed(prog):
    exe = prog("x86_64", TURNS)
    first = _turns(exe, True, TurnUnit.CYCLES, seed=1)
    assert _turns(exe, True, TurnUnit.CYCLES, seed=1) == first       # byte-identical
    assert _turns(exe, True, TurnUnit.CYCLES, seed=2)[1] != first[1]   # interleaves otherwise


@pytest.mark.parametrize("cpus", ["2", "1"])
def test_timeout_ends_a_run_on_several_cpus(prog, cpus):
    """--timeout holds whether the run hands off between Ucs or not (a watchdog stops the
    running Uc: Unicorn's own timer would cost a thread per hand-off)."""
    r = run_emu("run", "--cpus", cpus, "--timeout", "0.5", str(prog("x86_64", TURNS)), "--",
                "1000000000000")
    assert r.rc == 124 and "wall-clock limit of 0.5 s reached" in r.err, (r.rc, r.err)
