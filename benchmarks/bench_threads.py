"""Threads on one vCPU (issue 19): host time, context switches and preemptions of the
pthread test programs, and what the preemption hook costs a compute loop.

* `pthreads N`: N threads, a mutex, a condition variable, atomics (tests/data/threads);
* `spin N`: threads that wait for their turn by spinning (only preemption moves them on);
* `hook`: a single-threaded compute loop run plain, then with an idle second thread
  blocked in pthread_join's futex (the block hook armed the whole time): native hook
  (emu/linux/preempt.c) against the Python fallback (KPROBE_EMU_NO_NATIVE).

Prints a table; asserts nothing. Needs gcc (x86-64) and aarch64-linux-gnu-gcc (arm64).

Measured 2026-12-03 (2 shared cores, nice, other sessions running; host seconds are noisy,
switch counts exact):

    arch    program          host s  switches  preempt
    x86_64  pthreads 8         0.17       339        0
    x86_64  spin 4             0.08        13        8
    x86_64  loop 1 thread      0.99         0        0
    x86_64  loop +idle         1.18         4        1     native hook armed: +19 %
    x86_64  loop +idle py      9.77         4        1     Python hook: 9.9x
    arm64   pthreads 8         0.25       339        0
    arm64   spin 4             0.10        13        8
    arm64   loop 1 thread      1.11         0        0
    arm64   loop +idle         1.20         4        1     native hook armed: +8 %
    arm64   loop +idle py      9.63         4        1     Python hook: 8.7x
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CC = {"x86_64": "gcc", "arm64": "aarch64-linux-gnu-gcc"}
LOOP_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
static void *idle(void *a) { pthread_mutex_lock((pthread_mutex_t *)a); return NULL; }
int main(int argc, char **argv) {
    static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_t t;
    if (argc > 1) { pthread_mutex_lock(&m); pthread_create(&t, NULL, idle, &m); }
    volatile unsigned long x = 0;
    for (unsigned long i = 0; i < 20000000UL; i++) x += i ^ (x >> 3);
    printf("%lu\n", x);
    if (argc > 1) { pthread_mutex_unlock(&m); pthread_join(t, NULL); }
    return 0;
}
"""


def build(arch: str, src: Path, out: Path) -> Path | None:
    cc = shutil.which(CC[arch])
    if cc is None:
        return None
    subprocess.run([cc, "-static", "-O2", "-pthread", "-o", str(out), str(src)], check=True)
    return out


def run_emu_timed(opts: list[str], prog: Path, args) -> tuple[float, Any]:
    """Host seconds of one in-process `emu run OPTS PROG -- ARGS`, and its Scheduler."""
    from emu.linux import tasks
    seen: list = []
    orig = tasks.Scheduler.__post_init__

    def keep(self) -> None:
        orig(self)
        seen.append(self)
    tasks.Scheduler.__post_init__ = keep              # type: ignore[method-assign]
    try:
        from emu.cli import main
        t0 = time.perf_counter()
        rc = main(["run", *opts, "--timeout", "600", str(prog), "--", *args],
                  stdout=io.TextIOWrapper(io.BytesIO(), write_through=True),
                  stderr=io.TextIOWrapper(io.BytesIO(), write_through=True))
        dt = time.perf_counter() - t0
    finally:
        tasks.Scheduler.__post_init__ = orig          # type: ignore[method-assign]
    if rc != 0:
        raise SystemExit(f"{prog} {args}: exit {rc}")
    return dt, seen[-1]


def run(prog: Path, *args: str, native: bool = True) -> tuple[float, int, int]:
    """Host seconds, switches, preemptions of one in-process `emu run`."""
    env_key = "KPROBE_EMU_NO_NATIVE"
    saved = os.environ.pop(env_key, None)
    if not native:
        os.environ[env_key] = "1"
    try:                    # (the C libraries' loaders re-read the variable at each load)
        dt, s = run_emu_timed([], prog, args)
        return dt, s.switches, s.preemptions
    finally:
        os.environ.pop(env_key, None)
        if saved is not None:
            os.environ[env_key] = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="all", choices=["all", *CC])
    args = ap.parse_args()
    arches = list(CC) if args.arch == "all" else [args.arch]
    with tempfile.TemporaryDirectory() as tmp:
        loop_src = Path(tmp) / "loop.c"
        loop_src.write_text(LOOP_C)
        print(f"{'arch':7} {'program':14} {'host s':>8} {'switches':>9} {'preempt':>8}")
        for arch in arches:
            data = ROOT / "tests" / "data" / "threads"
            progs = {n: build(arch, data / f"{n}.c", Path(tmp) / f"{n}.{arch}")
                     for n in ("pthreads", "spin")}
            loop = build(arch, loop_src, Path(tmp) / f"loop.{arch}")
            if loop is None or None in progs.values():
                print(f"{arch}: {CC[arch]} missing, skipped")
                continue
            rows = [(f"pthreads {n}", progs["pthreads"], (n,), True) for n in ("1", "2", "4", "8")]
            rows += [(f"spin {n}", progs["spin"], (n,), True) for n in ("2", "4")]
            rows += [("loop 1 thread", loop, (), True), ("loop +idle", loop, ("x",), True),
                     ("loop +idle py", loop, ("x",), False)]
            for name, prog, argv, native in rows:
                dt, sw, pre = run(prog, *argv, native=native)
                print(f"{arch:7} {name:14} {dt:8.2f} {sw:9d} {pre:8d}")


if __name__ == "__main__":
    main()
