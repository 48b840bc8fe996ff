"""x86-64 dynamic ftrace (arch/x86/kernel/ftrace.c): a `__mcount_loc` site's 5-byte nop
becomes `call <trampoline>`; the one trampoline is a host entry byte, then `ret`."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from emu.machine import Machine
from emu.uaccess import UserFault, get_user
from probes.arch import HostEntry
from probes.arch.x86_64.text_poke import X86_NOPS
from probes.regs import PtRegs

if TYPE_CHECKING:
    from probes.insn_slots import ProbePages


class X86Ftrace:
    """ArchFtrace for x86-64."""

    ftrace_section = "__mcount_loc"
    ftrace_nop = X86_NOPS[5]
    ftrace_patch_size = 5                              # MCOUNT_INSN_SIZE
    ftrace_trampoline_code = b"\x90\xc3"
    ftrace_key_back = 5          # the C caller keys a site by the call's return address - 5

    def __init__(self, machine: Machine, pages: "ProbePages") -> None:
        self.m = machine
        self.pages = pages
        self._tramp: int | None = None
        self._entry: int | None = None                  # the trampoline's host entry

    def ftrace_make_call(self, site: int, caller: HostEntry) -> bytes:
        if self._tramp is None:
            self._tramp = self.pages.tramps.get(near=site)
            self.m.text_poke(self._tramp, self.ftrace_trampoline_code)
            self._entry = self.m.add_host_entry(self._tramp, caller)
        return b"\xe8" + struct.pack("<i", self._tramp - (site + 5))

    def ftrace_native_entry(self, site: int) -> tuple[int, int] | None:
        """(host entry hook, the C caller's key) of a patched site."""
        return None if self._entry is None else (self._entry, site)

    # The stack reads go through uaccess like every guest access: a stack the guest made
    # unreadable is a fault at the site, not a read past its permissions.
    def ftrace_site(self, m: Machine, pc: int, sp: int) -> int:
        return get_user(m.memory, sp) - 5                 # the call's return address - 5

    def ftrace_parent(self, m: Machine, sp: int) -> int:
        try:
            return get_user(m.memory, sp + 8)             # the function's own return address
        except UserFault:        # a function jumped to at the top of its stack: no parent
            return 0

    def ftrace_regs(self, m: Machine, site: int, sp: int) -> PtRegs:
        return PtRegs(m, ip=site + len(self.ftrace_nop), sp=sp + 8)     # sp as at the site

    def ftrace_return_to(self, m: Machine, new_ip: int) -> None:
        m.sp = m.sp + 8                                   # drop the call's return address
        m.pc = new_ip
