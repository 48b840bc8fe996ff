"""The bench and cycle matrices on the sweep's backends (probes/sweep_matrix.py): `emu bench`
and benchmarks/bench_cycles.py's cells give the serial report on a local pool, stream
keyed rows to a results file and resume an interrupted run from it."""
from __future__ import annotations

import io
import json

import pytest

from conftest import ARCHES
from emu.cli import main
from probes import bench_cli
from probes.sweep_backends import LocalPool
from probes.sweep_matrix import MatrixResults, run_matrix

HOST = ("host_us_per_hit", "baseline_us_per_hit", "ratio")     # host CPU time: differs per run


def bench(*argv: str) -> tuple[int, list[dict] | str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(["bench", "--kind", "k", "--kind", "o", "--calls", "30", "--repeat", "1",
               "--progress", "plain", *argv], stdout=out, stderr=err)
    text = out.getvalue()
    return rc, (json.loads(text) if "--json" in argv and rc == 0 else text), err.getvalue()


def modelled(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in HOST} for r in rows]


@pytest.mark.parametrize("arch", ARCHES)
def test_bench_on_two_jobs_gives_the_serial_cycles(arch):
    rc1, serial, err = bench("--arch", arch, "--jobs", "1", "--json")
    rc2, pooled, err2 = bench("--arch", arch, "--jobs", "2", "--json")
    assert rc1 == rc2 == 0, err + err2
    assert isinstance(serial, list) and isinstance(pooled, list)
    assert modelled(pooled) == modelled(serial)
    assert [(r["kind"], r["engine"]) for r in serial] == \
        [("k", ""), ("k", "python"), ("k", "jit"), ("o", ""), ("o", "python"), ("o", "jit")]
    assert all(r["cycles_per_hit"] > 0 and r["host_us_per_hit"] is not None for r in serial)
    assert f"emu: bench: 6/6 rows" in err2


def test_bench_table_says_which_figures_are_host_time():
    rc, text, err = bench("--arch", "x86_64", "--jobs", "2")
    assert rc == 0, err
    assert "host µs and hook µs are host CPU time (local, 2 jobs)" in text
    assert "cycles are modelled" in text


def test_profile_all_adds_a_row_block_per_profile():
    rc, rows, err = bench("--arch", "arm64", "--profile", "all", "--jobs", "2", "--json")
    assert rc == 0, err
    assert [r["profile"] for r in rows if not r["bpf"]] == \
        ["cortex-a55", "cortex-a55", "cortex-a72", "cortex-a72"]
    a55, a72 = (next(r for r in rows if r["profile"] == p and r["kind"] == "k" and not r["bpf"])
                for p in ("cortex-a55", "cortex-a72"))
    assert a55["cycles_per_hit"] != a72["cycles_per_hit"]       # the profile is used


class Interrupt(BaseException):
    pass


def test_bench_resumes_an_interrupted_run(tmp_path, monkeypatch):
    path = tmp_path / "bench.jsonl"
    rc, whole, err = bench("--arch", "x86_64", "--jobs", "1", "--json")
    assert rc == 0, err
    real, ran = bench_cli.measure_cell, []

    def dies_after_two(inputs, cell):
        if len(ran) == 2:
            raise Interrupt                     # as a ^C in the middle of the matrix
        ran.append(cell.key)
        return real(inputs, cell)
    monkeypatch.setattr(bench_cli, "measure_cell", dies_after_two)
    with pytest.raises(Interrupt):
        bench("--arch", "x86_64", "--jobs", "1", "--json", "--results", str(path))
    assert len(path.read_text().splitlines()) == 2
    with path.open("ab") as f:
        f.write(b'{"cell": ["x86_64", "sky')             # a torn last line
    ran.clear()
    monkeypatch.setattr(bench_cli, "measure_cell", lambda i, c: (ran.append(c.key), real(i, c))[1])
    rc, resumed, err = bench("--arch", "x86_64", "--jobs", "1", "--json", "--resume", str(path))
    assert rc == 0, err
    assert len(ran) == 4 and ("x86_64", "skylake", "k", "-") not in ran
    assert modelled(resumed) == modelled(whole)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 6 and {x["matrix"] for x in lines} == {"bench"}
    assert "emu: bench: 6/6 rows" in err


def test_resume_refuses_another_matrix(tmp_path):
    path = tmp_path / "bench.jsonl"
    rc, _, err = bench("--arch", "x86_64", "--kind", "o", "--jobs", "1", "--results", str(path))
    assert rc == 0, err
    out, err2 = io.StringIO(), io.StringIO()
    rc = main(["bench", "--arch", "x86_64", "--kind", "o", "--calls", "31", "--repeat", "1",
               "--resume", str(path)], stdout=out, stderr=err2)
    assert rc == 2 and "results of another bench matrix" in err2.getvalue()


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "0"], "argument --jobs: 0 is out of range"),
    (["--address", "127.0.0.1:6379"], "--address needs --backend ray"),
])
def test_bad_backend_options(argv, message):
    err = io.StringIO()
    assert main(["bench", "--arch", "x86_64", *argv], stdout=io.StringIO(), stderr=err) == 2
    assert message in err.getvalue() and "Traceback" not in err.getvalue()


# --- the cycle model's matrix (benchmarks/bench_cycles.py) -------------------------------------
def small_cycles_matrix(kinds: tuple[str, ...]):
    from emu.cycles.matrix import cycles_matrix
    return cycles_matrix(kinds, repeat=1, profiles=["cortex-a55", "skylake"],
                         workloads=[("hotloop", "hot_loop", 20_000), ("hotloop", "hot_call", 2_000)])


def serial_and_pooled(m, tmp_path) -> tuple[list[dict], list[dict]]:
    from emu.cycles.matrix import modelled
    serial = run_matrix(m, LocalPool(1))
    pooled = run_matrix(m, LocalPool(2), MatrixResults(str(tmp_path / "c.jsonl")))
    assert [modelled(r) for r in pooled] == [modelled(r) for r in serial]
    resumed = run_matrix(m, LocalPool(2), MatrixResults(str(tmp_path / "c.jsonl"), resume=True))
    assert resumed == pooled                    # every cell came from the file
    return serial, pooled


def test_cycles_speed_cells_on_two_jobs_give_the_serial_figures(tmp_path):
    serial, pooled = serial_and_pooled(small_cycles_matrix(("speed",)), tmp_path)
    assert [r["arch"] for r in serial] == ["arm64", "arm64", "x86_64", "x86_64"]
    assert all(r["cycles"] > 10_000 and r["instructions"] > 10_000 for r in serial), serial
    assert serial[0]["cycles"] != serial[2]["cycles"]           # each arch on its profile


@pytest.mark.slow
def test_cycles_accuracy_cells_on_two_jobs_give_the_serial_figures(tmp_path):
    from emu.cycles.mca import llvm_mca_path
    if not llvm_mca_path():
        pytest.skip("llvm-mca is not installed (package llvm)")
    serial, _ = serial_and_pooled(small_cycles_matrix(("accuracy", "loops")), tmp_path)
    assert [(r["kind"], r["profile"]) for r in serial] == [
        ("accuracy", "cortex-a55"), ("accuracy", "skylake"), ("loops", "cortex-a55"), ("loops", "skylake")]
    assert all(0 < r["mape"] < 0.2 for r in serial[:2]) and all(r["kernels"] >= 14 for r in serial[2:])
