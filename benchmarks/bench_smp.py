"""Several vCPUs (issue 19, `--cpus N`): host time and task switches of threaded guests on
1, 2 and 4 CPUs, and what the CPU turns cost two compute-bound threads.

* `pthreads 8`, `spin 4` (tests/data/threads), `percpu 5` (tests/data/smp);
* `busy 2`: two threads that each run a 10-million-iteration loop: on one CPU they switch
  every quantum (64-128 KiB of code), on two CPUs every turn (2-4 KiB of code).

Prints a table; asserts nothing. Needs gcc (x86-64) and aarch64-linux-gnu-gcc (arm64).

Measured 2026-12-03 (2 shared cores, nice, four other sessions running: host seconds are
noisy, switch counts exact), best of 3:

    arch    program      cpus   host s  switches
    x86_64  pthreads 8      1     0.60       339
    x86_64  pthreads 8      2     0.78       890
    x86_64  pthreads 8      4     0.81       859
    x86_64  spin 4          1     0.32        13
    x86_64  spin 4          2     0.33        15
    x86_64  percpu 5        2     0.41        12
    x86_64  busy 2          1     8.08      7472
    x86_64  busy 2          2     5.99     61860
    x86_64  busy 2          4    11.84     61860
    arm64   pthreads 8      1     0.65       339
    arm64   pthreads 8      2     1.43      1441
    arm64   busy 2          1    10.24      6292
    arm64   busy 2          2    15.32     52102
    arm64   busy 2          4    15.77     52102

With 2-4 KiB turns (the first version) `busy 2` made 249,000 switches on x86-64 and took 45 s
against 11 s on one CPU: the turns are 8-16 KiB since.

    .venv/bin/python benchmarks/bench_smp.py [--arch all|arm64|x86_64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_threads import CC, build, run_emu_timed  # noqa: E402  (benchmarks/ is on the path)

BUSY_C = r"""
#include <pthread.h>
#include <stdio.h>
static void *busy(void *a) {
    volatile unsigned long x = 0;
    for (unsigned long i = 0; i < 10000000UL; i++) x += i ^ (x >> 3);
    *(unsigned long *)a = x;
    return NULL;
}
int main(void) {
    unsigned long r[2];
    pthread_t t;
    pthread_create(&t, NULL, busy, &r[0]);
    busy(&r[1]);
    pthread_join(t, NULL);
    printf("%lu %lu\n", r[0], r[1]);
    return 0;
}
"""


SOLO_C = r"""
#include <stdio.h>
int main(void) {
    volatile unsigned long x = 0;
    for (unsigned long i = 0; i < 20000000UL; i++) x += i ^ (x >> 3);
    printf("%lu\n", x);
    return 0;
}
"""


def run(prog: Path, cpus: int, *args: str) -> tuple[float, int, int]:
    """Host seconds, task switches and Uc hand-offs of one in-process `emu run --cpus N`."""
    dt, sched = run_emu_timed(["--cpus", str(cpus)], prog, args)
    return dt, sched.switches, getattr(sched.machine, "handoffs", 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="all", choices=["all", *CC])
    ap.add_argument("--only", nargs="*", help="program names to run (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (the best is shown)")
    args = ap.parse_args()
    arches = list(CC) if args.arch == "all" else [args.arch]
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {"busy": BUSY_C, "solo": SOLO_C}
        for name, text in srcs.items():
            (Path(tmp) / f"{name}.c").write_text(text)
        print(f"{'arch':7} {'program':12} {'cpus':>4} {'host s':>8} {'switches':>9} {'handoffs':>9}")
        for arch in arches:
            progs = {"pthreads": ROOT / "tests/data/threads/pthreads.c",
                     "spin": ROOT / "tests/data/threads/spin.c",
                     "percpu": ROOT / "tests/data/smp/percpu.c",
                     "busy": Path(tmp) / "busy.c", "solo": Path(tmp) / "solo.c"}
            built = {n: build(arch, src, Path(tmp) / f"{n}.{arch}") for n, src in progs.items()}
            if None in built.values():
                print(f"{arch}: {CC[arch]} missing, skipped")
                continue
            rows = (("pthreads", ("8",), (1, 2, 4)), ("spin", ("4",), (1, 2, 4)),
                    ("percpu", ("5",), (1, 2, 4)), ("busy", (), (1, 2, 4)), ("solo", (), (1,)))
            for name, argv, cpu_counts in rows:
                if args.only and name not in args.only:
                    continue
                timed = {}
                for cpus in cpu_counts:
                    dt, sw, ho = timed[cpus] = min(run(built[name], cpus, *argv)
                                                   for _ in range(args.repeat))
                    label = f"{name} {' '.join(argv) or ('2' if name == 'busy' else '1')}"
                    print(f"{arch:7} {label:12} {cpus:4d} {dt:8.2f} {sw:9d} {ho:9d}", flush=True)
                if name == "busy":      # what a switch costs: the extra time per extra switch
                    (t1, s1, _h1), (t2, s2, _h2) = timed[1], timed[2]
                    print(f"{arch:7} busy: a CPU turn switch costs ~{(t2 - t1) / (s2 - s1) * 1e6:.0f} "
                          f"µs of host time", flush=True)


if __name__ == "__main__":
    main()
