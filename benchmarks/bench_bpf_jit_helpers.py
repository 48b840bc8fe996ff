"""Host µs per hit of an execsnoop/opensnoop-shaped program under the guest JIT: current's
pid/tgid and comm, a probe_read_user_str of a pointer argument into the event on the BPF
stack, the event out as a ring-buffer record (a consumer takes each one) or a perf sample
(ctx in r1) — helpers outside the ones a thunk or stub used to call (issue 17,
jit_direct.TRAMPOLINE_HELPERS).

Rows, per arch and per kind (o: an optimized probe, whose thunk calls the program; k: a
plain kprobe, whose per-CPU stub does): the compiled Python engine; the JIT with the
helper set of before (``nested``: the program is refused the guest path, each hit is a
nested run); the JIT with current's helpers (pid_tgid, comm) trapping to Python as
before their C twins (``pytask``); the JIT now (``direct``: get_current_pid_tgid and
get_current_comm served in C on the helper trampolines, probe_read_user_str and the
output helper trapping to Python inside the same run).
probes/bench.py's method: plain and probed labs timed interleaved, best CPU time of
``repeat``, the plain lab's time taken off. Numbers only, nothing asserted.

    .venv/bin/python benchmarks/bench_bpf_jit_helpers.py [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BEFORE = frozenset({2, 3, 5, 7, 8})     # TRAMPOLINE_HELPERS before the output/task helpers
NO_TASK_TWINS = frozenset({1, 2, 3, 7, 8})   # bpf_native.NATIVE_HELPERS before the task twins

# struct event {u32 tgid, pid; char comm[16]; s64 len; char name[32]} at r10-64
SNOOP_ASM = """
    mov r6, r1
    call 14
    stxdw [r10-64], r0
    mov r1, r10
    add r1, -56
    mov r2, 16
    call 16
    mov r1, r10
    add r1, -32
    mov r2, 32
    ldxdw r3, [r6+{sp}]
    call 114
    stxdw [r10-40], r0
{output}
    mov r0, 0
    exit
"""
RINGBUF = """
    lddw r1, map_fd(3)
    mov r2, r10
    add r2, -64
    mov r3, 64
    mov r4, 0
    call 130
"""
PERF = """
    mov r1, r6
    lddw r2, map_fd(4)
    lddw r3, 0xffffffff
    mov r4, r10
    add r4, -64
    mov r5, 64
    call 25
"""


def snoop_prog(arch: str, output: str):
    """The program, its string argument the probed function's stack pointer (any user
    memory: the read stops at a NUL or after 31 bytes)."""
    from probes.bpf import BpfProg, BpfProgType, assemble, create_map
    from probes.bpf.maps import BpfMapType
    from probes.arch import arch_ptrace as ptrace_of

    slots = {name: off for off, name in ptrace_of(arch).PT_REGS_SLOTS}
    sp = slots["rsp" if arch == "x86_64" else "sp"]
    rb = create_map(BpfMapType.BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 16, name="events")
    pe = create_map(BpfMapType.BPF_MAP_TYPE_PERF_EVENT_ARRAY, 4, 4, 1, name="samples")
    text = SNOOP_ASM.format(sp=sp, output=RINGBUF if output == "ringbuf" else PERF)
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="snoop", license="GPL", maps={3: rb, 4: pe})


def measure(arch: str, kind: str, output: str, variant: str, calls: int, repeat: int) -> dict:
    from probes import bench, bench_kinds
    from probes.bpf import jit_direct
    from probes.bpf.jit_direct import direct_calls_of
    from probes.bpf.jit_guest import install_engine
    from probes.bpf.libbpf import KprobePerfEvent
    from probes.native import bpf_native
    from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, bpf_trace_of,
                                        perf_event_attach_bpf_prog)

    elf, func, call, _arg = bench_kinds.KIND_GUESTS[kind]
    prof = bench.profile_for(arch, None).name
    probed = bench._lab(arch, elf, prof)
    p = bench_kinds.setup_kind(kind, probed, func)[0]
    ev = KprobePerfEvent(probed.machine, func, kp=p)
    p.pre_handler = ev.kprobe_perf_func
    prog = snoop_prog(arch, output)
    perf_event_attach_bpf_prog(PerfEvent(ev, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog)
    records = [0]
    trace = bpf_trace_of(probed.machine)
    trace.ring_buffer(prog.maps[3], lambda data: records.__setitem__(0, records[0] + 1))
    trace.perf_buffer(prog.maps[4], lambda cpu, data: records.__setitem__(0, records[0] + 1))
    install_engine(probed.machine, "python" if variant == "python" else "jit")
    saved, saved_c = jit_direct.TRAMPOLINE_HELPERS, bpf_native.NATIVE_HELPERS
    if variant == "nested":
        jit_direct.TRAMPOLINE_HELPERS = BEFORE
    if variant == "pytask":
        bpf_native.NATIVE_HELPERS = NO_TASK_TWINS
    try:
        plain = bench._lab(arch, elf, prof)
        for lab in (plain, probed):
            lab.call(call, calls, timeout=600)
        runs = bench._timed({"plain": plain, "probe": probed}, call, calls, repeat)
    finally:
        jit_direct.TRAMPOLINE_HELPERS, bpf_native.NATIVE_HELPERS = saved, saved_c
    dc = direct_calls_of(probed.machine)
    on_guest = dc is not None and (p.addr in dc.thunks or p.addr in dc.stubs)
    us = (runs["probe"][0] - runs["plain"][0]) / calls * 1e6
    return {"arch": arch, "kind": kind, "output": output, "variant": variant,
            "from_guest": on_guest, "host_us_per_hit": round(us, 2),
            "records": records[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    calls, repeat = (200, 3) if args.quick else (1000, 5)
    rows = [measure(arch, kind, output, variant, calls, repeat)
            for arch in ("arm64", "x86_64") for kind in ("o", "k")
            for output in ("ringbuf", "perf")
            for variant in ("python", "nested", "pytask", "direct")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"snoop-shaped program, host µs per hit (best of {repeat}, {calls} calls)")
    print(f"{'arch':7} {'kind':4} {'output':8} {'variant':8} {'guest':>5} {'µs/hit':>8} "
          f"{'records':>8}")
    for r in rows:
        print(f"{r['arch']:7} {r['kind']:4} {r['output']:8} {r['variant']:8} "
              f"{'yes' if r['from_guest'] else 'no':>5} {r['host_us_per_hit']:>8.2f} "
              f"{r['records']:>8}")


if __name__ == "__main__":
    main()
