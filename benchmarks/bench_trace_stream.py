"""Host time of the CLI streaming a kprobe event: `emu trace --event 'p:...'` as a user types
it, in a subprocess, against the same command with no event. Prints a table; asserts
nothing. Compare two checkouts (before/after a change) with --tree.

    python benchmarks/bench_trace_stream.py [--arch all] [--repeat 5] [--tree DIR]...

Workloads:
  demo      the demo firmware, `p:b/leaf hot_leaf x=$arg1:u64` (1,000 hits)
  hotloop   the hotloop firmware with `-- 10 100000`: the same event, 100,000 hits
  filtered  the same with `--filter leaf 'x == 7'`: 100,000 hits, one line printed (the
            hit path alone: the commit, no formatting)
Each cell is the median (best in brackets) of `repeat` runs, interleaved across trees:
wall seconds and the child's user+system CPU seconds; `µs/hit` is the CPU time beyond
the run with no event, per hit. The machine's load average is printed too.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVENT = "p:b/leaf hot_leaf x=$arg1:u64"
HOT = ["--", "10", "100000"]
WORKLOADS = {"demo": ("demo", [], [], 1000), "hotloop": ("hotloop", [], HOT, 100_000),
             "filtered": ("hotloop", ["--filter", "leaf", "x == 7"], HOT, 100_000)}


def run_once(tree: Path, arch: str, workload: str, event: bool) -> tuple[float, float, int]:
    """(wall s, child CPU s, lines of trace) of one `emu trace`."""
    prog, options, args, _hits = WORKLOADS[workload]
    argv = [sys.executable, "-m", "emu.cli", "trace", str(ROOT / "firmware" / "bin" / arch / f"{prog}.elf")]
    argv += (["--event", EVENT, *options] if event else []) + args
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=tree, stdout=subprocess.PIPE,   # `-m` looks in cwd first
                          stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout.count(b"\n")


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} ({min(values):5.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="all", choices=["all", "arm64", "x86_64"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tree", action="append", type=Path, help="a checkout to time (default: this one)")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS))
    a = ap.parse_args()
    trees = a.tree or [ROOT]
    arches = ["arm64", "x86_64"] if a.arch == "all" else [a.arch]
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'tree':<22} {'arch':<7} {'workload':<8} {'lines':>7} {'wall s':>15} {'cpu s':>15} "
          f"{'no-event cpu s':>15} {'µs/hit':>7}")
    for arch in arches:
        for workload in a.workload or list(WORKLOADS):
            samples: dict[Path, dict[str, list[float]]] = {t: {"wall": [], "cpu": [], "base": []} for t in trees}
            lines = {}
            for _ in range(a.repeat):
                for t in trees:                         # interleaved: the load hits both alike
                    wall, cpu, lines[t] = run_once(t, arch, workload, True)
                    samples[t]["wall"].append(wall)
                    samples[t]["cpu"].append(cpu)
                    samples[t]["base"].append(run_once(t, arch, workload, False)[1])
            for t in trees:
                s = samples[t]
                hits = WORKLOADS[workload][3]
                per = (statistics.median(s["cpu"]) - statistics.median(s["base"])) / hits * 1e6
                print(f"{str(t)[-22:]:<22} {arch:<7} {workload:<8} {lines[t]:>7} {cell(s['wall']):>15} "
                      f"{cell(s['cpu']):>15} {cell(s['base']):>15} {per:7.1f}", flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
