"""Signal delivery as Linux does it: the arch's rt_sigframe (siginfo + ucontext with the
general and FP/SIMD registers) pushed on the task's stack (or its sigaltstack), the
handler entered with the signal's mask blocked, and rt_sigreturn restoring everything
from the frame (a handler may edit it). Frame layouts follow arch/x86/kernel/signal_64.c
and arch/arm64/kernel/signal.c."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from unicorn import arm64_const as A
from unicorn import x86_const as X

from emu.linux.tasks import ERESTARTSYS
from emu.machine import Machine
from emu.memory import PROT_EXEC, PROT_READ
from emu.uaccess import UserFault, copy_from_user, copy_to_user

SA_SIGINFO, SA_ONSTACK, SA_RESTART = 0x4, 0x08000000, 0x10000000
SA_NODEFER, SA_RESETHAND, SA_RESTORER = 0x40000000, 0x80000000, 0x04000000
SS_ONSTACK, SS_DISABLE = 1, 2
SI_USER, SI_TKILL, SI_TIMER, SI_KERNEL = 0, -6, -2, 0x80
MINSIGSTKSZ = 2048
UNBLOCKABLE = (1 << (9 - 1)) | (1 << (19 - 1))          # SIGKILL, SIGSTOP
# The page that holds the sigreturn trampoline when a handler has no SA_RESTORER (the
# kernel's vDSO sigtramp on arm64): the last user page, above the stack.
SIGPAGE = 0x7FFF_FFFF_F000


def sigbit(sig: int) -> int:
    return 1 << (sig - 1)


@dataclass
class SigAction:
    handler: int = 0
    flags: int = 0
    restorer: int = 0
    mask: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> "SigAction":
        return cls(*struct.unpack("<4Q", raw))

    def pack(self) -> bytes:
        return struct.pack("<4Q", self.handler, self.flags, self.restorer, self.mask)


class NoRestorer(Exception):
    """An x86-64 handler installed without SA_RESTORER: its frame has no return address."""


@dataclass
class AltStack:
    sp: int = 0
    size: int = 0
    flags: int = SS_DISABLE

    def on(self, sp: int) -> bool:
        return self.flags != SS_DISABLE and self.sp < sp <= self.sp + self.size


def siginfo(sig: int, code: int, pid: int = 0, uid: int = 0, addr: int | None = None,
            timer: tuple[int, int] | None = None) -> bytes:
    """A 128-byte siginfo: kill/tkill (pid, uid), fault (addr) or POSIX timer fields."""
    head = struct.pack("<iii4x", sig, 0, code)
    if addr is not None:
        body = struct.pack("<Q", addr)
    elif timer is not None:
        body = struct.pack("<iiQ", timer[0], 0, timer[1])      # si_tid, si_overrun, si_value
    else:
        body = struct.pack("<iI", pid, uid)
    return (head + body).ljust(128, b"\0")


class FrameLayout(Protocol):
    trampoline: bytes            # rt_sigreturn, for handlers without SA_RESTORER
    needs_restorer: bool         # no SA_RESTORER: the frame cannot be set up (SIGSEGV)

    def push(self, m: Machine, sp: int, sig: int, info: bytes, act: SigAction, oldmask: int,
             alt: AltStack, pc: int, tramp: int) -> tuple[int, dict[str, int]]: ...

    def pop(self, m: Machine) -> tuple[int, int]: ...


def _mem(m: Machine):
    return m.memory


class X86Frame:
    """rt_sigframe: pretcode, ucontext (flags, link, stack_t, sigcontext, sigmask), siginfo;
    the fxsave area (64-aligned) above it. The handler starts as if called: rsp+8 16-aligned."""
    trampoline = bytes.fromhex("b80f0000000f05")     # mov eax, 15; syscall
    needs_restorer = True        # "x86-64 should always use SA_RESTORER": no vDSO stub
    GREGS = ("r8 r9 r10 r11 r12 r13 r14 r15 rdi rsi rbp rbx rdx rax rcx rsp rip rflags").split()
    UC, MCTX, MASK, INFO, SIZE = 8, 48, 304, 312, 440

    def push(self, m, sp, sig, info, act, oldmask, alt, pc, tramp):
        fp = (sp - (0 if sp != m.sp else 128) - 512) & ~63     # below the red zone
        copy_to_user(_mem(m), fp, self._fxsave(m))
        frame = ((fp - self.SIZE) & ~15) - 8
        vals = [m.reg(r) for r in self.GREGS]
        vals[16] = pc
        greg = struct.pack("<18Q", *vals) + struct.pack("<HHHH", 0x33, 0, 0, 0x2B)
        greg += struct.pack("<4Q", 0, 0, oldmask, 0) + struct.pack("<Q", fp) + bytes(64)
        uc = struct.pack("<QQQi4xQ", 0, 0, alt.sp, alt.flags | (SS_ONSTACK if alt.on(m.sp) else 0),
                         alt.size) + greg + struct.pack("<Q", oldmask)
        copy_to_user(_mem(m), frame, struct.pack("<Q", act.restorer or tramp) + uc + info)
        return frame, {"rdi": sig, "rsi": frame + self.INFO, "rdx": frame + self.UC, "rax": 0,
                       "rsp": frame, "rip": act.handler}

    def pop(self, m):
        """rt_sigreturn: the frame starts 8 below rsp (the handler's ret took pretcode)."""
        frame = m.sp - 8
        raw = copy_from_user(_mem(m), frame + self.MCTX, 256 + 8)
        vals = struct.unpack("<18Q", raw[:144])
        for name, v in zip(self.GREGS, vals):
            if name != "rflags":
                m.set_reg(name, v)
        m.set_reg("rflags", (m.reg("rflags") & ~0x40DD5) | (vals[17] & 0x40DD5))
        (fp,) = struct.unpack("<Q", raw[184:192])
        if fp:
            self._fxrstor(m, copy_from_user(_mem(m), fp, 512))
        (mask,) = struct.unpack("<Q", raw[256:264])
        return vals[16], mask

    @staticmethod
    def _fxsave(m) -> bytes:
        area = bytearray(512)
        struct.pack_into("<H", area, 0, 0x37F)
        struct.pack_into("<I", area, 24, m.uc.reg_read(X.UC_X86_REG_MXCSR))
        struct.pack_into("<I", area, 28, 0xFFFF)
        for i in range(16):
            area[160 + 16 * i:176 + 16 * i] = m.uc.reg_read(X.UC_X86_REG_XMM0 + i).to_bytes(16, "little")
        return bytes(area)

    @staticmethod
    def _fxrstor(m, area: bytes) -> None:
        m.uc.reg_write(X.UC_X86_REG_MXCSR, struct.unpack_from("<I", area, 24)[0] & 0xFFFF)
        for i in range(16):
            m.uc.reg_write(X.UC_X86_REG_XMM0 + i, int.from_bytes(area[160 + 16 * i:176 + 16 * i], "little"))


class Arm64Frame:
    """rt_sigframe: siginfo, ucontext (flags, link, stack_t, sigmask, pad, sigcontext with
    fault_address, x0-x30, sp, pc, pstate and __reserved holding an fpsimd_context), then the
    frame record {x29, x30} the handler's x29 points at."""
    trampoline = bytes.fromhex("681180d2010000d4")   # mov x8, #139; svc #0
    needs_restorer = False       # the vDSO's sigtramp when there is no SA_RESTORER
    UC, MCTX, RESERVED, SIZE = 128, 304, 592, 4688
    FPSIMD_MAGIC, FPSIMD_SIZE = 0x46508001, 528

    def push(self, m, sp, sig, info, act, oldmask, alt, pc, tramp):
        frame = (sp - self.SIZE - 16) & ~15
        regs = [m.reg(f"x{i}") for i in range(29)] + [m.reg("x29"), m.reg("x30")]
        sc = struct.pack("<Q", 0) + struct.pack("<31Q", *regs)
        sc += struct.pack("<QQQ", m.sp, pc, m.uc.reg_read(A.UC_ARM64_REG_PSTATE)) + bytes(8)
        fpsimd = struct.pack("<IIII", self.FPSIMD_MAGIC, self.FPSIMD_SIZE,
                             m.uc.reg_read(A.UC_ARM64_REG_FPSR), m.uc.reg_read(A.UC_ARM64_REG_FPCR))
        fpsimd += b"".join(m.uc.reg_read(A.UC_ARM64_REG_Q0 + i).to_bytes(16, "little") for i in range(32))
        uc = struct.pack("<QQQi4xQQ", 0, 0, alt.sp, alt.flags | (SS_ONSTACK if alt.on(m.sp) else 0),
                         alt.size, oldmask).ljust(self.MCTX - self.UC, b"\0")
        body = info + uc + sc + fpsimd + bytes(8)      # the null header ends __reserved
        copy_to_user(_mem(m), frame, body)
        record = frame + self.SIZE
        copy_to_user(_mem(m), record, struct.pack("<QQ", regs[29], regs[30]))
        return frame, {"x0": sig, "x1": frame, "x2": frame + self.UC, "sp": frame,
                       "x29": record, "x30": act.restorer if act.flags & SA_RESTORER else tramp,
                       "pc": act.handler}

    def pop(self, m):
        frame = m.sp
        raw = copy_from_user(_mem(m), frame + self.MCTX, self.RESERVED - self.MCTX + self.FPSIMD_SIZE)
        regs = struct.unpack_from("<31Q", raw, 8)
        for i, v in enumerate(regs):
            m.set_reg(f"x{i}", v)
        sp, pc, pstate = struct.unpack_from("<QQQ", raw, 256)
        m.sp = sp
        nzcv = pstate & 0xF000_0000
        m.uc.reg_write(A.UC_ARM64_REG_NZCV, nzcv)
        fp = raw[self.RESERVED - self.MCTX:]
        magic, _size, fpsr, fpcr = struct.unpack_from("<IIII", fp)
        if magic == self.FPSIMD_MAGIC:
            m.uc.reg_write(A.UC_ARM64_REG_FPSR, fpsr)
            m.uc.reg_write(A.UC_ARM64_REG_FPCR, fpcr)
            for i in range(32):
                m.uc.reg_write(A.UC_ARM64_REG_Q0 + i, int.from_bytes(fp[16 + 16 * i:32 + 16 * i], "little"))
        (mask,) = struct.unpack("<Q", copy_from_user(_mem(m), frame + self.UC + 40, 8))
        return pc, mask


def _fault_signal(fault) -> tuple[int, int]:
    """The signal and si_code Linux sends for a fault the machine reports."""
    kind = fault.kind
    if "divide" in kind:
        return 8, 1                                      # SIGFPE, FPE_INTDIV
    if fault.signal == 11:
        return 11, 1 if "unmapped" in kind else 2        # SEGV_MAPERR / SEGV_ACCERR
    if fault.signal == 4:
        return 4, 5 if "privileged" in kind else 1       # ILL_PRVOPC / ILL_ILLOPC
    if fault.signal == 5:
        return 5, 1                                      # TRAP_BRKPT
    return fault.signal, SI_KERNEL


SIGBUS, BUS_ADRERR = 7, 2
PAST_EOF = " past EOF]"                # the name's end of file-mapping pages past EOF (mmap)


def _past_eof(m: Machine, addr: int | None) -> bool:
    """A fault on the pages of a file mapping wholly past its end: Linux's SIGBUS."""
    region = m.memory.find(addr) if addr is not None else None
    return region is not None and not region.prot and region.name.startswith("[mmap ") \
        and region.name.endswith(PAST_EOF)


FRAMES: dict[str, FrameLayout] = {"x86_64": X86Frame(), "arm64": Arm64Frame()}


def sigtramp(m: Machine, layout: FrameLayout) -> int:
    """The address of the rt_sigreturn trampoline, mapped on first use."""
    if m.memory.find(SIGPAGE) is None:
        m.memory.map(SIGPAGE, 4096, PROT_READ | PROT_EXEC, "[sigpage]")
        m.memory.write(SIGPAGE, layout.trampoline)
    return SIGPAGE


# --- sending and delivering ---------------------------------------------------------------
SIGKILL, SIGSTOP, SIGALRM = 9, 19, 14
DEFAULT_IGNORE = {17, 18, 23, 28}          # SIGCHLD, SIGCONT, SIGURG, SIGWINCH
DEFAULT_STOP = {19, 20, 21, 22}            # SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU
EINTR = 4
MAX_PENDING = 1024                         # queued signals per task (RLIMIT_SIGPENDING-like)


@dataclass
class Timer:
    """An armed ITIMER_REAL / alarm (id -1) or POSIX timer: fires `sig` at deadline_ns of
    modelled monotonic time, then every interval_ns if periodic."""
    id: int
    sig: int
    deadline_ns: int | None = None
    interval_ns: int = 0
    value: int = 0                       # sigev_value of timer_create
    tid: int = 0                         # SIGEV_THREAD_ID target, else the process


class Signals:
    """The process's dispositions, the signals pending on it and its threads, its timers;
    `deliver` builds the frame for the running task at a syscall's exit (or after a fault
    or a preemption)."""

    def __init__(self, proc) -> None:
        self.proc, self.m = proc, proc.machine
        self.sched = proc.sched
        self.layout = FRAMES[self.m.arch.name]
        self.actions: dict[int, SigAction] = {}
        self.shared: list[tuple[int, bytes]] = []       # process-directed, not yet taken
        self.timers: dict[int, Timer] = {}
        self.sched.timers = self
        self.m.fault_handler = self.on_fault

    def action(self, sig: int) -> SigAction:
        return self.actions.setdefault(sig, SigAction())

    def ignored(self, sig: int) -> bool:
        act = self.actions.get(sig, SigAction())
        if sig in (SIGKILL, SIGSTOP):
            return False
        return act.handler == 1 or act.handler == 0 and sig in DEFAULT_IGNORE | DEFAULT_STOP

    # --- sending ------------------------------------------------------------------------
    def send(self, sig: int, info: bytes, task=None) -> None:
        """Queue `sig` on `task` (tkill, tgkill, a fault) or the process (kill, timers); a
        blocked thread that can take it is woken with EINTR."""
        if self.ignored(sig):
            return
        if task is None:
            takers = [t for t in self._order() if not t.sigmask & sigbit(sig)]
            if not takers:
                if (all(s != sig for s, _ in self.shared) or sig >= 32) \
                        and len(self.shared) < MAX_PENDING:
                    self.shared.append((sig, info))
                return
            task = takers[0]
        if sig < 32 and any(s == sig for s, _ in task.pending) or len(task.pending) >= MAX_PENDING:
            return                      # standard signals do not queue; RLIMIT_SIGPENDING
        task.pending.append((sig, info))
        if task.state == "blocked" and not task.sigmask & sigbit(sig):
            restart = task.wait is not None and task.wait.restart
            self.sched.wake(task, -ERESTARTSYS if restart else -EINTR)

    def _order(self):
        """Who takes a process-directed signal: the running thread first, then by tid."""
        cur = self.sched.current
        rest = [t for tid, t in sorted(self.sched.tasks.items()) if t is not cur]
        return [t for t in [cur, *rest] if t.state != "exited"]

    # --- delivering ---------------------------------------------------------------------
    def next_signal(self, task) -> tuple[int, bytes] | None:
        for i, (sig, info) in enumerate(task.pending):
            if not task.sigmask & sigbit(sig):
                return task.pending.pop(i)
        for i, (sig, info) in enumerate(self.shared):
            if not task.sigmask & sigbit(sig):
                return self.shared.pop(i)
        return None

    def deliverable(self, task) -> bool:
        return any(not task.sigmask & sigbit(s) for s, _ in [*task.pending, *self.shared])

    def deliver(self, in_syscall: bool) -> None:
        """Run the first deliverable signal of the running task: a handler frame, the
        default action, or nothing when ignored."""
        task = self.sched.current
        while not self.m.stopping:
            got = self.next_signal(task)
            if got is None:
                return
            sig, info = got
            act = self.actions.get(sig, SigAction())
            if self.ignored(sig):
                continue
            if act.handler == 0 or sig in (SIGKILL, SIGSTOP):
                self.default_action(sig, info)
                return
            m = self.m
            try:
                self._enter_handler(task, sig, info, act, in_syscall)
            except UserFault:          # no room for the frame: force_sigsegv, as Linux
                self._force_sigsegv(f"cannot write the signal frame for signal {sig} below "
                                    f"sp {m.sp:#x}")
            except NoRestorer:
                self._force_sigsegv(f"the handler of signal {sig} has no SA_RESTORER "
                                    f"(x86-64 signal frames need one)")
            return

    def _force_sigsegv(self, why: str) -> None:
        """The frame could not be set up: the process dies of SIGSEGV (force_sigsegv; a
        SIGSEGV handler of its own is not tried)."""
        self.m.stderr.write(f"emu: guest killed by SIGSEGV: {why}\n".encode())
        self.proc.killed_by = 11
        self.m.request_exit(128 + 11)

    def _enter_handler(self, task, sig: int, info: bytes, act: SigAction, in_syscall: bool) -> None:
        m, step = self.m, self.sched.step if in_syscall else 0
        pc = m.pc + step
        if task.restart is not None:        # an interrupted call: -EINTR or run it again
            if act.flags & SA_RESTART:
                m.set_reg(m.arch.syscall_ret, task.restart)
                pc -= m.arch.syscall_insn_size
            task.restart = None
        if self.layout.needs_restorer and not act.flags & SA_RESTORER:
            raise NoRestorer(sig)           # x64_setup_rt_frame fails: force_sigsegv
        sp = m.sp
        alt = task.altstack or AltStack()
        if act.flags & SA_ONSTACK and alt.flags != SS_DISABLE and not alt.on(sp):
            sp = alt.sp + alt.size
        oldmask = task.saved_mask if task.saved_mask is not None else task.sigmask
        task.saved_mask = None
        tramp = 0 if act.flags & SA_RESTORER else sigtramp(m, self.layout)
        _frame, regs = self.layout.push(m, sp, sig, info, act, oldmask, alt, pc, tramp)
        for name, value in regs.items():
            if name != m.arch.pc:
                m.set_reg(name, value)
        m.pc = act.handler - step
        task.sigmask |= act.mask | (0 if act.flags & SA_NODEFER else sigbit(sig))
        task.sigmask &= ~UNBLOCKABLE
        if act.flags & SA_RESETHAND:
            self.actions[sig] = SigAction()

    def sigreturn(self) -> int:
        """rt_sigreturn: registers, FP state and mask from the frame; the return value is
        the restored x0 / rax (the dispatcher writes it back)."""
        m, task = self.m, self.sched.current
        pc, mask = self.layout.pop(m)
        m.pc = pc - self.sched.step
        task.sigmask = mask & ~UNBLOCKABLE
        return m.reg(m.arch.syscall_ret)

    def default_action(self, sig: int, info: bytes) -> None:
        from emu.linux.syscalls import SIGNAMES
        p, m = self.proc, self.m
        if sig in DEFAULT_STOP:
            return
        p.killed_by = sig
        code = struct.unpack_from("<i", info, 8)[0]
        if sig in (4, 7, 8, 11) and code <= 0:        # sent, not a fault: say so
            m.stderr.write(f"emu: guest killed by {SIGNAMES[sig]} it sent itself, at pc "
                           f"{m.describe(m.pc)}\n".encode())
        m.request_exit(128 + sig)

    # --- synchronous signals -------------------------------------------------------------
    def on_fault(self, fault) -> bool:
        """A guest fault as Linux's trap handlers see it: the signal goes to the faulting
        thread's handler, which starts at once with the faulting pc saved (returning
        re-runs the instruction). A file mapping's page past EOF gives SIGBUS (BUS_ADRERR).
        No handler, or the signal blocked or ignored: False, and the machine reports the
        fault as before."""
        sig, code = _fault_signal(fault)
        if _past_eof(self.m, fault.addr):
            sig, code = SIGBUS, BUS_ADRERR
        act = self.actions.get(sig, SigAction())
        task = self.sched.current
        if act.handler in (0, 1) or task.sigmask & sigbit(sig):
            return False
        m = self.m
        m.pc = fault.pc
        info = siginfo(sig, code, addr=fault.addr if fault.addr is not None else fault.pc)
        task.pending.insert(0, (sig, info))
        self.deliver(in_syscall=False)
        return not m.stopping

    # --- timers (the scheduler asks) ----------------------------------------------------
    def next_deadline(self) -> int | None:
        due = [t.deadline_ns for t in self.timers.values() if t.deadline_ns is not None]
        return min(due) if due else None

    def expire(self, now: int) -> None:
        for t in sorted(self.timers.values(), key=lambda t: t.id):
            while t.deadline_ns is not None and t.deadline_ns <= now:
                target = self.sched.tasks.get(t.tid) if t.tid else None
                info = siginfo(t.sig, SI_KERNEL if t.id < 0 else SI_TIMER,
                               timer=None if t.id < 0 else (t.id, t.value))
                self.send(t.sig, info, target)
                t.deadline_ns = t.deadline_ns + t.interval_ns if t.interval_ns else None
