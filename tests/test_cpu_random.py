"""Hardware random instructions are deterministic, seeded by --seed like getrandom (issue 11).

x86-64: RDRAND/RDSEED (16/32/64-bit) from the machine's seeded stream, CF=1. arm64: the CPU
model has no FEAT_RNG, so AT_HWCAP2 does not offer it and RNDR is undefined, the same in
every run."""
from __future__ import annotations

import re

import pytest

from conftest import run_emu
from emu import hwrng
from test_cpu_state import cpu_prog  # noqa: F401  (fixture)


def test_hw_random_is_seeded(arch, cpu_prog):
    prog = str(cpu_prog(arch, "hwrandom"))
    if arch == "arm64":
        r = run_emu("run", prog)
        assert r.out == "hwcap2 rng=0\n" and r.rc == 139
        assert r.err.startswith("emu: guest fault: undefined instruction at pc ") and "rndr" in r.err
        assert run_emu("run", "--seed", "9", prog).err == r.err
        return
    if not hwrng.available():
        pytest.skip("RDRAND cannot be redirected here (needs an x86-64 host and a C compiler)")
    a, b, c = (run_emu("run", "--seed", s, prog) for s in ("1", "1", "2"))
    assert a.rc == b.rc == c.rc == 0, a.err
    assert a.out == b.out != c.out
    lines = a.out.splitlines()
    assert len(lines) == 3 and len(set(lines)) == 3
    form = re.compile(r"rdrand=[0-9a-f]{16} cf=1 rdseed=[0-9a-f]{16} cf=1 r32=[0-9a-f]{8} r16=[0-9a-f]{4}")
    assert all(form.fullmatch(line) for line in lines), lines
    default = run_emu("run", prog)
    assert default.out == run_emu("run", "--seed", "0", prog).out


def test_streams_are_per_machine():
    """Two machines interleaving runs each see their own stream."""
    if not hwrng.available():
        pytest.skip("RDRAND cannot be redirected here")
    from unicorn import x86_const as X

    from emu.machine import Machine
    from emu.memory import PROT_EXEC, PROT_READ

    def machine(seed):
        m = Machine("x86_64")
        m.memory.map(0x10000, 0x1000, PROT_READ | PROT_EXEC, "code")
        m.memory.write(0x10000, bytes.fromhex("480fc7f0") + b"\xf4")    # rdrand rax; hlt
        m.halt_allowed = True
        m.seed_random(seed)
        return m

    def draw(m):
        assert m.run(begin=0x10000).exit_code == 0
        return m.uc.reg_read(X.UC_X86_REG_RAX)

    m1, m2, m3 = machine(5), machine(5), machine(6)
    seq1 = [draw(m1), draw(m1)]
    seq2 = [draw(m2), draw(m3), draw(m2)]
    assert seq1 == [seq2[0], seq2[2]] and seq2[1] != seq2[0]
    assert m1.random.draws == 2
