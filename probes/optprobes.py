"""Jump optimization of kprobes (kernel/kprobes.c optimizer part, arch/x86/kernel/kprobes/opt.c,
and the unmerged arm64 series): the breakpoint is replaced by a jump to a detour buffer
that enters the handlers at a probe-layer address, runs the relocated original
instructions and jumps back — no trap at all.

Optimization is delayed as in the kernel: a probe starts as a breakpoint probe, is marked
OPTIMIZED and queued; the optimizer runs when kicked (`kick_kprobe_optimizer`) or, in this
deterministic machine, at the first hit of a queued probe (whose pre handlers run and which
then resumes in the detour instead of single-stepping). Unoptimization — when the probe is
disabled or unregistered, gains a post handler, or another probe is armed inside the
replaced bytes — restores the breakpoint first, as the kernel's forced unoptimize does."""
from __future__ import annotations

from typing import Callable

from emu.clock import DETOUR, HANDLER
from emu.machine import Fault
from probes.arch import ArchOptprobes, arch_probes_of
from probes.arch.common import ArchOptimizedInsn
from probes.errors import OptimizeRefused
from probes.kprobes import (KPROBE_FLAG_DISABLED, KPROBE_FLAG_GONE, KPROBE_FLAG_OPTIMIZED,
                            KPROBE_HIT_ACTIVE, Kprobe, Kprobes)
from probes.regs import PtRegs
from probes.reserved_text import TextBusy, TextUse

OptInsn = ArchOptimizedInsn          # the name before struct arch_optimized_insn moved


class Optimizer:
    """Per-machine optimizer state; attach with `enable_optprobes(kprobes)`."""

    def __init__(self, kprobes: Kprobes) -> None:
        self.kprobes = kprobes
        self.m = kprobes.m
        self.arch: ArchOptprobes = arch_probes_of(self.m).optprobes
        self.queue: list[Kprobe] = []
        self.enabled = True                      # sysctl debug.kprobes-optimization
        self.ip_offset = kprobes.arch.handler_ip_offset  # the ip handlers see: addr (+1 on x86)
        self._regs = PtRegs(self.m)                 # one view reused by every detour hit
        # A layer that can serve a probe's hits wholly in guest code (the BPF JIT's thunk:
        # pt_regs saved, the JITed programs called) answers `direct(p)` with the thunk's
        # address after a host hit; the jump then goes there instead of the detour.
        self.direct: Callable[[Kprobe], int | None] | None = None
        self.entries: dict[int, int] = {}            # probe address -> thunk the jump targets
        self._direct_tried: set[int] = set()
        self.m.fault_notifiers.append(self._on_fault)

    @property
    def kp(self) -> Kprobes:
        """The kprobe table's owner (the name before `kprobes`)."""
        return self.kprobes

    # --- deciding ---------------------------------------------------------------------------
    def try_to_optimize_kprobe(self, p: Kprobe) -> None:
        """Queue `p` (a table entry) if it may be optimized; records why not otherwise."""
        ainsn = p.ainsn
        if not self.enabled or ainsn.optimized or p.disabled() or p.post_handler is not None:
            return
        if ainsn.ftrace:
            return
        try:
            self.arch.can_optimize(p, self.kprobes.reserved)
            if ainsn.optinsn is None:
                ainsn.optinsn = self.arch.prepare_optimized_kprobe(p, self.optimized_callback)
        except OptimizeRefused as e:              # e.g. a branch out of range from the detour
            ainsn.opt_reason = e.reason
            return
        p.flags |= KPROBE_FLAG_OPTIMIZED
        ainsn.opt_reason = ""
        if p not in self.queue:
            self.queue.append(p)

    def kick_kprobe_optimizer(self) -> int:
        """Run the optimizer now: patch every queued probe. Returns how many were patched."""
        done = 0
        for p in list(self.queue):
            self.queue.remove(p)
            if p.flags & KPROBE_FLAG_OPTIMIZED and p.ainsn.armed and not p.ainsn.optimized:
                if self._reserve_jump(p):
                    self.arch.arch_optimize_kprobe(p, self.entries.get(p.addr or 0))
                    p.ainsn.optimized = True
                    done += 1
        self.kprobes.sync_native()          # the C path serves what is left of the queue
        return done

    def _reserve_jump(self, p: Kprobe) -> bool:
        """Record the jump's bytes as this probe's; False (the probe stays a breakpoint
        probe) if another user holds any of them."""
        assert p.addr is not None
        size = p.ainsn.optinsn.size
        try:
            self.kprobes.reserved.check(p.addr, size, p.ainsn, "optimized kprobe")
        except TextBusy as e:
            p.flags &= ~KPROBE_FLAG_OPTIMIZED
            p.ainsn.opt_reason = e.reason
            return False
        self.kprobes.reserved.reserve(p.addr, size, TextUse.OPTPROBE, p.ainsn)
        return True

    def handle_queued_hit(self, p: Kprobe) -> bool:
        """A breakpoint hit on a probe marked OPTIMIZED but not patched yet: after its pre
        handlers it resumes in the detour's copies instead of single-stepping."""
        if not p.flags & KPROBE_FLAG_OPTIMIZED or p.ainsn.optinsn is None:
            return False
        self.m.pc = p.ainsn.optinsn.resume
        self.kick_kprobe_optimizer()
        return True

    # --- undoing ----------------------------------------------------------------------------
    def unoptimize_kprobe(self, p: Kprobe) -> None:
        """Forced unoptimization: the probe is a breakpoint probe again."""
        if p in self.queue:
            self.queue.remove(p)
        self.forget_direct(p)
        if p.ainsn is not None and p.ainsn.optimized:
            self.arch.arch_unoptimize_kprobe(p)
            p.ainsn.optimized = False
            self.kprobes.reserved.release_owner(p.ainsn, TextUse.OPTPROBE)
        p.flags &= ~KPROBE_FLAG_OPTIMIZED

    def forget_direct(self, p: Kprobe) -> None:
        """The probe's jump goes to its detour again (the host entry); whether a thunk can
        serve it is asked afresh at its next host hit."""
        assert p.addr is not None
        self._direct_tried.discard(p.addr)
        if self.entries.pop(p.addr, None) is not None and p.ainsn is not None \
                and p.ainsn.optimized:
            self.arch.arch_optimize_kprobe(p)

    def _try_direct(self, p: Kprobe) -> None:
        assert p.addr is not None and self.direct is not None
        self._direct_tried.add(p.addr)
        target = self.direct(p)
        if target is not None and p.ainsn.optimized:
            self.entries[p.addr] = target
            self.arch.arch_optimize_kprobe(p, target)

    def get_optimized_kprobe(self, addr: int) -> Kprobe | None:
        """get_optimized_kprobe(): the nearest probe below `addr` if it has a detour whose
        replaced bytes cover `addr` (whether or not its jump is in place right now)."""
        table = self.kprobes.table
        below = [a for a in table if a < addr]
        if not below:
            return None
        p = table[max(below)]
        oi = p.ainsn.optinsn if p.ainsn is not None else None
        return p if oi is not None and addr < p.addr + oi.size else None

    def before_arm(self, addr: int) -> None:
        """A probe is about to be armed at `addr`: an optimized probe whose jump covers it
        must give its bytes back first (__arm_kprobe's forced unoptimize)."""
        other = self.get_optimized_kprobe(addr)
        if other is not None and (other.ainsn.optimized or other.flags & KPROBE_FLAG_OPTIMIZED):
            self.unoptimize_kprobe(other)

    def after_remove(self, addr: int) -> None:
        """The probe at `addr` is gone: the probe whose replaced bytes cover it may be
        optimized again (__disarm_kprobe with reopt). It is found afresh, not remembered:
        another probe may have blocked it meanwhile, or gone before this one."""
        outer = self.get_optimized_kprobe(addr)
        if outer is not None and outer.ainsn.armed:
            self.try_to_optimize_kprobe(outer)

    def release(self, p: Kprobe) -> None:
        """The probe goes away: unoptimize and free its detour."""
        self.unoptimize_kprobe(p)
        oi = p.ainsn.optinsn if p.ainsn is not None else None
        if oi is not None:
            self.arch.free_optimized_kprobe(p)
            p.ainsn.optinsn = None

    def _on_fault(self, fault: Fault) -> None:
        """A relocated instruction faulted in a detour (a hostile sp, a literal on an
        unmapped page): report it at the original instruction, where the guest would have
        taken it, as a fault in a kprobe slot is."""
        for p in self.kprobes.table.values():
            oi = p.ainsn.optinsn if p.ainsn is not None else None
            if oi is not None and oi.detour <= fault.pc < oi.detour + len(oi.code):
                orig = self.arch.detour_orig_addr(p, fault.pc)
                if orig is not None:
                    fault.pc = orig
                    self.m.pc = orig
                return

    # --- the detour's host entry --------------------------------------------------------------
    def optimized_callback(self, addr: int, _pc: int = 0) -> None:
        """optimized_callback(): run the pre handlers of the probe at `addr`; return values
        and ip changes are ignored (post handlers never run: such probes are not optimized).
        The hot path of the cheapest probe kind: kept flat."""
        kprobes = self.kprobes
        p = kprobes.table.get(addr)
        if p is None or p.flags & (KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE):
            return
        m, kcb = self.m, kprobes.kcb
        clock = m.clock
        if kcb.current is not None:
            clock.charge(DETOUR)
            kprobes.kprobes_inc_nmissed_count(p)
            return
        if not p.is_aggr:
            p.hits += 1
        handler = p.pre_handler
        if handler is None:
            clock.charge(DETOUR)
            return
        clock.charge2(DETOUR, HANDLER)
        kcb.current, kcb.status = p, KPROBE_HIT_ACTIVE
        regs = self._regs.reset(addr + self.ip_offset)
        handler(p, regs)
        regs.forget(m.arch.pc)                      # ip changes are ignored here
        regs.flush()
        kcb.current, kcb.status = None, 0
        if self.direct is not None and addr not in self._direct_tried:
            self._try_direct(p)


def enable_optprobes(kprobes: Kprobes) -> Optimizer:
    """Turn on jump optimization for a machine's kprobes (`--optimize`)."""
    if kprobes.optimizer is None:
        optimizer = kprobes.optimizer = Optimizer(kprobes)
        for p in list(kprobes.table.values()):
            if p.ainsn.armed:
                optimizer.try_to_optimize_kprobe(p)
        kprobes.sync_native()               # queued probes' traps go back to Python
    return kprobes.optimizer
