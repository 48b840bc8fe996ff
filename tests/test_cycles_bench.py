"""`emu bench`: the kprobes.rst overhead table in modelled cycles, and its ordering."""
from __future__ import annotations

import argparse
import io
import json
import sys

import pytest

from conftest import ARCHES
from emu.cycles import profile_for
from probes import bench, bench_cli, bench_kinds

CALLS = {"hotloop": 300, "recurse.ftrace": 10, "tpdemo": 300}   # small runs: cycles per hit are exact


def row(arch: str, kind: str, **kw) -> bench.BenchRow:
    elf = bench_kinds.KIND_GUESTS[kind][0]
    return bench.measure(arch, kind, arg=CALLS[elf], repeat=1, **kw)


@pytest.mark.parametrize("arch", ARCHES)
def test_kprobe_row_breaks_down_by_reason(arch):
    r = row(arch, "k")
    prof = profile_for(arch)
    assert r.profile == prof.name and r.hits == 300 and not r.bpf
    assert r.breakdown["trap"] == prof.exc_entry + prof.exc_return
    assert r.breakdown["handler"] == 2 * prof.handler          # pre and post handler
    assert r.breakdown["step"] >= prof.single_step
    assert r.cycles_per_hit == pytest.approx(sum(r.breakdown.values()), abs=1)
    # Host times are measured, never asserted (they are differences of noisy timings).
    assert isinstance(r.host_us_per_hit, float) and isinstance(r.baseline_us_per_hit, float)
    assert row(arch, "k").cycles_per_hit == r.cycles_per_hit    # modelled: deterministic


def test_profile_choice_changes_the_modelled_cost():
    a72, a55 = row("arm64", "k"), row("arm64", "k", profile="cortex-a55")
    assert a55.profile == "cortex-a55" and a55.cycles_per_hit < a72.cycles_per_hit


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.slow
def test_overhead_ordering_matches_the_kernel_documentation(arch):
    """kprobes.rst: o < b < k < r and ro < rb < r (for the kinds implemented here)."""
    cyc = {}
    for kind in bench_kinds.KINDS:
        r = row(arch, kind)
        if r.cycles_per_hit is not None:
            cyc[kind] = r.cycles_per_hit
    assert "k" in cyc and "r" in cyc
    for chain in (("o", "b", "k", "r"), ("ro", "rb", "r")):
        present = [k for k in chain if k in cyc]
        values = [cyc[k] for k in present]
        assert values == sorted(values) and len(set(values)) == len(values), (arch, cyc)
    if "kr" in cyc:
        assert cyc["kr"] >= cyc["k"]


def test_not_implemented_kinds_are_na(monkeypatch):
    def setup(kind, lab, func):
        raise NotImplementedError("not yet")
    monkeypatch.setattr(bench_kinds, "setup_kind", setup)
    r = row("x86_64", "o")
    assert r.cycles_per_hit is None and r.note == "not yet"
    out = io.StringIO()
    bench.format_table([r], out)
    line = out.getvalue().splitlines()[-1].split()
    assert line[:8] == ["x86_64", "skylake", "o", "-", "n/a", "n/a", "n/a", "n/a"]


def bench_main(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="emu")
    bench_cli.add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    old, sys.stdout = sys.stdout, io.StringIO()
    try:
        rc = args.func(args)
        return rc, sys.stdout.getvalue()
    finally:
        sys.stdout = old


def test_bench_json_rows():
    rc, out = bench_main(["--arch", "x86_64", "--kind", "k", "--calls", "200", "--repeat", "1",
                          "--json"])
    assert rc == 0
    rows = json.loads(out)
    assert len(rows) == 3      # the kind, then with a BPF program: compiled Python, guest JIT
    assert rows[1]["bpf"] and rows[1]["kind"] == "k" and rows[1]["engine"] == "python"
    assert rows[2]["bpf"] and rows[2]["kind"] == "k" and rows[2]["engine"] == "jit"
    r = rows[0]
    assert {"arch", "kind", "bpf", "cycles_per_hit", "host_us_per_hit",
            "baseline_us_per_hit"} <= set(r)
    assert (r["arch"], r["kind"], r["bpf"]) == ("x86_64", "k", False)


def test_bench_table_and_profile_check():
    rc, out = bench_main(["--arch", "arm64", "--profile", "cortex-a55", "--kind", "k",
                          "--calls", "200", "--repeat", "1"])
    assert rc == 0 and "cortex-a55" in out and "trap" in out
    from emu.errors import UsageError
    with pytest.raises(UsageError, match="skylake is for x86_64"):
        bench_main(["--arch", "arm64", "--profile", "skylake"])


@pytest.mark.slow
def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    rc, _ = bench_main(["--arch", "x86_64", "--kind", "k", "--calls", "100", "--repeat", "1",
                        "--plot", str(png)])
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_emu_bench_subcommand():
    from conftest import run_emu
    r = run_emu("bench", "--arch", "x86_64", "--kind", "k", "--calls", "100", "--repeat", "1",
                "--json")
    assert r.rc == 0, r.err
    assert json.loads(r.stdout)[0]["kind"] == "k"


def test_bench_plot_without_matplotlib_is_a_usage_error(monkeypatch):
    import builtins
    from emu.errors import UsageError
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UsageError, match=r"--plot needs matplotlib"):
        bench.plot([], "x.png")
