"""arm64 instruction simulation (arch/arm64/kernel/probes/simulate-insn.c): the effect of
PC-relative and branch instructions computed on pt_regs at the probe address, no slot.
Literal loads read through emu/uaccess: a literal on a page the guest cannot read raises
UserFault, reported by the kprobe core at the probe address."""
from __future__ import annotations

from typing import TYPE_CHECKING

from emu.uaccess import get_user

if TYPE_CHECKING:
    from probes.kprobes import Kprobe
    from probes.regs import PtRegs

MASK64 = (1 << 64) - 1


def sign_extend(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _insn(p: "Kprobe") -> tuple[int, int]:
    """The probed instruction word and its address."""
    addr = p.addr
    assert addr is not None
    return int.from_bytes(p.opcode, "little"), addr


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


def simulate_b_bl(p: "Kprobe", regs: "PtRegs") -> None:
    op, addr = _insn(p)
    disp = sign_extend((op & 0x03FFFFFF) << 2, 28)
    if op & (1 << 31):                                   # BL
        set_x_reg(regs, 30, addr + 4)
    regs.ip = (addr + disp) & MASK64


def simulate_b_cond(p: "Kprobe", regs: "PtRegs") -> None:
    op, addr = _insn(p)
    if check_condition(op & 0xF, regs["nzcv"]):
        regs.ip = (addr + sign_extend(((op >> 5) & 0x7FFFF) << 2, 21)) & MASK64
    else:
        regs.ip = addr + 4


def simulate_br_blr_ret(p: "Kprobe", regs: "PtRegs") -> None:
    op, addr = _insn(p)
    target = get_x_reg(regs, (op >> 5) & 0x1F)           # read before BLR writes x30
    if (op >> 21) & 3 == 1:                              # BLR
        set_x_reg(regs, 30, addr + 4)
    regs.ip = target


def simulate_cbz_cbnz(p: "Kprobe", regs: "PtRegs") -> None:
    op, addr = _insn(p)
    rt = op & 0x1F
    value = get_x_reg(regs, rt) if op & (1 << 31) else get_w_reg(regs, rt)
    taken = (value != 0) if op & (1 << 24) else (value == 0)
    regs.ip = (addr + sign_extend(((op >> 5) & 0x7FFFF) << 2, 21)) & MASK64 if taken else addr + 4


def simulate_tbz_tbnz(p: "Kprobe", regs: "PtRegs") -> None:
    op, addr = _insn(p)
    bit = ((op >> 26) & 0x20) | ((op >> 19) & 0x1F)
    set_bit = (get_x_reg(regs, op & 0x1F) >> bit) & 1
    taken = set_bit == 1 if op & (1 << 24) else set_bit == 0
    regs.ip = (addr + sign_extend(((op >> 5) & 0x3FFF) << 2, 16)) & MASK64 if taken else addr + 4


def simulate_adr_adrp(p: "Kprobe", regs: "PtRegs") -> None:
    op, addr = _insn(p)
    imm = sign_extend((((op >> 5) & 0x7FFFF) << 2) | ((op >> 29) & 3), 21)
    if op & (1 << 31):                                   # ADRP
        value = (addr & ~0xFFF) + (imm << 12)
    else:
        value = addr + imm
    set_x_reg(regs, op & 0x1F, value)
    regs.ip = addr + 4


def _literal_addr(op: int, addr: int) -> int:
    return (addr + sign_extend(((op >> 5) & 0x7FFFF) << 2, 21)) & MASK64


def simulate_ldr_literal(p: "Kprobe", regs: "PtRegs") -> None:
    op, addr = _insn(p)
    size = 8 if op & (1 << 30) else 4
    value = get_user(regs.machine.memory, _literal_addr(op, addr), size)
    set_x_reg(regs, op & 0x1F, value)
    regs.ip = addr + 4


def simulate_ldrsw_literal(p: "Kprobe", regs: "PtRegs") -> None:
    op, addr = _insn(p)
    value = get_user(regs.machine.memory, _literal_addr(op, addr), 4)
    set_x_reg(regs, op & 0x1F, sign_extend(value, 32))
    regs.ip = addr + 4
