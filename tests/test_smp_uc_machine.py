"""One Unicorn per vCPU (issue 19), at the machine level, no compiler needed: the Ucs share
one guest memory (map, protect, unmap and later maps reach every Uc), every hook is on
every Uc (those installed before the CPUs existed too), a run goes on the current CPU's Uc,
and each Uc has its own translation cache, which `flush_code(cpu=...)` syncs."""
from __future__ import annotations

import pytest

from conftest import ARCHES, assemble
from emu.machine import Machine
from emu.memory import PROT_EXEC, PROT_READ, PROT_WRITE

RWX = PROT_READ | PROT_WRITE | PROT_EXEC
CODE = 0x10000
# `x0/rax = 1` in one block, a jump to a second block, which `until` ends: the first block
# is translated once and cached (the block ending at `until` is retranslated every run).
SOURCE = {"arm64": ("mov x0, #{v}; b next; next: nop; nop", "x0"),
          "x86_64": ("mov rax, {v}; jmp next; next: nop; nop", "rax")}


def _machine(arch: str, cpus: int) -> Machine:
    m = Machine(arch)
    m.memory.map(CODE, 0x4000, RWX, "text")
    m.set_nr_cpus(cpus)
    return m


def _layouts(m: Machine) -> list[list[tuple[int, int, int]]]:
    return [sorted(uc.mem_regions()) for uc in m.ucs]


@pytest.mark.parametrize("arch", ARCHES)
def test_every_cpu_has_its_own_uc_over_one_memory(arch):
    m = Machine(arch)
    m.memory.map(CODE, 0x4000, RWX, "text")
    m.memory.write(CODE + 0x3000, b"kept")              # written before the CPUs exist
    m.set_nr_cpus(3)
    assert len(m.ucs) == 1                              # a CPU's Uc is made when it runs
    assert len({id(m.uc_of(cpu)) for cpu in range(3)}) == 3 and len(m.ucs) == 3
    assert bytes(m.ucs[2].mem_read(CODE + 0x3000, 4)) == b"kept"
    m.ucs[1].mem_write(CODE + 0x100, b"one")            # a store on one CPU ...
    assert bytes(m.ucs[0].mem_read(CODE + 0x100, 3)) == b"one"   # ... seen by the others
    m.memory.protect(CODE + 0x1000, 0x1000, PROT_READ)
    m.memory.unmap(CODE + 0x2000, 0x1000)
    m.memory.map(0x40000, 0x2000, PROT_READ | PROT_WRITE, "later")
    layouts = _layouts(m)
    assert layouts[0] == layouts[1] == layouts[2]
    assert (CODE + 0x1000, CODE + 0x1FFF, PROT_READ) in layouts[0]
    assert not any(lo <= CODE + 0x2000 <= hi for lo, hi, _p in layouts[0])
    m.ucs[2].mem_write(0x40010, b"new")
    assert bytes(m.ucs[0].mem_read(0x40010, 3)) == b"new"
    assert bytes(m.ucs[1].mem_read(CODE + 0x3000, 4)) == b"kept"   # split, still shared
    m.memory.unmap(CODE, 0x4000)
    assert _layouts(m)[0] == _layouts(m)[2] and m.memory.mapped_bytes == 0x2000


@pytest.mark.parametrize("arch", ARCHES)
def test_hooks_are_on_every_cpu_and_a_run_uses_the_current_cpus_uc(arch):
    m = Machine(arch)
    m.memory.map(CODE, 0x4000, RWX, "text")
    src, _reg = SOURCE[arch]
    code = assemble(arch, src.format(v=1), CODE)
    m.memory.write(CODE, code)
    seen: list[tuple[str, int, bool]] = []
    early = m.hooks.code(lambda a, _s: seen.append(("early", m.cpu, m.uc is m.uc_of(m.cpu))),
                         CODE, CODE)
    m.set_nr_cpus(2)
    m.uc_of(1)
    m.hooks.block(lambda a, _s: seen.append(("late", m.cpu, m.uc is m.uc_of(m.cpu))), CODE, CODE)
    assert len(m.hooks.handles_of(early)) == 2
    for cpu in (1, 0):
        m.use_cpu(cpu)
        m.set_cpu(cpu)
        r = m.run(begin=CODE, until=CODE + len(code) - m.arch.insn_align)
        assert r.message.startswith("reached"), r
    assert sorted(seen) == sorted([("early", 1, True), ("late", 1, True),
                                   ("early", 0, True), ("late", 0, True)])
    m.hooks.delete(early)
    seen.clear()
    m.run(begin=CODE, until=CODE + len(code) - m.arch.insn_align)
    assert [s[0] for s in seen] == ["late"]               # gone from every Uc


@pytest.mark.parametrize("arch", ARCHES)
def test_translation_caches_are_per_cpu_until_each_syncs(arch):
    m = _machine(arch, 2)
    src, reg = SOURCE[arch]
    old, new = (assemble(arch, src.format(v=v), CODE) for v in (1, 2))
    m.memory.write(CODE, old)
    until = CODE + len(old) - m.arch.insn_align

    def run_on(cpu: int) -> int:
        m.use_cpu(cpu)
        m.set_cpu(cpu)
        m.run(begin=CODE, until=until)
        return m.reg(reg)

    assert (run_on(0), run_on(1)) == (1, 1)               # both CPUs translated the old code
    m.text_poke(CODE, new[:len(new) - 3 * m.arch.insn_align], sync=False)   # on CPU 1 only
    assert run_on(1) == 2                                  # the patching CPU runs the new code
    assert run_on(0) == 1                                  # CPU 0 still runs its translation
    m.flush_code(CODE, CODE + len(new), cpu=0)             # ... until it syncs
    assert run_on(0) == 2
    m.text_poke(CODE, old[:len(old) - 3 * m.arch.insn_align])   # sync=True: every CPU at once
    assert (run_on(0), run_on(1)) == (1, 1)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_snapshot_keeps_every_cpus_registers_and_the_shared_memory(arch):
    """Every CPU's Uc is made at the snapshot and each keeps its own registers; mappings
    made or dropped since, and bytes written, come back on every Uc."""
    m = _machine(arch, 2)
    reg = SOURCE[arch][1]
    m.memory.write(CODE + 0x3000, b"before")
    m.use_cpu(1)
    m.set_reg(reg, 0x11)
    m.use_cpu(0)
    m.set_reg(reg, 0x22)
    snap = m.snapshot()
    assert len(m.ucs) == 2
    m.memory.write(CODE + 0x3000, b"after!")
    m.memory.map(0x40000, 0x1000, RWX, "late")
    m.memory.unmap(CODE + 0x2000, 0x1000)
    m.use_cpu(1)
    m.set_reg(reg, 0x33)
    m.restore(snap)
    assert m.reg(reg) == 0x22 and m.uc is m.uc_of(0)
    m.use_cpu(1)
    assert m.reg(reg) == 0x11
    want = _layouts(m)[0]
    assert _layouts(m) == [want, want] and (0x40000, 0x40FFF, 7) not in want
    assert all(bytes(uc.mem_read(CODE + 0x3000, 6)) == b"before" for uc in m.ucs)
    m.memory.write(CODE + 0x2000, b"shared")          # the mapping dropped since is back, shared
    assert bytes(m.ucs[0].mem_read(CODE + 0x2000, 6)) == b"shared"
