"""Per hit of a plain kprobe (k) and an optimized probe (o) on hotloop's hot_leaf carrying a
program with a bounded loop (sum of range(PARM1 & 15): up to 15 backward branches a hit)
or a tail call (the root tail-calls a program that counts into an array map): the compiled
Python engine and the guest JIT. Before loops and tail calls were allowed on the direct
path (probes/bpf/jit_direct.py) the JIT ran them in a nested run per hit; run this against
an older tree to see that (``PYTHONPATH=<old tree>``). Numbers only, nothing asserted.
Method as probes/bench.py: plain, hooked and probed labs timed interleaved, best CPU time.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_bpf_direct_loops.py [--calls N] [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unicorn import UC_HOOK_CODE  # noqa: E402

from probes import bench, bench_kinds  # noqa: E402
from probes.bpf import BpfProgType, assemble, create_map  # noqa: E402
from probes.bpf.maps import BpfMapType  # noqa: E402
from probes.bpf.program import BpfProg  # noqa: E402

COUNT_TAIL = bench_kinds.add_reg_asm()      # counts[0] += r8


def _kprobe(text: str, name: str, maps: dict) -> BpfProg:
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name=name, license="GPL", maps=maps)


def loop_prog(arch: str) -> BpfProg:
    sums = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="sums")
    return _kprobe(f"""
    ldxdw r6, [r1+{bench_kinds.parm_offset(arch)}]
    and r6, 15
    mov r7, 0
    mov r8, 0
loop:
    jge r7, r6, done
    add r8, r7
    add r7, 1
    ja loop
done:""" + COUNT_TAIL, "loop", {3: sums})


def tail_prog(arch: str) -> BpfProg:
    counts = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="counts")
    jt = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, name="jt")
    jt.update(0, _kprobe("mov r8, 1" + COUNT_TAIL, "count", {3: counts}))
    return _kprobe("lddw r2, map_fd(4)\nmov r3, 0\ncall 12\nmov r0, 1\nexit", "root",
                   {4: jt})


PROGRAMS = {"loop": loop_prog, "tail call": tail_prog}


def measure(arch: str, kind: str, program: str, engine: str, calls: int, repeat: int) -> dict:
    from probes.bpf.jit_direct import direct_calls_of
    from probes.bpf.jit_guest import install_engine
    from probes.bpf.libbpf import KprobePerfEvent
    from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog

    elf, func, call, _arg = bench_kinds.KIND_GUESTS[kind]
    prof = bench.profile_for(arch, None).name
    probed = bench._lab(arch, elf, prof)
    p = bench_kinds.setup_kind(kind, probed, func)[0]
    ev = KprobePerfEvent(probed.machine, func, kp=p)
    p.pre_handler = ev.kprobe_perf_func
    perf_event_attach_bpf_prog(PerfEvent(ev, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE),
                               PROGRAMS[program](arch))
    install_engine(probed.machine, engine)
    plain, hooked = bench._lab(arch, elf, prof), bench._lab(arch, elf, prof)
    addr = hooked.addr_of(func)
    hooked.machine.uc.hook_add(UC_HOOK_CODE, lambda *a: None, None, addr, addr)
    for lab in (plain, hooked, probed):
        lab.call(call, calls, timeout=600)
    runs = bench._timed({"plain": plain, "hook": hooked, "probe": probed}, call, calls, repeat)
    t_plain, c_plain, _ = runs["plain"]
    us = (runs["probe"][0] - t_plain) / calls * 1e6
    hook = (runs["hook"][0] - t_plain) / calls * 1e6
    dc = direct_calls_of(probed.machine)
    direct = dc is not None and (p.addr in dc.thunks or p.addr in dc.stubs)
    return {"arch": arch, "kind": kind, "program": program, "engine": engine,
            "path": "direct" if direct else ("nested" if engine == "jit" else "host"),
            "cycles_per_hit": round((runs["probe"][1] - c_plain) / calls, 2),
            "host_us_per_hit": us, "hook_us_per_hit": hook}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(arch, kind, program, engine, args.calls, args.repeat)
            for arch in ("arm64", "x86_64") for kind in ("k", "o") for program in PROGRAMS
            for engine in ("python", "jit")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'arch':7} {'kind':4} {'program':10} {'engine':7} {'path':7} {'cycles/hit':>10} "
          f"{'µs/hit':>8} {'hook µs':>8}")
    for r in rows:
        print(f"{r['arch']:7} {r['kind']:4} {r['program']:10} {r['engine']:7} {r['path']:7} "
              f"{r['cycles_per_hit']:>10.1f} {r['host_us_per_hit']:>8.2f} "
              f"{r['hook_us_per_hit']:>8.2f}")


if __name__ == "__main__":
    main()
