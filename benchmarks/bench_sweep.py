"""Sweep throughput: offsets checked per second, before snapshots (every run from _start)
and with them, on 1 and 2 local worker processes and on Ray with 2 local workers; and the
same for a real program's hottest functions: LZ4's block compressor (its public source in
tests/data/sweep/lz4, built static here), which must show 0 mismatches. Prints tables,
asserts nothing.

    .venv/bin/python benchmarks/bench_sweep.py [--arch arm64|x86_64]... [--skip-ray]
        [--skip-real] [--program NAME]... [--hottest N] [--cache DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from probes.sweep import SweepConfig, hottest_functions, sweep  # noqa: E402
from probes.sweep_backends import LocalPool, RayBackend  # noqa: E402

PROGRAMS = ("recurse",)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers; not Ray's)."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(cfg: SweepConfig, backend) -> tuple[object, float, float]:
    """The result, wall seconds and CPU seconds (on a shared machine the CPU time is the
    fairer comparison; wall time is what a user waits)."""
    t, c = time.perf_counter(), cpu_seconds()
    res = sweep(cfg, backend)
    return res, time.perf_counter() - t, cpu_seconds() - c


def setups(skip_ray: bool) -> list[tuple[str, bool, object]]:
    out = [("before (no snapshots), 1 job", False, LocalPool(1)),
           ("snapshots, 1 job", True, LocalPool(1)),
           ("snapshots, 2 jobs", True, LocalPool(2))]
    if not skip_ray:
        out.append(("snapshots, Ray 2 local workers", True, RayBackend(jobs=2)))
    return out


def firmware(arches: list[str], programs: list[str], skip_ray: bool) -> None:
    print(f"{'arch':<7} {'program':<8} {'setup':<32} {'offsets':>8} {'hit':>6} {'wall s':>7} "
          f"{'offsets/s':>10} {'cpu s':>7} {'per cpu s':>10} {'mismatch':>8}")
    for arch in arches:
        for prog in programs:
            ref = None
            for name, snaps, backend in setups(skip_ray):
                cfg = SweepConfig(path=str(ROOT / "firmware" / "bin" / arch / f"{prog}.elf"),
                                  snapshots=snaps, argv=["1000"] if prog == "hotloop" else [])
                res, dt, cpu = timed(cfg, backend)
                ref = ref or res.to_json()
                same = "" if res.to_json() == ref else "  (REPORT DIFFERS)"
                hit = sum(r.hits > 0 or r.verdict == "text-read" for r in res.results)
                n = len(res.results)
                per_cpu = f"{n / cpu:>10.1f}" if "Ray" not in name else f"{'n/a':>10}"
                print(f"{arch:<7} {prog:<8} {name:<32} {n:>8} {hit:>6} {dt:>7.1f} "
                      f"{n / dt:>10.1f} {cpu:>7.1f} {per_cpu} {res.mismatches:>8}{same}", flush=True)


LZ4 = ROOT / "tests" / "data" / "sweep" / "lz4"       # LZ4's public source and our driver
CC = {"x86_64": "gcc", "arm64": "aarch64-linux-gnu-gcc"}


def build_lz4(cache: Path, arch: str) -> Path | None:
    """tests/data/sweep/lz4 built static (cached); None without the cross compiler."""
    import shutil
    import subprocess
    out = cache / "bin" / f"lz4_sweep.{arch}"
    if out.exists():
        return out
    if shutil.which(CC[arch]) is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([CC[arch], "-static", "-O2", f"-I{LZ4}", "-o", str(out), str(LZ4 / "lz4_sweep.c"),
                    str(LZ4 / "lz4.c")], check=True)
    return out


def real_program(arches: list[str], cache: Path, n: int, skip_ray: bool) -> None:
    print(f"\n{'arch':<7} {'program':<6} {'functions (hottest first)':<52} {'setup':<32} {'offsets':>8} "
          f"{'wall s':>7} {'offsets/s':>10} {'cpu s':>7} {'per cpu s':>10} {'mismatch':>8}")
    for arch in arches:
        path = build_lz4(cache, arch)
        if path is None:
            print(f"{arch}: no cross compiler, skipped")
            continue
        funcs = hottest_functions(SweepConfig(path=str(path)), n)
        ref = None
        for name, snaps, backend in [("before (no snapshots), 2 jobs", False, LocalPool(2)),
                                     *setups(skip_ray)[1:]]:
            cfg = SweepConfig(path=str(path), funcs=funcs, snapshots=snaps, timeout=120)
            res, dt, cpu = timed(cfg, backend)
            ref = ref or res.to_json()
            same = "" if res.to_json() == ref else "  (REPORT DIFFERS)"
            n_off = len(res.results)
            per_cpu = f"{n_off / cpu:>10.1f}" if "Ray" not in name else f"{'n/a':>10}"
            print(f"{arch:<7} {'lz4':<6} {', '.join(funcs)[:52]:<52} {name:<32} {n_off:>8} "
                  f"{dt:>7.1f} {n_off / dt:>10.1f} {cpu:>7.1f} {per_cpu} {res.mismatches:>8}{same}",
                  flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", action="append", choices=["arm64", "x86_64"])
    ap.add_argument("--program", action="append")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-firmware", action="store_true")
    ap.add_argument("--hottest", type=int, default=3)
    ap.add_argument("--cache", default=os.environ.get("KPROBE_EMU_BENCH_CACHE", "/tmp/kprobe-emu-bench"))
    a = ap.parse_args()
    arches = a.arch or ["arm64", "x86_64"]
    if not a.skip_firmware:
        firmware(arches, a.program or list(PROGRAMS), a.skip_ray)
    if not a.skip_real:
        real_program(arches, Path(a.cache), a.hottest, a.skip_ray)
    return 0


if __name__ == "__main__":
    sys.exit(main())
