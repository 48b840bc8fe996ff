"""Host µs per hit of the BPF JIT's nested run (a program that needs the host every hit:
bpf_get_stack, tests/data/machine_limits/leafstack.bpf.c on firmware hotloop's hot_leaf),
through `emu run --bpf-engine jit` with and without --max-insns, with the nested start
that keeps the outer count (ucfast.emu_start_nested, "kept") and with the plain count-0
start it replaced ("plain": Unicorn drops the count hook and flushes every translated
block on each nested run; the outer limit is lost, so the limit is set past the run's end).
Per hit = (time with N2 calls - time with N1 calls) / (N2 - N1), best of --repeat, thread
CPU time. Needs clang. Numbers only, nothing asserted.

    .venv/bin/python benchmarks/bench_nested_limits.py [--repeat 3] [--arch A]
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emu import cli, machine, ucfast  # noqa: E402

SRC = ROOT / "tests" / "data" / "machine_limits" / "leafstack.bpf.c"
TARGET = {"x86_64": ("-D__TARGET_ARCH_x86", "/usr/include/x86_64-linux-gnu"),
          "arm64": ("-D__TARGET_ARCH_arm64", "/usr/aarch64-linux-gnu/include")}
N1, N2 = 1000, 6000


def build(arch: str, out: Path) -> Path:
    define, inc = TARGET[arch]
    obj = out / f"leafstack-{arch}.o"
    subprocess.run([shutil.which("clang") or "clang", "-O2", "-g", "-target", "bpf", define,
                    "-I", inc, "-c", str(SRC), "-o", str(obj)], check=True)
    return obj


def run_once(arch: str, obj: Path, calls: int, limit: bool) -> float:
    argv = ["run", *(["--max-insns", "1000000000"] if limit else []),
            "--bpf", f"{obj}:on_leaf_stack", "--bpf-engine", "jit",
            str(ROOT / "firmware" / "bin" / arch / "hotloop.elf"), "100", str(calls)]
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in range(2))
    t = time.thread_time()
    rc = cli.main(argv, stdout=out, stderr=err)
    elapsed = time.thread_time() - t
    if rc != 0:
        raise SystemExit(f"run failed ({rc}): {err.buffer.getvalue()[-300:]!r}")
    return elapsed


def per_hit_us(arch: str, obj: Path, limit: bool, repeat: int) -> float:
    best = {n: min(run_once(arch, obj, n, limit) for _ in range(repeat)) for n in (N1, N2)}
    return (best[N2] - best[N1]) / (N2 - N1) * 1e6


def plain_start(uc, begin: int, until: int) -> None:
    uc.emu_start(begin, until)          # the nested start before the fix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arch", choices=("arm64", "x86_64", "all"), default="all")
    args = ap.parse_args()
    arches = ("arm64", "x86_64") if args.arch == "all" else (args.arch,)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in arches:
            obj = build(arch, Path(tmp))
            for name, start in (("plain", plain_start), ("kept", ucfast.emu_start_nested)):
                machine.emu_start_nested = start      # what Machine's nested starts call
                for limit in (False, True):
                    us = per_hit_us(arch, obj, limit, args.repeat)
                    print(f"{arch:7} nested start {name:5} --max-insns {'on ' if limit else 'off'}"
                          f"  {us:7.1f} µs/hit")
            machine.emu_start_nested = ucfast.emu_start_nested


if __name__ == "__main__":
    main()
