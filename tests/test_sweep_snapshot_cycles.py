"""Snapshots with the cycle model on (emu/snapshot.py + CycleModel.save_state/restore_state):
a run restored from a snapshot gives exactly the cycles, instructions and cycles-by-reason
of the straight run (run to the same point, then on), every time, with probes registered
after the restore too; with the native block counter and with its Python twin."""
from __future__ import annotations

import io

import pytest

from conftest import ARCHES, firmware_elf
from emu.cycles import enable_cycle_model
from emu.loader import GuestConfig, load_guest
from emu.snapshot import SnapshotError
from test_snapshot_machine import checkpoint_prog, fs_dir  # noqa: F401 - fixtures
from probes.kprobes import Kprobe, kprobes_of

# (firmware, argv, where the snapshot is taken: the first execution of this function)
GUESTS = {"demo": ([], "do_sys_open"), "hotloop": (["300"], "hot_call")}
SECOND = {"arm64": 4, "x86_64": 2}        # do_sys_open's second instruction


def load(arch: str, prog: str, counter: str):
    out = io.BytesIO()
    argv, _ = GUESTS[prog]
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, prog)), argv=argv),
                   stdin=io.BytesIO(), stdout=out, stderr=io.BytesIO())
    model = enable_cycle_model(g.machine, None, use_native=(counter == "native"))
    if counter == "native" and not model.native:
        pytest.skip("no C compiler for the native block counter")
    return g.machine, out


def to_stop(m, prog: str) -> None:
    r = m.run(until=m.symbols.lookup(GUESTS[prog][1]).addr, timeout=30)
    assert r.reason.value == "halt", r


def finish(m, out, probe: int | None = None) -> tuple:
    p = None
    if probe is not None:
        p = Kprobe(addr=probe, pre_handler=lambda kp, regs: 0)
        kprobes_of(m).register_kprobe(p)
    r = m.run(timeout=30)
    model = m.layers["cycles"]
    return (r.reason.value, r.exit_code, out.getvalue(), m.clock.cycles, model.instructions,
            dict(m.clock.breakdown()), model.counts(), p.hits if p else None)


def straight(arch: str, prog: str, counter: str, probe_off: int | None = None) -> tuple:
    m, out = load(arch, prog, counter)
    to_stop(m, prog)
    addr = None if probe_off is None else m.symbols.lookup(GUESTS[prog][1]).addr + probe_off
    return finish(m, out, addr)


@pytest.mark.parametrize("counter", ["native", "python"])
@pytest.mark.parametrize("arch", ARCHES)
def test_restored_runs_give_the_straight_runs_cycles(arch, counter):
    want = straight(arch, "hotloop", counter)
    assert want[0] == "exit" and want[3] > 0
    m, out = load(arch, "hotloop", counter)
    to_stop(m, "hotloop")
    snap = m.snapshot()
    runs = []
    for _ in range(3):
        runs.append(finish(m, out))
        m.restore(snap)
    assert runs == [want] * 3


@pytest.mark.parametrize("arch", ARCHES)
def test_probed_runs_from_a_snapshot_count_as_straight_probed_runs(arch):
    """The sweep's pattern: restore, probe, run; restore, probe elsewhere, run; unprobed."""
    m, out = load(arch, "demo", "native")
    to_stop(m, "demo")
    snap = m.snapshot()
    base = finish(m, out)
    m_addr = m.symbols.lookup(GUESTS["demo"][1]).addr
    for off in (0, SECOND[arch], 0):
        m.restore(snap)
        got = finish(m, out, m_addr + off)
        want = straight(arch, "demo", "native", off)
        assert got == want and got[-1] >= 1
        assert got[3] > base[3] and got[5]["trap"] > base[5].get("trap", 0)
    m.restore(snap)
    assert "kprobes" not in m.layers and finish(m, out) == base


@pytest.mark.parametrize("arch", ARCHES)
def test_snapshot_before_the_model_cannot_be_restored_after_it(arch):
    out = io.BytesIO()
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdin=io.BytesIO(),
                   stdout=out, stderr=io.BytesIO())
    snap = g.machine.snapshot()
    enable_cycle_model(g.machine)
    with pytest.raises(SnapshotError, match="cycle model was turned on since"):
        g.machine.restore(snap)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_guest_clock_reads_after_a_restore(checkpoint_prog, fs_dir, arch):
    """checkpoint.c reads the clock before and after the snapshot point and prints the
    difference: with the cycle model on, a restored run prints what the straight run does."""
    from test_snapshot_machine import finish as finish_checkpoint, load as load_checkpoint

    def loaded():
        m, out, err = load_checkpoint(checkpoint_prog(arch), fs_dir, ["clock"])
        enable_cycle_model(m)
        m.run(until=m.symbols.lookup("checkpoint").addr, timeout=30)
        return m, out, err
    want = finish_checkpoint(*loaded())
    assert want[0:2] == ("exit", 3)
    m, out, err = loaded()
    snap = m.snapshot()
    runs = []
    for _ in range(2):
        runs.append(finish_checkpoint(m, out, err))
        m.restore(snap)
    assert runs == [want] * 2
