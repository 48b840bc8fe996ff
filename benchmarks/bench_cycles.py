"""The cycle model's numbers: how close block costs are to llvm-mca (per profile, on the
firmware block corpus, and on loop kernels run at run time, emu/cycles/loops.py), and what cycle accounting costs in emulation speed (accounting
mode against the fast mode, native and Python block counters). Prints numbers; asserts
nothing (tests/test_cycles_mca.py holds the accuracy bounds).

    .venv/bin/python benchmarks/bench_cycles.py [--json] [--repeat N] [--skip-mca] [--skip-speed]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emu.cycles import load_profile, profile_names  # noqa: E402
from emu.cycles.blockcost import block_cost  # noqa: E402
from emu.cycles.corpus import corpus_path, read_corpus  # noqa: E402
from emu.cycles.loops import compare as compare_loops, old_choices, summary  # noqa: E402
from emu.cycles.mca import llvm_mca_path, llvm_mca_version, run_mca  # noqa: E402
from emu.cycles.ops import decode_block, disassembler  # noqa: E402
from probes.testing import ProbeLab  # noqa: E402

# (firmware, function, argument): an ALU loop (one tiny block per iteration, the worst
# case for per-block accounting), a call loop, and the parser over its packets.
WORKLOADS = [("hotloop", "hot_loop", 3_000_000), ("hotloop", "hot_call", 1_000_000),
             ("flowdissect", "main", 0)]


def accuracy(name: str) -> dict:
    prof = load_profile(name)
    blocks = read_corpus(corpus_path(prof.isa))
    ref = run_mca(prof.isa, prof.llvm_mcpu, [(b.id, b.code) for b in blocks])
    md = disassembler(prof.isa)
    errs = []
    for b in blocks:
        ours = float(block_cost(prof, decode_block(prof.isa, b.code, b.addr, md)).cycles)
        errs.append(abs(ours - float(ref[b.id])) / float(ref[b.id]))
    return {"profile": name, "mcpu": prof.llvm_mcpu, "blocks": len(blocks),
            "mape": round(sum(errs) / len(errs), 4),
            "within_50": round(sum(e <= 0.5 for e in errs) / len(errs), 4),
            "within_20": round(sum(e <= 0.2 for e in errs) / len(errs), 4)}


def loop_accuracy(name: str) -> dict:
    """Loop kernels run at run time (emu/cycles/loops.py) against llvm-mca, with the profile's
    loop-back and divider choices and without them (`old_choices`)."""
    prof = load_profile(name)
    rows = compare_loops(prof)
    before, worst_before = summary(compare_loops(old_choices(prof)))
    mean, worst = summary(rows)
    return {"profile": name, "kernels": len(rows), "mean_before": round(before, 4),
            "worst_before": round(worst_before, 4), "mean": round(mean, 4), "worst": round(worst, 4),
            "excluded": {r.kernel: [float(r.model), float(r.mca), r.excluded] for r in rows if r.excluded}}


def _lab(arch: str, elf: str, mode: str) -> ProbeLab:
    lab = ProbeLab.load(ROOT / "firmware" / "bin" / arch / f"{elf}.elf")
    if mode != "fast":
        lab.machine.enable_cycle_model(None, use_native=(mode == "native"))
    return lab


def speed(arch: str, elf: str, func: str, arg: int, repeat: int) -> dict:
    modes = ("fast", "native", "python")
    labs = {m: _lab(arch, elf, m) for m in modes}
    best = dict.fromkeys(modes, float("inf"))
    for lab in labs.values():                   # warm up: translate, cost the blocks
        lab.call(func, min(arg, 1000), timeout=600)
    for _ in range(repeat):                     # interleaved: load changes hit every mode
        for m in modes:
            a = arg // 20 if m == "python" and arg >= 20 else arg    # python: a shorter run
            t = time.thread_time()              # CPU time: other load on the host counts less
            labs[m].call(func, a, timeout=600)
            best[m] = min(best[m], (time.thread_time() - t) * (arg / a if a else 1))
    insns = labs["native"].machine.clock.instructions
    labs["native"].call(func, arg, timeout=600)
    insns = labs["native"].machine.clock.instructions - insns
    return {"arch": arch, "workload": f"{elf}:{func}({arg})", "instructions": insns,
            "fast_s": round(best["fast"], 4), "native_s": round(best["native"], 4),
            "python_s": round(best["python"], 4),
            "fast_mips": round(insns / best["fast"] / 1e6, 1),
            "native_mips": round(insns / best["native"] / 1e6, 1),
            "native_ratio": round(best["fast"] / best["native"], 3),
            "python_ratio": round(best["fast"] / best["python"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-mca", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    acc, loops = [], []
    if not a.skip_mca and llvm_mca_path():
        acc = [accuracy(n) for n in profile_names()]
        loops = [loop_accuracy(n) for n in profile_names()]
    rows = [] if a.skip_speed else [speed(arch, *w, a.repeat) for arch in ("arm64", "x86_64")
                                    for w in WORKLOADS]
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
    print("emulation speed with cycle accounting (best of runs; ratio = fast time / mode time)")
    print(f"{'arch':<7} {'workload':<28} {'insns':>9} {'fast MIPS':>9} {'cycles MIPS':>11} "
          f"{'native':>7} {'python':>7}")
    for r in rows:
        print(f"{r['arch']:<7} {r['workload']:<28} {r['instructions']:>9} {r['fast_mips']:>9} "
              f"{r['native_mips']:>11} {r['native_ratio']:>6}x {r['python_ratio']:>6}x")


if __name__ == "__main__":
    main()
