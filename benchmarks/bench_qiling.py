"""A kprobe hit against the peer a user would pick instead: Qiling's `hook_address`, a
Python callback on an address with no patching at all (issue 14). Both run the same static
no-libc `fib(23)` program (92,735 calls of fib) with a counting callback on fib; the cost
of a hit is (wall time probed - wall time unprobed) / hits, best of `--repeat` runs each,
so program loading and the unprobed emulation cancel out.

Qiling is a benchmark-only dependency in its own virtualenv (never a runtime one):

    python3 -m venv /work/qiling-venv && /work/qiling-venv/bin/pip install qiling
    .venv/bin/python benchmarks/bench_qiling.py [--qiling-python PATH] [--repeat N] [--json]

emu is measured in this process on both hit paths (the C one and KPROBE_EMU_NATIVE=0)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CALLS = 92735                       # fib(23) calls fib 2 * F(24) - 1 times
FIB_C = r"""
__attribute__((noinline)) long fib(long n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
volatile long result = -1;       /* in .data: a non-empty RW segment */
void _start(void)
{
    result = fib(23);
#if defined(__x86_64__)
    __asm__ volatile("mov $60, %%eax; xor %%edi, %%edi; syscall" ::: "memory");
#else
    __asm__ volatile("mov x8, #93; mov x0, #0; svc #0" ::: "memory");
#endif
    for (;;) ;
}
"""
CC = {"x86_64": ["gcc", "-fno-pie", "-no-pie"], "arm64": ["aarch64-linux-gnu-gcc"]}
QILING = r"""
import json, sys, time
from elftools.elf.elffile import ELFFile
from qiling import Qiling
from qiling.const import QL_VERBOSE
path, rootfs, hooked, repeat = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
with open(path, "rb") as f:
    fib = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name("fib")[0]["st_value"]
best, hits = None, 0
for _ in range(repeat):
    ql = Qiling([path], rootfs, verbose=QL_VERBOSE.DISABLED)
    n = [0]
    if hooked:
        def hit(ql, n=n):
            n[0] += 1
        ql.hook_address(hit, fib)
    t = time.perf_counter()
    ql.run()
    dt = time.perf_counter() - t
    best, hits = (dt if best is None else min(best, dt)), n[0]
print(json.dumps({"s": best, "hits": hits}))
"""


def build(arch: str, rootfs: Path) -> Path | None:
    cc = CC[arch]
    if shutil.which(cc[0]) is None:
        return None
    src = rootfs / "fib.c"
    src.write_text(FIB_C)
    out = rootfs / f"fib.{arch}"
    proc = subprocess.run([*cc, "-O1", "-static", "-nostdlib", "-o", str(out), str(src)],
                          capture_output=True, text=True)
    return out if proc.returncode == 0 else None


def qiling_run(py: str, path: Path, rootfs: Path, hooked: bool, repeat: int) -> dict:
    proc = subprocess.run([py, "-c", QILING, str(path), str(rootfs), "1" if hooked else "0",
                           str(repeat)], capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout)


def emu_run(path: Path, probe: bool, native: bool, repeat: int) -> dict:
    from emu.loader import GuestConfig, load_guest
    from probes.kprobes import Kprobe, kprobes_of
    import io
    os.environ["KPROBE_EMU_NATIVE"] = "1" if native else "0"
    best, hits = None, 0
    for _ in range(repeat):
        g = load_guest(GuestConfig(path=str(path)), io.BytesIO(), io.BytesIO(), io.BytesIO())
        p = None
        if probe:
            p = Kprobe(symbol_name="fib")
            kprobes_of(g.machine).register_kprobe(p)
        t = time.perf_counter()
        res = g.machine.run(timeout=600)
        dt = time.perf_counter() - t
        assert res.exit_code == 0, res.message
        if p is not None:
            kprobes_of(g.machine).probes()               # folds C's counters
            hits = p.hits
        best = dt if best is None else min(best, dt)
    return {"s": best, "hits": hits}


def per_hit(probed: dict, plain: dict) -> float:
    return round((probed["s"] - plain["s"]) / max(probed["hits"], 1) * 1e6, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qiling-python", default="/work/qiling-venv/bin/python")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp)
        for arch in ("x86_64", "arm64"):
            path = build(arch, rootfs)
            if path is None:
                print(f"{arch}: no compiler, skipped", file=sys.stderr)
                continue
            q_plain = qiling_run(a.qiling_python, path, rootfs, False, a.repeat)
            q_hook = qiling_run(a.qiling_python, path, rootfs, True, a.repeat)
            e_plain = emu_run(path, False, True, a.repeat)
            e_c = emu_run(path, True, True, a.repeat)
            e_py = emu_run(path, True, False, a.repeat)
            assert q_hook["hits"] == e_c["hits"] == e_py["hits"] == CALLS
            q = per_hit(q_hook, q_plain)
            rows.append({"arch": arch, "hits": CALLS,
                         "qiling_plain_s": round(q_plain["s"], 3),
                         "qiling_hook_s": round(q_hook["s"], 3), "qiling_us_per_hit": q,
                         "emu_plain_s": round(e_plain["s"], 3),
                         "emu_kprobe_c_s": round(e_c["s"], 3),
                         "emu_kprobe_python_s": round(e_py["s"], 3),
                         "kprobe_c_us_per_hit": per_hit(e_c, e_plain),
                         "kprobe_python_us_per_hit": per_hit(e_py, e_plain)})
            r = rows[-1]
            r["ratio_c"] = round(r["kprobe_c_us_per_hit"] / q, 3) if q > 0 else None
            r["ratio_python"] = round(r["kprobe_python_us_per_hit"] / q, 3) if q > 0 else None
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'arch':<8} {'hits':>6} {'qiling µs/hit':>14} {'kprobe C µs/hit':>16} {'ratio':>6} "
          f"{'kprobe Python µs/hit':>21} {'ratio':>6}")
    for r in rows:
        print(f"{r['arch']:<8} {r['hits']:>6} {r['qiling_us_per_hit']:>14} "
              f"{r['kprobe_c_us_per_hit']:>16} "
              f"{r['ratio_c']:>6} {r['kprobe_python_us_per_hit']:>21} {r['ratio_python']:>6}")


if __name__ == "__main__":
    main()
