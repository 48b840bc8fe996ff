"""A real program's hottest functions swept with 0 mismatches: LZ4's block compressor (its
public source in tests/data/sweep/lz4, built static here for each arch) compressing and
decompressing a generated text; runs start from snapshots on a pool of 2 workers."""
from __future__ import annotations

import pytest

from conftest import ARCHES, ROOT
from probes.sweep import SweepConfig, hottest_functions, sweep
from probes.sweep_backends import LocalPool

SRC = ROOT / "tests" / "data" / "sweep" / "lz4"


@pytest.fixture(scope="module")
def lz4_prog(c_prog):
    def build(arch: str) -> str:
        return str(c_prog(arch, SRC / "lz4_sweep.c", extra=(f"-I{SRC}", str(SRC / "lz4.c"))))
    return build


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_lz4_hottest_functions_sweep_clean(lz4_prog, arch):
    path = lz4_prog(arch)
    funcs = hottest_functions(SweepConfig(path=path), 3)
    assert len(funcs) == 3 and any("LZ4" in f for f in funcs), funcs
    res = sweep(SweepConfig(path=path, funcs=funcs, timeout=120), LocalPool(2))
    assert res.baseline is not None and res.baseline.exit_code == 0
    assert res.baseline.stdout.length > 40
    assert res.mismatches == 0, [r for r in res.results if r.verdict == "MISMATCH"][:3]
    assert res.checked >= 300
    hit = [r for r in res.results if r.hits]
    assert len(hit) >= 100                      # probes really ran in the hot code
    assert {r.function for r in hit} == set(funcs)
