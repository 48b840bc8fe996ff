"""arm64 (AArch64) facts: registers, AAPCS64, the asm-generic syscall ABI, BRK traps."""
from __future__ import annotations

import struct
from typing import Any

import capstone as cs
import keystone as ks
import unicorn as uc
from unicorn import arm64_const as A

from emu.arch.base import Arch, CpuHost

_REGS = {f"x{i}": getattr(A, f"UC_ARM64_REG_X{i}") for i in range(29)}
_REGS.update({
    "x29": A.UC_ARM64_REG_X29, "x30": A.UC_ARM64_REG_X30, "sp": A.UC_ARM64_REG_SP,
    "pc": A.UC_ARM64_REG_PC, "nzcv": A.UC_ARM64_REG_NZCV, "pstate": A.UC_ARM64_REG_PSTATE,
    "tpidr_el0": A.UC_ARM64_REG_TPIDR_EL0, "cpacr_el1": A.UC_ARM64_REG_CPACR_EL1,
})

# asm-generic numbers (include/uapi/asm-generic/unistd.h)
_SYSCALLS = dict(
    getcwd=17, dup=23, dup3=24, fcntl=25, ioctl=29, mkdirat=34, unlinkat=35, faccessat=48, chdir=49,
    fchdir=50, openat=56, close=57, pipe2=59, getdents64=61, lseek=62, read=63, write=64, readv=65,
    writev=66, pread64=67, pwrite64=68, sendfile=71, pselect6=72, ppoll=73, readlinkat=78,
    newfstatat=79, fstat=80, fsync=82, exit=93, exit_group=94, set_tid_address=96, futex=98,
    set_robust_list=99, nanosleep=101, clock_gettime=113, clock_getres=114, clock_nanosleep=115,
    sched_getaffinity=123, sched_yield=124, kill=129, tkill=130, tgkill=131, sigaltstack=132,
    rt_sigaction=134, rt_sigprocmask=135, rt_sigreturn=139, setpgid=154, getpgid=155, uname=160,
    getrlimit=163, getrusage=165, umask=166, prctl=167, gettimeofday=169, getpid=172, getppid=173,
    getuid=174, geteuid=175, getgid=176, getegid=177, gettid=178, sysinfo=179, socket=198,
    connect=203, getpeername=205, brk=214, munmap=215, mremap=216, clone=220, execve=221, mmap=222,
    mprotect=226, madvise=233, wait4=260, prlimit64=261, getrandom=278, statx=291, rseq=293,
    clone3=435, close_range=436, faccessat2=439,
)

# Unicorn's exception numbers for AArch64 (qemu's EXCP_*)
EXCP_UDEF, EXCP_SWI, EXCP_BKPT = 1, 2, 7
# system registers read with MRS that must not see host time: (op0, op1, crn, crm, op2)
CNTVCT_EL0, CNTPCT_EL0, CNTFRQ_EL0, PMCCNTR_EL0 = (3, 3, 14, 0, 2), (3, 3, 14, 0, 1), (3, 3, 14, 0, 0), (3, 3, 9, 13, 0)

UART_DATA, EXIT_DEVICE = 0x0900_0000, 0x0910_0000

# --- the CPU state Linux gives a process --------------------------------------------------------
CPACR_FPEN = 3 << 20             # FP/SIMD usable at EL0 and EL1
PSR_MODE_EL0t = 0x0              # start_thread_common: EL0, DAIF clear
# SCTLR_EL1 bits Linux sets for EL0 (INIT_SCTLR_EL1_MMU_ON): DC ZVA, CTR_EL0 reads, WFE and
# cache maintenance by VA allowed. Linux leaves nTWI clear (WFI traps and the kernel steps
# over it); here it is set, because Unicorn stops a run at `until` with an imitation WFI that
# must not trap: a guest WFI then ends emu_start, and Machine.run resumes after it.
SCTLR_DZE, SCTLR_UCT, SCTLR_nTWI, SCTLR_nTWE, SCTLR_UCI = 1 << 14, 1 << 15, 1 << 16, 1 << 18, 1 << 26
SCTLR_EL1 = (1, 0, 3, 0, 0)                  # (crn, crm, op0, op1, op2) for UC_ARM64_REG_CP_REG
CNTKCTL_EL1, CNTKCTL_EL0VCTEN = (14, 1, 3, 0, 0), 1 << 1    # arch_timer: EL0 reads CNTVCT
WFI = 0xD503207F
HLT_0 = 0xD4400000                           # hlt #0: the bare-metal halt
HLT_MASK = 0xFFE0001F                        # HLT #imm16
# Undefined at EL0, where Linux gives SIGILL (do_el0_undef):
SYSTEM_INSN = (0xFFC00000, 0xD5000000)       # MSR/MRS/SYS/SYSL and the hints (mask, value)
EXCEPTION_GEN = (0xFF000000, 0xD4000000)     # SVC/HVC/SMC/BRK/HLT/DCPS
ERET_FAMILY = (0xFE000000, 0xD6000000)       # unconditional branch (register): ERET, DRPS


def _is_privileged(word: int) -> bool:
    """A system, exception-generating or ERET-class instruction: at EL0 these are the ones
    that are undefined for lack of privilege (the rest of UDEF is plain undefined). A system
    register or SYS op with op1 = 3 is an EL0 one: undefined only if this CPU lacks it."""
    if word & SYSTEM_INSN[0] == SYSTEM_INSN[1]:
        op0, op1 = (word >> 19) & 3, (word >> 16) & 7
        return op0 == 0 or op1 != 3
    return any(word & mask == value for mask, value in (EXCEPTION_GEN, ERET_FAMILY))


class Arm64Arch(Arch):
    def install_hooks(self, m: CpuHost) -> None:
        regs, pc, owned = m.regs, self.regs["pc"], m.break_addrs

        def on_intr(intno: int) -> None:
            if m.stopping:                # the run already ended (an exit device
                m.uc.emu_stop()                    # write); the rest of the block is moot
                return
            addr = regs.read(pc)
            if intno == EXCP_BKPT:
                handler = owned.get(addr)          # the hot path: a trap the probe layer owns
                if handler is None or not handler(addr):
                    m.on_break(addr)
            elif intno == EXCP_SWI:
                m.on_syscall()
            elif intno == EXCP_UDEF:
                word = int.from_bytes(m.uc.mem_read(addr, 4), "little")
                if word & HLT_MASK == HLT_0:       # HLT #imm: the bare-metal halt
                    m.request_halt(addr)
                elif m.user_mode and _is_privileged(word):
                    m.on_privileged(addr)
                else:
                    m.on_undefined(addr)
            else:
                m.on_cpu_exception(addr, intno)

        m.hooks.intr(on_intr)
        m.for_each_uc(lambda u: u.hook_add(uc.UC_HOOK_INSN, self._on_mrs, m, 1, 0,
                                           A.UC_ARM64_INS_MRS))

    @staticmethod
    def _on_mrs(_uc, reg, cp, m: CpuHost) -> int:
        key = (cp.op0, cp.op1, cp.crn, cp.crm, cp.op2)
        clock = m.clock
        if key == CNTVCT_EL0 or key == CNTPCT_EL0:
            value = clock.read_counter()
        elif key == PMCCNTR_EL0:
            value = clock.read_cycles()
        elif key == CNTFRQ_EL0:
            value = clock.counter_hz
        else:
            return 0
        m.regs.write(reg, value)
        return 1

    def set_tls(self, m: CpuHost, value: int) -> None:
        m.regs.write(self.regs["tpidr_el0"], value)

    def break_code(self, m: CpuHost, addr: int) -> int:
        return (int.from_bytes(m.uc.mem_read(addr, 4), "little") >> 5) & 0xFFFF

    def halted(self, m: CpuHost) -> bool:
        return False                                     # HLT arrives as an exception

    def waited(self, m: CpuHost) -> bool:
        """The run stopped just after a WFI (Unicorn halts the CPU on it)."""
        return m.memory.read_safe(m.pc - 4, 4) == WFI.to_bytes(4, "little")

    def pack_stat(self, st: dict[str, Any]) -> bytes:
        """asm-generic struct stat (128 bytes)."""
        return struct.pack("<QQIIIIQQqiiqqQqQqQII", st["dev"], st["ino"], st["mode"], st["nlink"],
                           st["uid"], st["gid"], st["rdev"], 0, st["size"], st["blksize"], 0,
                           st["blocks"], st["atime"], 0, st["mtime"], 0, st["ctime"], 0, 0, 0)

    def reset_cpu(self, m: CpuHost) -> None:
        """EL1h (Unicorn's reset, DAIF masked) with FP/SIMD enabled; FPCR and FPSR are 0
        (round to nearest, no trapped exceptions), as Linux gives a process too."""
        m.regs.write(self.regs["cpacr_el1"], CPACR_FPEN)
        m.uc.reg_write(A.UC_ARM64_REG_FPCR, 0)
        m.uc.reg_write(A.UC_ARM64_REG_FPSR, 0)

    def start_thread(self, m: CpuHost, pc: int, sp: int) -> None:
        """PSTATE = EL0t, then the EL1 controls Linux sets for user space. Unicorn rebuilds
        its translation flags on a system-register write, not on a PSTATE write: the
        SCTLR_EL1 write comes last."""
        uc = m.uc
        uc.reg_write(A.UC_ARM64_REG_PSTATE, PSR_MODE_EL0t)
        uc.reg_write(A.UC_ARM64_REG_TPIDR_EL0, 0)
        uc.reg_write(A.UC_ARM64_REG_TPIDRRO_EL0, 0)
        cntkctl = uc.reg_read(A.UC_ARM64_REG_CP_REG, CNTKCTL_EL1)
        uc.reg_write(A.UC_ARM64_REG_CP_REG, (*CNTKCTL_EL1, cntkctl | CNTKCTL_EL0VCTEN))
        sctlr = uc.reg_read(A.UC_ARM64_REG_CP_REG, SCTLR_EL1)
        sctlr |= SCTLR_DZE | SCTLR_UCT | SCTLR_nTWI | SCTLR_nTWE | SCTLR_UCI
        uc.reg_write(A.UC_ARM64_REG_CP_REG, (*SCTLR_EL1, sctlr))
        uc.ctl_flush_tb()

    def cpu_state(self, m: CpuHost) -> dict[str, int]:
        uc = m.uc
        pstate = uc.reg_read(A.UC_ARM64_REG_PSTATE)
        return {"el": (pstate >> 2) & 3, "pstate": pstate, "fpcr": uc.reg_read(A.UC_ARM64_REG_FPCR),
                "fpsr": uc.reg_read(A.UC_ARM64_REG_FPSR),
                "cpacr_el1": uc.reg_read(A.UC_ARM64_REG_CPACR_EL1),
                "sctlr_el1": uc.reg_read(A.UC_ARM64_REG_CP_REG, SCTLR_EL1)}

    def install_bare_devices(self, m: CpuHost) -> None:
        def uart_write(_uc, offset, size, value, _ud):
            if offset == 0:
                m.console_write(bytes([value & 0xFF]))

        def exit_write(_uc, offset, size, value, _ud):
            m.request_exit(value & 0xFFFFFFFF)

        m.uc.mmio_map(UART_DATA, 0x1000, lambda *a: 0, None, uart_write, None)
        m.uc.mmio_map(EXIT_DEVICE, 0x1000, lambda *a: 0, None, exit_write, None)
        m.memory.note_region(UART_DATA, 0x1000, "uart-pl011")
        m.memory.note_region(EXIT_DEVICE, 0x1000, "exit-device")


ARM64 = Arm64Arch(
    name="arm64", uc_arch=uc.UC_ARCH_ARM64, uc_mode=uc.UC_MODE_ARM,
    cs_arch=cs.CS_ARCH_ARM64, cs_mode=cs.CS_MODE_ARM,
    ks_arch=ks.KS_ARCH_ARM64, ks_mode=ks.KS_MODE_LITTLE_ENDIAN,
    elf_machine="EM_AARCH64", regs={k: int(v) for k, v in _REGS.items()}, pc="pc", sp="sp", ret="x0",
    args=tuple(f"x{i}" for i in range(8)), link="x30",
    syscall_nr="x8", syscall_args=tuple(f"x{i}" for i in range(6)), syscall_ret="x0",
    syscalls=_SYSCALLS, breakpoint=(0xD4200080).to_bytes(4, "little"), insn_align=4,
    max_insn_size=4, platform="aarch64",
    # fp asimd evtstrm aes pmull sha1 sha2 crc32: what Unicorn's default Cortex-A72 runs.
    hwcap=0xFF, hwcap2=0,
    bare_base=0x4000_0000, bare_ram_size=0x0800_0000, bare_stack_top=0x4800_0000,
    flags_reg="nzcv", halt_size=0, halt_insn=HLT_0.to_bytes(4, "little"), halt_asm="hlt #0",
    cpu_profile="cortex-a72", aliases={"lr": "x30", "fp": "x29", "xzr": "x31"},
    privileged_signal=4,
)
ARCH = ARM64
