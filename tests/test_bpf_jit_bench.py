"""`emu bench` rows with the counting program JITed into the guest (issue 17): the row's
modelled cycles are the JITed code as the CPU profile runs it (plus the fixed BPF entry
cost of a host-side run, no per-instruction charge; an optimized probe's thunk and a plain
kprobe's stub are guest code entirely),
repeat run to run, and the table shows the JIT rows."""
from __future__ import annotations

import json

import pytest

from conftest import ARCHES, run_emu
from emu.cycles import profile_for
from probes import bench


def row(arch: str, kind: str, bpf: bool, engine: str = "python") -> bench.BenchRow:
    return bench.measure(arch, kind, arg=100, repeat=1, bpf=bpf, engine=engine)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kind", ["k", "o", "kr"])
def test_jit_row_charges_the_jited_code(arch, kind) -> None:
    plain, jit = row(arch, kind, False), row(arch, kind, True, "jit")
    prof = profile_for(arch)
    runs = 2 if kind == "kr" else 1
    assert jit.engine == "jit" and jit.hits == plain.hits == 100
    if kind == "o":      # the optprobe's thunk calls the image: no host entry, all guest code
        assert not {"bpf", "detour", "handler"} & set(jit.breakdown)
    else:
        # no interpreter-style charge; a plain kprobe's programs run from a guest stub
        # (jit_direct.py: guest code, no host entry); kr's kprobe shares its address with
        # the kretprobe's (an aggregated probe) and keeps the host side, while the
        # kretprobe's return runs its programs from a stub too
        host_runs = {"k": 0, "kr": 1}[kind]
        assert jit.breakdown.get("bpf", 0) == host_runs * prof.bpf_entry
    # the JITed code runs on the profile: more guest code per hit than the bare probe
    assert jit.breakdown["code"] > plain.breakdown.get("code", 0) + runs * 5
    if kind != "o":      # (a bare optprobe's Python handler is charged more than the thunk)
        assert jit.cycles_per_hit > plain.cycles_per_hit
    again = row(arch, kind, True, "jit")
    assert (again.cycles_per_hit, again.breakdown) == (jit.cycles_per_hit, jit.breakdown)


def test_bench_table_has_jit_rows() -> None:
    got = run_emu("bench", "--arch", "all", "--kind", "o", "--calls", "40", "--repeat", "1",
                  "--json")
    assert got.rc == 0, got.err
    rows = json.loads(got.out)
    for arch in ARCHES:
        engines = [r["engine"] for r in rows if r["arch"] == arch and r["bpf"]]
        assert engines == ["python", "jit"]
        jit = next(r for r in rows if r["arch"] == arch and r["engine"] == "jit")
        assert jit["cycles_per_hit"] > 0 and jit["host_us_per_hit"] is not None
    table = run_emu("bench", "--arch", "x86_64", "--kind", "o", "--calls", "40", "--repeat", "1")
    assert any(line.split()[3:4] == ["jit"] for line in table.out.splitlines()), table.out
