"""Host cost per hit of the trace layer: a recorded kprobe event and a small attached BPF
program, on `hot_leaf` of the hotloop firmware (hot_call(n) calls it n times), against the
same run without probes and with an empty kprobe. Prints a table; asserts nothing.

    PYTHONPATH=. python benchmarks/bench_trace_hit.py [--arch all] [--calls 2000] [--repeat 5]

Each row is the best CPU time of `repeat` interleaved calls, minus the unprobed run, per
hit (µs). Rows:
  kprobe      an empty pre handler (x86 boosts it after the first hit, as the kernel)
  event       `p:b/leaf hot_leaf`, enabled: one binary record per hit into the ring buffer
  event+args  the same with `a=$arg1:u64 s=$stack:x64 c=$comm` (three fetches, a string)
  bpf         the counting program of `emu bench` (11 insns, an array map) on a
              kprobe-PMU event, nothing recorded
  event+bpf   the event above with the counting program attached: program, then record
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from probes.bench_kinds import attach_counter, counting_prog
from probes.kprobes import Kprobe
from probes.testing import ProbeLab
from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog
from probes.trace.tracefs import tracefs_of

ROOT = Path(__file__).resolve().parents[1]
FUNC, CALL = "hot_leaf", "hot_call"


def lab(arch: str) -> ProbeLab:
    return ProbeLab.load(str(ROOT / "firmware" / "bin" / arch / "hotloop.elf"))


def setup(kind: str, lb: ProbeLab) -> None:
    if kind == "kprobe":
        lb.kprobes.register_kprobe(Kprobe(symbol_name=FUNC, pre_handler=lambda p, r: 0))
        return
    if kind == "bpf":
        p = Kprobe(symbol_name=FUNC)
        lb.kprobes.register_kprobe(p)
        attach_counter(lb, FUNC, [p])
        return
    fs = tracefs_of(lb.machine)
    args = " a=$arg1:u64 s=$stack:x64 c=$comm" if kind == "event+args" else ""
    assert fs.write("kprobe_events", f"p:b/leaf {FUNC}{args}") == 0, fs.read("error_log")
    assert fs.write("events/b/leaf/enable", "1") == 0
    fs.buffer.overwrite = True
    if kind == "event+bpf":
        call = fs.events["b/leaf"]
        err = perf_event_attach_bpf_prog(PerfEvent(call, PerfType.PERF_TYPE_KPROBE,
                                                   EventKind.KPROBE), counting_prog())
        assert err == 0, err


KINDS = ("kprobe", "event", "event+args", "bpf", "event+bpf")


def measure(arch: str, calls: int, repeat: int) -> dict[str, float]:
    labs = {"plain": lab(arch)}
    for kind in KINDS:
        labs[kind] = lab(arch)
        setup(kind, labs[kind])
    for lb in labs.values():                      # warm-up: translation, boosting
        lb.call(CALL, calls, timeout=600)
    best = dict.fromkeys(labs, float("inf"))
    for _ in range(repeat):
        for name, lb in labs.items():
            t = time.thread_time()
            lb.call(CALL, calls, timeout=600)
            best[name] = min(best[name], time.thread_time() - t)
    return {k: (best[k] - best["plain"]) / calls * 1e6 for k in KINDS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="all")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    arches = ["arm64", "x86_64"] if a.arch == "all" else [a.arch]
    print(f"host µs per hit on {FUNC} (best of {a.repeat}, {a.calls} hits a call)")
    print(f"{'arch':<8}" + "".join(f"{k:>12}" for k in KINDS))
    for arch in arches:
        r = measure(arch, a.calls, a.repeat)
        print(f"{arch:<8}" + "".join(f"{r[k]:>12.2f}" for k in KINDS))


if __name__ == "__main__":
    main()
