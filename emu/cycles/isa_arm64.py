"""AArch64 instructions as cycle-model ops: class by mnemonic, dataflow from the operands.

Capstone 5's `regs_access()` is unreliable on AArch64 (`cmp x0, x1` reports x0 written,
`adds` misses its destination, `ret` reads nothing), so the dataflow is derived here from
the operand list and a few mnemonic tables: the first register operand is the
destination, except for compares, stores and branches."""
from __future__ import annotations

import re

from capstone import arm64_const as A

from emu.cycles.ops import PRIMARY, Op, make_op

FLAGS = "nzcv"
_REG, _IMM, _MEM = A.ARM64_OP_REG, A.ARM64_OP_IMM, A.ARM64_OP_MEM

BRANCHES = {"b", "bl", "br", "blr", "ret", "cbz", "cbnz", "tbz", "tbnz", "braa", "brab",
            "blraa", "blrab", "retaa", "retab"}
COND_BRANCHES = {"cbz", "cbnz", "tbz", "tbnz"}
MUL = {"mul", "mneg", "madd", "msub", "smull", "umull", "smaddl", "umaddl", "smsubl", "umsubl",
       "smnegl", "umnegl", "smulh", "umulh"}
DIV = {"udiv", "sdiv"}
COMPARES = {"cmp", "cmn", "tst", "ccmp", "ccmn", "fcmp", "fcmpe", "fccmp", "fccmpe"}
FLAG_READERS = {"csel", "csinc", "csinv", "csneg", "cset", "csetm", "cinc", "cinv", "cneg",
                "adc", "adcs", "sbc", "sbcs", "ngc", "ngcs", "ccmp", "ccmn", "fcsel", "fccmp",
                "fccmpe"}
FLAG_SETTERS = {"adds", "subs", "ands", "bics", "negs", "ngcs", "adcs", "sbcs"}
READS_DST = {"movk", "bfi", "bfxil", "bfm", "bfc", "ins", "mov.elem"}
NOPS = {"nop", "hint", "yield", "bti", "paciasp", "autiasp", "pacibsp", "autibsp", "csdb",
        "esb", "psb", "sev", "sevl", "prfm", "prfum"}
SYSTEM = {"svc", "hvc", "smc", "brk", "hlt", "mrs", "msr", "isb", "dsb", "dmb", "sys", "sysl",
          "eret", "wfi", "wfe", "clrex", "udf", "dc", "ic", "at", "tlbi"}
PAIRS = {"ldp", "ldpsw", "ldnp", "ldaxp", "ldxp", "stp", "stnp", "stxp", "stlxp"}
EXCLUSIVE_STORES = re.compile(r"^stl?xr[bh]?$|^stl?xp$")
_VEC = re.compile(r"^[vqdshb]\d+$")


def reg(name: str | None) -> str | None:
    """x/w/fp/lr views of one register -> one name; zero registers -> None."""
    if not name or name in ("xzr", "wzr"):
        return None
    if name == "fp":
        return "x29"
    if name == "lr":
        return "x30"
    if name == "wsp":
        return "sp"
    if name[0] == "w" and name[1:].isdigit():
        return "x" + name[1:]
    if _VEC.match(name):
        return "v" + name[1:]
    return name


def _regs(insn, ops) -> list[str]:
    out = []
    for op in ops:
        if op.type == _REG:
            r = reg(insn.reg_name(op.reg))
            if r is not None:
                out.append(r)
    return out


def _mem(insn):
    for op in insn.operands:
        if op.type == _MEM:
            return op
    return None


def _class(m: str, insn, vec: bool) -> str:
    if m in MUL:
        return "mul"
    if m in DIV:        # the W form iterates over half the bits
        return "div_w" if insn.reg_name(insn.operands[0].reg).startswith("w") else "div"
    if vec or m.startswith("f") or insn.group(A.ARM64_GRP_FPARMV8):
        return "vec" if vec and not m.startswith("f") else "fp"
    shifted = any(op.type == _REG and (op.shift.type != 0 or op.ext != 0) for op in insn.operands)
    return "alu_shift" if shifted else "alu"


def decode(insn) -> Op:
    m = insn.mnemonic
    base = m.split(".")[0]
    ops = insn.operands
    size = insn.size
    if base == "b" and "." in m:
        return make_op(m, "branch", (PRIMARY,), (), (FLAGS,), branch=True, cond=True, size=size)
    if base in BRANCHES:
        srcs = _regs(insn, ops)
        if base.startswith("ret") and not srcs:
            srcs = ["x30"]
        if base in ("cbz", "cbnz", "tbz", "tbnz"):
            srcs = srcs[:1]
        links: tuple[str, ...] = ("x30",) if base.startswith("bl") else ()
        return make_op(m, "branch", (PRIMARY,), links, tuple(srcs), branch=True,
                       cond=base in COND_BRANCHES, size=size)
    if base in SYSTEM:
        return make_op(m, "system", (PRIMARY,), tuple(_regs(insn, ops)[:1]) if base == "mrs" else (),
                       (), size=size)
    if base in NOPS:
        return make_op(m, "nop", (), (), (), size=size)
    mem = _mem(insn)
    regs = _regs(insn, ops)
    vec = any(r.startswith("v") for r in regs) or insn.group(A.ARM64_GRP_NEON)
    if base.startswith("ld") and (mem is not None or any(op.type == _IMM for op in ops)):
        return _load(insn, m, base, mem, regs, vec)
    if base.startswith("st") and mem is not None:
        return _store(insn, m, base, mem, regs, vec)
    cls = _class(base, insn, vec)
    if base in COMPARES:
        srcs = regs + ([FLAGS] if base in FLAG_READERS else [])
        return make_op(m, cls, (PRIMARY,), (FLAGS,), tuple(srcs), size=size)
    dsts, srcs = regs[:1], regs[1:]
    if base in READS_DST:
        srcs = regs[:1] + srcs
    if base in FLAG_READERS:
        srcs = srcs + [FLAGS]
    if base in FLAG_SETTERS:
        dsts = dsts + [FLAGS]
    return make_op(m, cls, (PRIMARY,), tuple(dsts), tuple(srcs), size=size)


def _addr_regs(insn, mem) -> list[str]:
    if mem is None:
        return []
    return [r for r in (reg(insn.reg_name(mem.mem.base)) if mem.mem.base else None,
                        reg(insn.reg_name(mem.mem.index)) if mem.mem.index else None) if r]


def _writeback(insn, mem) -> tuple:
    """The base register update of pre/post-indexed forms: an ALU op beside the access."""
    if not insn.writeback or mem is None or not mem.mem.base:
        return ()
    b = reg(insn.reg_name(mem.mem.base))
    return ((b, b, ("alu",)),)


def _load(insn, m, base, mem, regs, vec) -> Op:
    addr = _addr_regs(insn, mem)
    dsts = regs[:2 if base in PAIRS else 1]      # register operands; the address is the mem operand
    cls = "load_pair" if base in PAIRS else ("vec_load" if vec else "load")
    if mem is not None and mem.mem.index:
        cls = "load_ext" if cls == "load" else cls
    wb = _writeback(insn, mem)
    uses = (PRIMARY,) + (("alu",) if wb else ())
    return make_op(m, cls, uses, tuple(dsts), (), tuple(addr), extra_edges=wb, size=insn.size)


def _store(insn, m, base, mem, regs, vec) -> Op:
    addr = _addr_regs(insn, mem)
    data = [r for r in _regs(insn, [op for op in insn.operands if op.type == _REG])]
    dsts: list[str] = []
    if EXCLUSIVE_STORES.match(base):
        dsts, data = data[:1], data[1:]
    cls = "store_pair" if base in PAIRS else ("vec_store" if vec else "store")
    if mem.mem.index and cls == "store":
        cls = "store_ext"
    wb = _writeback(insn, mem)
    uses = (PRIMARY,) + (("alu",) if wb else ())
    return make_op(m, cls, uses, tuple(dsts), tuple(data), tuple(addr), extra_edges=wb, size=insn.size)


# --- llvm-mca, the model's oracle (mca.py, corpus.py) -----------------------------------------
LLVM_TRIPLE = "aarch64"
MCA_SYNTAX: int | None = None              # llvm-mc reads capstone's default syntax
_BRANCH_IMM = re.compile(r"#0x[0-9a-f]+$|#-?\d+$")
# Instructions llvm-mca cannot meaningfully time as straight-line code.
UNMODELLED = frozenset((
    "bl", "blr", "svc", "hvc", "smc", "brk", "hlt", "mrs", "msr", "isb", "dsb", "dmb",
    "sys", "sysl", "eret", "wfi", "wfe", "sev", "sevl", "yield", "clrex", "udf",
    "ldxr", "ldaxr", "stxr", "stlxr", "ldxp", "stxp", "ldaxp", "stlxp", "ldxrb",
    "ldaxrb", "stxrb", "stlxrb", "ldxrh", "ldaxrh", "stxrh", "stlxrh", "paciasp",
    "autiasp", "bti", "hint", "dc", "ic", "at", "tlbi", "prfm"))


def mca_branch(insn, text: str) -> str:
    """A branch as llvm-mc reads it back: an immediate target becomes `.`."""
    return _BRANCH_IMM.sub(".", text)


def unmodelled_form(insn) -> bool:
    """Beyond the mnemonic table, nothing on arm64."""
    return False
