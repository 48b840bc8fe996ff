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
        if verdict is not Verdict.GOOD_NO_SLOT:
            return ArchSpecificInsn(kind=StepKind.OUT_OF_LINE, length=4, mnemonic=text)
        assert handler is not None
        return ArchSpecificInsn(kind=StepKind.SIMULATE, length=4, mnemonic=text, handler=handler,
                                operands=sim.decode_operands(handler, word, addr))

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
        h, o = p.ainsn.handler, p.ainsn.operands
        if not isinstance(o, sim.SimOperands):
            return None
        if h is sim.simulate_b_bl:
            return (Sim.BL if o.link else Sim.B), o.target, 0
        if h is sim.simulate_b_cond:
            return Sim.BCOND, o.target, o.cond << 8
        nz = AUX_NZ if o.nonzero else 0
        if h is sim.simulate_cbz_cbnz:
            return Sim.CBZ, o.target, o.reg | (AUX_X64 if o.x64 else 0) | nz
        if h is sim.simulate_tbz_tbnz:
            return Sim.TBZ, o.target, o.reg | o.bit << 16 | nz
        if h is sim.simulate_adr_adrp:
            return Sim.ADR, o.target, o.reg
        if h is sim.simulate_br_blr_ret:
            return Sim.BR, 0, o.reg | (AUX_LINK if o.link else 0)
        return None
