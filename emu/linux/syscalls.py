"""The Linux syscalls static binaries use (shared/reference/linux-user.md), one handler per
call in an explicit table keyed by name; the arch maps numbers to names. Handlers take the
raw argument registers and return a value or -errno, never raise into the guest."""
from __future__ import annotations

import errno as E
import os
import stat as st
import struct
from typing import Callable

from unicorn import UcError

from emu.clock import FP_SHIFT
from emu.linux.fs import (AT_FDCWD, O_ACCMODE, O_NONBLOCK, O_RDWR, O_WRONLY, PATH_MAX, FsError,
                          OpenFile, ReadPastDeadline)
from emu.linux.pipe import Pipe, WouldBlockForever
from emu.linux.tasks import ERESTARTNOINTR, Deadlock, FutexWait, Scheduler
from emu.linux.unistd_const import SYSCALL_NAMES
from emu.linux.process import (MMAP_BASE, MMAP_MIN_ADDR, STACK_TOP, STACK_SIZE, LinuxProcess,
                               stop_as_limit)
from emu.memory import PAGE, PROT_READ, PROT_WRITE, page_up
from emu.linux import futex
from emu.linux import signal as sigact
from emu.linux import task_snapshot
from emu.uaccess import (UserFault, access_ok, copy_from_user, copy_to_user, put_user,
                         strncpy_from_user)

SIGNAMES = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
            7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
            13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM"}
AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW = 0x1000, 0x100
MAP_FIXED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x10, 0x20, 0x100000
MREMAP_MAYMOVE = 1
TCGETS, TIOCGWINSZ = 0x5401, 0x5413
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
O_CLOEXEC = 0o2000000
_SETFL_MASK = 0o2000 | O_NONBLOCK      # O_APPEND | O_NONBLOCK (O_ASYNC, O_DIRECT... ignored)
ARCH_SET_FS, ARCH_GET_FS = 0x1002, 0x1003
PR_SET_NAME, PR_GET_NAME = 15, 16
NOFILE = 1024                       # RLIMIT_NOFILE soft limit reported by prlimit64
MAX_RW_COUNT = 0x7FFFF000           # INT_MAX & PAGE_MASK: the most one read/write transfers
UIO_MAXIOV = 1024
IO_CHUNK = 64 << 10                 # host bytes held at once while streaming a guest's I/O
READ_MAX = 1 << 20                  # one read returns at most this much (a short read)
MAP_SHARED, MAP_TYPE = 0x01, 0x0F
SEEK_DATA, SEEK_HOLE = 3, 4

Handler = Callable[..., int]
SYSCALLS: dict[str, Handler] = {}


def syscall(*names: str):
    def register(fn: Handler) -> Handler:
        for name in names:
            SYSCALLS[name] = fn
        return fn
    return register


def s64(x: int) -> int:
    return x - (1 << 64) if x & (1 << 63) else x


def s32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & (1 << 31) else x


class SyscallDispatcher:
    """Reads the arch's syscall registers, calls the handler, writes the result."""

    def __init__(self, proc: LinuxProcess) -> None:
        m = proc.machine
        self.proc, self.m = proc, m
        names = {**SYSCALL_NAMES.get(m.arch.name, {}), **m.arch.syscall_names}
        self.table = {nr: (name, SYSCALLS[name]) for nr, name in names.items() if name in SYSCALLS}
        self.names = names
        self.nr_id = m.arch.reg_id(m.arch.syscall_nr)
        self.arg_ids = [m.arch.reg_id(r) for r in m.arch.syscall_args]
        self.ret_id = m.arch.reg_id(m.arch.syscall_ret)
        self.counts: dict[str, int] = {}
        m.syscall_handler = self
        proc.dispatcher = self
        proc.sched = Scheduler(m, self.ret_id, proc.creds.pid, proc.seed, proc.nr_cpus)
        proc.signals = sigact.Signals(proc)
        m.layers[task_snapshot.LAYER] = proc.sched      # snapshots keep the tasks

    def __call__(self) -> None:
        regs = self.m.regs
        nr = regs.read(self.nr_id)
        args = [regs.read(i) for i in self.arg_ids]
        name, handler = self.table.get(nr, (self.names.get(nr, f"syscall_{nr}"), None))
        self.counts[name] = self.counts.get(name, 0) + 1
        cur = self.proc.sched.current
        cur.orig_ret, cur.restart = regs.read(self.ret_id), None
        self.proc.dispatcher_name = name
        if handler is None:
            ret = -E.ENOSYS
        else:
            try:
                ret = handler(self.proc, *args)
            except FsError as e:
                ret = -e.errno
            except UserFault:
                ret = -E.EFAULT
            except BrokenPipeError:
                raise                   # our own stdout closed: the CLI exits 141 (SIGPIPE)
            except OSError as e:        # a host call on the guest's behalf failed: its errno
                ret = -(e.errno or E.EIO)
            except OverflowError:       # a register value no host call accepts
                ret = -E.EINVAL
            except WouldBlockForever as e:
                ret = self._would_block(name, e)
            except ReadPastDeadline:
                ret = -E.EINTR
                stop_as_limit(self.m, f"wall-clock limit reached while the guest waited in "
                                      f"{name} at pc {self.m.describe(self.m.pc)}")
        if name in _PIPE_EVENTS and ret >= 0:
            self._wake_pipe_waiters()
        if ret == -E.EPIPE and name in _WRITES:
            _signal_self(self.proc, SIGPIPE)    # a write with no reader: SIGPIPE, then EPIPE
        if self.proc.strace:
            self._strace_len = args[2]      # the byte count of write-like calls
            self._strace(name, args, ret)
        if not self.m.stopping:
            regs.write(self.ret_id, ret)
            self._reschedule()

    def _would_block(self, name: str, e: WouldBlockForever) -> int:
        """A pipe read that must wait: with other threads alive the task sleeps until a
        pipe changes, then runs the call again (a signal makes it ERESTARTSYS: SA_RESTART
        decides); alone, nothing could ever wake it: the run ends as a limit."""
        sched = self.proc.sched
        if e.restartable and len(sched.live()) > 1:
            sched.block(FutexWait(PIPE_WAIT_KEY, restart=True))
            return -ERESTARTNOINTR
        stop_as_limit(self.m, f"guest blocked for ever in {name}: {e.what} "
                              f"(at pc {self.m.describe(self.m.pc)})")
        return -E.EINTR

    def _wake_pipe_waiters(self) -> None:
        sched = self.proc.sched
        for t in sched.waiters(PIPE_WAIT_KEY):      # first come first, as a wait queue
            sched.wake(t, -ERESTARTNOINTR)

    def _reschedule(self) -> None:
        """Switch tasks if the call blocked, yielded or used up the quantum."""
        sched = self.proc.sched
        sched.poll_timers()
        if sched.need_resched:
            try:
                sched.schedule()
            except Deadlock as e:
                stop_as_limit(self.m, f"deadlock: {e} (at pc {self.m.describe(self.m.pc)})")
                return
        if sched.current.pending or self.proc.signals.shared:
            self.proc.signals.deliver(in_syscall=True)

    def _strace(self, name: str, args: list[int], ret: int) -> None:
        """One line per call as strace prints it: `openat(AT_FDCWD, "/etc/x", 0) = -1 ENOENT
        (No such file or directory)`."""
        kinds = _STRACE_ARGS.get(name, "xxx")
        if name in ("open", "openat") and not args[kinds.index("O")] & 0o20100100:
            kinds = kinds[:-1]           # strace shows the mode only with O_CREAT / O_TMPFILE
        shown = ", ".join(self._strace_arg(k, a, ret) for k, a in zip(kinds, args))
        if name in ("exit", "exit_group"):
            res = "?"
        elif -4096 < ret < 0:
            res = f"-1 {E.errorcode.get(-ret, str(-ret))} ({os.strerror(-ret)})"
        else:
            res = f"{ret:#x}" if ret > 0xFFFF else str(ret)
        sched = self.proc.sched
        who = f"[pid {sched.current.tid:5d}] " if len(sched.tasks) > 1 else ""   # strace -f
        self.m.stderr.write(f"{who}{name}({shown}) = {res}\n".encode())

    def _strace_arg(self, kind: str, value: int, ret: int) -> str:
        decode = _STRACE_DECODERS.get(kind)
        if decode is not None:
            return decode(value)
        if kind == "d":
            return str(s32(value))
        if kind == "f":
            return "AT_FDCWD" if s32(value) == AT_FDCWD else str(s32(value))
        if kind == "u":
            return str(value)
        if kind == "s" and value:
            try:
                text = self.m.memory.read_cstr(value, 4096)
            except Exception:       # an unmapped path: the call itself answered EFAULT
                return f"{value:#x}"
            return _quote(text, limit=4096)        # strace prints paths whole
        if kind in "bo" and value:              # b: buffer of the call's size, o: of its result
            n = self._strace_len if kind == "b" else max(ret, 0)
            data = self.m.memory.read_safe(value, min(n, _STRACE_STR))
            if data is not None:
                return _quote(data) + ("..." if n > _STRACE_STR else "")
        if value == 0:
            return "NULL" if kind in "sbo" else "0"
        return f"{value:#x}"


def _bits(names: dict[int, str], zero: str = "0"):
    """A decoder of a flag word as strace prints it: NAME|NAME|0x10 for unknown bits."""
    def decode(value: int) -> str:
        value &= 0xFFFFFFFF
        parts, rest = [], value
        for bit, name in names.items():
            if rest & bit == bit and bit:
                parts.append(name)
                rest &= ~bit
        if rest:
            parts.append(f"{rest:#x}")
        return "|".join(parts) or zero
    return decode


def _choice(names: dict[int, str], mask: int = 0xFFFFFFFF, rest=None):
    def decode(value: int) -> str:
        value &= 0xFFFFFFFF
        name = names.get(value & mask, str(s32(value & mask)))
        return name + (rest(value & ~mask) if rest else "")
    return decode


def _open_flags(value: int) -> str:
    acc = ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[value & 3]
    more = _bits(_O_FLAGS, "")(value & ~3)
    return acc + ("|" + more if more else "")


_O_FLAGS = {0o100: "O_CREAT", 0o200: "O_EXCL", 0o400: "O_NOCTTY", 0o1000: "O_TRUNC",
            0o2000: "O_APPEND", 0o4000: "O_NONBLOCK", 0o10000: "O_DSYNC", 0o20000: "O_ASYNC",
            0o40000: "O_DIRECT", 0o200000: "O_DIRECTORY", 0o400000: "O_NOFOLLOW",
            0o1000000: "O_NOATIME", 0o2000000: "O_CLOEXEC", 0o10000000: "O_PATH",
            0o20200000: "O_TMPFILE", 0o4010000: "O_SYNC", 0o100000: "O_LARGEFILE"}
_PROT = {1: "PROT_READ", 2: "PROT_WRITE", 4: "PROT_EXEC", 0x1000000: "PROT_GROWSDOWN"}
_MAP = {0x10: "MAP_FIXED", 0x20: "MAP_ANONYMOUS", 0x100: "MAP_GROWSDOWN",
        0x800: "MAP_DENYWRITE", 0x1000: "MAP_EXECUTABLE", 0x2000: "MAP_LOCKED",
        0x4000: "MAP_NORESERVE", 0x8000: "MAP_POPULATE", 0x10000: "MAP_NONBLOCK",
        0x20000: "MAP_STACK", 0x40000: "MAP_HUGETLB", 0x80000: "MAP_SYNC",
        0x100000: "MAP_FIXED_NOREPLACE"}
_MAP_TYPE = {0: "0", 1: "MAP_SHARED", 2: "MAP_PRIVATE", 3: "MAP_SHARED_VALIDATE"}
_AT = {0x100: "AT_SYMLINK_NOFOLLOW", 0x200: "AT_REMOVEDIR", 0x400: "AT_SYMLINK_FOLLOW",
       0x800: "AT_NO_AUTOMOUNT", 0x1000: "AT_EMPTY_PATH", 0x2000: "AT_STATX_FORCE_SYNC",
       0x4000: "AT_STATX_DONT_SYNC"}
_CLOCK = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 2: "CLOCK_PROCESS_CPUTIME_ID",
          3: "CLOCK_THREAD_CPUTIME_ID", 4: "CLOCK_MONOTONIC_RAW", 5: "CLOCK_REALTIME_COARSE",
          6: "CLOCK_MONOTONIC_COARSE", 7: "CLOCK_BOOTTIME", 8: "CLOCK_REALTIME_ALARM",
          9: "CLOCK_BOOTTIME_ALARM", 11: "CLOCK_TAI"}
_FCNTL = {0: "F_DUPFD", 1: "F_GETFD", 2: "F_SETFD", 3: "F_GETFL", 4: "F_SETFL", 5: "F_GETLK",
          6: "F_SETLK", 7: "F_SETLKW", 8: "F_SETOWN", 9: "F_GETOWN", 1024: "F_SETLEASE",
          1025: "F_GETLEASE", 1030: "F_DUPFD_CLOEXEC", 1031: "F_SETPIPE_SZ",
          1032: "F_GETPIPE_SZ", 1033: "F_ADD_SEALS", 1034: "F_GET_SEALS"}
_FUTEX = {0: "FUTEX_WAIT", 1: "FUTEX_WAKE", 2: "FUTEX_FD", 3: "FUTEX_REQUEUE",
          4: "FUTEX_CMP_REQUEUE", 5: "FUTEX_WAKE_OP", 6: "FUTEX_LOCK_PI", 7: "FUTEX_UNLOCK_PI",
          8: "FUTEX_TRYLOCK_PI", 9: "FUTEX_WAIT_BITSET", 10: "FUTEX_WAKE_BITSET"}
_FUTEX_FLAGS = {128: "_PRIVATE", 256: "_CLOCK_REALTIME"}
_SIGHOW = {0: "SIG_BLOCK", 1: "SIG_UNBLOCK", 2: "SIG_SETMASK"}
_STRACE_DECODERS = {
    "O": _open_flags, "P": _bits(_PROT, "PROT_NONE"),
    "M": lambda v: "|".join(x for x in (_MAP_TYPE.get(v & 0xF, f"{v & 0xF:#x}"),
                                        _bits(_MAP, "")(v & ~0xF)) if x),
    "A": _bits(_AT), "C": _choice(_CLOCK), "F": _choice(_FCNTL),
    "X": _choice(_FUTEX, 0x7F, lambda rest: "".join(n for b, n in _FUTEX_FLAGS.items() if rest & b)),
    "m": lambda v: f"{v & 0o7777:#o}", "p": lambda v: f"{v:#x}" if v else "NULL", "S": lambda v: SIGNAMES.get(v, str(s32(v))),
    "H": _choice(_SIGHOW),
    "Y": _choice({0x1001: "ARCH_SET_GS", 0x1002: "ARCH_SET_FS", 0x1003: "ARCH_GET_FS",
                  0x1004: "ARCH_GET_GS"}),
}


_WRITES = {"write", "writev", "pwrite64", "pwritev", "sendfile"}
# Calls after which a pipe may have data, room or no writer left: its sleeping readers retry.
_PIPE_EVENTS = _WRITES | {"close", "close_range", "dup2", "dup3", "read", "readv"}
PIPE_WAIT_KEY = -2              # the wait of a pipe reader (futex keys are addresses, >= 0)
_STRACE_STR = 32                        # strace's default -s


def _quote(data: bytes, limit: int = _STRACE_STR) -> str:
    esc = {9: "\\t", 10: "\\n", 13: "\\r", 34: '\\"', 92: "\\\\"}
    return '"' + "".join(esc.get(c) or (chr(c) if 32 <= c < 127 else f"\\x{c:02x}")
                         for c in data[:limit]) + '"'


# Argument kinds: d signed int/fd, f dirfd, u unsigned, x hex, s C string, b buffer of the
# byte count that follows it, o buffer filled by the call (its result is the length).
_STRACE_ARGS = dict(
    exit_group="d", exit="d", brk="x", close="d", write="dbu", read="dou", pread64="doud",
    pwrite64="dbux", writev="dxd", readv="dxd", mmap="xuPMdx", munmap="xu", mprotect="xuP",
    mremap="xuux", openat="fsOm", open="sOm", uname="x", getpid="", getuid="", geteuid="",
    getgid="", getegid="", gettid="", getppid="", getpgrp="", set_tid_address="x",
    arch_prctl="Yx", rseq="xuxx", set_robust_list="xu", prlimit64="ddxx", getrandom="xux",
    readlinkat="fsxu", readlink="sxu", newfstatat="fsxA", fstat="dx", stat="sx", lstat="sx",
    statx="fsAxx", ioctl="dxx", fcntl="dFx", dup="d", dup2="dd", dup3="ddO", lseek="ddd",
    faccessat="fsx", faccessat2="fsxA", access="sx", chdir="s", fchdir="d", getcwd="xu",
    getdents64="dxu", sendfile="ddxu", pipe2="xO", clock_gettime="Cp", gettimeofday="xx",
    clock_nanosleep="Cdxx", nanosleep="xx", rt_sigaction="Sxxu", rt_sigprocmask="Hxxu",
    prctl="dxxxx", kill="dS", tgkill="ddS", tkill="dS", sysinfo="x", getrusage="dx",
    umask="m", poll="xud", ppoll="xuxxu", futex="xXux", madvise="xud", mkdirat="fsm",
    unlinkat="fsA", getpgid="d", setpgid="dd", sched_getaffinity="dux", sigaltstack="xx", getcpu="xxx",
    close_range="uud", clock_getres="Cp", time="x", fchmodat="fsm", chmod="sm", fchmod="dm",
    fchownat="fsddA", chown="sdd", fchown="ddd", utimensat="fsxA", pipe="x",
)


# --- guest memory helpers: every copy goes through emu.uaccess ---------------------------
def rd(p: LinuxProcess, addr: int, n: int) -> bytes:
    return copy_from_user(p.machine.memory, addr, n)


def wr(p: LinuxProcess, addr: int, data: bytes) -> None:
    copy_to_user(p.machine.memory, addr, data)


def cstr(p: LinuxProcess, addr: int) -> str:
    """A path argument (getname): EFAULT, ENAMETOOLONG at PATH_MAX, else the bytes as an
    os.fsdecode'd str (host calls encode them back byte for byte)."""
    if addr == 0:
        raise UserFault(0, False, False)
    raw = strncpy_from_user(p.machine.memory, addr, PATH_MAX)
    if len(raw) >= PATH_MAX:
        raise FsError(E.ENAMETOOLONG)
    return os.fsdecode(raw)


def deadline(p: LinuxProcess) -> float | None:
    """When a blocking host read must give up: the run's --timeout deadline."""
    return getattr(p.machine, "deadline", None) or p.deadline


def base_dir(p: LinuxProcess, dirfd: int) -> str | None:
    dirfd = s32(dirfd)
    if dirfd == AT_FDCWD:
        return None
    f = p.fds.get(dirfd)
    if f.kind != "dir":
        raise FsError(E.ENOTDIR)
    return f.path


# --- process and identity ------------------------------------------------------------------
@syscall("exit_group")
def sys_exit_group(p, code, *_):
    p.machine.request_exit(code & 0xFF)
    return 0


@syscall("getpid", "getpgrp")
def sys_getpid(p, *_):
    return p.creds.pid


@syscall("getpgid")
def sys_getpgid(p, *_):
    return p.creds.pid


@syscall("setpgid", "madvise", "fsync")
def sys_ok(p, *_):
    return 0


@syscall("getppid")
def sys_getppid(p, *_):
    return p.creds.ppid


@syscall("getuid", "geteuid")
def sys_getuid(p, *_):
    return p.creds.uid


@syscall("getgid", "getegid")
def sys_getgid(p, *_):
    return p.creds.gid


@syscall("rseq", "socket")
def sys_unsupported(p, *_):
    return -E.ENOSYS


_NOT_YET = {"fork": "processes", "vfork": "processes", "execve": "processes",
            "execveat": "processes"}


@syscall(*_NOT_YET)
def sys_not_yet(p, *_):
    """One line on stderr the first time each call is made, then ENOSYS, which glibc's
    fork/pthread_create/posix_spawn report as failures the program can handle."""
    name = p.dispatcher_name
    warn_once(p, name, f"emu: {name}: {_NOT_YET[name]} are not supported yet\n")
    return -E.ENOSYS


def warn_once(p, key: str, line: str) -> None:
    if key not in p.warned:
        p.warned.add(key)
        p.machine.stderr.write(line.encode())


@syscall("wait4", "waitid")
def sys_wait4(p, *_):
    return -E.ECHILD                    # no child can exist


@syscall("uname")
def sys_uname(p, buf, *_):
    fields = ("Linux", "kprobe-emu", "6.12.0-kprobe-emu", "#1 SMP PREEMPT_DYNAMIC",
              p.machine.arch.platform, "(none)")
    wr(p, buf, b"".join(f.encode().ljust(65, b"\0") for f in fields))
    return 0


@syscall("arch_prctl")
def sys_arch_prctl(p, code, addr, *_):
    if code == ARCH_SET_FS:
        p.machine.arch.set_tls(p.machine, addr)
        return 0
    if code == ARCH_GET_FS:
        wr(p, addr, struct.pack("<Q", p.machine.reg("fs_base")))
        return 0
    return -E.EINVAL


@syscall("prctl")
def sys_prctl(p, option, arg2, *_):
    if option == PR_SET_NAME:
        p.comm = rd(p, arg2, 16).split(b"\0")[0][:15]
    elif option == PR_GET_NAME:
        wr(p, arg2, p.comm.ljust(16, b"\0"))
    return 0


@syscall("prlimit64")
def sys_prlimit64(p, pid, resource, new, old, *_):
    return _rlimit(p, resource, old)


@syscall("getrlimit")
def sys_getrlimit(p, resource, old, *_):
    return _rlimit(p, resource, old)


def _rlimit(p, resource: int, old: int) -> int:
    inf = 0xFFFFFFFFFFFFFFFF
    limits = {3: (STACK_SIZE, inf), 7: (1024, 4096)}        # RLIMIT_STACK, RLIMIT_NOFILE
    if old:
        wr(p, old, struct.pack("<QQ", *limits.get(resource, (inf, inf))))
    return 0


@syscall("getrandom")
def sys_getrandom(p, buf, n, flags, *_):
    n = min(n, 1 << 20)
    wr(p, buf, p.rng.randbytes(n))
    return n


@syscall("sysinfo")
def sys_sysinfo(p, buf, *_):
    up = p.machine.clock.monotonic_ns() // 1_000_000_000
    info = struct.pack("<q3Q6QHHxxxxQQI", up, 0, 0, 0, 1 << 30, 1 << 29, 0, 0, 0, 0, 1, 0, 0, 0, 1)
    wr(p, buf, info.ljust(112, b"\0"))
    return 0


@syscall("getrusage")
def sys_getrusage(p, who, buf, *_):
    us = p.machine.clock.monotonic_ns() // 1000
    wr(p, buf, struct.pack("<qq", us // 1_000_000, us % 1_000_000).ljust(144, b"\0"))
    return 0


@syscall("umask")
def sys_umask(p, mask, *_):
    old, p.umask = p.umask, mask & 0o777
    return old


# --- signals (emu/linux/signal.py delivers them) --------------------------------------------
@syscall("rt_sigaction")
def sys_rt_sigaction(p, sig, act, oldact, sigsetsize, *_):
    if not 1 <= sig <= 64 or sigsetsize != 8:
        return -E.EINVAL
    if act and sig in (SIGKILL, SIGSTOP):
        return -E.EINVAL
    sigs = p.signals
    new = sigact.SigAction.unpack(rd(p, act, 32)) if act else None
    if oldact:
        wr(p, oldact, sigs.action(sig).pack())
    if new is not None:
        new.mask &= ~sigact.UNBLOCKABLE
        sigs.actions[sig] = new
        p.sigactions[sig] = new.pack()
        if sigs.ignored(sig):                    # pending ones are discarded (POSIX)
            for t in p.sched.tasks.values():
                t.pending = [(s_, i) for s_, i in t.pending if s_ != sig]
            sigs.shared = [(s_, i) for s_, i in sigs.shared if s_ != sig]
    return 0


@syscall("rt_sigprocmask")
def sys_rt_sigprocmask(p, how, nset, oset, sigsetsize, *_):
    if sigsetsize != 8:
        return -E.EINVAL
    task = p.sched.current
    mask = struct.unpack("<Q", rd(p, nset, 8))[0] if nset else None
    if mask is not None and how not in (0, 1, 2):
        return -E.EINVAL
    if oset:
        wr(p, oset, struct.pack("<Q", task.sigmask))
    if mask is not None:
        task.sigmask = {0: task.sigmask | mask, 1: task.sigmask & ~mask, 2: mask}[how]
        task.sigmask &= ~sigact.UNBLOCKABLE
    p.sigmask = task.sigmask
    return 0


@syscall("rt_sigpending")
def sys_rt_sigpending(p, uset, sigsetsize, *_):
    if sigsetsize > 8:
        return -E.EINVAL
    pend = 0
    for s_, _i in [*p.sched.current.pending, *p.signals.shared]:
        pend |= sigact.sigbit(s_)
    wr(p, uset, struct.pack("<Q", pend & p.sched.current.sigmask)[:sigsetsize])
    return 0


@syscall("sigaltstack")
def sys_sigaltstack(p, ss, old, *_):
    task = p.sched.current
    cur = task.altstack or sigact.AltStack()
    on = cur.on(p.machine.sp)
    if old:
        wr(p, old, struct.pack("<QiiQ", cur.sp, cur.flags | (sigact.SS_ONSTACK if on else 0), 0,
                               cur.size))
    if ss:
        sp, flags, _pad, size = struct.unpack("<QiiQ", rd(p, ss, 24))
        if on:
            return -E.EPERM
        if flags not in (0, sigact.SS_ONSTACK, sigact.SS_DISABLE):
            return -E.EINVAL
        if flags == sigact.SS_DISABLE:
            task.altstack = sigact.AltStack()
        elif size < sigact.MINSIGSTKSZ:
            return -E.ENOMEM
        else:
            task.altstack = sigact.AltStack(sp, size, 0)
    return 0


@syscall("kill")
def sys_kill(p, pid, sig, *_):
    if s32(pid) not in (0, -1, p.creds.pid):
        return -E.ESRCH
    return _send(p, sig, sigact.SI_USER, None)


@syscall("tkill")
def sys_tkill(p, tid, sig, *_):
    return _send_thread(p, s32(tid), sig)


@syscall("tgkill")
def sys_tgkill(p, tgid, tid, sig, *_):
    if s32(tgid) != p.creds.pid:
        return -E.ESRCH
    return _send_thread(p, s32(tid), sig)


def _send_thread(p, tid: int, sig: int) -> int:
    task = p.sched.tasks.get(tid)
    if tid <= 0:
        return -E.EINVAL
    if task is None or task.state == "exited":
        return -E.ESRCH
    return _send(p, sig, sigact.SI_TKILL, task)


def _send(p, sig: int, code: int, task) -> int:
    if not 0 <= sig <= 64:
        return -E.EINVAL
    if sig:
        p.signals.send(sig, sigact.siginfo(sig, code, p.creds.pid, p.creds.uid), task)
    return 0


@syscall("rt_sigreturn")
def sys_rt_sigreturn(p, *_):
    try:
        return p.signals.sigreturn()
    except UserFault:                   # a bad frame: SIGSEGV, as Linux forces
        p.signals.default_action(SIGSEGV, sigact.siginfo(SIGSEGV, sigact.SI_KERNEL))
        return 0


@syscall("pause")
def sys_pause(p, *_):
    p.sched.block(FutexWait(-1, 0))
    return -E.EINTR


@syscall("rt_sigsuspend")
def sys_rt_sigsuspend(p, uset, sigsetsize, *_):
    if sigsetsize != 8:
        return -E.EINVAL
    task = p.sched.current
    (mask,) = struct.unpack("<Q", rd(p, uset, 8))
    task.saved_mask, task.sigmask = task.sigmask, mask & ~sigact.UNBLOCKABLE
    if not p.signals.deliverable(task):
        p.sched.block(FutexWait(-1, 0))
    return -E.EINTR


SIG_DFL, SIG_IGN = 0, 1
SIGKILL, SIGSTOP, SIGPIPE, SIGSEGV = 9, 19, 13, 11


def _signal_self(p, sig: int) -> int:
    """A signal the kernel sends the running thread (SIGPIPE on a write with no reader)."""
    return _send(p, sig, sigact.SI_KERNEL, p.sched.current)


# --- timers: alarm, setitimer, timer_create on the modelled clock -------------------------
ITIMER_REAL, SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID = 0, 0, 1, 4
ALARM_ID = -1                   # ITIMER_REAL and alarm share one timer
MAX_TIMERS = 64


def _set_timer(p, timer_id: int, value_ns: int, interval_ns: int, absolute: bool = False) -> tuple[int, int]:
    """Arm (value > 0) or disarm a timer; returns the old (remaining, interval) in ns."""
    sigs, now = p.signals, p.machine.clock.monotonic_ns()
    t = sigs.timers[timer_id]
    old = (max(0, t.deadline_ns - now) if t.deadline_ns is not None else 0, t.interval_ns)
    if value_ns:
        t.deadline_ns = value_ns if absolute else now + value_ns
    else:
        t.deadline_ns = None
    t.interval_ns = interval_ns
    p.sched.timers_changed()
    return old


def _alarm_timer(p):
    return p.signals.timers.setdefault(ALARM_ID, sigact.Timer(ALARM_ID, sigact.SIGALRM))


@syscall("alarm")
def sys_alarm(p, secs, *_):
    _alarm_timer(p)
    left, _iv = _set_timer(p, ALARM_ID, (secs & 0xFFFFFFFF) * 1_000_000_000, 0)
    return -(-left // 1_000_000_000) if left else 0


def _timeval_ns(raw: bytes) -> tuple[int, int]:
    isec, iusec, vsec, vusec = struct.unpack("<qqqq", raw)
    if min(isec, iusec, vsec, vusec) < 0 or max(iusec, vusec) >= 1_000_000:
        raise FsError(E.EINVAL)
    return vsec * 1_000_000_000 + vusec * 1000, isec * 1_000_000_000 + iusec * 1000


def _timeval(value_ns: int, interval_ns: int) -> bytes:
    def tv(ns: int) -> tuple[int, int]:
        us = -(-ns // 1000)
        return us // 1_000_000, us % 1_000_000
    return struct.pack("<qqqq", *tv(interval_ns), *tv(value_ns))


@syscall("setitimer")
def sys_setitimer(p, which, new, old, *_):
    if which != ITIMER_REAL:
        return -E.EINVAL             # the CPU-time timers are not modelled
    _alarm_timer(p)
    value, interval = _timeval_ns(rd(p, new, 32)) if new else (0, 0)
    left, iv = _set_timer(p, ALARM_ID, value, interval)
    if old:
        wr(p, old, _timeval(left, iv))
    return 0


@syscall("getitimer")
def sys_getitimer(p, which, cur, *_):
    if which != ITIMER_REAL:
        return -E.EINVAL
    t, now = _alarm_timer(p), p.machine.clock.monotonic_ns()
    wr(p, cur, _timeval(max(0, t.deadline_ns - now) if t.deadline_ns is not None else 0,
                        t.interval_ns))
    return 0


@syscall("timer_create")
def sys_timer_create(p, clk, sevp, tid_out, *_):
    if s32(clk) not in _CLOCKS:
        return -E.EINVAL
    sigs = p.signals
    if len(sigs.timers) >= MAX_TIMERS:
        return -E.EAGAIN
    value, sig, notify, target = 0, sigact.SIGALRM, SIGEV_SIGNAL, 0
    if sevp:
        value, sig, notify, target = struct.unpack("<Qiii", rd(p, sevp, 20))
    if notify not in (SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID) or \
            notify != SIGEV_NONE and not 1 <= sig <= 64:
        return -E.EINVAL
    if notify == SIGEV_THREAD_ID and target not in p.sched.tasks:
        return -E.EINVAL
    timer_id = next(i for i in range(MAX_TIMERS) if i not in sigs.timers)
    sigs.timers[timer_id] = sigact.Timer(timer_id, 0 if notify == SIGEV_NONE else sig,
                                         value=value, tid=target if notify == SIGEV_THREAD_ID else 0)
    wr(p, tid_out, struct.pack("<i", timer_id))
    return 0


def _user_timer(p, timer_id: int):
    t = p.signals.timers.get(s32(timer_id))
    if t is None or t.id < 0:
        raise FsError(E.EINVAL)
    return t


@syscall("timer_settime")
def sys_timer_settime(p, timer_id, flags, new, old, *_):
    t = _user_timer(p, timer_id)
    isec, insec, vsec, vnsec = struct.unpack("<qqqq", rd(p, new, 32))
    if min(isec, insec, vsec, vnsec) < 0 or max(insec, vnsec) >= 1_000_000_000:
        return -E.EINVAL
    left, iv = _set_timer(p, t.id, vsec * 1_000_000_000 + vnsec, isec * 1_000_000_000 + insec,
                          absolute=bool(flags & TIMER_ABSTIME))
    if old:
        wr(p, old, _timespec(iv) + _timespec(left))
    return 0


@syscall("timer_gettime")
def sys_timer_gettime(p, timer_id, cur, *_):
    t, now = _user_timer(p, timer_id), p.machine.clock.monotonic_ns()
    left = max(0, t.deadline_ns - now) if t.deadline_ns is not None else 0
    wr(p, cur, _timespec(t.interval_ns) + _timespec(left))
    return 0


@syscall("timer_getoverrun")
def sys_timer_getoverrun(p, timer_id, *_):
    _user_timer(p, timer_id)
    return 0


@syscall("timer_delete")
def sys_timer_delete(p, timer_id, *_):
    t = _user_timer(p, timer_id)
    del p.signals.timers[t.id]
    p.sched.timers_changed()
    return 0


# --- threads (emu/linux/tasks.py schedules them) --------------------------------------------
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_VFORK, CLONE_THREAD, CLONE_SETTLS = 0x4000, 0x10000, 0x80000
CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x100000, 0x200000, 0x1000000
_THREAD_FLAGS = CLONE_VM | CLONE_SIGHAND | CLONE_THREAD
MAX_THREADS = 256                   # RLIMIT_NPROC-like cap: each task holds a CPU context


@syscall("clone")
def sys_clone(p, flags, newsp, ptid, a3, a4, *_):
    tls_i, ctid_i = p.machine.arch.clone_tls_ctid      # the arch's clone argument order
    rest = (ptid, a3, a4)
    return do_clone(p, flags, newsp, ptid, rest[ctid_i], rest[tls_i])


@syscall("clone3")
def sys_clone3(p, uargs, size, *_):
    if size < 64 or size > PAGE:
        return -E.EINVAL
    flags, _pidfd, ctid, ptid, _exit_sig, stack, stack_size, tls = struct.unpack(
        "<8Q", rd(p, uargs, 64))
    if (stack == 0) != (stack_size == 0):
        return -E.EINVAL
    return do_clone(p, flags, stack + stack_size if stack else 0, ptid, ctid, tls)


def do_clone(p, flags: int, newsp: int, ptid: int, ctid: int, tls: int) -> int:
    """A new thread of this process (pthread_create's flags). A new process (fork, vfork,
    posix_spawn) is refused with ENOSYS and a one-time note."""
    if flags & _THREAD_FLAGS != _THREAD_FLAGS or flags & CLONE_VFORK:
        warn_once(p, "fork", "emu: clone: new processes (fork, vfork) are not supported yet\n")
        return -E.ENOSYS
    sched = p.sched
    if len(sched.live()) >= MAX_THREADS:
        return -E.EAGAIN
    m, arch = p.machine, p.machine.arch
    mem = m.memory
    tid = sched.next_tid
    if flags & CLONE_PARENT_SETTID:
        put_user(mem, ptid, tid, 4)
    if flags & CLONE_CHILD_SETTID:
        put_user(mem, ctid, tid, 4)
    parent = m.uc.context_save()
    m.regs.write(p.dispatcher.ret_id, 0)
    if newsp:
        m.sp = newsp
    if flags & CLONE_SETTLS:
        arch.set_tls(m, tls)
    child = sched.new_task(m.uc.context_save(), m.pc + sched.step)
    m.uc.context_restore(parent)
    if flags & CLONE_CHILD_CLEARTID:
        child.clear_child_tid = ctid
    return child.tid


@syscall("gettid")
def sys_gettid(p, *_):
    return p.sched.current.tid


@syscall("set_tid_address")
def sys_set_tid_address(p, addr, *_):
    p.sched.current.clear_child_tid = addr
    return p.sched.current.tid


@syscall("set_robust_list")
def sys_set_robust_list(p, head, length, *_):
    if length != 24:                    # sizeof(struct robust_list_head)
        return -E.EINVAL
    cur = p.sched.current
    cur.robust_list, cur.robust_len = head, length
    return 0


@syscall("get_robust_list")
def sys_get_robust_list(p, tid, head_ptr, len_ptr, *_):
    sched = p.sched
    task = sched.current if tid == 0 else sched.tasks.get(s32(tid))
    if task is None:
        return -E.ESRCH
    put_user(p.machine.memory, head_ptr, task.robust_list)
    put_user(p.machine.memory, len_ptr, task.robust_len)
    return 0


@syscall("exit")
def sys_exit(p, code, *_):
    """One thread ends: the futexes on its robust list are marked FUTEX_OWNER_DIED, its
    clear_child_tid word is zeroed and woken (pthread_join waits on it); the last thread's
    exit ends the process with its code."""
    sched = p.sched
    cur = sched.current
    futex.exit_robust_list(sched, p.machine.memory, cur)     # before clear_child_tid (mm_release)
    if cur.clear_child_tid:
        try:
            put_user(p.machine.memory, cur.clear_child_tid, 0, 4)
            futex.futex_wake(sched, cur.clear_child_tid, 1)
        except UserFault:
            pass
    sched.exit_current()
    if not sched.live():
        p.machine.request_exit(code & 0xFF)
        sched.need_resched = False
    return 0


@syscall("sched_yield")
def sys_sched_yield(p, *_):
    p.sched.need_resched = True
    return 0


@syscall("sched_getaffinity")
def sys_sched_getaffinity(p, pid, size, mask, *_):
    if size < 8 or size & 7:
        return -E.EINVAL
    if pid and s32(pid) not in p.sched.tasks:
        return -E.ESRCH
    wr(p, mask, struct.pack("<Q", (1 << p.sched.nr_cpus) - 1))    # every CPU (nr_cpu_ids <= 64)
    return 8


@syscall("getcpu")
def sys_getcpu(p, cpu, node, *_):
    if cpu:
        wr(p, cpu, struct.pack("<I", p.sched.current.cpu))
    if node:
        wr(p, node, struct.pack("<I", 0))
    return 0


@syscall("futex")
def sys_futex(p, uaddr, op, val, utime, uaddr2, val3, *_):
    cmd = op & 0x7F
    mem, sched = p.machine.memory, p.sched
    if uaddr & 3:
        return -E.EINVAL
    # get_futex_key: a shared futex must be a mapped page, a private one only in range
    if uaddr >= mem.task_size or not (op & futex.FUTEX_PRIVATE_FLAG or access_ok(mem, uaddr, 4)):
        return -E.EFAULT
    if op & futex.FUTEX_CLOCK_REALTIME and cmd not in (futex.FUTEX_WAIT, futex.FUTEX_WAIT_BITSET):
        return -E.ENOSYS
    if cmd in (futex.FUTEX_WAIT, futex.FUTEX_WAIT_BITSET):
        bitset = val3 & 0xFFFFFFFF if cmd == futex.FUTEX_WAIT_BITSET else futex.FUTEX_BITSET_MATCH_ANY
        due = _futex_deadline(p, utime, absolute=cmd == futex.FUTEX_WAIT_BITSET,
                              realtime=bool(op & futex.FUTEX_CLOCK_REALTIME))
        return due if isinstance(due, int) and due < 0 else \
            futex.futex_wait(sched, mem, uaddr, val, due, bitset)
    if cmd in (futex.FUTEX_WAKE, futex.FUTEX_WAKE_BITSET):
        bitset = val3 & 0xFFFFFFFF if cmd == futex.FUTEX_WAKE_BITSET else futex.FUTEX_BITSET_MATCH_ANY
        return futex.futex_wake(sched, uaddr, s32(val), bitset)
    if cmd in (futex.FUTEX_REQUEUE, futex.FUTEX_CMP_REQUEUE):
        return futex.futex_requeue(sched, mem, uaddr, uaddr2, s32(val), s32(utime),
                                   val3 if cmd == futex.FUTEX_CMP_REQUEUE else None)
    if cmd == futex.FUTEX_WAKE_OP:
        return futex.futex_wake_op(sched, mem, uaddr, uaddr2, s32(val), s32(utime), val3)
    return -E.ENOSYS


def _futex_deadline(p, utime: int, absolute: bool, realtime: bool) -> int | None:
    """The wait's deadline in modelled monotonic ns, None for no timeout, or -errno."""
    if not utime:
        return None
    secs, nsec = struct.unpack("<qq", rd(p, utime, 16))
    if secs < 0 or not 0 <= nsec < 1_000_000_000:
        return -E.EINVAL
    ns = min(secs * 1_000_000_000 + nsec, 1 << 80)
    now = p.machine.clock.monotonic_ns()
    if not absolute:
        return now + ns
    if realtime:
        return max(0, now + ns - p.machine.clock.realtime_ns())
    return ns


# --- time -----------------------------------------------------------------------------------
def _timespec(ns: int) -> bytes:
    return struct.pack("<qq", ns // 1_000_000_000, ns % 1_000_000_000)


# Clock ids (uapi/linux/time.h): REALTIME 0, MONOTONIC 1, PROCESS/THREAD_CPUTIME 2/3,
# MONOTONIC_RAW 4, REALTIME/MONOTONIC_COARSE 5/6, BOOTTIME 7, REALTIME/BOOTTIME_ALARM 8/9,
# TAI 11 (10 was removed). The wall-clock ones read the epoch-based time, all others the
# one monotonic model time.
_CLOCKS = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11}
_WALL_CLOCKS = {0, 5, 8, 11}
TIMER_ABSTIME = 1
# Sleeps stop where the 1/256-cycle counter would leave 62 bits (about 100 days of model
# time at 2 GHz): nothing wraps, so --max-cycles still fires and time never runs back.
CLOCK_CEILING = (1 << 62) >> FP_SHIFT


def _clock_ns(p, clk: int) -> int:
    c = p.machine.clock
    return c.realtime_ns() if clk in _WALL_CLOCKS else c.monotonic_ns()


@syscall("clock_gettime")
def sys_clock_gettime(p, clk, ts, *_):
    clk = s32(clk)
    if clk not in _CLOCKS:
        return -E.EINVAL
    wr(p, ts, _timespec(_clock_ns(p, clk)))      # a NULL ts is EFAULT, as in Linux
    return 0


@syscall("clock_getres")
def sys_clock_getres(p, clk, ts, *_):
    if s32(clk) not in _CLOCKS:
        return -E.EINVAL
    if ts:
        wr(p, ts, _timespec(1))
    return 0


@syscall("gettimeofday")
def sys_gettimeofday(p, tv, tz, *_):
    ns = p.machine.clock.realtime_ns()
    if tv:
        wr(p, tv, struct.pack("<qq", ns // 1_000_000_000, ns % 1_000_000_000 // 1000))
    if tz:
        wr(p, tz, bytes(8))
    return 0


@syscall("time")
def sys_time(p, tloc, *_):
    secs = p.machine.clock.realtime_ns() // 1_000_000_000
    if tloc:
        wr(p, tloc, struct.pack("<q", secs))
    return secs


@syscall("nanosleep")
def sys_nanosleep(p, req, *_):
    return do_clock_nanosleep(p, 1, 0, req)          # CLOCK_MONOTONIC, relative


@syscall("clock_nanosleep")
def sys_clock_nanosleep(p, clk, flags, req, *_):
    return do_clock_nanosleep(p, s32(clk), flags, req)


def do_clock_nanosleep(p, clk: int, flags: int, req: int) -> int:
    """Sleeping advances model time (clamped below CLOCK_CEILING)."""
    if clk not in _CLOCKS or clk == 3:            # THREAD_CPUTIME cannot be slept on
        return -E.EINVAL
    secs, nsec = struct.unpack("<qq", rd(p, req, 16))
    if secs < 0 or not 0 <= nsec < 1_000_000_000:
        return -E.EINVAL                 # else a negative sleep would turn the clock back
    ns = min(secs * 1_000_000_000 + nsec, 1 << 80)
    if flags & TIMER_ABSTIME:
        ns = max(0, ns - _clock_ns(p, clk))
    c = p.machine.clock
    cycles = min(ns * c.freq_hz // 1_000_000_000, max(0, CLOCK_CEILING - c.cycles))
    if len(p.sched.live()) > 1:         # other threads run meanwhile; time jumps if none can
        p.sched.block(FutexWait(-1, 0, c.monotonic_ns() + cycles * 1_000_000_000 // c.freq_hz, 0))
        return 0
    c.advance(cycles, "sleep")
    return 0


# --- memory ---------------------------------------------------------------------------------
@syscall("brk")
def sys_brk(p, addr, *_):
    mem = p.machine.memory
    if addr < p.brk_start:              # brk(0) asks; brk(start) empties the heap
        return p.brk
    old_end, new_end = page_up(p.brk), page_up(addr)
    if new_end > old_end:
        if new_end > MMAP_BASE or mem.find_free(new_end - old_end, old_end, new_end) != old_end:
            return p.brk
        try:
            mem.map(old_end, new_end - old_end, PROT_READ | PROT_WRITE, "[heap]")
        except UcError:             # the host cannot back it: brk fails as on ENOMEM
            return p.brk
    elif new_end < old_end:
        mem.unmap(new_end, old_end - new_end)
    p.brk = addr
    return p.brk


def _layer_pages(p, addr: int, size: int) -> bool:
    """[addr, addr+size) touches pages another layer mapped for its own code (probe slots,
    trampolines; Machine.claim_text): not the guest's, as kernel kprobe memory is not in a
    process's address space, so the guest can neither replace nor change them."""
    return any(lo < addr + size and addr < hi for lo, hi in p.machine.owned_text)


@syscall("mmap")
def sys_mmap(p, addr, length, prot, flags, fd, off, *_):
    mem = p.machine.memory
    if length == 0 or off & 0xFFF:
        return -E.EINVAL
    if length > mem.task_size:
        return -E.ENOMEM
    size = page_up(length)
    f = None
    if not flags & MAP_ANONYMOUS:
        f = p.fds.get(s32(fd))
        if f.kind != "host":
            return -E.ENODEV
        acc = f.flags & O_ACCMODE
        if acc == O_WRONLY or (flags & MAP_TYPE == MAP_SHARED and prot & PROT_WRITE
                               and acc != O_RDWR):
            return -E.EACCES
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr & 0xFFF:
            return -E.EINVAL
        if addr < MMAP_MIN_ADDR:
            return -E.EPERM
        if addr + size > mem.task_size:
            return -E.ENOMEM
        if flags & MAP_FIXED_NOREPLACE and mem.overlapping(addr, addr + size):
            return -E.EEXIST
        if _layer_pages(p, addr, size):
            return -E.ENOMEM
        mem.unmap(addr, size)
    else:
        hint = addr if MMAP_MIN_ADDR <= addr and addr + size <= mem.task_size and \
            mem.find_free(size, addr, addr + size) == addr else None
        addr = hint or mem.find_free(size, MMAP_BASE, STACK_TOP - STACK_SIZE)
        if addr is None:
            return -E.ENOMEM
    try:
        if f is None:
            mem.map(addr, size, prot & 7, "[anon]")
        else:
            _map_file(mem, f, addr, size, prot & 7, off)
    except UcError:
        return -E.ENOMEM
    return addr


def _map_file(mem, f: OpenFile, addr: int, size: int, prot: int, off: int) -> None:
    """Map the pages the file backs with `prot` and copy in only the bytes it holds (its
    data extents, IO_CHUNK at a time; holes and zeros stay fresh zero pages). Pages wholly
    past EOF are mapped inaccessible: touching them faults, as Linux's SIGBUS."""
    fsize = os.fstat(f.host_fd).st_size
    backed = min(size, page_up(max(0, fsize - off)))
    name = os.path.basename(f.path)
    if backed:
        mem.map(addr, backed, prot, f"[mmap {name}]")
    if backed < size:
        try:
            mem.map(addr + backed, size - backed, 0, f"[mmap {name}{sigact.PAST_EOF}")
        except UcError:
            mem.unmap(addr, backed)
            raise
    _copy_file_data(mem, f.host_fd, addr, off, min(size, max(0, fsize - off)))


def _copy_file_data(mem, fd: int, addr: int, off: int, n: int) -> None:
    saved = os.lseek(fd, 0, os.SEEK_CUR)     # SEEK_DATA moves the guest's file position
    try:
        _copy_extents(mem, fd, addr, off, off + n)
    finally:
        os.lseek(fd, saved, os.SEEK_SET)


def _copy_extents(mem, fd: int, addr: int, off: int, end: int) -> None:
    pos = off
    while pos < end:
        try:
            pos = os.lseek(fd, pos, SEEK_DATA)
            hole = min(os.lseek(fd, pos, SEEK_HOLE), end)
        except OSError:                      # ENXIO: no data past pos
            return
        while pos < hole:
            chunk = os.pread(fd, min(IO_CHUNK, hole - pos), pos)
            if not chunk:
                return
            if chunk.count(0) != len(chunk):     # zeros are already there
                mem.write(addr + pos - off, chunk)
            pos += len(chunk)


@syscall("munmap")
def sys_munmap(p, addr, length, *_):
    if addr & 0xFFF or length == 0 or addr + page_up(length) > p.machine.memory.task_size:
        return -E.EINVAL
    start, end = addr, addr + page_up(length)
    for lo, hi in sorted(p.machine.owned_text):     # those pages are not the guest's:
        if lo < end and start < hi:                  # unmap around them (holes are fine)
            if start < lo:
                p.machine.memory.unmap(start, lo - start)
            start = max(start, hi)
    if start < end:
        p.machine.memory.unmap(start, end - start)
    return 0


@syscall("mprotect")
def sys_mprotect(p, addr, length, prot, *_):
    mem = p.machine.memory
    if addr & 0xFFF:
        return -E.EINVAL
    if length == 0:
        return 0
    if addr + length > mem.task_size or not mem.is_mapped(addr, length) \
            or _layer_pages(p, addr, length):
        return -E.ENOMEM
    mem.protect(addr, length, prot & 7)
    return 0


@syscall("mremap")
def sys_mremap(p, old, old_size, new_size, flags, *_):
    mem = p.machine.memory
    if old & 0xFFF or old_size == 0 or new_size == 0:
        return -E.EINVAL
    if new_size > mem.task_size:
        return -E.ENOMEM
    old_size, new_size = page_up(old_size), page_up(new_size)
    if old + old_size > mem.task_size or not mem.is_mapped(old, old_size) \
            or _layer_pages(p, old, old_size):
        return -E.EFAULT
    if new_size <= old_size:
        if new_size < old_size:
            mem.unmap(old + new_size, old_size - new_size)
        return old
    region = mem.find(old)
    try:
        if old + new_size <= mem.task_size and mem.find_free(
                new_size - old_size, old + old_size, old + new_size) == old + old_size:
            mem.map(old + old_size, new_size - old_size, region.prot, region.name)
            return old
        if not flags & MREMAP_MAYMOVE:
            return -E.ENOMEM
        new = mem.find_free(new_size, MMAP_BASE, STACK_TOP - STACK_SIZE)
        if new is None:
            return -E.ENOMEM
        mem.map(new, new_size, region.prot, region.name)
    except UcError:
        return -E.ENOMEM
    for done in range(0, old_size, IO_CHUNK):        # bounded host copies; zeros are there
        chunk = mem.read(old + done, min(IO_CHUNK, old_size - done))
        if chunk.count(0) != len(chunk):
            mem.write(new + done, chunk)
    mem.unmap(old, old_size)
    return new


# --- files ----------------------------------------------------------------------------------
# Every transfer is bounded on the host: a read returns at most READ_MAX bytes (a short
# read, as from a pipe), writes stream IO_CHUNK bytes at a time, so no guest request —
# however large, however aliased — makes the host hold more than that.
@syscall("read")
def sys_read(p, fd, buf, count, *_):
    f = p.fds.get(s32(fd))
    n = min(count, READ_MAX)
    if not access_ok(p.machine.memory, buf, n, PROT_WRITE):
        return -E.EFAULT                 # before consuming input the guest could not receive
    data = f.read(n, deadline(p))
    wr(p, buf, data)
    return len(data)


def _positional(p, fd: int, off: int) -> OpenFile | int:
    """The file a pread64/pwrite64 at `off` works on, or -errno (ESPIPE: no offset to
    seek on; EINVAL: a negative offset)."""
    f = p.fds.get(s32(fd))
    if f.kind != "host":
        return -E.ESPIPE
    return -E.EINVAL if s64(off) < 0 else f


@syscall("pread64")
def sys_pread64(p, fd, buf, count, off, *_):
    f = _positional(p, fd, off)
    if isinstance(f, int):
        return f
    data = os.pread(f.host_fd, min(count, READ_MAX), off)
    wr(p, buf, data)
    return len(data)


@syscall("pwrite64")
def sys_pwrite64(p, fd, buf, count, off, *_):
    f = _positional(p, fd, off)
    if isinstance(f, int):
        return f
    if f.flags & O_ACCMODE == 0:
        return -E.EBADF
    return _stream(p, buf, min(count, MAX_RW_COUNT),
                   lambda data, done: os.pwrite(f.host_fd, data, off + done))


@syscall("write")
def sys_write(p, fd, buf, count, *_):
    f = p.fds.get(s32(fd))
    return _stream(p, buf, min(count, MAX_RW_COUNT), lambda data, _done: f.write(data))


def _stream(p, addr: int, n: int, put) -> int:
    """Copy n guest bytes at addr to put(data, done) in IO_CHUNK pieces. An error after
    some progress ends the call with the count so far, as the kernel's partial writes."""
    done = 0
    while done < n:
        want = min(IO_CHUNK, n - done)
        try:
            wrote = put(rd(p, addr + done, want), done)
        except (UserFault, FsError, OSError):
            if done:
                return done
            raise
        done += wrote
        if wrote < want:
            break
    return done


def _iovecs(p, iov, cnt) -> list[tuple[int, int]]:
    """The iovec array (import_iovec): EINVAL past UIO_MAXIOV or for a negative length;
    the total is truncated at MAX_RW_COUNT."""
    if cnt > UIO_MAXIOV:
        raise FsError(E.EINVAL)
    raw = rd(p, iov, 16 * cnt)
    out, total = [], 0
    for i in range(cnt):
        base, n = struct.unpack_from("<QQ", raw, 16 * i)
        if n >> 63:
            raise FsError(E.EINVAL)
        if base + n > p.machine.memory.task_size:   # access_ok: a range check, before truncation
            raise UserFault(base, False, False)
        n = min(n, MAX_RW_COUNT - total)
        total += n
        out.append((base, n))
    return out


@syscall("writev")
def sys_writev(p, fd, iov, cnt, *_):
    f, total = p.fds.get(s32(fd)), 0
    for base, n in _iovecs(p, iov, cnt):
        try:
            wrote = _stream(p, base, n, lambda data, _done: f.write(data))
        except (UserFault, FsError, OSError):
            if total:
                return total
            raise
        total += wrote
        if wrote < n:
            break
    return total


@syscall("readv")
def sys_readv(p, fd, iov, cnt, *_):
    """One bounded read scattered over the iovecs (a short read past READ_MAX)."""
    f = p.fds.get(s32(fd))
    vecs = _iovecs(p, iov, cnt)
    mem = p.machine.memory
    want = min(sum(n for _, n in vecs), READ_MAX)
    if vecs and not access_ok(mem, vecs[0][0], min(vecs[0][1], want), PROT_WRITE):
        return -E.EFAULT
    data, done = f.read(want, deadline(p)), 0
    for base, n in vecs:
        if done >= len(data):
            break
        piece = data[done:done + n]
        try:
            wr(p, base, piece)
        except UserFault:
            return done or -E.EFAULT
        done += len(piece)
    return done


@syscall("open")
def sys_open(p, path, flags, mode, *_):
    return sys_openat(p, AT_FDCWD & 0xFFFFFFFF, path, flags, mode)


@syscall("openat")
def sys_openat(p, dirfd, path, flags, mode, *_):
    f = p.fs.open(cstr(p, path), flags, mode & ~p.umask, base_dir(p, dirfd))
    fd = p.fds.install(f)
    if flags & 0o2000000:
        p.fds.cloexec.add(fd)
    return fd


@syscall("close")
def sys_close(p, fd, *_):
    p.fds.close(s32(fd))
    return 0


@syscall("close_range")
def sys_close_range(p, first, last, *_):
    for fd in [fd for fd in p.fds.files if first <= fd <= last]:
        p.fds.close(fd)
    return 0


@syscall("lseek")
def sys_lseek(p, fd, off, whence, *_):
    f = p.fds.get(s32(fd))
    if f.kind == "dir":
        f.dir_pos = 0 if s64(off) == 0 and whence == 0 else f.dir_pos
        return 0
    if f.kind != "host":
        return -E.ESPIPE
    try:
        return os.lseek(f.host_fd, s64(off), whence)
    except OSError as e:
        return -e.errno


def _stat_dict(p, s: os.stat_result | None) -> dict:
    if s is None:     # a stream or pipe: report a FIFO, as for a shell pipeline
        return dict(dev=0xC, ino=p.creds.pid, mode=st.S_IFIFO | 0o600, nlink=1, uid=p.creds.uid,
                    gid=p.creds.gid, rdev=0, size=0, blksize=4096, blocks=0, atime=0, mtime=0, ctime=0)
    return dict(dev=s.st_dev, ino=s.st_ino, mode=s.st_mode, nlink=s.st_nlink, uid=s.st_uid,
                gid=s.st_gid, rdev=s.st_rdev, size=s.st_size, blksize=4096, blocks=s.st_blocks,
                atime=int(s.st_atime), mtime=int(s.st_mtime), ctime=int(s.st_ctime))


def _fd_stat(p, fd: int) -> dict:
    f = p.fds.get(fd)
    if f.kind == "host":
        return _stat_dict(p, os.fstat(f.host_fd))
    if f.kind == "dir":
        return _stat_dict(p, os.stat(f.path))
    if f.kind == "null":
        d = _stat_dict(p, None)
        d.update(mode=st.S_IFCHR | 0o666, rdev=0x103)
        return d
    return _stat_dict(p, None)


def _path_stat(p, dirfd, path_addr, flags) -> dict:
    path = cstr(p, path_addr) if path_addr else ""
    if not path and flags & AT_EMPTY_PATH:
        return _fd_stat(p, s32(dirfd))
    if path == "/dev/null":
        return _fd_stat_for_null(p)
    return _stat_dict(p, p.fs.stat(path, base_dir(p, dirfd), not flags & AT_SYMLINK_NOFOLLOW))


def _fd_stat_for_null(p) -> dict:
    d = _stat_dict(p, None)
    d.update(mode=st.S_IFCHR | 0o666, rdev=0x103)
    return d


@syscall("fstat")
def sys_fstat(p, fd, buf, *_):
    wr(p, buf, p.machine.arch.pack_stat(_fd_stat(p, s32(fd))))
    return 0


@syscall("newfstatat")
def sys_newfstatat(p, dirfd, path, buf, flags, *_):
    wr(p, buf, p.machine.arch.pack_stat(_path_stat(p, dirfd, path, flags)))
    return 0


@syscall("stat")
def sys_stat(p, path, buf, *_):
    return sys_newfstatat(p, AT_FDCWD & 0xFFFFFFFF, path, buf, 0)


@syscall("lstat")
def sys_lstat(p, path, buf, *_):
    return sys_newfstatat(p, AT_FDCWD & 0xFFFFFFFF, path, buf, AT_SYMLINK_NOFOLLOW)


@syscall("statx")
def sys_statx(p, dirfd, path, flags, mask, buf, *_):
    d = _path_stat(p, dirfd, path, flags)
    ts = lambda t: struct.pack("<qIi", t, 0, 0)
    out = struct.pack("<IIQIIIHH", 0x7FF, d["blksize"], 0, d["nlink"], d["uid"], d["gid"],
                      d["mode"] & 0xFFFF, 0)
    out += struct.pack("<QQQQ", d["ino"], d["size"], d["blocks"], 0)
    out += ts(d["atime"]) + ts(0) + ts(d["ctime"]) + ts(d["mtime"])
    out += struct.pack("<IIII", os.major(d["rdev"]), os.minor(d["rdev"]), os.major(d["dev"]),
                       os.minor(d["dev"]))
    wr(p, buf, out.ljust(256, b"\0"))
    return 0


@syscall("readlink")
def sys_readlink(p, path_addr, buf, size, *_):
    return sys_readlinkat(p, AT_FDCWD & 0xFFFFFFFF, path_addr, buf, size)


@syscall("readlinkat")
def sys_readlinkat(p, dirfd, path_addr, buf, size, *_):
    path = cstr(p, path_addr)
    if path == "/proc/self/exe":
        target = os.fsencode(p.fs.guest_path(p.fs.exe_path))
    else:
        host = p.fs.resolve(path, base_dir(p, dirfd), follow=False)
        try:
            target = os.readlink(os.fsencode(host))
        except OSError as e:
            return -e.errno
    target = target[:size]
    wr(p, buf, target)
    return len(target)


@syscall("access")
def sys_access(p, path_addr, mode, *_):
    return sys_faccessat(p, AT_FDCWD & 0xFFFFFFFF, path_addr, mode)


@syscall("faccessat", "faccessat2")
def sys_faccessat(p, dirfd, path_addr, mode, *_):
    path = cstr(p, path_addr)
    if path == "/dev/null":
        return 0
    host = p.fs.resolve(path, base_dir(p, dirfd))
    if not os.path.exists(host):
        return -E.ENOENT
    if mode & 2 and not p.fs.writable:
        return -E.EROFS
    return 0 if os.access(host, mode & 7) else -E.EACCES


@syscall("getcwd")
def sys_getcwd(p, buf, size, *_):
    cwd = os.fsencode(p.fs.guest_path(p.fs.cwd)) + b"\0"
    if size < len(cwd):
        return -E.ERANGE
    wr(p, buf, cwd)
    return len(cwd)


@syscall("chdir")
def sys_chdir(p, path_addr, *_):
    host = p.fs.resolve(cstr(p, path_addr))
    if not os.path.isdir(host):
        return -E.ENOTDIR if os.path.exists(host) else -E.ENOENT
    p.fs.cwd = host
    return 0


@syscall("fchdir")
def sys_fchdir(p, fd, *_):
    f = p.fds.get(s32(fd))
    if f.kind != "dir":
        return -E.ENOTDIR
    p.fs.cwd = f.path
    return 0


@syscall("getdents64")
def sys_getdents64(p, fd, buf, count, *_):
    f = p.fds.get(s32(fd))
    if f.kind != "dir":
        return -E.ENOTDIR
    out, count = bytearray(), min(count, READ_MAX)
    while f.dir_pos < len(f.dir_entries):
        name, ino, dtype = f.dir_entries[f.dir_pos]
        raw = name + b"\0"
        reclen = (19 + len(raw) + 7) & ~7
        if len(out) + reclen > count:
            if not out:
                return -E.EINVAL
            break
        out += struct.pack("<QqHB", ino, f.dir_pos + 1, reclen, dtype) + raw.ljust(reclen - 19, b"\0")
        f.dir_pos += 1
    wr(p, buf, bytes(out))
    return len(out)


@syscall("ioctl")
def sys_ioctl(p, fd, request, arg, *_):
    p.fds.get(s32(fd))
    return -E.ENOTTY        # nothing here is a terminal: stdio fully buffers, as in the reference


@syscall("fcntl")
def sys_fcntl(p, fd, cmd, arg, *_):
    fd = s32(fd)
    f = p.fds.get(fd)
    if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
        if arg >= NOFILE:
            return -E.EINVAL
        new = p.fds.install(f, arg)
        if cmd == F_DUPFD_CLOEXEC:
            p.fds.cloexec.add(new)
        return new
    if cmd == F_GETFD:
        return 1 if fd in p.fds.cloexec else 0
    if cmd == F_SETFD:
        (p.fds.cloexec.add if arg & 1 else p.fds.cloexec.discard)(fd)
        return 0
    if cmd == F_GETFL:
        return f.flags
    if cmd == F_SETFL:              # only the status flags change (O_APPEND, O_NONBLOCK)
        f.flags = (f.flags & ~_SETFL_MASK) | (arg & _SETFL_MASK)
        return 0
    return -E.EINVAL


@syscall("dup")
def sys_dup(p, fd, *_):
    return p.fds.install(p.fds.get(s32(fd)))


@syscall("dup2")
def sys_dup2(p, old, new, *_):
    if s32(old) == s32(new):
        p.fds.get(s32(old))                         # EBADF if old is not open
        return s32(new)
    return sys_dup3(p, old, new, 0)


@syscall("dup3")
def sys_dup3(p, old, new, flags, *_):
    old, new = s32(old), s32(new)
    f = p.fds.get(old)
    if not 0 <= new < NOFILE:
        return -E.EBADF
    if old == new:
        return -E.EINVAL
    if new in p.fds.files:
        p.fds.close(new)
    p.fds.files[new] = f
    return new


@syscall("pipe")
def sys_pipe(p, fds_addr, *_):
    return sys_pipe2(p, fds_addr, 0)


@syscall("pipe2")
def sys_pipe2(p, fds_addr, flags, *_):
    if flags & ~(O_NONBLOCK | O_CLOEXEC | 0o40000):       # O_DIRECT: packet mode, accepted
        return -E.EINVAL
    if not access_ok(p.machine.memory, fds_addr, 8, PROT_WRITE):
        return -E.EFAULT
    pipe = Pipe(readers=1, writers=1)
    r = p.fds.install(OpenFile("pipe", "pipe:[r]", flags & O_NONBLOCK, pipe=pipe))
    try:
        w = p.fds.install(OpenFile("pipe", "pipe:[w]", O_WRONLY | flags & O_NONBLOCK, pipe=pipe))
    except FsError:
        p.fds.close(r)
        raise
    if flags & O_CLOEXEC:
        p.fds.cloexec.update((r, w))
    wr(p, fds_addr, struct.pack("<ii", r, w))
    return 0


@syscall("sendfile")
def sys_sendfile(p, out_fd, in_fd, off_addr, count, *_):
    """At most READ_MAX bytes per call (a short transfer), IO_CHUNK at a time."""
    src, dst = p.fds.get(s32(in_fd)), p.fds.get(s32(out_fd))
    off = None
    if off_addr:
        (off,) = struct.unpack("<q", rd(p, off_addr, 8))
        if src.kind != "host":
            return -E.ESPIPE
        if off < 0:
            return -E.EINVAL
    done, n = 0, min(count, READ_MAX)
    while done < n:
        want = min(IO_CHUNK, n - done)
        data = (src.read(want, deadline(p)) if off is None
                else os.pread(src.host_fd, want, off + done))
        wrote = dst.write(data) if data else 0
        done += wrote
        if wrote < want:
            break
    if off is not None:
        wr(p, off_addr, struct.pack("<q", off + done))
    return done


@syscall("poll", "ppoll")
def sys_poll(p, fds_addr, nfds, timeout, *_):
    if nfds == 0 and (timeout == 0 if p.dispatcher_name == "ppoll" else s32(timeout) < 0):
        p.sched.block(FutexWait(-1, 0))      # pause() on arm64: wait for a signal
        return -E.EINTR
    ready = 0
    for i in range(min(nfds, 1024)):
        fd, events, _rev = struct.unpack("<ihh", rd(p, fds_addr + 8 * i, 8))
        revents = 0 if fd < 0 else (0x20 if fd not in p.fds.files else events & 0x5)  # NVAL/IN|OUT
        wr(p, fds_addr + 8 * i + 6, struct.pack("<h", revents))
        ready += bool(revents)
    return ready


@syscall("connect", "getpeername")
def sys_connect(p, *_):
    return -E.ENOTSOCK


@syscall("mkdirat", "mkdir", "unlinkat", "unlink")
def sys_modify_fs(p, *_):
    return -E.EROFS if not p.fs.writable else -E.ENOSYS


# --- metadata: honoured inside the jail under --fs-write, EROFS otherwise ----------------------
def _meta_target(p, dirfd: int, path_addr: int, flags: int = 0) -> str | int:
    """The host path (or host fd) a chmod/chown/utimensat names, checked writable."""
    if path_addr == 0 or flags & AT_EMPTY_PATH and not cstr(p, path_addr):
        f = p.fds.get(s32(dirfd))
        if f.kind not in ("host", "dir"):
            raise FsError(E.EPERM)
        target = f.host_fd if f.kind == "host" else f.path
    else:
        target = p.fs.resolve(cstr(p, path_addr), base_dir(p, dirfd),
                              not flags & AT_SYMLINK_NOFOLLOW)
        if not os.path.lexists(target):
            raise FsError(E.ENOENT)
    if not p.fs.writable:
        raise FsError(E.EROFS)
    return target


@syscall("chmod")
def sys_chmod(p, path, mode, *_):
    return sys_fchmodat2(p, AT_FDCWD & 0xFFFFFFFF, path, mode, 0)


@syscall("fchmod")
def sys_fchmod(p, fd, mode, *_):
    return sys_fchmodat2(p, fd, 0, mode, 0)


@syscall("fchmodat")
def sys_fchmodat(p, dirfd, path, mode, *_):
    return sys_fchmodat2(p, dirfd, path, mode, 0)


@syscall("fchmodat2")
def sys_fchmodat2(p, dirfd, path, mode, flags, *_):
    os.chmod(_meta_target(p, dirfd, path, flags), mode & 0o7777)
    return 0


@syscall("chown")
def sys_chown(p, path, uid, gid, *_):
    return sys_fchownat(p, AT_FDCWD & 0xFFFFFFFF, path, uid, gid, 0)


@syscall("lchown")
def sys_lchown(p, path, uid, gid, *_):
    return sys_fchownat(p, AT_FDCWD & 0xFFFFFFFF, path, uid, gid, AT_SYMLINK_NOFOLLOW)


@syscall("fchown")
def sys_fchown(p, fd, uid, gid, *_):
    return sys_fchownat(p, fd, 0, uid, gid, 0)


@syscall("fchownat")
def sys_fchownat(p, dirfd, path, uid, gid, flags, *_):
    """Ownership cannot change for an unprivileged host: only a no-op (the owner's own
    ids or -1) succeeds, as it would for a normal user."""
    target = _meta_target(p, dirfd, path, flags)
    st_ = os.stat(target) if isinstance(target, int) else os.lstat(target)
    for want, have, own in ((s32(uid), st_.st_uid, p.creds.uid), (s32(gid), st_.st_gid, p.creds.gid)):
        if want not in (-1, have, own):       # the guest's own ids map to the file's owner
            return -E.EPERM
    return 0


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


@syscall("utimensat")
def sys_utimensat(p, dirfd, path, times, flags, *_):
    target = _meta_target(p, dirfd, path, flags | (AT_EMPTY_PATH if not path else 0))
    now = p.machine.clock.realtime_ns()
    old = os.stat(target) if isinstance(target, int) else os.lstat(target)
    if times:
        raw = rd(p, times, 32)
        stamps = []
        for (sec, nsec), prev in zip(struct.iter_unpack("<qq", raw), (old.st_atime_ns, old.st_mtime_ns)):
            if nsec == UTIME_NOW:
                stamps.append(now)
            elif nsec == UTIME_OMIT:
                stamps.append(prev)
            elif not 0 <= nsec < 1_000_000_000:
                return -E.EINVAL
            else:
                stamps.append(sec * 1_000_000_000 + nsec)
    else:
        stamps = [now, now]
    if isinstance(target, int):
        os.utime(target, ns=tuple(stamps))
    else:
        os.utime(target, ns=tuple(stamps), follow_symlinks=not flags & AT_SYMLINK_NOFOLLOW)
    return 0


def install(proc: LinuxProcess) -> SyscallDispatcher:
    return SyscallDispatcher(proc)
