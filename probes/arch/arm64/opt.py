"""arm64 optprobes (beyond upstream Linux; after the LKML series "arm64: kprobe: Enable
OPTPROBE for arm64"): the probed instruction is replaced by `B imm26` to a detour buffer
within ±128 MiB: `[host entry][relocated instruction][B addr+4][literal pool]`.

Unlike the series, which copies the instruction verbatim (reviewers pointed out that
PC-relative instructions then break), PC-relative instructions are rewritten here with
the simulator's semantics: ADR/ADRP and literal loads become loads of precomputed values,
branches become branches from the detour (B.cond/CBZ/TBZ through a taken/not-taken pair),
BL/BLR set x30 to the original return address. Anything else is refused with a reason."""
from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Callable

from emu.machine import Machine
from probes.arch.arm64 import decode as d
from probes.arch.arm64.simulate import sign_extend
from probes.arch.common import ArchOptimizedInsn, callback_at
from probes.errors import OptimizeRefused
from probes.text_poke import text_poke_live

if TYPE_CHECKING:
    from probes.insn_slots import ProbePages
    from probes.kprobes import Kprobe
    from probes.reserved_text import ReservedText

NOP = 0xD503201F
B_RANGE = 1 << 27                     # ±128 MiB


def b_insn(frm: int, to: int, link: bool = False) -> int:
    off = to - frm
    if not -B_RANGE <= off < B_RANGE:
        raise OptimizeRefused(errno.ERANGE, "branch target out of ±128 MiB range")
    return (0x94000000 if link else 0x14000000) | ((off >> 2) & 0x03FFFFFF)


def ldr_literal_x(rt: int, frm: int, lit: int) -> int:
    return 0x58000000 | ((((lit - frm) >> 2) & 0x7FFFF) << 5) | rt


class Relocator:
    """Builds the detour's words; literals go in a pool after the code."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.words: list[int] = []
        self.literals: list[tuple[int, int, int]] = []   # (index of the LDR, rt, value)

    @property
    def here(self) -> int:
        return self.base + 4 * len(self.words)

    def emit(self, word: int) -> None:
        self.words.append(word)

    def load_const(self, rt: int, value: int) -> None:
        """`ldr xrt, =value`: the LDR's offset is patched in finish()."""
        self.literals.append((len(self.words), rt, value))
        self.emit(0)

    def finish(self) -> bytes:
        pool = (self.here + 7) & ~7
        code = list(self.words)
        if pool != self.here:
            code.append(NOP)
        lits = b""
        for i, (idx, rt, value) in enumerate(self.literals):
            code[idx] = ldr_literal_x(rt, self.base + 4 * idx, pool + 8 * i)
            lits += struct.pack("<Q", value & (2**64 - 1))
        return b"".join(struct.pack("<I", w) for w in code) + lits


def _refuse(reason: str) -> OptimizeRefused:
    return OptimizeRefused(errno.EINVAL, reason)


def _relocate_literal(r: Relocator, word: int, addr: int) -> None:
    rt = word & 0x1F
    if rt == 31:
        raise _refuse("literal load into xzr")
    r.load_const(rt, addr + sign_extend(((word >> 5) & 0x7FFFF) << 2, 21))
    if d._is(word, d.LDRSW_LIT):
        r.emit(0xB9800000 | (rt << 5) | rt)          # ldrsw xt, [xt]
    elif word & (1 << 30):
        r.emit(0xF9400000 | (rt << 5) | rt)          # ldr xt, [xt]
    else:
        r.emit(0xB9400000 | (rt << 5) | rt)          # ldr wt, [xt]


def _relocate_cond_branch(r: Relocator, word: int, addr: int) -> None:
    if d._is(word, d.TBZ) or d._is(word, d.TBNZ):
        target = addr + sign_extend(((word >> 5) & 0x3FFF) << 2, 16)
        r.emit((word & ~(0x3FFF << 5)) | (2 << 5))   # taken -> +8
    else:
        target = addr + sign_extend(((word >> 5) & 0x7FFFF) << 2, 21)
        r.emit((word & ~(0x7FFFF << 5)) | (2 << 5))
    r.emit(b_insn(r.here, addr + 4))                 # not taken
    r.emit(b_insn(r.here, target))                   # taken


def _relocate_insn(r: Relocator, word: int, addr: int) -> None:
    """The equivalent of `word` (probed at `addr`) as it must run from the detour."""
    is_ = d._is
    verdict, _h, why = d.arm_probe_decode_insn(word)
    if verdict is d.Verdict.GOOD or is_(word, d.BR) or is_(word, d.RET):
        r.emit(word)
    elif is_(word, d.ADR) or is_(word, d.ADRP):
        imm = sign_extend((((word >> 5) & 0x7FFFF) << 2) | ((word >> 29) & 3), 21)
        value = (addr & ~0xFFF) + (imm << 12) if word & (1 << 31) else addr + imm
        if word & 0x1F != 31:
            r.load_const(word & 0x1F, value)
    elif is_(word, d.LDR_LIT) or is_(word, d.LDRSW_LIT):
        _relocate_literal(r, word, addr)
    elif is_(word, d.B) or is_(word, d.BL):
        if word & (1 << 31):
            r.load_const(30, addr + 4)
        r.emit(b_insn(r.here, addr + sign_extend((word & 0x03FFFFFF) << 2, 28)))
    elif is_(word, d.BCOND) or any(is_(word, k) for k in (d.CBZ, d.CBNZ, d.TBZ, d.TBNZ)):
        _relocate_cond_branch(r, word, addr)
    elif is_(word, d.BLR):
        rn = (word >> 5) & 0x1F
        if rn == 30:
            raise _refuse("blr x30 needs a scratch register")
        r.load_const(30, addr + 4)
        r.emit(0xD61F0000 | (rn << 5))                   # br xn
    else:
        raise _refuse(why or "cannot relocate")


def relocate(word: int, addr: int, base: int) -> bytes:
    """The detour for the instruction `word` probed at `addr`, placed at `base`:
    [nop: host entry][equivalent of word][B addr+4][literals]. Raises OptimizeRefused."""
    r = Relocator(base)
    r.emit(NOP)                                          # the host entry point
    _relocate_insn(r, word, addr)
    r.emit(b_insn(r.here, addr + 4))
    return r.finish()


class Arm64Optprobes:
    """ArchOptprobes for arm64: `B imm26` to a per-probe detour."""

    def __init__(self, machine: Machine, pages: "ProbePages") -> None:
        self.m = machine
        self.tramps = pages.tramps
        self.breakpoint = machine.arch.breakpoint

    def bpf_thunk(self, p: "Kprobe | None", at: int, ip: int, entries: list[int], active: int,
                  counters: int, stack: int, slots: frozenset[int] | None = None,
                  resume: int | None = None, ip_word: int | None = None,
                  ctx: int | None = None, this_cpu: int | None = None,
                  budget: int | None = None, tcc: int | None = None) -> bytes:
        """`resume`: where the thunk ends (default: the detour's relocated copies);
        `ip_word`: where the frame's pc is read from (a return's address), not `ip`;
        `ctx`: the programs' context (a tracepoint's record), not the frame; `this_cpu`:
        the running CPU's guard address and stack top are the two u64 there, not `active`
        and `stack`; `budget`, `tcc`: see bpf_thunk."""
        if resume is None:                                  # the detour branches to it:
            assert p is not None and p.addr is not None
            b_insn(p.addr, at)                              # reachable from the probe
            assert p.ainsn.optinsn is not None
            resume = p.ainsn.optinsn.resume
        return bpf_thunk(at, ip, entries, active, counters, resume,
                         self.m.reg("pstate"), stack, slots, ip_word, ctx, this_cpu,
                         budget, tcc)

    def _word(self, p: "Kprobe") -> int:
        assert p.addr is not None
        return int.from_bytes(self.m.original_text(p.addr, 4), "little")

    def can_optimize(self, p: "Kprobe", reserved: "ReservedText") -> None:
        assert p.addr is not None
        relocate(self._word(p), p.addr, p.addr)         # the rewrite must exist
        near = self.tramps.pages[0] if self.tramps.pages else None
        if near is not None and not -B_RANGE <= near - p.addr < B_RANGE:
            raise OptimizeRefused(errno.ERANGE, "detour buffers out of ±128 MiB branch "
                                                "range (-ERANGE)")

    def prepare_optimized_kprobe(self, p: "Kprobe",
                                 callback: Callable[[int, int], None]) -> ArchOptimizedInsn:
        assert p.addr is not None
        word = self._word(p)
        detour = self.tramps.get(near=p.addr)
        try:
            code = relocate(word, p.addr, detour)
            if len(code) > self.tramps.slot_size:
                raise OptimizeRefused(errno.E2BIG, "detour too large")
        except OptimizeRefused:
            self.tramps.put(detour)
            raise
        self.m.text_poke(detour, code)
        oi = ArchOptimizedInsn(detour=detour, resume=detour + 4, size=4, code=code,
                               copied=[d.mnemonic(word, p.addr)])
        oi.handle = self.m.add_host_entry(detour, callback_at(p.addr, callback))
        return oi

    def arch_optimize_kprobe(self, p: "Kprobe", target: int | None = None) -> None:
        """The branch to the detour (or to `target`: a thunk that ends in the detour's copies)."""
        assert p.addr is not None
        to = p.ainsn.optinsn.detour if target is None else target
        text_poke_live(self.m, p.addr, struct.pack("<I", b_insn(p.addr, to)))

    def arch_unoptimize_kprobe(self, p: "Kprobe") -> None:
        assert p.addr is not None
        text_poke_live(self.m, p.addr, self.breakpoint)

    def detour_orig_addr(self, p: "Kprobe", pc: int) -> int | None:
        """Every word after the host entry stands for the one probed instruction (the
        branch back cannot fault)."""
        return p.addr if pc >= p.ainsn.optinsn.resume else None

    def free_optimized_kprobe(self, p: "Kprobe") -> None:
        oi = p.ainsn.optinsn
        self.m.remove_host_entry(oi.handle)
        self.tramps.put(oi.detour)


# --- the BPF optprobe thunk ----------------------------------------------------------------

def _movq(r: str, value: int) -> str:
    """A 64-bit constant as MOVZ + MOVKs (text)."""
    value &= 2**64 - 1
    out = f"movz {r}, #{value & 0xFFFF}; "
    for k in (1, 2, 3):
        h = (value >> (16 * k)) & 0xFFFF
        if h:
            out += f"movk {r}, #{h}, lsl #{16 * k}; "
    return out


# What a thunk and the images it calls may change: the JIT's BPF r0-r5 (x7, x0-x4), AX and
# scratch (x9-x13), the thunk's own x16 (blr target), x19 (the frame) and x20 (NZCV) and x30
# (blr). The images keep x19-x28 and x29 themselves (their prologue), as AAPCS64 asks.
THUNK_CLOBBERS = frozenset({0, 1, 2, 3, 4, 7, 9, 10, 11, 12, 13, 16, 19, 20, 30})
BUDGET_REG = 27     # the JIT's budget register (jit_arm64 budget_reg): images change it


def _frame_ops(op: str, regs: list[int]) -> str:
    """stp/ldp for neighbouring registers, str/ldr for the rest, at their pt_regs slots."""
    out, k = "", 0
    while k < len(regs):
        i = regs[k]
        if k + 1 < len(regs) and regs[k + 1] == i + 1:
            out += f"{op}p x{i}, x{i + 1}, [sp, #{8 * i}]; "
            k += 2
        else:
            out += f"{op}r x{i}, [sp, #{8 * i}]; "
            k += 1
    return out


def _zero_slots(offs: list[int]) -> str:
    """Zero the frame's u64 at ``offs``: stp xzr, xzr for neighbours (a full frame with a
    budget and a tail-call count must fit its slot), str xzr for the rest."""
    out, k = "", 0
    while k < len(offs):
        if k + 1 < len(offs) and offs[k + 1] == offs[k] + 8:
            out += f"stp xzr, xzr, [sp, #{offs[k]}]; "
            k += 2
        else:
            out += f"str xzr, [sp, #{offs[k]}]; "
            k += 1
    return out


def bpf_thunk(at: int, ip: int, entries: list[int], active: int, counters: int,
              resume: int, pstate: int, stack: int, slots: frozenset[int] | None = None,
              ip_word: int | None = None, ctx: int | None = None,
              this_cpu: int | None = None, budget: int | None = None,
              tcc: int | None = None) -> bytes:
    """The optprobe template with trace_call_bpf inlined, at `at` (within B range of the
    probe and of `resume`): a pt_regs frame (x0-x30, sp, pc = `ip`, pstate = NZCV |
    `pstate`'s other bits, syscallno = -1) on the guest stack; if the bpf_prog_active word
    at `active` is 0 it is taken, the hit counted in the u64 at `counters`, and each JITed
    image in `entries` called on the BPF layer's stack (top `stack`) with x0 = the frame
    (x19, callee-saved in the JIT, keeps it); else a miss is counted at `counters + 8`.
    Every register the thunk and the images may change and NZCV come back, then
    `b resume`. With `ip_word` the frame's pc is the u64 there (a kretprobe stub's
    return address, which changes from hit to hit), not `ip`. With `ctx` the images get
    x0 = `ctx` (a tracepoint's record or raw arguments) instead of the frame. With
    `this_cpu` the guard's address and the stack top are loaded from the two u64 there (the
    running CPU's, as the kernel reaches per-CPU data through its per-CPU offset).
    With `budget` (programs with backward branches) each image is entered with the run's
    budget in x27 (BUDGET_REG, the register the JIT counts backward branches down in, as
    the nested run's entry sets it); x27 is the guest's (callee-saved), so it is kept in the
    frame and comes back. With `tcc` (programs with tail calls) the u32 tail-call count
    there is zeroed before each image, as the kernel's prologue starts each program's count.

    `slots`: the frame offsets the programs can read (BpfProg.ctx_reads; None: all). Only
    those and the registers to restore are written (a slot no program reads cannot be
    observed): stores were most of a hit's cost before the machine's virtual TLB made
    stores to data pages fast (emu/vtlb.py), and fewer still cost less."""
    from probes.arch.arm64.ptrace import PT_REGS_SIZE, SYSCALLNO_OFF
    from probes.bpf.jit_arm64 import _KS

    def wanted(off: int) -> bool:
        return slots is None or any(off <= s < off + 8 for s in slots)

    kept = THUNK_CLOBBERS | ({BUDGET_REG} if budget is not None else set())
    regs = sorted(kept | {i for i in range(31) if wanted(8 * i)})
    arg = "mov x0, x19; " if ctx is None else _movq("x0", ctx)
    entry = ((f"{_movq('x16', tcc)}str wzr, [x16]; " if tcc is not None else "")
             + (_movq(f"x{BUDGET_REG}", budget) if budget is not None else ""))
    calls = "".join(f"{arg}{entry}{_movq('x16', e)}blr x16; " for e in entries)
    tail = _zero_slots([o for o in range(288, PT_REGS_SIZE, 8) if wanted(o)])
    # NZCV without MRS/MSR (each is a host exit here: the machine hooks system registers):
    # four CSETs make it, kept in x20 (callee-saved in the JIT); CCMP with a false
    # condition sets it back from one of 16 immediates.
    nzcv = ("cset x0, mi; cset x1, eq; cset x2, hs; cset x3, vs; orr x0, x1, x0, lsl #1; "
            "orr x0, x2, x0, lsl #1; orr x20, x3, x0, lsl #1; ")
    table = "".join(f"ccmp xzr, xzr, #{k}, ne; b done; " for k in range(16))
    special = ((f"add x0, sp, #{PT_REGS_SIZE}; str x0, [sp, #248]; " if wanted(248) else "")
               + ((f"{_movq('x0', ip)}" if ip_word is None else f"{_movq('x0', ip_word)}ldr x0, [x0]; ")
                  + "str x0, [sp, #256]; " if wanted(256) else "")
               + (f"{_movq('x1', pstate & 0x0FFFFFFF)}orr x0, x1, x20, lsl #28; "
                  "str x0, [sp, #264]; " if wanted(264) else "")
               + ("str xzr, [sp, #272]; " if wanted(272) else "")
               + (f"movn w0, #0; str w0, [sp, #{SYSCALLNO_OFF}]; "
                  f"str wzr, [sp, #{SYSCALLNO_OFF + 4}]; " if wanted(SYSCALLNO_OFF) else ""))
    guard = _movq("x1", active) if this_cpu is None else f"{_movq('x1', this_cpu)}ldr x1, [x1]; "
    top = _movq("x16", stack) if this_cpu is None else f"{_movq('x16', this_cpu)}ldr x16, [x16, #8]; "
    text = (f"sub sp, sp, #{PT_REGS_SIZE}; {_frame_ops('st', regs)}{nzcv}{special}{tail}"
            f"{guard}{_movq('x3', counters)}ldr w2, [x1]; cbnz w2, miss; "
            "mov w2, #1; str w2, [x1]; ldr x2, [x3]; add x2, x2, #1; str x2, [x3]; "
            f"mov x19, sp; {top}mov sp, x16; {calls}mov sp, x19; "
            f"{guard}str wzr, [x1]; b restore; "
            "miss: ldr x2, [x3, #8]; add x2, x2, #1; str x2, [x3, #8]; "
            "restore: adr x1, table; add x1, x1, x20, lsl #3; cmp x1, x1; br x1; "
            f"table: {table}"
            f"done: {_frame_ops('ld', regs)}add sp, sp, #{PT_REGS_SIZE}; b #{resume:#x}")
    for _ in range(3):            # keystone's arm64 parser occasionally fails once
        try:
            enc, _n = _KS.asm(text, at)
            return bytes(enc or b"")
        except Exception:
            continue
    raise OptimizeRefused(errno.EINVAL, "the BPF thunk did not assemble")
