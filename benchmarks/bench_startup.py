"""Start-up of `emu run` on static binaries with thousands of symbols: ELF + symbol-table
parsing, and the wall time from spawning `emu run` to the guest's first instruction, before
(a git revision, by default the one before the struct ELF reader) and after (this tree).
Prints a table, asserts nothing.

    .venv/bin/python benchmarks/bench_startup.py [--arch all|arm64|x86_64] [--before REV]
        [--repeat R] [--functions N] [--cache DIR]

The binaries: a generated C program with N extern functions (static glibc: N + ~2,000
symbols), and the real workloads of bench_real_programs.py when they are built in the cache
(run that first to include sqlite3, zstd and lz4). Both trees are byte-compiled first and
run with bytecode caching on, as an installed package is; each figure is the best of R runs."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_real_programs import CC, WORKLOADS  # noqa: E402

PARSE = r"""
import sys, time
from emu.elf import load_elf
from emu.symbols import SymbolTable
load_elf(sys.argv[1])                                      # imports out of the way
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    img = load_elf(sys.argv[1])
    SymbolTable(img.symbols)
    times.append(time.perf_counter() - t)
print(min(times), len(img.symbols), sys.modules["emu.elf"].__file__)
"""

FIRST_INSN = r"""
import os, sys, time
spawned = float(os.environ["BENCH_T0"])
from emu import machine
def first_instruction(self, *a, **k):
    print(time.time() - spawned, flush=True)
    os._exit(0)
machine.Machine.run = first_instruction
from emu.cli import main
main(["run", sys.argv[1]])
"""


def synthetic(cache: Path, arch: str, n: int) -> Path | None:
    out = cache / "bin" / f"syms{n}.{arch}"
    if out.exists():
        return out
    if shutil.which(CC[arch]) is None:
        return None
    src = cache / f"syms{n}.c"
    lines = [f"__attribute__((noinline)) int f{i}(int x) {{ return x * {i % 97 + 1} + {i}; }}"
             for i in range(n)]
    lines.append("int main(void) { int s = 0;")
    lines += [f"  s += f{i}(s);" for i in range(0, n, max(1, n // 50))]
    lines.append("  return s & 1; }")
    src.write_text("\n".join(lines) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([CC[arch], "-static", "-O1", "-o", str(out), str(src)], check=True)
    return out


def tree_at(cache: Path, rev: str) -> Path:
    """The project at `rev` (git archive; read-only use of the repository), byte-compiled."""
    tree = cache / f"tree-{rev}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    compile_tree(tree)
    return tree


def compile_tree(tree: Path) -> None:
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "emu"), str(tree / "probes")],
                   check=True, capture_output=True)


def env_for(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def parse_time(tree: Path, path: Path, repeat: int) -> tuple[float, int]:
    # cwd=tree: `python -c` puts the working directory before PYTHONPATH on sys.path
    out = subprocess.run([sys.executable, "-c", PARSE, str(path), str(repeat)], env=env_for(tree),
                         cwd=tree, capture_output=True, text=True, check=True).stdout.split()
    if not out[2].startswith(str(tree)):
        raise SystemExit(f"measured {out[2]}, not the tree {tree}")
    return float(out[0]), int(out[1])


def first_insn_time(tree: Path, path: Path, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        env = {**env_for(tree), "BENCH_T0": repr(time.time())}
        out = subprocess.run([sys.executable, "-c", FIRST_INSN, str(path)], env=env, cwd=tree,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if out.returncode:
            raise SystemExit(f"{path}: {out.stderr.strip()[-300:]}")
        best = min(best, float(out.stdout.split()[0]))
    return best


def python_floor(repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="all", choices=["all", "arm64", "x86_64"])
    ap.add_argument("--before", default="a1e7949", metavar="REV")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--functions", type=int, default=5000, metavar="N")
    ap.add_argument("--cache", default=os.environ.get("KPROBE_EMU_BENCH_CACHE", "/tmp/kprobe-emu-bench"))
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    before, after = tree_at(cache, args.before), ROOT
    compile_tree(after)
    arches = ["x86_64", "arm64"] if args.arch == "all" else [args.arch]
    binaries = []
    for arch in arches:
        path = synthetic(cache, arch, args.functions)
        if path is not None:
            binaries.append((f"syms{args.functions}", arch, path))
        for w in WORKLOADS:
            built = cache / "bin" / f"{w.name}.{arch}"
            if built.exists():
                binaries.append((w.name, arch, built))
    print(f"python -c pass: {python_floor(args.repeat):.3f} s (the floor of any start-up)")
    print(f"{'binary':<10} {'arch':<7} {'symbols':>7}  {'parse before':>12} {'parse after':>11}  "
          f"{'1st insn before':>15} {'1st insn after':>14}")
    for name, arch, path in binaries:
        pb, nsyms = parse_time(before, path, args.repeat)
        pa, _ = parse_time(after, path, args.repeat)
        fb = first_insn_time(before, path, args.repeat)
        fa = first_insn_time(after, path, args.repeat)
        print(f"{name:<10} {arch:<7} {nsyms:>7}  {pb:>11.3f}s {pa:>10.3f}s  {fb:>14.3f}s {fa:>13.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
