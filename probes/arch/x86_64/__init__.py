"""x86-64 kprobes (arch/x86/kernel/kprobes): core (decode, emulate, boost), rethook, opt
and ftrace; `arch_probes` answers the per-job interfaces of probes/arch/__init__.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

from probes.arch import ArchProbes
from probes.arch.x86_64.jump_label import X86JumpLabel
from probes.arch.x86_64.ftrace import X86Ftrace
from probes.arch.x86_64.kprobes import SLOT_SIZE, X86Kprobes
from probes.arch.x86_64.kretprobes import X86Kretprobes
from probes.arch.x86_64.opt import X86Optprobes

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.insn_slots import ProbePages

__all__ = ["SLOT_SIZE", "arch_probes"]


def arch_probes(machine: "Machine", pages: "ProbePages") -> ArchProbes:
    kprobes = X86Kprobes(machine, pages)
    return ArchProbes(pages=pages, kprobes=kprobes, kretprobes=X86Kretprobes(machine, pages),
                      optprobes=X86Optprobes(machine, pages, kprobes.decoder),
                      ftrace=X86Ftrace(machine, pages), jump_label=X86JumpLabel(), arch="x86_64")
