"""`emu bench` rows with the counting BPF program attached: the program's instructions
are charged by the CPU profile, on top of the same kind without it."""
from __future__ import annotations

import pytest

from conftest import ARCHES
from emu.cycles import profile_for
from probes import bench, bench_kinds

COUNTER_INSNS = 10           # instructions one run of bench_kinds.COUNTER_ASM executes


def row(arch: str, kind: str, bpf: bool) -> bench.BenchRow:
    return bench.measure(arch, kind, arg=200, repeat=1, bpf=bpf)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kind", ["k", "o", "r", "kr"])
def test_bpf_row_adds_the_program(arch, kind) -> None:
    plain, with_bpf = row(arch, kind, False), row(arch, kind, True)
    prof = profile_for(arch)
    per_run = prof.bpf_entry + COUNTER_INSNS * prof.bpf_insn
    runs = 2 if kind == "kr" else 1           # kr: the entry probe and the return probe
    assert with_bpf.bpf and with_bpf.hits == plain.hits == 200
    assert with_bpf.breakdown["bpf"] == runs * per_run
    assert with_bpf.cycles_per_hit == pytest.approx(plain.cycles_per_hit + runs * per_run)
    assert isinstance(with_bpf.host_us_per_hit, float)


def test_counting_program_counts() -> None:
    from probes.testing import ProbeLab
    lab = ProbeLab.load(bench.guest_path("x86_64", "hotloop"))
    probes = bench_kinds.setup_kind("k", lab, "hot_leaf", bpf=True)
    lab.call("hot_call", 25, timeout=60)
    counts = probes[0].pre_handler.__self__.prog_array.progs()[0].maps[3]
    assert int.from_bytes(counts.lookup(0), "little") == 25
