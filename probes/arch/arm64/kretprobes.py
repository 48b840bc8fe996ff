"""arm64 return probes (arch/arm64/kernel/probes/kprobes.c, uprobes.c): the return address
is in lr, the trampoline is `BRK #7`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from emu.clock import TRAP
from emu.machine import Machine
from probes.arch import BreakHandler
from probes.arch.arm64.kprobes import BRK64_OPCODE_KRETPROBES
from probes.arch.common import RpCheck

if TYPE_CHECKING:
    from probes.insn_slots import ProbePages
    from probes.kretprobes import KretprobeInstance
    from probes.regs import PtRegs


class Arm64Kretprobes:
    """ArchKretprobes for arm64."""

    trampoline_code = BRK64_OPCODE_KRETPROBES.to_bytes(4, "little")
    ret_addr_on_stack = False                # lr: the C path hijacks x30
    tramp_entry = None                       # the trampoline traps: no host entry

    def __init__(self, machine: Machine, pages: "ProbePages") -> None:
        self.m = machine
        self.pages = pages

    def map_kretprobe_trampoline(self, handler: BreakHandler) -> int:
        addr = self.pages.tramps.get(near=self.m.entry or self.m.pc)
        self.m.text_poke(addr, self.trampoline_code)
        self.m.register_break_addr(addr, handler)            # BRK #7 traps
        return addr

    def arch_prepare_kretprobe(self, ri: "KretprobeInstance", regs: "PtRegs",
                               trampoline: int) -> bool:
        ri.ret_addr = regs["x30"]
        ri.fp = regs["x29"]
        ri.stack = regs.sp                   # bl does not move sp: the caller's sp
        regs["x30"] = trampoline
        return True

    def kretprobe_is_alive(self, ri: "KretprobeInstance", ctx: RpCheck, sp: int) -> bool:
        # A tail call (B) into a probed function keeps sp: the chained instance of the
        # caller stays alive at an equal sp; otherwise a live frame lies strictly above.
        return sp <= ri.stack if ctx is RpCheck.CHAIN_CALL else sp < ri.stack

    def kretprobe_hijack_intact(self, ri: "KretprobeInstance", trampoline: int) -> bool:
        return True                          # lr is gone once used: nothing to check

    def kretprobe_fixup_return(self, regs: "PtRegs", ret_addr: int) -> None:
        regs["x30"] = ret_addr               # the trampoline returns with lr restored

    def kretprobe_frame(self, m: Machine) -> int:
        return m.reg("x29")

    def charge_kretprobe_return(self, m: Machine) -> None:
        m.clock.charge(TRAP)
