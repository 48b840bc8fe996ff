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
from typing import IO, Callable

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
        self.ops.append(ops)
        count = 0
        for site in self.sites.values():
            if ops.wants(site.func):
                self._add(site, ops)
                count += 1
        return count

    def unregister_ftrace_function(self, ops: FtraceOps) -> None:
        if ops in self.ops:
            self.ops.remove(ops)
        for site in self.sites.values():
            if ops in site.ops:
                self._remove(site, ops)

    def attach_to_site(self, site: FtraceSite, ops: FtraceOps) -> None:
        if ops not in site.ops:
            self._add(site, ops)

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

    def _remove(self, site: FtraceSite, ops: FtraceOps) -> None:
        site.ops.remove(ops)
        if not site.ops:                 # ftrace_make_nop
            self.reserved.text_poke(self.m, site.addr, self.arch.ftrace_nop, site)
        for listener in self.site_listeners:
            listener(site)

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
        regs = self.arch.ftrace_regs(m, site.addr, sp)
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
