"""arm64 instruction decoding for kprobes (arch/arm64/kernel/probes/decode-insn.c).

Verdicts as the kernel's: REJECTED, GOOD_NO_SLOT (simulated), GOOD (stepped out of line).
Instruction classes are the kernel's mask/value pairs (asm/insn.h); capstone names the
instruction for messages and listings.

Where the fact sheet and the kernel differ the kernel wins: MRS is steppable unless it
reads DAIF (aarch64_insn_is_steppable returns `sysreg != DAIF`).
Deviation (safe): SIMD&FP literal loads (LDR St/Dt/Qt, label) are PC-relative but the kernel
steps them out of line, where they would load from the slot's neighbourhood; we reject them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import capstone

from probes.arch.arm64 import simulate as sim
from probes.arch.common import Verdict

if TYPE_CHECKING:
    from probes.kprobes import Kprobe
    from probes.regs import PtRegs

Simulator = Callable[["Kprobe", "PtRegs"], None]

# (mask, value) pairs from arch/arm64/include/asm/insn.h
B, BL = (0xFC000000, 0x14000000), (0xFC000000, 0x94000000)
CBZ, CBNZ = (0x7F000000, 0x34000000), (0x7F000000, 0x35000000)
TBZ, TBNZ = (0x7F000000, 0x36000000), (0x7F000000, 0x37000000)
BCOND = (0xFF000010, 0x54000000)
BR, BLR, RET = (0xFFFFFC1F, 0xD61F0000), (0xFFFFFC1F, 0xD63F0000), (0xFFFFFC1F, 0xD65F0000)
BR_AUTH, BLR_AUTH = (0xFEFFF800, 0xD61F0800), (0xFEFFF800, 0xD63F0800)
RET_AUTH = (0xFFFFFBFF, 0xD65F0BFF)
ERET, ERET_AUTH = (0xFFFFFFFF, 0xD69F03E0), (0xFFFFFBFF, 0xD69F0BFF)
MSR_IMM, MSR_REG, MRS = (0xFFF8F01F, 0xD500401F), (0xFFF00000, 0xD5100000), (0xFFF00000, 0xD5300000)
EXCEPTION = (0xFF000000, 0xD4000000)
HINT = (0xFFFFF01F, 0xD503201F)
LDR_LIT, LDRSW_LIT, PRFM_LIT = (0xBF000000, 0x18000000), (0xFF000000, 0x98000000), (0xFF000000, 0xD8000000)
LDR_LIT_FP = (0x3F000000, 0x1C000000)
ADR, ADRP = (0x9F000000, 0x10000000), (0x9F000000, 0x90000000)
EXCLUSIVE = (0x3F800000, 0x08000000)
LOAD_EX, STORE_EX = (0x3F400000, 0x08400000), (0x3F400000, 0x08000000)
MOPS = (0x3B200C00, 0x19000400)
CLASS_BR_SYS = (0x1C000000, 0x14000000)

SPCLREG_DAIF = 0xDA11          # asm/insn.h AARCH64_INSN_SPCLREG_DAIF: op0=3 op1=3 CRn=4 CRm=2 op2=1
# HINT immediates (CRm:op2) that may be stepped: NOP, XPACLRI, PACIA1716, PACIB1716,
# PACIAZ, PACIASP, PACIBZ, PACIBSP, BTI, BTI c, BTI j, BTI jc
STEPPABLE_HINTS = {0, 7, 8, 10, 24, 25, 26, 27, 32, 34, 36, 38}
MAX_ATOMIC_CONTEXT_SIZE = 32      # instructions scanned back for an open LL/SC sequence


__all__ = ["Verdict", "arm_probe_decode_insn", "in_atomic_sequence", "mnemonic", "steppable"]


def _is(insn: int, pair: tuple[int, int]) -> bool:
    return insn & pair[0] == pair[1]


def _is_branch(insn: int) -> bool:
    return any(_is(insn, k) for k in (B, BL, CBZ, CBNZ, TBZ, TBNZ, BCOND, BR, BLR, RET,
                                       BR_AUTH, BLR_AUTH, RET_AUTH))


def steppable(insn: int) -> tuple[bool, str]:
    """aarch64_insn_is_steppable(), with the reason when it is not."""
    if _is(insn, CLASS_BR_SYS):
        if _is_branch(insn):
            return False, "branch"
        if _is(insn, MSR_IMM) or _is(insn, MSR_REG):
            return False, "MSR writes system state"
        if _is(insn, EXCEPTION):
            return False, "exception-generating instruction"
        if _is(insn, ERET) or _is(insn, ERET_AUTH):
            return False, "exception return"
        if _is(insn, MRS):
            return ((insn >> 5) & 0xFFFF) != SPCLREG_DAIF, "MRS of DAIF changes while stepping"
        if _is(insn, HINT):
            return ((insn >> 5) & 0x7F) in STEPPABLE_HINTS, "hint not on the steppable list"
        return True, ""
    if any(_is(insn, k) for k in (LDR_LIT, LDRSW_LIT, ADR, ADRP, PRFM_LIT)):
        return False, "PC-relative literal access"
    if _is(insn, EXCLUSIVE):
        return False, "exclusive load/store cannot complete across a step"
    if _is(insn, MOPS):
        return False, "memory-copy/set (MOPS) instruction"
    if _is(insn, LDR_LIT_FP):
        return False, "PC-relative SIMD&FP literal load (the kernel would step it; unsafe out of line)"
    return True, ""


_SIMULATORS: list[tuple[tuple[int, int], Simulator, str]] = [
    (BCOND, sim.simulate_b_cond, "b.cond"),
    (CBZ, sim.simulate_cbz_cbnz, "cbz"), (CBNZ, sim.simulate_cbz_cbnz, "cbnz"),
    (TBZ, sim.simulate_tbz_tbnz, "tbz"), (TBNZ, sim.simulate_tbz_tbnz, "tbnz"),
    (ADR, sim.simulate_adr_adrp, "adr"), (ADRP, sim.simulate_adr_adrp, "adrp"),
    (B, sim.simulate_b_bl, "b"), (BL, sim.simulate_b_bl, "bl"),
    (BR, sim.simulate_br_blr_ret, "br"), (BLR, sim.simulate_br_blr_ret, "blr"),
    (RET, sim.simulate_br_blr_ret, "ret"),
    (LDR_LIT, sim.simulate_ldr_literal, "ldr (literal)"),
    (LDRSW_LIT, sim.simulate_ldrsw_literal, "ldrsw (literal)"),
]


def arm_probe_decode_insn(insn: int) -> tuple[Verdict, Simulator | None, str]:
    """arm_probe_decode_insn + arm_kprobe_decode_insn's literal cases: verdict, simulate
    handler, reason."""
    ok, why = steppable(insn)
    if ok:
        return Verdict.GOOD, None, ""
    for pair, handler, _name in _SIMULATORS:
        if _is(insn, pair):
            return Verdict.GOOD_NO_SLOT, handler, ""
    return Verdict.REJECTED, None, why


def in_atomic_sequence(words_before: list[int]) -> bool:
    """is_probed_address_atomic(): scanning back from the probe, a load-exclusive met
    before any store-exclusive means the probe sits inside an LL/SC sequence."""
    for insn in reversed(words_before[-MAX_ATOMIC_CONTEXT_SIZE:]):
        if _is(insn, STORE_EX):
            return False
        if _is(insn, LOAD_EX):
            return True
    return False


_CS: list[capstone.Cs] = []


def mnemonic(word: int, addr: int) -> str:
    """capstone's text for `word` at `addr`, or `.inst 0x...` if it has none."""
    if not _CS:
        _CS.append(capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM))
    for insn in _CS[0].disasm(word.to_bytes(4, "little"), addr, 1):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    return f".inst {word:#010x}"
