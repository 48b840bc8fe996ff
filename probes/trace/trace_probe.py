"""kernel/trace/trace_probe.c: the fetch-argument and type parser shared by probe events,
the `SYM[+OFF]|ADDR` location parser, and the error codes error_log shows with a caret.

An argument parses into a `FetchArg`: a base (register, stack slot, $argN, $retval, $comm,
immediate, memory address), a chain of dereferences, and a type; `fetch()` evaluates it on
a hit through emu/uaccess (a fault gives 0, or "(fault)" for strings, as the kernel).
Left out: BTF argument names ($args, bare identifiers), uprobe file offsets, symstr of data."""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from emu.errors import UsageError
from emu.uaccess import UserFault, copy_from_user, get_user, strncpy_from_user
from probes.location import LocationError, ProbeLocation, kstrtol, kstrtoul, split_symbol_offset
from probes.location import parse_probe_location as parse_location

if TYPE_CHECKING:
    from emu.arch.base import Arch
    from emu.symbols import SymbolTable
    from probes.regs import PtRegs

MAX_TRACE_ARGS = 128
MAX_ARGSTR_LEN = 63
MAX_ARG_NAME_LEN = 32
MAX_EVENT_NAME_LEN = 64
MAX_ARRAY_LEN = 64
FETCH_INSN_MAX = 16
MAX_STRING_SIZE = 4096               # PATH_MAX: longest string a fetch copies
PARAM_MAX_STACK = 16384 // 8         # THREAD_SIZE / sizeof(long)
KRETPROBE_MAXACTIVE_MAX = 4096
MAX_EVENT_SIZE = 3072                # PAGE_SIZE - ... : the kernel's EVENT_TOO_BIG bound
FAULT_STRING = "(fault)"
RESERVED_FIELD_NAMES = ("common_type", "common_flags", "common_preempt_count", "common_pid",
                        "common_tgid", "__probe_ip", "__probe_ret_ip", "__probe_func")

# kernel/trace/trace_probe.h ERRORS (texts verbatim, the kernel's "valiable" typo included)
ERRORS = {
    "FILE_NOT_FOUND": "Failed to find the given file",
    "NO_REGULAR_FILE": "Not a regular file",
    "BAD_REFCNT": "Invalid reference counter offset",
    "REFCNT_OPEN_BRACE": "Reference counter brace is not closed",
    "BAD_REFCNT_SUFFIX": "Reference counter has wrong suffix",
    "BAD_UPROBE_OFFS": "Invalid uprobe offset",
    "BAD_MAXACT_TYPE": "Maxactive is only for function exit",
    "BAD_MAXACT": "Invalid maxactive number",
    "MAXACT_TOO_BIG": "Maxactive is too big",
    "BAD_PROBE_ADDR": "Invalid probed address or symbol",
    "NON_UNIQ_SYMBOL": "The symbol is not unique",
    "BAD_RETPROBE": "Retprobe address must be an function entry",
    "NO_TRACEPOINT": "Tracepoint is not found",
    "BAD_ADDR_SUFFIX": "Invalid probed address suffix",
    "NO_GROUP_NAME": "Group name is not specified",
    "GROUP_TOO_LONG": "Group name is too long",
    "BAD_GROUP_NAME": "Group name must follow the same rules as C identifiers",
    "NO_EVENT_NAME": "Event name is not specified",
    "EVENT_TOO_LONG": "Event name is too long",
    "BAD_EVENT_NAME": "Event name must follow the same rules as C identifiers",
    "EVENT_EXIST": "Given group/event name is already used by another event",
    "RETVAL_ON_PROBE": "$retval is not available on probe",
    "NO_RETVAL": "This function returns 'void' type",
    "BAD_STACK_NUM": "Invalid stack number",
    "BAD_ARG_NUM": "Invalid argument number",
    "BAD_VAR": "Invalid $-valiable specified",
    "BAD_REG_NAME": "Invalid register name",
    "BAD_MEM_ADDR": "Invalid memory address",
    "BAD_IMM": "Invalid immediate value",
    "IMMSTR_NO_CLOSE": "String is not closed with '\"'",
    "FILE_ON_KPROBE": "File offset is not available with kprobe",
    "BAD_FILE_OFFS": "Invalid file offset value",
    "SYM_ON_UPROBE": "Symbol is not available with uprobe",
    "TOO_MANY_OPS": "Dereference is too much nested",
    "DEREF_NEED_BRACE": "Dereference needs a brace",
    "BAD_DEREF_OFFS": "Invalid dereference offset",
    "DEREF_OPEN_BRACE": "Dereference brace is not closed",
    "COMM_CANT_DEREF": "$comm can not be dereferenced",
    "BAD_FETCH_ARG": "Invalid fetch argument",
    "ARRAY_NO_CLOSE": "Array is not closed",
    "BAD_ARRAY_SUFFIX": "Array has wrong suffix",
    "BAD_ARRAY_NUM": "Invalid array size",
    "ARRAY_TOO_BIG": "Array number is too big",
    "BAD_TYPE": "Unknown type is specified",
    "BAD_STRING": "String accepts only memory argument",
    "BAD_SYMSTRING": "Symbol String doesn't accept data/userdata",
    "BAD_BITFIELD": "Invalid bitfield",
    "ARG_NAME_TOO_LONG": "Argument name is too long",
    "NO_ARG_NAME": "Argument name is not specified",
    "BAD_ARG_NAME": "Argument name must follow the same rules as C identifiers",
    "USED_ARG_NAME": "This argument name is already used",
    "ARG_TOO_LONG": "Argument expression is too long",
    "NO_ARG_BODY": "No argument expression",
    "BAD_INSN_BNDRY": "Probe point is not an instruction boundary",
    "FAIL_REG_PROBE": "Failed to register probe event",
    "DIFF_PROBE_TYPE": "Probe type is different from existing probe",
    "DIFF_ARG_TYPE": "Argument type or name is different from existing probe",
    "SAME_PROBE": "There is already the exact same probe event",
    "NOSUP_BTFARG": "BTF is not available or not supported",
    "NOFENTRY_ARGS": "$arg* can be used only on function entry or exit",
    "NEED_STRING_TYPE": "$comm and immediate-string only accepts string type",
    "TOO_MANY_ARGS": "Too many arguments are specified",
    "EVENT_TOO_BIG": "Event too big (too many fields?)",
}


class TraceProbeError(UsageError):
    """A refused probe command. `code` names the error (ERRORS), `index` the argv word it
    is in (0 = `p:...`, 1 = probe point, i+2 = i-th fetcharg), `offset` the column in that
    word, `errno` what the write returns. `command`/`pos` are filled in by the caller."""

    def __init__(self, code: str, index: int, offset: int, err: int = errno.EINVAL) -> None:
        self.code, self.index, self.offset, self.errno = code, index, offset, err
        self.command = ""
        self.pos = offset
        super().__init__(ERRORS[code])

    def place(self, argv: list[str]) -> "TraceProbeError":
        """Set `command` and the caret column `pos` as trace_probe_log_err computes them."""
        self.command = " ".join(argv)
        if self.index >= len(argv):
            self.pos = len(self.command) + 1
        else:
            self.pos = sum(len(a) + 1 for a in argv[: self.index]) + self.offset
        return self

    def log_lines(self, source: str = "trace_kprobe") -> tuple[str, str, str]:
        return (f"{source}: error: {ERRORS[self.code]}", f"  Command: {self.command}",
                " " * (11 + self.pos) + "^")

    def __str__(self) -> str:
        return "\n".join(self.log_lines())


def _err(code: str, offset: int, err: int = errno.EINVAL) -> TraceProbeError:
    return TraceProbeError(code, 0, offset, err)    # index set by the caller


# --- types -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FetchType:
    """struct fetch_type: `name`, `size` in the record, `signed`, how it prints (`kind`:
    u d x char symbol string) and the C type the format file shows."""
    name: str
    size: int
    signed: bool
    kind: str
    fmttype: str

    @property
    def is_string(self) -> bool:
        return self.kind == "string"

    def print_fmt(self) -> str:
        long = "L" if self.size == 8 else ""
        return {"u": f"%{long}u", "d": f"%{long}d", "x": f"0x%{long}x", "char": "'%c'",
                "symbol": "%pS", "string": '\\"%s\\"'}[self.kind]


def _basic_types() -> dict[str, FetchType]:
    out = {}
    for bits in (8, 16, 32, 64):
        out[f"u{bits}"] = FetchType(f"u{bits}", bits // 8, False, "u", f"u{bits}")
        out[f"s{bits}"] = FetchType(f"s{bits}", bits // 8, True, "d", f"s{bits}")
        out[f"x{bits}"] = FetchType(f"x{bits}", bits // 8, False, "x", f"u{bits}")
    out["char"] = FetchType("char", 1, False, "char", "u8")
    out["symbol"] = FetchType("symbol", 8, False, "symbol", "u64")
    for s in ("string", "ustring", "symstr"):
        out[s] = FetchType(s, 4, True, "string", "__data_loc char[]")
    return out


FETCH_TYPES = _basic_types()
DEFAULT_FETCH_TYPE = "x64"
_BITFIELD = re.compile(r"b(\d+)@(\d+)/(\d+)$")


@dataclass(frozen=True)
class Bitfield:
    width: int
    offset: int
    container: int       # bits

    def extract(self, v: int) -> int:
        c = self.container
        v = (v << (c - self.width - self.offset)) & ((1 << c) - 1)
        return v >> (c - self.width)


# --- fetch arguments ---------------------------------------------------------------------------
@dataclass
class FetchArg:
    """struct probe_arg: `name`, the original text `comm`, `type`, `count` (array size, 0 if
    none), `bitfield`, and the fetch program: `base` (kind, param), `derefs` [(offs, user)]
    innermost first, `mem` (the base is an address to load from: @ADDR/@SYM). `offset` is
    the field's place in the record (set when the event lays out its fields)."""
    name: str
    comm: str
    type: FetchType
    base: tuple[str, Any]
    derefs: list[tuple[int, bool]] = field(default_factory=list)
    mem: bool = False
    count: int = 0
    bitfield: Bitfield | None = None
    offset: int = 0
    type_text: str = ""

    def __post_init__(self) -> None:
        # A value stored as fetched (no memory, no string, no array): the hot path.
        self.plain = not (self.mem or self.derefs or self.type.is_string or self.count)
        self.mask = (1 << (8 * self.type.size)) - 1

    @property
    def is_memory(self) -> bool:
        return self.mem or bool(self.derefs)

    @property
    def dynamic(self) -> bool:
        return self.type.is_string

    @property
    def size(self) -> int:
        return self.type.size * (self.count or 1)

    def signature(self) -> tuple:
        """What must match when a probe is appended to an event (name, type, count)."""
        return (self.name, self.type.name, self.count, self.bitfield, self.offset)

    # --- evaluation (process_fetch_insn) ------------------------------------------------------
    def fetch(self, regs: "PtRegs", ctx: "FetchContext") -> Any:
        """The value to record: int, list of ints, bytes (string; None = fault)."""
        if self.plain:
            kind, param = self.base
            v = regs[param] if kind == "reg" else ctx.base_value(kind, param, regs)
            v &= self.mask
            return v if self.bitfield is None else self.bitfield.extract(v)
        try:
            addr = self._address(regs, ctx)
        except UserFault:
            return self._faulted()
        if not self.is_memory:
            if self.type.name == "symstr":   # the fetched value, symbolized
                return ctx.symbols.format(addr).encode()
            if self.type.is_string:          # $comm, immediate string
                return addr
            return self._fit(addr)
        try:
            if self.count:
                return [self._load(addr + i * self._elem_stride(), ctx) for i in range(self.count)]
            return self._load(addr, ctx)
        except UserFault:
            return self._faulted()

    def _elem_stride(self) -> int:
        return 8 if self.type.is_string else self.type.size

    def _faulted(self) -> Any:
        if self.count:
            return [None if self.type.is_string else 0] * self.count
        return None if self.type.is_string else 0

    def _address(self, regs: "PtRegs", ctx: "FetchContext") -> Any:
        kind, param = self.base
        v = ctx.base_value(kind, param, regs)
        if not self.derefs:
            return v
        mem = ctx.memory
        for offs, _user in self.derefs[:-1]:
            v = get_user(mem, (v + offs) & _U64, 8)
        return (v + self.derefs[-1][0]) & _U64

    def _load(self, addr: int, ctx: "FetchContext") -> Any:
        mem = ctx.memory
        if self.type.is_string:
            if self.type.name == "symstr":
                return ctx.symbols.format(get_user(mem, addr, 8)).encode()
            if self.count:                   # string[N]: an array of char pointers
                addr = get_user(mem, addr, 8)
            try:
                return strncpy_from_user(mem, addr, MAX_STRING_SIZE - 1)
            except UserFault:
                return None
        raw = copy_from_user(mem, addr, self.type.size)
        return self._fit(int.from_bytes(raw, "little"))

    def _fit(self, v: int) -> int:
        if isinstance(v, (bytes, bytearray)):
            return 0
        v &= (1 << (8 * self.type.size)) - 1
        if self.bitfield is not None:
            v = self.bitfield.extract(v)
        return v


_U64 = (1 << 64) - 1


@dataclass
class FetchContext:
    """What a fetch reads: the machine's memory and symbols, the task's comm, and the
    entry arguments saved for a return probe's $argN."""
    memory: Any
    symbols: "SymbolTable"
    arch: "Arch"
    comm: str = ""
    retval: int | None = None
    entry_args: tuple[int, ...] | None = None

    def base_value(self, kind: str, param: Any, regs: "PtRegs") -> Any:
        if kind == "reg":
            return regs[param]
        if kind == "imm" or kind == "mem" or kind == "regconst":
            return param
        if kind == "stack":
            return get_user(self.memory, regs.sp + 8 * param, 8)
        if kind == "stackp":
            return regs.sp
        if kind == "retval":
            return regs.return_value
        if kind == "arg":
            if self.entry_args is not None:
                return self.entry_args[param - 1] if param <= len(self.entry_args) else 0
            return regs.arg(param)
        if kind == "comm":
            return self.comm.encode()
        if kind == "immstr":
            return param.encode()
        raise ValueError(kind)


@dataclass
class ParseContext:
    """traceprobe_parse_context: the probe's kind and what names resolve against.
    `reg_names` is the arch's regs_query_register_offset table (kernel name -> pt_regs
    field), `reg_consts` the pt_regs fields that are no CPU register (x86 orig_ax)."""
    arch: "Arch"
    symbols: "SymbolTable"
    is_return: bool = False
    on_entry: bool = False           # TPARG_FL_FENTRY: $argN allowed
    reg_names: dict[str, str] = field(default_factory=dict)
    reg_consts: dict[str, int] = field(default_factory=dict)


def is_good_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name))


def is_good_system_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name))


def simple_strtoul(text: str) -> tuple[int, int]:
    """simple_strtoul(base 0): the value of the longest number at the start of `text` and
    how many characters it took (0: none)."""
    m = re.match(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*", text)
    if m is None:
        return 0, 0
    t = m.group()
    return int(t, 16 if t[1:2] in ("x", "X") else 8 if t[0] == "0" else 10), len(t)


# --- the argument parser (traceprobe_parse_probe_arg and parse_probe_arg) -------------------------
# The fetch_insn ops a program can end with, as finalize_fetch_insn tests them.
_BASE_OPS = {"reg": "REG", "regconst": "REG", "stack": "STACK", "stackp": "STACKP",
             "retval": "RETVAL", "arg": "ARG", "imm": "IMM", "comm": "COMM", "immstr": "DATA"}


@dataclass
class _Prog:
    """The fetch program being built. `ops` counts the fetch_insn slots used (the kernel
    has FETCH_INSN_MAX, the last one END); `final_at` is the parse context's offset when
    parsing ends (the outermost dereference moves it to its inner argument)."""
    base: tuple[str, Any] | None = None
    mem: bool = False
    derefs: list[tuple[int, bool]] = field(default_factory=list)
    ops: int = 0
    final_at: int = 0

    def add_op(self, offset: int) -> None:
        self.ops += 1
        if self.ops >= FETCH_INSN_MAX:          # ++code == end (slot 15 is END)
            raise _err("TOO_MANY_OPS", offset)

    def next_slot(self, code: str, offset: int, err: int = errno.EINVAL) -> None:
        """finalize_fetch_insn's `code++; if (code->op != FETCH_OP_NOP)`."""
        if self.ops >= FETCH_INSN_MAX - 1:
            raise _err(code, offset, err)
        self.ops += 1

    def last_op(self, ctx: ParseContext) -> str:
        if self.derefs:
            return "UDEREF" if self.derefs[-1][1] else "DEREF"
        if self.mem:
            return "DEREF"
        assert self.base is not None
        kind = self.base[0]
        if kind == "arg" and ctx.is_return:
            return "EDATA"                    # entry data a return probe saved
        return _BASE_OPS[kind]


def parse_probe_arg(arg: str, at: int, prog: _Prog, ctx: ParseContext) -> None:
    """One FETCHARG body without its type; `at` = column of `arg` in the argv word."""
    c = arg[:1]
    if c == "$":
        _parse_var(arg, at, prog, ctx)
    elif c == "%":
        _parse_reg(arg, at, prog, ctx)
    elif c == "@":
        _parse_mem(arg, at, prog, ctx)
    elif c and c in "+-":
        _parse_deref(arg, at, prog, ctx)
    elif c == "\\":
        _parse_imm(arg, at, prog)
    elif c.isalpha() or c == "_":
        # A BTF variable name: guests carry no BTF, as a kernel without
        # CONFIG_PROBE_EVENTS_BTF_ARGS answers.
        raise _err("NOSUP_BTFARG", at, errno.EOPNOTSUPP)
    else:
        raise _err("BAD_FETCH_ARG", at)


def _parse_reg(arg: str, at: int, prog: _Prog, ctx: ParseContext) -> None:
    """regs_query_register_offset: only the arch's kernel names."""
    field_name = ctx.reg_names.get(arg[1:])
    if field_name is None:
        raise _err("BAD_REG_NAME", at)
    if field_name in ctx.reg_consts:
        prog.base = ("regconst", ctx.reg_consts[field_name])
    else:
        prog.base = ("reg", field_name)
    prog.add_op(at)


def _parse_var(arg: str, at: int, prog: _Prog, ctx: ParseContext) -> None:
    """parse_probe_vars: $retval, $stack, $stackN, $comm, $argN (a prefix decides)."""
    name = arg[1:]
    if name.startswith("retval"):
        if not ctx.is_return:
            raise _err("RETVAL_ON_PROBE", at)
        prog.base = ("retval", None)
    elif name.startswith("stack"):
        if name == "stack":
            prog.base = ("stackp", None)
        else:
            n = kstrtoul(name[5:], 10) if name[5:6].isdigit() else None
            if n is None:
                raise _err("BAD_VAR", at)
            if n > PARAM_MAX_STACK:
                raise _err("BAD_STACK_NUM", at)
            prog.base = ("stack", n)
    elif name in ("comm", "COMM"):
        prog.base = ("comm", None)
    elif name.startswith("arg"):
        n = kstrtoul(name[3:], 10)
        if n is None:
            raise _err("BAD_VAR", at)
        if n == 0 or n > PARAM_MAX_STACK:
            raise _err("BAD_ARG_NUM", at)
        if not (ctx.on_entry or ctx.is_return):
            raise _err("NOFENTRY_ARGS", at)
        prog.base = ("arg", n)
    else:
        raise _err("BAD_VAR", at)
    prog.add_op(at)


def _parse_mem(arg: str, at: int, prog: _Prog, ctx: ParseContext) -> None:
    """`@ADDR` (IMM, DEREF) or `@SYM[+|-offs]` (SYMBOL, IMM, DEREF: three slots); the
    symbol is resolved as traceprobe_update_arg does at registration, whose failures are
    logged against the probe point."""
    if arg[1:2].isdigit():
        addr = kstrtoul(arg[1:])
        if addr is None:
            raise _err("BAD_MEM_ADDR", at)
        prog.add_op(at)                   # IMM
    elif arg[1:2] == "+":
        raise _err("FILE_ON_KPROBE", at)
    else:
        prog.add_op(at)                   # FETCH_NOP_SYMBOL
        prog.add_op(at)                   # IMM
        split = split_symbol_offset(arg[1:])
        if split is None:
            raise TraceProbeError("FAIL_REG_PROBE", 1, 0)
        sym = ctx.symbols.lookup(split[0]) if split[0] else None
        if sym is None:
            raise TraceProbeError("BAD_PROBE_ADDR", 1, 0, errno.ENOENT)
        addr = sym.addr + split[1]
    prog.base, prog.mem = ("mem", addr & _U64), True
    prog.add_op(at)                       # DEREF


def _parse_deref(arg: str, at: int, prog: _Prog, ctx: ParseContext) -> None:
    user = arg[1:2] == "u"
    sign = "-" if arg[0] == "-" else ""
    rest = arg[2:] if user else arg[1:]
    lp = rest.find("(")
    if lp < 0:
        raise _err("DEREF_NEED_BRACE", at)
    offs = kstrtol(sign + rest[:lp]) if rest[:lp] else None
    if offs is None:
        raise _err("BAD_DEREF_OFFS", at)
    # The kernel steps over the 'u' by moving the sign onto it and counts one character
    # for '+' only, so after `+u`/`-u` its column is one short of the inner argument.
    inner_at = at + 1 + lp + 1
    inner = rest[lp + 1:]
    rp = inner.rfind(")")
    if rp < 0:
        raise _err("DEREF_OPEN_BRACE", inner_at + len(inner))
    parse_probe_arg(inner[:rp], inner_at, prog, ctx)
    if not prog.derefs and not prog.mem and prog.base is not None \
            and prog.base[0] in ("comm", "immstr"):
        raise _err("COMM_CANT_DEREF", inner_at)
    prog.add_op(inner_at)
    prog.derefs.append((offs, user))
    prog.final_at = inner_at


def _parse_imm(arg: str, at: int, prog: _Prog) -> None:
    if arg[1:2] == '"':
        if len(arg) < 3 or not arg.endswith('"'):
            raise _err("IMMSTR_NO_CLOSE", at + len(arg))
        prog.base = ("immstr", arg[2:-1])
    else:
        t = arg[1:]
        v = kstrtoul(t) if t[:1].isdigit() else kstrtol(t) if t[:1] == "-" else \
            kstrtol(t[1:]) if t[:1] == "+" else None
        if v is None:
            raise _err("BAD_IMM", at + 1)
        prog.base = ("imm", v & _U64)
    prog.add_op(at)


def find_fetch_type(name: str) -> FetchType | None:
    """find_fetch_type: a bitfield `b<w>@<o>/<c>` is typed by its container u<c> alone."""
    if name.startswith("b"):
        slash = name.find("/")
        c = kstrtoul(name[slash + 1:]) if slash >= 0 else None
        return FETCH_TYPES.get(f"u{c}") if c in (8, 16, 32, 64) else None
    return FETCH_TYPES.get(name)


def parse_probe_arg_type(body: str, at: int) -> tuple[str, str | None, int]:
    """parse_probe_arg_type's split: (expression, type text or None, array count), with the
    array's errors; `at` = column of `body`."""
    colon = body.find(":")
    if colon < 0:
        return body, None, 0
    expr, tname = body[:colon], body[colon + 1:]
    lb = tname.find("[")
    if lb < 0:
        return expr, tname, 0
    num_at = at + colon + 1 + lb + 1
    num = tname[lb + 1:]
    rb = num.find("]")
    if rb < 0:
        raise _err("ARRAY_NO_CLOSE", num_at + len(num))
    if rb != len(num) - 1:
        raise _err("BAD_ARRAY_SUFFIX", num_at + rb + 1)
    count = kstrtoul(num[:rb])
    if not count or count > 0xFFFFFFFF:
        raise _err("BAD_ARRAY_NUM", num_at)
    if count > MAX_ARRAY_LEN:
        raise _err("ARRAY_TOO_BIG", num_at)
    return expr, tname[:lb], count


def parse_bitfield(text: str, ftype: FetchType) -> Bitfield | None:
    """__parse_bitfield_probe_arg: `b<w>@<o>/...` with simple_strtoul numbers."""
    bw, n = simple_strtoul(text[1:])
    if bw == 0 or text[1 + n:2 + n] != "@":
        return None
    rest = text[2 + n:]
    bo, n = simple_strtoul(rest)
    if n == 0 or rest[n:n + 1] != "/" or bw + bo > 8 * ftype.size:
        return None
    return Bitfield(bw, bo, 8 * ftype.size)


def traceprobe_parse_probe_arg(text: str, index: int, prev: list[FetchArg],
                               ctx: ParseContext) -> FetchArg:
    """`[NAME=]FETCHARG[:TYPE]`, the `index`-th argument (0-based; argv word index + 2)."""
    try:
        return _parse_arg(text, index, prev, ctx)
    except TraceProbeError as e:
        if e.code not in ("BAD_PROBE_ADDR", "FAIL_REG_PROBE"):
            e.index = index + 2
        raise


def _parse_arg(text: str, index: int, prev: list[FetchArg], ctx: ParseContext) -> FetchArg:
    eq = text.find("=")
    if eq >= 0:
        if eq > MAX_ARG_NAME_LEN:
            raise _err("ARG_NAME_TOO_LONG", 0)
        if eq == 0:
            raise _err("NO_ARG_NAME", 0)
        name, body, at = text[:eq], text[eq + 1:], eq + 1
    else:
        name, body, at = f"arg{index + 1}", text, 0
    if not is_good_name(name):
        raise _err("BAD_ARG_NAME", 0)
    if name in RESERVED_FIELD_NAMES or any(a.name == name for a in prev):
        raise _err("USED_ARG_NAME", 0)
    if len(body) > MAX_ARGSTR_LEN:
        raise _err("ARG_TOO_LONG", at, errno.E2BIG)
    if not body:
        raise _err("NO_ARG_BODY", at)
    expr, tname, count = parse_probe_arg_type(body, at)
    type_at = at + len(expr) + 1 if tname is not None else at
    if expr in ("$comm", "$COMM") or expr.startswith('\\"'):
        if count or (tname is not None and tname != "string"):
            raise _err("NEED_STRING_TYPE", type_at)
        ftype: FetchType | None = FETCH_TYPES["string"]
    else:
        ftype = find_fetch_type(tname if tname is not None else DEFAULT_FETCH_TYPE)
    if ftype is None:
        raise _err("BAD_TYPE", type_at)
    prog = _Prog(final_at=at)
    parse_probe_arg(expr, at, prog, ctx)
    bitfield = finalize_fetch_insn(prog, ftype, count, tname, type_at, ctx)
    assert prog.base is not None
    if ftype.is_string and prog.base is not None and prog.base[0] == "imm" and not prog.derefs:
        prog.mem = True                  # a string at the immediate address
    return FetchArg(name=name, comm=body, type=ftype, base=prog.base, derefs=prog.derefs,
                    mem=prog.mem, count=count, bitfield=bitfield, type_text=tname or "")


_SYMSTR_OPS = ("REG", "STACK", "RETVAL", "ARG", "DEREF")
_STRING_OPS = ("DEREF", "UDEREF", "IMM", "COMM", "DATA")


def finalize_fetch_insn(prog: _Prog, ftype: FetchType, count: int, tname: str | None,
                        type_at: int, ctx: ParseContext) -> Bitfield | None:
    """finalize_fetch_insn: the store op the type needs (checked against the last fetch op),
    the bitfield modifier, the array loop; each extra op takes a slot."""
    op = prog.last_op(ctx)
    if ftype.is_string:
        if ftype.name == "symstr":
            if op not in _SYMSTR_OPS:
                raise _err("BAD_SYMSTRING", type_at)
        elif op not in _STRING_OPS:
            raise _err("BAD_STRING", type_at)
        if ftype.name == "symstr" or op in ("IMM", "COMM", "DATA") or count:
            prog.next_slot("TOO_MANY_OPS", prog.final_at)
        store = "ST_USTRING" if ftype.name == "ustring" or op == "UDEREF" else \
            "ST_SYMSTR" if ftype.name == "symstr" else "ST_STRING"
    elif op in ("DEREF", "UDEREF"):
        store = "ST_MEM" if op == "DEREF" else "ST_UMEM"
    else:
        prog.next_slot("TOO_MANY_OPS", prog.final_at, errno.E2BIG)
        store = "ST_RAW"
    bitfield = None
    if tname is not None and tname.startswith("b"):
        bitfield = parse_bitfield(tname, ftype)
        if bitfield is None:
            raise _err("BAD_BITFIELD", type_at)
        prog.next_slot("BAD_BITFIELD", type_at)
    if count:
        if store not in ("ST_MEM", "ST_STRING", "ST_USTRING"):
            raise _err("BAD_STRING", type_at)
        prog.next_slot("TOO_MANY_OPS", prog.final_at, errno.E2BIG)
    return bitfield


# --- probe locations -------------------------------------------------------------------------------
def parse_probe_location(text: str, symbols: "SymbolTable",
                         module_loaded: Callable[[str], bool] | None = None) -> ProbeLocation:
    """`SYM[+offs]|MEMADDR[%return]` as trace_kprobe_create reads argv[1]; errors carry the
    kernel's code and column (index 1). `MOD:SYM` of a module that `module_loaded` says is
    not there is not checked: the module may come later (validate_probe_symbol)."""
    try:
        loc = parse_location(text, suffix=True)
    except LocationError as e:
        raise TraceProbeError(e.code, 1, e.pos) from None
    if loc.symbol is None:
        return loc
    mod, sep, _sym = loc.symbol.partition(":")
    if sep and module_loaded is not None and not module_loaded(mod):
        return loc
    found = [s for s in symbols.lookup_all(loc.symbol) if s.kind == "func"] \
        or symbols.lookup_all(loc.symbol)
    # validate_probe_symbol: both are parse errors, so the write returns -EINVAL
    if not found:
        raise TraceProbeError("BAD_PROBE_ADDR", 1, 0)
    if len({s.addr for s in found}) > 1:
        raise TraceProbeError("NON_UNIQ_SYMBOL", 1, 0)
    return loc


# --- the native fetch program (probes/native/kprobe_native.c eval_tprog) ------------------------
TP_END, TP_REG, TP_SP, TP_IMM, TP_STACK, TP_DEREF, TP_ADD, TP_ST_VAL, TP_ST_MEM, TP_ST_STR, \
    TP_FIXED = range(11)
STACK_FAULTS, STACK_PLAIN, STACK_ZERO = range(3)


def _tp_word(op: int, size: int = 0, offset: int = 0, bf: Bitfield | None = None) -> int:
    w = op | size << 8 | offset << 16
    if bf is not None:
        w |= bf.width << 32 | bf.offset << 40 | bf.container << 48
    return w


def _tp_base(a: FetchArg, arch: "Arch", is_return: bool = False) -> list[tuple[int, int]] | None:
    """The ops that load an argument's base value, or None if C does not model it. At a
    return, pt_regs shows ip as the real return address (C's pc is the trampoline's) and
    $argN are the values saved at entry: Python's."""
    from probes.regs import regs_facts
    kind, param = a.base
    if is_return and (kind == "arg" or (kind == "reg" and arch.aliases.get(param, param) == arch.pc)):
        return None
    if kind == "retval" and is_return:
        return [(TP_REG, arch.regs[arch.ret])] if arch.ret in arch.regs else None
    if kind == "reg":
        name = arch.aliases.get(param, param)
        if name in regs_facts(arch).zero_regs:
            return [(TP_IMM, 0)]
        return [(TP_REG, arch.regs[name])] if name in arch.regs else None
    if kind in ("imm", "mem", "regconst") and isinstance(param, int):
        return [(TP_IMM, param & _U64)]
    if kind == "stackp":
        return [(TP_SP, 0)]
    if kind == "stack":
        return [(_tp_word(TP_STACK, STACK_PLAIN if a.plain else STACK_FAULTS), param)]
    if kind == "arg":
        args = arch.args
        if param <= len(args):
            name = arch.aliases.get(args[param - 1], args[param - 1])
            return [(TP_REG, arch.regs[name])] if name in arch.regs else None
        if not regs_facts(arch).stack_args:
            return [(TP_IMM, 0)]
        return [(_tp_word(TP_STACK, STACK_ZERO), param - len(args))]
    return None                          # $retval, $comm, immediate strings


def compile_fetch_program(args: list[FetchArg], arch: "Arch", fixed_end: int,
                          is_return: bool = False) -> list[int] | None:
    """The fetch arguments of a kprobe event as the program C's eval_tprog runs (pairs of
    op word and operand; see kprobe_native.c), or None if one argument needs Python: an
    array, $comm or an immediate string, symstr, or at a return %ip or $argN."""
    prog = [TP_FIXED, fixed_end]
    for a in args:
        if a.count or a.type.name == "symstr" or (a.type.is_string and not a.is_memory):
            return None
        base = _tp_base(a, arch, is_return)
        if base is None:
            return None
        ops = list(base)
        for offs, _user in a.derefs[:-1]:
            ops.append((TP_DEREF, offs & _U64))
        if a.derefs:
            ops.append((TP_ADD, a.derefs[-1][0] & _U64))
        if a.plain:
            ops.append((_tp_word(TP_ST_VAL, a.type.size, a.offset, a.bitfield), 0))
        elif a.type.is_string:
            ops.append((_tp_word(TP_ST_STR, 4, a.offset), 0))
        else:
            ops.append((_tp_word(TP_ST_MEM, a.type.size, a.offset, a.bitfield), 0))
        for op, operand in ops:
            prog += [op, operand]
    return prog + [TP_END, 0]
