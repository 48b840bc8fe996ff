"""The kernel documentation's kprobe overhead table (kprobes.rst) measured on the emulator,
as `emu bench` prints it, plus a Markdown version stamped with date and machine for
benchmarks/README.md.

    .venv/bin/python benchmarks/bench_overhead.py [--arch all] [--profile NAME]
        [--json] [--markdown] [--plot FILE.png] [--repeat N]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes import bench  # noqa: E402


def machine_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def markdown(rows: list[bench.BenchRow]) -> str:
    head = (f"Measured {datetime.date.today().isoformat()} on {machine_name()} "
            f"(`benchmarks/bench_overhead.py --markdown`).\n\n"
            "| arch | profile | kind | bpf | cycles/hit | host µs/hit | hook µs | ratio | cycles by reason |\n"
            "|---|---|---|---|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        if r.cycles_per_hit is None:
            lines.append(f"| {r.arch} | {r.profile} | {r.kind} | {'yes' if r.bpf else '-'} "
                         f"| n/a | n/a | n/a | n/a | {r.note} |")
            continue
        bd = ", ".join(f"{k} {v:g}" for k, v in sorted(r.breakdown.items(), key=bench._reason_order)
                       if abs(v) >= 0.5)
        lines.append(f"| {r.arch} | {r.profile} | {r.kind} | {'yes' if r.bpf else '-'} "
                     f"| {r.cycles_per_hit:.1f} | {r.host_us_per_hit:.2f} | {r.baseline_us_per_hit:.2f} "
                     f"| {r.ratio if r.ratio is not None else 'n/a'} | {bd} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="all", choices=["arm64", "x86_64", "all"])
    ap.add_argument("--profile")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--plot", metavar="FILE.png")
    a = ap.parse_args()
    rows = bench.run_bench(bench.resolve_arches(a.arch, a.profile), a.profile, repeat=a.repeat)
    if a.plot:
        bench.plot(rows, a.plot)
    if a.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    elif a.markdown:
        print(markdown(rows), end="")
    else:
        bench.format_table(rows, sys.stdout)


if __name__ == "__main__":
    main()
