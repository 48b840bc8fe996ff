"""Fuzzing: random bytes, random instruction sequences and mutated conformance
programs never crash the host (only BpfError escapes), and whenever a
program runs, the interpreter and the compiled path agree exactly."""
from __future__ import annotations

import random

import pytest

from probes import bpf
from probes.bpf.datafile import parse_data_file
from probes.bpf.isa import BPF_LDDW, OPCODES, Insn, encode

SEEDS = range(4)
CODES = sorted(OPCODES)
EDGE = [0, 1, -1, 2, 7, 8, 16, 31, 32, 33, 63, 64, 0x7FFFFFFF, -0x80000000, 0xFF, -8, -16, 100]


def outcome(code: bytes, engine: str, mem: bytes = bytes(16)) -> tuple[str, object]:
    """Run once; anything but a BpfError is a bug."""
    env = bpf.BpfRunContext(insn_budget=2000)
    try:
        return "ok", bpf.run(code, mem, env=env, engine=engine)
    except bpf.VerifierError as e:
        return "refused", e.reason
    except bpf.BpfRuntimeError as e:
        return "fault", (e.pc, e.reason)
    except bpf.BpfError as e:
        return "error", str(e)


def check(code: bytes) -> str:
    first = outcome(code, "interp")
    if first[0] != "refused":
        assert outcome(code, "jit") == first, bpf.disassemble(code)
    else:
        assert outcome(code, "jit")[0] == "refused"
    if first[0] == "ok":
        assert 0 <= first[1] < 2**64  # type: ignore[operator]
    return first[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_bytes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        n = rng.choice([rng.randrange(0, 80), 8 * rng.randrange(1, 12)])
        check(bytes(rng.randrange(256) for _ in range(n)))


def _random_insn(rng: random.Random, pc: int, length: int) -> list[Insn]:
    code = rng.choice(CODES)
    spec = OPCODES[code]
    dst = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, rng.randrange(16)])
    src = rng.choice([0, 1, 2, 3, 6, 9, 10, rng.randrange(16)])
    off = rng.choice([0, 0, 1, 8, 16, 32, -8, -16, -512, rng.randrange(-4, 4)])
    imm = rng.choice(EDGE + [rng.randrange(-2**31, 2**31)])
    if spec.kind in ("jmp", "jmp32", "ja"):
        off = rng.randrange(-pc - 1, length - pc)       # mostly inside the program
    if spec.kind == "ja32":
        imm = rng.randrange(-pc - 1, length - pc)
    if spec.kind in ("ldx", "ldxsx", "st", "stx", "atomic") and rng.random() < 0.6:
        # aim at the stack or the memory in r1 so that some accesses are valid
        base = rng.choice([10, 1])
        off = rng.choice([-8, -16, -4, -1, -512]) if base == 10 else rng.randrange(0, 16)
        if spec.kind in ("ldx", "ldxsx"):
            src = base
        else:
            dst = base
    if spec.kind == "call":
        src, imm = rng.choice([(0, rng.choice([5, 7, 8, 14, 1, 9999])), (1, rng.randrange(-2, 3))])
    if spec.kind == "end":
        imm = rng.choice([16, 32, 64, 48])
    insn = Insn(code, dst, src if spec.src != "zero" or rng.random() < 0.05 else 0,
                off if spec.off != "zero" or rng.random() < 0.05 else 0,
                imm if spec.imm != "zero" or rng.random() < 0.05 else 0)
    if code == BPF_LDDW:
        return [Insn(code, dst, rng.choice([0, 0, 0, 1, 2, 4]), 0, imm),
                Insn(0, 0, 0, 0, rng.choice(EDGE))]
    return [insn]


def random_program(rng: random.Random) -> bytes:
    # initialise the registers most of the time, so the verifier lets more through
    insns = [Insn(0xB7, r, 0, 0, rng.choice(EDGE)) for r in range(10) if r != 1 and rng.random() < 0.9]
    length = rng.randrange(3, 30)
    while len(insns) < length:
        insns += _random_insn(rng, len(insns), length)
    insns.append(Insn(0x95))
    return encode(insns)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_instruction_sequences(seed: int) -> None:
    rng = random.Random(1000 + seed)
    kinds = {"ok": 0, "refused": 0, "fault": 0, "error": 0}
    for _ in range(400):
        kinds[check(random_program(rng))] += 1
    assert kinds["ok"] > 20 and kinds["refused"] > 20  # the generator reaches both sides


def _corpus() -> list[bytes]:
    from test_bpf_conformance import CONFORMANCE
    out = []
    for path in sorted(CONFORMANCE.glob("bpf/tests/*.data"))[::5]:
        df = parse_data_file(path)
        if df.asm is not None:
            out.append(bpf.assemble(df.asm))
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_conformance_programs(seed: int) -> None:
    rng = random.Random(2000 + seed)
    corpus = _corpus()
    assert corpus
    for _ in range(150):
        code = bytearray(rng.choice(corpus))
        for _ in range(rng.randrange(1, 4)):
            code[rng.randrange(len(code))] = rng.randrange(256)
        check(bytes(code))


def _helper_program(rng: random.Random) -> tuple[str, bytes]:
    """A call of a random kernel helper whose arguments have the kinds the
    verifier wants but hostile run-time values (sizes, offsets) read from memory."""
    from probes.bpf.helpers import KERNEL_HELPERS, BpfArgType as A
    from probes.bpf.maps import BpfMapType as T

    fid, proto = rng.choice(sorted(KERNEL_HELPERS.items()))
    map_fd = {frozenset({T.BPF_MAP_TYPE_RINGBUF}): 4, frozenset({T.BPF_MAP_TYPE_PROG_ARRAY}): 5,
              frozenset({T.BPF_MAP_TYPE_PERF_EVENT_ARRAY}): 6,
              frozenset({T.BPF_MAP_TYPE_STACK_TRACE}): 7}.get(proto.map_types, 3)
    lines = ["mov r9, r1"]
    for reg in range(1, 6):
        kind = proto.args[reg - 1] if reg <= len(proto.args) else A.ARG_ANYTHING
        if kind == A.ARG_CONST_MAP_PTR:
            lines.append(f"lddw r{reg}, map_fd({map_fd})")
        elif kind == A.ARG_PTR_TO_CTX:
            lines.append(f"mov r{reg}, r9")
        else:
            lines.append(f"ldxdw r{reg}, [r9+{8 * reg}]")
            if kind not in (A.ARG_ANYTHING, A.ARG_CONST_SIZE, A.ARG_CONST_SIZE_OR_ZERO,
                            A.ARG_CONST_ALLOC_SIZE_OR_ZERO):
                lines.append(f"add r{reg}, r10")  # a stack pointer, offset unknown
    values = [rng.choice([0, 1, 8, 16, -8, -512, -1, 2**63, 2**40, 4096, 1 << 29,
                          rng.randrange(2**64)]) & (2**64 - 1) for _ in range(6)]
    mem = b"".join(v.to_bytes(8, "little") for v in values) + bytes(64)
    return "\n".join(lines) + f"\ncall {fid}\nexit", mem


@pytest.mark.parametrize("seed", SEEDS)
def test_helpers_with_hostile_arguments(seed: int) -> None:
    from probes.bpf.maps import BpfMapType as T

    rng = random.Random(3000 + seed)
    for _ in range(100):
        src, mem = _helper_program(rng)
        outcomes = []
        for engine in ("interp", "jit"):
            maps = {3: bpf.create_map(T.BPF_MAP_TYPE_HASH, 4, 8, 4),
                    4: bpf.create_map(T.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096),
                    5: bpf.create_map(T.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 2),
                    6: bpf.create_map(T.BPF_MAP_TYPE_PERF_EVENT_ARRAY, 4, 4, 1),
                    7: bpf.create_map(T.BPF_MAP_TYPE_STACK_TRACE, 4, 16, 4)}
            env = bpf.BpfRunContext(memory=bpf.FlatGuestMemory({0x1000: b"abc\0"}),
                                    stack_trace=lambda user: [1, 2, 3])
            prog = bpf.BpfProg(bpf.assemble_insns(src), maps=maps, license="GPL")
            try:
                outcomes.append(("ok", prog.run(bytearray(mem), env, engine=engine)))
            except bpf.BpfError as e:
                assert "unexpected" not in str(e), src
                outcomes.append(("error", str(e)))
        assert outcomes[0] == outcomes[1], src


@pytest.mark.parametrize("seed", SEEDS)
def test_disassembler_on_random_bytes(seed: int) -> None:
    """Any bytes disassemble; whatever is not marked .invalid assembles back."""
    rng = random.Random(4000 + seed)
    for _ in range(300):
        code = bytes(rng.randrange(256) for _ in range(8 * rng.randrange(1, 6)))
        bpf.disassemble_llvm(code)
        text = bpf.disassemble(code)
        if ".invalid" not in text:
            assert bpf.assemble(text) == code, text
