"""The cycle model's numbers: how close block costs are to llvm-mca (per profile, on the
firmware block corpus, and on loop kernels run at run time, emu/cycles/loops.py), and what cycle accounting costs in emulation speed (accounting
mode against the fast mode, native and Python block counters). Prints numbers; asserts
nothing (tests/test_cycles_mca.py holds the accuracy bounds).

The cells (emu/cycles/matrix.py) run on the sweep's backends like `emu sweep`: `--jobs N`
local worker processes or `--backend ray [--address ADDR]`, progress on stderr, `--results`
/ `--resume FILE` (JSON lines, one per cell). The report is merged in cell order; its
modelled figures are the serial run's, its host seconds are measured where each cell ran.

    .venv/bin/python benchmarks/bench_cycles.py [--json] [--repeat N] [--skip-mca] [--skip-speed]
        [--jobs N] [--backend local|ray [--address ADDR]] [--progress auto|bar|plain|none]
        [--results FILE | --resume FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emu.cycles.matrix import cycles_matrix  # noqa: E402
from emu.cycles.mca import llvm_mca_path, llvm_mca_version  # noqa: E402
from probes.sweep_cli import add_backend_options, backend_from_args, check_backend_args, make_progress  # noqa: E402
from probes.sweep_matrix import MatrixResults, run_matrix  # noqa: E402


def run(a: argparse.Namespace) -> tuple[list[dict], list[dict], list[dict]]:
    kinds = tuple(k for k, skip in (("accuracy", a.skip_mca), ("loops", a.skip_mca),
                                    ("speed", a.skip_speed))
                  if not skip and (k == "speed" or llvm_mca_path()))
    m = cycles_matrix(kinds, a.repeat)
    path = a.resume or a.results
    journal = MatrixResults(path, resume=a.resume is not None) if path else None
    rows = run_matrix(m, backend_from_args(a), journal, make_progress(a.progress, sys.stderr, "cycles", "cells"))
    by = {k: [r for r in rows if r["kind"] == k] for k in ("accuracy", "loops", "speed")}
    return by["accuracy"], by["loops"], by["speed"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-mca", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    add_backend_options(ap, "cells", "cycle bench")
    a = ap.parse_args()
    check_backend_args(a)
    acc, loops, rows = run(a)
    if a.json:
        print(json.dumps({"accuracy": acc, "loops": loops, "speed": rows}, indent=2))
        return
    if acc:
        print(f"block cost vs llvm-mca {llvm_mca_version(llvm_mca_path())} (TotalCycles/Iterations, "
              f"100 iterations), firmware block corpus")
        print(f"{'profile':<12} {'-mcpu':<12} {'blocks':>6} {'MAPE':>7} {'±20 %':>7} {'±50 %':>7}")
        for r in acc:
            print(f"{r['profile']:<12} {r['mcpu']:<12} {r['blocks']:>6} {r['mape']:>7.1%} "
                  f"{r['within_20']:>7.1%} {r['within_50']:>7.1%}")
        print()
        print("loop kernels at run time (cycles per iteration) vs llvm-mca; before = every back "
              "edge charged branch_taken, 64-bit division as the narrow divider")
        print(f"{'profile':<12} {'kernels':>7} {'mean before':>11} {'worst before':>12} "
              f"{'mean':>7} {'worst':>7}  excluded")
        for r in loops:
            ex = ", ".join(f"{k} (model {v[0]:.1f}, llvm-mca {v[1]:.1f}: {v[2]})"
                           for k, v in r["excluded"].items())
            print(f"{r['profile']:<12} {r['kernels']:>7} {r['mean_before']:>11.1%} "
                  f"{r['worst_before']:>12.1%} {r['mean']:>7.1%} {r['worst']:>7.1%}  {ex}")
        print()
    if not rows:
        return
    print("emulation speed with cycle accounting (best of runs; ratio = fast time / mode time;\n"
          "insns and cycles are modelled, MIPS and ratios are host CPU time)")
    print(f"{'arch':<7} {'workload':<28} {'insns':>9} {'cycles':>10} {'fast MIPS':>9} {'cycles MIPS':>11} "
          f"{'native':>7} {'python':>7}")
    for r in rows:
        print(f"{r['arch']:<7} {r['workload']:<28} {r['instructions']:>9} {r['cycles']:>10} {r['fast_mips']:>9} "
              f"{r['native_mips']:>11} {r['native_ratio']:>6}x {r['python_ratio']:>6}x")


if __name__ == "__main__":
    main()
