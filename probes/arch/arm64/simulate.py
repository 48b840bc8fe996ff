"""arm64 instruction simulation (arch/arm64/kernel/probes/simulate-insn.c): the effect of
PC-relative and branch instructions computed on pt_regs at the probe address, no slot.
Literal loads read through emu/uaccess: a literal on a page the guest cannot read raises
UserFault, reported by the kprobe core at the probe address. The kernel takes the operand
fields apart on every hit; here they are decoded once when the probe is prepared
(`decode_operands`, kept in the arch_specific_insn) and the C hit path takes the same
values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from emu.uaccess import get_user

if TYPE_CHECKING:
    from probes.kprobes import Kprobe
    from probes.regs import PtRegs

MASK64 = (1 << 64) - 1


def sign_extend(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def get_x_reg(regs: "PtRegs", n: int) -> int:
    return 0 if n == 31 else regs[f"x{n}"]


def set_x_reg(regs: "PtRegs", n: int, value: int) -> None:
    if n != 31:
        regs[f"x{n}"] = value & MASK64


def get_w_reg(regs: "PtRegs", n: int) -> int:
    return get_x_reg(regs, n) & 0xFFFFFFFF


def check_condition(cond: int, nzcv: int) -> bool:
    """The A64 condition codes on PSTATE.NZCV (bits 31..28)."""
    n, z, c, v = (nzcv >> 31) & 1, (nzcv >> 30) & 1, (nzcv >> 29) & 1, (nzcv >> 28) & 1
    base = {
        0: z, 1: z, 2: c, 3: c, 4: n, 5: n, 6: v, 7: v,
        8: c and not z, 9: c and not z, 10: n == v, 11: n == v,
        12: (not z) and n == v, 13: (not z) and n == v, 14: True, 15: True,
    }[cond]
    if cond in (14, 15):
        return True
    return bool(base) if cond % 2 == 0 else not base


@dataclass(frozen=True, slots=True)
class SimOperands:
    """What a simulated instruction needs at a hit, decoded from its word and address."""
    next_pc: int            # the probe address + 4
    target: int = 0         # branch target, ADR/ADRP's result, or the literal's address
    reg: int = 0            # Rt, Rd or Rn
    cond: int = 0           # b.cond's condition
    bit: int = 0            # tbz/tbnz's bit number
    x64: bool = False       # cbz/cbnz on Xn; an 8-byte ldr (literal)
    nonzero: bool = False   # cbnz, tbnz
    link: bool = False      # bl, blr: x30 gets next_pc


def _ops(p: "Kprobe") -> SimOperands:
    ops = p.ainsn.operands
    assert isinstance(ops, SimOperands)
    return ops


def _imm19_target(op: int, addr: int) -> int:
    return (addr + sign_extend(((op >> 5) & 0x7FFFF) << 2, 21)) & MASK64


def simulate_b_bl(p: "Kprobe", regs: "PtRegs") -> None:
    o = _ops(p)
    if o.link:                                           # BL
        set_x_reg(regs, 30, o.next_pc)
    regs.ip = o.target


def simulate_b_cond(p: "Kprobe", regs: "PtRegs") -> None:
    o = _ops(p)
    regs.ip = o.target if check_condition(o.cond, regs["nzcv"]) else o.next_pc


def simulate_br_blr_ret(p: "Kprobe", regs: "PtRegs") -> None:
    o = _ops(p)
    target = get_x_reg(regs, o.reg)                      # read before BLR writes x30
    if o.link:                                           # BLR
        set_x_reg(regs, 30, o.next_pc)
    regs.ip = target


def simulate_cbz_cbnz(p: "Kprobe", regs: "PtRegs") -> None:
    o = _ops(p)
    value = get_x_reg(regs, o.reg) if o.x64 else get_w_reg(regs, o.reg)
    regs.ip = o.target if (value != 0) == o.nonzero else o.next_pc


def simulate_tbz_tbnz(p: "Kprobe", regs: "PtRegs") -> None:
    o = _ops(p)
    set_bit = (get_x_reg(regs, o.reg) >> o.bit) & 1
    regs.ip = o.target if set_bit == o.nonzero else o.next_pc


def simulate_adr_adrp(p: "Kprobe", regs: "PtRegs") -> None:
    o = _ops(p)
    set_x_reg(regs, o.reg, o.target)
    regs.ip = o.next_pc


def simulate_ldr_literal(p: "Kprobe", regs: "PtRegs") -> None:
    o = _ops(p)
    set_x_reg(regs, o.reg, get_user(regs.machine.memory, o.target, 8 if o.x64 else 4))
    regs.ip = o.next_pc


def simulate_ldrsw_literal(p: "Kprobe", regs: "PtRegs") -> None:
    o = _ops(p)
    value = get_user(regs.machine.memory, o.target, 4)
    set_x_reg(regs, o.reg, sign_extend(value, 32))
    regs.ip = o.next_pc


# --- decoding, once per probe -------------------------------------------------------------------
def _decode_b_bl(op: int, addr: int) -> SimOperands:
    return SimOperands(addr + 4, (addr + sign_extend((op & 0x03FFFFFF) << 2, 28)) & MASK64,
                       link=bool(op >> 31))


def _decode_b_cond(op: int, addr: int) -> SimOperands:
    return SimOperands(addr + 4, _imm19_target(op, addr), cond=op & 0xF)


def _decode_br_blr_ret(op: int, addr: int) -> SimOperands:
    return SimOperands(addr + 4, reg=(op >> 5) & 0x1F, link=(op >> 21) & 3 == 1)


def _decode_cbz_cbnz(op: int, addr: int) -> SimOperands:
    return SimOperands(addr + 4, _imm19_target(op, addr), reg=op & 0x1F, x64=bool(op >> 31),
                       nonzero=bool(op & (1 << 24)))


def _decode_tbz_tbnz(op: int, addr: int) -> SimOperands:
    return SimOperands(addr + 4, (addr + sign_extend(((op >> 5) & 0x3FFF) << 2, 16)) & MASK64,
                       reg=op & 0x1F, bit=((op >> 26) & 0x20) | ((op >> 19) & 0x1F),
                       nonzero=bool(op & (1 << 24)))


def _decode_adr_adrp(op: int, addr: int) -> SimOperands:
    imm = sign_extend((((op >> 5) & 0x7FFFF) << 2) | ((op >> 29) & 3), 21)
    value = (addr & ~0xFFF) + (imm << 12) if op & (1 << 31) else addr + imm
    return SimOperands(addr + 4, value & MASK64, reg=op & 0x1F)


def _decode_ldr_literal(op: int, addr: int) -> SimOperands:
    return SimOperands(addr + 4, _imm19_target(op, addr), reg=op & 0x1F,
                       x64=bool(op & (1 << 30)))


def _decode_ldrsw_literal(op: int, addr: int) -> SimOperands:
    return SimOperands(addr + 4, _imm19_target(op, addr), reg=op & 0x1F)


Simulate = Callable[["Kprobe", "PtRegs"], None]
_DECODERS: dict[Simulate, Callable[[int, int], SimOperands]] = {
    simulate_b_bl: _decode_b_bl, simulate_b_cond: _decode_b_cond,
    simulate_br_blr_ret: _decode_br_blr_ret, simulate_cbz_cbnz: _decode_cbz_cbnz,
    simulate_tbz_tbnz: _decode_tbz_tbnz, simulate_adr_adrp: _decode_adr_adrp,
    simulate_ldr_literal: _decode_ldr_literal, simulate_ldrsw_literal: _decode_ldrsw_literal,
}


def decode_operands(handler: Simulate, op: int, addr: int) -> SimOperands:
    """The operands `handler` reads at a hit of the instruction `op` at `addr`."""
    return _DECODERS[handler](op, addr)
