"""emu/memory.py's region bookkeeping stays exact while it stops scanning every region:
first fit with the free-area memo against a plain scan, under random map/unmap/protect, and
the vm.max_map_count cap (issue 11). The guest side is in test_sandbox_guest.py."""
from __future__ import annotations

import random

import pytest
from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, Uc

from emu.memory import PAGE, Memory, MemoryLimit


def plain_first_fit(mem: Memory, size: int, lo: int, hi: int) -> int | None:
    size, cursor = -(-size // PAGE) * PAGE, -(-lo // PAGE) * PAGE
    for r in mem.regions:
        if r.end <= cursor:
            continue
        if r.start >= cursor + size:
            break
        cursor = -(-r.end // PAGE) * PAGE
    return cursor if cursor + size <= hi else None


@pytest.mark.parametrize("seed", range(6))
def test_find_free_is_still_first_fit(seed):
    rnd = random.Random(seed)
    base = 0x1000_0000
    mem = Memory(Uc(UC_ARCH_ARM64, UC_MODE_ARM))
    for _ in range(300):
        size = rnd.choice([1, 2, 3, 5]) * PAGE
        lo = base + rnd.choice([0, 0, 0, 7 * PAGE])
        hi = base + rnd.choice([64, 400]) * PAGE
        got = mem.find_free(size, lo, hi)
        assert got == plain_first_fit(mem, size, lo, hi)
        op = rnd.random()
        if op < 0.6 and got is not None:
            mem.map(got, size, rnd.choice([1, 3]), "[anon]")
        elif op < 0.8 and mem.regions:
            mem.unmap(rnd.choice(mem.regions).start, PAGE * rnd.randint(1, 3))
        elif mem.regions:
            mem.protect(rnd.choice(mem.regions).start, PAGE, rnd.choice([1, 3, 5]))
        starts = [r.start for r in mem.regions]
        assert starts == sorted(starts)
        assert all(a.end <= b.start for a, b in zip(mem.regions, mem.regions[1:]))


def test_region_cap_still_holds(monkeypatch):
    import emu.memory as memory
    monkeypatch.setattr(memory, "MAX_MAP_COUNT", 10)
    mem = Memory(Uc(UC_ARCH_ARM64, UC_MODE_ARM))
    for i in range(10):                            # gaps between: ten regions
        mem.map(0x1000_0000 + 2 * i * PAGE, PAGE, 1, "[anon]")
    with pytest.raises(MemoryLimit):
        mem.map(0x2000_0000, PAGE, 1, "[anon]")
    mem.unmap(0x1000_0000, PAGE)
    mem.map(0x2000_0000, PAGE, 1, "[anon]")         # one went away: room for one
    assert len(mem.regions) == 10
