"""Probe locations, `SYM[+OFF]|ADDR[%return]`: the one parser every layer uses (kprobe_events'
argv[1], --kprobe, `emu inspect`, the pytest lab, libbpf's SEC targets).

It follows trace_kprobe_create: an address is kstrtoul's (0x hex, leading-0 octal,
decimal); otherwise traceprobe_split_symbol_offset splits at the first `+`/`-` after the
name's first character and reads the offset with kstrtol; `%return` is the only suffix.
One extension for C++: a `+`/`-` inside brackets (a demangled argument list or template)
or right after `operator` belongs to the name. Errors carry the kernel's error_log code
(BAD_PROBE_ADDR, BAD_ADDR_SUFFIX) and caret position, and a finer `why` for one-line
messages. Resolving a name is the symbol table's job, not the parser's."""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from emu.errors import UsageError

U32_MAX = 0xFFFFFFFF            # struct kprobe's offset is an unsigned int


class LocationFault(StrEnum):
    """What is wrong with a location; the value is the message's wording."""
    NO_SYMBOL = "no symbol name"
    BAD_OFFSET = "bad offset"
    NEGATIVE_OFFSET = "negative offset"
    BIG_OFFSET = "offset too large"
    BAD_SUFFIX = "bad suffix (only %return)"

    @property
    def code(self) -> str:
        """The kernel's error_log code for it (trace_probe.h ERRORS)."""
        return "BAD_ADDR_SUFFIX" if self is LocationFault.BAD_SUFFIX else "BAD_PROBE_ADDR"


class LocationError(UsageError):
    """A location that does not parse: `why` (LocationFault), `code` (the kernel's
    error_log code), `pos` (the caret's column in `text`)."""

    def __init__(self, why: LocationFault, text: str, pos: int = 0) -> None:
        self.why, self.text, self.pos = why, text, pos
        self.code = why.code
        super().__init__(f"{text}: {why.value}")


@dataclass(frozen=True)
class ProbeLocation:
    """A parsed probe point: `symbol` + `offset`, or `addr`; `is_return` for `%return`."""
    symbol: str | None
    offset: int
    addr: int | None
    is_return: bool = False

    def __str__(self) -> str:
        base = f"{self.addr:#x}" if self.addr is not None else str(self.symbol)
        if self.offset:
            base += f"+{self.offset:#x}"
        return base + ("%return" if self.is_return else "")


def kstrtoul(text: str, base: int = 0) -> int | None:
    """kstrtoul: a leading '+' allowed; base 0 reads `0x` hex, a leading 0 octal, else
    decimal; base 10 decimal digits only. None if anything else is in the text."""
    t = text[1:] if text.startswith("+") else text
    if base == 10:
        return int(t) if re.fullmatch(r"[0-9]+", t) else None
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", t):
        return int(t, 16)
    if re.fullmatch(r"0[0-7]*", t):
        return int(t, 8)
    if re.fullmatch(r"[1-9][0-9]*", t):
        return int(t)
    return None


def kstrtol(text: str) -> int | None:
    if text.startswith("-"):
        v = kstrtoul(text[1:]) if not text[1:].startswith("+") else None
        return None if v is None else -v
    return kstrtoul(text)


_OPERATOR = re.compile(r"operator\W{0,2}$")


def _offset_split(text: str) -> int | None:
    """Where the offset starts: the first `+`/`-` after the first character at bracket
    depth 0 that does not spell an operator's name; None if there is none."""
    depth = 0
    for i, c in enumerate(text):
        if c in "(<[":
            depth += 1
        elif c in ")>]" and depth:
            depth -= 1
        elif c in "+-" and i and not depth and not _OPERATOR.search(text, 0, i):
            return i
    return None


def split_symbol_offset(text: str) -> tuple[str, int] | None:
    """traceprobe_split_symbol_offset: `SYM[+|-OFFS]` -> (sym, offs); None if OFFS is junk."""
    i = _offset_split(text)
    if i is None:
        return text, 0
    off = kstrtol(text[i:])
    return None if off is None else (text[:i], off)


def _offset_fault(text: str) -> LocationFault:
    i = _offset_split(text)
    tail = text[i:] if i is not None else ""
    if tail.startswith("-") or tail.startswith("+-"):
        return LocationFault.NEGATIVE_OFFSET if kstrtol(tail.lstrip("+")) is not None \
            else LocationFault.BAD_OFFSET
    return LocationFault.BAD_OFFSET


def parse_probe_location(text: str, *, suffix: bool = False) -> ProbeLocation:
    """`SYM[+OFF]|ADDR`, and with `suffix` also `...%return`. Raises LocationError."""
    addr = kstrtoul(text) if not text.startswith("+") else None
    if addr is not None:
        return ProbeLocation(None, 0, addr)
    sym, is_return = text, False
    pct = text.find("%") if suffix else -1
    if pct >= 0:
        if text[pct:] != "%return":
            raise LocationError(LocationFault.BAD_SUFFIX, text, pct)
        sym, is_return = text[:pct], True
    split = split_symbol_offset(sym)
    if split is None:
        raise LocationError(_offset_fault(sym), text)
    name, offset = split
    if not name:
        raise LocationError(LocationFault.NO_SYMBOL, text)
    if offset < 0:
        raise LocationError(LocationFault.NEGATIVE_OFFSET, text)
    if offset > U32_MAX:
        raise LocationError(LocationFault.BIG_OFFSET, text)
    return ProbeLocation(name, offset, None, is_return)
