"""The BPF engines side by side: ns per executed BPF instruction of the interpreter, the
compiled Python path and the guest JIT (arm64 and x86-64 code run in a scratch machine),
against the host kernel's own JIT on the same bytecode in the same run
(BPF_PROG_TEST_RUN, where the host allows it; else the recorded 0.12-0.14 ns/insn).
Also the modelled cycles of one run of the JITed code. Numbers only, nothing asserted.

    .venv/bin/python benchmarks/bench_bpf_jit.py [--quick] [--json] [--sizes]
        [--programs-only | --hits-only | --hash-only | --percpu-only]

Then, per probe hit (probes/bench.py, the `emu bench` rows): an optimized probe, a plain
kprobe, a kretprobe, a kprobe on an ftrace site, a tracepoint event and a raw tracepoint
carrying the array-counting program,
run by the compiled Python path and by the guest JIT in the traced machine: host µs per
hit ÷ one bare Python code-hook callback in the same run (issue 17's targets: ≤ 0.5 for
the optprobe + array count under the JIT; every JIT row no slower than its Python row),
and the modelled cycles per hit; and the optimized probe with a hash-map update
(bpf_map_update_elem through the helper trampoline, whose C entry serves it: target
≤ 1.5; ``--hash-only`` adds the same program without the call, the thunk's floor); and
the per-CPU array counter (the tracing counter: its lookup inlined as the kernel's
percpu_array_map_gen_lookup) on an optimized probe and a plain kprobe. The
optprobe calls the images from a guest thunk, every other kind from a per-CPU guest stub
the hit sends the guest to (jit_direct.py): no nested run.

Three straight-line programs (no loops, so the kernel's verifier takes them whole):
an ALU one (registers only), a memory one (stack stores and loads) and a helper one
(bpf_get_prandom_u32 calls between additions).

What bounds the memory row is Unicorn, the same on both arches: every guest load or store
is a TLB check plus a call of Unicorn 2.1.4's exit-request helper (tcg_gen_qemu_ld/st end
in check_exit_request), ~4-5 ns in a bare Unicorn loop against ~0.1-0.5 ns for an ALU
instruction, and a straight-line program runs that host code once per run, so past a few
thousand accesses the host's caches miss (~11-19 ns an access; ``--sizes`` shows the
growth). The JITs emit one guest instruction per BPF stack access, as the kernel's do
(tests/test_bpf_jit_codegen.py); the data pages are rw- and no memory hook is installed, so
no store takes the notdirty slow path (emu/vtlb.py).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes import bench_kinds, bpf  # noqa: E402
from probes.bpf.jit_guest import ScratchJit  # noqa: E402
from probes.bpf.memory import CTX_ADDR  # noqa: E402

RECORDED_KERNEL_NS = 0.13          # issue 17: the host kernel JIT, 0.12-0.14 ns/insn


def alu_program(n: int) -> str:
    rng = random.Random(1)
    lines = [f"mov r{r}, {rng.randrange(1, 1000)}" for r in range(6)]
    ops = ["add", "xor", "mul", "or", "sub", "rsh", "lsh", "and"]
    while len(lines) < n:
        op, d, s = rng.choice(ops), rng.randrange(6), rng.randrange(6)
        if op in ("rsh", "lsh"):
            lines.append(f"{op} r{d}, {rng.randrange(1, 8)}")
        elif rng.random() < 0.5:
            lines.append(f"{op} r{d}, r{s}")
        else:
            lines.append(f"{op}32 r{d}, {rng.randrange(1, 1 << 20)}")
    return "\n".join(lines + ["exit"])


def mem_program(n: int) -> str:
    rng = random.Random(2)
    lines = ["mov r0, 0", "mov r1, 1"] + [f"stdw [r10-{8 * k}], {k}" for k in range(1, 65)]
    while len(lines) < n:
        k = rng.randrange(1, 65)
        lines += [f"ldxdw r2, [r10-{8 * k}]", "add r0, r2", f"stxdw [r10-{8 * rng.randrange(1, 65)}], r0"]
    return "\n".join(lines + ["exit"])


def helper_program(n: int) -> str:
    lines = ["mov r6, 0"]
    while len(lines) < n:
        lines += ["call 7", "add r6, r0"]
    return "\n".join(lines + ["mov r0, r6", "exit"])


PROGRAMS = {"alu": alu_program, "memory": mem_program, "helper": helper_program}


def best(fn, repeat: int) -> float:
    """Best CPU time of this process (the machine is shared: wall time would measure the
    other jobs too; the host kernel figure is the kernel's own in-kernel timing)."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def guest_jit(code: bytes, arch: str, repeat: int) -> tuple[float, float, int]:
    """(seconds per run, seconds to make the machine and compile, modelled cycles)."""
    t = time.process_time()
    prog = bpf.BpfProg.from_bytes(code)
    jit = ScratchJit(arch)
    run = jit.prepare(prog, bytearray(), bpf.BpfRunContext(), None)
    setup = time.process_time() - t
    per_run = best(lambda: jit.execute(prog, run, CTX_ADDR, 0), max(repeat, 25))
    cyc = ScratchJit(arch, "default")
    prog2 = bpf.BpfProg.from_bytes(code)
    cyc.execute(prog2, cyc.prepare(prog2, bytearray(), bpf.BpfRunContext(), None), CTX_ADDR, 0)
    return per_run, setup, cyc.cycles


def kernel_ns(code: bytes, repeat: int) -> float | None:
    """ns per run of the host kernel's JIT (BPF_PROG_TEST_RUN on a socket filter), or None."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def sys_bpf(cmd: int, attr: bytes) -> tuple[int, bytes]:
        buf = ctypes.create_string_buffer(attr, 128)
        return libc.syscall(321, cmd, buf, 128), buf.raw

    insns, lic = ctypes.create_string_buffer(code), ctypes.create_string_buffer(b"GPL")
    fd, _ = sys_bpf(5, struct.pack("<IIQQIIQI", 1, len(code) // 8, ctypes.addressof(insns),
                                   ctypes.addressof(lic), 0, 0, 0, 0))        # BPF_PROG_LOAD
    if fd < 0:
        return None
    try:
        data = ctypes.create_string_buffer(64)
        r, raw = sys_bpf(10, struct.pack("<IIIIQQII", fd, 0, 64, 0, ctypes.addressof(data), 0,
                                         repeat, 0))                           # PROG_TEST_RUN
        return None if r < 0 else struct.unpack_from("<IIIIQQII", raw)[7]
    finally:
        os.close(fd)


def measure(name: str, n: int, repeat: int) -> dict:
    row = measure_one(name, n, repeat)
    big = measure_one(name, 4 * n, repeat)
    for key in ("jit_arm64", "jit_x86_64", "kernel"):     # ns per extra insn
        extra = big["insns"] - row["insns"]
        row[f"{key}_marginal"] = (big[key] * big["insns"] - row[key] * row["insns"]) / extra
    return row


def measure_one(name: str, n: int, repeat: int, host_engines: bool = True) -> dict:
    code = bpf.assemble(PROGRAMS[name](n))
    insns = len(code) // 8
    prog = bpf.BpfProg.from_bytes(code)
    prog.load()
    row: dict = {"program": name, "insns": insns}
    row["interp"] = row["python"] = float("nan")
    if insns <= 20000 and host_engines:   # longer functions the compiled path interprets
        row["interp"] = best(lambda: prog.run(b"", engine="interp"), max(1, repeat // 4)) / insns * 1e9
        prog.run(b"")                                   # compile once
        row["python"] = best(lambda: prog.run(b""), repeat) / insns * 1e9
    for arch in ("arm64", "x86_64"):
        per_run, setup, cycles = guest_jit(code, arch, repeat)
        row[f"jit_{arch}"] = per_run / insns * 1e9
        row[f"jit_{arch}_setup_ms"] = setup * 1e3
        row[f"cycles_{arch}"] = cycles
    k = kernel_ns(code, 10000)
    row["kernel"] = k / insns if k else RECORDED_KERNEL_NS
    row["kernel_source"] = "bpf_prog_test_run" if k else "recorded"
    return row


def size_sweep(repeat: int, sizes: tuple[int, ...] = (250, 1000, 4000, 16000)) -> list[dict]:
    """The memory program at several lengths: ns per BPF instruction of each JIT and of the
    host kernel's. Unicorn's code for a guest load or store is large (a TLB check, the slow
    path, a call of its exit-request helper), and a straight-line program runs it once per
    run: past a few thousand accesses it no longer fits the host's caches."""
    out = []
    for n in sizes:
        row = measure_one("memory", n, repeat, host_engines=False)
        out.append({k: row[k] for k in ("insns", "jit_arm64", "jit_x86_64", "kernel",
                                        "cycles_arm64", "cycles_x86_64")})
    return out


def print_sizes(rows: list[dict]) -> None:
    """Per run, and between one length and the next (the entry cancels out: what each
    added instruction costs at that length)."""
    print("\nmemory program by length, ns per BPF instruction: per run (entry included) | "
          "added from the previous length")
    print(f"{'insns':>6} {'jit a64':>8} {'jit x86':>8} {'kernel':>7} {'a64/k':>6} {'x86/k':>6} | "
          f"{'a64':>6} {'x86':>6} {'kernel':>7}")
    prev = None
    for r in rows:
        line = (f"{r['insns']:>6} {r['jit_arm64']:>8.2f} {r['jit_x86_64']:>8.2f} "
                f"{r['kernel']:>7.3f} {r['jit_arm64'] / r['kernel']:>6.0f} "
                f"{r['jit_x86_64'] / r['kernel']:>6.0f} |")
        if prev is not None:
            n = r["insns"] - prev["insns"]
            added = [(r[k] * r["insns"] - prev[k] * prev["insns"]) / n
                     for k in ("jit_arm64", "jit_x86_64", "kernel")]
            line += f" {added[0]:>6.2f} {added[1]:>6.2f} {added[2]:>7.3f}"
        print(line)
        prev = r


def per_hit(calls: int, repeat: int) -> list[dict]:
    """The counting program on hits: `emu bench` rows for every kind with a program, both engines."""
    from probes import bench
    from probes.bench_kinds import KIND_GUESTS
    out = []
    for arch in ("arm64", "x86_64"):
        for kind in ("o", "k", "r", "f", "tp", "rt"):
            _elf, probed, called, _arg = KIND_GUESTS[kind]
            # `calls` counts hits only where the bench calls a loop around the probed
            # function; the ftrace kind calls the recursive fib itself (its default n).
            arg = calls if called != probed else None
            for engine in ("python", "jit"):
                r = bench.measure(arch, kind, arg=arg, repeat=repeat, bpf=True, engine=engine)
                out.append({"arch": arch, "kind": kind, "engine": engine, "program": "array count",
                            "cycles_per_hit": r.cycles_per_hit, "host_us_per_hit": r.host_us_per_hit,
                            "hook_us_per_hit": r.baseline_us_per_hit, "ratio": r.ratio})
    return out


HASH_UPDATE_ASM = """
    ldxdw r6, [r1+{parm1}]
    mov r2, r6
    and r2, 63
    stxw [r10-4], r2
    stxdw [r10-16], r6
    mov r2, r10
    add r2, -4
    mov r3, r10
    add r3, -16
    mov r4, 0
    lddw r1, map_fd(3)
    call 2
    mov r0, 0
    exit
"""


def hash_prog(arch: str, call: bool = True):
    """seen[PARM1 & 63] = PARM1: bpf_map_update_elem on a hash map (the helper trampoline).
    ``call=False``: the same program with the call replaced by ``mov r0, 0`` (the floor:
    the thunk, the frame and the program's own stores, without the helper)."""
    from probes.bpf import BpfProgType, create_map
    from probes.bpf.maps import BpfMapType
    from probes.bench_kinds import parm_offset
    seen = create_map(BpfMapType.BPF_MAP_TYPE_HASH, 4, 8, 64, name="seen")
    text = HASH_UPDATE_ASM.format(parm1=parm_offset(arch))
    if not call:
        text = text.replace("call 2", "mov r0, 0")
    return bpf.BpfProg.from_bytes(bpf.assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                                  name="hash_update", license="GPL", maps={3: seen})


PERCPU_COUNT_ASM = """
    ldxdw r6, [r1+{parm1}]
    and r6, 7
    stxw [r10-4], r6""" + bench_kinds.COUNT_AT_STACK_KEY


def percpu_prog(arch: str):
    """counts[PARM1 & 7] += 1 on this CPU's copy of a per-CPU array (the usual tracing
    counter: the lookup is inlined as percpu_array_map_gen_lookup under the JIT)."""
    from probes.bpf import BpfProgType, create_map
    from probes.bpf.maps import BpfMapType
    from probes.bench_kinds import parm_offset
    counts = create_map(BpfMapType.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 8, name="counts")
    text = PERCPU_COUNT_ASM.format(parm1=parm_offset(arch))
    return bpf.BpfProg.from_bytes(bpf.assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                                  name="percpu_count", license="GPL", maps={3: counts})


def hash_hits(calls: int, repeat: int, floor: bool = False) -> list[dict]:
    """The optimized probe with the hash-update program, both engines (probes/bench.py's
    method: plain, hooked and probed labs timed interleaved, best CPU time); ``floor``:
    also the JIT row of the program without its helper call."""
    variants = [("python", True), ("jit", True)] + ([("jit", False)] if floor else [])
    return program_hits(calls, repeat, "o", [
        (engine, "hash update" if with_call else "hash (floor)",
         lambda arch, c=with_call: hash_prog(arch, c)) for engine, with_call in variants])


def percpu_hits(calls: int, repeat: int) -> list[dict]:
    """The per-CPU array counter on an optimized probe and a plain kprobe, both engines."""
    return [row for kind in ("o", "k") for row in program_hits(
        calls, repeat, kind, [(e, "percpu count", percpu_prog) for e in ("python", "jit")])]


def program_hits(calls: int, repeat: int, kind: str, variants: list) -> list[dict]:
    """Per hit of probe kind ``kind`` ("o" or "k") with each (engine, label, program
    maker) of ``variants`` attached."""
    from unicorn import UC_HOOK_CODE

    from probes import bench, bench_kinds
    from probes.bpf.jit_guest import install_engine
    from probes.bpf.libbpf import KprobePerfEvent
    from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog
    out = []
    elf, func, call, _arg = bench_kinds.KIND_GUESTS[kind]
    for arch in ("arm64", "x86_64"):
        prof = bench.profile_for(arch, None).name
        for engine, label, make in variants:
            probed = bench._lab(arch, elf, prof)
            p = bench_kinds.setup_kind(kind, probed, func)[0]
            ev = KprobePerfEvent(probed.machine, func, kp=p)
            p.pre_handler = ev.kprobe_perf_func
            perf_event_attach_bpf_prog(PerfEvent(ev, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE),
                                       make(arch))
            install_engine(probed.machine, engine)
            plain, hooked = bench._lab(arch, elf, prof), bench._lab(arch, elf, prof)
            addr = hooked.addr_of(func)
            hooked.machine.uc.hook_add(UC_HOOK_CODE, lambda *a: None, None, addr, addr)
            for lab in (plain, hooked, probed):
                lab.call(call, calls, timeout=600)
            runs = bench._timed({"plain": plain, "hook": hooked, "probe": probed}, call, calls,
                                repeat)
            t_plain, c_plain, _ = runs["plain"]
            us = (runs["probe"][0] - t_plain) / calls * 1e6
            hook = (runs["hook"][0] - t_plain) / calls * 1e6
            out.append({"arch": arch, "kind": kind, "engine": engine, "program": label,
                        "cycles_per_hit": round((runs["probe"][1] - c_plain) / calls, 2),
                        "host_us_per_hit": us, "hook_us_per_hit": hook,
                        "ratio": us / hook if hook > 0 else None})
    return out


def print_hits(hits: list[dict]) -> None:
    print("\nper probe hit (host µs ÷ one bare Python code hook in the same run)")
    print(f"{'arch':7} {'kind':4} {'program':12} {'engine':7} {'cycles/hit':>10} {'µs/hit':>8} "
          f"{'hook µs':>8} {'ratio':>7}")
    for h in hits:
        def f(x, nd: int = 2) -> str:
            return "n/a" if x is None else f"{x:.{nd}f}"
        print(f"{h['arch']:7} {h['kind']:4} {h['program']:12} {h['engine']:7} "
              f"{f(h['cycles_per_hit'], 1):>10} "
              f"{f(h['host_us_per_hit']):>8} {f(h['hook_us_per_hit']):>8} {f(h['ratio'], 1):>7}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--hits-only", action="store_true", help="only the per-hit rows")
    ap.add_argument("--programs-only", action="store_true",
                    help="only the straight-line program rows (ns per BPF instruction)")
    ap.add_argument("--sizes", action="store_true",
                    help="also the memory program at 250 to 16,000 instructions")
    ap.add_argument("--hash-only", action="store_true",
                    help="only the hash-update rows, with the program's floor (no helper call)")
    ap.add_argument("--percpu-only", action="store_true",
                    help="only the per-CPU array counter rows (optprobe and kprobe)")
    args = ap.parse_args()
    n, repeat = (1000, 3) if args.quick else (4000, 7)
    if args.percpu_only:
        hits = percpu_hits(200 if args.quick else 2000, repeat)
        print(json.dumps(hits, indent=1)) if args.json else print_hits(hits)
        return
    if args.hash_only:
        hits = hash_hits(200 if args.quick else 2000, repeat, floor=True)
        print(json.dumps(hits, indent=1)) if args.json else print_hits(hits)
        return
    hits = [] if args.programs_only else per_hit(200 if args.quick else 2000, repeat)
    hits += [] if args.programs_only else hash_hits(200 if args.quick else 2000, repeat)
    hits += [] if args.programs_only else percpu_hits(200 if args.quick else 2000, repeat)
    if args.hits_only:
        print(json.dumps(hits, indent=1)) if args.json else print_hits(hits)
        return
    rows = [measure(name, n, repeat) for name in PROGRAMS]
    big = measure_one("alu", 16 * n, repeat)          # the per-run entry spread thinner
    big["program"] = "alu x16"
    rows.append(big)
    sizes = size_sweep(repeat) if args.sizes else []
    if args.json:
        print(json.dumps({"programs": rows, "hits": hits, "memory_sizes": sizes}, indent=1))
        return
    print(f"ns per BPF instruction, best of {repeat} ({os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}); jit = steady state, setup = machine + compile")
    print(f"{'program':8} {'insns':>6} {'interp':>8} {'python':>8} {'jit a64':>8} {'jit x86':>8} "
          f"{'kernel':>7} {'a64/k':>7} {'x86/k':>7} {'setup ms':>9} {'cycles a64/x86':>15}")
    for r in rows:
        print(f"{r['program']:8} {r['insns']:>6} {r['interp']:>8.1f} {r['python']:>8.2f} "
              f"{r['jit_arm64']:>8.2f} {r['jit_x86_64']:>8.2f} {r['kernel']:>7.3f} "
              f"{r['jit_arm64'] / r['kernel']:>7.0f} {r['jit_x86_64'] / r['kernel']:>7.0f} "
              f"{r['jit_arm64_setup_ms']:>4.0f}/{r['jit_x86_64_setup_ms']:<4.0f} "
              f"{r['cycles_arm64']:>7}/{r['cycles_x86_64']:<7}")
    print(f"kernel figures: {rows[0]['kernel_source']}")
    print("\nmarginal ns per BPF instruction (4n-instruction program minus n: no per-run entry;"
          " the compiled Python path interprets functions that long, so it is left out)")
    print(f"{'program':8} {'jit a64':>8} {'jit x86':>8} {'kernel':>7} {'a64/k':>7} {'x86/k':>7}")
    for r in rows[:-1]:
        k = r["kernel_marginal"]
        print(f"{r['program']:8} {r['jit_arm64_marginal']:>8.2f} "
              f"{r['jit_x86_64_marginal']:>8.2f} {k:>7.3f} {r['jit_arm64_marginal'] / k:>7.1f} "
              f"{r['jit_x86_64_marginal'] / k:>7.1f}")
    if sizes:
        print_sizes(sizes)
    if hits:
        print_hits(hits)


if __name__ == "__main__":
    main()
