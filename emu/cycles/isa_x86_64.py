"""x86-64 instructions as cycle-model ops: class by mnemonic and operand shape (register,
load+op, read-modify-write), dataflow from capstone's `regs_access()` with sub-registers
folded into their 64-bit parents."""
from __future__ import annotations

import capstone
from capstone import x86_const as X

from emu.cycles.ops import PRIMARY, Op, make_op

FLAGS = "flags"
_REG, _IMM, _MEM = X.X86_OP_REG, X.X86_OP_IMM, X.X86_OP_MEM

_PARENT = {}
for _r in "abcd":
    for _n in (f"{_r}l", f"{_r}h", f"{_r}x", f"e{_r}x", f"r{_r}x"):
        _PARENT[_n] = f"r{_r}x"
for _r in ("si", "di", "bp", "sp"):
    for _n in (_r + "l", _r, "e" + _r, "r" + _r):
        _PARENT[_n] = "r" + _r
for _i in range(8, 16):
    for _n in (f"r{_i}b", f"r{_i}w", f"r{_i}d", f"r{_i}"):
        _PARENT[_n] = f"r{_i}"
for _n in ("rflags", "eflags", "flags"):
    _PARENT[_n] = FLAGS
_IGNORED = {"rip", "eip", "ip", "fs", "gs", "cs", "ds", "es", "ss", "fpsw", "fpcw", "mxcsr"}

MOVES = {"mov", "movabs", "movzx", "movsx", "movsxd", "movbe", "movd", "movq", "movdqa",
         "movdqu", "movaps", "movups", "movapd", "movupd", "movss", "movsd", "movnti",
         "movntdq", "movntps", "movhps", "movlps", "movhpd", "movlpd", "lddqu", "movntdqa"}
SHIFTS = {"shl", "sal", "shr", "sar", "rol", "ror", "rcl", "rcr", "shld", "shrd", "shlx", "shrx",
          "sarx", "rorx"}
MUL = {"imul", "mul", "mulx"}
DIV = {"div", "idiv"}
BITSCAN = {"bsf", "bsr", "tzcnt", "lzcnt", "popcnt", "pdep", "pext", "crc32"}
CMOV_SET = ("cmov", "set")
NOPS = {"nop", "endbr64", "endbr32", "fnop", "prefetcht0", "prefetcht1", "prefetcht2",
        "prefetchnta", "prefetchw", "pause"}
ZERO_IDIOMS = {"xor", "sub", "pxor", "xorps", "xorpd", "vpxor", "vxorps", "vxorpd", "psubb",
               "psubw", "psubd", "psubq", "vpsubb", "vpsubd", "vpsubq", "vpxord", "vpxorq",
               "pcmpgtb", "pcmpgtd", "sbb"}
SYSTEM = {"syscall", "sysenter", "int3", "int", "int1", "into", "hlt", "rdtsc", "rdtscp", "cpuid",
          "in", "out", "ud2", "lfence", "mfence", "sfence", "xgetbv", "rdrand", "rdseed", "cli",
          "sti", "iretq", "wrmsr", "rdmsr", "lgdt", "lidt", "invlpg", "swapgs"}
STRINGS = {f"{op}{w}" for op in ("movs", "stos", "lods", "cmps", "scas") for w in "bwdq"}
COMPARES = {"cmp", "test", "bt", "ptest", "vptest", "ucomiss", "ucomisd", "comiss", "comisd",
            "vucomiss", "vucomisd", "vcomiss", "vcomisd"}
NO_DATA_DEPS = {"nop", "lea"}
VEC_GROUPS = (X.X86_GRP_SSE1, X.X86_GRP_SSE2, X.X86_GRP_SSE3, X.X86_GRP_SSSE3, X.X86_GRP_SSE41,
              X.X86_GRP_SSE42, X.X86_GRP_SSE4A, X.X86_GRP_AVX, X.X86_GRP_AVX2, X.X86_GRP_AVX512,
              X.X86_GRP_MMX)


def reg(name: str) -> str | None:
    if name in _IGNORED:
        return None
    return _PARENT.get(name, name)


def _fold(insn, ids) -> list[str]:
    out = []
    for r in ids:
        n = reg(insn.reg_name(r))
        if n is not None and n not in out:
            out.append(n)
    return out


def _vector(insn) -> bool:
    if any(insn.group(g) for g in VEC_GROUPS):
        return True
    for op in insn.operands:
        if op.type == _REG and insn.reg_name(op.reg)[:3] in ("xmm", "ymm", "zmm"):
            return True
        if op.type == _REG and insn.reg_name(op.reg)[0] == "k" and insn.reg_name(op.reg)[1:].isdigit():
            return True
    return False


def _base_class(m: str, insn, vec: bool) -> str:
    if m in SHIFTS:
        if any(op.type == _REG and insn.reg_name(op.reg) == "cl" for op in insn.operands[1:]):
            return "shift_cl"
        return "shift"
    if m in MUL:
        return "mul_wide" if len(insn.operands) == 1 else "mul"
    if m in DIV:        # 64-bit dividers are far slower than narrower ones on x86 cores
        wide = insn.operands and insn.operands[0].size == 8
        return ("idiv64" if m == "idiv" else "div64") if wide else "div"
    if m in BITSCAN:
        return "bitscan"
    if m.startswith(CMOV_SET):
        return "cmov"
    if m == "lea":
        mem = insn.operands[1].mem
        return "lea3" if mem.base and mem.index and mem.disp else "lea"
    if m.startswith("xchg"):
        return "xchg"
    if vec:
        return "vec"
    if insn.group(X.X86_GRP_FPU):
        return "fp"
    return "alu"


def decode(insn) -> Op:
    m = insn.mnemonic
    size = insn.size
    read_ids, write_ids = insn.regs_access()
    reads, writes = _fold(insn, read_ids), _fold(insn, write_ids)
    if insn.group(capstone.CS_GRP_JUMP) or insn.group(capstone.CS_GRP_CALL) or insn.group(capstone.CS_GRP_RET):
        return _branch(insn, m, reads, size)
    if m in SYSTEM:
        return make_op(m, "system", (PRIMARY,), tuple(writes), (), size=size)
    if m in NOPS or m.startswith("nop"):
        return make_op(m, "nop", (), (), (), size=size)
    ops = insn.operands
    if (m in STRINGS and not _vector(insn)) or insn.prefix[0] in (X.X86_PREFIX_REP, X.X86_PREFIX_REPNE):
        return make_op(m, "string", (PRIMARY,), tuple(writes), tuple(reads), size=size)
    if m in COMPARES:
        writes = [FLAGS]            # capstone reports `test r, imm` as writing r
    mem = next((op for op in ops if op.type == _MEM), None)
    if m in ZERO_IDIOMS and len(ops) == 2 and all(o.type == _REG for o in ops) and ops[0].reg == ops[1].reg:
        return make_op(m, "idiom", (), tuple(writes), (), size=size)
    if m == "push":
        return _push_pop(m, "push", reads, size, insn)
    if m == "pop":
        return _push_pop(m, "pop", reads, size, insn)
    vec = _vector(insn)
    if mem is None or m in NO_DATA_DEPS or m == "lea":
        cls = _base_class(m, insn, vec)
        srcs = [r for r in reads]
        if cls == "cmov" and m.startswith("cmov"):
            srcs += [w for w in writes if w != FLAGS and w not in srcs]
        return make_op(m, cls, (PRIMARY,), tuple(writes), tuple(srcs), size=size)
    return _memory_form(insn, m, mem, reads, writes, vec, size)


def _addr_regs(insn, mem) -> list[str]:
    out = []
    for r in (mem.mem.base, mem.mem.index):
        if r:
            n = reg(insn.reg_name(r))
            if n is not None and n not in out:
                out.append(n)
    return out


def _memory_form(insn, m, mem, reads, writes, vec, size) -> Op:
    addr = _addr_regs(insn, mem)
    loads, stores = bool(mem.access & capstone.CS_AC_READ), bool(mem.access & capstone.CS_AC_WRITE)
    data = [r for r in reads if r not in addr or _reg_operand(insn, r)]
    if m in MOVES or (not loads and not stores):
        if stores and not loads:
            return make_op(m, "vec_store" if vec else "store", (PRIMARY,), (), tuple(data),
                           tuple(addr), size=size)
        return make_op(m, "vec_load" if vec else "load", (PRIMARY,), tuple(writes), (), tuple(addr),
                       size=size)
    cls = _base_class(m, insn, vec)
    if cls == "cmov":
        data += [w for w in writes if w != FLAGS and w not in data]
    uses = ("load", PRIMARY) + (("store",) if stores else ())
    slots = 2 if stores else 1          # load+op micro-fuses; RMW is two fused uops
    return make_op(m, cls, uses, tuple(writes), tuple(data), tuple(addr),
                   addr_path=("load", PRIMARY), slots=slots, size=size)


def _reg_operand(insn, r: str) -> bool:
    return any(op.type == _REG and reg(insn.reg_name(op.reg)) == r for op in insn.operands)


def _push_pop(m, cls, reads, size, insn) -> Op:
    data = [r for r in reads if r != "rsp"]
    if cls == "push":
        return make_op(m, cls, (PRIMARY,), ("rsp",), (), ("rsp",),
                       extra_edges=(), size=size) if not data else \
            Op(m, cls, (PRIMARY,), 1, (("rsp", "rsp", (PRIMARY,)),), ("rsp", *data), ("rsp",), size=size)
    dst = [reg(insn.reg_name(op.reg)) for op in insn.operands if op.type == _REG]
    return make_op(m, cls, (PRIMARY,), tuple(d for d in dst if d) + ("rsp",), (), ("rsp",), size=size)


def _branch(insn, m, reads, size) -> Op:
    cond = insn.group(capstone.CS_GRP_JUMP) and m not in ("jmp", "ljmp")
    cls = "call" if insn.group(capstone.CS_GRP_CALL) else "ret" if insn.group(capstone.CS_GRP_RET) else "branch"
    srcs = tuple(r for r in reads if r != "rsp")
    return make_op(m, cls, (PRIMARY,), (), srcs, branch=True, cond=bool(cond), size=size)


# --- llvm-mca, the model's oracle (mca.py, corpus.py) -----------------------------------------
LLVM_TRIPLE = "x86_64"
MCA_SYNTAX: int | None = capstone.CS_OPT_SYNTAX_ATT    # the default syntax of llvm-mc
# Instructions llvm-mca cannot meaningfully time as straight-line code.
UNMODELLED = frozenset((
    "call", "syscall", "sysenter", "int3", "int", "into", "int1", "hlt", "rdtsc",
    "rdtscp", "cpuid", "in", "out", "ud2", "lfence", "mfence", "sfence", "pause",
    "endbr64", "xgetbv", "rdrand", "rdseed", "lock", "cli", "sti", "iretq", "retf"))


def mca_branch(insn, text: str) -> str:
    """A direct branch as llvm-mc reads it back: its absolute target becomes `.`."""
    return text if insn.op_str.startswith("*") else f"{insn.mnemonic} ."


def unmodelled_form(insn) -> bool:
    """String loops and locked forms (prefixes), and segment-based addressing (segment
    bases are not modelled)."""
    m = insn.mnemonic
    if m.startswith(("rep", "lock")) or "rep" in insn.op_str.split(" ")[0:1]:
        return True
    return any(r in insn.op_str for r in ("fs:", "gs:"))
