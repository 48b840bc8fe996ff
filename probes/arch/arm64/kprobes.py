"""arm64 kprobes (arch/arm64/kernel/probes/kprobes.c): BRK #4 at the probe, simulation or
an 8-byte slot `[insn][BRK #6]`.

The kernel masks DAIF while stepping; Unicorn delivers no interrupts to the guest, so
there is nothing to mask and PSTATE is left alone."""
from __future__ import annotations

import errno

from emu.symbols import Symbol
from probes.arch.arm64.decode import Verdict, arm_probe_decode_insn, in_atomic_sequence, mnemonic
from probes.arch.common import ArchSpecificInsn, BreakpointKprobes, StepKind, reject

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
