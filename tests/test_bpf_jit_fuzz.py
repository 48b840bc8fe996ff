"""The guest JIT against the reference interpreter on thousands of random verified
programs, on both arches: r0 and the memory the program wrote are equal.

Two generators: ``tests/test_bpf_fuzz.py``'s (any opcode, hostile fields, mostly refused
or faulting; whatever the verifier lets through must agree, faults included), and one
that only builds valid programs out of every ALU/ALU64, JMP/JMP32, load/store, sign-
extending load, movsx, byte swap and atomic form, with helper and bpf-to-bpf calls, so
that nearly everything it makes runs to the end. ``BPF_JIT_FUZZ=N`` multiplies the
number of programs."""
from __future__ import annotations

import os
import random

import pytest

from probes import bpf
from probes.bpf.isa import (
    ALU_OP_NAMES, ATOMIC_ALU_OPS, BPF_ALU, BPF_ALU64, BPF_ATOMIC, BPF_CMPXCHG, BPF_END,
    BPF_FETCH, BPF_JMP, BPF_JMP32, BPF_K, BPF_LDDW, BPF_LDX, BPF_MEM, BPF_MEMSX, BPF_MOV,
    BPF_NEG, BPF_ST, BPF_STX, BPF_TO_BE, BPF_X, BPF_XCHG, JMP_OP_NAMES, SIZE_BYTES, Insn,
    encode, sext32,
)
from probes.bpf.jit_guest import run_prog
from probes.bpf.memory import VM_BASE
from probes.bpf.program import BpfProg
from test_bpf_fuzz import EDGE, random_program

ARCHES = ["arm64", "x86_64"]
SCALE = int(os.environ.get("BPF_JIT_FUZZ", "1"))
VALUE_REGS = [0, 1, 2, 3, 4, 5, 7, 8, 9]      # r6 holds ctx, r10 is the frame pointer
CTX_SIZE = 64
STACK_WINDOW = 64


def _imm(rng: random.Random) -> int:
    return rng.choice(EDGE + [rng.randrange(-2**31, 2**31), rng.randrange(-300, 300)])


def _alu(rng: random.Random) -> Insn:
    cls = rng.choice([BPF_ALU, BPF_ALU64])
    op = rng.choice(sorted(set(ALU_OP_NAMES) - {BPF_NEG}))
    dst = rng.choice(VALUE_REGS)
    off = rng.choice([0, 1]) if op in (0x30, 0x90) else 0
    if rng.random() < 0.5:
        src = rng.choice(VALUE_REGS)
        if op == BPF_MOV and rng.random() < 0.3:
            off = rng.choice([8, 16, 32] if cls == BPF_ALU64 else [8, 16])
        return Insn(cls | op | BPF_X, dst, src, off)
    imm = _imm(rng)
    if op in (0x60, 0x70, 0xC0):                       # shifts by an immediate < width
        imm = rng.randrange(64 if cls == BPF_ALU64 else 32)
    return Insn(cls | op | BPF_K, dst, 0, off, imm)


def _mem(rng: random.Random) -> list[Insn]:
    size = rng.choice(sorted(SIZE_BYTES))
    n = SIZE_BYTES[size]
    on_stack = rng.random() < 0.6
    base = 10 if on_stack else 6
    off = -n * rng.randrange(1, STACK_WINDOW // n + 1) if on_stack else n * rng.randrange(CTX_SIZE // n)
    kind = rng.choice(["ldx", "ldxsx", "st", "stx", "atomic"])
    reg = rng.choice(VALUE_REGS)
    if kind == "ldx" or (kind == "ldxsx" and n == 8):
        return [Insn(BPF_LDX | BPF_MEM | size, reg, base, off)]
    if kind == "ldxsx":
        return [Insn(BPF_LDX | BPF_MEMSX | size, reg, base, off)]
    if kind == "st":
        return [Insn(BPF_ST | BPF_MEM | size, base, 0, off, _imm(rng))]
    if kind == "stx" or n < 4:
        return [Insn(BPF_STX | BPF_MEM | size, base, reg, off)]
    op = rng.choice(sorted(ATOMIC_ALU_OPS) + [o | BPF_FETCH for o in ATOMIC_ALU_OPS]
                    + [BPF_XCHG, BPF_CMPXCHG])
    if op == BPF_CMPXCHG and rng.random() < 0.5:   # make the compare succeed sometimes
        return [Insn(BPF_LDX | BPF_MEM | size, 0, base, off), Insn(BPF_STX | BPF_ATOMIC | size, base, reg, off, op)]
    return [Insn(BPF_STX | BPF_ATOMIC | size, base, reg, off, op)]


def _misc(rng: random.Random) -> list[Insn]:
    dst = rng.choice(VALUE_REGS)
    choice = rng.randrange(4)
    if choice == 0:
        return [Insn(rng.choice([BPF_ALU, BPF_ALU64]) | BPF_NEG, dst)]
    if choice == 1:
        cls, src = rng.choice([(BPF_ALU, 0), (BPF_ALU, BPF_TO_BE), (BPF_ALU64, 0)])
        return [Insn(cls | BPF_END | src, dst, 0, 0, rng.choice([16, 32, 64]))]
    if choice == 2:
        v = rng.randrange(2**64)
        return [Insn(BPF_LDDW, dst, 0, 0, sext32(v)), Insn(0, 0, 0, 0, sext32(v >> 32))]
    return _reinit(rng, [dst])


def _reinit(rng: random.Random, regs: list[int]) -> list[Insn]:
    return [Insn(BPF_ALU64 | BPF_MOV | BPF_K, r, 0, 0, _imm(rng)) for r in regs]


def _tail_call(rng: random.Random) -> list[Insn]:
    """bpf_tail_call(ctx, prog_array (fd 3), index): slot 0 is another program, slot 1
    the program itself, slot 2 empty, index 5 past the end."""
    return [Insn(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6), Insn(BPF_LDDW, 2, 1, 0, 3), Insn(0),
            Insn(BPF_ALU64 | BPF_MOV | BPF_K, 3, 0, 0, rng.choice([0, 1, 2, 5])),
            Insn(0x85, 0, 0, 0, 12)] + _reinit(rng, [0, 1, 2, 3, 4, 5])


def _call(rng: random.Random, tail: bool = False) -> list[Insn]:
    """A helper (r1-r5 are unreadable after it, so they are set again) or, as a
    placeholder patched later, a call of the subprogram."""
    if tail and rng.random() < 0.4:
        return _tail_call(rng)
    fid = rng.choice([5, 7, 8, 14, 15, -1])
    if fid < 0:      # the subprogram gets the context in r1
        return [Insn(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6), Insn(0x85, 0, 1, 0, -1)] + \
            _reinit(rng, [1, 2, 3, 4, 5])
    return [Insn(0x85, 0, 0, 0, fid)] + _reinit(rng, [1, 2, 3, 4, 5])


def _body(rng: random.Random, length: int, calls: bool, tail: bool = False) -> list[list[Insn]]:
    out: list[list[Insn]] = []
    while len(out) < length:
        r = rng.random()
        if r < 0.35:
            out.append([_alu(rng)])
        elif r < 0.65:
            out.append(_mem(rng))
        elif r < 0.8:
            out.append(_misc(rng))
        elif r < 0.9 and calls:
            out.append(_call(rng, tail))
        else:
            out.append([])          # a jump, filled in once the layout is known
    return out


def valid_program(rng: random.Random, tail: bool = False) -> bytes:
    pre = [Insn(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1)] + _reinit(rng, VALUE_REGS)
    pre += [Insn(BPF_ST | BPF_MEM | 0x18, 10, 0, -8 * k, _imm(rng)) for k in range(1, 9)]
    groups = _body(rng, rng.randrange(5, 40), calls=True, tail=tail)
    sub = [Insn(BPF_ST | BPF_MEM | 0x18, 10, 0, -8 * k, _imm(rng)) for k in range(1, 9)]
    sub += [Insn(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1)] + _reinit(rng, VALUE_REGS)
    sub_groups = _body(rng, rng.randrange(2, 10), calls=False)
    main = _place_jumps(rng, groups) + [Insn(0x95)]
    subprog = sub + _place_jumps(rng, sub_groups) + [Insn(0x95)]
    code = pre + main
    start = len(code)
    code = [Insn(i.code, i.dst_reg, i.src_reg, i.off, start - (k + 1))
            if i.code == 0x85 and i.src_reg == 1 else i for k, i in enumerate(code)]
    return encode(code + subprog)


def _place_jumps(rng: random.Random, groups: list[list[Insn]]) -> list[Insn]:
    """Empty groups become forward conditional jumps over some of what follows."""
    sizes = [max(len(g), 1) for g in groups]
    out: list[Insn] = []
    for k, g in enumerate(groups):
        if g:
            out += g
            continue
        ahead = sum(sizes[k + 1:k + 1 + rng.randrange(0, 4)])
        cls = rng.choice([BPF_JMP, BPF_JMP32])
        op = rng.choice(sorted(JMP_OP_NAMES))
        dst = rng.choice(VALUE_REGS)
        if rng.random() < 0.5:
            out.append(Insn(cls | op | BPF_X, dst, rng.choice(VALUE_REGS), ahead))
        else:
            out.append(Insn(cls | op | BPF_K, dst, 0, ahead, _imm(rng)))
    return out


def outcome(code: bytes, arch: str | None, mem: bytes) -> tuple:
    prog = BpfProg.from_bytes(code)
    buf = bytearray(mem)
    env = bpf.BpfRunContext(insn_budget=5000)
    try:
        r0 = run_prog(prog, buf, env, arch=arch)[0] if arch else prog.run(buf, env, engine="interp")
        return "ok", r0, bytes(buf)
    except bpf.VerifierError as e:
        return "refused", e.reason, b""
    except bpf.BpfRuntimeError as e:
        return "fault", e.reason, b""


def compare(code: bytes, arch: str, mem: bytes) -> str:
    want = outcome(code, None, mem)
    if want[0] == "refused":
        return "refused"
    got = outcome(code, arch, mem)
    if want[0] == "ok" and not (want[1] >> 62) & 1:       # r0 is not one of the VM's pointers
        assert got == want, bpf.disassemble(code)
    else:
        assert got[0] == want[0], (want, got, bpf.disassemble(code))
    return want[0]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("seed", range(4))
def test_valid_random_programs(arch: str, seed: int) -> None:
    rng = random.Random(7000 + seed)
    kinds = {"ok": 0, "refused": 0, "fault": 0}
    for _ in range(250 * SCALE):
        mem = bytes(rng.randrange(256) for _ in range(CTX_SIZE))
        kinds[compare(valid_program(rng), arch, mem)] += 1
    assert kinds["ok"] >= 200 * SCALE, kinds       # the generator makes valid programs


def _tail_outcome(main: bytes, other: bytes, arch: str | None, mem: bytes) -> tuple:
    from probes.bpf.maps import BpfMapType

    jt = bpf.create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 3)
    prog = BpfProg.from_bytes(main, maps={3: jt})
    jt.update(0, BpfProg.from_bytes(other, maps={3: jt}))
    jt.update(1, prog)
    buf = bytearray(mem)
    env = bpf.BpfRunContext(insn_budget=50000)
    try:
        r0 = run_prog(prog, buf, env, arch=arch)[0] if arch else prog.run(buf, env, engine="interp")
        return "ok", r0, bytes(buf)
    except bpf.VerifierError as e:
        return "refused", e.reason, b""
    except bpf.BpfRuntimeError as e:
        return "fault", e.reason, b""


@pytest.mark.parametrize("arch", ARCHES)
def test_tail_calls_in_random_programs(arch: str) -> None:
    """Chains of tail calls between two random programs (one calling itself too), up to
    MAX_TAIL_CALL_CNT: the same r0 and memory as the interpreter."""
    rng = random.Random(9000)
    kinds = {"ok": 0, "refused": 0, "fault": 0}
    for _ in range(150 * SCALE):
        mem = bytes(rng.randrange(256) for _ in range(CTX_SIZE))
        main, other = valid_program(rng, tail=True), valid_program(rng, tail=True)
        want = _tail_outcome(main, other, None, mem)
        kinds[want[0]] += 1
        if want[0] == "refused":
            continue
        got = _tail_outcome(main, other, arch, mem)
        assert got == want, bpf.disassemble(main)
    assert kinds["ok"] >= 120 * SCALE, kinds


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("seed", range(2))
def test_hostile_random_programs(arch: str, seed: int) -> None:
    rng = random.Random(1000 + seed)
    kinds = {"ok": 0, "refused": 0, "fault": 0}
    for _ in range(400 * SCALE):
        kinds[compare(random_program(rng), arch, bytes(16))] += 1
    assert kinds["ok"] > 20, kinds
