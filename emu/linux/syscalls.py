"""The Linux syscalls static binaries use (shared/reference/linux-user.md), one handler per
call in an explicit table keyed by name; the arch maps numbers to names. Handlers take the
raw argument registers and return a value or -errno, never raise into the guest."""
from __future__ import annotations

import errno as E
import os
import stat as st
import struct
from typing import Callable

from emu.linux.fs import AT_FDCWD, FsError, OpenFile
from unicorn import UcError

from emu.linux.process import MMAP_BASE, MMAP_MIN_ADDR, STACK_TOP, STACK_SIZE, LinuxProcess
from emu.memory import PROT_READ, PROT_WRITE, page_up
from emu.uaccess import UserFault, copy_from_user, copy_to_user

SIGNAMES = {1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
            7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
            13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM"}
AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW = 0x1000, 0x100
MAP_FIXED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x10, 0x20, 0x100000
MREMAP_MAYMOVE = 1
TCGETS, TIOCGWINSZ = 0x5401, 0x5413
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
ARCH_SET_FS, ARCH_GET_FS = 0x1002, 0x1003
PR_SET_NAME, PR_GET_NAME = 15, 16
TASK_SIZE = 1 << 47                 # top of the x86-64 / arm64 (48-bit VA) user address space
NOFILE = 1024                       # RLIMIT_NOFILE soft limit reported by prlimit64

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
        names = m.arch.syscall_names
        self.table = {nr: (name, SYSCALLS[name]) for nr, name in names.items() if name in SYSCALLS}
        self.names = names
        self.nr_id = m.arch.reg_id(m.arch.syscall_nr)
        self.arg_ids = [m.arch.reg_id(r) for r in m.arch.syscall_args]
        self.ret_id = m.arch.reg_id(m.arch.syscall_ret)
        self.counts: dict[str, int] = {}
        m.syscall_handler = self

    def __call__(self) -> None:
        regs = self.m.regs
        nr = regs.read(self.nr_id)
        args = [regs.read(i) for i in self.arg_ids]
        name, handler = self.table.get(nr, (self.names.get(nr, f"syscall_{nr}"), None))
        self.counts[name] = self.counts.get(name, 0) + 1
        self.proc.dispatcher_name = name
        if handler is None:
            ret = -E.ENOSYS
        else:
            try:
                ret = handler(self.proc, *args)
            except FsError as e:
                ret = -e.errno
            except MemoryFault:
                ret = -E.EFAULT
            except BrokenPipeError:
                raise                   # our own stdout closed: the CLI exits 141 (SIGPIPE)
            except OSError as e:        # a host call on the guest's behalf failed: its errno
                ret = -(e.errno or E.EIO)
            except OverflowError:       # a register value no host call accepts
                ret = -E.EINVAL
        if self.proc.strace:
            self._strace_len = args[2]      # the byte count of write-like calls
            self._strace(name, args, ret)
        if not self.m.stopping:
            regs.write(self.ret_id, ret)

    def _strace(self, name: str, args: list[int], ret: int) -> None:
        """One line per call as strace prints it: `openat(AT_FDCWD, "/etc/x", 0) = -1 ENOENT
        (No such file or directory)`."""
        kinds = _STRACE_ARGS.get(name, "xxx")
        shown = ", ".join(self._strace_arg(k, a, ret) for k, a in zip(kinds, args))
        if name in ("exit", "exit_group"):
            res = "?"
        elif -4096 < ret < 0:
            res = f"-1 {E.errorcode.get(-ret, str(-ret))} ({os.strerror(-ret)})"
        else:
            res = f"{ret:#x}" if ret > 0xFFFF else str(ret)
        self.m.stderr.write(f"{name}({shown}) = {res}\n".encode())

    def _strace_arg(self, kind: str, value: int, ret: int) -> str:
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


_STRACE_STR = 32                        # strace's default -s


def _quote(data: bytes, limit: int = _STRACE_STR) -> str:
    esc = {9: "\\t", 10: "\\n", 13: "\\r", 34: '\\"', 92: "\\\\"}
    return '"' + "".join(esc.get(c) or (chr(c) if 32 <= c < 127 else f"\\x{c:02x}")
                         for c in data[:limit]) + '"'


# Argument kinds: d signed int/fd, f dirfd, u unsigned, x hex, s C string, b buffer of the
# byte count that follows it, o buffer filled by the call (its result is the length).
_STRACE_ARGS = dict(
    exit_group="d", exit="d", brk="x", close="d", write="dbu", read="dou", pread64="doud",
    pwrite64="dbux", writev="dxd", readv="dxd", mmap="xuxxdx", munmap="xu", mprotect="xux",
    mremap="xuux", openat="fsxx", open="sxx", uname="x", getpid="", getuid="", geteuid="",
    getgid="", getegid="", gettid="", getppid="", getpgrp="", set_tid_address="x",
    arch_prctl="xx", rseq="xuxx", set_robust_list="xu", prlimit64="ddxx", getrandom="xux",
    readlinkat="fsxu", readlink="sxu", newfstatat="fsxx", fstat="dx", stat="sx", lstat="sx",
    statx="fsxxx", ioctl="dxx", fcntl="ddx", dup="d", dup2="dd", dup3="ddx", lseek="ddd",
    faccessat="fsx", faccessat2="fsxx", access="sx", chdir="s", fchdir="d", getcwd="xu",
    getdents64="dxu", sendfile="ddxu", pipe2="xx", clock_gettime="dx", gettimeofday="xx",
    clock_nanosleep="ddxx", nanosleep="xx", rt_sigaction="dxxu", rt_sigprocmask="dxxu",
    prctl="dxxxx", kill="dd", tgkill="ddd", tkill="dd", sysinfo="x", getrusage="dx",
    umask="x", poll="xud", ppoll="xuxxu", futex="xdux", madvise="xud", mkdirat="fsx",
    unlinkat="fsx", getpgid="d", setpgid="dd", sched_getaffinity="dux", sigaltstack="xx",
    close_range="uud", clock_getres="dx", time="x",
)


class MemoryFault(Exception):
    pass


# --- guest memory helpers: every copy goes through emu.uaccess ---------------------------
def rd(p: LinuxProcess, addr: int, n: int) -> bytes:
    try:
        return copy_from_user(p.machine.memory, addr, n)
    except UserFault:
        raise MemoryFault() from None


def wr(p: LinuxProcess, addr: int, data: bytes) -> None:
    try:
        copy_to_user(p.machine.memory, addr, data)
    except UserFault:
        raise MemoryFault() from None


def cstr(p: LinuxProcess, addr: int) -> str:
    if addr == 0:
        raise MemoryFault()
    try:
        return p.machine.memory.read_cstr(addr).decode("utf-8", "surrogateescape")
    except Exception:
        raise MemoryFault() from None


def base_dir(p: LinuxProcess, dirfd: int) -> str | None:
    dirfd = s32(dirfd)
    if dirfd == AT_FDCWD:
        return None
    f = p.fds.get(dirfd)
    if f.kind != "dir":
        raise FsError(E.ENOTDIR)
    return f.path


# --- process and identity ------------------------------------------------------------------
@syscall("exit", "exit_group")
def sys_exit_group(p, code, *_):
    p.machine.request_exit(code & 0xFF)
    return 0


@syscall("getpid", "gettid", "getpgrp", "set_tid_address")
def sys_getpid(p, *_):
    return p.creds.pid


@syscall("getpgid")
def sys_getpgid(p, *_):
    return p.creds.pid


@syscall("setpgid", "sched_yield", "madvise", "fsync", "set_robust_list")
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


@syscall("rseq", "clone", "clone3", "fork", "vfork", "execve", "wait4", "socket")
def sys_unsupported(p, *_):
    return -E.ENOSYS


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


@syscall("sched_getaffinity")
def sys_sched_getaffinity(p, pid, size, mask, *_):
    if size < 8:
        return -E.EINVAL
    wr(p, mask, struct.pack("<Q", 1))
    return 8


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


# --- signals (recorded; delivery is not modelled) ------------------------------------------
@syscall("rt_sigaction")
def sys_rt_sigaction(p, sig, act, oldact, sigsetsize, *_):
    if not 1 <= sig <= 64 or sig in (9, 19):
        return -E.EINVAL
    if oldact:
        wr(p, oldact, p.sigactions.get(sig, bytes(32)))
    if act:
        p.sigactions[sig] = rd(p, act, 32)
    return 0


@syscall("rt_sigprocmask")
def sys_rt_sigprocmask(p, how, nset, oset, *_):
    if oset:
        wr(p, oset, struct.pack("<Q", p.sigmask))
    if nset:
        (mask,) = struct.unpack("<Q", rd(p, nset, 8))
        p.sigmask = {0: p.sigmask | mask, 1: p.sigmask & ~mask, 2: mask}.get(how, p.sigmask)
    return 0


@syscall("sigaltstack")
def sys_sigaltstack(p, ss, old, *_):
    if old:
        wr(p, old, struct.pack("<QiiQ", 0, 2, 0, 0))       # SS_DISABLE
    return 0


@syscall("kill", "tkill")
def sys_kill(p, pid, sig, *_):
    return _signal_self(p, sig) if s32(pid) in (0, -1, p.creds.pid) else -E.ESRCH


@syscall("tgkill")
def sys_tgkill(p, tgid, tid, sig, *_):
    return _signal_self(p, sig) if tid == p.creds.pid else -E.ESRCH


def _signal_self(p, sig: int) -> int:
    if sig == 0:
        return 0
    if not 1 <= sig <= 64:
        return -E.EINVAL
    p.killed_by = sig                # default action of every signal we see: terminate
    p.machine.request_exit(128 + sig)
    return 0


@syscall("futex")
def sys_futex(p, uaddr, op, val, *_):
    cmd = op & 0x7F
    if cmd == 1:                                 # FUTEX_WAKE: nobody else is waiting
        return 0
    if cmd == 0:                                 # FUTEX_WAIT: would sleep forever
        (cur,) = struct.unpack("<I", rd(p, uaddr, 4))
        return -E.EAGAIN if cur != val & 0xFFFFFFFF else -E.EDEADLK
    return -E.ENOSYS


# --- time -----------------------------------------------------------------------------------
def _timespec(ns: int) -> bytes:
    return struct.pack("<qq", ns // 1_000_000_000, ns % 1_000_000_000)


@syscall("clock_gettime")
def sys_clock_gettime(p, clk, ts, *_):
    c = p.machine.clock
    ns = c.realtime_ns() if clk in (0, 5, 8, 11) else c.monotonic_ns()   # REALTIME(_COARSE)/TAI
    if ts:
        wr(p, ts, _timespec(ns))
    return 0


@syscall("clock_getres")
def sys_clock_getres(p, clk, ts, *_):
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


@syscall("nanosleep", "clock_nanosleep")
def sys_nanosleep(p, *args):
    req = args[2] if p.dispatcher_name == "clock_nanosleep" else args[0]
    secs, nsec = struct.unpack("<qq", rd(p, req, 16))
    if secs < 0 or not 0 <= nsec < 1_000_000_000:
        return -E.EINVAL                 # else a negative sleep would turn the clock back
    c = p.machine.clock
    c.advance((secs * 1_000_000_000 + nsec) * c.freq_hz // 1_000_000_000, "sleep")
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
    if length > TASK_SIZE:
        return -E.ENOMEM
    size = page_up(length)
    f = None
    if not flags & MAP_ANONYMOUS:
        f = p.fds.get(s32(fd))
        if f.kind != "host":
            return -E.ENODEV
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr & 0xFFF:
            return -E.EINVAL
        if addr < MMAP_MIN_ADDR:
            return -E.EPERM
        if addr + size > TASK_SIZE:
            return -E.ENOMEM
        if flags & MAP_FIXED_NOREPLACE and mem.overlapping(addr, addr + size):
            return -E.EEXIST
        if _layer_pages(p, addr, size):
            return -E.ENOMEM
        mem.unmap(addr, size)
    else:
        hint = addr if MMAP_MIN_ADDR <= addr and addr + size <= TASK_SIZE and \
            mem.find_free(size, addr, addr + size) == addr else None
        addr = hint or mem.find_free(size, MMAP_BASE, STACK_TOP - STACK_SIZE)
        if addr is None:
            return -E.ENOMEM
    data = b""
    if f is not None:               # read no more than the file holds (pread allocates `n`)
        data = os.pread(f.host_fd, max(0, min(length, os.fstat(f.host_fd).st_size - off)), off)
    try:
        mem.map(addr, size, prot & 7, f"[mmap {os.path.basename(f.path)}]" if f else "[anon]")
    except UcError:
        return -E.ENOMEM
    if data:
        mem.write(addr, data)
    return addr


@syscall("munmap")
def sys_munmap(p, addr, length, *_):
    if addr & 0xFFF or length == 0:
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
    if not mem.is_mapped(addr, length) or _layer_pages(p, addr, length):
        return -E.ENOMEM
    mem.protect(addr, length, prot & 7)
    return 0


@syscall("mremap")
def sys_mremap(p, old, old_size, new_size, flags, *_):
    mem = p.machine.memory
    if old & 0xFFF or old_size == 0 or new_size == 0:
        return -E.EINVAL
    if new_size > TASK_SIZE:
        return -E.ENOMEM
    old_size, new_size = page_up(old_size), page_up(new_size)
    if not mem.is_mapped(old, old_size) or _layer_pages(p, old, old_size):
        return -E.EFAULT
    if new_size <= old_size:
        if new_size < old_size:
            mem.unmap(old + new_size, old_size - new_size)
        return old
    region = mem.find(old)
    try:
        if old + new_size <= TASK_SIZE and mem.find_free(
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
    mem.write(new, mem.read(old, old_size))
    mem.unmap(old, old_size)
    return new


# --- files ----------------------------------------------------------------------------------
@syscall("read")
def sys_read(p, fd, buf, count, *_):
    f = p.fds.get(s32(fd))
    data = f.read(min(count, 1 << 20))
    wr(p, buf, data)
    return len(data)


@syscall("pread64")
def sys_pread64(p, fd, buf, count, off, *_):
    f = p.fds.get(s32(fd))
    if f.kind != "host":
        return -E.ESPIPE
    data = os.pread(f.host_fd, min(count, 1 << 20), off)
    wr(p, buf, data)
    return len(data)


@syscall("write")
def sys_write(p, fd, buf, count, *_):
    return p.fds.get(s32(fd)).write(rd(p, buf, count))


def _iovecs(p, iov, cnt):
    if cnt > 1024:
        raise FsError(E.EINVAL)
    raw = rd(p, iov, 16 * cnt)
    return [struct.unpack_from("<QQ", raw, 16 * i) for i in range(cnt)]


@syscall("writev")
def sys_writev(p, fd, iov, cnt, *_):
    f = p.fds.get(s32(fd))
    return f.write(b"".join(rd(p, base, n) for base, n in _iovecs(p, iov, cnt)))


@syscall("readv")
def sys_readv(p, fd, iov, cnt, *_):
    f, total = p.fds.get(s32(fd)), 0
    for base, n in _iovecs(p, iov, cnt):
        data = f.read(n)
        wr(p, base, data)
        total += len(data)
        if len(data) < n:
            break
    return total


@syscall("openat", "open")
def sys_openat(p, *args):
    if p.dispatcher_name == "open":
        args = (AT_FDCWD & 0xFFFFFFFF, *args)
    dirfd, path, flags, mode = args[:4]
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


@syscall("stat", "lstat")
def sys_stat(p, path, buf, *_):
    flags = AT_SYMLINK_NOFOLLOW if p.dispatcher_name == "lstat" else 0
    wr(p, buf, p.machine.arch.pack_stat(_path_stat(p, AT_FDCWD & 0xFFFFFFFF, path, flags)))
    return 0


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


@syscall("readlinkat", "readlink")
def sys_readlinkat(p, *args):
    if p.dispatcher_name == "readlink":
        args = (AT_FDCWD & 0xFFFFFFFF, *args)
    dirfd, path_addr, buf, size = args[:4]
    path = cstr(p, path_addr)
    if path == "/proc/self/exe":
        target = p.fs.exe_path.encode()
    else:
        host = p.fs.resolve(path, base_dir(p, dirfd))
        try:
            target = os.readlink(host).encode()
        except OSError as e:
            return -e.errno
    target = target[:size]
    wr(p, buf, target)
    return len(target)


@syscall("faccessat", "faccessat2", "access")
def sys_faccessat(p, *args):
    if p.dispatcher_name == "access":
        args = (AT_FDCWD & 0xFFFFFFFF, *args)
    dirfd, path_addr, mode = args[:3]
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
    cwd = p.fs.cwd.encode() + b"\0"
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
    out = bytearray()
    while f.dir_pos < len(f.dir_entries):
        name, ino, dtype = f.dir_entries[f.dir_pos]
        raw = name.encode() + b"\0"
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
    if cmd == F_SETFL:
        return 0
    return -E.EINVAL


@syscall("dup")
def sys_dup(p, fd, *_):
    return p.fds.install(p.fds.get(s32(fd)))


@syscall("dup2", "dup3")
def sys_dup3(p, old, new, flags=0, *_):
    old, new = s32(old), s32(new)
    f = p.fds.get(old)
    if not 0 <= new < NOFILE:
        return -E.EBADF
    if old == new:
        return -E.EINVAL if p.dispatcher_name == "dup3" else new
    if new in p.fds.files:
        p.fds.close(new)
    p.fds.files[new] = f
    return new


@syscall("pipe2", "pipe")
def sys_pipe2(p, fds_addr, flags=0, *_):
    buf = bytearray()
    r = p.fds.install(OpenFile("pipe", "<pipe>", 0, pipe=buf))
    w = p.fds.install(OpenFile("pipe", "<pipe>", 1, pipe=buf))
    wr(p, fds_addr, struct.pack("<ii", r, w))
    return 0


@syscall("sendfile")
def sys_sendfile(p, out_fd, in_fd, off_addr, count, *_):
    src, dst = p.fds.get(s32(in_fd)), p.fds.get(s32(out_fd))
    if off_addr:
        (off,) = struct.unpack("<q", rd(p, off_addr, 8))
        if src.kind != "host":
            return -E.ESPIPE
        data = os.pread(src.host_fd, min(count, 1 << 20), off)
        wr(p, off_addr, struct.pack("<q", off + len(data)))
    else:
        data = src.read(min(count, 1 << 20))
    return dst.write(data)


@syscall("poll", "ppoll")
def sys_poll(p, fds_addr, nfds, *_):
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


def install(proc: LinuxProcess) -> SyscallDispatcher:
    return SyscallDispatcher(proc)
