"""x86-64 return probes (arch/x86/kernel/rethook.c, uprobes.c): the return address is the
word at sp; the trampoline is entered from guest code through a host entry, no trap."""
from __future__ import annotations

from typing import TYPE_CHECKING, cast

from emu.clock import DETOUR
from emu.machine import Machine
from emu.uaccess import UserFault, get_user, put_user
from probes.arch import BreakHandler, HostEntry
from probes.arch.common import RpCheck

if TYPE_CHECKING:
    from probes.insn_slots import ProbePages
    from probes.kretprobes import KretprobeInstance
    from probes.regs import PtRegs


class X86Kretprobes:
    """ArchKretprobes for x86-64."""

    # The rethook trampoline is entered without a trap; its byte is an int3 so that
    # reaching it without the host entry would still stop loudly.
    trampoline_code = b"\xcc"
    ret_addr_on_stack = True                 # the C path reads and hijacks the word at sp

    def __init__(self, machine: Machine, pages: "ProbePages") -> None:
        self.m = machine
        self.pages = pages
        self.tramp_entry: int | None = None  # the trampoline's host entry (C takes it over)

    def map_kretprobe_trampoline(self, handler: BreakHandler) -> int:
        addr = self.pages.tramps.get(near=self.m.entry or self.m.pc)
        self.m.text_poke(addr, self.trampoline_code)
        self.tramp_entry = self.m.add_host_entry(addr, cast(HostEntry, handler))  # bool unused
        return addr

    def arch_prepare_kretprobe(self, ri: "KretprobeInstance", regs: "PtRegs",
                               trampoline: int) -> bool:
        sp = regs.sp
        mem = self.m.memory
        try:
            ri.ret_addr = get_user(mem, sp)
            put_user(mem, sp, trampoline)
        except UserFault:
            return False
        ri.fp = ri.stack = sp                # the hijacked slot: the return-address word
        return True

    def kretprobe_is_alive(self, ri: "KretprobeInstance", ctx: RpCheck, sp: int) -> bool:
        # At a call, sp was just decremented onto the new slot; after `ret`, sp is above
        # the returning frame's slot but still at or below every caller's.
        return sp < ri.stack if ctx is RpCheck.CALL else sp <= ri.stack

    def kretprobe_hijack_intact(self, ri: "KretprobeInstance", trampoline: int) -> bool:
        try:
            return get_user(self.m.memory, ri.stack) == trampoline
        except UserFault:
            return False

    def kretprobe_fixup_return(self, regs: "PtRegs", ret_addr: int) -> None:
        """`ret` already popped the slot: nothing but ip to restore."""

    def kretprobe_frame(self, m: Machine) -> int:
        return m.sp - 8                      # `ret` popped the slot the entry hijacked

    def charge_kretprobe_return(self, m: Machine) -> None:
        m.clock.charge(DETOUR)
