"""Static keys and tracepoints across machine.snapshot() / restore(): the key's count, its
site bytes, the guest's own `enabled` word, the registered funcs and the hit count come
back together, whichever way the key was flipped after the snapshot; a snapshot taken
before any tracepoint state leaves none after restore. Both arches, tpdemo."""
from __future__ import annotations

import pytest

from conftest import firmware_elf
from emu.snapshot import SnapshotError
from probes.jump_label import jump_labels_of
from probes.kprobes import Kprobe, kprobes_of
from probes.testing import ProbeLab
from probes.tracepoint import tracepoints_of

NOP = {"arm64": bytes.fromhex("1f2003d5"), "x86_64": bytes.fromhex("0f1f440000")}
N = 6
OUT = b"tpdemo n=6 sum=3\n"                      # sum of 3i - 7 for i < 6
ARGS = [(i, 3 * i - 7) for i in range(N)]


def _at_work_step(arch: str):
    lab = ProbeLab.load(str(firmware_elf(arch, "tpdemo")), argv=[str(N)])
    m = lab.machine
    tps = tracepoints_of(m)
    tp = tps.lookup("tp_work")
    return lab, m, tps, tp


def _stop_in_loop(m) -> None:
    stop = m.run(until=m.symbols.lookup("work_step").addr, timeout=30)
    assert stop.reason.value == "halt"


def _state(m, tp, arch):
    (site,) = tp.key.entries
    text = m.memory.read(site.code, len(NOP[arch]))
    word = int.from_bytes(m.memory.read(tp.key.addr, 4), "little")
    return text == NOP[arch], tp.key.enabled, word, [f.func for f in tp.funcs], tp.hits


def _finish(lab) -> bytes:
    assert lab.machine.run(timeout=30).reason.value == "exit"
    return lab._stdout.getvalue()


def test_a_key_flipped_off_after_the_snapshot_comes_back_on(arch):
    lab, m, tps, tp = _at_work_step(arch)
    seen: list[tuple[int, ...]] = []
    counted = lambda _d, args: seen.append(args)            # noqa: E731
    assert tps.tracepoint_probe_register(tp, counted) == 0
    _stop_in_loop(m)
    snap = m.snapshot()                                      # key on, the site a branch
    at_snap = _state(m, tp, arch)
    assert at_snap == (False, 1, 1, [counted], 0)
    assert tps.tracepoint_probe_unregister(tp, counted) == 0  # flipped off
    assert _state(m, tp, arch) == (True, 0, 0, [], 0)
    assert _finish(lab) == OUT and seen == [] and tp.hits == 0
    m.restore(snap)
    assert _state(m, tp, arch) == at_snap
    assert tracepoints_of(m) is tps and jump_labels_of(m).static_key(tp.key.addr) is tp.key
    assert _finish(lab) == OUT
    assert seen == ARGS and tp.hits == N


def test_a_key_flipped_on_after_the_snapshot_comes_back_off(arch):
    lab, m, tps, tp = _at_work_step(arch)
    _stop_in_loop(m)
    snap = m.snapshot()                                      # tracepoints known, key off
    at_snap = _state(m, tp, arch)
    assert at_snap == (True, 0, 0, [], 0)
    seen: list[tuple[int, ...]] = []
    counted = lambda _d, args: seen.append(args)            # noqa: E731
    assert tps.tracepoint_probe_register(tp, counted) == 0
    assert _finish(lab) == OUT and seen == ARGS and tp.hits == N
    m.restore(snap)
    assert _state(m, tp, arch) == at_snap and not m.live_patches
    assert _finish(lab) == OUT and len(seen) == N and tp.hits == 0
    # and on again from the restored state: the same hits as the first time
    m.restore(snap)
    assert tps.tracepoint_probe_register(tp, counted) == 0
    assert _finish(lab) == OUT and seen == ARGS + ARGS and tp.hits == N


def test_probes_after_the_snapshot_do_not_survive_it(arch):
    """A kprobe (slot pages, its own layers) after a tracepoint snapshot goes with the
    restore; one registered after that works on fresh pages."""
    lab, m, tps, tp = _at_work_step(arch)
    tps.tracepoint_probe_register(tp, lambda _d, _a: None)
    snap = m.snapshot()
    p = Kprobe(symbol_name="work_loop", pre_handler=lambda _p, _r: 0)
    kprobes_of(m).register_kprobe(p)
    with pytest.raises(SnapshotError, match="before probes"):
        m.snapshot()
    m.restore(snap)
    assert "kprobes" not in m.layers and "arch_probes" not in m.layers
    assert m.memory.read(m.symbols.lookup("work_loop").addr, 1) != m.arch.breakpoint[:1]
    again = Kprobe(symbol_name="work_step", pre_handler=lambda _p, _r: 0)
    kprobes_of(m).register_kprobe(again)
    assert _finish(lab) == OUT and again.hits == N and tp.hits == N


def test_a_snapshot_before_any_tracepoint_state_leaves_none(arch):
    lab = ProbeLab.load(str(firmware_elf(arch, "tpdemo")), argv=[str(N)])
    m = lab.machine
    snap = m.snapshot()
    tps = tracepoints_of(m)
    tp = tps.lookup("tp_work")
    tps.tracepoint_probe_register(tp, lambda _d, _a: None)
    (site,) = tp.key.entries
    m.restore(snap)
    assert "jump_label" not in m.layers and "tracepoints" not in m.layers
    fresh = tracepoints_of(m).lookup("tp_work")
    assert fresh is not tp and _state(m, fresh, arch) == (True, 0, 0, [], 0)
    assert _finish(lab) == OUT and fresh.hits == 0
