"""arm64 kprobes (arch/arm64/kernel/probes/kprobes.c): BRK #4 at the probe, simulation or
an 8-byte slot `[insn][BRK #6]`.

The kernel masks DAIF while stepping; Unicorn delivers no interrupts to the guest, so
there is nothing to mask and PSTATE is left alone."""
from __future__ import annotations

import errno
import struct

import capstone

from emu.clock import TRAP
from emu.machine import Machine
from emu.symbols import Symbol
from probes.arch.arm64.decode import Verdict, arm_probe_decode_insn, in_atomic_sequence
from probes.arch.arm64.opt import Arm64OptMixin
from probes.arch.common import (
    KIND_SIMULATE,
    KIND_SLOT,
    ArchSpecificInsn,
    BreakpointKprobes,
    RpCheck,
    reject,
)
from probes.regs import PtRegs

BRK64_OPCODE_KPROBES = 0xD4200080
BRK64_OPCODE_KPROBES_SS = 0xD42000C0
BRK64_OPCODE_KRETPROBES = 0xD42000E0


class Arm64Kprobes(Arm64OptMixin, BreakpointKprobes):
    slot_size = 8
    ss_break = BRK64_OPCODE_KPROBES_SS.to_bytes(4, "little")

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self._cs = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
        self._ftrace_stubs: dict[int, int] = {}           # site -> its trampoline
        self._ftrace_sites: dict[int, int] = {}           # trampoline -> site

    kretprobe_trampoline_code = BRK64_OPCODE_KRETPROBES.to_bytes(4, "little")

    def enter_trampoline(self, addr: int, handler) -> None:
        self.m.register_break_addr(addr, handler)            # BRK #7 traps

    def arch_prepare_kretprobe(self, ri, regs, trampoline: int) -> bool:
        ri.ret_addr = regs["x30"]
        ri.fp = regs["x29"]
        ri.stack = regs.sp                   # bl does not move sp: the caller's sp
        regs["x30"] = trampoline
        return True

    def kretprobe_is_alive(self, ri, ctx: RpCheck, sp: int) -> bool:
        # A tail call (B) into a probed function keeps sp: the chained instance of the
        # caller stays alive at an equal sp; otherwise a live frame lies strictly above.
        return sp <= ri.stack if ctx is RpCheck.CHAIN_CALL else sp < ri.stack

    def kretprobe_fixup_return(self, regs, ret_addr: int) -> None:
        regs["x30"] = ret_addr               # the trampoline returns with lr restored

    def kretprobe_frame(self, m: Machine) -> int:
        return m.reg("x29")

    def charge_kretprobe_return(self, m: Machine) -> None:
        m.clock.charge(TRAP)

    # --- ftrace (arch/arm64/kernel/ftrace.c; see probes/ftrace.py for the per-site branch) ---
    ftrace_section = "__patchable_function_entries"
    ftrace_nop = bytes.fromhex("1f2003d5") * 2

    def ftrace_make_call(self, site: int, caller) -> bytes:
        from probes.arch.arm64.opt import NOP, b_insn
        stub = self._ftrace_stubs.get(site)
        if stub is None:
            stub = self.tramps.get(near=site)
            code = struct.pack("<II", NOP, b_insn(stub + 4, site + 4))
            self.m.text_poke(stub, code)
            self.m.add_host_entry(stub, caller)
            self._ftrace_stubs[site] = stub
            self._ftrace_sites[stub] = site
        return struct.pack("<I", b_insn(site, stub)) + self.ftrace_nop[4:]

    def ftrace_site(self, m: Machine, pc: int, sp: int) -> int:
        return self._ftrace_sites[pc]                     # each site has its own trampoline

    def ftrace_parent(self, m: Machine, sp: int) -> int:
        return m.reg("x30")                               # lr: untouched by the branch

    def ftrace_regs(self, m: Machine, site: int, sp: int):
        return PtRegs(m, ip=site)

    def ftrace_return_to(self, m: Machine, new_ip: int) -> None:
        m.pc = new_ip

    def mnemonic(self, word: int, addr: int) -> str:
        for insn in self._cs.disasm(word.to_bytes(4, "little"), addr, 1):
            return f"{insn.mnemonic} {insn.op_str}".strip()
        return f".inst {word:#010x}"

    def decode(self, addr: int, sym: Symbol | None) -> ArchSpecificInsn:
        if addr & 3:
            raise reject(errno.EINVAL, "address is not 4-byte aligned", addr)
        word = int.from_bytes(self.m.original_text(addr, 4), "little")
        text = self.mnemonic(word, addr)
        verdict, handler, why = arm_probe_decode_insn(word)
        if verdict is Verdict.REJECTED:
            raise reject(errno.EINVAL, f"cannot probe `{text}`: {why}", addr)
        if sym is not None and addr > sym.addr:
            start = max(sym.addr, addr - 4 * 32)
            raw = self.m.original_text(start, addr - start)
            words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
            if in_atomic_sequence(words):
                raise reject(errno.EINVAL, f"cannot probe `{text}`: inside an exclusive "
                                           "load/store (LL/SC) sequence", addr)
        kind = KIND_SIMULATE if verdict is Verdict.GOOD_NO_SLOT else KIND_SLOT
        return ArchSpecificInsn(kind=kind, length=4, mnemonic=text, handler=handler)
