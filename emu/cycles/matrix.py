"""The cycle model's bench as a matrix of independent cells (benchmarks/bench_cycles.py runs
it on the sweep's backends, probes/sweep_matrix.py): per profile, block costs against
llvm-mca on the firmware corpus ("accuracy") and loop kernels run at run time ("loops");
per arch and workload, the speed of cycle accounting against the fast mode ("speed").

Every figure is modelled (cycles, instructions, llvm-mca's cycles: the same on every run and
host) except the speed cells' `*_s`, `*_mips` and `*_ratio`, which are host CPU seconds."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("accuracy", "loops", "speed")

# (firmware, function, argument): an ALU loop (one tiny block per iteration, the worst
# case for per-block accounting), a call loop, and the parser over its packets.
WORKLOADS = [("hotloop", "hot_loop", 3_000_000), ("hotloop", "hot_call", 1_000_000),
             ("flowdissect", "main", 0)]
ARCHES = ("arm64", "x86_64")
# The host-time keys of a speed cell: they differ from run to run, everything else does not.
HOST_KEYS = ("fast_s", "native_s", "python_s", "fast_mips", "native_mips", "native_ratio",
             "python_ratio")


def accuracy(name: str) -> dict:
    from emu.cycles import load_profile
    from emu.cycles.blockcost import block_cost
    from emu.cycles.corpus import corpus_path, read_corpus
    from emu.cycles.mca import run_mca
    from emu.cycles.ops import decode_block, disassembler
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
    from emu.cycles import load_profile
    from emu.cycles.loops import compare, old_choices, summary
    prof = load_profile(name)
    rows = compare(prof)
    before, worst_before = summary(compare(old_choices(prof)))
    mean, worst = summary(rows)
    return {"profile": name, "kernels": len(rows), "mean_before": round(before, 4),
            "worst_before": round(worst_before, 4), "mean": round(mean, 4), "worst": round(worst, 4),
            "excluded": {r.kernel: [float(r.model), float(r.mca), r.excluded] for r in rows if r.excluded}}


def _lab(arch: str, elf: str, mode: str):
    from probes.testing import ProbeLab        # the bench calls guest functions
    lab = ProbeLab.load(str(ROOT / "firmware" / "bin" / arch / f"{elf}.elf"))
    if mode != "fast":
        lab.machine.enable_cycle_model(None, use_native=(mode == "native"))
    return lab


def speed(arch: str, elf: str, func: str, arg: int, repeat: int) -> dict:
    """Host time of one workload in the fast mode and with cycle accounting (native and
    Python block counters), and its modelled instructions and cycles."""
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
    clock = labs["native"].machine.clock
    insns, cycles = clock.instructions, clock.cycles
    labs["native"].call(func, arg, timeout=600)
    insns, cycles = clock.instructions - insns, clock.cycles - cycles
    return {"arch": arch, "workload": f"{elf}:{func}({arg})", "instructions": insns,
            "cycles": cycles, "fast_s": round(best["fast"], 4), "native_s": round(best["native"], 4),
            "python_s": round(best["python"], 4),
            "fast_mips": round(insns / best["fast"] / 1e6, 1),
            "native_mips": round(insns / best["native"] / 1e6, 1),
            "native_ratio": round(best["fast"] / best["native"], 3),
            "python_ratio": round(best["fast"] / best["python"], 3)}


def cycles_matrix(kinds: tuple[str, ...] = KINDS, repeat: int = 5, profiles: list[str] | None = None,
                  arches: tuple[str, ...] = ARCHES, workloads: list | None = None):
    """The cells in report order: accuracy per profile, loops per profile, speed per arch
    and workload. A probes.sweep_matrix.Matrix."""
    from emu.cycles import profile_names
    from probes.sweep_matrix import Cell, Matrix
    specs: list[tuple[Any, ...]] = []
    names = profiles if profiles is not None else profile_names()
    for kind in ("accuracy", "loops"):
        if kind in kinds:
            specs += [(kind, n) for n in names]
    if "speed" in kinds:
        specs += [("speed", a, *w) for a in arches for w in (workloads or WORKLOADS)]
    cells = [Cell(i, tuple(str(x) for x in s), s) for i, s in enumerate(specs)]
    return Matrix("cycles", (repeat,), cells, cycles_cell)


def cycles_cell(inputs: tuple[int], cell) -> dict:
    """One cell's figures (a pool or Ray worker runs it)."""
    kind, *rest = cell.spec
    if kind == "accuracy":
        return {"kind": kind, **accuracy(rest[0])}
    if kind == "loops":
        return {"kind": kind, **loop_accuracy(rest[0])}
    arch, elf, func, arg = rest
    return {"kind": kind, **speed(arch, elf, func, arg, inputs[0])}


def modelled(row: dict) -> dict:
    """A cell's figures without its host time: what every backend must agree on."""
    return {k: v for k, v in row.items() if k not in HOST_KEYS}
