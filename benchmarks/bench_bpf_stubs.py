"""Per hit of a kretprobe (r), a kprobe on an ftrace site (f), a tracepoint event (tp) and a
raw tracepoint (rt) carrying the array-counting program: the compiled Python engine and
the guest JIT (entered from a per-CPU guest stub, probes/bpf/jit_direct.py) against one
bare Python code hook on the probed function, all in one process with the labs
interleaved (best of N calls each), as `emu bench` measures. Numbers only, nothing
asserted; runs against whichever tree is first on PYTHONPATH (the tracepoint kinds are set
up here, so an older tree without `emu bench --kind tp` measures them too).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_bpf_stubs.py [--repeat N] [--kind K]...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unicorn import UC_HOOK_CODE  # noqa: E402

from probes import bench_kinds  # noqa: E402
from probes.bench import guest_path  # noqa: E402
from probes.bpf import BpfProgType, assemble, create_map  # noqa: E402
from probes.bpf.jit_guest import install_engine  # noqa: E402
from probes.bpf.maps import BpfMapType  # noqa: E402
from probes.bpf.program import BpfProg  # noqa: E402
from probes.testing import ProbeLab  # noqa: E402

TP_GUEST = ("tpdemo", "work_step", "work_loop", 2000)
GUESTS = dict(bench_kinds.KIND_GUESTS, tp=TP_GUEST, rt=TP_GUEST)
FIB_CALLS = {15: 1973}           # fib(n) calls fib this often (the f row's hits)


def _prog(prog_type: BpfProgType) -> BpfProg:
    counts = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="counts")
    return BpfProg.from_bytes(assemble(bench_kinds.COUNTER_ASM), prog_type=prog_type,
                              name="count", license="GPL", maps={3: counts})


def _setup(lab: ProbeLab, kind: str, func: str) -> None:
    m = lab.machine
    if kind == "tp":
        from probes.trace.bpf_tracepoint import attach_tracepoint_prog
        attach_tracepoint_prog(m, _prog(BpfProgType.BPF_PROG_TYPE_TRACEPOINT), "tpdemo", "tp_work")
    elif kind == "rt":
        from probes.trace.bpf_tracepoint import bpf_raw_tp_link_attach
        bpf_raw_tp_link_attach(m, _prog(BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT), "tp_work")
    else:
        bench_kinds.setup_kind(kind, lab, func, bpf=True)


def measure(arch: str, kind: str, repeat: int) -> dict:
    elf, func, call, arg = GUESTS[kind]

    def lab_of(engine: str | None = None, hook: bool = False) -> ProbeLab:
        lab = ProbeLab.load(str(guest_path(arch, elf)))
        lab.machine.enable_cycle_model()
        if hook:
            addr = lab.addr_of(func)
            lab.machine.uc.hook_add(UC_HOOK_CODE, lambda *_a: None, None, addr, addr)
        elif engine is not None:
            _setup(lab, kind, func)
            install_engine(lab.machine, engine)
        lab.call(call, arg, timeout=600)           # warm up: translation, JIT, stubs
        return lab

    labs = {"plain": lab_of(), "hook": lab_of(hook=True), "python": lab_of("python"),
            "jit": lab_of("jit")}
    best = dict.fromkeys(labs, float("inf"))
    cycles: dict[str, int] = {}
    for _ in range(repeat):
        for name, lab in labs.items():
            c0 = lab.machine.clock.cycles
            t = time.thread_time()
            lab.call(call, arg, timeout=600)
            best[name] = min(best[name], time.thread_time() - t)
            cycles[name] = lab.machine.clock.cycles - c0
    hits = FIB_CALLS.get(arg, arg) if kind == "f" else arg
    row: dict = {"arch": arch, "kind": kind, "hits": hits}
    for name in ("hook", "python", "jit"):
        row[f"{name}_us"] = round((best[name] - best["plain"]) / hits * 1e6, 2)
        row[f"{name}_cycles"] = round((cycles[name] - cycles["plain"]) / hits, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kind", action="append", choices=["r", "f", "tp", "rt"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(arch, kind, args.repeat) for kind in (args.kind or ["r", "f", "tp", "rt"])
            for arch in ("arm64", "x86_64")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'arch':7} {'kind':4} {'python µs':>9} {'jit µs':>8} {'hook µs':>8} "
          f"{'python cyc':>10} {'jit cyc':>9}")
    for r in rows:
        print(f"{r['arch']:7} {r['kind']:4} {r['python_us']:9.2f} {r['jit_us']:8.2f} "
              f"{r['hook_us']:8.2f} {r['python_cycles']:10.2f} {r['jit_cycles']:9.2f}")


if __name__ == "__main__":
    main()
