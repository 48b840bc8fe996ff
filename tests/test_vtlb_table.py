"""The virtual TLB's permission table and fill (emu/vtlb.py, emu/vtlb.c): the C fill and the
Python fallback give the same answers, the answers are the mappings' permissions, and a
machine's TLB is filled by them (data pages without execute)."""
from __future__ import annotations

import io
import random

import pytest
from unicorn import unicorn_const as UC

from conftest import firmware_elf
from emu.loader import GuestConfig, load_guest
from emu.vtlb import PAGE, SLOTS, WINDOW, Vtlb, VtlbMode, load

R, W, X = UC.UC_PROT_READ, UC.UC_PROT_WRITE, UC.UC_PROT_EXEC
ACCESS = (UC.UC_MEM_READ, UC.UC_MEM_WRITE, UC.UC_MEM_FETCH)
needs_c = pytest.mark.skipif(load() is None, reason="no C compiler to build emu/vtlb.c")


def _tables() -> list[Vtlb]:
    return [Vtlb(VtlbMode.PYTHON)] + ([Vtlb(VtlbMode.NATIVE)] if load() is not None else [])


@pytest.mark.parametrize("seed", range(4))
def test_table_follows_random_maps_unmaps_and_protects(seed):
    """Random assigns over 64 pages: every table answers each page as a per-page model does."""
    rnd = random.Random(seed)
    tables, model = _tables(), {}
    for _ in range(300):
        lo = rnd.randrange(64)
        hi = min(64, lo + rnd.randint(1, 9))
        perms = rnd.choice([None, 0, R, R | W, R | X, R | W | X])
        for t in tables:
            t.assign(0x40000 + lo * PAGE, 0x40000 + hi * PAGE, perms)
        for p in range(lo, hi):
            model[p] = perms
        probe = rnd.randrange(-1, 66)
        for t in tables:
            assert t.lookup(0x40000 + probe * PAGE + rnd.randrange(PAGE)) == model.get(probe), t.mode


def test_fill_grants_the_mappings_permissions_and_no_more():
    for t in _tables():
        t.assign(0x10000, 0x11000, R | X)          # text
        t.assign(0x20000, 0x22000, R | W)          # data
        t.assign(0x30000, 0x31000, R | W | X)      # rwx
        t.assign(0x40000, 0x41000, R)              # read-only
        assert t.fill(0x10010, UC.UC_MEM_FETCH) == (0x10000, R | X)
        assert t.fill(0x10010, UC.UC_MEM_READ) == (0x10000, R | X)
        assert t.fill(0x21ff8, UC.UC_MEM_WRITE) == (0x21000, R | W)     # no execute: fast stores
        assert t.fill(0x20000, UC.UC_MEM_READ) == (0x20000, R | W)
        assert t.fill(0x30000, UC.UC_MEM_WRITE) == (0x30000, R | W | X)  # rwx stays slow
        assert t.state.denials == 0


def test_denied_pages_go_to_fault_window_slots():
    """A denial gets the window slot of its page (the same one again), with only the
    denied access; the slot says whether the page is mapped."""
    for t in _tables():
        t.assign(0x10000, 0x11000, R | X)
        paddr, perms = t.fill(0x10008, UC.UC_MEM_WRITE)
        assert (paddr, perms) == (WINDOW, W)
        assert t.state.slot_page[0] == 0x10000 | 1                        # mapped: a PROT fault
        assert t.fill(0x10ff0, UC.UC_MEM_WRITE) == (WINDOW, W)             # the same slot
        assert t.fill(0x90000, UC.UC_MEM_READ) == (WINDOW + PAGE, R)       # unmapped: next slot
        assert t.state.slot_page[1] == 0x90000
        assert t.fill(0x20000, UC.UC_MEM_FETCH) == (WINDOW + 2 * PAGE, X)
        assert (t.state.fills, t.state.denials, t.state.slots_used) == (4, 4, 3)
        t.flush([])
        assert t.state.slots_used == 0
        for i in range(SLOTS + 3):                # more denials than slots: slots are reused
            paddr, _ = t.fill(0x100000 + i * PAGE, UC.UC_MEM_READ)
            assert WINDOW <= paddr < WINDOW + SLOTS * PAGE


@needs_c
@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_c_and_python_fills_agree_on_a_whole_run(monkeypatch, arch):
    """The same guest under each fill: the same output, and Unicorn asked for the same fills
    and got the same denials (both are a function of the guest's accesses only)."""
    seen = []
    for mode in ("native", "python"):
        monkeypatch.setenv("KPROBE_EMU_VTLB", mode)
        out = io.BytesIO()
        g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=out)
        m = g.machine
        assert m.tlb.mode == mode
        r = m.run()
        seen.append((r.exit_code, out.getvalue(), m.tlb.state.fills, m.tlb.state.denials))
    assert seen[0] == seen[1]
    assert seen[0][2] > 0                          # the TLB was filled by the callback


@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_a_machines_data_pages_fill_without_execute(arch):
    """The machine's table is its memory: the stack and writable data fill rw without
    execute, the text r-x; no region of a Linux guest is rwx (x86's [gdt] is r--)."""
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=io.BytesIO())
    m = g.machine
    for r in m.memory.regions:
        paddr, perms = m.tlb.fill(r.start, UC.UC_MEM_READ)
        assert paddr == r.start and perms == r.prot, r
        if r.prot & W:
            assert not perms & X, r
    assert m.tlb.fill(m.sp, UC.UC_MEM_WRITE) == (m.sp & ~(PAGE - 1), R | W)
