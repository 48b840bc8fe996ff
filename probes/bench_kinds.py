"""The probe kinds of the kernel's overhead table (Documentation/trace/kprobes.rst), as
`emu bench` places them: k (kprobe), kp (k with an empty pre handler only), k0 and b0 (k and b with no Python handler: a hit
counter only, served by the C hit path of probes/native), o0 (o likewise), b (boosted), o (optimized), f (on an ftrace site),
f0 (f with no Python handler: the C ftrace caller), r (kretprobe), r0 (r with no Python handler: entry and return in C), rb, ro, kr (kprobe +
kretprobe on one function), e and re (a kprobe / kretprobe event recording 3 fetch args
into the ring buffer: with the C hit path, fetched, filtered and committed in C), tp and rt
(tpdemo's tp_work tracepoint: an empty function; with BPF, a tracepoint event's perf
program or a raw tracepoint link).

`setup_kind(kind, lab, func, bpf=False)` registers the probe(s) of one kind on guest
function `func` and returns them; with `bpf`, every probe also runs a small counting BPF
program through trace_call_bpf (the kprobe-PMU event libbpf makes). A kind not
implemented yet raises NotImplementedError (the bench prints "n/a" for it). `KIND_GUESTS`
names the guest each kind is measured on."""
from __future__ import annotations

from probes.kprobes import Kprobe
from probes.kretprobes import Kretprobe, kretprobes_of
from probes.optprobes import enable_optprobes

KINDS = ("k", "kp", "k0", "b", "b0", "o", "o0", "f", "f0", "r", "r0", "rb", "ro", "kr", "e", "re",
         "tp", "rt")
# the tracepoint kinds: tpdemo's tp_work (fired by work_step) with an empty function, or with
# the counting program as a tracepoint event's perf program (tp) / a raw tracepoint link (rt)
TP_KINDS = ("tp", "rt")
# the event kinds: three fetch args each (registers, the stack)
EVENT_KINDS = {"e": "p:bench/leaf {func} a=$arg1:u64 b=$arg2:x64 s=+0($stack):x64",
               "re": "r:bench/leaf {func} rv=$retval:u64 st=$stack:x64 s=+0($stack):x64"}
ALL_ARCHES = "all"              # `--arch all`: every arch of emu.arch.ARCH_NAMES, in its order

# kind -> (firmware ELF name, probed function, function the bench calls, its argument).
# The argument is the number of calls of the probed function per bench call (hot_call(n)
# calls hot_leaf n times); for the ftrace variant, fib(n) calls fib fib_calls(n) times.
KIND_GUESTS: dict[str, tuple[str, str, str, int]] = {
    "k": ("hotloop", "hot_leaf", "hot_call", 2000),
    "kp": ("hotloop", "hot_leaf", "hot_call", 2000),
    "k0": ("hotloop", "hot_leaf", "hot_call", 2000),
    "b": ("hotloop", "hot_leaf", "hot_call", 2000),
    "b0": ("hotloop", "hot_leaf", "hot_call", 2000),
    "o": ("hotloop", "hot_leaf", "hot_call", 2000),
    "o0": ("hotloop", "hot_leaf", "hot_call", 2000),
    "f": ("recurse.ftrace", "fib", "fib", 15),
    "f0": ("recurse.ftrace", "fib", "fib", 15),
    "r": ("hotloop", "hot_leaf", "hot_call", 2000),
    "r0": ("hotloop", "hot_leaf", "hot_call", 2000),
    "rb": ("hotloop", "hot_leaf", "hot_call", 2000),
    "ro": ("hotloop", "hot_leaf", "hot_call", 2000),
    "kr": ("hotloop", "hot_leaf", "hot_call", 2000),
    "e": ("hotloop", "hot_leaf", "hot_call", 2000),
    "re": ("hotloop", "hot_leaf", "hot_call", 2000),
    "tp": ("tpdemo", "work_step", "work_loop", 2000),
    "rt": ("tpdemo", "work_step", "work_loop", 2000),
}


def _empty_pre(p, regs) -> int:
    return 0


def _empty_post(p, regs, flags) -> None:
    pass


def _kprobe(lab, func: str, post: bool = False, handler: bool = True) -> Kprobe:
    p = Kprobe(symbol_name=func, pre_handler=_empty_pre if handler else None,
               post_handler=_empty_post if post else None)
    lab.kprobes.register_kprobe(p)
    return p


def _kretprobe(lab, func: str, handler: bool = True) -> Kretprobe:
    rp = Kretprobe(kp=Kprobe(symbol_name=func), handler=(lambda ri, regs: 0) if handler else None)
    kretprobes_of(lab.machine).register_kretprobe(rp)
    return rp


def _need_boost(lab, kind: str) -> None:
    if not lab.kprobes.arch.boost_supported:
        raise NotImplementedError(f"{kind}: {lab.machine.arch.name} kprobes are never boosted "
                                  "(the kernel boosts on x86 only)")


# The counting program of the bpf rows: counts[0] += 1 (11 instructions per run).
# counts[*(u32 *)(r10 - 4)] += 1 on the array at map_fd(3), r0 = 0: the counting programs'
# lookup and add, after each one's own key store
COUNT_AT_STACK_KEY = """
    mov r2, r10
    add r2, -4
    lddw r1, map_fd(3)
    call 1
    jeq r0, 0, +2
    mov r1, 1
    lock add [r0], r1
    mov r0, 0
    exit
"""
COUNTER_ASM = "\n    stw [r10-4], 0" + COUNT_AT_STACK_KEY


def add_reg_asm(slot: int = 0, fd: int = 3, r0: int = 0, reg: str = "r8") -> str:
    """BPF asm that ends a program: counts[slot] += ``reg`` on the array at map_fd(fd),
    then returns ``r0``."""
    return f"""
    stw [r10-4], {slot}
    mov r2, r10
    add r2, -4
    lddw r1, map_fd({fd})
    call 1
    jeq r0, 0, +1
    lock add [r0], {reg}
    mov r0, {r0}
    exit"""


def counting_prog(prog_type=None):
    """A KPROBE program (or of `prog_type`) and its one-slot array map (`prog.maps[3]`)."""
    from probes.bpf import BpfProgType, assemble, create_map
    from probes.bpf.maps import BpfMapType
    from probes.bpf.program import BpfProg
    counts = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="counts")
    return BpfProg.from_bytes(assemble(COUNTER_ASM),
                              prog_type=prog_type or BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="count", license="GPL", maps={3: counts})


def parm_offset(arch: str, n: int = 1) -> int:
    """PT_REGS_PARMn: where a kprobe program finds argument register n in the arch's
    pt_regs (x86-64 rdi at 112, arm64 x0 at 0)."""
    from emu.arch import get_arch
    from probes.arch import arch_ptrace
    return 8 * arch_ptrace(arch).PT_REGS_FIELDS.index(get_arch(arch).args[n - 1])


def key_counting_prog(arch: str, map_type=None, keys: int = 256, entries: int = 512,
                      arg: int = 1, nr_cpus: int = 1, then_delete: bool = False):
    """counts[PARMarg % keys] += 1 on a hash map (`prog.maps[3]`, or of `map_type`), the
    common BPF pattern: lookup; if NULL update(key, 1), else lock add 1. `then_delete`:
    then delete the key and write 100 through the pointer the lookup gave."""
    from probes.bpf import BpfProgType, assemble, create_map
    from probes.bpf.maps import BpfMapType
    from probes.bpf.program import BpfProg
    counts = create_map(map_type or BpfMapType.BPF_MAP_TYPE_HASH, 4, 8, entries, name="counts",
                        nr_cpus=nr_cpus)
    tail = ["mov r7, r0", "mov r2, r10", "add r2, -4", "lddw r1, map_fd(3)", "call 3",
            "stdw [r7+0], 100"] if then_delete else []
    text = "\n".join([
        f"ldxdw r6, [r1+{parm_offset(arch, arg)}]", f"mod r6, {keys}", "stxw [r10-4], r6",
        "mov r2, r10", "add r2, -4", "lddw r1, map_fd(3)", "call 1", "jne r0, 0, +10",
        "stdw [r10-16], 1", "mov r2, r10", "add r2, -4", "mov r3, r10", "add r3, -16",
        "mov r4, 0", "lddw r1, map_fd(3)", "call 2",
        f"ja +{3 + len(tail) + ('lddw r1, map_fd(3)' in tail)}",     # lddw: two slots
        "mov r1, 1", "lock add [r0], r1", *tail, "mov r0, 0", "exit"])
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="count_keys", license="GPL", maps={3: counts})


def _tracepoint(lab, kind: str, bpf: bool) -> list:
    """tp_work with an empty function, or the counting program on it (see TP_KINDS)."""
    from probes.bpf import BpfProgType
    from probes.trace.bpf_tracepoint import attach_tracepoint_prog, bpf_raw_tp_link_attach
    from probes.tracepoint import tracepoints_of
    m = lab.machine
    if not bpf:
        tps = tracepoints_of(m)
        tp = tps.lookup("tp_work")
        if tp is None:
            raise NotImplementedError(f"{kind}: the guest has no tracepoint tp_work")
        tps.tracepoint_probe_register(tp, lambda data, args: None)
        return [tp]
    if kind == "tp":
        return [attach_tracepoint_prog(
            m, counting_prog(BpfProgType.BPF_PROG_TYPE_TRACEPOINT), "tpdemo", "tp_work")]
    return [bpf_raw_tp_link_attach(m, counting_prog(BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT),
                                   "tp_work")]


def attach_counter(lab, func: str, probes: list) -> None:
    """Give each probe's handler to a kprobe-PMU event that runs the counting program."""
    from probes.bpf.libbpf import KprobePerfEvent
    from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog
    prog = counting_prog()
    for p in probes:
        if isinstance(p, Kretprobe):
            call = KprobePerfEvent(lab.machine, func, is_return=True, rp=p)
            p.handler = call.kretprobe_perf_func
        else:
            call = KprobePerfEvent(lab.machine, func, kp=p)
            p.pre_handler = call.kprobe_perf_func
        err = perf_event_attach_bpf_prog(PerfEvent(call, PerfType.PERF_TYPE_KPROBE,
                                                   EventKind.KPROBE), prog)
        if err:
            raise RuntimeError(f"attaching the counting program failed: {err}")


def setup_kind(kind: str, lab, func: str, bpf: bool = False) -> list:
    """Register the probe(s) of `kind` on `func` in `lab` (a probes.testing.ProbeLab),
    with the counting BPF program on each if `bpf`. Boosting happens at the first hit and
    optimization is kicked at once, so a warm-up call puts every kind in its steady state."""
    if bpf and kind in EVENT_KINDS:
        raise NotImplementedError("e: the event's BPF row is the bpf_trace benchmark's")
    if kind in TP_KINDS:
        return _tracepoint(lab, kind, bpf)
    probes = _setup_kind(kind, lab, func)
    if bpf:
        attach_counter(lab, func, probes)
    return probes


def _setup_kind(kind: str, lab, func: str) -> list:
    kp = lab.kprobes
    if kind == "k":
        # A post_handler keeps the probe from being boosted: every hit single-steps.
        return [_kprobe(lab, func, post=True)]
    if kind == "kp":
        # An empty Python pre handler only: never boosted, every hit steps.
        kp.preemptible = True
        return [_kprobe(lab, func)]
    if kind == "k0":
        # No Python handler (a counter only: the C hit path); never boosted, every hit steps.
        kp.preemptible = True
        return [_kprobe(lab, func, handler=False)]
    if kind == "b":
        _need_boost(lab, kind)
        return [_kprobe(lab, func)]
    if kind == "b0":
        _need_boost(lab, kind)
        return [_kprobe(lab, func, handler=False)]
    if kind in ("o", "o0"):
        opt = enable_optprobes(kp)
        p = _kprobe(lab, func, handler=kind == "o")
        opt.kick_kprobe_optimizer()
        if not p.ainsn.optimized:
            raise NotImplementedError(f"{kind}: {func} cannot be optimized: {p.ainsn.opt_reason}")
        return [p]
    if kind in ("f", "f0"):
        p = _kprobe(lab, func, handler=kind == "f")
        if not p.ainsn.ftrace:
            raise NotImplementedError(f"{kind}: {func} has no ftrace site")
        return [p]
    if kind == "r":
        kp.preemptible = True             # no boosting: the entry probe single-steps
        return [_kretprobe(lab, func)]
    if kind == "r0":
        kp.preemptible = True             # a counter only: entry and return in C
        return [_kretprobe(lab, func, handler=False)]
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
    if kind in EVENT_KINDS:
        if kind == "re":
            lab.kprobes.preemptible = True    # as r: the entry probe single-steps
        return [_event(lab, func, EVENT_KINDS[kind])]
    raise ValueError(f"unknown probe kind {kind!r} (one of {', '.join(KINDS)})")


def _event(lab, func: str, command: str) -> Kprobe:
    """A kprobe event through tracefs (kprobe_events, then enable): its records go to the
    ring buffer (1408 KiB a CPU: the bench's calls never fill it)."""
    from probes.trace.tracefs import tracefs_of
    fs = tracefs_of(lab.machine)
    if fs.write("kprobe_events", command.format(func=func), append=True) != 0:
        raise RuntimeError(f"the event was refused: {fs.read('error_log')}")
    fs.write("events/bench/leaf/enable", "1")
    return fs.kprobes.probes[-1].probe
