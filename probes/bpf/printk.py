"""bpf_trace_printk formatting (kernel/bpf/helpers.c bpf_bprintf_prepare).

The kernel accepts a restricted printf: flags ``-+ #0``, a width and a
precision in digits, ``l``/``ll`` length, and the conversions ``d i u x X
c s p`` (``%pK %px %pks %pus`` too), at most three arguments. Anything
else makes the helper return -EINVAL. Strings are read with the string
reader the caller passes (machine regions, then guest memory).
"""
from __future__ import annotations

import re
from typing import Callable

MAX_TRACE_PRINTK_ARGS = 3
MAX_STR_LEN = 1024

_SPEC = re.compile(r"%(?P<flags>[-+ #0]*)(?P<width>\d*)(?:\.(?P<prec>\d+))?"
                   r"(?P<len>ll|l|z)?(?P<conv>[diuxXcsp%]|$)(?P<ptr>ks|us|K|x)?")


class FormatError(ValueError):
    """The format uses something the kernel's trace_printk refuses."""


def _int_arg(value: int, conv: str, length: str | None) -> int:
    bits = 64 if length else 32
    value &= (1 << bits) - 1
    if conv in "di" and value >> (bits - 1):
        value -= 1 << bits
    return value


def _render(spec: re.Match[str], value: int, read_str: Callable[[int, int], bytes]) -> str:
    conv, flags = spec["conv"], spec["flags"]
    width, prec = spec["width"], spec["prec"]
    if conv == "p":
        if spec["ptr"] in ("ks", "us"):
            conv, text = "s", _safe_str(read_str, value)
        else:
            conv, text = "x", format(value & ((1 << 64) - 1), "x")
            return _pad(text if spec["ptr"] == "x" else "0x" + text, flags, width)
    elif conv == "s":
        text = _safe_str(read_str, value)
    elif conv == "c":
        text = chr(value & 0xFF)
    else:
        pyfmt = "%" + flags + width + (f".{prec}" if prec else "") + \
            {"i": "d", "u": "d"}.get(conv, conv)
        return pyfmt % _int_arg(value, conv, spec["len"])
    if conv == "s" and prec:
        text = text[:int(prec)]
    return _pad(text, flags, width)


def _pad(text: str, flags: str, width: str) -> str:
    if not width:
        return text
    return text.ljust(int(width)) if "-" in flags else text.rjust(int(width))


def _safe_str(read_str: Callable[[int, int], bytes], addr: int) -> str:
    try:
        return read_str(addr, MAX_STR_LEN).decode("latin-1")
    except Exception:  # the kernel prints this for a faulting string pointer
        return "(efault)"


def trace_printk_format(fmt: bytes, args: list[int],
                        read_str: Callable[[int, int], bytes]) -> str:
    """Format like bpf_trace_printk, or raise FormatError."""
    text = fmt.split(b"\0", 1)[0].decode("latin-1")
    out, pos, used = [], 0, 0
    for spec in re.finditer(r"%", text):
        if spec.start() < pos:
            continue
        m = _SPEC.match(text, spec.start())
        if m is None or m["conv"] == "":
            raise FormatError(f"bad conversion at {text[spec.start():spec.start() + 4]!r}")
        out.append(text[pos:spec.start()])
        pos = m.end()
        if m["conv"] == "%":
            out.append("%")
            continue
        if m["conv"] != "p" and m["ptr"]:
            pos -= len(m["ptr"])  # "%sK" is "%s" then a literal K
        if used >= MAX_TRACE_PRINTK_ARGS:
            raise FormatError("too many arguments")
        out.append(_render(m, args[used], read_str))
        used += 1
    out.append(text[pos:])
    return "".join(out)
