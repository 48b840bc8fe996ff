"""BPF engines: instructions per second of the interpreter and the compiled
path on loop-heavy programs, and their ratio. Numbers only, nothing asserted.

    .venv/bin/python benchmarks/bench_bpf.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes import bpf  # noqa: E402

# An ALU loop: a 64-bit LCG and a checksum, all in registers.
ALU_LOOP = """
    mov r0, 0
    mov r1, {n}
    lddw r2, 6364136223846793005
    lddw r5, 1442695040888963407
    mov r3, 1
loop:
    mul r3, r2
    add r3, r5
    mov r4, r3
    rsh r4, 33
    xor r0, r4
    sub r1, 1
    jne r1, 0, loop
    exit
"""

# A memory loop: a byte histogram of the input kept on the stack, plus calls.
MEM_LOOP = """
    mov r6, r1
    mov r7, r2
    mov r8, 0
    mov r9, 0
loop:
    mov r1, r6
    add r1, r8
    ldxb r2, [r1]
    and r2, 63
    lsh r2, 3
    mov r3, r10
    add r3, -512
    add r3, r2
    ldxdw r4, [r3]
    add r4, 1
    stxdw [r3], r4
    mov r1, r4
    call local mix
    add r9, r0
    add r8, 1
    jlt r8, r7, loop
    mov r0, r9
    exit
mix:
    mov r0, r1
    lsh r0, 3
    xor r0, r1
    exit
"""


def measure(code: bytes, mem: bytes, engine: str, repeat: int) -> tuple[float, int, int]:
    """Best-of-``repeat`` instructions/second, the instruction count, r0."""
    best = float("inf")
    count = result = 0
    prog = bpf.BpfProg.from_bytes(code)
    prog.run(bytearray(mem), bpf.BpfRunContext(insn_budget=10**9), engine=engine)  # warm-up: verify, compile
    for _ in range(repeat):
        env = bpf.BpfRunContext(insn_budget=10**9)
        start = time.perf_counter()
        result = prog.run(bytearray(mem), env, engine=engine)
        best = min(best, time.perf_counter() - start)
        count = env.insn_count
    return count / best, count, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    args = parser.parse_args(argv)
    n = 20_000 if args.quick else 200_000
    cases = [("alu loop", bpf.assemble(ALU_LOOP.format(n=n)), b""),
             ("memory + call loop", bpf.assemble(MEM_LOOP), bytes(range(256)) * (n // 2560 + 1))]
    print(f"{'program':20} {'insns':>10} {'interp insn/s':>15} {'jit insn/s':>15} {'ratio':>7}")
    for name, code, mem in cases:
        interp, count, r_interp = measure(code, mem, "interp", 1 if not args.quick else 2)
        jit, _, r_jit = measure(code, mem, "jit", 3)
        assert r_interp == r_jit, "engines disagree"
        print(f"{name:20} {count:>10} {interp:>15,.0f} {jit:>15,.0f} {jit / interp:>6.1f}x")
    start = time.perf_counter()
    prog = bpf.BpfProg.from_bytes(cases[1][1])
    prog.load()
    prog.compiled()
    print(f"verify + compile of the memory loop: {(time.perf_counter() - start) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
