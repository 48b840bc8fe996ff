"""Return probes (kernel/kprobes.c kretprobe part; x86 rethook semantics).

A kretprobe is a kprobe at function entry whose pre handler takes an instance from the
probe's pool, saves the real return address (arm64 x30 / x86 the word at sp) and replaces
it with the address of a return trampoline the layer mapped into the guest. When the
function returns there, the trampoline handler finds the instances of this frame on the
task's LIFO list, runs their handlers with the return value, and resumes at the real
return address. arm64's trampoline is `BRK #7` (classic kretprobe); x86's is entered
through a host entry on the trampoline address (rethook has no trap).

A guest that leaves frames without returning (longjmp, or an exception unwinder that
resumes in a caller) leaves stale instances above live ones. As Linux uretprobes do, they
are dropped by stack pointer when a new instance is pushed (cleanup_return_instances) and
when the trampoline is reached (handle_trampoline): the arch says whether an instance's
frame is still alive (arch_uretprobe_is_alive). Dropped instances run no handler and are
counted in `Kretprobe.ndropped`, so that entries = returns + ndropped + nmissed + pending.

With the C hit path (probes/native/rethook.py) the entry and the return of a kretprobe
with no Python handler run in C, on the same LIFO: C holds the running task's LIFO between
Python's turns, and every Python entry point below takes it back first (`_take`) and
hands it over again when done (`_give`)."""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from emu.clock import HANDLER
from emu.machine import SIGILL, Fault, Machine
from emu.symbols import when_ifunc_resolved
from probes.arch import ArchKretprobes, arch_probes_of
from probes.arch.common import RpCheck
from probes.errors import KprobeError
from probes.kprobes import Kprobe, Kprobes, kprobes_of
from probes.native.rethook import NativeRethook
from probes.regs import PtRegs

KRETPROBE_MAXACTIVE_MAX = 4096
KRETPROBE_DATA_MAX = 4096
NUM_POSSIBLE_CPUS = 1


@dataclass(eq=False)
class KretprobeInstance:
    """struct kretprobe_instance: one pending return of one call. `rp` becomes None when
    its kretprobe is unregistered while the call is pending (the kernel's rethook_free
    clears the handler): the return still goes back to the caller, with no handler."""
    rp: Optional["Kretprobe"]
    ret_addr: int = 0
    fp: int = 0                 # the frame key: arm64 x29, x86 the return-address slot
    stack: int = 0              # sp at the hijack (return_instance.stack): is the frame alive?
    data: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class Kretprobe:
    """struct kretprobe. Give the function in `kp` (symbol_name or addr, offset 0)."""
    kp: Kprobe = field(default_factory=Kprobe)
    handler: Optional[Callable[[KretprobeInstance, PtRegs], int]] = None
    entry_handler: Optional[Callable[[KretprobeInstance, PtRegs], int]] = None
    data_size: int = 0
    maxactive: int = 0
    nmissed: int = 0
    hits: int = 0               # returns handled (ours)
    ndropped: int = 0           # instances whose frame was left without a return (ours)
    free_instances: list[KretprobeInstance] = field(default_factory=list)
    native_row: int = field(default=-1, repr=False)     # C serves it (probes/native/rethook)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in ("handler", "entry_handler"):      # whether C may serve it changes
            watch = self.__dict__.get("_watch")
            if watch is not None:
                watch()


class Kretprobes:
    """The return-probe state of a machine: trampoline and the per-task instance list."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.kprobes: Kprobes = kprobes_of(machine)
        self.arch: ArchKretprobes = arch_probes_of(machine).kretprobes
        self.by_task: dict[int, list[KretprobeInstance]] = {}  # tid -> that task's LIFO
        self.registered: list[Kretprobe] = []
        self.frame_warnings = 0
        self.ndropped = 0                                     # stale instances dropped
        self.trampoline = self.arch.map_kretprobe_trampoline(self.trampoline_handler)
        # --bpf-engine jit: return handlers' programs run from a guest stub
        # (probes/bpf/jit_direct.py DirectCalls: kretprobe_stub, kretprobe_done)
        self.bpf_direct: Any = None
        self._charged: dict[int, bool] = {}    # cpu -> C charged the stub's return already
        self.native: NativeRethook | None = None
        if self.kprobes.native is not None:
            self.native = NativeRethook.attach(
                self.kprobes.native, self, getattr(self.arch, "ret_addr_on_stack", False),
                getattr(self.arch, "tramp_entry", None))

    def _take(self) -> None:
        """Python works on the LIFO: C's records come back first."""
        if self.native is not None:
            self.native.pull()

    def _give(self) -> None:
        if self.native is not None:
            self.native.push()

    def _sync_native(self) -> None:
        """Hand C the kretprobes it serves: those with no Python entry handler (and no
        per-instance data), whose return handlers C calls."""
        if self.native is None:
            return
        calls = self.native.calls_handlers          # return handlers: C calls them
        self.native.set_rows([rp for rp in self.registered if rp.entry_handler is None and (
            rp.handler is None or (calls and rp.data_size == 0))])
        self.kprobes.sync_native()

    def native_bpf_stub(self, rp: Kretprobe | None, correct: int) -> int | None:
        """C's trampoline asks before it calls `rp`'s return handler: the stub its
        programs run from (C then resumes there, not at `correct`, and leaves lr to the
        stub's end; the return is charged already), or None."""
        if self.bpf_direct is None or rp is None or rp.handler is None:
            return None
        stub = self.bpf_direct.kretprobe_stub(rp, correct)
        if stub is not None:
            self._charged[self.m.cpu] = True
        return stub

    @property
    def instances(self) -> list[KretprobeInstance]:
        """The running task's LIFO (current->kretprobe_instances; machine.task names it)."""
        self._take()
        return self.by_task.setdefault(self.m.task[1], [])

    def pending(self) -> list[KretprobeInstance]:
        """The running task's pending instances, top first, for an unwinder
        (kretprobe_find_ret_addr); C keeps the LIFO if it held it."""
        owned = self.native is None or self.native.h.py_owns
        lifo = self.instances[::-1]
        if not owned:
            self._give()
        return lifo

    # --- registration -----------------------------------------------------------------------
    def register_kretprobe(self, rp: Kretprobe) -> None:
        kp = rp.kp
        if kp.symbol_name and when_ifunc_resolved(self.m, kp.symbol_name,
                                                  lambda: self.register_kretprobe(rp), kp):
            return          # an IFUNC: see Kprobes.register_kprobe
        # kprobe_on_func_entry() first, as the kernel: an offset that is not the entry is
        # -EINVAL (even mid-instruction on x86), an unknown symbol -ENOENT; and nothing is
        # written into guest text or into rp.kp before the checks pass.
        addr, on_entry = self.kprobes._kprobe_addr(kp)
        if not on_entry:
            raise KprobeError(errno.EINVAL, "a kretprobe must be at a function entry",
                              kp.symbol_name or f"{kp.addr:#x}")
        if self._program_entry(addr):
            # As the kernel's kretprobe_blacklist (-EINVAL): the program entry is jumped to,
            # not called, so there is no return address to hijack; on x86 the word at sp is
            # argc (Linux) or lies past the end of RAM (bare metal).
            raise KprobeError(errno.EINVAL, "the program entry point has no return address",
                              kp.symbol_name or f"{addr:#x}")
        if rp.data_size > KRETPROBE_DATA_MAX:
            raise KprobeError(errno.E2BIG, f"data_size {rp.data_size} > {KRETPROBE_DATA_MAX}")
        if rp.maxactive > KRETPROBE_MAXACTIVE_MAX:
            raise KprobeError(errno.E2BIG, f"maxactive {rp.maxactive} > {KRETPROBE_MAXACTIVE_MAX}")
        if rp.maxactive <= 0:
            rp.maxactive = max(10, 2 * NUM_POSSIBLE_CPUS)
        kp.pre_handler = self._pre_handler_kretprobe
        kp.post_handler = None
        kp.kretprobe = rp
        self.kprobes.register_kprobe(kp)
        rp.nmissed, rp.hits, rp.ndropped = 0, 0, 0
        rp.free_instances = [KretprobeInstance(rp, data=bytearray(rp.data_size))
                             for _ in range(rp.maxactive)]
        self.registered.append(rp)
        if self.native is not None:
            rp.__dict__["_watch"] = self._sync_native
            self._sync_native()

    def _program_entry(self, addr: int) -> bool:
        image = self.m.image
        return image is not None and image.entry == addr

    def unregister_kretprobe(self, rp: Kretprobe) -> None:
        self._take()
        rp.__dict__.pop("_watch", None)
        self.kprobes.unregister_kprobe(rp.kp)
        if rp in self.registered:
            self.registered.remove(rp)
        self._sync_native()
        # Pending instances keep their hijacked return addresses: the trampoline still
        # resumes the guest correctly, it just runs no handler for them any more, even if
        # rp is registered again meanwhile (they do not return to its new pool either).
        for ri in (ri for lifo in self.by_task.values() for ri in lifo):
            if ri.rp is rp:
                ri.rp = None

    # --- entry ------------------------------------------------------------------------------
    def _pre_handler_kretprobe(self, p: Kprobe, regs: PtRegs) -> int:
        self._take()
        try:
            return self._entry(p.kretprobe, regs)
        finally:
            self._give()

    def _entry(self, rp: Kretprobe, regs: PtRegs) -> int:
        if not rp.free_instances:
            rp.nmissed += 1
            return 0
        ri = rp.free_instances.pop()
        if rp.entry_handler is not None and rp.entry_handler(ri, regs):
            rp.free_instances.append(ri)
            return 0
        if not self.arch.arch_prepare_kretprobe(ri, regs, self.trampoline):
            # The return address cannot be read or replaced (a hostile sp): no hijack, as
            # uretprobes; the stepped instruction meets the fault the guest would meet.
            rp.free_instances.append(ri)
            rp.nmissed += 1
            return 0
        chained = ri.ret_addr == self.trampoline
        self._cleanup(RpCheck.CHAIN_CALL if chained else RpCheck.CALL, regs.sp)
        if chained and not self.instances:
            # The guest put the trampoline there itself: nothing to chain to. Its return
            # will meet the trampoline with no instance, a fault (Linux: SIGILL).
            rp.free_instances.append(ri)
            rp.nmissed += 1
            return 0
        self.instances.append(ri)
        return 0

    def _cleanup(self, ctx: RpCheck, sp: int) -> None:
        """cleanup_return_instances: drop the instances on top whose frame is gone."""
        inst = self.instances
        while inst and not self.arch.kretprobe_is_alive(inst[-1], ctx, sp):
            self._drop(inst.pop())

    def _drop(self, ri: KretprobeInstance) -> None:
        self.ndropped += 1
        rp = ri.rp
        if rp is not None:
            rp.ndropped += 1
            rp.free_instances.append(ri)

    # --- return -----------------------------------------------------------------------------
    def _chain_start(self) -> int:
        """Index of the bottom of the top chain: the first instance from the top that holds
        a real return address (those above it were hijacked by other kretprobes on the same
        call, or a tail call); -1 if there is none."""
        i = len(self.instances) - 1
        while i >= 0 and self.instances[i].ret_addr == self.trampoline:
            i -= 1
        return i

    def _returning_chain(self, sp: int) -> list[KretprobeInstance] | None:
        """handle_trampoline's walk: pop chains from the top; a chain is the returning one
        when the chain below it is still alive (or there is none), else its frames were
        left by a longjmp and it is dropped. Returns the chain, top first."""
        while True:
            i = self._chain_start()
            if i < 0:
                return None
            below = self.instances[i - 1] if i > 0 else None
            batch = self.instances[i:][::-1]
            del self.instances[i:]
            if below is None or self.arch.kretprobe_is_alive(below, RpCheck.RET, sp):
                return batch
            for ri in batch:
                self._drop(ri)

    def trampoline_handler(self, addr: int) -> bool:
        """__kretprobe_trampoline_handler: handle every instance of the returning frame."""
        self._take()
        try:
            return self._trampoline(addr)
        finally:
            self._give()

    def _trampoline(self, addr: int) -> bool:
        m, kcb = self.m, self.kprobes.kcb
        batch = self._returning_chain(m.sp)
        if batch is None:
            # Reached without a pending instance: the guest jumped here itself.
            m.stop_fault(Fault("kretprobe trampoline reached with no pending instance",
                               addr, None, SIGILL))
            return True
        frame: int | None = self.arch.kretprobe_frame(m)
        correct = batch[-1].ret_addr
        if self.bpf_direct is not None and len(batch) == 1 and frame is not None \
                and self._to_bpf_stub(batch[0], frame, correct):
            return True
        regs = PtRegs(m, ip=correct)
        saved = (kcb.current, kcb.status)
        for ri in batch:
            rp = ri.rp                       # None: its kretprobe was unregistered
            if frame is not None and ri.fp != frame:   # WARN_ON_ONCE: no more handlers
                self.frame_warnings += 1
                frame = None
            if rp is None:
                continue
            if rp.handler is not None and frame is not None:
                kcb.current = rp.kp                          # probes hit in here are missed
                m.clock.charge(HANDLER)
                rp.handler(ri, regs)
            rp.hits += 1
            rp.free_instances.append(ri)
        kcb.current, kcb.status = saved
        self.arch.kretprobe_fixup_return(regs, correct)
        regs.flush()
        m.pc = correct
        self.arch.charge_kretprobe_return(m)
        return True

    def _to_bpf_stub(self, ri: KretprobeInstance, frame: int, correct: int) -> bool:
        """The one returning instance's handler is a kretprobe-PMU event whose programs run
        from this CPU's stub: the return is handled as below but for the handler, and the
        guest goes to the stub, whose trap (`bpf_stub_done`) finishes the return."""
        rp = ri.rp
        if rp is None or rp.handler is None or ri.fp != frame:
            return False
        stub = self.bpf_direct.kretprobe_stub(rp, correct)
        if stub is None:
            return False
        self.m.clock.charge(HANDLER)
        rp.hits += 1
        rp.free_instances.append(ri)
        self.m.pc = stub
        return True

    def bpf_stub_done(self) -> bool:
        """The trap at the end of a kretprobe stub: the handler's work is done, so the
        return goes on as the trampoline goes on after handlers (lr put back on arm64)."""
        correct = self.bpf_direct.kretprobe_done() if self.bpf_direct is not None else None
        if correct is None:
            return False
        m = self.m
        regs = PtRegs(m, ip=correct)
        self.arch.kretprobe_fixup_return(regs, correct)
        regs.flush()
        m.pc = correct
        if not self._charged.pop(m.cpu, False):
            self.arch.charge_kretprobe_return(m)
        return True

    def live_instances(self) -> list[KretprobeInstance]:
        """The pending instances an unwinder can still meet: frame on the stack at the
        current sp, hijacked return address still in place (stale ones are dropped only
        at the next entry or return, so a run can end with some left)."""
        sp, arch, tramp = self.m.sp, self.arch, self.trampoline
        return [ri for ri in self.instances
                if arch.kretprobe_is_alive(ri, RpCheck.CHAIN_CALL, sp)
                and arch.kretprobe_hijack_intact(ri, tramp)]

    def pending_ret_addrs(self) -> list[int]:
        """Real return addresses of the pending instances, innermost first (what an
        unwinder substitutes for each trampoline address it meets)."""
        return [ri.ret_addr for ri in reversed(self.live_instances())
                if ri.ret_addr != self.trampoline]

    def kretprobe_find_ret_addr(self, addr: int, cursor: int = 0) -> tuple[int, int]:
        """For unwinders: the real address behind the `cursor`-th trampoline address met
        while walking the stack (0 = innermost). Returns (address, next cursor)."""
        seen = 0
        for ri in reversed(self.live_instances()):
            if ri.ret_addr == self.trampoline:
                continue
            if seen == cursor:
                return ri.ret_addr, cursor + 1
            seen += 1
        return addr, cursor


def kretprobes_of(machine: Machine) -> Kretprobes:
    kretprobes: Kretprobes = machine.layer("kretprobes", Kretprobes)
    return kretprobes


def register_kretprobe(machine: Machine, rp: Kretprobe) -> None:
    kretprobes_of(machine).register_kretprobe(rp)


def unregister_kretprobe(machine: Machine, rp: Kretprobe) -> None:
    kretprobes_of(machine).unregister_kretprobe(rp)
