"""Optimized probes and plain kprobes whose BPF programs run with no nested run (issue 17).

The kernel's optprobe template saves pt_regs on the stack and calls optimized_callback,
which reaches kprobe_perf_func -> trace_call_bpf -> the JITed bpf_func. Here, after a
host hit of an optimized probe has JITed its programs (probes/bpf/jit_guest.ProbeJit), a
*thunk* is written near the probe: it saves the pt_regs frame on the guest stack, takes
the bpf_prog_active guard, calls each JITed image with the frame as r1, restores every
register and ends in the detour's relocated copies. The probe's jump then targets the
thunk (Optimizer.direct), so later hits never leave the guest.

Only programs the thunk can run in the traced run qualify: kprobe programs whose helper
calls are inlined (array lookups, map_gen_lookup) or in TRAMPOLINE_HELPERS (a trap to the
host helper inside the same run, no nested run), with no backward branch (the budget
trampoline), tail call, callx, LD_ABS or exception-table load. Anything else keeps the
host path. A hit whose programs use only inlined helpers never leaves the guest. Hits, program run counts and guard misses are counted in guest
words and folded into the host's counters whenever a run stops; the map values the images
wrote are read back into the maps then too (the windows of jit_guest hold them meanwhile).
A change of an event's programs sends its probes back to the host path.

Plain kprobes get a *stub* from the same generator (``kprobe_stub``, Kprobes.bpf_stub):
the breakpoint still traps, kprobe_handler charges the trap and the handler as before and
sets pc to the stub instead of running the programs on the host; the stub ends in the
arch's breakpoint at its slot's last word, whose owner (``Kprobes.bpf_stub_done``) goes on
with the hit as a pre handler returning 0 lets it: the out-of-line step or the simulation,
then the post handler. trace_call_bpf's AND of the results only gates a perf sample, which
a kprobe-PMU event here never records, so the stub drops it as the thunk does.

The frame holds what the programs can read and what must come back: the slots the verifier
saw the programs load (BpfProg.ctx_reads; every slot when it cannot tell) and the registers
the thunk and the images may change (THUNK_CLOBBERS in the arch's opt.py; the images keep
the callee-saved ones themselves). The rest of pt_regs is never read, so it is not written:
each guest store is Unicorn's slow path (its dirty-page tracking is stubbed, so every store
checks the page for translated code: ~30-50 ns), and stores were most of a hit's cost."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from emu.memory import PAGE, PROT_EXEC, PROT_READ
from emu.owners import RegionOwner

from .helpers import KERNEL_HELPERS
from .isa import BPF_CALL_OP, BPF_PSEUDO_CALL
from .jit_guest import ProbeJit, _jump_targets, _map_in_r1, _kind

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.kprobes import Kprobe

    from .program import BpfProg

# Helpers a thunk's program may call through the helper trampoline (a trap into the host
# inside the same run): they return a plain value and read or write only map entries and
# keys/values on the BPF stack — no per-hit state of the host path (task, func_ip, output
# to deliver, regions a lookup adds).
TRAMPOLINE_HELPERS = frozenset({
    2,      # map_update_elem
    3,      # map_delete_elem
    5,      # ktime_get_ns
    7,      # get_prandom_u32
    8,      # get_smp_processor_id
})
THUNK_SLOT = 512                 # bytes per thunk (x86 ~330, arm64 ~360)
ACTIVE_OFF = 8                   # bpf_prog_active in the JIT's data page (tcc is at 0)
COUNTERS_OFF = 64                # then (hits, misses) u64 pairs, one per thunk


def direct_eligible(prog: "BpfProg") -> str | None:
    """Why ``prog`` cannot run from a thunk, or None if it can."""
    from .maps import ArrayMap
    from .prog_types import BpfProgType

    if prog.prog_type != BpfProgType.BPF_PROG_TYPE_KPROBE:
        return "not a kprobe program"
    insns = prog.insns
    targets = _jump_targets(insns)
    lookup = KERNEL_HELPERS.get(1)
    for i, insn in enumerate(insns):
        kind = _kind(insn) if i == 0 or insns[i - 1].code != 0x18 else "lddw2"
        if kind in ("callx", "ldabs", "ldind"):
            return f"insn {i}: {kind}"
        if kind in ("jmp", "jmp32", "ja", "ja32"):
            off = insn.imm if kind == "ja32" else insn.off
            if off < 0:
                return f"insn {i}: a backward branch (the budget trampoline)"
        if insn.code == BPF_CALL_OP and insn.src_reg != BPF_PSEUDO_CALL:
            fid = insn.imm
            if insn.src_reg != 0 or prog.helpers.get(fid) is not KERNEL_HELPERS.get(fid):
                return f"insn {i}: helper call {fid}"
            if fid in TRAMPOLINE_HELPERS:
                continue
            if fid != 1 or prog.helpers.get(1) is not lookup:
                return f"insn {i}: helper call {fid}"
            if type(_map_in_r1(prog, insns, targets, i)) is not ArrayMap:
                return f"insn {i}: map lookup not inlined"
    return None


def frame_slots(progs: list["BpfProg"]) -> frozenset[int] | None:
    """The pt_regs offsets any of ``progs`` can read (the verifier's record), or None when
    one of them may read anywhere: the thunk writes only these slots of its frame."""
    out: set[int] = set()
    for prog in progs:
        prog.ensure_loaded()
        if prog.ctx_reads is None:
            return None
        out |= prog.ctx_reads
    return frozenset(out)


@dataclass
class Thunk:
    """A thunk (an optimized probe's jump target) or a stub (a plain kprobe's hit path
    sends the guest there; ``trap`` is its closing breakpoint)."""
    probe: "Kprobe"
    addr: int
    counters: int               # guest address of (hits, misses)
    event: Any                  # the KprobePerfEvent whose programs it calls
    progs: list["BpfProg"]
    trap: int | None = None     # a stub's breakpoint, where the hit resumes


class DirectPlan(NamedTuple):
    """What DirectCalls._plan found for a probe: its event, programs and image entries,
    or `why` they cannot run from guest code (`pending`: only because a program is not
    JITed yet, which the host run of this hit does)."""
    event: Any
    progs: list["BpfProg"]
    images: list[int]
    why: str | None
    pending: bool = False


class DirectCalls:
    """Per machine: the thunks and their pages; ``__call__(p)`` is Optimizer.direct."""

    def __init__(self, machine: "Machine", runner: ProbeJit) -> None:
        self.m = machine
        self.runner = runner
        self.thunks: dict[int, Thunk] = {}       # probe address -> live thunk
        self._pages: list[int] = []
        self._free: list[int] = []
        self._counters = 0
        self.refused: dict[int, str] = {}        # probe address -> why it keeps the host path
        self.stubs: dict[int, Thunk] = {}        # plain kprobes: probe address -> live stub
        self._stub_refused: dict[int, Any] = {}  # probe address -> the handler refused
        machine.stop_listeners.append(self.fold)

    # -- deciding --
    def __call__(self, p: "Kprobe") -> int | None:
        """Optimizer.direct: the thunk an optimized probe's jump should target, or None."""
        assert p.addr is not None
        if p.addr in self.thunks:        # re-optimized after an unoptimization: a new thunk
            self._drop(p.addr)
        plan = self._plan(p)
        if plan.why is not None:
            self.refused[p.addr] = plan.why
            return None
        return self._build(p, plan.event, plan.progs, plan.images)

    def _plan(self, p: "Kprobe") -> "DirectPlan":
        """The event, programs and image entries when ``p``'s handler is one kprobe-PMU
        event whose programs can all run from guest code; else why not."""
        from probes.bpf.libbpf import KprobePerfEvent

        event = getattr(p.pre_handler, "__self__", None)
        if p.is_aggr or not isinstance(event, KprobePerfEvent) or event.is_return \
                or not event.prog_array:
            return DirectPlan(event, [], [], "the handler is not one kprobe-PMU event with programs")
        progs = event.prog_array.progs()
        images: list[int] = []
        for prog in progs:
            image = self.runner.image_of(prog)
            if image is None:
                return DirectPlan(event, progs, images, f"{prog.name}: not JITed", pending=True)
            if image.extable:
                return DirectPlan(event, progs, images, f"{prog.name}: probe loads")
            why = direct_eligible(prog)
            if why is not None:
                return DirectPlan(event, progs, images, f"{prog.name}: {why}")
            images.append(image.entry)
        return DirectPlan(event, progs, images, None)

    def kprobe_stub(self, p: "Kprobe") -> int | None:
        """Kprobes.bpf_stub, asked on every hit of a probe with a pre handler: the stub
        that runs ``p``'s programs in the guest (made once their images exist), or None:
        the host path runs them (the first hit, which JITs them; programs that need the
        host; an optimized probe, whose jump has a thunk of its own)."""
        addr = p.addr
        assert addr is not None
        handler = p.pre_handler
        t = self.stubs.get(addr)
        if t is not None:
            if t.probe is p and getattr(handler, "__self__", None) is t.event:
                return t.addr
            self._drop_stub(addr)
        if self._stub_refused.get(addr) is handler:
            return None
        plan = self._plan(p)
        if plan.why is None:
            stub = self._build(p, plan.event, plan.progs, plan.images, stub=True)
            if stub is not None:
                return stub
        elif plan.pending and not any(pr in self.runner.fallback for pr in plan.progs):
            return None                  # JITed by this hit's host run: asked again next hit
        else:
            self.refused[addr] = plan.why
        self._stub_refused[addr] = handler
        return None

    def _build(self, p: "Kprobe", event: Any, progs: list["BpfProg"],
               entries: list[int], stub: bool = False) -> int | None:
        """Write a thunk for ``p`` (``stub``: one that ends in a breakpoint of its own,
        the last word of its slot, instead of the detour's copies)."""
        from probes.arch import arch_probes_of

        assert p.addr is not None
        m, jit = self.m, self.runner.jit
        data = jit.tcc_addr
        counters = data + COUNTERS_OFF + 16 * self._counters
        if counters + 16 > data + PAGE:
            self.refused[p.addr] = "no room for more thunk counters"
            return None
        at = self._slot(p.addr)
        ip = p.addr + self._ip_offset()
        bp = m.arch.breakpoint
        trap = at + THUNK_SLOT - len(bp) if stub else None
        try:
            code = arch_probes_of(m).optprobes.bpf_thunk(p, at, ip, entries, data + ACTIVE_OFF,
                                                         counters, jit.stack_top,
                                                         frame_slots(progs), resume=trap)
        except Exception as e:          # OptimizeRefused (out of branch range), or no encoding
            self._free.append(at)
            self.refused[p.addr] = f"thunk: {e}"
            return None
        if len(code) > (THUNK_SLOT - len(bp) if stub else THUNK_SLOT):
            self._free.append(at)
            self.refused[p.addr] = "thunk too large"
            return None
        self._counters += 1
        t = Thunk(p, at, counters, event, list(progs), trap)
        if trap is not None:            # breakpoints up to the stub's own, which resumes the hit
            code += bp * ((trap - at - len(code)) // len(bp)) + bp
            self._arm_stub_trap(t)
        m.text_poke(at, code)
        kind = "kprobe_stub" if stub else "optprobe_thunk"
        m.symbols.add(f"bpf_{kind}_{p.addr:x}", at, len(code))
        (self.stubs if stub else self.thunks)[p.addr] = t
        self.refused.pop(p.addr, None)
        return at

    def _arm_stub_trap(self, t: Thunk) -> None:
        from probes.kprobes import kprobes_of

        assert t.trap is not None
        done, p = kprobes_of(self.m).bpf_stub_done, t.probe
        self.m.register_break_addr(t.trap, lambda _addr: done(p))

    def _ip_offset(self) -> int:
        from probes.kprobes import kprobes_of
        return kprobes_of(self.m).arch.handler_ip_offset

    def _slot(self, near: int) -> int:
        """A thunk slot in a page near the probe (in branch range), owned by the BPF layer."""
        from probes.insn_slots import place_near

        for i, at in enumerate(self._free):
            if abs(at - near) < (64 << 20):
                return self._free.pop(i)
        page = place_near(self.m, near, PAGE)
        self.m.memory.map(page, PAGE, PROT_READ | PROT_EXEC, "[bpf optprobe thunks]")
        self.m.claim_text(page, PAGE, RegionOwner.BPF, "[bpf optprobe thunks]")
        self._pages.append(page)
        self._free += list(range(page, page + PAGE, THUNK_SLOT))
        return self._free.pop(0)

    # -- the host's view --
    def fold(self) -> None:
        """Add what the thunks counted to the probes, events and program stats, and read
        the map values the images wrote back into the maps (a run has stopped)."""
        if not self.thunks and not self.stubs:
            return
        from probes.trace.bpf_trace import prog_stats

        uc = self.m.uc
        for t in (*self.thunks.values(), *self.stubs.values()):
            hits, misses = struct.unpack("<QQ", bytes(uc.mem_read(t.counters, 16)))
            if hits or misses:
                uc.mem_write(t.counters, bytes(16))
                if not t.probe.is_aggr and t.trap is None:   # a stub's hits: kprobe_handler's
                    t.probe.hits += hits + misses
                t.event.nhit += hits + misses
                for prog in t.progs:
                    st = prog_stats(prog)
                    st.run_cnt += hits
                    st.misses += misses
        jit = self.runner._jit
        if jit is not None and jit.run_state is not None:
            jit.sync_in(stack=False)

    def forget_event(self, event: Any) -> None:
        """The event's programs changed: its probes go back to the host path."""
        from probes.kprobes import kprobes_of

        opt = kprobes_of(self.m).optimizer
        for addr, t in list(self.thunks.items()):
            if t.event is event:
                self._drop(addr)
                if opt is not None:
                    opt.forget_direct(t.probe)
        for addr, t in list(self.stubs.items()):
            if t.event is event:
                self._drop_stub(addr)
        for addr, handler in list(self._stub_refused.items()):
            if getattr(handler, "__self__", None) is event:
                del self._stub_refused[addr]

    def _drop(self, addr: int) -> None:
        """Forget the thunk of the probe at ``addr`` (its counts folded first); its slot is
        reused once the probe's jump no longer targets it."""
        self.fold()
        t = self.thunks.pop(addr)
        self._free.append(t.addr)


    def _drop_stub(self, addr: int) -> None:
        """Forget the stub of the kprobe at ``addr`` (counts folded first). Its slot is
        filled with breakpoints and not reused: a run that stopped inside the stub (a
        limit) must not resume in another probe's code."""
        self.fold()
        t = self.stubs.pop(addr)
        assert t.trap is not None
        self.m.unregister_break_addr(t.trap)
        bp = self.m.arch.breakpoint
        self.m.text_poke(t.addr, bp * (THUNK_SLOT // len(bp)))


def direct_calls_of(machine: "Machine") -> DirectCalls | None:
    """The machine's thunks, if the JIT engine made them possible."""
    dc = machine.layers.get("bpf_direct_calls")
    return dc if isinstance(dc, DirectCalls) else None


def enable_direct_calls(machine: "Machine", runner: ProbeJit) -> DirectCalls:
    """Let optimized probes call JITed programs from a thunk (``--bpf-engine jit``)."""
    from probes.kprobes import kprobes_of

    dc = direct_calls_of(machine)
    if dc is None:
        dc = machine.layers["bpf_direct_calls"] = DirectCalls(machine, runner)
    kp = kprobes_of(machine)
    if kp.bpf_stub is None:
        kp.bpf_stub = dc.kprobe_stub
    opt = kp.optimizer
    if opt is not None and opt.direct is None:
        opt.direct = dc
    return dc
