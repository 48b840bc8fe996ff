"""The per-job interfaces every arch implements, named after the kernel's arch hooks
(arch_prepare_kprobe, arch_prepare_kretprobe, arch_prepare_optimized_kprobe,
ftrace_make_call, ...), and the one table that picks a machine's implementation.

Each arch package (probes/arch/<name>/__init__.py) answers with `arch_probes(machine, pages)`
returning an `ArchProbes` of one object per job. The core imports only these Protocols and
never asks which arch it runs on. Jump labels and stack traces are declared for the layers
to come; an arch that has no answer for a job says so with `NotApplicable`."""
from __future__ import annotations

import errno
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Protocol

from emu.arch import ARCH_NAMES
from probes.errors import NotApplicable
from probes.insn_slots import ProbePages

if TYPE_CHECKING:
    from emu.machine import Machine
    from emu.symbols import Symbol
    from probes.arch.common import ArchOptimizedInsn, RpCheck
    from probes.kprobes import Kprobe
    from probes.kretprobes import KretprobeInstance
    from probes.regs import PtRegs
    from probes.reserved_text import ReservedText

HostEntry = Callable[[int], None]           # called with the pc of the host entry
BreakHandler = Callable[[int], bool]        # called with the trap address


class ArchKprobes(Protocol):
    """arch/*/kernel/probes/kprobes.c. `p.ainsn` is an ArchSpecificInsn: its `handler`
    simulates/emulates the instruction on pt_regs, or its `slot` holds the copy that is
    stepped, ending in a trap at `ss_trap`; execution resumes at `addr + length`."""

    breakpoint: bytes               # BRK #4 / int3
    handler_ip_offset: int          # pt_regs ip a pre handler sees: addr (+1 after int3)
    boost_supported: bool           # can a slot jump back without the step trap?
    pages: "ProbePages"

    def adjust_kprobe_addr(self, addr: int, sym: "Symbol") -> tuple[int, bool]:
        """arch_adjust_kprobe_addr: the address to probe and whether it is the entry."""
    def prepare(self, p: "Kprobe") -> None:
        """arch_prepare_kprobe; raises KprobeError(EINVAL|EILSEQ|EOPNOTSUPP|ERANGE|ENOMEM)."""
    def arm(self, p: "Kprobe") -> None:
        """arch_arm_kprobe: the breakpoint goes in."""
    def disarm(self, p: "Kprobe") -> None:
        """arch_disarm_kprobe: the original bytes come back."""
    def remove(self, p: "Kprobe") -> None:
        """arch_remove_kprobe: the slot is freed."""
    def handler_ip(self, p: "Kprobe") -> int:
        """The ip pre handlers see (instruction_pointer after the trap)."""
    def in_slot(self, p: "Kprobe", addr: int) -> bool:
        """Is `addr` inside the probe's out-of-line slot?"""
    def owns(self, addr: int) -> bool:
        """Is `addr` in the probe layer's own pages?"""
    def boost(self, p: "Kprobe") -> bool:
        """After a successful step: let later hits skip the step trap; False if not."""
    def unboost(self, p: "Kprobe") -> None:
        """Undo `boost` (a post handler needs the step trap)."""


class ArchKretprobes(Protocol):
    """The arch half of return probes: trampoline, return-address hijack and the frame
    tests of arch_uretprobe_is_alive."""

    def map_kretprobe_trampoline(self, handler: BreakHandler) -> int:
        """Write the return trampoline into a probe-layer page; returns its address."""
    def arch_prepare_kretprobe(self, ri: "KretprobeInstance", regs: "PtRegs",
                               trampoline: int) -> bool:
        """Save the real return address in `ri` (ret_addr, fp, stack) and put `trampoline`
        in its place; False if the guest's stack cannot be read or written."""
    def kretprobe_is_alive(self, ri: "KretprobeInstance", ctx: "RpCheck", sp: int) -> bool:
        """arch_uretprobe_is_alive: is the frame `ri` hijacked still on the stack at `sp`?"""
    def kretprobe_hijack_intact(self, ri: "KretprobeInstance", trampoline: int) -> bool:
        """Does the hijacked return address still hold the trampoline, where the arch can
        tell? (A stale instance's slot is often overwritten.)"""
    def kretprobe_fixup_return(self, regs: "PtRegs", ret_addr: int) -> None:
        """Registers as the trampoline leaves them besides ip (arm64: lr = ret_addr)."""
    def kretprobe_frame(self, m: "Machine") -> int:
        """The frame key of the returning frame, compared with `ri.fp`."""
    def charge_kretprobe_return(self, m: "Machine") -> None:
        """Charge the clock what reaching the trampoline costs (a trap, or a detour)."""


class ArchOptprobes(Protocol):
    """arch/x86/kernel/kprobes/opt.c and the arm64 series. Refusals raise OptimizeRefused."""

    def can_optimize(self, p: "Kprobe", reserved: "ReservedText") -> None:
        """can_optimize + arch_check_optimized_kprobe; `reserved` tells which text other
        probes hold."""
    def prepare_optimized_kprobe(self, p: "Kprobe",
                                 callback: Callable[[int, int], None]) -> "ArchOptimizedInsn":
        """arch_prepare_optimized_kprobe: build the detour entering `callback(addr, pc)`."""
    def arch_optimize_kprobe(self, p: "Kprobe", target: int | None = None) -> None:
        """The jump to the detour goes in."""
    def arch_unoptimize_kprobe(self, p: "Kprobe") -> None:
        """The breakpoint comes back in place of the jump."""
    def detour_orig_addr(self, p: "Kprobe", pc: int) -> int | None:
        """The original instruction a detour address runs a copy of; None if none."""
    def free_optimized_kprobe(self, p: "Kprobe") -> None:
        """arch_remove_optimized_kprobe: the detour is freed."""
    def bpf_thunk(self, p: "Kprobe | None", at: int, ip: int, entries: list[int], active: int,
                  counters: int, stack: int, slots: frozenset[int] | None = None,
                  resume: int | None = None, ip_word: int | None = None,
                  ctx: int | None = None, this_cpu: int | None = None) -> bytes:
        """The optprobe template with trace_call_bpf inlined, placed at `at` (probes/bpf/
        jit_direct.py), writing the frame `slots` its programs read (None: all), ending in
        a branch to `resume` (default: the detour's relocated copies); with `this_cpu`, the
        guard and stack of the CPU that runs it are found through the two u64 there;
        raises OptimizeRefused if `at` cannot be reached from the probe."""


class ArchFtrace(Protocol):
    """arch/*/kernel/ftrace.c: the patch-site table, its nop and the call it becomes."""

    ftrace_section: str             # the section listing the sites (__mcount_loc, ...)
    ftrace_nop: bytes               # a site as the compiler left it
    ftrace_patch_size: int          # the bytes a call/nop switch changes (MCOUNT_INSN_SIZE)

    def ftrace_make_call(self, site: int, caller: HostEntry) -> bytes:
        """The bytes that make `site` enter `caller` (the trampoline is made once)."""
    def ftrace_site(self, m: "Machine", pc: int, sp: int) -> int:
        """The site whose trampoline is running at `pc`; may raise UserFault."""
    def ftrace_parent(self, m: "Machine", sp: int) -> int:
        """The traced function's return address (parent_ip)."""
    def ftrace_regs(self, m: "Machine", site: int, sp: int) -> "PtRegs":
        """pt_regs as the traced function's entry saw them."""
    def ftrace_return_to(self, m: "Machine", new_ip: int) -> None:
        """Leave the trampoline for `new_ip` (a handler changed regs.ip)."""


class ArchJumpLabel(Protocol):
    """arch/*/kernel/jump_label.c, for static keys (to come)."""

    jump_label_nop_size: int

    def arch_jump_label_transform(self, code: int, target: int, enable: bool) -> bytes:
        """The bytes at a `__jump_table` site: a jump to `target`, or its nop."""


class ArchStacktrace(Protocol):
    """arch/*/kernel/stacktrace.c, for bpf_get_stack and stack traces (to come)."""

    frame_pointer: str

    def unwind_next(self, m: "Machine", fp: int) -> tuple[int, int] | None:
        """(return address, caller's frame pointer) of the frame at `fp`; None at the end."""


@dataclass
class ArchProbes:
    """One machine's answers, one per job."""
    pages: "ProbePages"
    kprobes: ArchKprobes
    kretprobes: ArchKretprobes
    optprobes: ArchOptprobes
    ftrace: ArchFtrace
    jump_label: ArchJumpLabel | None = None
    stacktrace: ArchStacktrace | None = None
    arch: str = ""

    def need_jump_label(self) -> ArchJumpLabel:
        if self.jump_label is None:
            raise NotApplicable(errno.EOPNOTSUPP, f"no jump labels on {self.arch} yet")
        return self.jump_label

    def need_stacktrace(self) -> ArchStacktrace:
        if self.stacktrace is None:
            raise NotApplicable(errno.EOPNOTSUPP, f"no stack traces on {self.arch} yet")
        return self.stacktrace


# The table: every arch name emu/arch knows has its package here, probes/arch/<name>/.
IMPLS: dict[str, str] = {name: f"probes.arch.{name}" for name in ARCH_NAMES}


def _make(machine: "Machine") -> ArchProbes:
    module = importlib.import_module(IMPLS[machine.arch.name])
    pages = ProbePages.for_machine(machine, module.SLOT_SIZE)
    answers: ArchProbes = module.arch_probes(machine, pages)
    return answers


def arch_probes_of(machine: "Machine") -> ArchProbes:
    """The machine's arch answers, made on first use (one set of pages per machine)."""
    answers: ArchProbes = machine.layer("arch_probes", _make)
    return answers


def arch_ptrace(arch_name: str) -> ModuleType:
    """The arch's pt_regs module (probes/arch/<name>/ptrace.py): the `struct pt_regs`
    layout BPF programs see, the register view's facts (ZERO_REGS, STACK_ARGS), and the
    calling-convention helpers (entry_return_address, set_call_return, ...)."""
    return importlib.import_module(f"{IMPLS[arch_name]}.ptrace")


def get_arch_kprobes(machine: "Machine") -> ArchKprobes:
    return arch_probes_of(machine).kprobes
