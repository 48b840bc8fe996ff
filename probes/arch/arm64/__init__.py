"""arm64 kprobes (arch/arm64/kernel/probes): decode-insn, simulate-insn, kprobes, the
return trampoline, optprobes (the LKML series) and ftrace; `arch_probes` answers the
per-job interfaces of probes/arch/__init__.py."""
from __future__ import annotations

from typing import TYPE_CHECKING

from probes.arch import ArchProbes
from probes.arch.arm64.jump_label import Arm64JumpLabel
from probes.arch.arm64.ftrace import Arm64Ftrace
from probes.arch.arm64.kprobes import SLOT_SIZE, Arm64Kprobes
from probes.arch.arm64.kretprobes import Arm64Kretprobes
from probes.arch.arm64.opt import Arm64Optprobes

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.insn_slots import ProbePages

__all__ = ["SLOT_SIZE", "arch_probes"]


def arch_probes(machine: "Machine", pages: "ProbePages") -> ArchProbes:
    return ArchProbes(pages=pages, kprobes=Arm64Kprobes(machine, pages),
                      kretprobes=Arm64Kretprobes(machine, pages),
                      optprobes=Arm64Optprobes(machine, pages),
                      ftrace=Arm64Ftrace(machine, pages), jump_label=Arm64JumpLabel(), arch="arm64")
