"""The arm64 BPF JIT (arch/arm64/net/bpf_jit_comp.c, bpf_jit.h): one BPF instruction at a time.

Registers as the kernel maps them: r0 x7, r1-r5 x0-x4, r6-r9 x19-x22, the frame pointer
x25, AX x9; x10-x13 are scratch. Prologue ``stp x29, x30, [sp, #-16]!; mov x29, sp``,
then, as find_used_callee_regs does since Linux 6.12, only the callee-saved registers the
function uses (x19-x22 for r6-r9, and x25) in pairs, ``mov x25, sp; sub sp, sp, #512``;
the epilogue undoes it and ends ``mov x0, x7; ret``. (The kernel keeps the tail-call count
on the stack through x26; here it is a word in the JIT's data page, so x26 is left alone.) A helper returns in x0 and the JIT copies it to x7.

Loads and stores are the kernel's: one LDR/STR (unsigned scaled offset) when
is_lsi_offset reaches the offset, stack slots from sp with off + the stack size (the frame
pointer is sp + 512 throughout a function body), else the offset in a temporary and the
register-offset form. Every guest load or store costs Unicorn a TLB check and a call of its
exit-request helper (~4-5 ns, against ~0.1-0.5 ns for an ALU instruction), so the number of
instructions around an access matters little; the number of accesses is the program's.

Constants are built with MOVZ/MOVN/MOVK encoded here, as emit_a64_mov_i (32-bit
immediates) and emit_a64_mov_i64 (lddw) build them; an ALU or jump immediate is the instruction's own
when the kernel's forms take it (is_addsub_imm, logical immediates), else it goes to x10
first. The other straight instructions go through keystone (exact, cached); branches (B,
BL, B.cond, CBZ/CBNZ) are encoded here. Atomics are the kernel's LL/SC forms (emit_ll_sc_atomic, the
path for CPUs without LSE such as the Cortex-A72 Unicorn models): LDXR/STLXR loops, with
``dmb ish`` after the fetching ones. Division needs no guards: UDIV/SDIV give 0 for a zero
divisor and INT_MIN for INT_MIN / -1, and MSUB then yields the BPF remainders.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import keystone

from .errors import BpfError
from .isa import (
    BPF_ADD, BPF_ALU64, BPF_AND, BPF_ARSH, BPF_CMPXCHG, BPF_DIV, BPF_FETCH, BPF_JEQ,
    BPF_JGE, BPF_JGT, BPF_JLE, BPF_JLT, BPF_JMP32, BPF_JNE, BPF_JSET, BPF_JSGE, BPF_JSGT,
    BPF_JSLE, BPF_JSLT, BPF_LOAD_ACQ, BPF_LSH, BPF_MOD, BPF_MOV, BPF_MUL, BPF_OR, BPF_RSH,
    BPF_REG_FP, BPF_STORE_REL, BPF_SUB, BPF_TO_BE, BPF_XCHG, BPF_XOR, MAX_BPF_STACK,
    MAX_TAIL_CALL_CNT,
    SIZE_BYTES, U64,
)
from .jit_guest import Branch, InsnCtx, Mark, Piece, Probe

if TYPE_CHECKING:
    from emu.machine import Machine

REGS = ("x7", "x0", "x1", "x2", "x3", "x4", "x19", "x20", "x21", "x22", "x25", "x9")
ALL_CALLEE = frozenset(range(6, 10))


def _callee_pairs(used: frozenset[int]) -> list[tuple[str, str]]:
    """find_used_callee_regs (Linux 6.12+): x19-x22 for the r6-r9 the function names, then
    the BPF frame pointer x25 (this JIT always sets it up), pushed in pairs, an odd one
    with xzr to keep sp 16-byte aligned."""
    regs = [REGS[r] for r in (6, 7, 8, 9) if r in used] + ["x25"]
    return [(regs[i], regs[i + 1] if i + 1 < len(regs) else "xzr") for i in range(0, len(regs), 2)]
_COND = {"eq": 0, "ne": 1, "hs": 2, "lo": 3, "mi": 4, "pl": 5, "vs": 6, "vc": 7, "hi": 8,
         "ls": 9, "ge": 10, "lt": 11, "gt": 12, "le": 13}
_JCC = {BPF_JEQ: "eq", BPF_JNE: "ne", BPF_JGT: "hi", BPF_JGE: "hs", BPF_JLT: "lo",
        BPF_JLE: "ls", BPF_JSGT: "gt", BPF_JSGE: "ge", BPF_JSLT: "lt", BPF_JSLE: "le",
        BPF_JSET: "ne"}
_ALU = {BPF_ADD: "add", BPF_SUB: "sub", BPF_OR: "orr", BPF_AND: "and", BPF_XOR: "eor",
        BPF_MUL: "mul", BPF_LSH: "lsl", BPF_RSH: "lsr", BPF_ARSH: "asr"}
_LD = {1: "ldrb", 2: "ldrh", 4: "ldr", 8: "ldr"}
_ST = {1: "strb", 2: "strh", 4: "str", 8: "str"}
_LDSX = {1: "ldrsb", 2: "ldrsh", 4: "ldrsw"}
_SCALE = {1: 0, 2: 1, 4: 2, 8: 3}      # log2 of the access size: LDR/STR's offset unit
_SFX = {1: "b", 2: "h", 4: "", 8: ""}

_KS = keystone.Ks(keystone.KS_ARCH_ARM64, keystone.KS_MODE_LITTLE_ENDIAN)


@lru_cache(maxsize=1 << 16)
def asm(text: str) -> bytes:
    """Straight instructions (no branches, no labels) to bytes."""
    for _ in range(3):     # keystone's arm64 parser occasionally fails once (unicorn-notes)
        try:
            enc, _n = _KS.asm(text, 0)
            return bytes(enc or b"")
        except keystone.KsError as e:
            err = e
    raise AssertionError(f"arm64 JIT emitted {text!r}: {err}")


def w(r: str) -> str:
    return "w" + r[1:]


def _word(v: int) -> bytes:
    return v.to_bytes(4, "little")


def _rnum(r: str) -> int:
    return int(r[1:])


def is_lsi_offset(off: int, scale: int) -> bool:
    """is_lsi_offset: LDR/STR (unsigned offset) encodes ``off`` (imm12 << scale, aligned)."""
    return 0 <= off <= 0xFFF << scale and not off & ((1 << scale) - 1)


_MOVZ, _MOVN, _MOVK = 0x52800000, 0x12800000, 0x72800000


def _movw(op: int, is64: bool, r: str, imm: int, shift: int) -> bytes:
    return _word((1 << 31 if is64 else 0) | op | (shift // 16) << 21 | (imm & 0xFFFF) << 5
                 | _rnum(r))


def mov_i(r: str, imm: int, is64: bool = True) -> bytes:
    """emit_a64_mov_i: a 32-bit immediate (sign-extended when ``is64``) in one or two of
    MOVZ/MOVN, MOVK."""
    hi, lo = (imm >> 16) & 0xFFFF, imm & 0xFFFF
    if hi & 0x8000:
        if hi == 0xFFFF:
            return _movw(_MOVN, is64, r, ~lo, 0)
        return _movw(_MOVN, is64, r, ~hi, 16) + (_movw(_MOVK, is64, r, lo, 0)
                                                  if lo != 0xFFFF else b"")
    return _movw(_MOVZ, is64, r, lo, 0) + (_movw(_MOVK, is64, r, hi, 16) if hi else b"")


def mov_i64(r: str, value: int) -> bytes:
    """emit_a64_mov_i64: a value of 32 bits as emit_a64_mov_i's 32-bit form (the upper
    half zeroed), else MOVZ or MOVN (whichever leaves fewer halves to patch) at the
    highest half, then MOVK downwards for each half that differs from the fill."""
    value &= U64
    if not value >> 32:
        return mov_i(r, value if value < 1 << 31 else value - (1 << 32), False)
    fill = 0xFFFF if _halves(value, 0xFFFF) < _halves(value, 0) else 0
    top = (~value & U64) if fill else value
    shift = max((top.bit_length() - 1) // 16 * 16, 0)
    out = _movw(_MOVN if fill else _MOVZ, True, r, ~value >> shift if fill else value >> shift,
                shift)
    for s in range(shift - 16, -1, -16):
        if (value >> s) & 0xFFFF != fill:
            out += _movw(_MOVK, True, r, value >> s, s)
    return out


def _halves(value: int, fill: int) -> int:
    """i64_i16_blocks: the 16-bit halves of ``value`` that are not ``fill``."""
    return sum((value >> s) & 0xFFFF != fill for s in (0, 16, 32, 48))


def is_addsub_imm(imm: int) -> bool:
    """is_addsub_imm: ADD/SUB (immediate) takes imm12, or imm12 shifted left 12."""
    imm &= 0xFFFFFFFF
    return not imm & ~0xFFF or not imm & ~0xFFF000


def is_logical_imm(value: int, bits: int) -> bool:
    """Whether AND/ORR/EOR/TST (immediate) encode ``value`` (A64_AND_I etc. return
    AARCH64_BREAK_FAULT otherwise): a run of ones, rotated, repeated across the register in
    elements of 2 to ``bits`` bits; never all zeros or all ones."""
    mask = (1 << bits) - 1
    value &= mask
    if value in (0, mask):
        return False
    size = bits
    while size > 2:
        half = size // 2
        low = value & ((1 << half) - 1)
        if value >> half != low:
            break
        value, size = low, half
    rotated = (value >> 1) | ((value & 1) << (size - 1))
    return bin(value ^ rotated).count("1") == 2      # one run: two edges, circularly


class Arm64Jit:
    arch = "arm64"
    reg_names = REGS
    helper_ret = "x0"
    budget_reg = "x27"
    stub_code = _word(0xD503201F) + _word(0xD65F03C0)     # nop; ret (host entry on the nop)

    # -- branches --
    def branch_size(self, b: Branch) -> int:
        return 4

    def encode_branch(self, b: Branch, at: int, target: int) -> bytes:
        off = (target - at) >> 2
        if b.op in ("jmp", "call"):
            if not -(1 << 25) <= off < (1 << 25):
                raise BpfError("JIT: a branch past B's 128 MiB range (the kernel's JIT fails too)")
            return _word((0x94000000 if b.op == "call" else 0x14000000) | (off & 0x3FFFFFF))
        if not -(1 << 18) <= off < (1 << 18):
            raise BpfError("JIT: a conditional branch past B.cond's 1 MiB range "
                           "(the kernel's arm64 JIT fails too)")
        if b.op == "jcc":
            return _word(0x54000000 | (off & 0x7FFFF) << 5 | _COND[b.cond])
        sf = 1 << 31 if b.reg.startswith("x") else 0
        op = 0x34000000 if b.op == "cbz" else 0x35000000
        return _word(sf | op | (off & 0x7FFFF) << 5 | _rnum(b.reg))

    def call_size(self) -> int:
        return 4

    def return_address(self, m: "Machine") -> int:
        return m.reg("x30")

    def push_return(self, m: "Machine", sp: int, ret: int) -> int:
        m.set_reg("x30", ret)
        return sp

    # -- frame --
    def prologue(self, used: frozenset[int] = ALL_CALLEE) -> list[Piece]:
        """build_prologue with push_callee_regs: the frame record, then only the
        callee-saved registers the function uses (find_used_callee_regs), in pairs."""
        pushes = "".join(f"stp {a}, {b}, [sp, #-16]!; " for a, b in _callee_pairs(used))
        return [asm(f"stp x29, x30, [sp, #-16]!; mov x29, sp; {pushes}mov x25, sp; "
                    f"sub sp, sp, #{MAX_BPF_STACK}")]

    def teardown(self, used: frozenset[int] = ALL_CALLEE) -> bytes:
        pops = "".join(f"ldp {a}, {b}, [sp], #16; " for a, b in reversed(_callee_pairs(used)))
        return asm(f"add sp, sp, #{MAX_BPF_STACK}; {pops}ldp x29, x30, [sp], #16")

    def epilogue(self, used: frozenset[int] = ALL_CALLEE) -> list[Piece]:
        return [self.teardown(used) + asm("mov x0, x7; ret")]

    # -- instructions --
    def insn(self, c: InsnCtx) -> list[Piece]:
        return getattr(self, "_" + c.kind)(c)

    def _alu(self, c: InsnCtx) -> list[Piece]:
        i = c.insn
        is64 = i.cls == BPF_ALU64
        r = (lambda x: x) if is64 else w
        dst = r(REGS[i.dst_reg])
        if i.is_reg_src:
            src, pre = r(REGS[i.src_reg]), b""
        else:
            if i.op == BPF_MOV:
                return [mov_i(REGS[i.dst_reg], i.imm, is64)]
            short = self._alu_imm(i.op, dst, i.imm, is64)
            if short is not None:
                return [short]
            src, pre = r("x10"), mov_i("x10", i.imm, is64)
        op = i.op
        if op == BPF_MOV:
            return [pre + asm(self._mov(i, is64, dst, src))]
        if op == BPF_DIV:
            return [pre + asm(f"{'sdiv' if i.off else 'udiv'} {dst}, {dst}, {src}")]
        if op == BPF_MOD:
            t = r("x11")
            return [pre + asm(f"{'sdiv' if i.off else 'udiv'} {t}, {dst}, {src}; "
                              f"msub {dst}, {t}, {src}, {dst}")]
        return [pre + asm(f"{_ALU[op]} {dst}, {dst}, {src}")]

    @staticmethod
    def _alu_imm(op: int, dst: str, imm: int, is64: bool) -> bytes | None:
        """The one-instruction forms of build_insn's BPF_K cases: shifts, ADD/SUB with an
        imm12 (shifted or not, negated into the other op: emit_a64_add_i), AND/ORR/EOR
        with a logical immediate (A64_AND_I etc.); None: the immediate goes to x10 first."""
        if op in (BPF_LSH, BPF_RSH, BPF_ARSH):
            n = imm & (63 if is64 else 31)
            return asm(f"{_ALU[op]} {dst}, {dst}, #{n}" if n else f"mov {dst}, {dst}")
        if op in (BPF_ADD, BPF_SUB):
            other = "sub" if op == BPF_ADD else "add"
            if is_addsub_imm(imm):
                return asm(f"{_ALU[op]} {dst}, {dst}, #{imm & 0xFFFFFFFF:#x}")
            if is_addsub_imm(-imm):
                return asm(f"{other} {dst}, {dst}, #{-imm & 0xFFFFFFFF:#x}")
        if op in (BPF_AND, BPF_OR, BPF_XOR):
            bits = 64 if is64 else 32
            if is_logical_imm(imm, bits):
                return asm(f"{_ALU[op]} {dst}, {dst}, #{imm & ((1 << bits) - 1):#x}")
        return None

    _alu64 = _alu

    @staticmethod
    def _mov(i, is64: bool, dst: str, src: str) -> str:
        if i.off == 8:
            return f"sxtb {dst}, {w(src)}"
        if i.off == 16:
            return f"sxth {dst}, {w(src)}"
        if i.off == 32:
            return f"sxtw {dst}, {w(src)}"
        return f"mov {dst}, {src}"

    def _neg(self, c: InsnCtx) -> list[Piece]:
        d = w(REGS[c.insn.dst_reg])
        return [asm(f"neg {d}, {d}")]

    def _neg64(self, c: InsnCtx) -> list[Piece]:
        d = REGS[c.insn.dst_reg]
        return [asm(f"neg {d}, {d}")]

    def _end(self, c: InsnCtx) -> list[Piece]:
        i, d = c.insn, REGS[c.insn.dst_reg]
        swap = i.cls == BPF_ALU64 or i.code & BPF_TO_BE
        if not swap:
            return [{16: asm(f"uxth {w(d)}, {w(d)}"), 32: asm(f"mov {w(d)}, {w(d)}"),
                     64: b""}[i.imm]]
        return [{16: asm(f"rev16 {w(d)}, {w(d)}; uxth {w(d)}, {w(d)}"),
                 32: asm(f"rev {w(d)}, {w(d)}"), 64: asm(f"rev {d}, {d}")}[i.imm]]

    @staticmethod
    def _mem(op: str, rt: str, base: int, off: int, size: int, tmp: str) -> bytes:
        """A load or store as the kernel's build_insn emits it: from the BPF frame pointer
        through sp with off + the stack size (the frame's bottom is sp), else from the
        register; one LDR/STR (unsigned offset) when is_lsi_offset reaches it, else ``tmp``
        = off and the register-offset form from the register itself."""
        reg = REGS[base]
        adj_base, adj = ("sp", off + MAX_BPF_STACK) if base == BPF_REG_FP else (reg, off)
        if is_lsi_offset(adj, _SCALE[size]):
            return asm(f"{op} {rt}, [{adj_base}, #{adj}]")
        return mov_i(tmp, off) + asm(f"{op} {rt}, [{reg}, {tmp}]")

    def _ldx(self, c: InsnCtx) -> list[Piece]:
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        d = REGS[i.dst_reg]
        code = self._mem(_LD[size], d if size == 8 else w(d), i.src_reg, i.off, size, "x10")
        return self._probe(c, d, code)

    def _ldxsx(self, c: InsnCtx) -> list[Piece]:
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        d = REGS[i.dst_reg]
        return self._probe(c, d, self._mem(_LDSX[size], d, i.src_reg, i.off, size, "x10"))

    @staticmethod
    def _probe(c: InsnCtx, d: str, code: bytes) -> list[Piece]:
        if not c.probe:
            return [code]
        return [code[:-4], Probe(d), code[-4:]]      # the load is the last word

    def _st(self, c: InsnCtx) -> list[Piece]:
        """The immediate in x10 (emit_a64_mov_i), the offset if needed in x11."""
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        reg = "x10" if size == 8 else "w10"
        return [mov_i("x10", i.imm) + self._mem(_ST[size], reg, i.dst_reg, i.off, size, "x11")]

    def _stx(self, c: InsnCtx) -> list[Piece]:
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        s = REGS[i.src_reg]
        return [self._mem(_ST[size], s if size == 8 else w(s), i.dst_reg, i.off, size, "x10")]

    def _ea(self, base: str, off: int) -> bytes:
        """x10 = base + off (the atomics and acquire/release take no offset)."""
        if 0 <= off < 4096:
            return asm(f"add x10, {base}, #{off}")
        if -4096 < off < 0:
            return asm(f"sub x10, {base}, #{-off}")
        return mov_i("x10", off) + asm(f"add x10, {base}, x10")

    def _atomic(self, c: InsnCtx) -> list[Piece]:
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        dst, src, op = REGS[i.dst_reg], REGS[i.src_reg], i.imm
        r = (lambda x: x) if size == 8 else w
        sfx = _SFX[size]
        if op == BPF_LOAD_ACQ:
            return [self._ea(src, i.off) + asm(f"ldar{sfx} {r(dst) if size == 8 else w(dst)}, [x10]")]
        if op == BPF_STORE_REL:
            return [self._ea(dst, i.off) + asm(f"stlr{sfx} {r(src) if size == 8 else w(src)}, [x10]")]
        loop = object()
        if op == BPF_CMPXCHG:
            out = object()
            return [self._ea(dst, i.off) + asm(f"mov x12, x7"), Mark(loop),
                    asm(f"ldxr {r('x7')}, [x10]; eor {r('x11')}, {r('x7')}, {r('x12')}"),
                    Branch("cbnz", out, reg=r("x11")),
                    asm(f"stlxr w13, {r(src)}, [x10]"), Branch("cbnz", loop, reg="w13"),
                    asm("dmb ish"), Mark(out)]
        if op == BPF_XCHG:
            return [self._ea(dst, i.off), Mark(loop),
                    asm(f"ldxr {r('x11')}, [x10]; stlxr w13, {r(src)}, [x10]"),
                    Branch("cbnz", loop, reg="w13"), asm(f"dmb ish; mov {r(src)}, {r('x11')}")]
        mn = _ALU[op & ~BPF_FETCH]
        body: list[Piece] = [self._ea(dst, i.off), Mark(loop),
                asm(f"ldxr {r('x11')}, [x10]; {mn} {r('x12')}, {r('x11')}, {r(src)}; "
                    f"stlxr w13, {r('x12')}, [x10]" if op & BPF_FETCH else
                    f"ldxr {r('x11')}, [x10]; {mn} {r('x11')}, {r('x11')}, {r(src)}; "
                    f"stxr w13, {r('x11')}, [x10]"),
                Branch("cbnz", loop, reg="w13")]
        if op & BPF_FETCH:
            body.append(asm(f"dmb ish; mov {r(src)}, {r('x11')}"))
        return body

    def _lddw(self, c: InsnCtx) -> list[Piece]:
        return [mov_i64(REGS[c.insn.dst_reg], c.value)]

    def _ld_packet(self, c: InsnCtx) -> list[Piece]:
        i = c.insn
        load = mov_i("x9", i.imm, False) if c.kind == "ldabs" else \
            mov_i("x10", i.imm, False) + asm(f"add w9, {w(REGS[i.src_reg])}, w10")
        ok = object()
        return [load, Branch("call", c.stub), Branch("cbnz", ok, reg="x9"),
                asm("mov x7, #0"), Branch("jmp", c.exit_label), Mark(ok)]

    _ldabs = _ld_packet
    _ldind = _ld_packet

    @staticmethod
    def back_edge(c: InsnCtx) -> list[Piece]:
        """A backward branch charges the run's budget (x27, unused by the kernel's
        map); at zero the budget trampoline ends the run."""
        if not c.stub:
            return []
        go_on = object()     # B.cond reaches 1 MiB only: branch over a B to the trampoline
        return [asm("subs x27, x27, #1"), Branch("jcc", go_on, "hs"), Branch("jmp", c.stub),
                Mark(go_on)]

    def _jmp(self, c: InsnCtx) -> list[Piece]:
        """CMP (or CMN with the negated immediate) / TST as build_insn emits them: the
        immediate forms when is_addsub_imm / a logical immediate take it."""
        i = c.insn
        is64 = i.cls != BPF_JMP32
        r = (lambda x: x) if is64 else w
        dst = r(REGS[i.dst_reg])
        cmp = "tst" if i.op == BPF_JSET else "cmp"
        bits = 64 if is64 else 32
        if i.is_reg_src:
            code = asm(f"{cmp} {dst}, {r(REGS[i.src_reg])}")
        elif cmp == "cmp" and is_addsub_imm(i.imm):
            code = asm(f"cmp {dst}, #{i.imm & 0xFFFFFFFF:#x}")
        elif cmp == "cmp" and is_addsub_imm(-i.imm):
            code = asm(f"cmn {dst}, #{-i.imm & 0xFFFFFFFF:#x}")
        elif cmp == "tst" and is_logical_imm(i.imm, bits):
            code = asm(f"tst {dst}, #{i.imm & ((1 << bits) - 1):#x}")
        else:
            code = mov_i("x10", i.imm, is64) + asm(f"{cmp} {dst}, {r('x10')}")
        return self.back_edge(c) + [code, Branch("jcc", c.target(i.off), _JCC[i.op])]

    _jmp32 = _jmp

    def _ja(self, c: InsnCtx) -> list[Piece]:
        return self.back_edge(c) + [Branch("jmp", c.target(c.insn.off))]

    def _ja32(self, c: InsnCtx) -> list[Piece]:
        return self.back_edge(c) + [Branch("jmp", c.target(c.insn.imm))]

    def _call(self, c: InsnCtx) -> list[Piece]:
        if c.insn.src_reg == 1:
            return [Branch("call", ("func", c.idx + 1 + c.insn.imm)), asm("mov x7, x0")]
        return [Branch("call", c.stub), asm("mov x7, x0")]

    def _callx(self, c: InsnCtx) -> list[Piece]:
        return [asm(f"mov x9, {REGS[c.insn.dst_reg]}"), Branch("call", c.stub),
                asm("mov x7, x0")]

    def _tail_call(self, c: InsnCtx) -> list[Piece]:
        """emit_bpf_tail_call: count < MAX_TAIL_CALL_CNT, the target looked up (bounds,
        NULL) by the trampoline into x9, count++, drop this frame, branch."""
        skip = object()
        return [mov_i64("x10", c.value) + asm(f"ldr w11, [x10]; cmp w11, #{MAX_TAIL_CALL_CNT}"),
                Branch("jcc", skip, "hs"), Branch("call", c.stub), Branch("cbz", skip, reg="x9"),
                asm("ldr w11, [x10]; add w11, w11, #1; str w11, [x10]") + self.teardown(c.used)
                + asm("br x9"), Mark(skip)]

    @staticmethod
    def tail_lookup(table: int, entries: int, slow: int) -> list[Piece]:
        """A prog array's lookup for emit_bpf_tail_call, called with r2 (x1) = the array
        (the call site names it), r3 (w2) = the index: AX (x9) = the entry's image, 0
        past the end or for none (the u64 table at `table`); an entry of 1 (not JITed
        yet) goes to the host trampoline `slow` (B: B.cond reaches 1 MiB only). Clobbers
        x3 (r4), as a call may."""
        miss, fast = object(), object()
        return [mov_i64("x3", entries) + asm("cmp w2, w3"), Branch("jcc", miss, "hs"),
                mov_i64("x3", table) + asm("ldr x9, [x3, w2, uxtw #3]; cmp x9, #1"),
                Branch("jcc", fast, "ne"), Branch("jmp", slow), Mark(fast), asm("ret"),
                Mark(miss), asm("mov x9, #0; ret")]

    def _exit(self, c: InsnCtx) -> list[Piece]:
        return [Branch("jmp", c.exit_label)]


EMITTER = Arm64Jit()
