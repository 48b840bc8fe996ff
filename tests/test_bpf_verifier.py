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


# --- register types and context access per program type ------------------------------------

def test_reg_types_are_the_kernels_names_with_the_logs_spelling() -> None:
    from probes.bpf.verifier import RegType
    assert RegType.SCALAR_VALUE == "scalar" and RegType.PTR_TO_STACK == "fp"
    assert RegType.PTR_TO_MAP_VALUE_OR_NULL == "map_value_or_null"
    assert {t.name for t in RegType} >= {"SCALAR_VALUE", "PTR_TO_CTX", "PTR_TO_STACK",
                                        "PTR_TO_MAP_VALUE", "PTR_TO_MAP_VALUE_OR_NULL",
                                        "CONST_PTR_TO_MAP", "PTR_TO_PACKET", "PTR_TO_PACKET_END",
                                        "PTR_TO_MEM", "PTR_TO_FUNC", "NOT_INIT"}
    p = bpf.BpfProg(bpf.assemble_insns("mov r1, r10\ncall 5\nmov r0, r1\nexit"),
                    BpfProgType.BPF_PROG_TYPE_KPROBE, license="GPL")
    with pytest.raises(bpf.VerifierError) as e:
        p.load()
    assert e.value.reason == "R1 !read_ok"
    q = bpf.BpfProg(bpf.assemble_insns("mov r2, 0\nmov r1, r10\ncall 1\nexit"),
                    BpfProgType.BPF_PROG_TYPE_KPROBE, license="GPL")
    with pytest.raises(bpf.VerifierError) as e:
        q.load()
    assert "R1 type=fp expected=map_ptr" in e.value.reason


# (program type, load, refused?) after each type's is_valid_access: tracepoint records from
# offset 8 (the common fields are not readable) to PERF_MAX_TRACE_SIZE, raw tracepoint args
# as 12 u64s, kprobe pt_regs; all read-only and size-aligned.
CTX_ACCESS = [
    ("tracepoint", "ldxdw r0, [r1+8]", None),
    ("tracepoint", "ldxw r0, [r1+0]", "invalid bpf_context access off=0 size=4"),
    ("tracepoint", "ldxb r0, [r1+7]", "invalid bpf_context access off=7 size=1"),
    ("tracepoint", "ldxw r0, [r1+8188]", None),
    ("tracepoint", "ldxw r0, [r1+8192]", "invalid bpf_context access off=8192 size=4"),
    ("tracepoint", "ldxw r0, [r1+10]", "invalid bpf_context access off=10 size=4"),
    ("raw_tracepoint", "ldxdw r0, [r1+88]", None),
    ("raw_tracepoint", "ldxdw r0, [r1+96]", "invalid bpf_context access off=96 size=8"),
    ("raw_tracepoint", "ldxw r0, [r1+2]", "invalid bpf_context access off=2 size=4"),
    ("raw_tracepoint", "stdw [r1+0], 1", "read-only"),
    ("kprobe", "ldxdw r0, [r1+328]", None),
    ("kprobe", "ldxh r0, [r1+3]", "invalid bpf_context access off=3 size=2"),
]


@pytest.mark.parametrize("ptype, asm, refusal", CTX_ACCESS,
                         ids=[f"{t}-{a.split()[-1]}" for t, a, _ in CTX_ACCESS])
def test_ctx_access_per_program_type(ptype: str, asm: str, refusal: str | None) -> None:
    p = bpf.BpfProg(bpf.assemble_insns(f"{asm}\nmov r0, 0\nexit"),
                    BpfProgType["BPF_PROG_TYPE_" + ptype.upper()], license="GPL")
    if refusal is None:
        p.load()
        return
    with pytest.raises(bpf.VerifierError) as e:
        p.load()
    assert refusal in e.value.reason and e.value.insn_idx == 0
