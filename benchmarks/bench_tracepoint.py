"""Cost of a static tracepoint hit: tpdemo N (work_step fires tp_work N times) with the
site as its nop, with the key on and an empty host probe, with the tp_work event
recording, and with a raw_tp BPF program (needs clang; tests/data/tracepoint). Prints
host µs per hit beyond the nop run (best of `repeat`) and the modelled cycles per hit
(the cycle model's count, identical run to run). Asserts nothing.

    PYTHONPATH=. python benchmarks/bench_tracepoint.py [--arch all] [--n 5000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from emu.cycles import enable_cycle_model
from probes.testing import ProbeLab
from probes.trace.trace_tracepoint import tracepoint_events_of
from probes.trace.tracefs import tracefs_of
from probes.tracepoint import tracepoints_of

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("nop", "probe", "event", "raw_tp")


def _bpf_obj(tmp: Path) -> Path | None:
    clang = shutil.which("clang")
    if clang is None:
        return None
    obj = tmp / "count_tp.o"
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-I", "/usr/include/x86_64-linux-gnu",
                    "-c", str(ROOT / "tests/data/tracepoint/count_tp.bpf.c"), "-o", str(obj)],
                   check=True)
    return obj


def run_once(arch: str, kind: str, n: int, obj: Path | None) -> tuple[float, int]:
    lab = ProbeLab.load(str(ROOT / "firmware/bin" / arch / "tpdemo.elf"), argv=[str(n)])
    m = lab.machine
    enable_cycle_model(m)
    tps = tracepoints_of(m)
    if kind == "probe":
        tps.tracepoint_probe_register(tps.lookup("tp_work"), lambda d, a: None)
    elif kind == "event":
        fs = tracefs_of(m)
        tracepoint_events_of(fs)
        fs.buffer.overwrite = True
        assert fs.write("events/tpdemo/tp_work/enable", "1") == 0
    elif kind == "raw_tp" and obj is not None:
        from probes.bpf.libbpf import BpfObject
        BpfObject.open(str(obj)).load(m).attach(m, "count_raw")
    t0 = time.process_time()
    assert lab.run(timeout=600).exit_code == 0
    return time.process_time() - t0, m.clock.cycles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="all", choices=("all", "arm64", "x86_64"))
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        obj = _bpf_obj(Path(tmp))
        for arch in ("arm64", "x86_64") if a.arch == "all" else (a.arch,):
            best: dict[str, tuple[float, int]] = {}
            for _ in range(a.repeat):
                for kind in KINDS:
                    if kind == "raw_tp" and obj is None:
                        continue
                    t, cyc = run_once(arch, kind, a.n, obj)
                    best[kind] = (min(t, best.get(kind, (t, 0))[0]), cyc)
            base_t, base_c = best["nop"]
            print(f"{arch}: tpdemo {a.n}, nop run {base_t * 1e3:.1f} ms, {base_c} cycles")
            for kind, (t, cyc) in best.items():
                if kind != "nop":
                    print(f"  {kind:8} {(t - base_t) / a.n * 1e6:8.2f} µs/hit  "
                          f"{(cyc - base_c) / a.n:8.1f} cycles/hit")


if __name__ == "__main__":
    main()
