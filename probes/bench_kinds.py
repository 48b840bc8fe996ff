"""The probe kinds of the kernel's overhead table (Documentation/trace/kprobes.rst), as
`emu bench` places them: k (kprobe), b (boosted), o (optimized), f (on an ftrace site),
r (kretprobe), rb, ro, kr (kprobe + kretprobe on one function).

`setup_kind(kind, lab, func)` registers the probe(s) of one kind on guest function `func`
and returns them; a kind not implemented yet raises NotImplementedError (the bench prints
"n/a" for it). `KIND_GUESTS` names the guest each kind is measured on."""
from __future__ import annotations

from probes.kprobes import Kprobe

KINDS = ("k", "b", "o", "f", "r", "rb", "ro", "kr")

# kind -> (firmware ELF name, probed function, function the bench calls, its argument).
# The argument is the number of calls of the probed function per bench call (hot_call(n)
# calls hot_leaf n times); for the ftrace variant, fib(n) calls fib fib_calls(n) times.
KIND_GUESTS: dict[str, tuple[str, str, str, int]] = {
    "k": ("hotloop", "hot_leaf", "hot_call", 2000),
    "b": ("hotloop", "hot_leaf", "hot_call", 2000),
    "o": ("hotloop", "hot_leaf", "hot_call", 2000),
    "f": ("recurse.ftrace", "fib", "fib", 15),
    "r": ("hotloop", "hot_leaf", "hot_call", 2000),
    "rb": ("hotloop", "hot_leaf", "hot_call", 2000),
    "ro": ("hotloop", "hot_leaf", "hot_call", 2000),
    "kr": ("hotloop", "hot_leaf", "hot_call", 2000),
}


def _empty_pre(p, regs) -> int:
    return 0


def _empty_post(p, regs, flags) -> None:
    pass


def setup_kind(kind: str, lab, func: str) -> list:
    """Register the probe(s) of `kind` on `func` in `lab` (a probes.testing.ProbeLab)."""
    if kind == "k":
        # A post_handler keeps the probe from being boosted: every hit single-steps.
        p = Kprobe(symbol_name=func, pre_handler=_empty_pre, post_handler=_empty_post)
        lab.kprobes.register_kprobe(p)
        return [p]
    if kind in KINDS:
        raise NotImplementedError(f"probe kind {kind!r} is not implemented yet")
    raise ValueError(f"unknown probe kind {kind!r} (one of {', '.join(KINDS)})")
