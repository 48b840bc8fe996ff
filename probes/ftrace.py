"""Dynamic ftrace (kernel/trace/ftrace.c, arch/x86/kernel/ftrace.c, arch/arm64/kernel/ftrace.c)
and kprobes on ftrace sites (arch/x86/kernel/kprobes/ftrace.c).

Binaries built with function-entry patch sites (x86-64 `-pg -mfentry -mnop-mcount
-mrecord-mcount`: a 5-byte nop listed in `__mcount_loc`; arm64
`-fpatchable-function-entry=2`: two nops listed in `__patchable_function_entries`) carry
a table of their sites, as the kernel's mcount_loc. A site stays a nop until some
`FtraceOps` wants its function; then text_poke turns it into a call to a trampoline the
layer owns, whose first instruction is a host entry that runs the ops: x86 `call tramp`
(one shared trampoline ending in `ret`, as the kernel's); arm64 `b` to a per-site
trampoline `[host entry][b site+4]`. (Deviation: the kernel's arm64 sequence
`mov x9, x30; bl ftrace_caller` clobbers x9 and hides lr behind it; the per-site branch
changes no register, so return probes on the same function keep their lr hijack.)

A kprobe placed on a site takes the FTRACE path: no breakpoint, no single-step;
kprobe_ftrace_handler presents regs as after a breakpoint (x86 ip = site + 1) and skips
the nop. Mainline arm64 has no kprobes on ftrace; here the patchable entry serves alike."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import IO, Any, Callable

from emu.clock import DETOUR
from emu.machine import Machine
from emu.uaccess import UserFault
from probes.arch import ArchFtrace, arch_probes_of
from probes.errors import user_fault
from probes.regs import PtRegs
from probes.reserved_text import ReservedText, TextUse, reserved_text_of

FtraceFunc = Callable[[int, int, "FtraceOps", PtRegs], None]   # (ip, parent_ip, ops, regs)


@dataclass(eq=False)
class FtraceOps:
    """struct ftrace_ops: a callback and the functions it wants (glob patterns; empty =
    every function with a site)."""
    func: FtraceFunc
    filters: list[str] = field(default_factory=list)
    ipmodify: bool = False          # FTRACE_OPS_FL_IPMODIFY: may change regs.ip
    wants_parent: bool = True       # False: parent_ip is passed as 0 (saves a stack read)

    def wants(self, name: str) -> bool:
        return not self.filters or any(fnmatch.fnmatchcase(name, f) for f in self.filters)


@dataclass
class FtraceSite:
    """struct dyn_ftrace: one patch site."""
    addr: int
    func: str
    ops: list[FtraceOps] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.ops)


class Ftrace:
    """The ftrace state of a machine."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.arch: ArchFtrace = arch_probes_of(machine).ftrace
        self.reserved: ReservedText = reserved_text_of(machine)
        self.sites: dict[int, FtraceSite] = {}
        self.ops: list[FtraceOps] = []
        # called with a site whose ops changed (the C caller serves only kprobe-only sites)
        self.site_listeners: list[Callable[[FtraceSite], None]] = []
        # The C caller (probes/native): it runs the ops of the sites in `native_sites`
        # (FS_OPS rows) through `_native_entry`; a change of sites is handed to it at the
        # next hit Python's caller takes.
        self.native_sites: list[tuple[FtraceSite, dict[str, int]]] = []
        self._native_kprobes: Any = None       # the Kprobes layer whose dispatcher serves us
        self._native_tried = self._native_dirty = False
        self._discover()

    def _discover(self) -> None:
        image = self.m.image
        if image is None:
            return
        for site in image.address_table(self.arch.ftrace_section):
            sym = self.m.symbols.find(site)
            if sym is None or self.m.original_text(site, len(self.arch.ftrace_nop)) != self.arch.ftrace_nop:
                continue                     # not a pristine nop site: leave it alone
            self.sites[site] = rec = FtraceSite(site, sym.name)
            self.reserved.reserve(site, self.arch.ftrace_patch_size, TextUse.FTRACE, rec)

    def ftrace_location(self, addr: int) -> FtraceSite | None:
        return self.sites.get(addr)

    @property
    def site_size(self) -> int:
        """Bytes of one patch site (MCOUNT_INSN_SIZE)."""
        return len(self.arch.ftrace_nop)

    # --- ops ---------------------------------------------------------------------------------
    def register_ftrace_function(self, ops: FtraceOps) -> int:
        """Attach `ops` to every site whose function it wants; returns how many."""
        self._attach_native()
        self.ops.append(ops)
        count = 0
        for site in self.sites.values():
            if ops.wants(site.func):
                self._add(site, ops)
                count += 1
        self._native_settle()
        return count

    def unregister_ftrace_function(self, ops: FtraceOps) -> None:
        if ops in self.ops:
            self.ops.remove(ops)
        for site in self.sites.values():
            if ops in site.ops:
                self._remove(site, ops)

    def attach_to_site(self, site: FtraceSite, ops: FtraceOps) -> None:
        self._attach_native()
        if ops not in site.ops:
            self._add(site, ops)
            self._native_settle()

    def detach_from_site(self, site: FtraceSite, ops: FtraceOps) -> None:
        if ops in site.ops:
            self._remove(site, ops)

    def _add(self, site: FtraceSite, ops: FtraceOps) -> None:
        site.ops.append(ops)
        if len(site.ops) == 1:           # ftrace_make_call: nop -> call of a trampoline
            call = self.arch.ftrace_make_call(site.addr, self._ftrace_caller)
            self.reserved.text_poke(self.m, site.addr, call, site)
        for listener in self.site_listeners:
            listener(site)
        self._native_dirty = True

    def _remove(self, site: FtraceSite, ops: FtraceOps) -> None:
        site.ops.remove(ops)
        if not site.ops:                 # ftrace_make_nop
            self.reserved.text_poke(self.m, site.addr, self.arch.ftrace_nop, site)
        for listener in self.site_listeners:
            listener(site)
        self._native_dirty = True

    # --- the C caller (probes/native) ---------------------------------------------------------
    def _attach_native(self) -> None:
        """Give the C hit path (the kprobes layer's dispatcher) the entry that runs a
        site's ops, once."""
        if self._native_tried:
            return
        self._native_tried = True
        from probes.kprobes import kprobes_of
        kps = kprobes_of(self.m)
        if kps.native is not None and kps.native.set_fops_entry(self._native_entry()):
            self._native_kprobes = kps
            self.m.stop_listeners.append(self._native_settle)

    def _native_settle(self) -> None:
        """Sites changed: C's caller takes them now (between runs: a hook swapped while a
        run goes on takes effect only once its code is translated again)."""
        if self._native_dirty and self._native_kprobes is not None and not self.m.running:
            self._native_dirty = False
            self._native_kprobes.sync_ftrace()

    def native_rows(self, served: set[int]) -> list:
        """FS_OPS rows (probes/native FtraceRow) for the enabled sites the kprobes layer
        does not serve itself (`served`): C's caller runs their ops through the entry."""
        from probes.native import FS_OPS
        entry_of = getattr(self.arch, "ftrace_native_entry", None)
        back = getattr(self.arch, "ftrace_key_back", 0)
        rows: list = []
        self.native_sites = []
        if self._native_kprobes is None or entry_of is None:
            return rows
        for site in self.sites.values():
            entry = entry_of(site.addr) if site.ops and site.addr not in served else None
            if entry is None:
                continue
            shown = self.shown_regs(site.addr)
            rows.append((entry[0], entry[1], back, None, FS_OPS, len(self.native_sites)))
            self.native_sites.append((site, shown))
        return rows

    def shown_regs(self, addr: int) -> dict[str, int]:
        """The registers ftrace_regs presents at the site at `addr`, sp as an offset from
        the hit's (PtRegs.reset_at_site adds it): the rows C's ftrace caller serves."""
        return dict(self.arch.ftrace_regs(self.m, addr, 0)._cache)

    def _native_entry(self) -> Callable[[int], int]:
        """`fops(row)`: _ftrace_caller for an FS_OPS site C took (DETOUR charged, sp of the
        hit in the dispatcher's `hit_sp`), with one reused pt_regs view."""
        m = self.m
        regs = PtRegs(m)

        def fops(row: int) -> int:
            try:
                site, shown = self.native_sites[row]
                kps = self._native_kprobes
                assert kps is not None and kps.native is not None
                sp = kps.native.st.hit_sp
                regs.reset_at_site(shown, sp)
                self._call_ops(site, sp, regs)
            except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
                m.hooks.fail(exc)
            return 0
        return fops

    def _call_ops(self, site: FtraceSite, sp: int, regs: PtRegs) -> None:
        """Each ops' func, then what ftrace_regs_caller writes back."""
        m = self.m
        parent_ip = None
        for ops in list(site.ops):
            if ops.wants_parent and parent_ip is None:
                parent_ip = self.arch.ftrace_parent(m, sp)
            ops.func(site.addr, parent_ip or 0, ops, regs)
        # ftrace_regs_caller writes back the general registers and (IPMODIFY) ip, but sp
        # comes from its own frame: a handler's change of regs.sp is ignored, on both paths.
        regs.forget(m.arch.sp)
        if regs.ip_changed():
            new_ip = regs.ip
            regs.forget(m.arch.pc)
            regs.flush()
            self.arch.ftrace_return_to(m, new_ip)     # leave the trampoline for new_ip
        else:
            regs.flush()

    # --- the trampoline's host entry --------------------------------------------------------------
    def _ftrace_caller(self, pc: int) -> None:
        m = self.m
        sp = m.sp
        try:
            site = self.sites.get(self.arch.ftrace_site(m, pc, sp))
        except UserFault as e:   # only a guest that jumps here with a bad sp: the
            m.stop_fault(user_fault(e, pc))           # trampoline's own stack read faults
            return
        if site is None:
            return
        m.clock.charge(DETOUR)
        self._call_ops(site, sp, self.arch.ftrace_regs(m, site.addr, sp))
        if self._native_dirty and self._native_kprobes is not None:
            self._native_dirty = False          # C's caller takes the changed sites
            self._native_kprobes.sync_ftrace()


def ftrace_of(machine: Machine) -> Ftrace:
    ftrace: Ftrace = machine.layer("ftrace", Ftrace)
    return ftrace


# --- the function tracer ---------------------------------------------------------------------
class FunctionTracer:
    """The `function` tracer: one line per traced call, as in the kernel's trace file:
    `<comm>-<pid> [cpu] flags timestamp: func <-parent`."""

    def __init__(self, machine: Machine, filters: list[str], out: IO[str]) -> None:
        from probes.trace.tracefs import tracefs_of
        self.m = machine
        self.out = out
        self.lines = 0
        # One more producer into the trace ring buffer; the lines come from its records.
        self.tracefs = tracefs_of(machine)
        self.tracefs.stream_to(out)
        self.ops = FtraceOps(self._trace, filters)
        self.enabled_sites = ftrace_of(machine).register_ftrace_function(self.ops)

    def _trace(self, ip: int, parent_ip: int, ops: FtraceOps, regs: PtRegs) -> None:
        if self.tracefs.trace_function(ip, parent_ip):
            self.lines += 1
