"""Kprobes and loadable modules (kernel/kprobes.c: kprobes_module_callback, kill_kprobe).

Load and unload modules through `load_module` / `unload_module` here: they put the probe
layer's notifier block on the machine's module chain first (priority 0, as the kernel's
kprobe_module_nb). When a module goes, every probe on its text is killed: marked GONE
(with its aggregated children), disarmed so the text holds its own bytes again, its slot
and single-step trap freed. The probe stays registered (listed, `[GONE]`), can no longer be
enabled, and is unregistered as usual. When a module comes, kprobe events on its `MOD:SYM`
(defined before it was loaded, or left GONE by its last unload) are registered again
(trace_kprobe_module_nb)."""
from __future__ import annotations

from typing import Any

from emu.machine import Machine
from emu.module import Module, Modules, ModuleState, modules_of
from probes.ftrace import FtraceSite, ftrace_of
from probes.kprobes import KPROBE_FLAG_GONE, Kprobe, Kprobes, kprobes_of
from probes.reserved_text import TextUse

KPROBES_NB_PRIORITY = 0


class KprobesModuleNotifier:
    """kprobe_module_nb for one machine."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.killed: list[Kprobe] = []
        modules_of(machine).register_module_notifier(self.kprobes_module_callback,
                                                     KPROBES_NB_PRIORITY)

    def kprobes_module_callback(self, _mods: Modules, state: ModuleState, mod: Module) -> None:
        if state != ModuleState.GOING or "kprobes" not in self.m.layers:
            return
        kp = kprobes_of(self.m)
        for addr, p in sorted(kp.table.items()):
            if mod.within_module_text(addr) and not p.flags & KPROBE_FLAG_GONE:
                kill_kprobe(kp, p)
                self.killed.append(p)


def kill_kprobe(kp: Kprobes, p: Kprobe) -> None:
    """kill_kprobe: GONE on the probe and its aggregated children, no post handler on the
    aggregator, out of the text (the module's pages go next), slot freed."""
    p.flags |= KPROBE_FLAG_GONE
    if p.is_aggr:
        for child in p.list:
            child.flags |= KPROBE_FLAG_GONE
        p.post_handler = None
    kp._disarm(p)                       # also unoptimizes (kill_optimized_kprobe)
    if kp.optimizer is not None:
        kp.optimizer.release(p)
    trap = p.ainsn.ss_trap if p.ainsn is not None else None
    if trap is not None:
        kp.m.unregister_break_addr(trap)
    kp.arch.remove(p)                   # arch_remove_kprobe: the slot goes back


class FtraceModuleNotifier:
    """ftrace_module_init/_enable and ftrace_release_mod: a module built with patch sites
    (-pg -mfentry -mnop-mcount -mrecord-mcount / -fpatchable-function-entry=2) brings its
    sites, which the ops already registered get as it comes (first in the chain); they go
    after everything else has let go of them (last)."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.sites: dict[str, list[int]] = {}
        mods = modules_of(machine)
        mods.register_module_notifier(self._coming, FTRACE_COMING_PRIORITY)
        mods.register_module_notifier(self._going, -FTRACE_COMING_PRIORITY)

    def _coming(self, _mods: Modules, state: ModuleState, mod: Module) -> None:
        if state != ModuleState.COMING:
            return
        ft = ftrace_of(self.m)
        nop = ft.arch.ftrace_nop
        added = self.sites[mod.name] = []
        for addr in mod.image.address_table(ft.arch.ftrace_section):
            sym = self.m.symbols.find(addr)
            if (sym is None or addr in ft.sites or not mod.within_module_text(addr)
                    or self.m.original_text(addr, len(nop)) != nop):
                continue
            ft.sites[addr] = site = FtraceSite(addr, sym.name)
            ft.reserved.reserve(addr, ft.arch.ftrace_patch_size, TextUse.FTRACE, site)
            added.append(addr)
            for ops in ft.ops:
                if ops.wants(site.func):
                    ft.attach_to_site(site, ops)

    def _going(self, _mods: Modules, state: ModuleState, mod: Module) -> None:
        if state != ModuleState.GOING:
            return
        ft = ftrace_of(self.m)
        for addr in self.sites.pop(mod.name, []):
            site = ft.sites.pop(addr)
            for ops in list(site.ops):
                ft.detach_from_site(site, ops)       # the nop back, the text released
            ft.reserved.release_owner(site, TextUse.FTRACE)


FTRACE_COMING_PRIORITY = 1 << 30


class TracepointModuleNotifier:
    """tracepoint_module_notify: a coming module's tracepoints, jump-label sites and raw
    tracepoints join the machine's; a going module's leave (probes/tracepoint.py)."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        modules_of(machine).register_module_notifier(self.tracepoint_module_notify, 0)

    def tracepoint_module_notify(self, _mods: Modules, state: ModuleState, mod: Module) -> None:
        from probes.tracepoint import tracepoints_from_image, tracepoints_release_module
        if state == ModuleState.COMING:
            tracepoints_from_image(self.m, mod.image, mod)
        elif state == ModuleState.GOING:
            tracepoints_release_module(self.m, mod)


class TraceKprobeModuleNotifier:
    """trace_kprobe_module_nb (priority 1): a coming module's `MOD:SYM` kprobe events are
    registered again (probes/trace/trace_kprobe.py). The kernel's pr_warn for one that
    fails is kept in `warnings`."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.warnings: list[str] = []
        modules_of(machine).register_module_notifier(self.trace_kprobe_module_callback,
                                                     TRACE_KPROBE_NB_PRIORITY)

    def trace_kprobe_module_callback(self, _mods: Modules, state: ModuleState,
                                     mod: Module) -> None:
        fs: Any = self.m.layers.get("tracefs")     # the Tracefs, if one was made
        if state == ModuleState.COMING and fs is not None:
            self.warnings += fs.kprobes.trace_kprobe_module_callback(mod.name)


TRACE_KPROBE_NB_PRIORITY = 1


def module_notifier_of(machine: Machine) -> KprobesModuleNotifier:
    machine.layer("ftrace-module-nb", FtraceModuleNotifier)
    machine.layer("tracepoint-module-nb", TracepointModuleNotifier)
    machine.layer("trace-kprobe-module-nb", TraceKprobeModuleNotifier)
    nb: KprobesModuleNotifier = machine.layer("kprobes-module-nb", KprobesModuleNotifier)
    return nb


def load_module(machine: Machine, path: str, name: str | None = None) -> Module:
    """insmod: the module is LIVE on return (its init_module ran in the guest)."""
    module_notifier_of(machine)
    return modules_of(machine).load(path, name)


def unload_module(machine: Machine, mod: Module | str) -> None:
    """rmmod: by module or by name."""
    module_notifier_of(machine)
    mods = modules_of(machine)
    found = mods.find_module(mod) if isinstance(mod, str) else mod
    if found is None:
        from emu.module import ModuleError
        raise ModuleError(f"no module {mod}", 2)
    mods.unload(found)


# --- `emu run --module FILE` ----------------------------------------------------------------------
def add_run_options(p) -> None:
    from emu.cli_checks import input_file
    p.add_argument("--module", action="append", default=[], metavar="FILE", type=input_file,
                   help="load a guest module (a relocatable object built with -c) before the "
                        "run; its init_module runs first, its symbols are MOD:SYM (repeatable)")


def attach_from_args(session, args) -> None:
    """Load each --module in order, before the probes that may name its symbols."""
    from emu.errors import UsageError
    from emu.module import ModuleError
    for path in getattr(args, "module", None) or []:
        try:
            load_module(session.machine, path)
        except ModuleError as e:
            raise UsageError(f"--module {path}: {e}") from None
