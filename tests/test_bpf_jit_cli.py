"""``emu bpf disasm --jited`` and ``emu bpf run --bpf-engine`` on both arches."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from probes.bpf import assemble, disassemble
from probes.bpf.cli import main

DATA = Path(__file__).resolve().parent / "data" / "bpf_jit"
PROG = str(DATA / "loop_atomic_call.s")
ARCHES = ["arm64", "x86_64"]
# the machine code that must appear under `lock fetch add` (the kernel's choices)
FETCH_ADD = {"arm64": ["ldxr", "stlxr", "dmb"], "x86_64": ["lock xadd"]}


@pytest.mark.parametrize("arch", ARCHES)
def test_disasm_jited_interleaves_bpf_and_machine_code(arch: str, capsys) -> None:
    assert main(["bpf", "disasm", "--asm", PROG, "--jited", "--arch", arch]) == 0
    out = capsys.readouterr().out
    bpf_lines = disassemble(assemble(Path(PROG).read_text())).splitlines()
    blocks = re.split(r"^; ", out, flags=re.M)[1:]
    titles = [b.splitlines()[0] for b in blocks]
    assert titles[0] == "prologue" and titles[-1] == "epilogue"
    assert [t.split(": ", 1)[1] for t in titles[1:-1]] == bpf_lines
    for block in blocks:              # every BPF instruction has code under it
        assert re.search(r"^  0x[0-9a-f]+:  ([0-9a-f]{2} )+", block, re.M), block
    fetch = next(b for b in blocks if "lock fetch add" in b.splitlines()[0])
    for mnemonic in FETCH_ADD[arch]:
        assert mnemonic in fetch
    assert f"; {arch}," in out.splitlines()[0]


@pytest.mark.parametrize("arch", ARCHES)
def test_run_jit_with_cycles_is_repeatable(arch: str, capsys) -> None:
    outs = []
    for _ in range(2):
        assert main(["bpf", "run", "--asm", PROG, "--bpf-engine", "jit", "--arch", arch,
                     "--cycles"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    r0, cycles = outs[0].splitlines()
    assert r0 == "r0 = 0x3b9aca00"
    assert re.fullmatch(rf"cycles = [1-9]\d* \({arch}, [\w-]+\)", cycles)


@pytest.mark.parametrize("engine", ["interp", "python", "jit"])
def test_every_engine_gives_the_same_r0(engine: str, capsys) -> None:
    assert main(["bpf", "run", "--asm", PROG, "--bpf-engine", engine]) == 0
    assert capsys.readouterr().out == "r0 = 0x3b9aca00\n"


def test_cycles_need_the_jit(capsys) -> None:
    assert main(["bpf", "run", "--asm", PROG, "--bpf-engine", "interp", "--cycles"]) == 1
    assert "--cycles needs --bpf-engine jit" in capsys.readouterr().err


def test_unknown_arch_is_a_usage_error(capsys) -> None:
    assert main(["bpf", "disasm", "--asm", PROG, "--jited", "--arch", "riscv"]) == 2
    assert "invalid choice" in capsys.readouterr().err
