"""The probe kinds of the kernel's overhead table (Documentation/trace/kprobes.rst), as
`emu bench` places them: k (kprobe), b (boosted), o (optimized), f (on an ftrace site),
r (kretprobe), rb, ro, kr (kprobe + kretprobe on one function).

`setup_kind(kind, lab, func)` registers the probe(s) of one kind on guest function `func`
and returns them; a kind not implemented yet raises NotImplementedError (the bench prints
"n/a" for it). `KIND_GUESTS` names the guest each kind is measured on."""
from __future__ import annotations

from probes.kprobes import Kprobe
from probes.kretprobes import Kretprobe, kretprobes_of
from probes.optprobes import enable_optprobes

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


def _kprobe(lab, func: str, post: bool = False) -> Kprobe:
    p = Kprobe(symbol_name=func, pre_handler=_empty_pre, post_handler=_empty_post if post else None)
    lab.kprobes.register_kprobe(p)
    return p


def _kretprobe(lab, func: str) -> Kretprobe:
    rp = Kretprobe(kp=Kprobe(symbol_name=func), handler=lambda ri, regs: 0)
    kretprobes_of(lab.machine).register_kretprobe(rp)
    return rp


def _need_boost(lab, kind: str) -> None:
    if not lab.kprobes.arch.boost_supported:
        raise NotImplementedError(f"{kind}: {lab.machine.arch.name} kprobes are never boosted "
                                  "(the kernel boosts on x86 only)")


def setup_kind(kind: str, lab, func: str) -> list:
    """Register the probe(s) of `kind` on `func` in `lab` (a probes.testing.ProbeLab).
    Boosting happens at the first hit and optimization is kicked at once, so a warm-up
    call puts every kind in its steady state."""
    kp = lab.kprobes
    if kind == "k":
        # A post_handler keeps the probe from being boosted: every hit single-steps.
        return [_kprobe(lab, func, post=True)]
    if kind == "b":
        _need_boost(lab, kind)
        return [_kprobe(lab, func)]
    if kind == "o":
        opt = enable_optprobes(kp)
        p = _kprobe(lab, func)
        opt.kick_kprobe_optimizer()
        if not p.ainsn.optimized:
            raise NotImplementedError(f"o: {func} cannot be optimized: {p.ainsn.opt_reason}")
        return [p]
    if kind == "f":
        p = _kprobe(lab, func)
        if not p.ainsn.ftrace:
            raise NotImplementedError(f"f: {func} has no ftrace site")
        return [p]
    if kind == "r":
        kp.preemptible = True             # no boosting: the entry probe single-steps
        return [_kretprobe(lab, func)]
    if kind == "rb":
        _need_boost(lab, kind)
        return [_kretprobe(lab, func)]
    if kind == "ro":
        opt = enable_optprobes(kp)
        rp = _kretprobe(lab, func)
        opt.kick_kprobe_optimizer()
        return [rp]
    if kind == "kr":
        kp.preemptible = True
        return [_kprobe(lab, func), _kretprobe(lab, func)]
    raise ValueError(f"unknown probe kind {kind!r} (one of {', '.join(KINDS)})")
