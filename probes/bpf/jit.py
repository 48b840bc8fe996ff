"""The fast path: a verified program translated once into Python source.

Each BPF function becomes one Python function whose registers are local
variables; its basic blocks sit in a ``while True`` loop and are picked by a
binary tree of comparisons on the block's first instruction index (Python
has no goto). Immediates, masks and signed-compare biases are folded into
the source as constants, so an ``add r1, 5`` costs one Python statement.

Results must equal the interpreter's on every program, faults included:

* the instruction budget is charged a whole block at a time; a block that
  would overrun it is handed to the interpreter, which stops at exactly
  the instruction the budget runs out on (or faults earlier, as it would);
* calls end blocks, so a callee never sees instructions charged that its
  caller has not reached yet;
* a memory fault names the instruction through ``p``, the index of the
  last instruction that could fault, set just before it.

Host memory is bounded. CPython's compiler needs 3.3-3.7 KB per generated
line while it compiles a function (measured; one to ten lines per BPF
instruction: a 20,000-instruction function with a branch every fourth
instruction peaked at 240 MB). So each BPF function is compiled on its own,
one whose source is longer than ``JIT_MAX_FUNC_LINES`` is left to the
interpreter, and so is every function once the program's compiled source
reaches ``JIT_MAX_PROG_LINES``. Interpreted and compiled functions call each
other through the same ``F<start>`` names, so a program runs the same
either way, only slower in the interpreted parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .disasm import format_insn
from .errors import BpfError, BpfRuntimeError
from .helpers import BPF_FUNC_tail_call
from .interpreter import Interpreter, _sdiv, _smod, load_packet, unexpected
from .isa import (
    BPF_ADD, BPF_ALU64, BPF_AND, BPF_ARSH, BPF_CMPXCHG, BPF_DIV, BPF_FETCH, BPF_JEQ,
    BPF_JGE, BPF_JGT, BPF_JLE, BPF_JLT, BPF_JMP32, BPF_JNE, BPF_JSET, BPF_JSGE, BPF_JSGT,
    BPF_JSLE, BPF_JSLT, BPF_LOAD_ACQ, BPF_LSH, BPF_MOD, BPF_MOV, BPF_MUL, BPF_OR,
    BPF_PSEUDO_FUNC, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX, BPF_RSH, BPF_STORE_REL,
    BPF_SUB, BPF_TO_BE, BPF_XCHG, BPF_XOR, OPCODES, SIZE_BYTES, U32, U64, Insn,
    lddw_imm64,
)
from .memory import MemoryFault
from .runtime import BpfRun, GuestFault, ProgramExit

if TYPE_CHECKING:
    from .program import BpfProg

JIT_MAX_FUNC_LINES = 16384      # the compiler's peak stays near 60 MB
JIT_MAX_PROG_LINES = 1 << 18    # what stays compiled (source and code objects): ~30 MB

_BLOCK_END = {"jmp", "jmp32", "ja", "ja32", "exit", "call", "callx"}
_CMP = {BPF_JEQ: "==", BPF_JNE: "!=", BPF_JGT: ">", BPF_JGE: ">=", BPF_JLT: "<",
        BPF_JLE: "<=", BPF_JSGT: ">", BPF_JSGE: ">=", BPF_JSLT: "<", BPF_JSLE: "<="}
_SIGNED = {BPF_JSGT, BPF_JSGE, BPF_JSLT, BPF_JSLE}
_ALU_SYM = {BPF_ADD: "+", BPF_SUB: "-", BPF_MUL: "*", BPF_OR: "|", BPF_AND: "&",
            BPF_XOR: "^"}


# --- run-time support called from generated code -------------------------------------

def _fault(prog: "BpfProg", pc: int, reason: str) -> BpfRuntimeError:
    insns = prog.insns
    second = insns[pc + 1] if pc + 1 < len(insns) else None
    return BpfRuntimeError(reason, pc, format_insn(insns[pc], second), prog.name)


def _slow_path(run: BpfRun, prog: "BpfProg", pc: int, done: int, regs: list[int]) -> None:
    """The budget runs out inside the block at ``pc``: let the interpreter
    execute it instruction by instruction until it does (or faults first)."""
    run.insn_count = done
    vm = Interpreter(run, prog.helpers)
    vm.prog, vm.pc, vm.regs = prog, pc, regs
    vm.resume(catch_exit=False)
    raise AssertionError("budget slow path ran past its block")  # pragma: no cover


def _tail_call(run: BpfRun, ctx: int) -> int:
    target = run.pending_tail_call
    assert target is not None
    run.pending_tail_call = None
    target.ensure_loaded()
    run.prog = target
    run.bind_maps(target)
    return target.compiled().entry(run, ctx, 0, 0, 0, 0)


def _callx(run: BpfRun, helpers: dict[int, Any], func_id: int, *args: int) -> int:
    proto = helpers.get(func_id)
    if proto is None:
        raise BpfRuntimeError(f"invalid func unknown#{func_id}")
    return proto.impl(run, *args) & U64


def _bswap(v: int, width: int) -> int:
    return int.from_bytes((v & ((1 << width) - 1)).to_bytes(width // 8, "little"), "big")


# --- code generation ------------------------------------------------------------------

@dataclass
class _Gen:
    """Source being generated for one program, and the constants it names."""

    prog: "BpfProg"
    names: dict[str, Any] = field(default_factory=dict)

    def const(self, prefix: str, value: Any) -> str:
        for name, v in self.names.items():
            if v is value and name.startswith(prefix):
                return name
        name = f"{prefix}{len(self.names)}"
        self.names[name] = value
        return name


def _operand(insn: Insn, bits: int) -> str:
    if insn.is_reg_src:
        return f"r{insn.src_reg}" if bits == 64 else f"(r{insn.src_reg} & {U32})"
    return str(insn.imm & ((1 << bits) - 1))


def _emit_alu(insn: Insn) -> list[str]:
    bits = 64 if insn.cls == BPF_ALU64 else 32
    mask = (1 << bits) - 1
    d, op, x = f"r{insn.dst_reg}", insn.op, _operand(insn, bits)
    a = d if bits == 64 else f"({d} & {mask})"
    const = None if insn.is_reg_src else insn.imm & mask
    if op in (BPF_ADD, BPF_SUB, BPF_MUL):
        return [f"{d} = ({d} {_ALU_SYM[op]} {x}) & {mask}"]
    if op in (BPF_OR, BPF_AND, BPF_XOR):
        return [f"{d} = ({d} {_ALU_SYM[op]} {x})" + ("" if bits == 64 else f" & {mask}")]
    if op == BPF_DIV and insn.off:
        return [f"{d} = _sdiv({a}, {x}, {bits})"]
    if op == BPF_MOD and insn.off:
        return [f"{d} = _smod({a}, {x}, {bits})"]
    if op == BPF_DIV:
        if const is not None:
            return [f"{d} = {a} // {const}" if const else f"{d} = 0"]
        return [f"t = {x}", f"{d} = {a} // t if t else 0"]
    if op == BPF_MOD:
        if const is not None:
            return [f"{d} = {a} % {const}" if const else f"{d} = {a}"]
        return [f"t = {x}", f"{d} = {a} % t if t else {a}"]
    if op == BPF_LSH:
        return [f"{d} = ({d} << ({x} & {bits - 1})) & {mask}"]
    if op == BPF_RSH:
        return [f"{d} = {a} >> ({x} & {bits - 1})"]
    if op == BPF_ARSH:
        sign = 1 << (bits - 1)
        return [f"{d} = ((({a}) ^ {sign}) - {sign} >> ({x} & {bits - 1})) & {mask}"]
    assert op == BPF_MOV
    if insn.off:  # movsx: sign-extend the low off bits
        sign = 1 << (insn.off - 1)
        return [f"{d} = (((r{insn.src_reg} & {(1 << insn.off) - 1}) ^ {sign}) - {sign}) & {mask}"]
    return [f"{d} = {x}"]


def _emit_end(insn: Insn) -> list[str]:
    d, width = f"r{insn.dst_reg}", insn.imm
    if insn.cls == BPF_ALU64 or insn.code & BPF_TO_BE:
        if width == 16:
            return [f"{d} = (({d} & 255) << 8) | (({d} >> 8) & 255)"]
        return [f"{d} = _bswap({d}, {width})"]
    return [] if width == 64 else [f"{d} &= {(1 << width) - 1}"]


def _addr(reg: int, off: int) -> str:
    return f"r{reg}" if off == 0 else f"(r{reg} + {off}) & {U64}"


def _emit_mem(insn: Insn, kind: str, pc: int) -> list[str]:
    size = SIZE_BYTES[insn.size]
    lines = [f"p = {pc}"]
    if kind == "ldx":
        lines.append(f"r{insn.dst_reg} = ld{size}({_addr(insn.src_reg, insn.off)})")
    elif kind == "ldxsx":
        sign = 1 << (size * 8 - 1)
        lines.append(f"r{insn.dst_reg} = ((ld{size}({_addr(insn.src_reg, insn.off)}) ^ {sign})"
                     f" - {sign}) & {U64}")
    elif kind == "st":
        lines.append(f"st{size}({_addr(insn.dst_reg, insn.off)}, {insn.imm})")
    else:
        lines.append(f"st{size}({_addr(insn.dst_reg, insn.off)}, r{insn.src_reg})")
    return lines


def _emit_atomic(insn: Insn, pc: int) -> list[str]:
    size = SIZE_BYTES[insn.size]
    mask = (1 << (size * 8)) - 1
    s, op = f"r{insn.src_reg}", insn.imm
    if op == BPF_LOAD_ACQ:
        return [f"p = {pc}", f"r{insn.dst_reg} = ld{size}({_addr(insn.src_reg, insn.off)})"]
    if op == BPF_STORE_REL:
        return [f"p = {pc}", f"st{size}({_addr(insn.dst_reg, insn.off)}, {s})"]
    lines = [f"p = {pc}", f"a = {_addr(insn.dst_reg, insn.off)}", f"o = ld{size}(a)"]
    if op == BPF_CMPXCHG:
        return lines + [f"if o == (r0 & {mask}):", f"    st{size}(a, {s})", "r0 = o"]
    if op == BPF_XCHG:
        return lines + [f"st{size}(a, {s})", f"{s} = o"]
    lines.append(f"st{size}(a, o {_ALU_SYM[op & ~BPF_FETCH]} {s})")
    if op & BPF_FETCH:
        lines.append(f"{s} = o")
    return lines


def _emit_lddw(gen: _Gen, insn: Insn, second: Insn, pc: int) -> list[str]:
    d, src = f"r{insn.dst_reg}", insn.src_reg
    if src == 0:
        return [f"{d} = {lddw_imm64(insn, second)}"]
    if src == BPF_PSEUDO_FUNC:
        return [f"{d} = {BpfRun.func_ptr(pc + 1 + insn.imm)}"]
    m = gen.const("MAP", gen.prog.map_for(insn))
    if src in (BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX):
        return [f"{d} = run.map_ptr({m})"]
    return [f"p = {pc}", f"{d} = run.global_data_ptr({m}, {second.imm & U32})"]


def _cond(insn: Insn) -> str:
    bits = 32 if insn.cls == BPF_JMP32 else 64
    a = f"r{insn.dst_reg}" if bits == 64 else f"(r{insn.dst_reg} & {U32})"
    b = _operand(insn, bits)
    if insn.op == BPF_JSET:
        return f"{a} & {b}"
    if insn.op in _SIGNED:
        bias = 1 << (bits - 1)
        b = str(int(b) ^ bias) if not insn.is_reg_src else f"({b} ^ {bias})"
        a = f"({a} ^ {bias})"
    return f"{a} {_CMP[insn.op]} {b}"


def _emit_call(gen: _Gen, insn: Insn, kind: str, pc: int) -> list[str]:
    args = "r1, r2, r3, r4, r5"
    if kind == "call" and insn.src_reg == 1:
        return [f"p = {pc}", "run.insn_count = n", "run.depth += 1",
                f"r0 = F{pc + 1 + insn.imm}(run, {args})", "run.depth -= 1",
                "n = run.insn_count"]
    if kind == "callx":
        call = f"r0 = _callx(run, HELPERS, r{insn.dst_reg}, {args})"
    elif insn.src_reg == 0 and insn.imm in gen.prog.helpers:
        fn = gen.const("H", gen.prog.helpers[insn.imm].impl)
        call = f"r0 = {fn}(run, {args}) & {U64}"
    else:
        call = f"raise BpfRuntimeError('invalid func unknown#{insn.imm}')"
    lines = [f"p = {pc}", call]
    if kind == "callx" or insn.imm == BPF_FUNC_tail_call:
        lines += ["if run.pending_tail_call is not None:",
                  "    run.insn_count = n", "    return _tail_call(run, r1)"]
    return lines


def _emit_insn(gen: _Gen, insn: Insn, kind: str, pc: int) -> list[str]:
    if kind in ("alu", "alu64"):
        return _emit_alu(insn)
    if kind in ("neg", "neg64"):
        mask = U64 if kind == "neg64" else U32
        return [f"r{insn.dst_reg} = -r{insn.dst_reg} & {mask}"]
    if kind == "end":
        return _emit_end(insn)
    if kind in ("ldx", "ldxsx", "st", "stx"):
        return _emit_mem(insn, kind, pc)
    if kind == "atomic":
        return _emit_atomic(insn, pc)
    if kind == "lddw":
        return _emit_lddw(gen, insn, gen.prog.insns[pc + 1], pc)
    if kind in ("ldabs", "ldind"):
        off = str(insn.imm) if kind == "ldabs" else f"r{insn.src_reg} + {insn.imm}"
        return [f"p = {pc}", f"r0 = load_packet(run, ({off}) & {U32}, {SIZE_BYTES[insn.size]})"]
    return _emit_call(gen, insn, kind, pc)


def _blocks(insns: list[Insn], start: int, end: int) -> list[tuple[int, list[int]]]:
    """Split [start, end) into basic blocks: (leader, instruction indices)."""
    leaders = {start}
    pc = start
    while pc < end:
        insn = insns[pc]
        kind = OPCODES[insn.code].kind
        step = 2 if kind == "lddw" else 1
        if kind in _BLOCK_END:
            leaders.add(pc + 1)
            if kind in ("jmp", "jmp32", "ja"):
                leaders.add(pc + 1 + insn.off)
            elif kind == "ja32":
                leaders.add(pc + 1 + insn.imm)
        pc += step
    order = sorted(x for x in leaders if start <= x < end)
    blocks = []
    for i, lead in enumerate(order):
        stop = order[i + 1] if i + 1 < len(order) else end
        pcs, pc = [], lead
        while pc < stop:
            pcs.append(pc)
            pc += 2 if insns[pc].code == 0x18 else 1
        blocks.append((lead, pcs))
    return blocks


def _block_source(gen: _Gen, lead: int, pcs: list[int], next_lead: int | None) -> list[str]:
    insns = gen.prog.insns
    n = len(pcs)
    lines = [f"n += {n}", "if n > B:",
             f"    _slow_path(run, PROG, {lead}, n - {n}, [r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10])"]
    for pc in pcs:
        insn = insns[pc]
        kind = OPCODES[insn.code].kind
        if kind == "exit":
            return lines + ["run.insn_count = n", "return r0"]
        if kind in ("ja", "ja32"):
            target = pc + 1 + (insn.off if kind == "ja" else insn.imm)
            return lines + [f"b = {target}", "continue"]
        if kind in ("jmp", "jmp32"):
            target = pc + 1 + insn.off
            if target == lead:  # a loop of one block: iterate without dispatching
                return (["while True:"] + ["    " + line for line in lines]
                        + [f"    if {_cond(insn)}:", "        continue", "    break",
                           f"b = {pc + 1}", "continue"])
            return lines + [f"if {_cond(insn)}:", f"    b = {target}", "    continue",
                            f"b = {pc + 1}", "continue"]
        lines += _emit_insn(gen, insn, kind, pc)
    return lines + [f"b = {next_lead}", "continue"]


def _dispatch(blocks: list[tuple[int, list[str]]], indent: str) -> list[str]:
    """A binary tree of comparisons on ``b`` reaching each block's code."""
    if len(blocks) == 1:
        return [indent + line for line in blocks[0][1]]
    mid = len(blocks) // 2
    return ([f"{indent}if b < {blocks[mid][0]}:"] + _dispatch(blocks[:mid], indent + "    ")
            + [f"{indent}else:"] + _dispatch(blocks[mid:], indent + "    "))


def _function_source(gen: _Gen, start: int, end: int) -> list[str]:
    blocks = _blocks(gen.prog.insns, start, end)
    bodies = []
    for i, (lead, pcs) in enumerate(blocks):
        nxt = blocks[i + 1][0] if i + 1 < len(blocks) else None
        bodies.append((lead, _block_source(gen, lead, pcs, nxt)))
    body = "\n".join(line for _, lines in bodies for line in lines)
    # bind only the accessors this function uses: the prologue runs on every call
    accessors = [f"    {kind}{size} = run.mem.{'loader' if kind == 'ld' else 'storer'}({size})"
                 for kind in ("ld", "st") for size in (1, 2, 4, 8) if f"{kind}{size}(" in body]
    return ([f"def F{start}(run, r1, r2, r3, r4, r5):",
             "    r0 = r6 = r7 = r8 = r9 = t = a = o = 0",
             "    r10 = run.new_stack()"]
            + accessors +
            ["    B, n, p = run.budget, run.insn_count, " + str(start),
             f"    b = {start}",
             "    try:",
             "        while True:"]
            + _dispatch(bodies, " " * 12)
            + ["    except (MemoryFault, GuestFault) as e:",
               "        raise _fault(PROG, p, str(e)) from None",
               "    except BpfRuntimeError as e:",
               "        if e.pc is None:",
               "            raise _fault(PROG, p, e.reason) from None",
               "        raise",
               "    except (BpfError, ProgramExit):",
               "        raise",
               "    except Exception as e:",
               "        raise _fault(PROG, p, unexpected(e)) from e", ""])


def _function_starts(insns: list[Insn]) -> list[int]:
    starts = {0}
    pc = 0
    while pc < len(insns):
        insn = insns[pc]
        if insn.code == 0x85 and insn.src_reg == 1:
            starts.add(pc + 1 + insn.imm)
        pc += 2 if insn.code == 0x18 else 1
    return sorted(starts)


@dataclass
class CompiledProg:
    """A program translated to Python. ``source`` is the generated module;
    ``entry`` the function of the main program."""

    prog: "BpfProg"
    source: str
    entry: Callable[..., int]

    def execute(self, run: BpfRun, r1: int, r2: int = 0) -> int:
        try:
            return self.entry(run, r1, r2, 0, 0, 0)
        except ProgramExit as e:
            return e.r0


def _interpreted(prog: "BpfProg", start: int) -> Callable[..., int]:
    """A BPF function run by the interpreter, callable as a compiled one is."""
    def run_function(run: BpfRun, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        vm = Interpreter(run, prog.helpers)
        vm.prog, vm.pc = prog, start
        vm.regs = [0, r1, r2, r3, r4, r5, 0, 0, 0, 0, run.new_stack()]
        return vm.resume(catch_exit=False)
    return run_function


def compile_prog(prog: "BpfProg") -> CompiledProg:
    """Translate a verified program into Python functions, one compile per BPF function;
    the functions over the size limits run in the interpreter."""
    gen = _Gen(prog)
    starts = _function_starts(prog.insns)
    namespace: dict[str, Any] = {
        "PROG": prog, "HELPERS": prog.helpers, "BpfRuntimeError": BpfRuntimeError,
        "BpfError": BpfError, "ProgramExit": ProgramExit, "unexpected": unexpected,
        "MemoryFault": MemoryFault, "GuestFault": GuestFault, "_fault": _fault,
        "_slow_path": _slow_path, "_tail_call": _tail_call, "_callx": _callx,
        "_sdiv": _sdiv, "_smod": _smod, "_bswap": _bswap, "load_packet": load_packet}
    source: list[str] = []
    total = 0
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(prog.insns)
        # at least a line per instruction: don't even generate what cannot fit
        lines = _function_source(gen, start, end) if end - start <= JIT_MAX_FUNC_LINES else []
        if not lines or len(lines) > JIT_MAX_FUNC_LINES or total + len(lines) > JIT_MAX_PROG_LINES:
            namespace[f"F{start}"] = _interpreted(prog, start)
            source.append(f"# F{start}: {end - start} instructions, interpreted")
            continue
        total += len(lines)
        text = "\n".join(lines)
        namespace.update(gen.names)
        exec(compile(text, f"<bpf:{prog.name or 'prog'}:{start}>", "exec"), namespace)
        source.append(text)
    return CompiledProg(prog, "\n".join(source), namespace["F0"])
