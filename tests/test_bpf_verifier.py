"""Verifier cases from tests/data/bpf/verifier.cases: refusal text (with the
instruction index) or the result on both engines; plus the log."""
from __future__ import annotations

from pathlib import Path

import pytest

from probes import bpf
from probes.bpf.datafile import DataFile, parse_case_table
from probes.bpf.maps import BpfMapType
from probes.bpf.prog_types import BpfProgType

CASES = parse_case_table(Path(__file__).resolve().parent / "data" / "bpf" / "verifier.cases")


def _prog(df: DataFile) -> bpf.BpfProg:
    ptype = BpfProgType["BPF_PROG_TYPE_" + df.sections.get("type", ["unspec"])[0].upper()]
    maps = {}
    for line in df.sections.get("maps", []):
        fd, kind, key, value, entries, *flags = line.split()
        mtype = BpfMapType["BPF_MAP_TYPE_" + kind.upper()]
        maps[int(fd)] = bpf.create_map(mtype, int(key), int(value), int(entries),
                                       int(flags[0]) if flags else 0, name=f"m{fd}")
    license = " ".join(df.sections.get("license", []))
    return bpf.BpfProg(bpf.assemble_insns(df.asm or ""), ptype, maps=maps, license=license)


@pytest.mark.parametrize("name,df", CASES, ids=[c[0] for c in CASES])
def test_verifier_case(name: str, df: DataFile) -> None:
    if df.error is not None:
        with pytest.raises(bpf.VerifierError) as exc:
            _prog(df).load()
        assert df.error in str(exc.value)
        assert exc.value.log.endswith(exc.value.reason)
        return
    for engine in ("interp", "jit"):
        assert _prog(df).run(bytearray(df.mem or bytes(64)), engine=engine) == df.result


def test_error_names_the_instruction() -> None:
    code = bpf.assemble("mov r0, 0\nmov r1, r7\nexit")
    with pytest.raises(bpf.VerifierError) as exc:
        bpf.run(code)
    assert exc.value.insn_idx == 1
    assert exc.value.reason == "R7 !read_ok"
    assert "1: (bf) r1 = r7" in exc.value.log


def test_log_lists_instructions_and_summary() -> None:
    log = bpf.verify(bpf.assemble("mov r0, 1\ncall local f\nexit\nf:\nmov r0, 2\nexit"))
    lines = log.splitlines()
    assert lines[:2] == ["func#0 @0", "func#1 @3"]
    assert "0: (b7) r0 = 1" in lines
    assert lines[-1].startswith("processed ") and "2 function(s)" in lines[-1]


def test_empty_program() -> None:
    with pytest.raises(bpf.VerifierError, match="no instructions"):
        bpf.run(b"")


def test_truncated_instruction() -> None:
    with pytest.raises(bpf.VerifierError, match="not a multiple of 8"):
        bpf.run(b"\x95\0\0\0")


def test_refusal_happens_before_any_instruction_runs() -> None:
    env = bpf.BpfRunContext()
    # the printk would run first, but insn 6 reads an uninitialised register
    code = bpf.assemble("""
        stw [r10-4], 0x0a6968
        mov r1, r10
        add r1, -4
        mov r2, 4
        call 6
        mov r0, 0
        mov r0, r9
        exit""")
    with pytest.raises(bpf.VerifierError):
        bpf.run(code, env=env)
    assert env.trace_printk == []
