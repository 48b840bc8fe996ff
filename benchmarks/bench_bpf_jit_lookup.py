"""Hash-map lookups from JITed code per probe hit (issue 17): the counting program
``v = lookup(key); if (!v) update(key, 1) else atomic add 1`` over 64 keys, on an optimized
probe (a guest thunk) and a plain kprobe (a per-CPU guest stub), the compiled Python path
against the guest JIT, whose lookups C's trampoline entry answers with the value's guest
address (no nested run). Host µs per hit ÷ one bare Python code-hook callback in the same
run (bench_bpf_jit.py's method: plain, hooked and probed labs timed interleaved, best CPU
time), and the modelled cycles per hit. Numbers only, nothing asserted.

    .venv/bin/python benchmarks/bench_bpf_jit_lookup.py [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bpf_jit import print_hits  # noqa: E402

def lookup_hits(calls: int, repeat: int) -> list[dict]:
    from unicorn import UC_HOOK_CODE

    from probes import bench, bench_kinds
    from probes.bpf.jit_guest import install_engine
    from probes.bpf.libbpf import KprobePerfEvent
    from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog
    out = []
    for arch in ("arm64", "x86_64"):
        prof = bench.profile_for(arch, None).name
        for kind in ("o", "k"):
            elf, func, call, _arg = bench_kinds.KIND_GUESTS[kind]
            for engine in ("python", "jit"):
                probed = bench._lab(arch, elf, prof)
                p = bench_kinds.setup_kind(kind, probed, func)[0]
                ev = KprobePerfEvent(probed.machine, func, kp=p)
                p.pre_handler = ev.kprobe_perf_func
                perf_event_attach_bpf_prog(
                    PerfEvent(ev, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE),
                    bench_kinds.key_counting_prog(arch, keys=64, entries=64))
                install_engine(probed.machine, engine)
                plain, hooked = bench._lab(arch, elf, prof), bench._lab(arch, elf, prof)
                addr = hooked.addr_of(func)
                hooked.machine.uc.hook_add(UC_HOOK_CODE, lambda *a: None, None, addr, addr)
                for lab in (plain, hooked, probed):
                    lab.call(call, calls, timeout=600)
                runs = bench._timed({"plain": plain, "hook": hooked, "probe": probed}, call,
                                    calls, repeat)
                t_plain, c_plain, _ = runs["plain"]
                us = (runs["probe"][0] - t_plain) / calls * 1e6
                hook = (runs["hook"][0] - t_plain) / calls * 1e6
                out.append({"arch": arch, "kind": kind, "engine": engine, "program": "hash lookup",
                            "cycles_per_hit": round((runs["probe"][1] - c_plain) / calls, 2),
                            "host_us_per_hit": us, "hook_us_per_hit": hook,
                            "ratio": us / hook if hook > 0 else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    hits = lookup_hits(200 if args.quick else 2000, 3 if args.quick else 7)
    print(json.dumps(hits, indent=1)) if args.json else print_hits(hits)


if __name__ == "__main__":
    main()
