"""The generic kprobe core (kernel/kprobes.c) over a narrow per-arch interface.

Registration resolves and checks the address, lets the arch decode and prepare the
instruction (slot or simulation), and arms the breakpoint with `text_poke`. A hit arrives
through the machine's trap dispatcher at exactly the probe's address; the arch simulates
the instruction or sends the CPU through the out-of-line slot, whose trailing trap brings it
back here for the post handler. Several probes on one address share an aggregator.

Left out: module text (GONE), jump-label/static-call/BUG sites, the global
`kprobes/enabled` switch as a sysctl (see `disarm_all`/`arm_all`)."""
from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Callable, Optional, Self

from emu.clock import HANDLER, STEP, TRAP
from emu.machine import SIGSEGV, SIGTRAP, Fault, Machine
from emu.module import module_text_address
from emu.smp import PerCpu
from emu.symbols import cancel_ifunc_wait, when_ifunc_resolved
from emu.uaccess import UserFault
from probes.arch import ArchKprobes, arch_probes_of
from probes.arch.common import ArchSpecificInsn, StepKind
from probes.blacklist import Blacklist
from probes.errors import KprobeError, user_fault
from probes.ftrace import Ftrace, FtraceOps, FtraceSite, ftrace_of
from probes.location import ProbeLocation, parse_probe_location
from probes.native import (FS_COUNT, FS_PRE, FS_PYTHON, KN_BOOSTED, KN_PRE, KN_PY_SS, KN_RET,
                           NO_SIM, FtraceRow, NativeDispatch, NativeSim, dispatch_of)
from probes.regs import PtRegs
from probes.reserved_text import ReservedText, TextBusy, TextUse, reserved_text_of

if TYPE_CHECKING:
    from probes.optprobes import Optimizer

__all__ = ["Kprobe", "Kprobes", "KprobeCtlblk", "ProbeKind", "kprobes_of", "probe_kind",
           "user_fault", "register_kprobe", "unregister_kprobe", "register_kprobes",
           "unregister_kprobes", "enable_kprobe", "disable_kprobe", "get_kprobe"]

KPROBE_FLAG_GONE = 1
KPROBE_FLAG_DISABLED = 2
KPROBE_FLAG_OPTIMIZED = 4
KPROBE_FLAG_FTRACE = 8
KPROBE_FLAG_ON_FUNC_ENTRY = 16

KPROBE_HIT_ACTIVE = 0x1
KPROBE_HIT_SS = 0x2
KPROBE_REENTER = 0x4
KPROBE_HIT_SSDONE = 0x8

PreHandler = Callable[["Kprobe", PtRegs], Optional[int]]
PostHandler = Callable[["Kprobe", PtRegs, int], None]
FaultHandler = Callable[["Kprobe", PtRegs, int], Optional[int]]


class ProbeKind(StrEnum):
    """What `emu inspect`, the sweep and --stats call a probe (the JSON `kind`)."""
    KPROBE = "kprobe"
    BOOSTED = "boosted"
    OPTIMIZED = "optimized"
    FTRACE = "ftrace"
    KRETPROBE = "kretprobe"


@dataclass(eq=False)
class Kprobe:
    """struct kprobe. Give `symbol_name` (+ `offset`) or `addr`. `hits` is ours: how often
    the probe's handlers ran (kprobe_profile's hit column)."""
    symbol_name: str | None = None
    offset: int = 0
    addr: int | None = None
    pre_handler: PreHandler | None = None
    post_handler: PostHandler | None = None
    fault_handler: FaultHandler | None = None
    flags: int = 0
    nmissed: int = 0
    opcode: bytes = b""
    ainsn: Any = None                                       # ArchSpecificInsn once prepared
    hits: int = 0
    list: list["Kprobe"] = field(default_factory=list)     # children, if an aggregator
    is_aggr: bool = False
    kretprobe: Any = None                                   # the Kretprobe this entry serves

    @classmethod
    def at(cls, where: "str | int | ProbeLocation") -> Self:
        """A kprobe on `SYM[+OFF]|ADDR` (probes.location; LocationError if it does not
        parse), a parsed location or an address."""
        if isinstance(where, int):
            return cls(addr=where)
        loc = where if isinstance(where, ProbeLocation) else parse_probe_location(where)
        if loc.addr is not None:
            return cls(addr=loc.addr)
        return cls(symbol_name=loc.symbol, offset=loc.offset)

    def disabled(self) -> bool:
        """kprobe_disabled()"""
        return bool(self.flags & (KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE))

    @property
    def kind(self) -> str:
        return self.ainsn.kind if self.ainsn is not None else "unprepared"

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _HANDLERS:
            # A handler given after registration (a perf event attaching to the probe):
            # whether C may serve its hits changes.
            watch = self.__dict__.get("_watch")
            if watch is not None:
                watch()


_HANDLERS = frozenset({"pre_handler", "post_handler", "fault_handler"})


@dataclass
class KprobeCtlblk:
    """struct kprobe_ctlblk plus current_kprobe: one per CPU (Kprobes.kcbs)."""
    current: Kprobe | None = None
    status: int = 0
    prev: list[tuple[Kprobe | None, int]] = field(default_factory=list)

    def save(self) -> None:
        self.prev.append((self.current, self.status))

    def restore(self) -> None:
        self.current, self.status = self.prev.pop() if self.prev else (None, 0)


class Kprobes:
    """The kprobe state of one machine: the probe table keyed by address and the control
    block. Get it with `kprobes_of(machine)`."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.arch: ArchKprobes = arch_probes_of(machine).kprobes
        self.table: dict[int, Kprobe] = {}
        # DEFINE_PER_CPU(kprobe_ctlblk): `kcb` is this CPU's, swapped when another CPU runs
        self.kcbs = PerCpu(machine, KprobeCtlblk, self._set_kcb)
        self.kcb = self.kcbs.this_cpu
        # the probe layer's pages (slots, trampolines) and claimed text (BPF JIT images)
        self.blacklist = Blacklist.from_machine(
            machine, lambda a: self.arch.owns(a) or any(s <= a < e for s, e in machine.owned_text))
        self.reserved: ReservedText = reserved_text_of(machine)
        self._registered: set[int] = set()        # id() of registered struct kprobes
        self.optimizer: Optimizer | None = None   # set by enable_optprobes
        # --bpf-engine jit: p -> a guest stub that runs p's JITed programs and traps back
        # (probes/bpf/jit_direct.py), or None when they need the host
        self.bpf_stub: Callable[[Kprobe], int | None] | None = None
        self.preemptible = False                  # CONFIG_PREEMPTION: the kernel never boosts then
        self.ip_offset = self.arch.handler_ip_offset  # pre handlers see addr (+1 on x86)
        self._ftrace_ops: FtraceOps | None = None  # the one serving FTRACE probes
        machine.fault_notifiers.append(self._on_fault)
        # The C hit path (probes/native): owns the traps of probes with no Python handler.
        self.native: NativeDispatch | None = None
        self._native_rows: list[tuple[Kprobe, int, Any, Any, dict]] = []   # a new list per sync
        self._ftrace_pre_rows: list[tuple[Kprobe, dict, Any, dict]] = []  # FS_PRE sites' rows
        self._fpre_ok = False
        trap = getattr(self.arch, "trap_intno", None)     # the arch's breakpoint exception
        if trap is not None:
            sim_regs = getattr(self.arch, "native_sim_regs", None)
            self.native = dispatch_of(machine, trap, getattr(self.arch, "trap_pc_adjust", 0),
                                      sim_regs() if sim_regs is not None else None)
            if self.native is not None:
                self.native.set_table([])       # a new layer: forget an old one's probes
                self.native.set_pre_entry(self._native_pre_entry(), guarded=True)
                self._fpre_ok = self.native.set_fpre_entry(self._native_ftrace_entry())

    # --- registration -----------------------------------------------------------------------

    def _set_kcb(self, kcb: KprobeCtlblk) -> None:
        self.kcb = kcb
    def register_kprobe(self, p: Kprobe) -> None:
        if id(p) in self._registered:
            raise KprobeError(errno.EINVAL, "this kprobe is already registered", _where(p))
        if p.symbol_name and when_ifunc_resolved(self.m, p.symbol_name,
                                                 lambda: self.register_kprobe(p), p):
            return          # an IFUNC: armed at the guest's choice once its start-up stores it
        addr, on_entry = self._kprobe_addr(p)
        self._check_kprobe_address(p, addr)
        p.addr = addr
        p.flags = (p.flags & KPROBE_FLAG_DISABLED) | (KPROBE_FLAG_ON_FUNC_ENTRY if on_entry else 0)
        p.nmissed, p.hits, p.list, p.is_aggr = 0, 0, [], False
        old = self.table.get(addr)
        if old is not None:
            self._register_aggr(old, p)
        else:
            if not self._prepare_ftrace(p):
                self.arch.prepare(p)
            if p.ainsn.ss_trap is not None:
                self.m.register_break_addr(p.ainsn.ss_trap, self.ss_handler)
            self.table[addr] = p
            if self.native is not None:
                p.__dict__["_watch"] = self.sync_native
            if not p.disabled():
                try:
                    self._arm(p)
                except TextBusy:                # someone else's text: refused, nothing left
                    self._remove(p)
                    raise
        self._registered.add(id(p))

    def register_kprobes(self, kps: list[Kprobe]) -> None:
        if not kps:
            raise KprobeError(errno.EINVAL, "no kprobes given")
        done = []
        try:
            for p in kps:
                self.register_kprobe(p)
                done.append(p)
        except KprobeError:
            self.unregister_kprobes(done)
            raise

    def unregister_kprobe(self, p: Kprobe) -> None:
        top = self._top(p)
        if top is None:
            p.addr = None                       # as the kernel does for an invalid probe
            cancel_ifunc_wait(self.m, p)        # or one still waiting for its IFUNC
            return
        self._registered.discard(id(p))
        p.__dict__.pop("_watch", None)
        if top is p:
            self._remove(top)
            return
        top.list.remove(p)
        if not top.list:
            self._remove(top)
        else:
            self._refresh_aggr(top)
            if self.optimizer is not None and top.ainsn.armed:
                self.optimizer.try_to_optimize_kprobe(top)   # e.g. the post handler went

    def unregister_kprobes(self, kps: list[Kprobe]) -> None:
        for p in kps:
            self.unregister_kprobe(p)

    def get_kprobe(self, addr: int) -> Kprobe | None:
        return self.table.get(addr)

    def enable_kprobe(self, p: Kprobe) -> None:
        top = self._top(p)
        if top is None:
            raise KprobeError(errno.EINVAL, "kprobe is not registered", _where(p))
        if p.flags & KPROBE_FLAG_GONE:
            raise KprobeError(errno.EINVAL, "kprobe is gone", _where(p))
        p.flags &= ~KPROBE_FLAG_DISABLED
        if top is not p and top.disabled():
            top.flags &= ~KPROBE_FLAG_DISABLED
            self._arm(top)
        elif top is p and p.ainsn is not None and not p.ainsn.armed:
            self._arm(p)

    def disable_kprobe(self, p: Kprobe) -> None:
        top = self._top(p)
        if top is None:
            raise KprobeError(errno.EINVAL, "kprobe is not registered", _where(p))
        p.flags |= KPROBE_FLAG_DISABLED
        if top is p or all(c.disabled() for c in top.list):
            top.flags |= KPROBE_FLAG_DISABLED
            self._disarm(top)

    def probes(self) -> list[Kprobe]:
        """Every registered user probe (children of aggregators included), by address."""
        if self.native is not None:
            self.native.fold_counts()
        out: list[Kprobe] = []
        for addr in sorted(self.table):
            top = self.table[addr]
            out.extend(top.list if top.is_aggr else [top])
        return out

    # --- address checks ---------------------------------------------------------------------
    def _kprobe_addr(self, p: Kprobe) -> tuple[int, bool]:
        """_kprobe_addr() + arch_adjust_kprobe_addr(): the address and whether it is the
        function entry."""
        syms = self.m.symbols
        if (p.symbol_name is None) == (p.addr is None):
            raise KprobeError(errno.EINVAL, "give exactly one of symbol_name and addr", _where(p))
        if p.symbol_name is not None:
            sym = syms.lookup(p.symbol_name)
            if sym is None:
                raise KprobeError(errno.ENOENT, f"unknown symbol {p.symbol_name!r}"
                                  f"{syms.hint(p.symbol_name)}", _where(p))
            addr = sym.addr + p.offset
        else:
            assert p.addr is not None
            addr = p.addr + p.offset
        sym = syms.find(addr)
        if sym is None and self.arch.owns(addr):
            raise KprobeError(errno.EINVAL, f"address {addr:#x} is the probe layer's own code",
                              _where(p))
        if sym is None:
            if len(syms) and not self._stripped():
                raise KprobeError(errno.ENOENT, f"address {addr:#x} is in no symbol", _where(p))
            return addr, False                  # stripped binary: probe by raw address
        return self.arch.adjust_kprobe_addr(addr, sym)

    def _stripped(self) -> bool:
        image = self.m.image
        return image is not None and image.stripped

    def _check_kprobe_address(self, p: Kprobe, addr: int) -> None:
        """kernel_text_address(): executable memory, and where the image has section
        headers, an executable section (rodata can share the R-X segment)."""
        region = self.m.memory.find(addr)
        text = region is not None and region.prot & 4 and not self.arch.owns(addr)
        image = self.m.image
        if text and image is not None and image.section_ranges:
            text = any(x and a <= addr < a + n for _name, a, n, x in image.section_ranges) \
                or module_text_address(self.m, addr) is not None     # is_module_text_address
        if not text:
            raise KprobeError(errno.EINVAL, f"address {addr:#x} is not in guest text", _where(p))
        reason = self.blacklist.reason(addr)
        if reason:
            raise KprobeError(errno.EINVAL, f"address {addr:#x} is blacklisted ({reason})", _where(p))

    # --- aggregation ------------------------------------------------------------------------
    def _register_aggr(self, old: Kprobe, p: Kprobe) -> None:
        if not old.is_aggr:
            ap = Kprobe(addr=old.addr, flags=old.flags, opcode=old.opcode, ainsn=old.ainsn,
                        is_aggr=True, symbol_name=None)
            ap.list = [old]
            ap.pre_handler = self._aggr_pre_handler
            self.table[_at(old)] = ap
            old = ap
        if old.flags & KPROBE_FLAG_GONE:
            # Its module's text went and came back: a new slot for the new text, disabled
            # until an enabled child arms it (register_aggr_kprobe)
            if not self._prepare_ftrace(old):
                self.arch.prepare(old)
            if old.ainsn.ss_trap is not None:
                self.m.register_break_addr(old.ainsn.ss_trap, self.ss_handler)
            old.flags = (old.flags & ~KPROBE_FLAG_GONE) | KPROBE_FLAG_DISABLED
        p.opcode, p.ainsn = old.opcode, old.ainsn
        old.list.insert(0, p)                   # list_add: newest first, as the kernel
        if not p.disabled() and old.disabled():
            old.flags &= ~KPROBE_FLAG_DISABLED
            self._arm(old)
        self._refresh_aggr(old)

    def _refresh_aggr(self, ap: Kprobe) -> None:
        ap.post_handler = self._aggr_post_handler if any(c.post_handler for c in ap.list) else None
        if ap.post_handler is not None:
            self.arch.unboost(ap)               # a post handler needs the step trap
            if self.optimizer is not None:
                self.optimizer.unoptimize_kprobe(ap)
        ap.fault_handler = self._aggr_fault_handler if any(c.fault_handler for c in ap.list) else None
        self.sync_native()

    def _aggr_pre_handler(self, ap: Kprobe, regs: PtRegs) -> int:
        """aggr_pre_handler: every enabled child, newest first; the first that returns
        non-zero ends the chain. Each host handler call is charged (the hit path charged one)."""
        clock, first = self.m.clock, True
        for kp in ap.list:
            if kp.disabled():
                continue
            kp.hits += 1
            if kp.pre_handler is not None:
                if not first:
                    clock.charge(HANDLER)
                first = False
                if kp.pre_handler(kp, regs):
                    return 1
        return 0

    def _aggr_post_handler(self, ap: Kprobe, regs: PtRegs, flags: int) -> None:
        clock, first = self.m.clock, True
        for kp in ap.list:
            if kp.post_handler is not None and not kp.disabled():
                if not first:
                    clock.charge(HANDLER)
                first = False
                kp.post_handler(kp, regs, flags)

    @staticmethod
    def _aggr_fault_handler(ap: Kprobe, regs: PtRegs, trapnr: int) -> int:
        for kp in ap.list:
            if kp.fault_handler is not None and kp.fault_handler(kp, regs, trapnr):
                return 1
        return 0

    def is_registered(self, p: Kprobe) -> bool:
        return self._top(p) is not None

    def _top(self, p: Kprobe) -> Kprobe | None:
        if p.addr is None or id(p) not in self._registered:
            return None
        top = self.table.get(p.addr)
        if top is p or (top is not None and p in top.list):
            return top
        return None

    # --- arming -----------------------------------------------------------------------------
    def _ftrace_site(self, p: Kprobe) -> tuple[FtraceSite, FtraceOps]:
        assert self._ftrace_ops is not None             # made by _prepare_ftrace
        return self.ftrace.sites[_at(p)], self._ftrace_ops

    def _arm(self, p: Kprobe) -> None:
        if p.ainsn.armed:
            return
        if p.ainsn.ftrace:
            self.ftrace.attach_to_site(*self._ftrace_site(p))
            p.ainsn.armed = True
            return
        addr, size = _at(p), len(self.arch.breakpoint)
        opt = self.optimizer
        if opt is not None:
            opt.before_arm(addr)
        # The text belongs to the address's arch_specific_insn, which an aggregator shares.
        self.reserved.check(addr, size, p.ainsn, "kprobe")
        self.reserved.reserve(addr, size, TextUse.KPROBE, p.ainsn)
        self.m.register_break_addr(addr, self.kprobe_handler)
        self.arch.arm(p)
        if opt is not None:
            opt.try_to_optimize_kprobe(p)
        self.sync_native()

    def _disarm(self, p: Kprobe) -> None:
        if not p.ainsn.armed:
            return
        if p.ainsn.ftrace:
            self.ftrace.detach_from_site(*self._ftrace_site(p))
            p.ainsn.armed = False
            return
        if self.optimizer is not None:
            self.optimizer.unoptimize_kprobe(p)
        self.arch.disarm(p)
        self.reserved.release_owner(p.ainsn, TextUse.KPROBE)
        self.m.unregister_break_addr(_at(p))
        if self.optimizer is not None:
            self.optimizer.after_remove(_at(p))   # a covering probe may be optimized again
        self.sync_native()

    def _remove(self, top: Kprobe) -> None:
        self._disarm(top)
        if self.optimizer is not None:
            self.optimizer.release(top)
        if top.ainsn.ss_trap is not None:
            self.m.unregister_break_addr(top.ainsn.ss_trap)
        self.arch.remove(top)
        del self.table[_at(top)]
        if self.optimizer is not None:
            self.optimizer.after_remove(_at(top))
        self.sync_native()

    def disarm_all(self) -> None:
        for p in self.table.values():
            self._disarm(p)

    def arm_all(self) -> None:
        for p in self.table.values():
            if not p.disabled():
                self._arm(p)

    # --- the C hit path (probes/native) -----------------------------------------------------
    def native_row(self, p: Kprobe) -> tuple[Kprobe, int, NativeSim] | None:
        """How C serves probe `p` (KN_* flags and the simulation), or None if its hits need
        Python: a handler, an aggregator, an optimized or ftrace probe, a disarmed one, an
        instruction C does not simulate (x86 emulation, arm64 literal loads)."""
        a = p.ainsn
        if (p.is_aggr or p.post_handler or p.fault_handler or p.disabled()
                or p.flags & KPROBE_FLAG_OPTIMIZED or a is None or not a.armed or a.ftrace
                or a.optimized):
            return None
        pre = KN_PRE if p.pre_handler is not None else 0
        rp = p.kretprobe
        if rp is not None and rp.native_row >= 0:
            pre |= KN_RET                       # C hijacks; else the pre handler does
        if a.handler is not None:
            native_sim = getattr(self.arch, "native_sim", None)
            sim = native_sim(p) if native_sim is not None else None
            return None if sim is None else (p, pre, sim)
        if a.slot is None:
            return None
        if a.boosted:
            return p, pre | KN_BOOSTED, NO_SIM
        if self.arch.boost_supported and a.boostable and not self.preemptible:
            return p, pre | KN_PY_SS, NO_SIM    # the first step boosts: Python does that
        return p, pre, NO_SIM

    def _native_pre_entry(self) -> Callable[[int], int]:
        """C took the trap of a probe whose only handler is a Python pre handler (TRAP and
        HANDLER charged there): the closure `pre(row)` runs it as kprobe_handler would; 1
        if the hit is complete (the handler set ip, or changed the probe table, so Python
        finishes the step). One Python frame around the handler, one pt_regs view reused
        for every hit (as the kernel's per-trap frame), the hook's error handling inlined."""
        native, m = self.native, self.m
        assert native is not None
        regs = PtRegs(m)
        flush, st, dirty, pc = regs.flush, native.st, regs._dirty, m.arch.pc

        def pre(row: int) -> int:
            kcb = self.kcb                  # this CPU's (per-CPU, swapped on a CPU switch)
            try:
                rows = self._native_rows
                p, ip, handler, record, pd = rows[row]
                kcb.current, kcb.status = p, KPROBE_HIT_ACTIVE
                pd["hits"] += 1             # not p.hits: Kprobe.__setattr__ watches handlers
                regs._cache = {pc: ip}      # regs.reset(ip), inlined (hot path)
                if dirty:
                    dirty.clear()
                stub = self.bpf_stub(p) if self.bpf_stub is not None else None
                if stub is not None:        # the programs run in the guest: kcb stays
                    m.pc = stub             # ACTIVE, bpf_stub_done steps (Python's)
                    return 1
                if record is not None and st.trace_len:      # C built the event's record
                    body, st.trace_len = ctypes.string_at(st.trace_buf, st.trace_len), 0
                    if record(p, regs, body):
                        flush()
                        kcb.current, kcb.status = None, 0
                        return 1
                elif handler is not None and handler(p, regs):
                    flush()
                    kcb.current, kcb.status = None, 0
                    return 1
                if rows is not self._native_rows:   # C's table (and its row) was replaced
                    self._setup_singlestep(p, regs, reenter=False)
                    return 1
                if dirty:
                    flush()
                kcb.current, kcb.status = None, 0
                return 0
            except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
                m.hooks.fail(exc)
                return 1
        return pre

    def sync_native(self) -> None:
        """Hand C the probes it can serve (after any change of the table or a probe)."""
        native = self.native
        if native is None:
            return
        self._take_native_current()
        rows = [r for p in self.table.values() if (r := self.native_row(p)) is not None]
        native.set_table(rows)
        # what the pre entry needs of row i: the probe, its ip, its handler, its recorder
        self._native_rows = [(p, _at(p) + self.ip_offset, p.pre_handler,
                              p.__dict__.get("native_trace"), p.__dict__) for p, _f, _s in rows]
        native.serve_detours([(oi.handle, p, self._detour_counts_only(p))
                              for p in self.table.values()
                              if p.ainsn is not None and (oi := p.ainsn.optinsn) is not None
                              and oi.handle is not None])
        self.sync_ftrace()

    def sync_ftrace(self) -> None:
        """Hand C's ftrace caller the sites it serves (kprobes' and other ops')."""
        ftrace: Any = self.m.layers.get("ftrace")     # none made yet: nothing to serve
        if self.native is not None and ftrace is not None and (
                self._ftrace_ops is not None or ftrace._native_kprobes is self):
            self.native.serve_ftrace(self._ftrace_rows())

    def _ftrace_rows(self) -> list[FtraceRow]:
        """The ftrace sites of FTRACE probes, for the C caller: served in C when the
        kprobes' ops is the site's only one and the probe has no Python handler (FS_COUNT)
        or only a pre handler, which C calls (FS_PRE, row i of `_ftrace_pre_rows`)."""
        ftrace, ops, rows = self.ftrace, self._ftrace_ops, []
        back = getattr(ftrace.arch, "ftrace_key_back", 0)
        entry_of = getattr(ftrace.arch, "ftrace_native_entry", None)
        pre_rows: list[tuple[Kprobe, dict, Any, dict]] = []
        if entry_of is None:
            return []
        for p in self.table.values():
            site = ftrace.sites.get(_at(p)) if p.ainsn is not None and p.ainsn.ftrace else None
            entry = entry_of(site.addr) if site is not None else None
            if site is None or entry is None:
                continue
            alone = site.ops == [ops] and not (p.post_handler or p.fault_handler)
            how, idx = FS_PYTHON, 0
            if alone and self._detour_counts_only(p):
                how = FS_COUNT
            elif alone and self._fpre_ok and not (p.is_aggr or p.disabled()):
                how, idx = FS_PRE, len(pre_rows)
                # the pt_regs ftrace_regs presents (sp as an offset from the hit's sp)
                shown = ftrace.shown_regs(site.addr)
                shown[self.m.arch.pc] = self.arch.handler_ip(p)     # as if a breakpoint hit
                pre_rows.append((p, shown, p.pre_handler, p.__dict__))
            if how != FS_PYTHON:
                rows.append((entry[0], entry[1], back, p, how, idx))
        self._ftrace_pre_rows = pre_rows
        served = {_at(r[3]) for r in rows}
        return rows + ftrace.native_rows(served)

    def _native_ftrace_entry(self) -> Callable[[int], int]:
        """C's ftrace caller took a site whose one ops is ours and whose kprobe has only a
        Python pre handler (DETOUR and HANDLER charged there): `fpre(row)` is
        kprobe_ftrace_handler and the end of the caller (_ftrace_caller), with one reused
        pt_regs view. Returns 0."""
        m, arch, ftrace = self.m, self.m.arch, self.ftrace
        assert self.native is not None
        regs, st = PtRegs(m), self.native.st
        dirty, flush, pc, sp = regs._dirty, regs.flush, arch.pc, arch.sp

        def fpre(row: int) -> int:
            kcb = self.kcb
            try:
                p, shown, handler, pd = self._ftrace_pre_rows[row]
                cache = regs.reset_at_site(shown, st.hit_sp)
                kcb.current, kcb.status = p, KPROBE_HIT_ACTIVE
                pd["hits"] += 1
                stub = self.bpf_stub(p) if self.bpf_stub is not None else None
                if stub is not None:        # kcb stays ACTIVE: bpf_stub_done ends the hit
                    ftrace.arch.ftrace_return_to(m, stub)
                    return 0
                if not handler(p, regs):
                    cache[pc] = p.addr + p.ainsn.length     # "single-step" over the nop
                    dirty.discard(pc)
                kcb.current, kcb.status = None, 0
                dirty.discard(sp)       # ftrace_regs_caller ignores a changed sp
                if pc in dirty:
                    new_ip = regs.ip
                    dirty.discard(pc)
                    flush()
                    ftrace.arch.ftrace_return_to(m, new_ip)
                elif dirty:
                    flush()
                return 0
            except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
                m.hooks.fail(exc)
                return 0
        return fpre

    def _ftrace_site_changed(self, site: FtraceSite) -> None:
        if site.addr in self.table:
            self.sync_native()

    @staticmethod
    def _detour_counts_only(p: Kprobe) -> bool:
        """optimized_callback has nothing to call for `p`: C counts the hit."""
        return not (p.is_aggr or p.pre_handler or p.disabled())

    def _take_native_current(self) -> None:
        """A probe C is stepping becomes the kcb's current one (Python takes over)."""
        if self.native is not None:
            p = self.native.take_current()
            if p is not None:
                self.kcb.current, self.kcb.status = p, KPROBE_HIT_SS

    # --- the hit path -----------------------------------------------------------------------
    def kprobe_handler(self, addr: int) -> bool:
        """The breakpoint at a probe's address trapped (kprobe_handler/kprobe_int3_handler).
        This is the hot path: registers are touched only when a handler or the arch needs
        them."""
        p = self.table.get(addr)
        if p is None:
            return False
        if self.native is not None:
            self._take_native_current()
        kcb, clock = self.kcb, self.m.clock
        if kcb.current is not None:
            clock.charge(TRAP)
            self._reenter(p, PtRegs(self.m, self.arch.handler_ip(p)))
            return True
        kcb.current, kcb.status = p, KPROBE_HIT_ACTIVE
        if not p.is_aggr:
            p.hits += 1
        regs = None
        if p.pre_handler is None:
            clock.charge(TRAP)
        else:
            clock.charge2(TRAP, HANDLER)
            stub = self.bpf_stub(p) if self.bpf_stub is not None else None
            if stub is not None:
                # The handler's programs run in the guest (no nested run); the stub's trap
                # resumes this hit in bpf_stub_done with the handler's "0" (kcb stays ACTIVE).
                self.m.pc = stub
                return True
            regs = PtRegs(self.m, addr + self.ip_offset)
            if p.pre_handler(p, regs):
                # The handler set ip itself: no single-step, no post handler.
                regs.flush()
                kcb.current, kcb.status = None, 0
                return True
        if p.flags & KPROBE_FLAG_OPTIMIZED and self.optimizer is not None:
            if regs is not None:
                regs.flush()
            if self.optimizer.handle_queued_hit(p):
                kcb.current, kcb.status = None, 0
                return True
        self._setup_singlestep(p, regs, reenter=False)
        return True

    def bpf_stub_done(self, p: Kprobe) -> bool:
        """The trap at the end of `p`'s BPF stub: the pre handler's work is done (it never
        changes ip), so the hit goes on as kprobe_handler goes on after one."""
        kcb = self.kcb
        if kcb.current is not p or kcb.status != KPROBE_HIT_ACTIVE:
            return False
        # not charged: the kernel runs the programs inside the int3/BRK handler, one trap
        if p.ainsn.ftrace:      # kprobe_ftrace_handler after the pre handler: over the nop
            self.m.pc = p.addr + p.ainsn.length
            if p.post_handler is not None:
                kcb.status = KPROBE_HIT_SSDONE
                self.m.clock.charge(HANDLER)
                p.post_handler(p, PtRegs(self.m), 0)
            kcb.current, kcb.status = None, 0
            return True
        if p.flags & KPROBE_FLAG_OPTIMIZED and self.optimizer is not None \
                and self.optimizer.handle_queued_hit(p):
            kcb.current, kcb.status = None, 0       # a queued probe: on in its detour
            return True
        self._setup_singlestep(p, None, reenter=False)
        return True

    def _reenter(self, p: Kprobe, regs: PtRegs) -> None:
        kcb = self.kcb
        if kcb.status == KPROBE_REENTER:
            # "Unrecoverable kprobe detected" (the kernel BUG()s): only a guest that sends
            # a slot back into its probe gets here, e.g. one that rewrote the slot.
            kcb.current, kcb.status = None, 0
            kcb.prev.clear()
            self.m.pc = _at(p)
            self.m.stop_fault(Fault("unrecoverable kprobe reentry", _at(p), None, SIGTRAP))
            return
        self.kprobes_inc_nmissed_count(p)
        kcb.save()
        kcb.current, kcb.status = p, KPROBE_REENTER
        self._setup_singlestep(p, regs, reenter=True)

    @staticmethod
    def kprobes_inc_nmissed_count(p: Kprobe) -> None:
        if not p.is_aggr:
            p.nmissed += 1
        else:
            for kp in p.list:
                kp.nmissed += 1

    def _setup_singlestep(self, p: Kprobe, regs: PtRegs | None, reenter: bool) -> None:
        ainsn = p.ainsn
        if ainsn.handler is not None:           # simulated/emulated: done right here
            if regs is None:
                regs = PtRegs(self.m, self.arch.handler_ip(p))
            try:
                ainsn.handler(p, regs)
            except UserFault as e:
                self._emulation_fault(p, e)
                return
            regs.flush()
            self._post_kprobe(p, regs)
            return
        if regs is not None:
            regs.flush()
        self.m.pc = ainsn.slot                  # arch_prepare_ss: run the slot
        if ainsn.boosted and p.post_handler is None:
            # Boosted: the slot jumps back by itself; no step trap, nothing more to do.
            if reenter:
                self.kcb.restore()
            else:
                self.kcb.current, self.kcb.status = None, 0
            return
        if not reenter:
            self.kcb.status = KPROBE_HIT_SS

    def _emulation_fault(self, p: Kprobe, e: UserFault) -> None:
        """A simulated/emulated instruction met memory the guest cannot access: the fault
        the instruction itself takes, reported at the probe address as a fault while
        stepping is (kprobe_fault_handler). Its register changes are not written back."""
        kcb, m = self.kcb, self.m
        m.pc = addr = _at(p)
        if kcb.status == KPROBE_REENTER:
            kcb.restore()
        else:
            if p.fault_handler is not None:
                p.fault_handler(p, PtRegs(m), SIGSEGV)
            kcb.current, kcb.status = None, 0
        m.stop_fault(user_fault(e, addr))

    def ss_handler(self, addr: int) -> bool:
        """The trap that ends an out-of-line slot fired (BRK #6 / the slot's int3)."""
        if self.native is not None:
            self._take_native_current()
        kcb, p = self.kcb, self.kcb.current
        if p is None or kcb.status not in (KPROBE_HIT_SS, KPROBE_REENTER) or p.ainsn.ss_trap != addr:
            return False
        clock = self.m.clock
        self.m.pc = p.addr + p.ainsn.length     # resume_execution: the next instruction
        if kcb.status == KPROBE_HIT_SS and p.post_handler is not None:
            clock.charge2(STEP, HANDLER)
            kcb.status = KPROBE_HIT_SSDONE
            regs = PtRegs(self.m)
            p.post_handler(p, regs, 0)          # regs.ip is where execution resumes
            regs.flush()
            kcb.current, kcb.status = None, 0
            return True
        clock.charge(STEP)
        if kcb.status == KPROBE_HIT_SS and not self.preemptible:
            if self.arch.boost(p) and self.native is not None:  # the step worked: later
                self.sync_native()                             # hits may skip it
        self._post_kprobe(p, None)
        return True

    def _post_kprobe(self, p: Kprobe, regs: PtRegs | None) -> None:
        kcb = self.kcb
        if kcb.status == KPROBE_REENTER:
            kcb.restore()
            return
        kcb.status = KPROBE_HIT_SSDONE
        if p.post_handler is not None:
            self.m.clock.charge(HANDLER)
            if regs is None:
                regs = PtRegs(self.m)
            p.post_handler(p, regs, 0)          # regs.ip is where execution resumes
            regs.flush()
        kcb.current, kcb.status = None, 0

    # --- kprobes on ftrace sites (arch/x86/kernel/kprobes/ftrace.c) ----------------------------
    @property
    def ftrace(self) -> Ftrace:
        return ftrace_of(self.m)

    def _prepare_ftrace(self, p: Kprobe) -> bool:
        """A probe on an ftrace site is served by ftrace: no breakpoint, no slot."""
        assert p.addr is not None
        ftrace = self.ftrace
        if ftrace.ftrace_location(p.addr) is None:
            return False
        if self._ftrace_ops is None:
            self._ftrace_ops = FtraceOps(self.kprobe_ftrace_handler, ipmodify=True,
                                         wants_parent=False)
            if self.native is not None:
                ftrace.site_listeners.append(self._ftrace_site_changed)
        p.flags |= KPROBE_FLAG_FTRACE
        p.opcode = b""
        p.ainsn = ArchSpecificInsn(kind=StepKind.FTRACE, length=ftrace.site_size,
                                   mnemonic="nop (ftrace site)", ftrace=True)
        return True

    def kprobe_ftrace_handler(self, ip: int, parent_ip: int, ops: FtraceOps,
                              regs: PtRegs) -> None:
        p = self.table.get(ip)
        if p is None or p.disabled():
            return
        kcb, m = self.kcb, self.m
        if kcb.current is not None:
            self.kprobes_inc_nmissed_count(p)
            return
        pc = m.arch.pc
        regs.present(pc, self.arch.handler_ip(p))        # as if a breakpoint had hit
        kcb.current, kcb.status = p, KPROBE_HIT_ACTIVE
        if not p.is_aggr:
            p.hits += 1
        if p.pre_handler is not None:
            m.clock.charge(HANDLER)
            stub = self.bpf_stub(p) if self.bpf_stub is not None else None
            if stub is not None:
                # The programs run in the guest: the trampoline is left for the stub (kcb
                # stays ACTIVE) and the stub's trap ends the hit in bpf_stub_done.
                regs[pc] = stub
                return
        if p.pre_handler is None or not p.pre_handler(p, regs):
            regs.present(pc, p.addr + p.ainsn.length)    # "single-step" over the nop
            if p.post_handler is not None:
                kcb.status = KPROBE_HIT_SSDONE
                m.clock.charge(HANDLER)
                p.post_handler(p, regs, 0)
            regs.forget(pc)
        kcb.current, kcb.status = None, 0

    def _on_fault(self, fault: Fault) -> None:
        """A fault while stepping in a slot: report it at the probed instruction and give
        the probe's fault_handler its turn (kprobe_fault_handler)."""
        self._take_native_current()
        kcb, p = self.kcb, self.kcb.current
        if p is None or kcb.status not in (KPROBE_HIT_SS, KPROBE_REENTER):
            # A boosted slot runs with no kprobe current; its copy faults the same way.
            p = next((q for q in self.table.values() if q.ainsn is not None and q.ainsn.boosted
                      and self.arch.in_slot(q, fault.pc)), None)
            if p is not None:
                fault.pc = self.m.pc = _at(p)
            return
        if not self.arch.in_slot(p, fault.pc):
            return
        fault.pc = self.m.pc = _at(p)
        if kcb.status == KPROBE_REENTER:
            kcb.restore()
        else:
            if p.fault_handler is not None:
                p.fault_handler(p, PtRegs(self.m), fault.signal)
            kcb.current, kcb.status = None, 0


def _at(p: Kprobe) -> int:
    """The address of a registered probe (registration sets it)."""
    assert p.addr is not None, "the kprobe is not registered"
    return p.addr


def probe_kind(p: Kprobe) -> ProbeKind:
    """kprobe, kretprobe, boosted, optimized, ftrace: what `emu inspect`, the sweep and
    --stats call a probe."""
    if p.kretprobe is not None:
        return ProbeKind.KRETPROBE
    ainsn = p.ainsn
    if ainsn.optimized:
        return ProbeKind.OPTIMIZED
    if ainsn.ftrace:
        return ProbeKind.FTRACE
    if ainsn.boosted:
        return ProbeKind.BOOSTED
    return ProbeKind.KPROBE


def _where(p: Kprobe) -> str:
    if p.symbol_name is not None:
        return f"{p.symbol_name}+{p.offset:#x}" if p.offset else p.symbol_name
    return f"{(p.addr or 0) + p.offset:#x}"


def kprobes_of(machine: Machine) -> Kprobes:
    """The machine's kprobe state, created on first use."""
    kprobes: Kprobes = machine.layer("kprobes", Kprobes)
    return kprobes


# Kernel-style entry points on a machine.
def register_kprobe(machine: Machine, p: Kprobe) -> None:
    kprobes_of(machine).register_kprobe(p)


def unregister_kprobe(machine: Machine, p: Kprobe) -> None:
    kprobes_of(machine).unregister_kprobe(p)


def register_kprobes(machine: Machine, kps: list[Kprobe]) -> None:
    kprobes_of(machine).register_kprobes(kps)


def unregister_kprobes(machine: Machine, kps: list[Kprobe]) -> None:
    kprobes_of(machine).unregister_kprobes(kps)


def enable_kprobe(machine: Machine, p: Kprobe) -> None:
    kprobes_of(machine).enable_kprobe(p)


def disable_kprobe(machine: Machine, p: Kprobe) -> None:
    kprobes_of(machine).disable_kprobe(p)


def get_kprobe(machine: Machine, addr: int) -> Kprobe | None:
    return kprobes_of(machine).get_kprobe(addr)
