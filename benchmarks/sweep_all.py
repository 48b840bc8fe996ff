"""The full probe-everywhere sweep: every function of every firmware program, both arches,
in the three modes (kprobe and optprobe at every instruction, kretprobe at every function).
Prints a summary table (the README shows one) and, with --json, the per-offset results.

    .venv/bin/python benchmarks/sweep_all.py [--jobs 2] [--arch arm64] [--mode kprobe] [--json FILE]
        [--no-snapshots]

Runs start from snapshots unless --no-snapshots (every run from _start, as before them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes.sweep import SweepConfig, sweep  # noqa: E402

PROGRAMS = ("demo", "callpath", "flowdissect", "recurse", "hotloop", "insns",
            "callpath.ftrace", "recurse.ftrace", "demo.bare", "insns.bare")
MODES = ("kprobe", "optprobe", "kretprobe")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--arch", action="append", choices=["arm64", "x86_64"])
    ap.add_argument("--mode", action="append", choices=MODES)
    ap.add_argument("--program", action="append")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--no-snapshots", dest="snapshots", action="store_false")
    a = ap.parse_args()
    rows, details = [], {}
    t0 = time.perf_counter()
    print(f"{'arch':<7} {'program':<16} {'mode':<10} {'checked':>8} {'rejected':>9} "
          f"{'text-read':>9} {'mismatch':>8} {'seconds':>8}")
    for arch in a.arch or ("arm64", "x86_64"):
        for prog in a.program or PROGRAMS:
            for mode in a.mode or MODES:
                path = ROOT / "firmware" / "bin" / arch / f"{prog}.elf"
                bare = prog.endswith(".bare")
                args = ["1000"] if prog == "hotloop" else []
                t = time.perf_counter()
                res = sweep(SweepConfig(path=str(path), bare=bare, argv=args, jobs=a.jobs, mode=mode,
                                        snapshots=a.snapshots))
                dt = time.perf_counter() - t
                row = dict(arch=arch, program=prog, mode=mode, checked=res.checked,
                           rejected=res.rejected, text_reads=res.text_reads,
                           mismatches=res.mismatches, seconds=round(dt, 1))
                rows.append(row)
                details[f"{arch}/{prog}/{mode}"] = res.to_json()
                print(f"{arch:<7} {prog:<16} {mode:<10} {res.checked:>8} {res.rejected:>9} "
                      f"{res.text_reads:>9} {res.mismatches:>8} {dt:>8.1f}", flush=True)
                for r in res.results:
                    if r.verdict == "MISMATCH":
                        print(f"    MISMATCH {r.function}+{r.offset:#x} {r.insn}: {r.detail}")
    tot = {k: sum(r[k] for r in rows) for k in ("checked", "rejected", "text_reads", "mismatches")}
    print(f"total: {tot['checked']} checked, {tot['rejected']} rejected, "
          f"{tot['text_reads']} text-read, {tot['mismatches']} mismatches, "
          f"{time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": rows, "runs": details}, indent=1))
    return 1 if tot["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
