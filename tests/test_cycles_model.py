"""Cycle model without llvm-mca: profiles as data, instruction classes and dataflow, and
block costs computed by hand from the profile numbers (cycle-model.md formulas)."""
from __future__ import annotations

import json
from fractions import Fraction

import pytest

from conftest import assemble
from emu.cycles import ProfileError, load_profile, profile_for, profile_names
from emu.cycles.blockcost import FP, block_cost
from emu.cycles.ops import decode_block
from emu.cycles.profile import PROFILE_DIR, parse_profile


def cost(profile: str, source: str) -> Fraction:
    p = load_profile(profile)
    return block_cost(p, decode_block(p.isa, assemble(p.isa, source, 0x1000), 0x1000)).cycles


# --- profiles ---------------------------------------------------------------------------------
def test_profiles_per_isa_and_defaults():
    assert set(profile_names()) >= {"cortex-a72", "cortex-a55", "skylake"}
    assert set(profile_names("arm64")) >= {"cortex-a72", "cortex-a55"}
    assert profile_names("x86_64") == ["skylake"]
    assert profile_for("arm64").name == "cortex-a72"
    assert profile_for("x86_64").name == "skylake"
    assert load_profile("cortex-a55").in_order and not load_profile("cortex-a72").in_order


def test_profile_errors():
    with pytest.raises(ProfileError, match="unknown CPU profile 'pentium'"):
        load_profile("pentium")
    with pytest.raises(ProfileError, match="skylake is for x86_64, the guest is arm64"):
        profile_for("arm64", "skylake")


@pytest.mark.parametrize("name", ["cortex-a72", "cortex-a55", "skylake"])
def test_every_number_names_its_basis(name):
    """Each number is [value, basis]; `choice` marks a modelling choice."""
    data = json.loads((PROFILE_DIR / f"{name}.json").read_text())
    p = load_profile(name)
    assert "choice" in data["basis"]
    counted = 0

    def walk(x, path):
        nonlocal counted
        if isinstance(x, list) and len(x) == 2 and isinstance(x[1], str) and not isinstance(x[0], str):
            assert x[1] in data["basis"], f"{path}: basis {x[1]!r}"
            counted += 1
        elif isinstance(x, dict):
            for k, v in x.items():
                if k not in ("basis", "ports"):
                    walk(v, f"{path}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            raise AssertionError(f"{path}: bare number {x} without a basis")

    walk({k: v for k, v in data.items() if k not in ("basis", "ports")}, name)
    for group, (units, basis) in data["ports"].items():
        assert basis in data["basis"] and all(isinstance(u, str) for u in units), group
    assert counted >= 30
    # numbers the file leaves out (occupancy 1, one slot) are recorded as choices
    assert p.basis["classes.alu.occupancy"] in ("choice", *data["basis"])
    # the trap, handler and clock numbers are choices, and say so
    for key in ("exc_entry", "exc_return", "single_step", "handler", "freq_hz"):
        assert p.basis[f"params.{key}"] == "choice"


def test_profile_without_basis_is_rejected():
    data = json.loads((PROFILE_DIR / "cortex-a72.json").read_text())
    data["params"]["width"] = 3
    with pytest.raises(ProfileError, match=r"params.width: expected \[value, basis\]"):
        parse_profile(data)
    data["params"]["width"] = [3, "folklore"]
    with pytest.raises(ProfileError, match="unknown basis 'folklore'"):
        parse_profile(data)


# --- instruction decoding ---------------------------------------------------------------------
def ops(isa: str, source: str):
    return decode_block(isa, assemble(isa, source, 0x1000), 0x1000)


def test_arm64_dataflow_where_capstone_regs_access_is_wrong():
    cmp_, adds, ret, ldp, stp = ops("arm64", "cmp x0, x1; adds w0, w1, #3; ret; "
                                             "ldp x29, x30, [sp], #16; stp x1, x2, [x3, #-16]!")
    assert cmp_.reads == ("x0", "x1") and cmp_.writes == ("nzcv",)
    assert adds.writes == ("x0", "nzcv") and adds.reads == ("x1",)
    assert ret.reads == ("x30",) and ret.branch and not ret.cond
    assert set(ldp.writes) == {"x29", "x30", "sp"} and ldp.cls == "load_pair"
    assert ("sp", "sp", ("alu",)) in ldp.edges             # writeback: an ALU op on the base
    assert stp.writes == ("x3",) and set(stp.reads) == {"x1", "x2", "x3"}


def test_x86_classes_and_memory_forms():
    xor, rmw, ldop, load, store, push, shl_cl, test = ops(
        "x86_64", "xor eax, eax; add qword ptr [rsp+8], rax; add rax, [rdi]; mov rdi, [rdi]; "
                  "mov [rdi], rax; push rbx; shl rax, cl; test eax, 1")
    assert xor.cls == "idiom" and xor.reads == () and xor.uses == ()
    assert rmw.uses == ("load", "*", "store") and rmw.slots == 2
    assert ldop.uses == ("load", "*") and ("rax", "rdi", ("load", "*")) in ldop.edges
    assert ("rax", "rax", ("*",)) in ldop.edges
    assert load.cls == "load" and store.cls == "store" and store.writes == ()
    assert push.cls == "push" and push.edges == (("rsp", "rsp", ("*",)),)
    assert shl_cl.cls == "shift_cl"
    assert test.writes == ("flags",)                       # capstone says eax is written too


# --- block costs by hand ----------------------------------------------------------------------
# cortex-a72: width 3; I x2 (alu lat 1), M x1 (alu_shift 2, mul 5, div 35/35), L x1 (load 4),
# S x1, B x1.
@pytest.mark.parametrize("source,expected,why", [
    ("add x0, x0, #1; add x0, x0, #1; add x0, x0, #1; add x0, x0, #1", 4,
     "recurrence: x0 -> x0 through four 1-cycle adds"),
    ("add x1, x2, #1; add x3, x4, #1; add x5, x6, #1; add x7, x8, #1; add x9, x10, #1; "
     "add x11, x12, #1", 3, "ports: six ALU ops on two I units (issue bound 6/3 = 2)"),
    ("ldr x0, [x0]", 4, "pointer chase: load latency"),
    ("udiv x0, x1, x2", 35, "occupancy: the divider is busy 35 cycles"),
    ("add x0, x0, x1, lsl #2", 2, "shifted operand: M pipe, latency 2"),
    ("mul x1, x0, x5; mul x0, x2, x5; mul x2, x1, x5", Fraction(15, 2),
     "two-iteration cycle x0 -> x2 -> x0 of 5+5+5 over 2"),
    ("ldp x29, x30, [sp], #16; ret", 1, "L, I (writeback) and B once each: 1 cycle"),
    ("nop; nop; nop; nop; nop; nop", 2, "no ports: issue bound 6/3"),
])
def test_cortex_a72_blocks(source, expected, why):
    assert cost("cortex-a72", source) == expected, why


# skylake: width 4; ALU p0156, P06 (shift, branch), P1 (mul 3), LD p23 (5), STA p237 + STD p4,
# push 2, pop 6 (LLVM's latencies).
@pytest.mark.parametrize("source,expected,why", [
    ("xor eax, eax", Fraction(1, 4), "zero idiom: no port, issue 1/4"),
    ("add rax, [rdi]", 1, "load+op: the loaded operand is off the rax chain"),
    ("mov rdi, [rdi]", 5, "pointer chase: load latency 5"),
    ("push rbx; push rbp; push r12", 6, "rsp chain: three pushes of latency 2"),
    ("pop rbx; pop rbp", 12, "rsp chain: two pops of latency 6 (LLVM's model)"),
    ("imul rax, rbx", 3, "mul latency 3 on the rax chain"),
    ("mov [rdi], rax; mov [rsi], rbx; mov [rdx], rcx", 3, "one store-data port"),
    ("shl rax, 3; shr rbx, 2; sar rcx, 1; rol rdx, 4", 2, "shifts share p0/p6"),
    ("add rax, 1; add rbx, 1; shl rcx, 1; shl rdx, 1; jne 0x1000", Fraction(3, 2),
     "two shifts and the branch on p0/p6 (issue 5/4 and p0156 5/4 are lower)"),
    ("add rax, 1; add rbx, 1; add rcx, 1; add rdx, 1; add rsi, 1", Fraction(5, 4),
     "issue bound: five slots on a 4-wide core (p0156 also 5/4)"),
])
def test_skylake_blocks(source, expected, why):
    assert cost("skylake", source) == expected, why


# cortex-a55: in order, 2-wide; alu lat 3 read 2 early by ALU consumers; results written
# back in order (stores exempt); load 3; branch 1.
@pytest.mark.parametrize("source,expected,why", [
    ("add x0, x0, #1; add x0, x0, #1; add x0, x0, #1; add x0, x0, #1", 4,
     "ALU->ALU forwarding: effective latency 1, one add a cycle"),
    ("add x1, x2, #1; add x3, x4, #1; b #0x1000", 3,
     "two adds issue together; the branch waits for in-order writeback (3-1), the next "
     "add dual-issues with it, the second add a cycle later"),
    ("ldr x0, [x0]", 3, "pointer chase: load latency 3, no forwarding to the address"),
    ("add x0, x1, #1; str x0, [x2]", 3, "store data is not forwarded"),
    ("add x1, x2, #1; str x3, [x4]", 1, "independent: dual issue, stores retire out of order"),
    ("cbz x0, #0x1000", 1, "one branch unit"),
])
def test_cortex_a55_blocks(source, expected, why):
    assert cost("cortex-a55", source) == expected, why


@pytest.mark.parametrize("profile", ["cortex-a72", "cortex-a55", "skylake"])
def test_prefix_costs_are_monotone_and_end_at_the_cost(profile):
    isa = load_profile(profile).isa
    src = {"arm64": "ldr x0, [x1]; add x2, x0, #1; mul x3, x2, x2; str x3, [x1]; cbnz x3, #0x1000",
           "x86_64": "mov rax, [rdi]; add rax, 1; imul rax, rax; mov [rdi], rax; jne 0x1000"}[isa]
    p = load_profile(profile)
    bc = block_cost(p, decode_block(isa, assemble(isa, src, 0x1000), 0x1000))
    assert bc.n == 5 and bc.cond and bc.branch
    assert list(bc.prefix) == sorted(bc.prefix) and bc.prefix[-1] == bc.cost
    assert bc.cost == int(bc.cycles * FP) and bc.cost > 0


def test_costs_are_integers_independent_of_evaluation_order():
    """Fixed point 1/256 cycles, exact rationals inside: 7 ALU ops on a 3-wide core."""
    c = cost("cortex-a72", "; ".join(f"mov x{i}, #{i}" for i in range(7)))
    assert c == Fraction(7, 2)          # ports: 7 ops / 2 I units
    c = cost("cortex-a72", "; ".join(f"mov x{i}, #{i}" for i in range(4)) + "; nop; nop; nop")
    assert c == Fraction(597, 256)      # issue: 7/3, floored to 1/256
    p = load_profile("cortex-a72")
    bc = block_cost(p, decode_block("arm64", assemble(
        "arm64", "; ".join(f"mov x{i}, #{i}" for i in range(4)) + "; nop; nop; nop", 0), 0))
    assert bc.cost == 7 * 256 // 3
