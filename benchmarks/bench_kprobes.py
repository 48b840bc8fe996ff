"""Host cost of a kprobe hit, against one bare Unicorn code-hook callback on the same
address in the same process; and guest speed with 100 armed probes on code that does not
run. Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/bench_kprobes.py [--calls N] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
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


def per_hit(arch: str, calls: int) -> dict:
    elf = ROOT / "firmware" / "bin" / arch / "hotloop.elf"
    plain = ProbeLab.load(elf)
    t_plain = best(lambda: timed_call(plain, "hot_call", calls))

    hooked = ProbeLab.load(elf)
    leaf = hooked.addr_of("hot_leaf")
    hooked.machine.uc.hook_add(UC_HOOK_CODE, lambda *a: None, None, leaf, leaf)
    t_hook = best(lambda: timed_call(hooked, "hot_call", calls))

    probed = ProbeLab.load(elf)
    p = probed.kprobes
    from probes.kprobes import Kprobe
    kp = Kprobe(symbol_name="hot_leaf", pre_handler=lambda p, r: 0)
    p.register_kprobe(kp)
    t_probe = best(lambda: timed_call(probed, "hot_call", calls))
    hook_us = (t_hook - t_plain) / calls * 1e6
    probe_us = (t_probe - t_plain) / calls * 1e6
    return {"arch": arch, "kind": "k", "step": kp.ainsn.kind, "insn": kp.ainsn.mnemonic,
            "hits": kp.hits, "host_us_per_hit": round(probe_us, 3),
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
    a = ap.parse_args()
    rows = [per_hit(arch, a.calls) for arch in ("arm64", "x86_64")]
    speed = [armed_unrun(arch, a.loop) for arch in ("arm64", "x86_64")]
    if a.json:
        print(json.dumps({"per_hit": rows, "armed_unrun": speed}, indent=2))
        return
    print(f"{'arch':<8} {'step':<12} {'insn':<30} {'kprobe µs/hit':>14} {'code hook µs':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['arch']:<8} {r['step']:<12} {r['insn']:<30} {r['host_us_per_hit']:>14} "
              f"{r['baseline_us_per_hit']:>13} {r['ratio']:>6}")
    print()
    print(f"{'arch':<8} {'probes':>6} {'no probes s':>12} {'armed s':>9} {'speed ratio':>12}")
    for r in speed:
        print(f"{r['arch']:<8} {r['probes_armed']:>6} {r['plain_s']:>12} {r['armed_s']:>9} {r['speed_ratio']:>12}")


if __name__ == "__main__":
    main()
