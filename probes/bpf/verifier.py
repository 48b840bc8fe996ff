"""The verifier (kernel/bpf/verifier.c bpf_check, in its spirit).

First the structural pass of cfg.py, then ``do_check``: an abstract
interpretation of every function that tracks, per register, whether it is
initialised and what it holds (a scalar with a known value or not, a
pointer to the context, the stack, a map value, a map, a ring-buffer
record, a packet), and per 8-byte stack slot what was spilled there. It
refuses what the kernel refuses in the same situations: reading an
uninitialised register (``R3 !read_ok``), writing r10, stack accesses
outside [r10-512, r10), map value accesses outside value_size, loads
through scalars or possibly-NULL pointers, helper arguments of the wrong
kind, maps passed to helpers that cannot take them, writes to a read-only
context.

Where it differs from the kernel: states are merged where control flow
joins (a dataflow analysis) instead of walking every path, so the
analysis is fast and loops need no unrolling, but a value is only known
when all paths agree. Accesses it cannot prove in bounds are checked at
run time (the machine never lets a program touch memory outside its
regions). Reference tracking (ring-buffer records, spin locks) is done at
run time.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Callable, NamedTuple

from .cfg import Cfg, check_structure, successors
from .disasm import format_insn_llvm
from .errors import VerifierError
from .helpers import (
    BPF_FUNC_perf_event_output, BPF_FUNC_tail_call, GPL_COMPATIBLE, BpfArgType as A,
    BpfFuncProto, BpfRetType as R,
)
from .interpreter import alu
from .isa import (
    BPF_ADD, BPF_ALU64, BPF_CMPXCHG, BPF_COMPLEXITY_LIMIT_INSNS, BPF_FETCH, BPF_JEQ,
    BPF_JMP, BPF_JNE, BPF_LOAD_ACQ, BPF_MOV, BPF_PSEUDO_FUNC,
    BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX, BPF_REG_FP, BPF_STORE_REL, BPF_SUB,
    MAX_BPF_STACK, SIZE_BYTES, U64, Insn, lddw_imm64,
)
from .maps import BpfMap
from .prog_types import PACKET_TYPES, BpfProgType

if TYPE_CHECKING:
    from .program import BpfProg


class RegType(StrEnum):
    """enum bpf_reg_type (include/linux/bpf.h) by the kernel's names; each value is how the
    verifier log spells it (reg_type_str: "scalar", "fp", "map_value_or_null", ...).
    UNKNOWN is this verifier's own: paths that joined disagree on the kind."""
    NOT_INIT = "not_init"
    SCALAR_VALUE = "scalar"
    PTR_TO_CTX = "ctx"
    CONST_PTR_TO_MAP = "map_ptr"
    PTR_TO_MAP_VALUE = "map_value"
    PTR_TO_MAP_VALUE_OR_NULL = "map_value_or_null"   # PTR_TO_MAP_VALUE | PTR_MAYBE_NULL
    PTR_TO_STACK = "fp"
    PTR_TO_PACKET = "pkt"
    PTR_TO_PACKET_END = "pkt_end"
    PTR_TO_MEM = "mem"
    PTR_TO_MEM_OR_NULL = "mem_or_null"               # PTR_TO_MEM | PTR_MAYBE_NULL (ringbuf)
    PTR_TO_FUNC = "func"
    PTR_TO_TP_BUFFER = "tp_buffer"                   # a writable raw tracepoint's ctx[0]
    UNKNOWN = "unknown"


T = RegType
_NOT_NULL = {T.PTR_TO_MAP_VALUE_OR_NULL: T.PTR_TO_MAP_VALUE, T.PTR_TO_MEM_OR_NULL: T.PTR_TO_MEM}


class Reg(NamedTuple):
    """The verifier's view of one register (struct bpf_reg_state, reduced).

    ``type`` is a RegType (the kernel's bpf_reg_type; UNKNOWN for a register
    that holds different kinds on different paths). ``val`` is a scalar's value or a pointer's offset (None when not
    known); ``ref`` the map (or record size for mem); ``id`` links copies
    of a maybe-NULL pointer so one NULL check refines them all.
    """

    type: RegType
    val: int | None = None
    ref: object = None
    id: int = 0


NOT_INIT = Reg(T.NOT_INIT)
UNKNOWN = Reg(T.UNKNOWN)
SCALAR = Reg(T.SCALAR_VALUE)
_POINTERS = set(RegType) - {T.NOT_INIT, T.SCALAR_VALUE, T.UNKNOWN}
_MEMORY = {T.PTR_TO_CTX, T.PTR_TO_STACK, T.PTR_TO_MAP_VALUE, T.PTR_TO_MEM, T.PTR_TO_PACKET,
           T.PTR_TO_TP_BUFFER, T.UNKNOWN}


class State(NamedTuple):
    regs: tuple[Reg, ...]
    stack: tuple[tuple[int, Reg], ...]  # spilled registers by frame offset


def _join_reg(a: Reg, b: Reg) -> Reg:
    if a == b:
        return a
    if a.type == T.NOT_INIT or b.type == T.NOT_INIT:
        return NOT_INIT
    if a.type != b.type or a.ref is not b.ref:
        if {a.type, b.type} == {T.PTR_TO_MAP_VALUE_OR_NULL, T.PTR_TO_MAP_VALUE} and a.ref is b.ref:
            return Reg(T.PTR_TO_MAP_VALUE_OR_NULL, None, a.ref, 0)
        return UNKNOWN
    return Reg(a.type, a.val if a.val == b.val else None, a.ref, a.id if a.id == b.id else 0)


def join(a: State, b: State) -> State:
    regs = tuple(_join_reg(x, y) for x, y in zip(a.regs, b.regs))
    bs = dict(b.stack)
    stack = tuple((off, _join_reg(r, bs[off])) for off, r in a.stack if off in bs)
    return State(regs, stack)


@dataclass
class VerifierEnv:
    """struct bpf_verifier_env, reduced: what do_check needs."""

    prog: "BpfProg"
    cfg: Cfg
    log: list[str]
    lenient: bool
    processed: int = 0
    next_id: int = 0
    max_stack: int = 0
    pending_calls: list[tuple[int, "State"]] = field(default_factory=list)


class _Refuse(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _read(st: State, reg: int) -> Reg:
    r = st.regs[reg]
    if r.type == T.NOT_INIT:
        raise _Refuse(f"R{reg} !read_ok")
    return r


def _set(regs: list[Reg], reg: int, value: Reg) -> None:
    if reg == BPF_REG_FP:
        raise _Refuse("frame pointer is read only")
    regs[reg] = value


# --- memory access checks ------------------------------------------------------------

def _check_mem(env: VerifierEnv, ptr: Reg, reg: int, off: int, size: int, write: bool,
               direct: bool = True) -> None:
    """Can [ptr + off, + size) be accessed? Unknown offsets are left to run
    time. Alignment matters only for the program's own loads and stores
    (``direct``), not for buffers handed to helpers."""
    kind = ptr.type
    if kind not in _MEMORY:
        raise _Refuse(f"R{reg} invalid mem access '{kind}'")
    if kind in (T.PTR_TO_CTX, T.UNKNOWN):
        _note_ctx(env, ptr, off, size)
    if kind == T.PTR_TO_STACK and ptr.val is not None:
        start = ptr.val + off
        if start < -MAX_BPF_STACK or start + size > 0:
            verb = "write to" if write else "read from"
            raise _Refuse(f"invalid {verb} stack R{reg} off={start} size={size}")
        if direct and not env.lenient and start % size:
            raise _Refuse(f"misaligned stack access off {start} size {size}")
        env.max_stack = max(env.max_stack, -start)
    elif kind == T.PTR_TO_MAP_VALUE and ptr.val is not None:
        m: BpfMap = ptr.ref  # type: ignore[assignment]
        start = ptr.val + off
        if start < 0 or start + size > m.value_size:
            raise _Refuse(f"invalid access to map value, value_size={m.value_size} "
                          f"off={start} size={size}")
        if write and not m.prog_writable:
            raise _Refuse("write into map forbidden")
    elif kind == T.PTR_TO_MEM and ptr.val is not None and isinstance(ptr.ref, int):
        start = ptr.val + off
        if start < 0 or start + size > ptr.ref:
            raise _Refuse(f"invalid access to memory, mem_size={ptr.ref} off={start} size={size}")
    elif kind == T.PTR_TO_TP_BUFFER:
        _check_tp_buffer(env, ptr, reg, off, size)
    elif kind == T.PTR_TO_CTX:
        if write and not env.prog.type_info.ctx_writable:
            raise _Refuse("invalid bpf_context access (the context is read-only)")
        if ptr.val is None and not env.lenient:
            raise _Refuse(f"variable ctx access R{reg} disallowed")
        info = env.prog.type_info
        rule = info.ctx_access
        if rule is not None and ptr.val is not None and direct:
            refusal = rule(ptr.val + off, size, write)
            if refusal:
                raise _Refuse(refusal)
        if ptr.val is not None:       # aux->max_ctx_offset: raw tracepoint attach checks it
            env.prog.max_ctx_offset = max(env.prog.max_ctx_offset, ptr.val + off + size)
        limit = env.prog.ctx_size or info.ctx_size
        if limit is not None and ptr.val is not None:
            start = ptr.val + off     # the type's is_valid_access: in bounds, size-aligned
            if start < info.ctx_min or start + size > limit or (direct and start % size):
                raise _Refuse(f"invalid bpf_context access off={start} size={size}")


def _note_ctx(env: VerifierEnv, ptr: Reg, off: int, size: int) -> None:
    """Record the 8-byte context slots the program can read (BpfProg.ctx_reads); an
    access the verifier cannot place (a variable offset, a pointer of unknown kind) means
    any of them. An optprobe thunk writes only these slots of its pt_regs frame."""
    reads = env.prog.ctx_reads
    if reads is None:
        return
    if ptr.type != T.PTR_TO_CTX or ptr.val is None:
        env.prog.ctx_reads = None
        return
    start = ptr.val + off
    reads.update(range(start & ~7, start + size, 8))


def _check_tp_buffer(env: VerifierEnv, ptr: Reg, reg: int, off: int, size: int) -> None:
    """check_tp_buffer_access: a constant, non-negative offset; reads and writes both
    raise aux->max_tp_access, which attach holds against the tracepoint's writable_size."""
    if ptr.val is None:
        raise _Refuse(f"R{reg} invalid variable buffer offset: off={off}, var_off=(unknown)")
    start = ptr.val + off
    if start < 0:
        raise _Refuse(f"R{reg} invalid tracepoint buffer access: off={start}, size={size}")
    env.prog.max_tp_access = max(env.prog.max_tp_access, start + size)


def _ctx_load(env: VerifierEnv, ptr: Reg, off: int, size: int) -> Reg:
    """What a context load yields: packet pointers for xdp_md/__sk_buff, the tracepoint
    buffer for a writable raw tracepoint's ctx[0]."""
    if (env.prog.prog_type == BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE
            and ptr.val is not None and ptr.val + off == 0):
        return Reg(T.PTR_TO_TP_BUFFER, 0)
    if env.prog.prog_type in PACKET_TYPES and ptr.val is not None and size == 4:
        field = ptr.val + off
        if env.prog.prog_type == BpfProgType.BPF_PROG_TYPE_XDP:
            return {0: Reg(T.PTR_TO_PACKET, 0), 4: Reg(T.PTR_TO_PACKET_END, 0), 8: Reg(T.PTR_TO_PACKET, 0)}.get(field, SCALAR)
        return {76: Reg(T.PTR_TO_PACKET, 0), 80: Reg(T.PTR_TO_PACKET_END, 0)}.get(field, SCALAR)
    return SCALAR


def _spill(stack: dict[int, Reg], start: int, size: int, value: Reg | None) -> None:
    for off in [o for o in stack if o < start + size and start < o + 8]:
        del stack[off]
    if value is not None and size == 8 and start % 8 == 0:
        stack[start] = value


# --- instruction transfer functions -----------------------------------------------------

def _alu_ptr(env: VerifierEnv, insn: Insn, dst: Reg, src: Reg) -> Reg:
    """Pointer arithmetic: only 64-bit add/sub of a scalar keeps a pointer."""
    if dst.type in (T.PTR_TO_MAP_VALUE_OR_NULL, T.PTR_TO_MEM_OR_NULL):
        raise _Refuse(f"R{insn.dst_reg} pointer arithmetic on {dst.type} prohibited")
    if insn.op in (BPF_ADD, BPF_SUB) and insn.cls == BPF_ALU64 and src.type == T.SCALAR_VALUE:
        if dst.type in (T.CONST_PTR_TO_MAP, T.PTR_TO_FUNC) and not env.lenient:
            raise _Refuse(f"R{insn.dst_reg} pointer arithmetic on {dst.type} prohibited")
        if dst.val is None or src.val is None:
            return Reg(dst.type, None, dst.ref)
        delta = src.val if insn.op == BPF_ADD else -src.val
        delta = delta - (1 << 64) if delta >= 1 << 63 else delta
        return Reg(dst.type, dst.val + delta, dst.ref)
    if insn.op == BPF_SUB and src.type in _POINTERS and insn.cls == BPF_ALU64:
        return SCALAR  # pointer difference (privileged programs may compute it)
    if env.lenient or dst.type == T.UNKNOWN:
        return SCALAR
    if insn.cls != BPF_ALU64:
        raise _Refuse(f"R{insn.dst_reg} 32-bit pointer arithmetic prohibited")
    raise _Refuse(f"R{insn.dst_reg} pointer arithmetic with this operator prohibited")


def _do_alu(env: VerifierEnv, st: State, insn: Insn, kind: str, regs: list[Reg]) -> None:
    bits = 64 if insn.cls == BPF_ALU64 else 32
    mask = (1 << bits) - 1
    if kind in ("neg", "neg64"):
        d = _read(st, insn.dst_reg)
        val = (-d.val) & mask if d.type == T.SCALAR_VALUE and d.val is not None else None
        _set(regs, insn.dst_reg, Reg(T.SCALAR_VALUE, val))
        return
    if kind == "end":
        _read(st, insn.dst_reg)
        _set(regs, insn.dst_reg, SCALAR)
        return
    src = _read(st, insn.src_reg) if insn.is_reg_src else Reg(T.SCALAR_VALUE, insn.imm & mask)
    if insn.op == BPF_MOV:
        if insn.is_reg_src and insn.off == 0 and bits == 64:
            _set(regs, insn.dst_reg, src)
        elif src.type == T.SCALAR_VALUE and src.val is not None:
            _set(regs, insn.dst_reg, Reg(T.SCALAR_VALUE, alu(BPF_MOV, insn.off, 0, src.val & mask, bits)))
        else:
            _set(regs, insn.dst_reg, SCALAR)
        return
    dst = _read(st, insn.dst_reg)
    if dst.type != T.SCALAR_VALUE:
        _set(regs, insn.dst_reg, _alu_ptr(env, insn, dst, src))
    elif src.type != T.SCALAR_VALUE:
        ptr_plus = insn.op == BPF_ADD and bits == 64 and src.type in _MEMORY - {T.UNKNOWN}
        _set(regs, insn.dst_reg, Reg(src.type, None, src.ref) if ptr_plus else SCALAR)
    elif dst.val is not None and src.val is not None:
        _set(regs, insn.dst_reg, Reg(T.SCALAR_VALUE, alu(insn.op, insn.off, dst.val & mask,
                                                   src.val & mask, bits)))
    else:
        _set(regs, insn.dst_reg, SCALAR)


def _do_load(env: VerifierEnv, st: State, insn: Insn, kind: str, regs: list[Reg],
             stack: dict[int, Reg]) -> None:
    size = SIZE_BYTES[insn.size]
    ptr = _read(st, insn.src_reg)
    _check_mem(env, ptr, insn.src_reg, insn.off, size, False)
    value = SCALAR
    if ptr.type == T.PTR_TO_STACK and ptr.val is not None and size == 8 and kind == "ldx":
        value = stack.get(ptr.val + insn.off, SCALAR)
    elif ptr.type == T.PTR_TO_CTX:
        value = _ctx_load(env, ptr, insn.off, size)
    _set(regs, insn.dst_reg, value)


def _do_store(env: VerifierEnv, st: State, insn: Insn, kind: str, stack: dict[int, Reg]) -> None:
    size = SIZE_BYTES[insn.size]
    ptr = _read(st, insn.dst_reg)
    value = _read(st, insn.src_reg) if kind == "stx" else Reg(T.SCALAR_VALUE, insn.imm & U64)
    _check_mem(env, ptr, insn.dst_reg, insn.off, size, True)
    if ptr.type == T.PTR_TO_STACK:
        if ptr.val is None:
            stack.clear()  # a store somewhere in the frame: forget every spill
        else:
            _spill(stack, ptr.val + insn.off, size, value)


def _do_atomic(env: VerifierEnv, st: State, insn: Insn, regs: list[Reg],
               stack: dict[int, Reg]) -> None:
    size = SIZE_BYTES[insn.size]
    if insn.imm == BPF_LOAD_ACQ:
        ptr = _read(st, insn.src_reg)
        _check_mem(env, ptr, insn.src_reg, insn.off, size, False)
        _set(regs, insn.dst_reg, SCALAR)
        return
    ptr = _read(st, insn.dst_reg)
    src = _read(st, insn.src_reg)
    _check_mem(env, ptr, insn.dst_reg, insn.off, size, True)
    if src.type != T.SCALAR_VALUE and src.type != T.UNKNOWN and not env.lenient:
        raise _Refuse(f"R{insn.src_reg} leaks addr into mem")
    if ptr.type == T.PTR_TO_STACK:
        if ptr.val is None:
            stack.clear()
        else:
            _spill(stack, ptr.val + insn.off, size, None)
    if insn.imm == BPF_STORE_REL:
        return
    if insn.imm == BPF_CMPXCHG:
        _read(st, 0)
        _set(regs, 0, SCALAR)
    elif insn.imm & BPF_FETCH:
        _set(regs, insn.src_reg, SCALAR)


def _do_lddw(env: VerifierEnv, insn: Insn, pc: int, regs: list[Reg]) -> None:
    second = env.cfg.insns[pc + 1]
    src = insn.src_reg
    if src == 0:
        value = Reg(T.SCALAR_VALUE, lddw_imm64(insn, second))
    elif src == BPF_PSEUDO_FUNC:
        value = Reg(T.PTR_TO_FUNC, 0)
    else:
        m = env.prog.map_for(insn)
        if src in (BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX):
            value = Reg(T.CONST_PTR_TO_MAP, 0, m)
        else:
            if m.value_size <= second.imm or type(m).__name__ != "ArrayMap":
                raise _Refuse(f"invalid access to map value pointer, value_size={m.value_size} "
                              f"off={second.imm}")
            value = Reg(T.PTR_TO_MAP_VALUE, second.imm, m)
    _set(regs, insn.dst_reg, value)


# --- helper calls ------------------------------------------------------------------

_EXPECTED = "fp, pkt, pkt_meta, map_key, map_value, mem"


def _check_mem_arg(env: VerifierEnv, reg: int, ptr: Reg, size: int | None) -> None:
    if ptr.type == T.SCALAR_VALUE or ptr.type not in _MEMORY:
        raise _Refuse(f"R{reg} type={ptr.type} expected={_EXPECTED}")
    if size is not None and size > 0:
        _check_mem(env, ptr, reg, 0, size, False, direct=False)


def _size_arg(st: State, reg: int, kind: A) -> int | None:
    r = _read(st, reg)
    if r.type not in (T.SCALAR_VALUE, T.UNKNOWN):
        raise _Refuse(f"R{reg} type={r.type} expected=scalar")
    if r.val is not None:
        signed = r.val - (1 << 64) if r.val >> 63 else r.val
        if signed < 0:
            raise _Refuse(f"R{reg} min value is negative, either use unsigned or 'var &= const'")
        if signed == 0 and kind == A.ARG_CONST_SIZE:
            raise _Refuse(f"invalid zero-sized read (R{reg})")
    return r.val


# Helpers whose context argument reads none of it (perf_event_output takes the sample's
# registers from the hit, not through ctx) or whose reads are recorded elsewhere (a tail
# call's target): the program's ctx_reads stay exact.
_CTX_UNREAD = frozenset({BPF_FUNC_tail_call, BPF_FUNC_perf_event_output})


def _check_helper_args(env: VerifierEnv, st: State, proto: BpfFuncProto) -> BpfMap | int | None:
    """Check r1.. against the proto; returns the map argument (or alloc size)."""
    the_map: BpfMap | int | None = None
    for idx, kind in enumerate(proto.args):
        reg = idx + 1
        r = _read(st, reg) if kind != A.ARG_DONTCARE else NOT_INIT
        if r.type in (T.PTR_TO_CTX, T.UNKNOWN) and not (
                r.type == T.PTR_TO_CTX and r.val == 0 and proto.func_id in _CTX_UNREAD):
            # a helper may read the context anywhere (a tail call's target records its own
            # reads, from the context's start: an unknown offset moves them)
            env.prog.ctx_reads = None
        if kind == A.ARG_CONST_MAP_PTR:
            if r.type == T.CONST_PTR_TO_MAP:
                the_map = r.ref  # type: ignore[assignment]
                if the_map.map_type not in proto.map_types:  # type: ignore[union-attr]
                    raise _Refuse(f"cannot pass map_type {int(the_map.map_type)} into func "  # type: ignore
                                  f"bpf_{proto.name}#{proto.func_id}")
            elif r.type != T.UNKNOWN:
                raise _Refuse(f"R{reg} type={r.type} expected=map_ptr")
        elif kind in (A.ARG_PTR_TO_MAP_KEY, A.ARG_PTR_TO_MAP_VALUE):
            m = the_map if isinstance(the_map, BpfMap) else None
            size = None if m is None else (m.key_size if kind == A.ARG_PTR_TO_MAP_KEY
                                           else m.value_size)
            _check_mem_arg(env, reg, r, size)
        elif kind in (A.ARG_PTR_TO_MEM, A.ARG_PTR_TO_UNINIT_MEM):
            size_kind = proto.args[idx + 1] if idx + 1 < len(proto.args) else None
            size = _size_arg(st, reg + 1, size_kind) if size_kind in (  # type: ignore[arg-type]
                A.ARG_CONST_SIZE, A.ARG_CONST_SIZE_OR_ZERO) else None
            _check_mem_arg(env, reg, r, size)
        elif kind == A.ARG_CONST_ALLOC_SIZE_OR_ZERO:
            the_size = _size_arg(st, reg, kind)
            if the_size is None and not env.lenient:
                raise _Refuse(f"R{reg} is not a known constant")
            the_map = the_size if the_size is not None else the_map
        elif kind == A.ARG_PTR_TO_CTX:
            if r.type not in (T.PTR_TO_CTX, T.UNKNOWN):
                raise _Refuse(f"R{reg} type={r.type} expected=ctx")
            if r.type == T.PTR_TO_CTX and r.val not in (0, None):
                raise _Refuse(f"dereference of modified ctx ptr R{reg} off={r.val} disallowed")
        elif kind == A.ARG_PTR_TO_RINGBUF_MEM:
            if r.type not in (T.PTR_TO_MEM, T.UNKNOWN) or (r.type == T.PTR_TO_MEM and r.val not in (0, None)):
                raise _Refuse(f"R{reg} type={r.type} expected=ringbuf_mem")
    return the_map


def _do_helper_call(env: VerifierEnv, st: State, proto: BpfFuncProto, regs: list[Reg]) -> None:
    arg = _check_helper_args(env, st, proto)
    for reg in range(1, 6):
        regs[reg] = NOT_INIT
    if proto.ret == R.RET_VOID:
        regs[0] = NOT_INIT
    elif proto.ret == R.RET_PTR_TO_MAP_VALUE_OR_NULL:
        env.next_id += 1
        regs[0] = Reg(T.PTR_TO_MAP_VALUE_OR_NULL, 0, arg, env.next_id)
    elif proto.ret == R.RET_PTR_TO_RINGBUF_MEM_OR_NULL:
        env.next_id += 1
        regs[0] = Reg(T.PTR_TO_MEM_OR_NULL, 0, arg if isinstance(arg, int) else None, env.next_id)
    else:
        regs[0] = SCALAR


# --- branches ------------------------------------------------------------------------

def _refine_null(st: State, reg: int, is_null: bool) -> State:
    """After `if rX == 0`: the maybe-NULL pointer (and its copies) is NULL on
    one side and a valid pointer on the other."""
    ptr = st.regs[reg]
    if ptr.type not in (T.PTR_TO_MAP_VALUE_OR_NULL, T.PTR_TO_MEM_OR_NULL):
        return st

    def fix(r: Reg) -> Reg:
        same = r == ptr or (ptr.id and r.id == ptr.id and r.type == ptr.type)
        if not same:
            return r
        if is_null:
            return Reg(T.SCALAR_VALUE, 0)
        return Reg(_NOT_NULL[r.type], r.val, r.ref)
    return State(tuple(fix(r) for r in st.regs), tuple((o, fix(r)) for o, r in st.stack))


def _branch_states(st: State, insn: Insn, pc: int) -> list[tuple[int, State]]:
    taken, fall = pc + 1 + insn.off, pc + 1
    null_test = (insn.cls == BPF_JMP and not insn.is_reg_src and insn.imm == 0
                 and insn.op in (BPF_JEQ, BPF_JNE))
    if not null_test:
        return [(fall, st), (taken, st)]
    eq_state, ne_state = _refine_null(st, insn.dst_reg, True), _refine_null(st, insn.dst_reg, False)
    if insn.op == BPF_JEQ:
        return [(fall, ne_state), (taken, eq_state)]
    return [(fall, eq_state), (taken, ne_state)]


# --- the walk -------------------------------------------------------------------------

def _step(env: VerifierEnv, st: State, pc: int) -> list[tuple[int, State]]:
    """Check one instruction; the states it hands to its successors."""
    insn = env.cfg.insns[pc]
    kind = env.cfg.kinds[pc]
    assert kind is not None
    regs, stack = list(st.regs), dict(st.stack)
    if kind in ("alu", "alu64", "neg", "neg64", "end"):
        _do_alu(env, st, insn, kind, regs)
    elif kind in ("ldx", "ldxsx"):
        _do_load(env, st, insn, kind, regs, stack)
    elif kind in ("st", "stx"):
        _do_store(env, st, insn, kind, stack)
    elif kind == "atomic":
        _do_atomic(env, st, insn, regs, stack)
    elif kind == "lddw":
        _do_lddw(env, insn, pc, regs)
    elif kind in ("ldabs", "ldind"):
        _do_ld_packet(env, st, insn, kind, regs)
    elif kind in ("jmp", "jmp32"):
        _read(st, insn.dst_reg)
        if insn.is_reg_src:
            _read(st, insn.src_reg)
        return _branch_states(st, insn, pc)
    elif kind == "call":
        _do_call(env, st, insn, pc, regs)
    elif kind == "callx":
        _read(st, insn.dst_reg)
        regs[0] = SCALAR
        regs[1:6] = [NOT_INIT] * 5
    elif kind == "exit":
        _read(st, 0)
    new = State(tuple(regs), tuple(sorted(stack.items())))
    return [(s, new) for s in successors(insn, kind, pc)]


def _do_ld_packet(env: VerifierEnv, st: State, insn: Insn, kind: str, regs: list[Reg]) -> None:
    allowed = PACKET_TYPES - {BpfProgType.BPF_PROG_TYPE_XDP}
    if not env.lenient and env.prog.prog_type not in allowed:
        raise _Refuse("BPF_LD_[ABS|IND] instructions not allowed for this program type")
    if not env.lenient and st.regs[6].type != T.PTR_TO_CTX:
        raise _Refuse("at the time of BPF_LD_ABS|IND R6 != pointer to skb")
    if kind == "ldind":
        _read(st, insn.src_reg)
    regs[0] = SCALAR
    regs[1:6] = [NOT_INIT] * 5


def _do_call(env: VerifierEnv, st: State, insn: Insn, pc: int, regs: list[Reg]) -> None:
    if insn.src_reg == 0:
        _do_helper_call(env, st, env.prog.helpers[insn.imm], regs)
        return
    # BPF-to-BPF: the callee sees r1-r5 (checked where it reads them); the
    # caller gets r0 back and loses r1-r5.
    target = pc + 1 + insn.imm
    callee = State(tuple([NOT_INIT] + list(st.regs[1:6]) + [NOT_INIT] * 4 + [Reg(T.PTR_TO_STACK, 0)]), ())
    env.pending_calls.append((target, callee))
    regs[0] = UNKNOWN
    regs[1:6] = [NOT_INIT] * 5


def _entry_state(prog: "BpfProg") -> State:
    regs = [NOT_INIT] * 11
    regs[1] = Reg(T.PTR_TO_CTX, 0)
    for reg in prog.type_info.entry_regs[1:]:
        regs[reg] = SCALAR
    regs[BPF_REG_FP] = Reg(T.PTR_TO_STACK, 0)
    return State(tuple(regs), ())


def do_check(env: VerifierEnv) -> None:
    """Propagate states to a fixpoint; refuse at the first bad instruction."""
    states: dict[int, State] = {0: _entry_state(env.prog)}
    work = [0]
    while work:
        pc = work.pop()
        env.processed += 1
        if env.processed > BPF_COMPLEXITY_LIMIT_INSNS:
            raise _AtInsn(pc, f"BPF program is too large. Processed {env.processed} insn",
                          errno.E2BIG)
        try:
            outs = _step(env, states[pc], pc)
        except _Refuse as e:
            raise _AtInsn(pc, e.reason) from None
        outs += env.pending_calls
        env.pending_calls.clear()
        for succ, out in outs:
            old = states.get(succ)
            new = out if old is None else join(old, out)
            if new != old:
                states[succ] = new
                work.append(succ)


class _AtInsn(Exception):
    def __init__(self, pc: int, reason: str, err: int = errno.EACCES):
        self.pc, self.reason, self.err = pc, reason, err


# --- driver ------------------------------------------------------------------------

def _insn_checker(prog: "BpfProg", lenient: bool) -> Callable[[Insn, str, int], str | None]:
    """What the structural pass asks about helpers and map references."""
    info = prog.type_info

    def check(insn: Insn, kind: str, pc: int) -> str | None:
        if kind == "lddw":
            if insn.src_reg in (BPF_PSEUDO_FUNC, 0):
                return None
            try:
                prog.map_for(insn)
            except VerifierError as e:
                return e.reason
            return None
        proto = prog.helpers.get(insn.imm)
        if proto is None:
            return f"invalid func unknown#{insn.imm}"
        if info.helpers is not None and insn.imm not in info.helpers \
                and prog.helpers is _kernel_helpers():
            return f"program of this type cannot use helper bpf_{proto.name}#{insn.imm}"
        if proto.gpl_only and not lenient and prog.license not in GPL_COMPATIBLE:
            return "cannot call GPL-restricted function from non-GPL compatible program"
        return None
    return check


def _kernel_helpers() -> dict[int, BpfFuncProto]:
    from .helpers import KERNEL_HELPERS

    return KERNEL_HELPERS


def _listing(cfg: Cfg) -> list[str]:
    out = []
    for pc, kind in enumerate(cfg.kinds):
        if kind is None:
            continue
        insn = cfg.insns[pc]
        second = cfg.insns[pc + 1] if kind == "lddw" else None
        out.append(f"{pc}: ({insn.code:02x}) {format_insn_llvm(insn, second)}")
    return out


def verify(prog: "BpfProg", log_level: int = 0) -> str:
    """Check the program; return the verifier log or raise VerifierError.

    log_level 0 gives the summary, 1 adds the instruction listing.
    """
    lenient = prog.type_info.lenient
    log: list[str] = []
    cfg = check_structure(prog.insns, lenient, _insn_checker(prog, lenient), log)
    log.extend(cfg.warnings)
    if log_level >= 1:
        log.extend(_listing(cfg))
    env = VerifierEnv(prog, cfg, log, lenient)
    prog.ctx_reads = set()
    try:
        do_check(env)
    except _AtInsn as e:
        insn = cfg.insns[e.pc]
        second = cfg.insns[e.pc + 1] if cfg.kinds[e.pc] == "lddw" else None
        log.append(f"{e.pc}: ({insn.code:02x}) {format_insn_llvm(insn, second)}")
        log.append(e.reason)
        raise VerifierError(e.reason, e.pc, "\n".join(log), e.err) from None
    log.append(f"processed {env.processed} insns (limit {BPF_COMPLEXITY_LIMIT_INSNS}), "
               f"{len(cfg.subprogs)} function(s), stack depth {env.max_stack}")
    return "\n".join(log)


