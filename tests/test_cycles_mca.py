"""The block-cost model against llvm-mca on the checked-in corpus of basic blocks cut from
the firmware (tests/data/cycles/<arch>.blocks, `python -m emu.cycles.corpus`).

Bounds (cycle-model.md): out-of-order profiles mean absolute percentage error ≤ 20 % and
≥ 90 % of blocks within ±50 %; in-order profiles MAPE ≤ 30 %."""
from __future__ import annotations

import pytest

from emu.cycles import load_profile
from emu.cycles.blockcost import block_cost
from emu.cycles.corpus import corpus_path, read_corpus
from emu.cycles.mca import block_asm, llvm_mca_path, mca_source, run_mca
from emu.cycles.ops import decode_block, disassembler

BOUNDS = {  # profile: (max MAPE, min share within ±50 %)
    "cortex-a72": (0.20, 0.90),
    "skylake": (0.20, 0.90),
    "cortex-a55": (0.30, 0.0),
}


def test_corpus_is_straight_line_code_from_the_firmware():
    for arch in ("arm64", "x86_64"):
        blocks = read_corpus(corpus_path(arch))
        assert len(blocks) >= 300
        assert len({b.code for b in blocks}) == len(blocks)
        sources = {b.source.split(":")[0] for b in blocks}
        assert {"demo.elf", "callpath.elf", "libc-hello.elf"} <= sources
        md = disassembler(arch)
        for b in blocks:
            insns = list(md.disasm(b.code, b.addr))
            assert sum(i.size for i in insns) == len(b.code), b.id
            assert not any(i.mnemonic in ("bl", "call", "svc", "syscall", "brk", "int3", "mrs")
                           for i in insns), b.id
            # only the last instruction may branch
            assert not any(i.group(1) for i in insns[:-1]), b.id


def test_mca_source_markers_and_branch_targets():
    src = mca_source("arm64", [("a", bytes.fromhex("1f0001eb41000054"))])   # cmp x0,x1; b.ne
    assert src.splitlines() == ["# LLVM-MCA-BEGIN a", "cmp x0, x1", "b.ne .", "# LLVM-MCA-END"]
    assert block_asm("x86_64", bytes.fromhex("4801c37502"))[-1] == "jne ."


@pytest.mark.skipif(llvm_mca_path() is None, reason="llvm-mca is not installed")
@pytest.mark.parametrize("name", sorted(BOUNDS))
@pytest.mark.slow
def test_block_costs_track_llvm_mca(name, record_property):
    prof = load_profile(name)
    blocks = read_corpus(corpus_path(prof.isa))
    ref = run_mca(prof.isa, prof.llvm_mcpu, [(b.id, b.code) for b in blocks])
    md = disassembler(prof.isa)
    errors = []
    for b in blocks:
        ours = block_cost(prof, decode_block(prof.isa, b.code, b.addr, md)).cycles
        errors.append(abs(float(ours) - float(ref[b.id])) / float(ref[b.id]))
    mape = sum(errors) / len(errors)
    within = sum(e <= 0.5 for e in errors) / len(errors)
    record_property("mape", round(mape, 4))
    record_property("within_50", round(within, 4))
    print(f"\n{name} vs llvm-mca -mcpu={prof.llvm_mcpu}: {len(blocks)} blocks, "
          f"MAPE {mape:.1%}, within ±50 %: {within:.1%}")
    max_mape, min_within = BOUNDS[name]
    assert mape <= max_mape, f"{name}: MAPE {mape:.1%} > {max_mape:.0%}"
    assert within >= min_within, f"{name}: only {within:.1%} of blocks within ±50 %"


@pytest.mark.skipif(llvm_mca_path() is None, reason="llvm-mca is not installed")
def test_cost_source_llvm_mca_after_a_warm_up(tmp_path, monkeypatch):
    """Optional run-time source: the blocks of a warm-up run go to llvm-mca in one batch,
    cached on disk; later runs are charged llvm-mca's costs."""
    from conftest import firmware_elf
    from probes.testing import ProbeLab
    monkeypatch.setenv("KPROBE_EMU_CACHE", str(tmp_path))
    lab = ProbeLab.load(firmware_elf("x86_64", "hotloop"))
    model = lab.machine.enable_cycle_model("skylake", cost_source="llvm-mca")
    clock = lab.machine.clock
    c0 = clock.cycles
    lab.call("hot_loop", 1000)
    modelled = clock.cycles - c0
    model.warm_up_mca()
    assert list(tmp_path.glob("mca-*-skylake.json"))
    c1 = clock.cycles
    lab.call("hot_loop", 1000)
    from_mca = clock.cycles - c1
    assert from_mca != modelled
    assert abs(from_mca - modelled) <= modelled * 0.2      # the model tracks llvm-mca here
