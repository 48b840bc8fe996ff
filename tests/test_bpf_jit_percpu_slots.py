"""Per-CPU array slots of the JIT in a traced guest are freed with their maps (issue 17):
the kernel frees a map's per-CPU areas, and a program's JITed image (bpf_jit_free), when
the last reference goes. Here a program loaded under `--bpf-engine jit` (``jit_load``, as
BPF_PROG_LOAD JITs it) and then dropped leaves its image and its per-CPU array's slot
to be reclaimed at a later allocation (after a garbage collection, so deterministically): many more per-CPU arrays than the JIT has slots
(PCPU_KEYS) are JITed in turn on one machine, every one JITed, the guest's mapped bytes
bounded, and a program that stays attached keeps its slot and counts right throughout."""
from __future__ import annotations

import weakref

import pytest

from conftest import ARCHES
from emu.memory import PAGE
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.jit_guest import PCPU_KEYS, RECLAIM_EVERY, engine_info, jit_load
from test_bpf_jit_percpu import _counts, _hot_counter, _hot_lab


def _load_and_drop(lab, arch: str, rounds: int) -> tuple[list[int], list[int]]:
    """``rounds`` per-CPU counters JITed into the lab's machine and dropped one after
    another: (the guest's mapped bytes after each, each one's slot index)."""
    m = lab.machine
    jit = m.layers["bpf_probe_jit"].jit
    mapped, slots = [], []
    for _ in range(rounds):
        prog = _hot_counter(arch)
        image = jit_load(m, prog)
        info = engine_info(m, prog)
        assert image is not None and "jit_fallback" not in info, info
        assert info["engine"] == "jit" and info["jit_image"] == image.addr
        slots.append(jit._percpu_regions[id(prog.maps[3])].index)
        del prog, image                 # the last references: the map dies with its program
        mapped.append(m.memory.mapped_bytes)
    return mapped, slots


def _check(arch: str, rounds: int) -> None:
    keep = _hot_counter(arch)           # attached throughout: its slot is never reclaimed
    lab = _hot_lab(arch, keep, "jit", True)
    lab.call("hot_call", 3)
    jit = lab.machine.layers["bpf_probe_jit"].jit
    assert jit._percpu_regions[id(keep.maps[3])].index == 0
    mapped, slots = _load_and_drop(lab, arch, rounds)
    assert rounds > PCPU_KEYS           # more than the JIT holds at once
    # fresh indices until all are taken, then the dead maps' ones, lowest first (the
    # previous program is the JIT's last run: its slot is still in use)
    assert slots[:PCPU_KEYS - 1] == list(range(1, PCPU_KEYS))
    assert slots[PCPU_KEYS - 1:PCPU_KEYS + 1] == [1, 2]
    assert 0 not in slots
    # bounded: dead programs' images and windows wait for the next reclaim (every
    # RECLAIM_EVERY images, or with every slot taken); with none reclaimed every round
    # maps a window page and an image page more, and the 64th falls back
    assert RECLAIM_EVERY == PCPU_KEYS
    assert max(mapped) - mapped[0] <= 3 * PCPU_KEYS * PAGE, (mapped[0], max(mapped))
    lab.call("hot_call", 5)             # the kept program's copies survived every reclaim
    assert _counts(keep) == [3, 2, 2, 1]
    dc = direct_calls_of(lab.machine)
    assert dc is not None and dc.refused == {}


def test_per_cpu_slots_are_reclaimed() -> None:
    _check("x86_64", PCPU_KEYS + 4)     # the quick tier's: one reclaim, one arch


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_two_hundred_per_cpu_arrays_on_one_machine(arch) -> None:
    _check(arch, 200)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_reused_slot_holds_the_new_maps_values(arch) -> None:
    """A map JITed into a dead map's slot (the same guest windows) reads its own zeroed
    values, not the bytes the dead map's window held; the attached program goes on."""
    keep = _hot_counter(arch)
    lab = _hot_lab(arch, keep, "jit", True)
    lab.call("hot_call", 3)
    m = lab.machine
    jit = m.layers["bpf_probe_jit"].jit
    old = _hot_counter(arch)
    assert jit_load(m, old) is not None
    for k in range(4):
        old.maps[3].update(k, (99 + k).to_bytes(8, "little"))    # into the guest's window
    assert _counts(old) == [99, 100, 101, 102]
    slot, dead = jit._percpu_regions[id(old.maps[3])].index, weakref.ref(old.maps[3])
    del old
    _load_and_drop(lab, arch, PCPU_KEYS - 2)        # every other slot taken
    assert dead() is None
    new = _hot_counter(arch)
    assert jit_load(m, new) is not None
    assert jit._percpu_regions[id(new.maps[3])].index == slot == 1
    assert _counts(new) == [0, 0, 0, 0]
    new.maps[3].update(2, (5).to_bytes(8, "little"))
    assert _counts(new) == [0, 0, 5, 0]
    lab.call("hot_call", 5)
    assert _counts(keep) == [3, 2, 2, 1] and _counts(new) == [0, 0, 5, 0]


def test_what_is_reclaimed_does_not_hang_on_the_collector() -> None:
    """Two machines load and drop the same programs, the second with the collector run
    at other times (a heap of cyclic garbage made between rounds): the same slots, and the
    same mapped bytes after every round."""
    import gc

    got = []
    for churn in (False, True):
        keep = _hot_counter("x86_64")
        lab = _hot_lab("x86_64", keep, "jit", True)
        lab.call("hot_call", 3)
        if churn:
            gc.collect()
            junk = [[] for _ in range(5000)]
            for a, b in zip(junk, junk[1:]):
                a.append(b)
                b.append(a)
            del junk, a, b
        base = lab.machine.memory.mapped_bytes
        mapped, slots = _load_and_drop(lab, "x86_64", PCPU_KEYS + 4)
        got.append(([b - base for b in mapped], slots))
    assert got[0][1] == got[1][1]
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(got[0][0], got[1][0])) if a != b]
    assert not diff, diff[:5]
