"""kernel/trace/trace_events_filter.c: event filters in the kernel's grammar, evaluated on
the binary record before it is committed.

    expr := term { "||" term } ; term := factor { "&&" factor }
    factor := "!" factor | "(" expr ")" | FIELD OP VALUE
    OP := == != < <= > >= & (numbers)  |  == != ~ (strings; ~ is a glob)

Fields are the event's and the common_* ones, plus `comm` and `cpu` (the kernel's generic
fields). Errors carry the kernel's text and the column they point at (`pos`).
Left out: `.function` / `.hex` field modifiers, cpumask fields, subsystem filters."""
from __future__ import annotations

import ctypes
import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from emu.errors import UsageError

if TYPE_CHECKING:
    from probes.trace.trace_events import TraceEventCall

MAX_FILTER_STR_VAL = 256
MAX_FILTER_PRED = 16384

# trace_events_filter.c ERRORS
FILTER_ERRORS = {
    "INVALID_OP": "Illegal operation for field type",
    "TOO_MANY_OPEN": "Too many '('",
    "TOO_MANY_CLOSE": "Too few '('",
    "MISSING_QUOTE": "Missing matching quote",
    "OPERAND_TOO_LONG": "Operand too long",
    "EXPECT_STRING": "Expecting string field",
    "EXPECT_DIGIT": "Expecting numeric field",
    "ILLEGAL_FIELD_OP": "Illegal operation for field type",
    "FIELD_NOT_FOUND": "Field not found",
    "ILLEGAL_INTVAL": "Illegal integer value",
    "TOO_MANY_PREDS": "Too many terms in predicate expression",
    "INVALID_FILTER": "Meaningless filter expression",
    "INVALID_VALUE": "Invalid value (did you forget quotes)?",
}


class FilterError(UsageError):
    """A refused filter: `code` (FILTER_ERRORS), `pos` (column in the filter text)."""

    def __init__(self, code: str, pos: int) -> None:
        self.code, self.pos = code, pos
        self.message = FILTER_ERRORS[code]
        super().__init__(self.message)

    def file_text(self, text: str) -> str:
        """What reading the `filter` file shows after the failed write."""
        return f"{text}\n{' ' * self.pos}^\nparse_error: {self.message}"


_TOKEN = re.compile(r"\s*(?:(?P<op>\|\||&&|==|!=|<=|>=|[<>&~!()])|(?P<quote>[\"'])|"
                    r"(?P<word>[^\s()&|<>=!~\"']+))")

Pred = Callable[[bytes, str, int], bool]          # (record, comm, cpu) -> bool
NUM_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
           "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
           "&": lambda a, b: (a & b) != 0}
STR_OPS = ("==", "!=", "~")


@dataclass
class Token:
    kind: str          # op, word, str, end
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    out, i = [], 0
    while i < len(text):
        i += len(text[i:]) - len(text[i:].lstrip())
        if i >= len(text):
            break
        m = _TOKEN.match(text, i)
        if m is None:
            raise FilterError("INVALID_OP", i)
        start = m.start(m.lastgroup)
        if m.lastgroup == "quote":
            q = m.group("quote")
            end = text.find(q, start + 1)
            if end < 0:
                raise FilterError("MISSING_QUOTE", start)
            val = text[start + 1:end]
            if len(val) >= MAX_FILTER_STR_VAL:
                raise FilterError("OPERAND_TOO_LONG", start)
            out.append(Token("str", val, start))
            i = end + 1
            continue
        out.append(Token("op" if m.lastgroup == "op" else "word", m.group(m.lastgroup), start))
        i = m.end()
    out.append(Token("end", "", len(text)))
    return out


class _Parser:
    def __init__(self, call: "TraceEventCall", text: str) -> None:
        self.call, self.text = call, text
        self.toks = tokenize(text)
        self.i = 0
        self.preds = 0
        self._check_parens()

    def _check_parens(self) -> None:
        depth = 0
        for t in self.toks:
            if t.kind == "op" and t.text == "(":
                depth += 1
            elif t.kind == "op" and t.text == ")":
                depth -= 1
                if depth < 0:
                    raise FilterError("TOO_MANY_CLOSE", t.pos)
        if depth > 0:
            opens = [t for t in self.toks if t.text == "(" and t.kind == "op"]
            raise FilterError("TOO_MANY_OPEN", opens[-1].pos)

    def peek(self) -> Token:
        return self.toks[self.i]

    def take(self) -> Token:
        t = self.toks[self.i]
        self.i += 1
        return t

    def parse(self) -> Pred:
        if self.peek().kind == "end":
            raise FilterError("INVALID_FILTER", 0)
        pred = self.expr()
        if self.peek().kind != "end":
            raise FilterError("INVALID_FILTER", self.peek().pos)
        return pred

    def expr(self) -> Pred:
        left = self.term()
        while self.peek().text == "||" and self.peek().kind == "op":
            self.take()
            right, l0 = self.term(), left
            left = _native(lambda d, c, n, a=l0, b=right: a(d, c, n) or b(d, c, n),
                           _postfix(F_OR, l0, right))
        return left

    def term(self) -> Pred:
        left = self.factor()
        while self.peek().text == "&&" and self.peek().kind == "op":
            self.take()
            right, l0 = self.factor(), left
            left = _native(lambda d, c, n, a=l0, b=right: a(d, c, n) and b(d, c, n),
                           _postfix(F_AND, l0, right))
        return left

    def factor(self) -> Pred:
        t = self.peek()
        if t.kind == "op" and t.text == "!":
            self.take()
            inner = self.factor()
            return _native(lambda d, c, n: not inner(d, c, n), _postfix(F_NOT, inner))
        if t.kind == "op" and t.text == "(":
            self.take()
            inner = self.expr()
            if self.take().text != ")":
                raise FilterError("TOO_MANY_OPEN", t.pos)
            return inner
        return self.predicate()

    def predicate(self) -> Pred:
        ft = self.take()
        if ft.kind != "word":
            raise FilterError("INVALID_FILTER", ft.pos)
        self.preds += 1
        if self.preds > MAX_FILTER_PRED:
            raise FilterError("TOO_MANY_PREDS", ft.pos)
        op = self.take()
        if op.kind != "op" or op.text not in NUM_OPS and op.text != "~":
            raise FilterError("INVALID_OP", op.pos)
        val = self.take()
        if val.kind not in ("word", "str"):
            raise FilterError("INVALID_FILTER" if val.kind == "end" else "INVALID_VALUE", val.pos)
        getter, is_string, signed = self.field(ft)
        if is_string:
            return _string_pred(getter, op, val)
        pred = _number_pred(getter, op, val, signed)
        where = self._native_field(ft.text)
        if where is not None:
            pred.native = _num_op(where, signed, op.text, pred.num)  # type: ignore[attr-defined]
        return pred

    def field(self, t: Token):
        name = t.text
        if name in ("comm", "COMM"):
            return (lambda d, c, n: c.encode()), True, False
        if name in ("cpu", "CPU"):
            return (lambda d, c, n: n), False, False
        f = self.call.find_field(name)
        if f is None:
            raise FilterError("FIELD_NOT_FOUND", t.pos)
        if f.count and not f.is_string:
            raise FilterError("INVALID_OP", t.pos)
        return (lambda d, c, n: f.value(d)), f.is_string, f.signed

    def _native_field(self, name: str) -> tuple[int, int] | None:
        """(offset, size) of a plain integer field for the native evaluator; (-1, 0) for
        cpu; None if it cannot read it."""
        if name in ("cpu", "CPU"):
            return -1, 0
        f = self.call.find_field(name)
        if f is None or f.count or f.is_string or f.size not in (1, 2, 4, 8) \
                or f.ctype.startswith("__data_loc"):
            return None
        return f.offset, f.size


def _string_pred(getter, op: Token, val: Token) -> Pred:
    if op.text not in STR_OPS:
        raise FilterError("ILLEGAL_FIELD_OP", op.pos)
    want = val.text.encode()
    if op.text == "~":
        pat = val.text

        def glob(d, c, n):
            v = getter(d, c, n)
            return v is not None and fnmatch.fnmatchcase(v.decode("latin-1"), pat)
        return glob
    eq = op.text == "=="
    return lambda d, c, n: (getter(d, c, n) == want) == eq


def _number_pred(getter, op: Token, val: Token, signed: bool) -> Pred:
    if op.text == "~":
        raise FilterError("ILLEGAL_FIELD_OP", op.pos)
    if val.kind == "str":
        raise FilterError("ILLEGAL_INTVAL", val.pos)
    from probes.trace.trace_probe import kstrtol
    num = kstrtol(val.text)
    if num is None:
        raise FilterError("ILLEGAL_INTVAL", val.pos)
    fn = NUM_OPS[op.text]
    if not signed and num < 0:
        num &= (1 << 64) - 1
    pred = _native(lambda d, c, n: fn(getter(d, c, n), num), None)
    pred.num = num                          # type: ignore[attr-defined]
    return pred


# --- the native evaluator's form (probes/native kprobe_native.c filter_match) ---------------
# Postfix, two words an op: opcode | size << 8 | signed << 16 | comparison << 24 |
# offset << 32, then the constant.
F_END, F_NUM, F_CPU, F_AND, F_OR, F_NOT = range(6)
CMP_CODES = {"==": 0, "!=": 1, "<": 2, "<=": 3, ">": 4, ">=": 5, "&": 6}
NativeOps = list[int] | None


def _native(pred: Pred, ops: NativeOps) -> Pred:
    pred.native = ops                       # type: ignore[attr-defined]
    return pred


def _postfix(op: int, *parts: Pred) -> NativeOps:
    out: list[int] = []
    for p in parts:
        ops = getattr(p, "native", None)
        if ops is None:
            return None
        out += ops
    return out + [op, 0]


def _num_op(where: tuple[int, int], signed: bool, op: str, num: int) -> NativeOps:
    off, size = where
    lo, hi = (-(1 << 63), (1 << 63) - 1) if signed and off >= 0 else (0, (1 << 64) - 1)
    if not lo <= num <= hi or off > 0xFFFF:
        return None
    kind = F_CPU if off < 0 else F_NUM
    word = kind | size << 8 | int(signed and off >= 0) << 16 | CMP_CODES[op] << 24 | max(off, 0) << 32
    return [word, num & ((1 << 64) - 1)]


@dataclass
class EventFilter:
    """struct event_filter: the text and the compiled predicate; `native()` is its program
    for the C hit path's evaluator (numeric fields and cpu against constants, &&, ||, !),
    or None when it uses more (strings, comm)."""
    text: str
    pred: Pred

    def match(self, data: bytes, comm: str = "", cpu: int = 0) -> bool:
        return bool(self.pred(data, comm, cpu))

    def native(self) -> Any:
        """The program as a ctypes array (kept with the filter), or None."""
        prog = self.__dict__.get("_native", False)
        if prog is False:
            ops = getattr(self.pred, "native", None)
            prog = None if ops is None else (ctypes.c_uint64 * (len(ops) + 2))(*ops, F_END, 0)
            self.__dict__["_native"] = prog
        return prog


def create_filter(call: "TraceEventCall", text: str) -> EventFilter:
    return EventFilter(text, _Parser(call, text).parse())
