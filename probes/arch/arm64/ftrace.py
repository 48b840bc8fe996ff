"""arm64 dynamic ftrace (arch/arm64/kernel/ftrace.c) on `-fpatchable-function-entry=2`
sites, with a per-site branch instead of the kernel's `mov x9, x30; bl ftrace_caller`
(see probes/ftrace.py): a site becomes `b <trampoline>; nop`, the trampoline
`[host entry][b site+4]`."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from emu.machine import Machine
from probes.arch import HostEntry
from probes.arch.arm64.opt import NOP, b_insn
from probes.regs import PtRegs

if TYPE_CHECKING:
    from probes.insn_slots import ProbePages


class Arm64Ftrace:
    """ArchFtrace for arm64."""

    ftrace_section = "__patchable_function_entries"
    ftrace_nop = struct.pack("<I", NOP) * 2
    ftrace_patch_size = 4                          # only the first nop becomes `b`
    ftrace_key_back = 0                            # the C caller keys a site by its stub

    def __init__(self, machine: Machine, pages: "ProbePages") -> None:
        self.m = machine
        self.pages = pages
        self._stubs: dict[int, int] = {}           # site -> its trampoline
        self._sites: dict[int, int] = {}           # trampoline -> site
        self._entries: dict[int, int] = {}         # site -> its stub's host entry

    def ftrace_make_call(self, site: int, caller: HostEntry) -> bytes:
        stub = self._stubs.get(site)
        if stub is None:
            stub = self.pages.tramps.get(near=site)
            self.m.text_poke(stub, struct.pack("<II", NOP, b_insn(stub + 4, site + 4)))
            self._entries[site] = self.m.add_host_entry(stub, caller)
            self._stubs[site] = stub
            self._sites[stub] = site
        return struct.pack("<I", b_insn(site, stub)) + self.ftrace_nop[4:]

    def ftrace_native_entry(self, site: int) -> tuple[int, int] | None:
        """(host entry hook, the C caller's key) of a patched site."""
        entry = self._entries.get(site)
        return None if entry is None else (entry, self._stubs[site])

    def ftrace_site(self, m: Machine, pc: int, sp: int) -> int:
        return self._sites[pc]                     # each site has its own trampoline

    def ftrace_parent(self, m: Machine, sp: int) -> int:
        return m.reg("x30")                        # lr: untouched by the branch

    def ftrace_regs(self, m: Machine, site: int, sp: int) -> PtRegs:
        return PtRegs(m, ip=site)

    def ftrace_return_to(self, m: Machine, new_ip: int) -> None:
        m.pc = new_ip
