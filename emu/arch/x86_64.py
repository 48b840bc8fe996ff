"""x86-64 facts: registers, SysV AMD64 calling convention, the syscall ABI, int3 traps."""
from __future__ import annotations

import struct
from typing import Any

import capstone as cs
import keystone as ks
import unicorn as uc
from unicorn import x86_const as X

from emu.arch.base import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, Arch, CpuHost

_NAMES = ("rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags "
          "cs ss ds es fs gs fs_base gs_base").split()
_REGS = {n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in _NAMES}
_REGS.update({"eflags": X.UC_X86_REG_EFLAGS})

_SYSCALLS = dict(
    read=0, write=1, open=2, close=3, stat=4, fstat=5, lstat=6, poll=7, lseek=8, mmap=9,
    mprotect=10, munmap=11, brk=12, rt_sigaction=13, rt_sigprocmask=14, rt_sigreturn=15, ioctl=16,
    pread64=17, pwrite64=18, readv=19, writev=20, access=21, pipe=22, select=23, sched_yield=24,
    mremap=25, madvise=28, dup=32, dup2=33, nanosleep=35, getpid=39, sendfile=40, socket=41,
    connect=42, getpeername=52, clone=56, fork=57, vfork=58, execve=59, exit=60, wait4=61, kill=62,
    uname=63, fcntl=72, fsync=74, getdents=78, getcwd=79, chdir=80, fchdir=81, mkdir=83, unlink=87,
    readlink=89, umask=95, gettimeofday=96, getrlimit=97, getrusage=98, sysinfo=99, getuid=102,
    getgid=104, geteuid=107, getegid=108, setpgid=109, getppid=110, getpgrp=111, getpgid=121,
    sigaltstack=131, prctl=157, arch_prctl=158, gettid=186, tkill=200, time=201, futex=202,
    sched_getaffinity=204, getdents64=217, set_tid_address=218, clock_gettime=228,
    clock_getres=229, clock_nanosleep=230, exit_group=231, tgkill=234, openat=257, mkdirat=258,
    newfstatat=262, unlinkat=263, readlinkat=267, faccessat=269, pselect6=270, ppoll=271,
    set_robust_list=273, dup3=292, pipe2=293, prlimit64=302, getrandom=318, statx=332, rseq=334,
    clone3=435, close_range=436, faccessat2=439,
)

INT3_VECTOR = 3
GP_VECTOR = 13
HLT = b"\xf4"
CONSOLE_PORT, EXIT_PORT = 0x3F8, 0xF4

# --- the CPU state Linux gives a process --------------------------------------------------------
# x87 and SSE control as after FNINIT and as fpstate_init_user() leaves them (fpu/core.c):
# round to nearest, 64-bit precision, every exception masked, the register stack empty.
FPU_RESET = {"fpcw": 0x37F, "fpsw": 0, "fptag": 0xFFFF, "mxcsr": 0x1F80}
X86_CR0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x4_0000   # PE MP ET NE WP AM (PG: Unicorn maps flat)
X86_CR4_OSXMMEXCPT = 1 << 10     # unmasked SIMD FP exceptions raise #XM, not #UD
# asm/segment.h: GDT entries 2, 3 (kernel CS/DS), 5, 6 (user DS/CS); user selectors RPL 3.
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS = 0x10, 0x18, 0x2B, 0x33
X86_EFLAGS_FIXED, X86_EFLAGS_IF = 0x2, 0x200
# The GDT lives in the page above the last user page (TASK_SIZE = 0x7ffffffff000), which
# Linux never maps for a process either; segment loads by the guest still find it.
GDT_PAGE = 0x7FFF_FFFF_F000


def _descriptor(code: bool, dpl: int) -> bytes:
    """A flat 64-bit code (L) or data segment descriptor, accessed bit set so loading it
    never writes to the read-only GDT."""
    access = 0x80 | dpl << 5 | 0x10 | (0x0A if code else 0x02) | 0x01
    flags = 0xA if code else 0xC                      # G + L, or G + D/B
    return (0xFFFF | access << 40 | 0xF << 48 | flags << 52).to_bytes(8, "little")


GDT = (bytes(16) + _descriptor(True, 0) + _descriptor(False, 0) + bytes(8)
       + _descriptor(False, 3) + _descriptor(True, 3))
IRETQ = b"\x48\xcf"


class X86_64Arch(Arch):
    def install_hooks(self, m: CpuHost) -> None:
        regs, rip, owned = m.regs, self.regs["rip"], m.break_addrs

        def on_intr(intno: int) -> None:
            if m.stopping:                 # the run already ended (`out` to the exit
                m.uc.emu_stop()                     # port); the rest of the block is moot
                return
            addr = regs.read(rip) - 1               # the CPU reports the byte after the int3
            if intno == INT3_VECTOR:
                handler = owned.get(addr)           # the hot path: a trap the probe layer owns
                if handler is None or not handler(addr):
                    m.on_break(addr, INT3_VECTOR)
            else:
                pc = addr + 1
                # `int n` (cd nn) reports the address after itself; name the instruction.
                if m.memory.read_safe(pc - 2, 2) == bytes((0xCD, intno)):
                    pc -= 2
                elif intno == GP_VECTOR and m.memory.read_safe(pc, 1) == HLT:
                    m.request_halt(pc)              # CPL3: a fault unless a halt is allowed
                    return
                m.on_cpu_exception(pc, intno)

        m.hooks.intr(on_intr)
        rax, rdx, rcx = self.regs["rax"], self.regs["rdx"], self.regs["rcx"]
        r11, rflags = self.regs["r11"], self.regs["rflags"]

        def on_syscall() -> None:
            # The CPU's side of `syscall`, which Unicorn's hook skips: RCX = return
            # address, R11 = RFLAGS (Linux returns with both clobbered).
            regs.write(rcx, regs.read(rip) + 2)
            regs.write(r11, regs.read(rflags))
            m.on_syscall(insn_hook=True)

        m.hooks.insn_syscall(on_syscall, X.UC_X86_INS_SYSCALL)

        def tsc(with_aux: bool):
            def read() -> int:
                value = m.clock.read_cycles()
                regs.write(rax, value & 0xFFFFFFFF)
                regs.write(rdx, value >> 32)
                if with_aux:
                    regs.write(rcx, m.cpu)          # IA32_TSC_AUX: the CPU (node 0)
                return 1
            return read

        m.hooks.insn_counter(tsc(False), X.UC_X86_INS_RDTSC)
        m.hooks.insn_counter(tsc(True), X.UC_X86_INS_RDTSCP)

    def set_tls(self, m: CpuHost, value: int) -> None:
        m.regs.write(self.regs["fs_base"], value)

    def break_code(self, m: CpuHost, addr: int) -> int:
        return INT3_VECTOR

    def halted(self, m: CpuHost) -> bool:
        """Unicorn returns from emu_start after `hlt` with rip past it."""
        pc = m.pc
        return m.memory.read_safe(pc - 1, 1) == HLT

    def waited(self, m: CpuHost) -> bool:
        return False                # `hlt` is the only wait, and it is privileged

    def pack_stat(self, st: dict[str, Any]) -> bytes:
        """x86-64 struct stat (144 bytes)."""
        return struct.pack("<QQQIIIIQqqqQQQQQQqqq", st["dev"], st["ino"], st["nlink"], st["mode"],
                           st["uid"], st["gid"], 0, st["rdev"], st["size"], st["blksize"],
                           st["blocks"], st["atime"], 0, st["mtime"], 0, st["ctime"], 0, 0, 0, 0)

    def reset_cpu(self, m: CpuHost) -> None:
        """Unicorn leaves the FPU control words at 0 (single precision, every exception
        unmasked) and the x87 tags "valid": give the FNINIT state instead."""
        uc = m.uc
        for name, value in FPU_RESET.items():
            uc.reg_write(getattr(X, f"UC_X86_REG_{name.upper()}"), value)
        uc.reg_write(X.UC_X86_REG_CR0, X86_CR0)
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | X86_CR4_OSXMMEXCPT)
        uc.reg_write(X.UC_X86_REG_RFLAGS, X86_EFLAGS_FIXED)

    def start_thread(self, m: CpuHost, pc: int, sp: int) -> None:
        """Unicorn sets the CPL only from a real segment load, so enter CPL3 as the kernel
        does: `iretq` from CPL0 through a frame of user CS/SS, RFLAGS = IF."""
        uc = m.uc
        m.memory.map(GDT_PAGE, PAGE, PROT_READ | PROT_WRITE | PROT_EXEC, "[gdt]")
        stub, frame = GDT_PAGE + 0x100, GDT_PAGE + 0x200
        m.memory.write(GDT_PAGE, GDT)
        m.memory.write(stub, IRETQ)
        m.memory.write(frame, struct.pack("<5Q", pc, USER_CS, X86_EFLAGS_IF | X86_EFLAGS_FIXED,
                                          sp, USER_DS))
        uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT_PAGE, len(GDT) - 1, 0))
        uc.reg_write(X.UC_X86_REG_CS, KERNEL_CS)
        uc.reg_write(X.UC_X86_REG_SS, KERNEL_DS)
        uc.reg_write(X.UC_X86_REG_RSP, frame)
        uc.emu_start(stub, pc)
        uc.ctl_remove_cache(pc, pc + 1)     # the block at `until` was translated to stop there
        m.memory.protect(GDT_PAGE, PAGE, PROT_READ)
        self._trap_port_io(m)

    def _trap_port_io(self, m: CpuHost) -> None:
        """At CPL3 with IOPL 0 `in`/`out` raise #GP; Unicorn's port I/O skips the check
        (and the TSS bitmap), so the instruction hooks raise it."""
        rip = self.regs["rip"]

        def gp(_uc, *_args):
            pc = m.regs.read(rip)
            m.on_cpu_exception(pc, GP_VECTOR)
            m.regs.write(rip, pc)            # a PC write leaves the block at once
            return 0

        m.uc.hook_add(uc.UC_HOOK_INSN, gp, None, 1, 0, X.UC_X86_INS_OUT)
        m.uc.hook_add(uc.UC_HOOK_INSN, gp, None, 1, 0, X.UC_X86_INS_IN)

    def cpu_state(self, m: CpuHost) -> dict[str, int]:
        uc = m.uc
        return {"cpl": uc.reg_read(X.UC_X86_REG_CS) & 3, "cs": uc.reg_read(X.UC_X86_REG_CS),
                "ss": uc.reg_read(X.UC_X86_REG_SS), "rflags": uc.reg_read(X.UC_X86_REG_RFLAGS),
                **{name: uc.reg_read(getattr(X, f"UC_X86_REG_{name.upper()}")) for name in FPU_RESET}}

    def install_bare_devices(self, m: CpuHost) -> None:
        def on_out(_uc, port, size, value, _ud):
            if port == CONSOLE_PORT:
                m.console_write(bytes([value & 0xFF]))
            elif port == EXIT_PORT:
                m.request_exit(value & 0xFFFFFFFF)

        m.uc.hook_add(uc.UC_HOOK_INSN, on_out, None, 1, 0, X.UC_X86_INS_OUT)
        m.uc.hook_add(uc.UC_HOOK_INSN, lambda *a: 0, None, 1, 0, X.UC_X86_INS_IN)


X86_64 = X86_64Arch(
    name="x86_64", uc_arch=uc.UC_ARCH_X86, uc_mode=uc.UC_MODE_64,
    cs_arch=cs.CS_ARCH_X86, cs_mode=cs.CS_MODE_64, ks_arch=ks.KS_ARCH_X86, ks_mode=ks.KS_MODE_64,
    elf_machine="EM_X86_64", regs={k: int(v) for k, v in _REGS.items()}, pc="rip", sp="rsp", ret="rax",
    args=("rdi", "rsi", "rdx", "rcx", "r8", "r9"), link=None,
    syscall_nr="rax", syscall_args=("rdi", "rsi", "rdx", "r10", "r8", "r9"), syscall_ret="rax",
    syscalls=_SYSCALLS, breakpoint=b"\xcc", insn_align=1, max_insn_size=15, platform="x86_64",
    hwcap=0x178BFBFF, hwcap2=0,
    bare_base=0x0, bare_ram_size=0x0800_0000, bare_stack_top=0x0800_0000,
    flags_reg="rflags", halt_size=1, halt_insn=HLT, halt_asm="hlt", cpu_profile="skylake",
    task_size=GDT_PAGE,     # TASK_SIZE_MAX: 2^47 - 4096
    syscall_pc_step=2, syscall_insn_size=2, clone_tls_ctid=(2, 1),
    aliases={"ip": "rip", "flags": "rflags", "ax": "rax", "bx": "rbx", "cx": "rcx", "dx": "rdx",
             "si": "rsi", "di": "rdi", "bp": "rbp", "sp": "rsp"},
    exception_names={0: "divide error", 1: "debug trap", 4: "overflow (into)", 5: "bound range",
                     6: "undefined instruction", 13: "general protection", 0x80: "int 0x80"},
)
ARCH = X86_64
