"""x86-64 instruction emulation at a probe hit (core.c kprobe_emulate_*): the effect of
control-flow and IF-modifying instructions computed on pt_regs at the probe address.

Stack accesses go through emu/uaccess (the guest's own page permissions): a hostile rsp
raises UserFault, which the kprobe core reports at the probe address as the fault the
instruction itself would take. Registers are only flushed after a handler succeeds."""
from __future__ import annotations

from typing import TYPE_CHECKING

from emu.uaccess import UserFault, copy_from_user, copy_to_user, get_user, put_user

if TYPE_CHECKING:
    from probes.arch.common import InsnHandler
    from probes.kprobes import Kprobe
    from probes.regs import PtRegs

MASK64 = (1 << 64) - 1
CF, PF, ZF, SF, IF, OF = 1 << 0, 1 << 2, 1 << 6, 1 << 7, 1 << 9, 1 << 11
IOPL = 3 << 12
FLAGS_FIXED = 1 << 1            # reads as 1 whatever is popped
# What POPF may change at CPL 0 in 64-bit mode (CF PF AF ZF SF TF IF DF OF IOPL NT AC ID); RF,
# VM, VIF and VIP end up clear. The CPU applies this when the kernel's iret loads the flags.
POPF_MASK = 0x247FD5
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _next(p: "Kprobe") -> int:
    addr = p.addr
    assert addr is not None
    length: int = p.ainsn.length
    return addr + length


def _push(regs: "PtRegs", value: int) -> None:
    sp = (regs.sp - 8) & MASK64
    put_user(regs.machine.memory, sp, value)
    regs.sp = sp


def _pop(regs: "PtRegs") -> int:
    sp = regs.sp
    value: int = get_user(regs.machine.memory, sp)
    regs.sp = sp + 8
    return value


def jcc_taken(cc: int, flags: int) -> bool:
    """The 16 x86 condition codes (low nibble of Jcc) on RFLAGS."""
    cf, zf, sf, of, pf = bool(flags & CF), bool(flags & ZF), bool(flags & SF), bool(flags & OF), bool(flags & PF)
    base = (of, cf, zf, cf or zf, sf, pf, sf != of, zf or sf != of)[cc >> 1]
    return base != bool(cc & 1)


def make_call(rel: int) -> InsnHandler:
    def kprobe_emulate_call(p: "Kprobe", regs: "PtRegs") -> None:
        _push(regs, _next(p))
        regs.ip = (_next(p) + rel) & MASK64
    return kprobe_emulate_call


def make_jmp(rel: int) -> InsnHandler:
    def kprobe_emulate_jmp(p: "Kprobe", regs: "PtRegs") -> None:
        regs.ip = (_next(p) + rel) & MASK64
    return kprobe_emulate_jmp


def make_jcc(cc: int, rel: int) -> InsnHandler:
    def kprobe_emulate_jcc(p: "Kprobe", regs: "PtRegs") -> None:
        regs.ip = (_next(p) + rel) & MASK64 if jcc_taken(cc, regs.flags) else _next(p)
    return kprobe_emulate_jcc


def make_loop(op: int, rel: int, width: int) -> InsnHandler:
    mask = (1 << width) - 1

    def kprobe_emulate_loop(p: "Kprobe", regs: "PtRegs") -> None:
        cx = regs["rcx"]
        if op == 0xE3:                                     # jrcxz/jecxz: no decrement
            taken = cx & mask == 0
        else:
            # A 32-bit count write zero-extends into rcx, as every 32-bit register write
            # (the kernel's emulation keeps the upper half).
            cx = (cx - 1) & mask
            regs["rcx"] = cx
            taken = cx & mask != 0
            if op == 0xE0:
                taken = taken and not regs.flags & ZF     # loopne
            elif op == 0xE1:
                taken = taken and bool(regs.flags & ZF)   # loope
        regs.ip = (_next(p) + rel) & MASK64 if taken else _next(p)
    return kprobe_emulate_loop


def make_ret(imm16: int) -> InsnHandler:
    def kprobe_emulate_ret(p: "Kprobe", regs: "PtRegs") -> None:
        regs.ip = _pop(regs)
        regs.sp = regs.sp + imm16
    return kprobe_emulate_ret


def make_indirect(reg: int, call: bool) -> InsnHandler:
    name = GPRS[reg]

    def kprobe_emulate_indirect(p: "Kprobe", regs: "PtRegs") -> None:
        target = regs[name]                               # read before the push moves rsp
        if call:
            _push(regs, _next(p))
        regs.ip = target
    return kprobe_emulate_indirect


class GeneralProtection(UserFault):
    """cli/sti at CPL3 with IOPL < 3: the #GP the unprobed instruction takes (no address)."""
    kind = "general protection"

    def __init__(self) -> None:
        Exception.__init__(self, self.kind)
        self.addr, self.write, self.mapped = None, False, False   # type: ignore[assignment]


def _popf_kept(regs: "PtRegs") -> int:
    """Flags POPF leaves alone in user mode: IOPL at CPL3, and IF unless IOPL is 3 (SDM)."""
    if not regs.machine.user_mode:
        return 0
    return IOPL | (0 if regs.flags & IOPL == IOPL else IF)


def make_ifmodifier(op: int, size: int = 8) -> InsnHandler:
    """cli/sti/pushf/popf. `size` 2 for the operand-size prefixed PUSHF/POPF (66 9c/9d),
    which move only FLAGS' low 16 bits; the kernel's emulation always moves 8 bytes."""
    def kprobe_emulate_ifmodifiers(p: "Kprobe", regs: "PtRegs") -> None:
        if op in (0xFA, 0xFB) and regs.machine.user_mode and regs.flags & IOPL != IOPL:
            raise GeneralProtection()
        if op == 0xFA:
            regs.flags = regs.flags & ~IF
        elif op == 0xFB:
            regs.flags = regs.flags | IF
        elif op == 0x9C and size == 2:
            sp = (regs.sp - 2) & MASK64
            copy_to_user(regs.machine.memory, sp, (regs.flags & 0xFFFF).to_bytes(2, "little"))
            regs.sp = sp
        elif op == 0x9C:
            _push(regs, regs.flags)
        elif size == 2:                                   # popf (16-bit)
            value = int.from_bytes(copy_from_user(regs.machine.memory, regs.sp, 2), "little")
            regs.sp = regs.sp + 2
            kept = _popf_kept(regs)
            regs.flags = (regs.flags & (~0xFFFF | kept)) | (value & POPF_MASK & ~kept & 0xFFFF) \
                | FLAGS_FIXED
        else:                                             # popf
            kept = _popf_kept(regs)
            regs.flags = (regs.flags & kept) | (_pop(regs) & POPF_MASK & ~kept) | FLAGS_FIXED
        regs.ip = _next(p)
    return kprobe_emulate_ifmodifiers


def make_syscall() -> InsnHandler:
    """`syscall` served in place (our deviation): stepped in a slot, RCX would receive the
    slot's address, which a user-mode guest can see; the kernel never meets it in its text."""
    def kprobe_emulate_syscall(p: "Kprobe", regs: "PtRegs") -> None:
        regs["rcx"] = _next(p)              # what the CPU does for `syscall` (see emu/arch)
        regs["r11"] = regs.flags
        # The OS layer sees what the syscall hook sees, the pc on the `syscall`, and the
        # CPU's step past it comes after: a task switch inside saves the right resume pc.
        m = regs.machine
        regs.ip = _next(p) - m.arch.syscall_pc_step
        regs.flush()
        m.on_syscall()
        regs.refresh()
        regs.ip = regs.ip + m.arch.syscall_pc_step
    return kprobe_emulate_syscall
