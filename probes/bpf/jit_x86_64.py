"""The x86-64 BPF JIT (arch/x86/net/bpf_jit_comp.c): one BPF instruction at a time.

Registers as the kernel maps them: r0 rax, r1-r5 rdi rsi rdx rcx r8 (the SysV argument
registers, so a helper call needs no moves), r6-r9 rbx r13 r14 r15, the frame pointer
rbp, AX r10; r11 and r9 are scratch. Prologue ``push rbp; mov rbp, rsp; sub rsp, 512``
then the callee-saved registers the function uses (detect_reg_usage); the epilogue pops
them, ``leave; ret``. Loads and stores are one ``mov`` with the BPF offset as the
displacement (stack slots from rbp); division saves only the rax and rdx it does not
write, and shifts by a register are SHLX/SHRX/SARX, as the kernel emits them with BMI2.

Straight instructions go through keystone (exact, cached per text); branches are encoded
here in their rel32 forms so an instruction's size never depends on where its target is
(the kernel instead re-runs passes until short jumps converge). The divide and modulo
guards are the ones the kernel's verifier patches in (do_misc_fixups): x / 0 = 0,
x % 0 = x, signed x / -1 = -x and x % -1 = 0, so ``div``/``idiv`` never raise #DE.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from typing import TYPE_CHECKING

import keystone

from .errors import BpfError
from .isa import (
    BPF_ADD, BPF_ALU64, BPF_AND, BPF_ARSH, BPF_CMPXCHG, BPF_DIV, BPF_FETCH, BPF_JEQ,
    BPF_JGE, BPF_JGT, BPF_JLE, BPF_JLT, BPF_JMP32, BPF_JNE, BPF_JSET, BPF_JSGE, BPF_JSGT,
    BPF_JSLE, BPF_JSLT, BPF_LOAD_ACQ, BPF_LSH, BPF_MOD, BPF_MOV, BPF_MUL, BPF_OR, BPF_RSH,
    BPF_STORE_REL, BPF_SUB, BPF_TO_BE, BPF_XCHG, BPF_XOR, MAX_BPF_STACK, MAX_TAIL_CALL_CNT,
    SIZE_BYTES, sext32,
)
from .jit_guest import Branch, InsnCtx, Mark, Piece, Probe

if TYPE_CHECKING:
    from emu.machine import Machine

REGS = ("rax", "rdi", "rsi", "rdx", "rcx", "r8", "rbx", "r13", "r14", "r15", "rbp", "r10")
AX, TMP, TMP2 = "r10", "r11", "r9"
CALLEE_SAVED = ("rbx", "r13", "r14", "r15")
ALL_CALLEE = frozenset(range(6, 10))


def _saved(used: frozenset[int]) -> tuple[str, ...]:
    """The callee-saved machine registers of BPF r6-r9 in ``used`` (detect_reg_usage)."""
    return tuple(r for bpf, r in zip(range(6, 10), CALLEE_SAVED) if bpf in used)
_SUB = {  # 64-bit name -> (32, 16, 8)
    "rax": ("eax", "ax", "al"), "rbx": ("ebx", "bx", "bl"), "rcx": ("ecx", "cx", "cl"),
    "rdx": ("edx", "dx", "dl"), "rsi": ("esi", "si", "sil"), "rdi": ("edi", "di", "dil"),
    "rbp": ("ebp", "bp", "bpl"),
    **{f"r{i}": (f"r{i}d", f"r{i}w", f"r{i}b") for i in range(8, 16)},
}
_PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword"}
_JCC = {BPF_JEQ: "e", BPF_JNE: "ne", BPF_JGT: "a", BPF_JGE: "ae", BPF_JLT: "b",
        BPF_JLE: "be", BPF_JSGT: "g", BPF_JSGE: "ge", BPF_JSLT: "l", BPF_JSLE: "le",
        BPF_JSET: "ne"}
_CC = {"o": 0, "no": 1, "b": 2, "ae": 3, "e": 4, "ne": 5, "be": 6, "a": 7, "s": 8, "ns": 9,
       "p": 10, "np": 11, "l": 12, "ge": 13, "le": 14, "g": 15}
_ALU = {BPF_ADD: "add", BPF_SUB: "sub", BPF_OR: "or", BPF_AND: "and", BPF_XOR: "xor"}
_SHIFT = {BPF_LSH: "shl", BPF_RSH: "shr", BPF_ARSH: "sar"}
_SHIFTX = {"shl": "shlx", "shr": "shrx", "sar": "sarx"}

_KS = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)


@lru_cache(maxsize=1 << 16)
def asm(text: str) -> bytes:
    """Position-independent instructions (no branches) to bytes."""
    try:
        enc, _ = _KS.asm(text, 0)
    except keystone.KsError as e:
        raise AssertionError(f"x86 JIT emitted {text!r}: {e}") from None
    return bytes(enc or b"")


def r32(r: str) -> str:
    return _SUB[r][0]


def r16(r: str) -> str:
    return _SUB[r][1]


def r8(r: str) -> str:
    return _SUB[r][2]


def sized(r: str, size: int) -> str:
    return {8: r, 4: r32(r), 2: r16(r), 1: r8(r)}[size]


def mem(size: int, base: str, off: int) -> str:
    sign = "+" if off >= 0 else "-"
    return f"{_PTR[size]} ptr [{base} {sign} {abs(off)}]"


class X86Jit:
    arch = "x86_64"
    reg_names = REGS
    helper_ret = "rax"
    budget_reg = "r12"
    stub_code = b"\x90\xc3"  # nop; ret (a host entry on the nop)

    # -- branches --
    def branch_size(self, b: Branch) -> int:
        return 6 if b.op == "jcc" else 5

    def encode_branch(self, b: Branch, at: int, target: int) -> bytes:
        size = self.branch_size(b)
        rel = target - (at + size)
        if not -(1 << 31) <= rel < (1 << 31):
            raise BpfError("JIT: a branch past rel32 range")
        if b.op == "jcc":
            return bytes((0x0F, 0x80 | _CC[b.cond])) + struct.pack("<i", rel)
        return bytes((0xE8 if b.op == "call" else 0xE9,)) + struct.pack("<i", rel)

    def call_size(self) -> int:
        return 5

    def return_address(self, m: "Machine") -> int:
        return int.from_bytes(m.uc.mem_read(m.sp, 8), "little")

    def push_return(self, m: "Machine", sp: int, ret: int) -> int:
        m.memory.write_u64(sp - 8, ret)
        return sp - 8

    # -- frame --
    def prologue(self, used: frozenset[int] = ALL_CALLEE) -> list[Piece]:
        """push_callee_regs: only the callee-saved registers the function uses."""
        text = f"push rbp; mov rbp, rsp; sub rsp, {MAX_BPF_STACK}" + \
            "".join(f"; push {r}" for r in _saved(used))
        return [asm(text)]

    def teardown(self, used: frozenset[int] = ALL_CALLEE) -> bytes:
        return asm("".join(f"pop {r}; " for r in reversed(_saved(used))) + "leave")

    def epilogue(self, used: frozenset[int] = ALL_CALLEE) -> list[Piece]:
        return [self.teardown(used) + asm("ret")]

    # -- instructions --
    def insn(self, c: InsnCtx) -> list[Piece]:
        return getattr(self, "_" + c.kind)(c)

    def _alu(self, c: InsnCtx) -> list[Piece]:
        i = c.insn
        is64 = i.cls == BPF_ALU64
        dst = REGS[i.dst_reg]
        d = dst if is64 else r32(dst)
        x = i.is_reg_src
        src = REGS[i.src_reg] if x else None
        s = (src if is64 else r32(src)) if src else None
        imm = i.imm if is64 else sext32(i.imm)
        op = i.op
        if op in _ALU:
            return [asm(f"{_ALU[op]} {d}, {s if x else imm}")]
        if op == BPF_MUL:
            return [asm(f"imul {d}, {s}" if x else f"imul {d}, {d}, {imm}")]
        if op == BPF_MOV:
            return [asm(self._mov(i, is64, d, dst, src, s, imm))]
        if op in _SHIFT:
            return self._shift(_SHIFT[op], is64, dst, src, imm)
        if op in (BPF_DIV, BPF_MOD):
            return self._divmod(c, is64, dst, src)
        raise AssertionError(f"alu op {op:#x}")

    _alu64 = _alu

    @staticmethod
    def _mov(i, is64: bool, d: str, dst: str, src: str | None, s: str | None, imm: int) -> str:
        if src is None:
            return f"mov {d}, {imm}"
        if i.off == 8:
            return f"movsx {d}, {r8(src)}"
        if i.off == 16:
            return f"movsx {d}, {r16(src)}"
        if i.off == 32:
            return f"movsxd {d}, {r32(src)}"
        return f"mov {d}, {s}"

    def _shift(self, mn: str, is64: bool, dst: str, src: str | None, imm: int) -> list[Piece]:
        """Shifts as the kernel's JIT emits them on a CPU with BMI2 (the modelled ones
        have it): SHLX/SHRX/SARX by a register other than rcx, which needs neither cl nor
        a saved rcx; by rcx itself, the classic form on cl."""
        w = (lambda r: r) if is64 else r32
        if src is None:
            n = imm & (63 if is64 else 31)
            return [asm(f"{mn} {w(dst)}, {n}" if n else f"mov {w(dst)}, {w(dst)}")]
        if src != "rcx":
            return [asm(f"{_SHIFTX[mn]} {w(dst)}, {w(dst)}, {w(src)}")]
        zext = "" if is64 else f"; mov {w(dst)}, {w(dst)}"
        if dst == "rcx":
            return [asm(f"mov r11, rcx; {mn} {w('r11')}, cl; mov rcx, r11{zext}")]
        return [asm(f"{mn} {w(dst)}, cl{zext}")]

    def _divmod(self, c: InsnCtx, is64: bool, dst: str, src: str | None) -> list[Piece]:
        i = c.insn
        w = (lambda r: r) if is64 else r32
        is_div, signed = i.op == BPF_DIV, i.off == 1
        zero: list[Piece] = [asm(f"xor {r32(dst)}, {r32(dst)}")] if is_div else \
            ([] if is64 else [asm(f"mov {r32(dst)}, {r32(dst)}")])
        minus1: list[Piece] = [asm(f"neg {w(dst)}")] if is_div else \
            [asm(f"xor {r32(dst)}, {r32(dst)}")]
        if src is None:
            imm = i.imm if is64 else i.imm & 0xFFFFFFFF
            if i.imm == 0:
                return zero
            if signed and i.imm == -1:
                return minus1
            return self._divide(w, dst, None, imm, is_div, signed, is64)
        done, z, m1 = object(), object(), object()
        out: list[Piece] = [asm(f"test {w(src)}, {w(src)}"), Branch("jcc", z, "e")]
        if signed:
            out += [asm(f"cmp {w(src)}, -1"), Branch("jcc", m1, "e")]
        out += self._divide(w, dst, src, 0, is_div, signed, is64)
        out += [Branch("jmp", done), Mark(z), *zero, Branch("jmp", done)]
        if signed:
            out += [Mark(m1), *minus1]
        return out + [Mark(done)]

    @staticmethod
    def _divide(w, dst: str, src: str | None, imm: int, is_div: bool, signed: bool,
                is64: bool) -> list[Piece]:
        """rdx:rax / src as the kernel's JIT divides: rax and rdx saved around it unless
        they are the destination, the divisor in r11 when it is an immediate or one of
        them, the quotient (rax) or remainder (rdx) moved to the destination."""
        seq = [] if dst == "rax" else ["push rax"]
        seq += [] if dst == "rdx" else ["push rdx"]
        if src is None:
            seq.append(f"mov r11, {imm}" if is64 or imm < 1 << 31 else f"mov r11d, {imm}")
            src = "r11"
        elif src in ("rax", "rdx"):
            seq.append(f"mov r11, {src}")
            src = "r11"
        if dst != "rax":
            seq.append(f"mov {w('rax')}, {w(dst)}")
        seq.append(("cqo" if is64 else "cdq") if signed else "xor edx, edx")
        seq.append(f"{'idiv' if signed else 'div'} {w(src)}")
        res = "rax" if is_div else "rdx"
        if dst != res:
            seq.append(f"mov {w(dst)}, {w(res)}")
        seq += [] if dst == "rdx" else ["pop rdx"]
        seq += [] if dst == "rax" else ["pop rax"]
        return [asm("; ".join(seq))]

    def _neg(self, c: InsnCtx) -> list[Piece]:
        return [asm(f"neg {r32(REGS[c.insn.dst_reg])}")]

    def _neg64(self, c: InsnCtx) -> list[Piece]:
        return [asm(f"neg {REGS[c.insn.dst_reg]}")]

    def _end(self, c: InsnCtx) -> list[Piece]:
        i, dst = c.insn, REGS[c.insn.dst_reg]
        swap = i.cls == BPF_ALU64 or i.code & BPF_TO_BE
        if not swap:
            return [{16: asm(f"movzx {r32(dst)}, {r16(dst)}"), 32: asm(f"mov {r32(dst)}, {r32(dst)}"),
                     64: b""}[i.imm]]
        return [{16: asm(f"ror {r16(dst)}, 8; movzx {r32(dst)}, {r16(dst)}"),
                 32: asm(f"bswap {r32(dst)}"), 64: asm(f"bswap {dst}")}[i.imm]]

    def _ldx(self, c: InsnCtx) -> list[Piece]:
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        dst, src = REGS[i.dst_reg], REGS[i.src_reg]
        m = mem(size, src, i.off)
        text = {1: f"movzx {r32(dst)}, {m}", 2: f"movzx {r32(dst)}, {m}",
                4: f"mov {r32(dst)}, {m}", 8: f"mov {dst}, {m}"}[size]
        out: list[Piece] = [Probe(dst)] if c.probe else []
        return out + [asm(text)]

    def _ldxsx(self, c: InsnCtx) -> list[Piece]:
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        dst, src = REGS[i.dst_reg], REGS[i.src_reg]
        op = "movsxd" if size == 4 else "movsx"
        out: list[Piece] = [Probe(dst)] if c.probe else []
        return out + [asm(f"{op} {dst}, {mem(size, src, i.off)}")]

    def _st(self, c: InsnCtx) -> list[Piece]:
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        imm = i.imm & ((1 << (8 * size)) - 1) if size < 4 else i.imm
        return [asm(f"mov {mem(size, REGS[i.dst_reg], i.off)}, {imm}")]

    def _stx(self, c: InsnCtx) -> list[Piece]:
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        return [asm(f"mov {mem(size, REGS[i.dst_reg], i.off)}, {sized(REGS[i.src_reg], size)}")]

    def _atomic(self, c: InsnCtx) -> list[Piece]:
        i, size = c.insn, SIZE_BYTES[c.insn.size]
        dst, src, op = REGS[i.dst_reg], REGS[i.src_reg], i.imm
        if op == BPF_LOAD_ACQ:
            return self._ldx(InsnCtx(c.idx, type(i)(0x61 | i.size, i.dst_reg, i.src_reg, i.off),
                                     "ldx", c.func))
        if op == BPF_STORE_REL:
            return [asm(f"mov {mem(size, dst, i.off)}, {sized(src, size)}")]
        m, s = mem(size, dst, i.off), sized(src, size)
        if op == BPF_XCHG:
            return [asm(f"xchg {m}, {s}")]
        if op == BPF_CMPXCHG:
            return [asm(f"lock cmpxchg {m}, {s}" + ("" if size == 8 else "; mov eax, eax"))]
        base = op & ~BPF_FETCH
        if op == BPF_ADD | BPF_FETCH:
            return [asm(f"lock xadd {m}, {s}")]
        if not op & BPF_FETCH:
            return [asm(f"lock {_ALU[base]} {m}, {s}")]
        return self._fetch_loop(_ALU[base], size, dst, src, i.off)

    @staticmethod
    def _fetch_loop(mn: str, size: int, dst: str, src: str, off: int) -> list[Piece]:
        """and/or/xor with FETCH: a cmpxchg loop with r0 (rax) saved in AX, as the
        kernel's emit_atomic_fetch does."""
        w = (lambda r: r) if size == 8 else r32
        operand = "r10" if src == "rax" else src
        loop = object()
        out: list[Piece] = [asm(f"lea r9, [{dst} {'+' if off >= 0 else '-'} {abs(off)}]; "
                                f"mov r10, rax; mov {w('rax')}, {mem(size, 'r9', 0)}"),
                            Mark(loop),
                            asm(f"mov r11, rax; {mn} {w('r11')}, {w(operand)}; "
                                f"lock cmpxchg {mem(size, 'r9', 0)}, {w('r11')}"),
                            Branch("jcc", loop, "ne")]
        if src != "rax":
            out.append(asm(f"mov {w(src)}, {w('rax')}; mov rax, r10"))
        return out

    def _lddw(self, c: InsnCtx) -> list[Piece]:
        dst, v = REGS[c.insn.dst_reg], c.value
        if v < 1 << 31:
            return [asm(f"mov {r32(dst)}, {v}")]
        return [asm(f"movabs {dst}, {v}")]

    def _ld_packet(self, c: InsnCtx) -> list[Piece]:
        i = c.insn
        load = f"mov r10d, {i.imm & 0xFFFFFFFF}" if c.kind == "ldabs" else \
            f"mov r10d, {r32(REGS[i.src_reg])}; add r10d, {i.imm}"
        ok = object()
        return [asm(load), Branch("call", c.stub), asm("test r10, r10"), Branch("jcc", ok, "ne"),
                asm("xor eax, eax"), Branch("jmp", c.exit_label), Mark(ok)]

    _ldabs = _ld_packet
    _ldind = _ld_packet

    @staticmethod
    def back_edge(c: InsnCtx) -> list[Piece]:
        """A backward branch charges the run's budget (r12, free in the kernel's map
        but for arenas); at zero the budget trampoline ends the run."""
        return [asm("sub r12, 1"), Branch("jcc", c.stub, "b")] if c.stub else []

    def _jmp(self, c: InsnCtx) -> list[Piece]:
        i = c.insn
        w = (lambda r: r) if i.cls != BPF_JMP32 else r32
        dst = w(REGS[i.dst_reg])
        other = w(REGS[i.src_reg]) if i.is_reg_src else str(i.imm)
        cmp = "test" if i.op == BPF_JSET else "cmp"
        return self.back_edge(c) + [asm(f"{cmp} {dst}, {other}"),
                                    Branch("jcc", c.target(i.off), _JCC[i.op])]

    _jmp32 = _jmp

    def _ja(self, c: InsnCtx) -> list[Piece]:
        return self.back_edge(c) + [Branch("jmp", c.target(c.insn.off))]

    def _ja32(self, c: InsnCtx) -> list[Piece]:
        return self.back_edge(c) + [Branch("jmp", c.target(c.insn.imm))]

    def _call(self, c: InsnCtx) -> list[Piece]:
        if c.insn.src_reg == 1:
            return [Branch("call", ("func", c.idx + 1 + c.insn.imm))]
        return [Branch("call", c.stub)]

    def _callx(self, c: InsnCtx) -> list[Piece]:
        return [asm(f"mov r10, {REGS[c.insn.dst_reg]}"), Branch("call", c.stub)]

    def _tail_call(self, c: InsnCtx) -> list[Piece]:
        """emit_bpf_tail_call_indirect: count < MAX_TAIL_CALL_CNT, the target looked up
        (bounds, NULL) by the trampoline into AX, count++, drop this frame, jump."""
        skip = object()
        return [asm(f"movabs r11, {c.value}; cmp dword ptr [r11], {MAX_TAIL_CALL_CNT}"),
                Branch("jcc", skip, "ae"), Branch("call", c.stub),
                asm("test r10, r10"), Branch("jcc", skip, "e"),
                asm("add dword ptr [r11], 1") + self.teardown(c.used) + asm("jmp r10"), Mark(skip)]

    @staticmethod
    def tail_lookup(table: int, entries: int, slow: int) -> list[Piece]:
        """A prog array's lookup for emit_bpf_tail_call_indirect, called with r2 = the
        array (the call site names it), r3 = the index: AX = the entry's image, 0 past
        the end or for none (the u64 table at `table`); an entry of 1 (not JITed yet)
        jumps to the host trampoline `slow`. Clobbers r0 and r3, as a call may."""
        miss = object()
        return [asm(f"cmp edx, {entries}"), Branch("jcc", miss, "ae"),
                asm(f"mov edx, edx; movabs rax, {table:#x}; mov r10, qword ptr [rax + rdx*8]; "
                    "cmp r10, 1"),
                Branch("jcc", slow, "e"), asm("ret"), Mark(miss), asm("xor r10d, r10d; ret")]

    def _exit(self, c: InsnCtx) -> list[Piece]:
        return [Branch("jmp", c.exit_label)]


EMITTER = X86Jit()
