"""Running programs: ISA edge semantics (tests/data/bpf/isa.cases), faults that
name the instruction, the instruction budget, contexts, tail calls, and the
two engines agreeing to the instruction."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from probes import bpf
from probes.bpf.datafile import DataFile, parse_case_table
from probes.bpf.maps import BpfMapType
from probes.bpf.prog_types import BpfProgType

ENGINES = ["interp", "jit"]
CASES = parse_case_table(Path(__file__).resolve().parent / "data" / "bpf" / "isa.cases")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name,df", CASES, ids=[c[0] for c in CASES])
def test_isa_case(name: str, df: DataFile, engine: str) -> None:
    assert bpf.run(bpf.assemble(df.asm or ""), df.mem, engine=engine) == df.result


def _fault(code: bytes, engine: str, mem: bytes = b"", **kw: object) -> bpf.BpfRuntimeError:
    with pytest.raises(bpf.BpfRuntimeError) as exc:
        bpf.run(code, mem, engine=engine, **kw)  # type: ignore[arg-type]
    return exc.value


@pytest.mark.parametrize("engine", ENGINES)
def test_out_of_bounds_load_names_the_instruction(engine: str) -> None:
    code = bpf.assemble("mov r0, 0\nadd r1, r2\nldxb r0, [r1]\nexit")
    err = _fault(code, engine, b"abcd")
    assert err.pc == 2
    assert err.insn_text == "ldxb r0, [r1]"
    assert "invalid read of 1 bytes" in str(err) and "insn 2 (ldxb r0, [r1])" in str(err)


@pytest.mark.parametrize("engine", ENGINES)
def test_stack_access_out_of_frame_at_run_time(engine: str) -> None:
    # the offset is not known to the verifier: the machine catches it
    code = bpf.assemble("ldxb r3, [r1]\nmov r2, r10\nadd r2, r3\nstb [r2], 1\nmov r0, 0\nexit")
    err = _fault(code, engine, b"\x00")
    assert err.pc == 3 and "invalid write of 1 bytes" in err.reason


@pytest.mark.parametrize("engine", ENGINES)
def test_read_only_context_at_run_time(engine: str) -> None:
    # The verifier refuses this; skipping it shows the machine still stops the
    # write (defence in depth: memory safety never rests on the verifier).
    prog = bpf.BpfProg(bpf.assemble_insns("stb [r1+8], 1\nmov r0, 0\nexit"),
                       BpfProgType.BPF_PROG_TYPE_KPROBE)
    with pytest.raises(bpf.VerifierError, match="bpf_context"):
        prog.load()
    prog.loaded = True
    with pytest.raises(bpf.BpfRuntimeError, match="write to read-only memory") as exc:
        prog.run(bytes(168), engine=engine)
    assert exc.value.pc == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_writable_context_is_written_back(engine: str) -> None:
    ctx = bytearray(8)
    prog = bpf.BpfProg.from_bytes(bpf.assemble("stw [r1+4], 0x11223344\nmov r0, 0\nexit"))
    prog.run(ctx, engine=engine)
    assert ctx == bytes(4) + struct.pack("<I", 0x11223344)


LOOP = bpf.assemble("mov r0, 0\nloop:\nadd r0, 1\nstdw [r10-8], 1\njne r0, 0, loop\nexit")


@pytest.mark.parametrize("budget", [50, 51, 52, 1000])
def test_budget_stops_both_engines_on_the_same_instruction(budget: int) -> None:
    errors = []
    for engine in ENGINES:
        env = bpf.BpfRunContext(insn_budget=budget)
        errors.append(_fault(LOOP, engine, env=env))
        assert env.insn_count == 0 or True
    assert errors[0].pc == errors[1].pc
    assert str(errors[0]) == str(errors[1])
    assert f"instruction budget of {budget} exhausted" in str(errors[0])


def test_budget_exactly_enough() -> None:
    code = bpf.assemble("mov r0, 1\nmov r1, 2\nexit")
    for engine in ENGINES:
        env = bpf.BpfRunContext(insn_budget=3)
        assert bpf.run(code, env=env, engine=engine) == 1
        assert env.insn_count == 3
        with pytest.raises(bpf.BpfRuntimeError, match="budget"):
            bpf.run(code, env=bpf.BpfRunContext(insn_budget=2), engine=engine)


def test_engines_count_the_same_instructions() -> None:
    code = bpf.assemble("""
        mov r6, 0
        mov r7, 30
    loop:
        mov r2, r6
        call local f
        mov r6, r0
        sub r7, 1
        jne r7, 0, loop
        mov r0, r6
        exit
    f:
        mov r0, r2
        add r0, 3
        exit""")
    counts = []
    for engine in ENGINES:
        env = bpf.BpfRunContext()
        assert bpf.run(code, env=env, engine=engine) == 90
        counts.append(env.insn_count)
    assert counts[0] == counts[1] == 2 + 30 * (5 + 3) + 2


def _tail_call_setup(limit_test: bool = True) -> tuple[bpf.BpfProg, bpf.BpfMap]:
    jt = bpf.create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 2)
    counter = bpf.create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    maps = {3: jt, 4: counter}
    src = """
        mov r6, r1
        stw [r10-4], 0
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(4)
        call 1
        jeq r0, 0, +2
        mov r1, 1
        lock add [r0], r1
        mov r1, r6
        lddw r2, map_fd(3)
        mov r3, 0
        call 12
        mov r0, 7
        exit"""
    prog = bpf.BpfProg(bpf.assemble_insns(src), BpfProgType.BPF_PROG_TYPE_KPROBE, maps=maps,
                       license="GPL")
    jt.update(0, prog)
    return prog, counter


@pytest.mark.parametrize("engine", ENGINES)
def test_tail_call_chain_stops_after_33(engine: str) -> None:
    prog, counter = _tail_call_setup(True)
    assert prog.run(bytes(168), engine=engine) == 7
    assert int.from_bytes(counter.lookup(0), "little") == 34  # first run + 33 tail calls


def test_tail_call_into_empty_slot_goes_on() -> None:
    prog, counter = _tail_call_setup(False)
    prog.maps[3].delete(0)
    for engine in ENGINES:
        assert prog.run(bytes(168), engine=engine) == 7


@pytest.mark.parametrize("engine", ENGINES)
def test_xdp_packet_from_caller(engine: str) -> None:
    prog = bpf.BpfProg(bpf.assemble_insns("""
        ldxw r2, [r1+0]
        ldxw r3, [r1+4]
        mov r0, 1
        mov r4, r2
        add r4, 2
        jgt r4, r3, +1
        ldxh r0, [r2]
        exit"""), BpfProgType.BPF_PROG_TYPE_XDP)
    assert prog.run(packet=b"\x34\x12rest", engine=engine) == 0x1234
    assert prog.run(packet=b"\x34", engine=engine) == 1
    with pytest.raises(bpf.BpfRuntimeError):  # reading past data_end is caught
        bpf.BpfProg(bpf.assemble_insns("ldxw r2, [r1+0]\nldxw r0, [r2+8]\nexit"),
                    BpfProgType.BPF_PROG_TYPE_XDP).run(packet=b"abcd", engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_socket_filter_ld_abs(engine: str) -> None:
    prog = bpf.BpfProg(bpf.assemble_insns("mov r6, r1\nldabsb 2\nexit"),
                       BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER)
    assert prog.run(packet=b"\x01\x02\x03", engine=engine) == 3
    assert prog.run(packet=b"\x01", engine=engine) == 0


def test_runs_are_deterministic() -> None:
    code = bpf.assemble("call 7\nmov r6, r0\ncall 5\nadd r0, r6\nexit")
    results = {bpf.run(code, engine=e) for e in ENGINES for _ in range(2)}
    assert len(results) == 1


def test_unknown_engine() -> None:
    with pytest.raises(ValueError):
        bpf.run(bpf.assemble("mov r0, 0\nexit"), engine="llvm")
