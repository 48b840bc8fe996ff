"""arm64 kprobes (arch/arm64/kernel/probes/kprobes.c): BRK #4 at the probe, simulation or
an 8-byte slot `[insn][BRK #6]`.

The kernel masks DAIF while stepping; Unicorn delivers no interrupts to the guest, so
there is nothing to mask and PSTATE is left alone."""
from __future__ import annotations

import errno

from emu.symbols import Symbol
from typing import TYPE_CHECKING

from probes.arch.arm64 import simulate as sim
from probes.arch.arm64.decode import Verdict, arm_probe_decode_insn, in_atomic_sequence, mnemonic
from probes.arch.arm64.simulate import MASK64, sign_extend
from probes.arch.common import ArchSpecificInsn, BreakpointKprobes, StepKind, reject
from probes.native import AUX_LINK, AUX_NZ, AUX_X64, NativeSim, Sim

if TYPE_CHECKING:
    from probes.kprobes import Kprobe

BRK64_OPCODE_KPROBES = 0xD4200080
BRK64_OPCODE_KPROBES_SS = 0xD42000C0
BRK64_OPCODE_KRETPROBES = 0xD42000E0
SLOT_SIZE = 8                       # [insn][BRK #6]


class Arm64Kprobes(BreakpointKprobes):
    """ArchKprobes for arm64: never boosted (every step ends in BRK #6)."""

    slot_size = SLOT_SIZE
    ss_break = BRK64_OPCODE_KPROBES_SS.to_bytes(4, "little")
    trap_intno = 7                  # EXCP_BKPT: the exception a BRK raises (the C hit path)
    trap_pc_adjust = 0              # ... reported with pc at the BRK

    def decode(self, addr: int, sym: Symbol | None) -> ArchSpecificInsn:
        if addr & 3:
            raise reject(errno.EINVAL, "address is not 4-byte aligned", addr)
        word = int.from_bytes(self.m.original_text(addr, 4), "little")
        text = mnemonic(word, addr)
        verdict, handler, why = arm_probe_decode_insn(word)
        if verdict is Verdict.REJECTED:
            raise reject(errno.EINVAL, f"cannot probe `{text}`: {why}", addr)
        if sym is not None and addr > sym.addr and self._in_atomic_sequence(addr, sym):
            raise reject(errno.EINVAL, f"cannot probe `{text}`: inside an exclusive "
                                       "load/store (LL/SC) sequence", addr)
        kind = StepKind.SIMULATE if verdict is Verdict.GOOD_NO_SLOT else StepKind.OUT_OF_LINE
        return ArchSpecificInsn(kind=kind, length=4, mnemonic=text, handler=handler)

    def _in_atomic_sequence(self, addr: int, sym: Symbol) -> bool:
        start = max(sym.addr, addr - 4 * 32)
        raw = self.m.original_text(start, addr - start)
        words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
        return in_atomic_sequence(words)

    # --- the C hit path (probes/native): operands decoded once, here --------------------------
    def native_sim_regs(self) -> tuple[list[int], int]:
        """Unicorn ids of x0..x30 and NZCV, for the C simulator."""
        regs = self.m.arch.regs
        return [regs[f"x{n}"] for n in range(31)], regs["nzcv"]

    def native_sim(self, p: "Kprobe") -> NativeSim | None:
        """The C simulation of a simulated probe, or None where Python must run it (the
        literal loads: guest memory is read through emu/uaccess only)."""
        op, addr = int.from_bytes(p.opcode, "little"), p.addr
        assert addr is not None
        h = p.ainsn.handler
        imm19 = (addr + sign_extend(((op >> 5) & 0x7FFFF) << 2, 21)) & MASK64
        if h is sim.simulate_b_bl:
            target = (addr + sign_extend((op & 0x03FFFFFF) << 2, 28)) & MASK64
            return (Sim.BL if op >> 31 else Sim.B), target, 0
        if h is sim.simulate_b_cond:
            return Sim.BCOND, imm19, (op & 0xF) << 8
        if h is sim.simulate_cbz_cbnz:
            flags = (AUX_X64 if op >> 31 else 0) | (AUX_NZ if op & (1 << 24) else 0)
            return Sim.CBZ, imm19, (op & 0x1F) | flags
        if h is sim.simulate_tbz_tbnz:
            bit = ((op >> 26) & 0x20) | ((op >> 19) & 0x1F)
            target = (addr + sign_extend(((op >> 5) & 0x3FFF) << 2, 16)) & MASK64
            return Sim.TBZ, target, (op & 0x1F) | bit << 16 | (AUX_NZ if op & (1 << 24) else 0)
        if h is sim.simulate_adr_adrp:
            imm = sign_extend((((op >> 5) & 0x7FFFF) << 2) | ((op >> 29) & 3), 21)
            value = (addr & ~0xFFF) + (imm << 12) if op >> 31 else addr + imm
            return Sim.ADR, value & MASK64, op & 0x1F
        if h is sim.simulate_br_blr_ret:
            return Sim.BR, 0, ((op >> 5) & 0x1F) | (AUX_LINK if (op >> 21) & 3 == 1 else 0)
        return None
