"""The BPF compiled path's host memory is bounded (issue 11): each BPF function is compiled
on its own, and functions whose generated source would be too long (CPython's compiler needs
~3.5 KB per line while compiling) run in the interpreter instead, calling and being called
by compiled ones. A valid 1M-instruction program runs in a subprocess under an address-space
limit; one instruction more is refused with the kernel's E2BIG. BPF has no guest arch: these
run on the host alone."""
from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from conftest import ROOT
from probes.bpf import jit
from probes.bpf.asm import assemble_insns
from probes.bpf.context import BpfRunContext
from probes.bpf.errors import BpfRuntimeError, VerifierError
from probes.bpf.isa import BPF_COMPLEXITY_LIMIT_INSNS
from probes.bpf.program import BpfProg

MILLION = f"""
import resource, sys
from probes.bpf.asm import assemble_insns
from probes.bpf.program import BpfProg
mov, add, jeq, ex = assemble_insns("mov r0, 0\\nadd r0, 1\\njeq r0, 0, +0\\nexit")
n = {BPF_COMPLEXITY_LIMIT_INSNS}
# a block every fourth instruction: the shape that cost ~12 KB per instruction to compile
prog = BpfProg([mov] + [jeq if i % 4 == 0 else add for i in range(n - 2)] + [ex])
print(prog.run(b""), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""

AS_LIMIT = 2 << 30          # before the bound, compiling this program needed ~12 GB


@pytest.mark.slow
def test_million_insn_program_runs_in_bounded_memory():
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    r = subprocess.run([sys.executable, "-c", MILLION], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, preexec_fn=limit)
    assert r.returncode == 0, r.stderr[-2000:]
    r0, rss = map(int, r.stdout.split())
    n = BPF_COMPLEXITY_LIMIT_INSNS
    assert r0 == (n - 2) - len(range(0, n - 2, 4))       # one add per non-jeq slot
    assert rss < 1024, f"peak RSS {rss} MiB"


def test_one_insn_over_the_limit_is_e2big():
    (ex,) = assemble_insns("exit")
    (mov,) = assemble_insns("mov r0, 0")
    prog = BpfProg([mov] * BPF_COMPLEXITY_LIMIT_INSNS + [ex])
    with pytest.raises(VerifierError) as e:
        prog.load()
    assert e.value.errno == errno.E2BIG


CALLS = """
    mov r7, 0
    mov r1, 3
    call local sq
    add r7, r0
    mov r1, 2
    call local sq
    add r7, r0
    mov r1, 1
    call local sq
    add r7, r0
    mov r0, r7
    exit
sq:
    mov r0, r1
    mul r0, r1
    stxdw [r10-8], r0
    ldxdw r0, [r10-8]
    exit
"""


def run_both(prog: BpfProg, budget: int) -> tuple:
    out = []
    for engine in ("jit", "interp"):
        try:
            out.append(prog.run(b"", BpfRunContext(insn_budget=budget), engine=engine))
        except BpfRuntimeError as e:
            out.append((e.pc, e.reason))
    return tuple(out)


@pytest.mark.parametrize("interpreted", [(), ("F0",), ("F12",), ("F0", "F12")])
def test_compiled_and_interpreted_functions_agree(monkeypatch, interpreted):
    """Main (12 slots) and sq, each compiled or interpreted: the same r0 and, for every
    budget, the same stop at the same instruction as the interpreter alone."""
    real = jit._function_source

    def source(gen, start, end):
        lines = real(gen, start, end)
        # a function picked to be interpreted gets a source "too long" for the limit
        return lines * (jit.JIT_MAX_FUNC_LINES + 1) if f"F{start}" in interpreted else lines
    monkeypatch.setattr(jit, "_function_source", source)
    prog = BpfProg(assemble_insns(CALLS))
    prog.load()
    compiled = prog.compiled()
    for name in ("F0", "F12"):
        assert (f"# {name}:" in compiled.source) == (name in interpreted)
    assert run_both(prog, 1_000_000) == (14, 14)
    for budget in range(1, 30):
        a, b = run_both(prog, budget)
        assert a == b, budget


def test_program_limit_interprets_the_rest(monkeypatch):
    monkeypatch.setattr(jit, "JIT_MAX_PROG_LINES", 1)
    prog = BpfProg(assemble_insns(CALLS))
    compiled = prog.compiled()
    assert compiled.source.count("interpreted") == 2
    assert prog.run(b"") == 14
