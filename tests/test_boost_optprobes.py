"""Boosting (x86 only) and jump optimization (both arches).

Boosting: the can_boost table (tests/data/probes6/x86_boost.toml), boosting after the first
hit and only for boostable instructions, what prevents it (a post handler, an aggregated
child with one, the `preemptible` switch), and that arm64 never boosts.

Optprobes: refusal for each can_optimize rule with its reason, unoptimization when a second
probe lands in the replaced bytes, the handler view (ip = addr+1 / addr, ip changes
ignored, reentry counted in nmissed), disable/enable, the queued-hit path, an aggregated
post handler, arm64 relocation of every PC-relative class
(tests/data/probes6/arm64_optprobe.toml), and `emu inspect` for breakpoint, boosted and
optimized probes."""
from __future__ import annotations

import errno
import json
import struct
import tomllib
from pathlib import Path

import capstone
import pytest

from conftest import assemble, firmware_elf
from probes.bench_kinds import setup_kind
from probes.errors import KprobeError
from probes.kprobes import KPROBE_FLAG_OPTIMIZED, Kprobe
from probes.optprobes import enable_optprobes
from probes.testing import ASM_BASE, ASM_DATA, ProbeLab

DATA = Path(__file__).parent / "data" / "probes6"
SS_BREAK = {"arm64": (0xD42000C0).to_bytes(4, "little"), "x86_64": b"\xcc"}
BREAKPOINT = {"arm64": (0xD4200080).to_bytes(4, "little"), "x86_64": b"\xcc"}
IP_OFFSET = {"arm64": 0, "x86_64": 1}


def table(name: str) -> list[dict]:
    with open(DATA / name, "rb") as f:
        return tomllib.load(f)["case"]


def probe(lab: ProbeLab, where, pre=None, post=None) -> Kprobe:
    """A kprobe without the recording wrappers of lab.kprobe() (which always install a
    post handler, and so would keep every probe from being boosted or optimized)."""
    p = Kprobe(addr=where) if isinstance(where, int) else Kprobe(
        symbol_name=where.partition("+")[0], offset=int(where.partition("+")[2] or "0", 0))
    p.pre_handler = pre or (lambda p, regs: 0)
    p.post_handler = post
    lab.kprobes.register_kprobe(p)
    return p


def regs_of(lab: ProbeLab) -> dict[str, int]:
    m = lab.machine
    return {n: m.reg(n) for n in m.arch.regs}


def disasm1(arch: str, code: bytes, addr: int) -> tuple[str, str]:
    cs = {"arm64": (capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM),
          "x86_64": (capstone.CS_ARCH_X86, capstone.CS_MODE_64)}[arch]
    insn = next(capstone.Cs(*cs).disasm(code, addr, 1))
    return insn.mnemonic, insn.op_str


def jump_target(arch: str, code: bytes, addr: int) -> int | None:
    """Where the `b`/`jmp rel32` at addr goes (None if it is not one)."""
    if arch == "x86_64":
        return addr + 5 + struct.unpack("<i", code[1:5])[0] if code[:1] == b"\xe9" else None
    word = int.from_bytes(code[:4], "little")
    if word & 0xFC000000 != 0x14000000:
        return None
    off = (word & 0x03FFFFFF) << 2
    return addr + (off - (1 << 28) if off & (1 << 27) else off)


# === boosting =================================================================================
BOOST = table("x86_boost.toml")


def boost_lab(row: dict) -> tuple[ProbeLab, int]:
    pre = row.get("pre", "")
    pre_len = len(assemble("x86_64", pre, ASM_BASE)) if pre else 0
    raw = bytes.fromhex(row["hex"])
    src = "\n".join(x for x in (pre, ".byte " + ", ".join(f"{b:#x}" for b in raw),
                                row.get("post", "ret")) if x)
    lab = ProbeLab.from_asm("x86_64", {"f": src}, data=bytes(range(64)))
    assert lab.original(ASM_BASE + pre_len, len(raw)) == raw
    return lab, ASM_BASE + pre_len


@pytest.mark.parametrize("row", BOOST, ids=[r["name"] for r in BOOST])
def test_x86_can_boost_table(row):
    from probes.arch.x86_64.decode import X86Decoder, can_boost
    insn = X86Decoder().decode(bytes.fromhex(row["hex"]), ASM_BASE)
    if "can_boost" in row:
        assert can_boost(insn) == row["can_boost"]
    lab, addr = boost_lab(row)
    verdict = row.get("verdict", "out-of-line")
    if verdict == "rejected":
        with pytest.raises(KprobeError) as exc:
            probe(lab, addr)
        assert exc.value.errno == getattr(errno, row["errno"])
        return
    p = probe(lab, addr)
    assert p.ainsn.kind == verdict
    want = row.get("boostable", row["can_boost"] and verdict == "out-of-line")
    assert p.ainsn.boostable == want
    assert not p.ainsn.boosted                       # never before the first hit


@pytest.mark.parametrize("row", [r for r in BOOST if r.get("run")],
                         ids=[r["name"] for r in BOOST if r.get("run")])
def test_x86_boost_after_first_hit(row):
    """The first hit single-steps (slot ends in int3); a boostable instruction then gets
    `jmp addr+len` behind its copy, and the second hit runs through it. Guest state after
    two calls is the unprobed one."""
    plain, _ = boost_lab(row)
    plain.call("f", 1, 2)
    plain.call("f", 1, 2)
    lab, addr = boost_lab(row)
    p = probe(lab, addr)
    n = p.ainsn.length
    copy = lab.slot(p)[:n]
    assert lab.slot(p) == copy + b"\xcc"
    lab.call("f", 1, 2)
    boostable = row.get("boostable", row["can_boost"])
    assert p.ainsn.boosted == boostable and p.hits == 1
    if boostable:
        jmp_at = p.ainsn.slot + n
        assert lab.text(jmp_at, 1) == b"\xe9"
        assert jump_target("x86_64", lab.text(jmp_at, 5), jmp_at) == addr + n
        assert lab.inspect(p).kind == "boosted"
    else:
        assert lab.slot(p) == copy + b"\xcc"
    lab.call("f", 1, 2)
    assert p.hits == 2 and p.nmissed == 0
    assert regs_of(lab) == regs_of(plain)
    assert lab.text(ASM_DATA, 64) == plain.text(ASM_DATA, 64)


HOT = ("hotloop", ["100", "10"])     # hot_call(10) calls hot_leaf 10 times


def hot_lab(arch: str) -> ProbeLab:
    return ProbeLab.load(str(firmware_elf(arch, HOT[0])), argv=HOT[1])


def test_x86_post_handler_prevents_boosting():
    lab = hot_lab("x86_64")
    posts = []
    p = probe(lab, "hot_leaf", post=lambda p, regs, flags: posts.append(regs.ip))
    lab.run()
    assert p.hits == len(posts) == 10 and not p.ainsn.boosted and p.ainsn.boostable
    assert lab.slot(p).endswith(b"\xcc")
    assert set(posts) == {p.addr + p.ainsn.length}


def test_x86_aggregated_post_handler_unboosts():
    """A boosted probe gains a second probe with a post handler at the same address: the
    slot gets its int3 back (the post handler needs the step trap) and both run; when that
    probe goes, the next hit boosts again."""
    lab = hot_lab("x86_64")
    a = probe(lab, "hot_leaf")
    n = lab.machine.symbols.lookup("hot_leaf").addr
    lab.call("hot_leaf", 3)
    assert a.ainsn.boosted
    posts = []
    b = probe(lab, "hot_leaf", post=lambda p, regs, flags: posts.append(regs.ip))
    assert not a.ainsn.boosted and lab.slot(a)[a.ainsn.length:] == b"\xcc"
    lab.call("hot_leaf", 3)
    assert (a.hits, b.hits) == (2, 1) and posts == [n + a.ainsn.length]
    lab.kprobes.unregister_kprobe(b)
    lab.call("hot_leaf", 3)
    assert a.ainsn.boosted and a.hits == 3


def test_x86_preemptible_prevents_boosting():
    lab = hot_lab("x86_64")
    lab.kprobes.preemptible = True                   # CONFIG_PREEMPTION
    p = probe(lab, "hot_leaf")
    lab.run()
    assert p.hits == 10 and p.ainsn.boostable and not p.ainsn.boosted
    assert lab.stdout.endswith(b"hot_call(10) = 0xcfc0659b6017cfb1\n")


def test_arm64_never_boosts():
    """Boosting is x86-only by the kernel's design: an arm64 slot keeps its BRK #6 however
    often it is stepped, and the bench's boosted kinds are n/a."""
    lab = hot_lab("arm64")
    p = probe(lab, "hot_leaf")
    assert p.ainsn.kind == "out-of-line"
    lab.run()
    assert p.hits == 10 and not p.ainsn.boosted and not p.ainsn.boostable
    assert lab.slot(p)[4:] == SS_BREAK["arm64"]
    assert lab.inspect(p).kind == "kprobe"
    for kind in ("b", "rb"):
        with pytest.raises(NotImplementedError):
            setup_kind(kind, hot_lab("arm64"), "hot_leaf")


# === optprobes: refusals ======================================================================
def opt_lab(arch: str, functions: dict[str, str], data: bytes = b"") -> ProbeLab:
    lab = ProbeLab.from_asm(arch, functions, data)
    enable_optprobes(lab.kprobes)
    return lab


def try_optimize(lab: ProbeLab, where) -> Kprobe:
    """Register a pre-only probe with jump optimization on and run the optimizer."""
    opt = enable_optprobes(lab.kprobes)
    p = probe(lab, where)
    opt.kick_kprobe_optimizer()
    return p


# nop; mov eax, edi; nop; nop; lea rax, [rdi + 2]; ret; then a jump at f+10..f+12 (never run)
RANGE_F = "nop\nmov eax, edi\nnop\nnop\nlea rax, [rdi + 2]\nret\n"
X86_REFUSED = [  # (name, functions, probe, reason substring)
    ("undecodable", {"f": "lea rax, [rdi + 1]\nadd rax, 2\nret\n.byte 0x06"}, "f",
     "does not decode"),
    ("indirect_jump", {"f": "lea rax, [rdi + 1]\nadd rax, 2\nret\njmp rax"}, "f",
     "indirect jump"),
    ("indirect_jump_mem", {"f": "lea rax, [rdi + 1]\nadd rax, 2\nret\njmp qword ptr [rax]"}, "f",
     "indirect jump"),
    # the kernel refuses a jump to any of [A+1, A+5] (insn_jump_into_range)
    ("jump_into_range_start", {"f": RANGE_F + ".byte 0xeb, 0xf5"}, "f", "lands inside"),  # f+1
    ("jump_into_range_end", {"f": RANGE_F + ".byte 0x74, 0xf9"}, "f", "lands inside"),    # f+5
    ("call_in_copy", {"f": "mov eax, edi\ncall l1\nret\nl1: ret"}, "f",
     "cannot be relocated"),
    ("jcc_in_copy", {"f": "mov eax, edi\ntest eax, eax\njz l1\nret\nl1: ret"}, "f",
     "cannot be relocated"),
    ("too_short", {"f": "mov eax, edi\nret"}, "f", "fewer than 5 bytes"),
]


@pytest.mark.parametrize("name,functions,where,reason", X86_REFUSED,
                         ids=[r[0] for r in X86_REFUSED])
def test_x86_can_optimize_refusals(name, functions, where, reason):
    """Each can_optimize rule refuses with its reason; the probe stays an int3 probe and
    the function still computes what it computed unprobed."""
    plain = ProbeLab.from_asm("x86_64", functions)
    want = plain.call("f", 5)
    lab = opt_lab("x86_64", functions)
    p = try_optimize(lab, where)
    assert not p.ainsn.optimized and not p.flags & KPROBE_FLAG_OPTIMIZED
    assert reason in p.ainsn.opt_reason
    assert lab.text(p.addr, 1) == b"\xcc"
    assert lab.call("f", 5) == want and p.hits == 1
    assert reason in lab.inspect(p).format()


def test_x86_jump_just_past_range_is_allowed():
    """A jump to A+6 is outside [A+1, A+5]: the probe is optimized."""
    f = {"f": "nop\nmov eax, edi\nnop\nnop\nnop\nlea rax, [rdi + 2]\nret\n.byte 0x74, 0xf9"}
    lab = opt_lab("x86_64", f)                       # jz f+6 (the lea)
    p = try_optimize(lab, "f")
    assert p.ainsn.optimized and p.ainsn.optinsn.size == 5, p.ainsn.opt_reason
    assert lab.call("f", 5) == 7 and p.hits == 1


def test_x86_refused_outside_a_known_function():
    """A probe by address in a stripped binary has no function to decode: not optimized
    (arm64 replaces one instruction and needs none: see the next test)."""
    sym = ProbeLab.load(str(firmware_elf("x86_64", "demo"))).machine.symbols.lookup("hot_leaf")
    lab = ProbeLab.load(str(firmware_elf("x86_64", "demo.stripped")))
    enable_optprobes(lab.kprobes)
    p = try_optimize(lab, sym.addr)
    assert not p.ainsn.optimized and "not inside a known function" in p.ainsn.opt_reason


def test_arm64_stripped_probe_is_optimized():
    sym = ProbeLab.load(str(firmware_elf("arm64", "demo"))).machine.symbols.lookup("hot_leaf")
    lab = ProbeLab.load(str(firmware_elf("arm64", "demo.stripped")))
    enable_optprobes(lab.kprobes)
    p = try_optimize(lab, sym.addr)
    assert p.ainsn.optimized


def test_x86_refused_with_armed_probe_inside_eexist():
    f = {"f": "mov rax, rdi\nadd rax, 2\nret"}
    lab = opt_lab("x86_64", f)
    inner = probe(lab, "f+3")
    outer = try_optimize(lab, "f")
    assert not outer.ainsn.optimized and "-EEXIST" in outer.ainsn.opt_reason
    assert lab.text("f", 1) == b"\xcc"
    assert lab.call("f", 5) == 7 and (outer.hits, inner.hits) == (1, 1)


def test_arm64_refused_out_of_branch_range():
    """The detour pool must be within ±128 MiB of the probe (B imm26): a function 256 MiB
    away from it is refused with -ERANGE and stays a BRK probe."""
    from emu.memory import PROT_EXEC, PROT_READ
    lab = opt_lab("arm64", {"f": "add x0, x0, #1\nret"})
    far = ASM_BASE + (256 << 20)
    lab.machine.memory.map(far, 0x1000, PROT_READ | PROT_EXEC, "far text")
    lab.machine.memory.write(far, assemble("arm64", "add x0, x0, #2\nret", far))
    lab.machine.symbols.add("far_f", far, 8, "func")
    near = try_optimize(lab, "f")
    assert near.ainsn.optimized
    p = try_optimize(lab, "far_f")
    assert not p.ainsn.optimized and "-ERANGE" in p.ainsn.opt_reason
    assert lab.text(far, 4) == BREAKPOINT["arm64"]
    assert lab.call("far_f", 40) == 42 and lab.call("f", 40) == 41


@pytest.mark.parametrize("what", ["post_handler", "disabled", "sysctl_off", "ftrace"])
def test_not_optimized_preconditions(arch, what):
    """optimize_kprobe's preconditions: no post handler, not disabled, optimization on,
    and not an ftrace-based probe."""
    prog = "recurse.ftrace" if what == "ftrace" else "recurse"
    lab = ProbeLab.load(str(firmware_elf(arch, prog)))
    opt = enable_optprobes(lab.kprobes)
    if what == "sysctl_off":
        opt.enabled = False
    p = Kprobe(symbol_name="fib", pre_handler=lambda p, regs: 0)
    if what == "post_handler":
        p.post_handler = lambda p, regs, flags: None
    if what == "disabled":
        from probes.kprobes import KPROBE_FLAG_DISABLED
        p.flags = KPROBE_FLAG_DISABLED
    lab.kprobes.register_kprobe(p)
    assert opt.kick_kprobe_optimizer() == 0
    assert not p.ainsn.optimized and not p.flags & KPROBE_FLAG_OPTIMIZED
    assert p.ainsn.optinsn is None                   # no detour was even prepared
    if what != "ftrace":
        assert jump_target(arch, lab.text("fib", 5), p.addr) is None


# === optprobes: behaviour =====================================================================
def test_second_probe_in_range_unoptimizes(arch):
    """x86: a probe armed inside the 5 replaced bytes force-unoptimizes the outer one (int3
    back, the covered bytes restored) and the outer is re-optimized when the inner goes.
    arm64 replaces a single instruction, so the next one never conflicts."""
    lab = ProbeLab.load(str(firmware_elf(arch, "recurse")))
    opt = enable_optprobes(lab.kprobes)
    outer = try_optimize(lab, "fib")
    assert outer.ainsn.optimized
    size = outer.ainsn.optinsn.size
    fib = outer.addr
    inner_off = 3 if arch == "x86_64" else 4          # x86: fib+3 `push rbx` is inside
    inner = probe(lab, f"fib+{inner_off}")
    if arch == "x86_64":
        assert size == 6 and not outer.ainsn.optimized
        assert not outer.flags & KPROBE_FLAG_OPTIMIZED
        want = bytearray(lab.original("fib", size))
        want[0:1] = b"\xcc"
        want[3:4] = b"\xcc"
        assert lab.text("fib", size) == bytes(want)
    else:
        assert outer.ainsn.optimized and size == 4
    lab.run()
    assert lab.stdout == (firmware_elf(arch, "recurse").parents[2] / "expected" / arch /
                          "recurse.out").read_bytes()
    assert outer.hits == inner.hits == 2155
    lab.kprobes.unregister_kprobe(inner)
    assert opt.kick_kprobe_optimizer() == (1 if arch == "x86_64" else 0)
    assert outer.ainsn.optimized
    assert jump_target(arch, lab.text("fib", 5), fib) == outer.ainsn.optinsn.detour
    assert lab.text("fib", size)[5 if arch == "x86_64" else 4:] == \
        lab.original("fib", size)[5 if arch == "x86_64" else 4:]


@pytest.mark.parametrize("order", [(1, 3), (3, 1)])
def test_x86_two_probes_in_range_reoptimize_after_both_go(order):
    """Two probes inside fib's replaced bytes (fib+1 and fib+3): whichever goes last, the
    outer probe is optimized again afterwards (the kernel looks the covering probe up
    afresh at each disarm: get_optimized_kprobe)."""
    lab = ProbeLab.load(str(firmware_elf("x86_64", "recurse")))
    outer = try_optimize(lab, "fib")
    inner = {off: probe(lab, f"fib+{off}") for off in (1, 3)}
    assert not outer.ainsn.optimized
    opt = lab.kprobes.optimizer
    for off in order:
        lab.kprobes.unregister_kprobe(inner[off])
        opt.kick_kprobe_optimizer()
    assert outer.ainsn.optimized, outer.ainsn.opt_reason
    assert jump_target("x86_64", lab.text("fib", 5), outer.addr) == outer.ainsn.optinsn.detour
    lab.run()
    assert outer.hits == 2155 and lab.result.exit_code == 0


def test_x86_disabling_inner_probe_reoptimizes_outer():
    lab = ProbeLab.load(str(firmware_elf("x86_64", "recurse")))
    outer = try_optimize(lab, "fib")
    inner = probe(lab, "fib+3")
    assert not outer.ainsn.optimized
    lab.kprobes.disable_kprobe(inner)
    lab.kprobes.optimizer.kick_kprobe_optimizer()
    assert outer.ainsn.optimized


def test_optimized_handler_view(arch):
    """optimized_callback: the pre handler sees ip = addr+1 (x86) / addr (arm64) and the
    registers of the probed instruction; its ip change and return value are ignored."""
    lab = hot_lab(arch)
    seen = []

    def pre(p, regs):
        seen.append((regs.ip, regs.arg(1)))
        regs.ip = 0x1234
        return 1

    opt = enable_optprobes(lab.kprobes)
    p = probe(lab, "hot_leaf", pre=pre)
    assert opt.kick_kprobe_optimizer() == 1 and p.ainsn.optimized
    plain = hot_lab(arch)
    args = []
    probe(plain, "hot_leaf", pre=lambda p, regs: args.append(regs.arg(1)) or 0)
    plain.run()
    lab.run()
    assert lab.result.exit_code == 0 and lab.stdout == plain.stdout
    assert p.hits == 10 and {ip for ip, _ in seen} == {p.addr + IP_OFFSET[arch]}
    assert [a for _, a in seen] == args


def test_optimized_reentry_counts_nmissed(arch):
    """An optimized probe hit while another kprobe's handler runs (here: the handler calls
    into the guest) counts nmissed and runs no handler."""
    funcs = {"arm64": {"inner": "add x0, x0, #1\nret", "outer": "mov x0, #0\nret"},
             "x86_64": {"inner": "lea rax, [rdi + 1]\nret", "outer": "xor eax, eax\nret"}}[arch]
    lab = opt_lab(arch, funcs)
    inner = try_optimize(lab, "inner")
    assert inner.ainsn.optimized
    nested = []
    m = lab.machine

    def pre(p, regs):
        saved = {n: m.reg(n) for n in m.arch.regs}
        nested.append(lab.call("inner", 41, timeout=0))
        for n, v in saved.items():
            m.set_reg(n, v)
        return 0

    outer = Kprobe(symbol_name="outer", pre_handler=pre,
                   post_handler=lambda p, regs, flags: None)   # a breakpoint probe
    lab.kprobes.register_kprobe(outer)
    lab.call("outer", 0, timeout=0)
    if lab.kprobes.kcb.current is not None:
        # arm64: the nested run's halt also stopped the outer run inside outer's slot
        # (see test_kprobes_core.test_nested_run_resumes_outer); let it finish
        lab.machine.run()
    assert nested == [42] and lab.kprobes.kcb.current is None
    assert (inner.hits, inner.nmissed) == (0, 1) and outer.hits == 1
    assert lab.call("inner", 1) == 2 and (inner.hits, inner.nmissed) == (1, 1)


def test_disable_unoptimizes_then_disarms(arch):
    """Disabling an optimized probe removes the jump and the breakpoint (original bytes);
    enabling arms the breakpoint and queues it; the optimizer puts the jump back."""
    lab = hot_lab(arch)
    opt = enable_optprobes(lab.kprobes)
    p = try_optimize(lab, "hot_leaf")
    size = p.ainsn.optinsn.size
    orig = lab.original("hot_leaf", size)
    lab.kprobes.disable_kprobe(p)
    assert not p.ainsn.optimized and not p.ainsn.armed and lab.text("hot_leaf", size) == orig
    pokes = [pt for pt in lab.machine.patches if pt.addr == p.addr]
    assert pokes[-2].new[:len(BREAKPOINT[arch])] == BREAKPOINT[arch]   # unoptimize: BRK/int3
    assert pokes[-1].new == orig[:len(pokes[-1].new)]                  # then disarm
    lab.call("hot_leaf", 3)
    assert p.hits == 0
    lab.kprobes.enable_kprobe(p)
    assert lab.text("hot_leaf", len(BREAKPOINT[arch])) == BREAKPOINT[arch]
    assert p.flags & KPROBE_FLAG_OPTIMIZED and p in opt.queue and not p.ainsn.optimized
    assert opt.kick_kprobe_optimizer() == 1
    assert jump_target(arch, lab.text("hot_leaf", 5), p.addr) == p.ainsn.optinsn.detour
    lab.kprobes.unregister_kprobe(p)
    assert lab.text("hot_leaf", size) == orig


def test_queued_hit_resumes_in_detour(arch):
    """A probe marked OPTIMIZED but not yet patched is hit through its breakpoint: the pre
    handler runs, then the CPU resumes in the detour's copy of the instruction (no step in
    the slot), and the optimizer patches the jump."""
    lab = hot_lab(arch)
    opt = enable_optprobes(lab.kprobes)
    p = probe(lab, "hot_leaf")
    oi = p.ainsn.optinsn
    assert p.flags & KPROBE_FLAG_OPTIMIZED and p in opt.queue and not p.ainsn.optimized
    assert lab.text("hot_leaf", len(BREAKPOINT[arch])) == BREAKPOINT[arch]
    ran = {"resume": 0, "slot": 0}
    lab.machine.hooks.code(lambda a, s: ran.__setitem__("resume", ran["resume"] + 1),
                           oi.resume, oi.resume)
    lab.machine.hooks.code(lambda a, s: ran.__setitem__("slot", ran["slot"] + 1),
                           p.ainsn.slot, p.ainsn.slot)
    lab.run()
    assert lab.stdout.endswith(b"hot_call(10) = 0xcfc0659b6017cfb1\n")
    assert p.ainsn.optimized and p.hits == 10 and p not in opt.queue
    assert ran == {"resume": 10, "slot": 0}
    assert jump_target(arch, lab.text("hot_leaf", 5), p.addr) == oi.detour


def test_aggregated_post_handler_unoptimizes(arch):
    lab = hot_lab(arch)
    a = try_optimize(lab, "hot_leaf")
    assert a.ainsn.optimized
    posts = []
    b = probe(lab, "hot_leaf", post=lambda p, regs, flags: posts.append(regs.ip))
    assert not a.ainsn.optimized
    assert lab.text("hot_leaf", len(BREAKPOINT[arch])) == BREAKPOINT[arch]
    lab.run()
    assert a.hits == b.hits == len(posts) == 10
    assert set(posts) == {a.addr + a.ainsn.length}


def test_aggregated_post_handler_removed_reoptimizes(arch):
    lab = hot_lab(arch)
    a = try_optimize(lab, "hot_leaf")
    b = probe(lab, "hot_leaf", post=lambda p, regs, flags: None)
    lab.kprobes.unregister_kprobe(b)
    lab.kprobes.optimizer.kick_kprobe_optimizer()
    lab.run()
    assert a.ainsn.optimized


# === arm64: relocation of PC-relative instructions ============================================
COND = ["eq", "ne", "hs", "lo", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le",
        "al", "nv"]
NZCV = [0, 8 << 28, 4 << 28, 2 << 28, 1 << 28, 9 << 28, 6 << 28, 0xF << 28]
RELOC = table("arm64_optprobe.toml") + [
    {"name": f"b.{c}", "asm": f"b.{c} t\nmov x0, #1\nret\n.space 0x1000\nt: mov x0, #2\nret",
     "probe": 0, "calls": [{"nzcv": v} for v in NZCV]} for c in COND]


def reloc_lab(row: dict) -> ProbeLab:
    return ProbeLab.from_asm("arm64", {"f": row["asm"]}, data=bytes.fromhex(row.get("data", "")))


def reloc_calls(lab: ProbeLab, row: dict) -> list[tuple[dict, bytes]]:
    out = []
    for regs in row["calls"]:
        args = {k: v & (2**64 - 1) for k, v in regs.items()}
        lab.call("f", regs=args)
        assert lab.result.reason.value == "halt", lab.result
        out.append((regs_of(lab), lab.text(ASM_DATA, 64)))
    return out


@pytest.mark.parametrize("row", RELOC, ids=[r["name"] for r in RELOC])
def test_arm64_optprobe_relocation(row):
    plain = reloc_calls(reloc_lab(row), row)
    lab = reloc_lab(row)
    enable_optprobes(lab.kprobes)
    p = try_optimize(lab, ASM_BASE + row["probe"])
    if "reason" in row:
        assert not p.ainsn.optimized and row["reason"] in p.ainsn.opt_reason
        assert lab.text(p.addr, 4) == BREAKPOINT["arm64"]
    else:
        assert p.ainsn.optimized, p.ainsn.opt_reason
        assert jump_target("arm64", lab.text(p.addr, 4), p.addr) == p.ainsn.optinsn.detour
        assert abs(p.ainsn.optinsn.detour - p.addr) >= 0x1000     # really elsewhere
    got = reloc_calls(lab, row)
    for i, ((g_regs, g_mem), (w_regs, w_mem)) in enumerate(zip(got, plain)):
        diff = {n: (hex(g_regs[n]), hex(w_regs[n])) for n in w_regs if g_regs[n] != w_regs[n]}
        assert not diff, f"call {i}: {diff}"
        assert g_mem == w_mem
    assert p.hits == row.get("hits", len(row["calls"])) and p.nmissed == 0


@pytest.mark.slow
def test_arm64_insns_firmware_optimized_sweep():
    """The firmware's PC-relative functions (firmware/src/arch/arm64/insns.S) with an
    optimized probe on every instruction: no difference from the unprobed run."""
    from probes.sweep import SweepConfig, sweep
    funcs = ["t_adrp", "t_ldr_lit_w", "t_ldrsw_lit", "t_bcond", "t_cbz", "t_tbnz", "t_bl",
             "t_br", "t_blr", "t_ret"]
    res = sweep(SweepConfig(path=str(firmware_elf("arm64", "insns")), funcs=funcs,
                            mode="optprobe", jobs=2))
    assert res.mismatches == 0, [r for r in res.results if r.verdict == "MISMATCH"]
    run = [r for r in res.results if r.hits]
    assert len(run) > 60 and all(r.step == "optimized" for r in run)


# === emu inspect ==============================================================================
def test_emu_inspect_kinds(arch, emu_cli):
    """Breakpoint, boosted and optimized probes as `emu inspect` shows them: the kind, the
    replaced bytes, and the slot or the detour disassembled."""
    path = str(firmware_elf(arch, "hotloop"))
    r = emu_cli("inspect", "--json", path, "hot_call")
    (k,) = json.loads(r.out)
    assert r.rc == 0 and k["kind"] == "kprobe" and k["patched"].startswith(BREAKPOINT[arch].hex())
    assert k["slot_code"].endswith(SS_BREAK[arch].hex())

    r = emu_cli("inspect", "--run", "--json", path, "hot_call")        # called once
    (b,) = json.loads(r.out)
    assert r.rc == 0 and b["hits"] == 1
    n = len(bytes.fromhex(k["slot_code"])) - len(SS_BREAK[arch])     # the copied insn
    if arch == "x86_64":
        assert b["kind"] == "boosted"
        tail = bytes.fromhex(b["slot_code"])[n:]
        assert jump_target(arch, tail, b["slot"] + n) == b["addr"] + n
    else:
        assert b["kind"] == "kprobe" and b["slot_code"] == k["slot_code"]
    r = emu_cli("inspect", "--run", path, "hot_call")
    assert f"kind:     {b['kind']}  (hits 1)" in r.out
    assert ("jmp " if arch == "x86_64" else "brk #6") in r.out.split("slot at", 1)[1]

    r = emu_cli("inspect", "--optimize", "--json", path, "hot_call")
    (o,) = json.loads(r.out)
    assert r.rc == 0 and o["kind"] == "optimized" and o["detour"] is not None
    patched = bytes.fromhex(o["patched"])
    assert jump_target(arch, patched, o["addr"]) == o["detour"]
    assert o["original"].startswith(k["original"])      # all the bytes the jump replaced
    assert len(bytes.fromhex(o["original"])) >= (5 if arch == "x86_64" else 4)
    detour = o["listing"]["detour"]
    cs = capstone.Cs(*((capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM) if arch == "arm64"
                       else (capstone.CS_ARCH_X86, capstone.CS_MODE_64)))
    copied = [f"{i.mnemonic} {i.op_str}".strip()
              for i in cs.disasm(bytes.fromhex(o["original"]), o["addr"])]
    body = [line.split(None, 1)[1] for line in detour]      # drop the address column
    assert all(any(c in line for line in body) for c in copied), (copied, detour)
    back = o["addr"] + len(bytes.fromhex(o["original"]))
    assert any(f"{'b #' if arch == 'arm64' else 'jmp '}{back:#x}" in line for line in detour)
    r = emu_cli("inspect", "--optimize", path, "hot_call")
    assert "kind:     optimized" in r.out and "detour at" in r.out
    assert all(line.strip() in r.out for line in detour)
