"""The reference interpreter (kernel/bpf/core.c ___bpf_prog_run).

One instruction at a time, dispatched on the opcode through ``HANDLERS``.
It is the oracle the compiled path (jit.py) is tested against, so it
favours being obviously right over being fast. The edge semantics are the
RFC 9669 ones: division by zero gives 0 (modulo leaves the dividend), the
signed INT_MIN / -1 overflow wraps, shift amounts are masked, 32-bit
operations zero-extend, immediates are sign-extended for 64-bit operations.

Each BPF-to-BPF call gets its own register file (r1-r5 copied in, r0
copied out) and its own 512-byte stack, as the kernel's interpreter does;
a tail call replaces the running program in the current frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .disasm import format_insn
from .errors import BpfError, BpfRuntimeError
from .helpers import BpfFuncProto
from .isa import (
    BPF_ADD, BPF_ALU64, BPF_AND, BPF_ARSH, BPF_CMPXCHG, BPF_DIV,
    BPF_FETCH, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JLE, BPF_JLT, BPF_JMP32, BPF_JNE,
    BPF_JSET, BPF_JSGE, BPF_JSGT, BPF_JSLE, BPF_JSLT, BPF_LOAD_ACQ, BPF_LSH,
    BPF_MOD, BPF_MOV, BPF_MUL, BPF_OR, BPF_PSEUDO_BTF_ID, BPF_PSEUDO_FUNC,
    BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE,
    BPF_PSEUDO_MAP_VALUE, BPF_RSH, BPF_STORE_REL, BPF_SUB, BPF_TO_BE, BPF_XCHG,
    BPF_XOR, OPCODES, SIZE_BYTES, U32, U64, Insn, lddw_imm64,
)
from .memory import MemoryFault
from .runtime import BpfRun, GuestFault, ProgramExit

if TYPE_CHECKING:
    from .program import BpfProg


# --- ALU semantics ---------------------------------------------------------

def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) else v


def _sdiv(a: int, b: int, bits: int) -> int:
    sa, sb = _signed(a, bits), _signed(b, bits)
    if sb == 0:
        return 0
    q = abs(sa) // abs(sb)
    return (-q if (sa < 0) != (sb < 0) else q) & ((1 << bits) - 1)


def _smod(a: int, b: int, bits: int) -> int:
    sa, sb = _signed(a, bits), _signed(b, bits)
    if sb == 0:
        return a
    r = abs(sa) % abs(sb)
    return (-r if sa < 0 else r) & ((1 << bits) - 1)


def _movsx(b: int, off: int, bits: int) -> int:
    if off == 0:
        return b
    return _signed(b & ((1 << off) - 1), off) & ((1 << bits) - 1)


def alu(op: int, off: int, a: int, b: int, bits: int) -> int:
    """dst op= src on ``bits``-wide unsigned operands (already masked)."""
    mask = (1 << bits) - 1
    if op == BPF_ADD:
        return (a + b) & mask
    if op == BPF_SUB:
        return (a - b) & mask
    if op == BPF_MUL:
        return (a * b) & mask
    if op == BPF_DIV:
        return _sdiv(a, b, bits) if off else (a // b if b else 0)
    if op == BPF_MOD:
        return _smod(a, b, bits) if off else (a % b if b else a)
    if op == BPF_OR:
        return a | b
    if op == BPF_AND:
        return a & b
    if op == BPF_XOR:
        return a ^ b
    if op == BPF_LSH:
        return (a << (b & (bits - 1))) & mask
    if op == BPF_RSH:
        return a >> (b & (bits - 1))
    if op == BPF_ARSH:
        return (_signed(a, bits) >> (b & (bits - 1))) & mask
    if op == BPF_MOV:
        return _movsx(b, off, bits)
    raise AssertionError(f"alu op {op:#x}")


def bswap(v: int, width: int) -> int:
    return int.from_bytes((v & ((1 << width) - 1)).to_bytes(width // 8, "little"), "big")


_CONDITIONS: dict[int, Callable[[int, int, int], bool]] = {
    BPF_JEQ: lambda a, b, bits: a == b,
    BPF_JNE: lambda a, b, bits: a != b,
    BPF_JGT: lambda a, b, bits: a > b,
    BPF_JGE: lambda a, b, bits: a >= b,
    BPF_JLT: lambda a, b, bits: a < b,
    BPF_JLE: lambda a, b, bits: a <= b,
    BPF_JSET: lambda a, b, bits: bool(a & b),
    BPF_JSGT: lambda a, b, bits: _signed(a, bits) > _signed(b, bits),
    BPF_JSGE: lambda a, b, bits: _signed(a, bits) >= _signed(b, bits),
    BPF_JSLT: lambda a, b, bits: _signed(a, bits) < _signed(b, bits),
    BPF_JSLE: lambda a, b, bits: _signed(a, bits) <= _signed(b, bits),
}


def atomic(op: int, old: int, src: int, bits: int) -> int:
    """The value an atomic read-modify-write stores."""
    base = op & ~BPF_FETCH
    if op == BPF_XCHG:
        return src
    return alu(base, 0, old, src & ((1 << bits) - 1), bits)


def unexpected(e: Exception) -> str:
    """How an exception that is not the machine's own is reported."""
    return f"unexpected {type(e).__name__} in a helper or the machine: {e}"


# --- the machine ---------------------------------------------------------------

@dataclass
class Frame:
    """A caller's saved state across a BPF-to-BPF call."""

    regs: list[int]
    ret_pc: int
    prog: "BpfProg"


class Interpreter:
    """Runs one program. Attributes: ``regs``, ``pc``, ``prog``, ``frames``."""

    def __init__(self, run: BpfRun, helpers: dict[int, BpfFuncProto]):
        self.run = run
        self.helpers = helpers
        self.prog = run.prog
        self.regs = [0] * 11
        self.pc = 0
        self.frames: list[Frame] = []
        self.result: int | None = None

    def execute(self, r1: int, r2: int = 0) -> int:
        self.regs[1], self.regs[2] = r1, r2
        self.regs[10] = self.run.new_stack()
        return self.resume()

    def resume(self, catch_exit: bool = True) -> int:
        """Run from ``pc`` with the current registers until the program ends.
        The compiled path resumes here to stop at exactly the instruction
        that exhausts the budget; it wants a failed LD_ABS passed up
        (``catch_exit=False``)."""
        run = self.run
        try:
            while self.result is None:
                if run.insn_count >= run.budget:
                    self._fail(f"instruction budget of {run.budget} exhausted")
                run.insn_count += 1
                insn = self.prog.insns[self.pc]
                HANDLERS[insn.code](self, insn)
        except ProgramExit as e:
            if not catch_exit:
                raise
            return e.r0
        except (MemoryFault, GuestFault) as e:
            self._fail(str(e))
        except BpfRuntimeError as e:
            if e.pc is None:
                self._fail(e.reason)
            raise
        except BpfError:
            raise
        except Exception as e:  # a helper's bug must not take the host down
            self._fail(unexpected(e))
        return self.result

    def _fail(self, reason: str) -> None:
        insns = self.prog.insns
        insn = insns[self.pc]
        second = insns[self.pc + 1] if self.pc + 1 < len(insns) else None
        raise BpfRuntimeError(reason, self.pc, format_insn(insn, second), self.prog.name)

    # -- operand helpers --
    def _src(self, insn: Insn, bits: int) -> int:
        if insn.is_reg_src:
            return self.regs[insn.src_reg] & ((1 << bits) - 1)
        return insn.imm & ((1 << bits) - 1)  # sign-extends for 64 bits

    def _jump(self, offset: int) -> None:
        self.pc += 1 + offset


# --- handlers, one per instruction kind -----------------------------------------

def _do_alu(vm: Interpreter, insn: Insn) -> None:
    bits = 64 if insn.cls == BPF_ALU64 else 32
    a = vm.regs[insn.dst_reg] & ((1 << bits) - 1)
    vm.regs[insn.dst_reg] = alu(insn.op, insn.off, a, vm._src(insn, bits), bits)
    vm.pc += 1


def _do_neg(vm: Interpreter, insn: Insn) -> None:
    bits = 64 if insn.cls == BPF_ALU64 else 32
    vm.regs[insn.dst_reg] = -vm.regs[insn.dst_reg] & ((1 << bits) - 1)
    vm.pc += 1


def _do_end(vm: Interpreter, insn: Insn) -> None:
    v, width = vm.regs[insn.dst_reg], insn.imm
    swap = insn.cls == BPF_ALU64 or insn.code & BPF_TO_BE
    vm.regs[insn.dst_reg] = bswap(v, width) if swap else v & ((1 << width) - 1)
    vm.pc += 1


def _do_ldx(vm: Interpreter, insn: Insn) -> None:
    size = SIZE_BYTES[insn.size]
    v = vm.run.mem.load((vm.regs[insn.src_reg] + insn.off) & U64, size)
    if OPCODES[insn.code].kind == "ldxsx":
        v = _signed(v, size * 8) & U64
    vm.regs[insn.dst_reg] = v
    vm.pc += 1


def _do_st(vm: Interpreter, insn: Insn) -> None:
    addr = (vm.regs[insn.dst_reg] + insn.off) & U64
    value = insn.imm if OPCODES[insn.code].kind == "st" else vm.regs[insn.src_reg]
    vm.run.mem.store(addr, SIZE_BYTES[insn.size], value)
    vm.pc += 1


def _do_atomic(vm: Interpreter, insn: Insn) -> None:
    size = SIZE_BYTES[insn.size]
    bits, mem, op = size * 8, vm.run.mem, insn.imm
    if op == BPF_LOAD_ACQ:
        vm.regs[insn.dst_reg] = mem.load((vm.regs[insn.src_reg] + insn.off) & U64, size)
    elif op == BPF_STORE_REL:
        mem.store((vm.regs[insn.dst_reg] + insn.off) & U64, size, vm.regs[insn.src_reg])
    else:
        addr = (vm.regs[insn.dst_reg] + insn.off) & U64
        old = mem.load(addr, size)
        if op == BPF_CMPXCHG:
            if old == vm.regs[0] & ((1 << bits) - 1):
                mem.store(addr, size, vm.regs[insn.src_reg])
            vm.regs[0] = old
        else:
            mem.store(addr, size, atomic(op, old, vm.regs[insn.src_reg], bits))
            if op & BPF_FETCH:
                vm.regs[insn.src_reg] = old
    vm.pc += 1


def _do_lddw(vm: Interpreter, insn: Insn) -> None:
    second = vm.prog.insns[vm.pc + 1]
    vm.regs[insn.dst_reg] = pseudo_value(vm.run, vm.prog, insn, second, vm.pc)
    vm.pc += 2


def pseudo_value(run: BpfRun, prog: "BpfProg", insn: Insn, second: Insn, pc: int) -> int:
    """The value an lddw loads, resolving its pseudo source."""
    src = insn.src_reg
    if src == 0:
        return lddw_imm64(insn, second)
    if src == BPF_PSEUDO_FUNC:
        return run.func_ptr(pc + 1 + insn.imm)
    if src == BPF_PSEUDO_BTF_ID:
        raise BpfRuntimeError("kernel variables (BPF_PSEUDO_BTF_ID) do not exist here")
    m = prog.map_for(insn)
    if src in (BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX):
        return run.map_ptr(m)
    assert src in (BPF_PSEUDO_MAP_VALUE, BPF_PSEUDO_MAP_IDX_VALUE)
    return run.global_data_ptr(m, second.imm & U32)


def _do_ld_packet(vm: Interpreter, insn: Insn) -> None:
    size = SIZE_BYTES[insn.size]
    off = insn.imm if OPCODES[insn.code].kind == "ldabs" else vm.regs[insn.src_reg] + insn.imm
    vm.regs[0] = load_packet(vm.run, off & U32, size)
    vm.pc += 1


def load_packet(run: BpfRun, off: int, size: int) -> int:
    """Legacy LD_ABS/LD_IND: a big-endian load from the packet; out of range
    ends the program with r0 = 0, as the kernel does."""
    packet = run.packet if run.packet is not None else run.env.packet
    if packet is None:
        packet = run.mem.regions[run.ctx_addr >> 32].data
    if off + size > len(packet):
        raise ProgramExit(0)
    return int.from_bytes(packet[off:off + size], "big")


def _do_jmp(vm: Interpreter, insn: Insn) -> None:
    bits = 32 if insn.cls == BPF_JMP32 else 64
    a = vm.regs[insn.dst_reg] & ((1 << bits) - 1)
    if _CONDITIONS[insn.op](a, vm._src(insn, bits), bits):
        vm._jump(insn.off)
    else:
        vm.pc += 1


def _do_ja(vm: Interpreter, insn: Insn) -> None:
    vm._jump(insn.off if insn.cls != BPF_JMP32 else insn.imm)


def _call_helper(vm: Interpreter, func_id: int) -> None:
    proto = vm.helpers.get(func_id)
    if proto is None:
        raise BpfRuntimeError(f"invalid func unknown#{func_id}")
    r = vm.regs
    vm.regs[0] = proto.impl(vm.run, r[1], r[2], r[3], r[4], r[5]) & U64
    vm.pc += 1
    target = vm.run.pending_tail_call
    if target is not None:
        vm.run.pending_tail_call = None
        _enter_tail_call(vm, target, r[1])


def _enter_tail_call(vm: Interpreter, target: "BpfProg", ctx: int) -> None:
    target.ensure_loaded()
    vm.prog = vm.run.prog = target
    vm.run.bind_maps(target)
    vm.regs = [0] * 11
    vm.regs[1] = ctx
    vm.regs[10] = vm.run.new_stack()
    vm.pc = 0


def _do_call(vm: Interpreter, insn: Insn) -> None:
    if insn.src_reg == 1:
        vm.frames.append(Frame(vm.regs, vm.pc + 1, vm.prog))
        vm.run.depth += 1
        regs = [0] * 11
        regs[1:6] = vm.regs[1:6]
        regs[10] = vm.run.new_stack()
        vm.regs = regs
        vm._jump(insn.imm)
    elif insn.src_reg == 0:
        _call_helper(vm, insn.imm)
    else:
        raise BpfRuntimeError(f"kfunc calls (btf id {insn.imm}) are not supported")


def _do_callx(vm: Interpreter, insn: Insn) -> None:
    _call_helper(vm, vm.regs[insn.dst_reg])


def _do_exit(vm: Interpreter, insn: Insn) -> None:
    if not vm.frames:
        vm.result = vm.regs[0]
        return
    frame = vm.frames.pop()
    frame.regs[0] = vm.regs[0]
    vm.regs, vm.pc, vm.prog = frame.regs, frame.ret_pc, frame.prog
    vm.run.prog = frame.prog
    vm.run.depth -= 1


_BY_KIND: dict[str, Callable[[Interpreter, Insn], None]] = {
    "alu": _do_alu, "alu64": _do_alu, "neg": _do_neg, "neg64": _do_neg, "end": _do_end,
    "ldx": _do_ldx, "ldxsx": _do_ldx, "st": _do_st, "stx": _do_st, "atomic": _do_atomic,
    "lddw": _do_lddw, "ldabs": _do_ld_packet, "ldind": _do_ld_packet,
    "jmp": _do_jmp, "jmp32": _do_jmp, "ja": _do_ja, "ja32": _do_ja,
    "call": _do_call, "callx": _do_callx, "exit": _do_exit,
}
HANDLERS: dict[int, Callable[[Interpreter, Insn], None]] = {
    code: _BY_KIND[spec.kind] for code, spec in OPCODES.items()}
