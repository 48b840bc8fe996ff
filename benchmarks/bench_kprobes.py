"""Host cost of a kprobe hit, against one bare Unicorn code-hook callback on the same
address in the same process, on the Python hit path and on the C one (probes/native), with
an empty Python pre handler and with none, a counting kretprobe and a kprobe event
recording three fetch arguments; and guest speed with 100 armed probes on code
that does not run. Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/bench_kprobes.py [--calls N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable
from pathlib import Path

from unicorn import UC_HOOK_CODE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes.sweep import instruction_boundaries  # noqa: E402
from probes.testing import ProbeLab  # noqa: E402


def timed_call(lab: ProbeLab, func: str, n: int) -> float:
    t = time.perf_counter()
    lab.call(func, n, timeout=600)
    return time.perf_counter() - t


def best(fn, repeat: int = 3) -> float:
    return min(fn() for _ in range(repeat))


EVENT3 = "p:b/leaf hot_leaf a=$arg1:u64 b=$arg2:x64 s=+0($stack):x64"   # 3 fetches, C-evaluable


Setup = tuple[object, Callable[[], bool], Callable[[], int]]


def _setup(kind: str, handler: bool, probed: ProbeLab) -> Setup:
    """Register one probe of `kind` on hot_leaf: (its Kprobe, "served by C?", hits)."""
    from probes.kprobes import Kprobe
    p = probed.kprobes
    if kind == "r":
        from probes.kretprobes import Kretprobe, kretprobes_of
        rp = Kretprobe(kp=Kprobe(symbol_name="hot_leaf"),
                       handler=(lambda ri, r: 0) if handler else None)
        krp = kretprobes_of(probed.machine)
        krp.register_kretprobe(rp)
        return rp.kp, lambda: krp.native is not None and rp.native_row >= 0, lambda: rp.hits
    if kind == "event":
        from probes.trace.tracefs import tracefs_of
        fs = tracefs_of(probed.machine)
        assert fs.write("kprobe_events", EVENT3) == 0, fs.read("error_log")
        fs.write("events/enable", "1")
        kp = next(q for q in p.table.values())
        return kp, lambda: p.native is not None and "native_tprog" in kp.__dict__, \
            lambda: len(fs.buffer.records())
    kp = Kprobe(symbol_name="hot_leaf", pre_handler=(lambda p, r: 0) if handler else None)
    p.register_kprobe(kp)
    return kp, lambda: p.native is not None and any(q is kp for q in p.native.probes), \
        lambda: kp.hits


def per_hit(arch: str, calls: int, handler: bool, native: bool, kind: str = "k") -> dict:
    """kind: k (a kprobe), r (a kretprobe: entry and return), event (a kprobe event
    recording EVENT3's three fetch arguments)."""
    elf = ROOT / "firmware" / "bin" / arch / "hotloop.elf"
    plain = ProbeLab.load(elf)
    hooked = ProbeLab.load(elf)
    leaf = hooked.addr_of("hot_leaf")
    hooked.machine.uc.hook_add(UC_HOOK_CODE, lambda *a: None, None, leaf, leaf)

    os.environ["KPROBE_EMU_NATIVE"] = "1" if native else "0"    # read when probes attach
    probed = ProbeLab.load(elf)
    p = probed.kprobes
    kp, on_c, hits = _setup(kind, handler, probed)
    timed_call(probed, "hot_call", 10)            # warm up: translation, boosting
    t_plain = t_hook = t_probe = 1e9
    for _ in range(3):               # interleaved, best of 3: host noise hits all alike
        t_plain = min(t_plain, timed_call(plain, "hot_call", calls))
        t_hook = min(t_hook, timed_call(hooked, "hot_call", calls))
        t_probe = min(t_probe, timed_call(probed, "hot_call", calls))
    hook_us = (t_hook - t_plain) / calls * 1e6
    probe_us = (t_probe - t_plain) / calls * 1e6
    p.probes()
    return {"arch": arch, "kind": kind, "step": kp.ainsn.kind, "insn": kp.ainsn.mnemonic,
            "boosted": kp.ainsn.boosted,
            "handler": ("empty pre" if handler else "none") if kind != "event" else "record",
            "path": "C" if on_c() else "Python", "hits": hits(),
            "host_us_per_hit": round(probe_us, 3),
            "baseline_us_per_hit": round(hook_us, 3), "ratio": round(probe_us / hook_us, 2)}


def armed_unrun(arch: str, n: int, probes: int = 100) -> dict:
    elf = ROOT / "firmware" / "bin" / arch / "demo.elf"
    plain = ProbeLab.load(elf)
    armed = ProbeLab.load(elf)
    image = armed.machine.image
    from emu.symbols import SymbolTable
    syms = SymbolTable(image.symbols)
    placed = 0
    for name in ("do_sys_open", "path_openat", "link_path_walk", "parse_packet", "parse_ipv4",
                 "parse_ipv6", "parse_tcp", "vfs_read", "vfs_write", "alloc_fd", "fib"):
        sym = syms.lookup(name)
        for addr, _text in instruction_boundaries(image, sym):
            if placed >= probes:
                break
            try:
                armed.kprobe(addr)
                placed += 1
            except Exception:
                pass
    t_plain, t_armed = 1e9, 1e9
    for _ in range(5):              # interleaved, best of 5: host noise hits both alike
        t_plain = min(t_plain, timed_call(plain, "hot_loop", n))
        t_armed = min(t_armed, timed_call(armed, "hot_loop", n))
    return {"arch": arch, "probes_armed": placed, "plain_s": round(t_plain, 4),
            "armed_s": round(t_armed, 4), "speed_ratio": round(t_plain / t_armed, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--loop", type=int, default=300_000_000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-speed", action="store_true", help="skip the armed-but-unrun rows")
    a = ap.parse_args()
    kinds = [("k", True), ("k", False), ("r", False), ("event", False)]
    rows = [per_hit(arch, a.calls, handler, native, kind) for arch in ("arm64", "x86_64")
            for kind, handler in kinds for native in (False, True)]
    speed = [] if a.no_speed else [armed_unrun(arch, a.loop) for arch in ("arm64", "x86_64")]
    if a.json:
        print(json.dumps({"per_hit": rows, "armed_unrun": speed}, indent=2))
        return
    print(f"{'arch':<8} {'kind':<6} {'step':<12} {'insn':<30} {'handler':<10} {'path':<7} "
          f"{'kprobe µs/hit':>14} {'code hook µs':>13} {'ratio':>6}")
    for r in rows:
        step = r["step"] + (" (boosted)" if r["boosted"] else "")
        print(f"{r['arch']:<8} {r['kind']:<6} {step:<12} {r['insn']:<30} {r['handler']:<10} "
              f"{r['path']:<7} "
              f"{r['host_us_per_hit']:>14} {r['baseline_us_per_hit']:>13} {r['ratio']:>6}")
    print()
    print(f"{'arch':<8} {'probes':>6} {'no probes s':>12} {'armed s':>9} {'speed ratio':>12}")
    for r in speed:
        print(f"{r['arch']:<8} {r['probes_armed']:>6} {r['plain_s']:>12} {r['armed_s']:>9} {r['speed_ratio']:>12}")


if __name__ == "__main__":
    main()
