"""The shape of the JITed code where it decides what memory-heavy programs cost (issue 17).

Every guest load or store costs Unicorn a TLB check and a call of its exit-request helper,
several times an ALU instruction, and a store to a page whose TLB entry carries execute, or
that a memory hook covers, takes the slow path every time. So: a BPF stack access is one
instruction, as in the kernel's JITs (arm64: LDR/STR from sp with off + the stack size,
unsigned scaled offset; x86-64: one mov from rbp); a pointer access is one instruction
where the kernel's is_lsi_offset reaches the offset, else the offset in a temporary and the
register-offset form; the pages under the images' data (the native stack, the context and
map windows, the run's data page) are never executable, the images never writable, and no
memory hook is installed. Boundary offsets run as in the interpreter on both arches."""
from __future__ import annotations

import capstone
import pytest

from conftest import ARCHES
from emu.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from probes import bpf
from probes.bpf.context import BpfRunContext
from probes.bpf.jit_guest import JitImage, ScratchJit
from probes.bpf.memory import CTX_ADDR

from unicorn import unicorn_const as UC

STACK = 512          # MAX_BPF_STACK: both JITs give every function the whole BPF stack
SIZES = {"b": 1, "h": 2, "w": 4, "dw": 8}
MEM_HOOKS = (UC.UC_HOOK_MEM_READ | UC.UC_HOOK_MEM_WRITE | UC.UC_HOOK_MEM_FETCH
             | UC.UC_HOOK_MEM_READ_AFTER)


def jit(text: str, arch: str, mem: int = 0) -> tuple[ScratchJit, JitImage, bpf.BpfProg]:
    prog = bpf.BpfProg.from_bytes(bpf.assemble(text))
    j = ScratchJit(arch)
    run = j.prepare(prog, bytearray(mem), BpfRunContext(), None)
    j.execute(prog, run, CTX_ADDR, mem)
    return j, j.images[id(prog)], prog


def insns_of(j: ScratchJit, image: JitImage, idx: int) -> list:
    """The guest instructions BPF instruction ``idx`` became."""
    addr, code = image.insn_code(idx)
    cs = capstone.Cs(j.machine.arch.cs_arch, j.machine.arch.cs_mode)
    cs.detail = True
    return list(cs.disasm(code, addr))


def mem_operand(arch: str, ins) -> tuple[str, int]:
    """(base register name, displacement) of a load's or store's memory operand."""
    op = next(o for o in ins.operands if o.type == (capstone.arm64.ARM64_OP_MEM if arch == "arm64"
                                                    else capstone.x86.X86_OP_MEM))
    return ins.reg_name(op.mem.base), op.mem.disp


def stack_program() -> tuple[str, list[tuple[int, str, int]]]:
    """Stores and loads of every size at the stack's edges and inside it: (BPF index,
    kind, offset) of each access."""
    lines, accesses = ["mov r0, 0", "mov r1, 7"], []
    for sfx, size in SIZES.items():
        for off in (-STACK, -STACK + 8 * size, -256 - size, -256, -64, -size):
            accesses.append((len(lines), "st", off))
            lines.append(f"st{sfx} [r10{off}], {size}")
            accesses.append((len(lines), "stx", off))
            lines.append(f"stx{sfx} [r10{off}], r1")
            accesses.append((len(lines), "ldx", off))
            lines.append(f"ldx{sfx} r2, [r10{off}]")
            lines.append("add r0, r2")
    return "\n".join(lines + ["exit"]), accesses


@pytest.mark.parametrize("arch", ARCHES)
def test_stack_access_is_one_instruction(arch) -> None:
    text, accesses = stack_program()
    j, image, _prog = jit(text, arch)
    for idx, kind, off in accesses:
        got = insns_of(j, image, idx)
        access = got[-1]
        base, disp = mem_operand(arch, access)
        if arch == "arm64":
            # the kernel's build_insn: fp-relative becomes sp + (off + stack size)
            assert (base, disp) == ("sp", off + STACK), (idx, access.mnemonic, access.op_str)
            assert access.mnemonic.startswith("ldr" if kind == "ldx" else "str")
            # an immediate store first puts the value in a register (emit_a64_mov_i)
            assert len(got) == (2 if kind == "st" else 1), [i.mnemonic for i in got]
        else:
            assert (base, disp) == ("rbp", off) and len(got) == 1, access.op_str
            assert access.mnemonic.startswith("mov")


@pytest.mark.parametrize("arch", ARCHES)
def test_pointer_access_offsets(arch) -> None:
    """Through a pointer register: arm64 reaches aligned offsets up to 4095 x size in one
    LDR/STR (is_lsi_offset), others through x10 = off; x86-64 always one mov."""
    cases = [("ldxdw r2, [r1+32760]", 1), ("ldxdw r2, [r1+0]", 1), ("ldxw r2, [r1+16380]", 1),
             ("ldxb r2, [r1+4095]", 1), ("ldxb r2, [r1+4096]", 2), ("ldxh r2, [r1+3]", 2),
             ("ldxw r2, [r1+16384]", 2), ("stxdw [r1+8], r1", 1), ("stxw [r1+6], r1", 2),
             ("ldxsw r2, [r1+4]", 1), ("ldxsh r2, [r1+5]", 2)]
    text = "\n".join(["mov r0, 0"] + [c for c, _ in cases] + ["exit"])
    j, image, _prog = jit(text, arch, mem=32768)
    for k, (line, n) in enumerate(cases, start=1):
        got = insns_of(j, image, k)
        assert len(got) == (n if arch == "arm64" else 1), (line, [i.mnemonic for i in got])
        base, disp = mem_operand(arch, got[-1])
        want = "x0" if arch == "arm64" else "rdi"     # BPF r1
        assert base == want, line
        if arch == "arm64" and n == 2:
            assert got[0].op_str.startswith("x10") and got[-1].op_str.endswith("x10]"), line


# every size at aligned and misaligned offsets: the unsigned-offset form, the fallback
ACCESS_SWEEP = [(sfx, off) for sfx, size in SIZES.items()
                for off in (-STACK, -STACK + 1, -257, -256, -255, -size - 6, -size)]


def sweep_program() -> str:
    """Each access through the frame pointer is read back through a copy of it (r7, the
    pointer form) and the other way round, and copied out through r1 (the context): the
    two addressings must agree on every byte."""
    lines = ["mov r0, 0", "mov r6, 0x1234567", "lsh r6, 20", "add r6, 0x89abc"]
    for sfx, off in ACCESS_SWEEP:
        lines += ["mov r7, r10", f"add r7, {off}",
                  f"stx{sfx} [r10{off}], r6", f"ldx{sfx} r2, [r7+0]", "add r0, r2",
                  f"st{sfx} [r7+0], -3", f"ldx{sfx} r3, [r10{off}]", "xor r0, r3",
                  "mov r7, r10", "add r7, -600", f"stx{sfx} [r7{off + 600:+d}], r0",
                  f"ldx{sfx} r3, [r10{off}]", "add r0, r3",
                  f"stx{sfx} [r1+{STACK + off}], r0", f"ldx{sfx} r4, [r1+{STACK + off}]",
                  "add r0, r4", "add r6, 77"]
    lines += ["ldxdw r4, [r1+0]", "add r0, r4", "ldxb r4, [r1+511]", "add r0, r4"]
    return "\n".join(lines + ["exit"])


@pytest.mark.parametrize("arch", ARCHES)
def test_access_sweep_matches_interpreter(arch) -> None:
    code = bpf.assemble(sweep_program())
    mem = bytes(range(256)) * 2
    want = bpf.run(code, mem, engine="interp")
    assert bpf.run(code, mem, engine="jit", arch=arch) == want


def _assert_not_wx(regions) -> None:
    for r in regions:
        assert not (r.prot & PROT_WRITE and r.prot & PROT_EXEC), (r.name, hex(r.start), r.prot)


@pytest.mark.parametrize("arch", ARCHES)
def test_scratch_pages_are_never_writable_and_executable(arch) -> None:
    j, image, _prog = jit(stack_program()[0], arch, mem=64)
    m = j.machine
    _assert_not_wx(m.memory.regions)
    stack = m.memory.find(j.stack_top - 8)
    ctx = m.memory.find(j.to_guest(CTX_ADDR))
    data = m.memory.find(j.tcc_addr)
    for region in (stack, ctx, data):
        assert region is not None and region.prot == PROT_READ | PROT_WRITE, region
        # the TLB grants what the mapping says: no execute, so stores go inline
        assert m.tlb.lookup(region.start) in (None, UC.UC_PROT_READ | UC.UC_PROT_WRITE) \
            or m.tlb.mode == "off"
    code = m.memory.find(image.addr)
    assert code is not None and code.prot == PROT_READ | PROT_EXEC
    assert not any(t & MEM_HOOKS for t, _b, _e in m.hooks.installed.values())


@pytest.mark.parametrize("arch", ARCHES)
def test_traced_guest_pages_are_never_writable_and_executable(arch) -> None:
    """An optimized probe whose JITed program counts keys in a hash map (lookup and update
    through the helper trampoline, C's values mapped into the guest, a locked add through
    the pointer): every page the BPF layer mapped is rw- or r-x, and no memory hook is on
    the machine."""
    from emu.owners import RegionOwner
    from probes import bench, bench_kinds
    from probes.bpf.jit_guest import install_engine
    from probes.bpf.libbpf import KprobePerfEvent
    from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType,
                                        perf_event_attach_bpf_prog)

    elf, func, call, _arg = bench_kinds.KIND_GUESTS["o"]
    lab = bench._lab(arch, elf, bench.profile_for(arch, None).name)
    p = bench_kinds.setup_kind("o", lab, func)[0]
    ev = KprobePerfEvent(lab.machine, func, kp=p)
    p.pre_handler = ev.kprobe_perf_func
    perf_event_attach_bpf_prog(PerfEvent(ev, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE),
                               bench_kinds.key_counting_prog(arch, keys=8))
    install_engine(lab.machine, "jit")
    lab.call(call, 20, timeout=60)
    m = lab.machine
    _assert_not_wx(m.memory.regions)
    owned = [r for r in m.memory.regions if m.owners.owner_of(r.start) is RegionOwner.BPF]
    assert any(r.prot == PROT_READ | PROT_EXEC for r in owned)       # images, trampolines
    assert any(r.prot == PROT_READ | PROT_WRITE for r in owned)      # stack, windows, values
    assert not any(t & MEM_HOOKS for t, _b, _e in m.hooks.installed.values())


# --- immediates: the kernel's one-instruction forms, and the values they give ------------

IMMS = [0, 1, 0xFFF, 0x1000, 0x5000, 0xFFF000, 0x1000000, 0x1001, 0x7FFFFFFF, -1, -2, -0xFFF,
        -0x1000, -0x1001, -0xFFF000, -0x80000000, 0x55555555, 0x0F0F0F0F, 0x7FFF0000,
        -0x10, 0xFFFF, -0x10000, 0x12345]
LDDW = [0, 1, 0xFFFF1234, 0xFFFFFFFF, 0x1_0000_0000, 0xFFFF_FFFF_0000_0000, 0x8000_0000_0000_0000,
        0x1234_5678_9ABC_DEF0, 0xFFFF_FFFF_FFFF_1234, 0x0000_FFFF_0000_FFFF, (1 << 64) - 1,
        0xFFFF_0000_FFFF_FFFF, 0x3000_0000_1000]


def imm_program() -> str:
    """Every immediate through the K forms of ALU64, ALU32 and both jump classes, folded
    into r0 (a wrong value or flag changes the result)."""
    lines = ["mov r0, 0", "lddw r6, 0x0123456789abcdef"]
    for imm in IMMS:
        for sfx in ("", "32"):
            for op in ("add", "sub", "and", "or", "xor"):
                lines += [f"mov{sfx} r2, r6", f"{op}{sfx} r2, {imm}", "add r0, r2", "rsh r6, 1",
                          "xor r6, r0"]
            for j in ("jeq", "jne", "jgt", "jsgt", "jslt", "jle", "jset"):
                lines += [f"{j}{sfx} r6, {imm}, +1", "add r0, 3", "lsh r0, 1"]
                lines += [f"{j}{sfx} r0, {imm}, +1", "add r0, 5"]
        lines += [f"mov r3, {imm}", "add r0, r3", f"mov32 r3, {imm}", "xor r0, r3"]
    for v in LDDW:
        lines += [f"lddw r4, {v:#x}", "add r0, r4", "rol_placeholder"]
    text = "\n".join(lines + ["exit"])
    return text.replace("\nrol_placeholder", "\nmov r5, r0\nrsh r5, 7\nxor r0, r5")


@pytest.mark.parametrize("arch", ARCHES)
def test_immediates_match_interpreter(arch) -> None:
    code = bpf.assemble(imm_program())
    assert bpf.run(code, engine="jit", arch=arch) == bpf.run(code, engine="interp")


def test_arm64_immediate_forms_are_one_instruction() -> None:
    """build_insn's BPF_K cases: ADD/SUB imm12 (shifted too, or negated into the other op),
    AND/ORR/EOR/TST with a logical immediate, CMP/CMN: one instruction; the rest a MOVZ/MOVN
    (+ MOVK) into x10 first; constants as emit_a64_mov_i64 builds them."""
    cases = [("add r1, 0x5000", 1), ("add r1, -0xfff", 1), ("sub r1, -0x3000", 1),
             ("add r1, 0x1001", 2), ("and r1, 0xff00ff00", 3), ("and r1, 0xff", 1), ("and32 r1, 0xff00ff00", 1),
             ("or r1, 0x55555555", 3), ("or32 r1, 0x55555555", 1), ("xor r1, 0x12345", 3), ("and r1, -16", 1),
             ("jeq r1, 0x7000, +0", 2), ("jeq r1, -0x3000, +0", 2), ("jeq r1, 0x1234567, +0", 4),
             ("jset r1, 0x8000, +0", 2), ("jset r1, 0x12345, +0", 4),
             ("mov r1, -1", 1), ("mov r1, 0x7fff0000", 2), ("mov r1, 0x12345", 2),
             ("lddw r1, 0xffff1234", 1), ("lddw r1, 0xffffffffffff1234", 1),
             ("lddw r1, 0x300000001000", 2), ("lddw r1, 0x123456789abcdef0", 4)]
    text = "\n".join(["mov r0, 0", "mov r1, 1"] + [c for c, _ in cases] + ["exit"])
    j, image, prog = jit(text, "arm64")
    idx = 2
    for line, n in cases:
        got = insns_of(j, image, idx)
        # a conditional jump's own B.cond is the last instruction of its code
        assert len(got) == n, (line, [f"{i.mnemonic} {i.op_str}" for i in got])
        idx += 2 if line.startswith("lddw") else 1


# --- x86-64 division and shifts: the registers the instructions fix ----------------------

DIV_OPS = ["div", "mod", "sdiv", "smod", "lsh", "rsh", "arsh"]
INITS = [[0x7654_3210_0000_0009, -7, 3, 0, -0x8000_0000_0000_0000, 0xFFFF_FFFF_0000_0011],
         [-0x8000_0000_0000_0000, -1, 0, 0x1_0000_0005, -0x7FFF_FFFF_FFFF_FFFD, 0xFFFF_FFF0]]


def regs_program(init: list[int]) -> str:
    """Each op on every (dst, src) pair of r0-r5 (on x86-64: rax, rdi, rsi, rdx, rcx, r8:
    the dividend, remainder and shift-count registers among them), 64- and 32-bit, with
    zero, -1 and INT_MIN divisors, every result folded into r9."""
    lines = ["mov r9, 0"]
    for op in DIV_OPS:
        for sfx in ("", "32"):
            for d in range(6):
                for s in range(6):
                    lines += [f"lddw r{k}, {v & ((1 << 64) - 1):#x}" for k, v in enumerate(init)]
                    lines += [f"{op}{sfx} r{d}, r{s}", f"add r9, r{d}", "mov r6, r9",
                              "rsh r6, 13", "xor r9, r6"]
                    lines += [f"add r9, r{(d + 1) % 6}"]       # the registers the op saved
    return "\n".join(lines + ["mov r0, r9", "exit"])


@pytest.mark.parametrize("init", range(len(INITS)))
@pytest.mark.parametrize("arch", ARCHES)
def test_division_and_shift_registers_match_interpreter(arch, init) -> None:
    code = bpf.assemble(regs_program(INITS[init]))
    assert bpf.run(code, engine="jit", arch=arch) == bpf.run(code, engine="interp")


def test_x86_shift_by_register_is_one_instruction() -> None:
    """SHLX/SHRX/SARX as the kernel emits them with BMI2, except by rcx (BPF r4): the
    shift count needs no cl and rcx is not saved around it."""
    text = "\n".join(["mov r0, 0", "mov r2, 5", "mov r3, 1", "mov r4, 2",
                      "lsh r2, r3", "rsh32 r2, r3", "arsh r3, r2", "lsh r2, r4", "exit"])
    j, image, _prog = jit(text, "x86_64")
    for idx, mnemonic in ((4, "shlx"), (5, "shrx"), (6, "sarx")):
        got = insns_of(j, image, idx)
        assert [i.mnemonic for i in got] == [mnemonic]
    assert [i.mnemonic for i in insns_of(j, image, 7)] == ["shl"]
