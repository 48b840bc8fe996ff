"""Linux user mode: static glibc programs (tests/data/machine/*.c, compiled now) against the
reference (native x86-64, qemu-aarch64), the host-file policy, deterministic time, the
initial stack, --strace, and syscall handlers driven directly with hostile arguments (one
test per fixed bug, then a fuzz over the whole table)."""
from __future__ import annotations

import errno
import io
import os
import random
import re
import struct

import pytest

from conftest import LINUX_EXIT, run_emu, run_reference, tiny_elf
from emu.linux.process import MMAP_BASE
from emu.linux.syscalls import SYSCALLS, s64
from emu.loader import GuestConfig, load_guest

STDIN_TEXT = (b"the quick brown fox\n  jumps over\tthe lazy dog\n\n"
              + b"".join(b"line %d: %s\n" % (i, b"x" * (i * 7 % 50)) for i in range(200))
              + b"no newline at the end")


def same_as_reference(arch, prog, args=(), stdin=b"", emu_opts=()):
    emu = run_emu("run", *emu_opts, str(prog), "--", *args, stdin=stdin)
    ref = run_reference(arch, [str(prog), *args], stdin=stdin)
    assert (emu.rc, emu.stdout) == (ref.rc, ref.stdout), emu.err
    return emu, ref


# --- glibc programs against the reference ----------------------------------------------------
@pytest.mark.parametrize("link", ["static", "static-pie"])
def test_hello_args_and_exit_code(arch, glibc_prog, link):
    emu, ref = same_as_reference(arch, glibc_prog(arch, "hello", link), ["7", "foo", "bar baz", ""])
    assert emu.rc == 7 and b"argv[3]=bar baz (7)\n" in emu.stdout
    assert emu.stderr == ref.stderr == b"to stderr\n"


def test_stdin_processing(arch, glibc_prog):
    emu, _ = same_as_reference(arch, glibc_prog(arch, "stdin"), stdin=STDIN_TEXT)
    assert emu.stdout.startswith(b"lines=204 words=610 bytes=7058 ")


def test_empty_stdin(arch, glibc_prog):
    emu, _ = same_as_reference(arch, glibc_prog(arch, "stdin"))
    assert emu.stdout == b"lines=0 words=0 bytes=0 djb2=00001505\n"


@pytest.mark.slow
def test_malloc_heavy(arch, glibc_prog):
    emu, _ = same_as_reference(arch, glibc_prog(arch, "malloc"))
    assert emu.rc == 0 and emu.stdout.startswith(b"sum=")


def test_abort_exits_134(arch, glibc_prog):
    emu, ref = same_as_reference(arch, glibc_prog(arch, "abort"))
    assert emu.rc == 134 and emu.stdout == b""         # stdio buffer lost, as natively
    assert emu.stderr == b"flushed line\n" and ref.stderr.startswith(b"flushed line\n")


def test_wild_pointer_crash(arch, glibc_prog):
    emu, ref = same_as_reference(arch, glibc_prog(arch, "crash"))
    assert emu.rc == 139 and emu.stdout == b"before the crash\n"
    lines = emu.err.splitlines()
    assert len(lines) == 1, emu.err
    insn = {"arm64": r"str x\d+, \[x\d+\]", "x86_64": r"mov qword ptr \[r\w+\], r\w+"}[arch]
    assert re.fullmatch(r"emu: guest fault: write to unmapped address 0xdead0000 at pc "
                        r"0x[0-9a-f]+ <poke_wild\+0x[0-9a-f]+>: " + insn, lines[0]), lines[0]


def test_time_is_deterministic(arch, glibc_prog):
    prog = str(glibc_prog(arch, "clock"))
    first, second = run_emu("run", prog), run_emu("run", prog)
    assert first.rc == second.rc == 0
    assert first.stdout == second.stdout
    out = first.out
    # the guest's wall clock starts at the model's epoch (2026-01-01), not at host time
    assert re.search(r"^realtime 1767225600\.\d{9}$", out, re.M), out
    assert re.search(r"^gettimeofday 1767225600\.\d{6} time 1767225600$", out, re.M), out
    assert "(increasing)" in out
    mono = re.search(r"^monotonic (\d+)\.(\d{9}) -> (\d+)\.(\d{9})$", out, re.M)
    assert mono and int(mono[1] + mono[2]) < int(mono[3] + mono[4])


# --- host files: only under --fs, read-only unless --fs-write --------------------------------
@pytest.fixture
def fsroot(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "data.txt").write_bytes(b"granted file\nsecond line\n")
    (tmp_path / "secret.txt").write_bytes(b"outside the root\n")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    return root


def test_read_file_under_fs(arch, glibc_prog, fsroot):
    path = str(fsroot / "sub" / "data.txt")
    emu, _ = same_as_reference(arch, glibc_prog(arch, "files"), ["read", path],
                               emu_opts=("--fs", str(fsroot)))
    assert emu.stdout == b"size=25\ngranted file\nsecond line\n"


def test_same_file_without_fs_is_enoent(arch, glibc_prog, fsroot):
    path = str(fsroot / "sub" / "data.txt")
    r = run_emu("run", str(glibc_prog(arch, "files")), "--", "read", path)
    assert (r.rc, r.out) == (1, f"open {path}: ENOENT\n")


@pytest.mark.parametrize("target", ["outside", "dotdot", "symlink"])
def test_paths_leaving_the_root_are_enoent(arch, glibc_prog, fsroot, target):
    path = {"outside": str(fsroot.parent / "secret.txt"),
            "dotdot": str(fsroot / ".." / "secret.txt"),
            "symlink": str(fsroot / "escape")}[target]
    r = run_emu("run", "--fs", str(fsroot), str(glibc_prog(arch, "files")), "--", "read", path)
    assert (r.rc, r.out) == (1, f"open {path}: ENOENT\n")


def test_write_refused_without_fs_write(arch, glibc_prog, fsroot):
    path = fsroot / "new.txt"
    prog = str(glibc_prog(arch, "files"))
    r = run_emu("run", "--fs", str(fsroot), prog, "--", "write", str(path))
    assert (r.rc, r.out) == (1, f"create {path}: EROFS\n")
    r = run_emu("run", prog, "--", "write", str(path))
    assert (r.rc, r.out) == (1, f"create {path}: ENOENT\n")
    assert not path.exists()
    r = run_emu("run", "--fs", str(fsroot), "--fs-write", prog, "--", "write", str(path))
    assert (r.rc, r.out) == (0, f"created {path}\n")
    assert path.read_bytes() == b"written\n"


# --- --strace ----------------------------------------------------------------------------------
def test_strace_lines(arch, glibc_prog, fsroot):
    path = str(fsroot / "sub" / "data.txt")
    r = run_emu("run", "--strace", "--fs", str(fsroot), str(glibc_prog(arch, "files")), "--",
                "read", path, "--strace-is-a-guest-arg")
    assert r.rc == 0 and r.stdout == b"size=25\ngranted file\nsecond line\n"
    lines = r.err.splitlines()
    assert all(re.fullmatch(r"[a-z_0-9]+\(.*\) = (-?\d+|0x[0-9a-f]+|\?)( \w+ \(.*\))?", l)
               for l in lines), r.err
    assert f'openat(AT_FDCWD, "{path}", O_RDONLY) = 3' in lines
    assert 'read(3, "granted file\\nsecond line\\n", 4096) = 25' in lines
    assert 'write(1, "size=25\\ngranted file\\nsecond line"..., 33) = 33' in lines
    assert lines[-1] == "exit_group(0) = ?"
    if arch == "arm64":
        assert 'readlinkat(AT_FDCWD, "/proc/self/exe", ' in r.err
    else:
        assert 'readlink("/proc/self/exe", ' in r.err
    assert re.search(r"^rseq\(.*\) = -1 ENOSYS \(Function not implemented\)$", r.err, re.M)


# --- the initial stack ------------------------------------------------------------------------
AT_NAMES = {3: "PHDR", 4: "PHENT", 5: "PHNUM", 6: "PAGESZ", 7: "BASE", 9: "ENTRY", 15: "PLATFORM",
            16: "HWCAP", 25: "RANDOM", 31: "EXECFN", 33: "SYSINFO_EHDR"}


def test_initial_stack_and_auxv(arch, tmp_path):
    path = tmp_path / "t.elf"
    path.write_bytes(tiny_elf(arch, [("_start", LINUX_EXIT[arch].format(code=0))]))
    guest = load_guest(GuestConfig(str(path), argv=["one", "two words"], env=["A=1", "B=2"]),
                       stdin=io.BytesIO(), stdout=io.BytesIO(), stderr=io.BytesIO())
    m, img = guest.machine, guest.image
    mem, sp = m.memory, m.sp
    assert sp % 16 == 0
    assert m.reg({"arm64": "x0", "x86_64": "rdx"}[arch]) == 0       # rtld_fini
    words = lambda at, n: list(struct.unpack(f"<{n}Q", mem.read(at, 8 * n)))
    argc = mem.read_u64(sp)
    argv = words(sp + 8, argc + 1)
    assert argc == 3 and argv[-1] == 0
    assert [mem.read_cstr(a) for a in argv[:-1]] == [str(path).encode(), b"one", b"two words"]
    envp_at = sp + 8 * (argc + 2)
    envp = words(envp_at, 3)
    assert [mem.read_cstr(a) for a in envp[:2]] == [b"A=1", b"B=2"] and envp[2] == 0
    auxv, at = {}, envp_at + 24
    while True:
        key, value = words(at, 2)
        at += 16
        if key == 0:
            break
        auxv[key] = value
    assert 33 not in auxv                          # no vDSO: time goes through real syscalls
    assert auxv[6] == 4096 and auxv[7] == 0 and auxv[9] == img.entry
    assert (auxv[4], auxv[5]) == (56, img.phnum)
    assert mem.read(auxv[3], 56) == path.read_bytes()[64:64 + 56]    # AT_PHDR: phdrs in memory
    assert len(mem.read(auxv[25], 16)) == 16
    assert mem.read_cstr(auxv[31]) == str(path).encode()
    assert mem.read_cstr(auxv[15]) == {"arm64": b"aarch64", "x86_64": b"x86_64"}[arch]


# --- syscall handlers driven directly ---------------------------------------------------------
SCRATCH = 0x500000


class Syscalls:
    """A tiny guest whose syscall dispatcher is called directly: sys("openat", ...)."""

    def __init__(self, arch: str, tmp_path, fs_root=None, writable=False, stdin=b""):
        path = tmp_path / f"sys-{arch}.elf"
        path.write_bytes(tiny_elf(arch, [("_start", LINUX_EXIT[arch].format(code=0))],
                                  data=bytes(0x4000)))
        self.guest = load_guest(GuestConfig(str(path), fs_root=fs_root and str(fs_root),
                                            fs_writable=writable),
                                stdin=io.BytesIO(stdin), stdout=io.BytesIO(), stderr=io.BytesIO())
        self.m = self.guest.machine
        self.proc = self.guest.process
        self.arch = self.m.arch

    def __call__(self, name: str, *args: int) -> int:
        m = self.m
        m.regs.write(self.arch.reg_id(self.arch.syscall_nr), self.arch.syscalls[name])
        for reg, value in zip(self.arch.syscall_args, args):
            m.set_reg(reg, value)
        m.syscall_handler()
        return s64(m.reg(self.arch.syscall_ret))

    def cstr(self, text: str, at: int = SCRATCH) -> int:
        self.m.memory.write(at, text.encode() + b"\0")
        return at


AT_FDCWD = (1 << 64) - 100
O_RDONLY, O_WRONLY, O_CREAT = 0, 1, 0o100


def test_read_on_write_only_fd_is_ebadf(arch, tmp_path):
    """os.read's OSError escaped the dispatcher as a traceback."""
    (tmp_path / "f").write_bytes(b"abc")
    sys = Syscalls(arch, tmp_path, fs_root=tmp_path, writable=True)
    fd = sys("openat", AT_FDCWD, sys.cstr(str(tmp_path / "f")), O_WRONLY, 0)
    assert fd == 3
    assert sys("read", fd, SCRATCH + 0x1000, 3) == -errno.EBADF


def test_host_errors_become_errno(arch, tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    sys = Syscalls(arch, tmp_path, fs_root=tmp_path)
    fd = sys("openat", AT_FDCWD, sys.cstr(str(tmp_path / "f")), O_RDONLY, 0)
    assert sys("pread64", fd, SCRATCH + 0x1000, 3, (1 << 64) - 5) == -errno.EINVAL
    assert sys("lseek", fd, 0, 1 << 40) == -errno.EINVAL          # whence no C int holds
    assert sys("write", fd, SCRATCH, 1) == -errno.EBADF
    assert sys("pread64", fd, SCRATCH + 0x1000, 3, 1) == 2
    assert sys.m.memory.read(SCRATCH + 0x1000, 2) == b"bc"


def test_fifo_under_fs_is_refused_not_a_hang(arch, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    sys = Syscalls(arch, tmp_path, fs_root=tmp_path)
    assert sys("openat", AT_FDCWD, sys.cstr(str(tmp_path / "fifo")), O_RDONLY, 0) == -errno.ENXIO


def test_open_policy(arch, tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    ro = Syscalls(arch, tmp_path, fs_root=tmp_path)
    assert ro("openat", AT_FDCWD, ro.cstr(str(tmp_path / "f")), O_WRONLY, 0) == -errno.EROFS
    assert ro("openat", AT_FDCWD, ro.cstr(str(tmp_path / "g")), O_RDONLY | O_CREAT, 0o644) == -errno.EROFS
    assert ro("openat", AT_FDCWD, ro.cstr("/etc/passwd"), O_RDONLY, 0) == -errno.ENOENT
    assert ro("openat", AT_FDCWD, ro.cstr("/dev/null"), O_RDONLY, 0) == 3
    assert ro("openat", AT_FDCWD, ro.cstr("/dev/tty"), O_RDONLY, 0) == -errno.ENXIO
    assert ro("mkdirat", AT_FDCWD, ro.cstr(str(tmp_path / "d")), 0o755) == -errno.EROFS
    none = Syscalls(arch, tmp_path)
    assert none("openat", AT_FDCWD, none.cstr(str(tmp_path / "f")), O_RDONLY, 0) == -errno.ENOENT


def test_brk_refuses_what_cannot_be_mapped(arch, tmp_path):
    """brk to 1 TiB raised UcError(NOMEM); Linux's brk just returns the old break."""
    sys = Syscalls(arch, tmp_path)
    start = sys("brk", 0)
    assert sys("brk", start + (1 << 40)) == start
    assert sys("brk", MMAP_BASE + 0x1000) == start               # into the mmap area
    assert sys("brk", start + 0x3000) == start + 0x3000
    assert sys.m.memory.is_mapped(start, 0x3000)
    assert sys("brk", start + 0x1000) == start + 0x1000
    assert not sys.m.memory.is_mapped(start + 0x1000, 0x1000)
    assert sys("brk", start) == start                          # the heap can be emptied
    assert not sys.m.memory.is_mapped(start, 0x1000)
    assert sys("brk", start - 0x1000) == start


def test_mmap_hostile_arguments(arch, tmp_path):
    sys = Syscalls(arch, tmp_path)
    anon, fixed = 0x22, 0x32                                  # MAP_PRIVATE|MAP_ANONYMOUS (+FIXED)
    assert sys("mmap", 0, 1 << 60, 3, anon, -1, 0) == -errno.ENOMEM
    assert sys("mmap", 0, 0x1000, 3, fixed, -1, 0) == -errno.EPERM
    assert sys("mmap", 1 << 63, 0x1000, 3, fixed, -1, 0) == -errno.ENOMEM
    assert sys("mmap", 0x8000_0000_0000 - 0x1000, 0x2000, 3, fixed, -1, 0) == -errno.ENOMEM
    assert sys("mmap", 0, 0, 3, anon, -1, 0) == -errno.EINVAL
    addr = sys("mmap", 1 << 63, 0x2000, 3, anon, -1, 0)       # a bad hint is only a hint
    assert addr >= MMAP_BASE and sys.m.memory.is_mapped(addr, 0x2000)


def test_mmap_of_a_file_reads_only_the_file(arch, tmp_path):
    """mmap(len=1 GiB) of a 5-byte file: pread used to allocate the whole length."""
    (tmp_path / "f").write_bytes(b"hello")
    sys = Syscalls(arch, tmp_path, fs_root=tmp_path)
    fd = sys("openat", AT_FDCWD, sys.cstr(str(tmp_path / "f")), O_RDONLY, 0)
    addr = sys("mmap", 0, 1 << 30, 1, 0x2, fd, 0)             # MAP_PRIVATE
    assert addr >= MMAP_BASE
    assert sys.m.memory.read(addr, 8) == b"hello\0\0\0"
    assert sys("mmap", 0, 0x1000, 1, 0x2, fd, 0x10000) >= MMAP_BASE    # offset past the end


def test_mremap_hostile_arguments(arch, tmp_path):
    """mremap(addr, 0, ...) crashed on a None region."""
    sys = Syscalls(arch, tmp_path)
    assert sys("mremap", SCRATCH, 0, 0x1000, 1) == -errno.EINVAL
    assert sys("mremap", SCRATCH, 0x1000, 0, 1) == -errno.EINVAL
    assert sys("mremap", 0x1234_0000, 0x1000, 0x2000, 1) == -errno.EFAULT
    assert sys("mremap", SCRATCH, 0x1000, 1 << 60, 1) == -errno.ENOMEM
    sys.m.memory.write(SCRATCH, b"keep")
    new = sys("mremap", SCRATCH, 0x4000, 0x10000, 1)          # MREMAP_MAYMOVE
    assert new > 0 and sys.m.memory.read(new, 4) == b"keep"


def test_dup2_out_of_range_is_ebadf(arch, tmp_path):
    """dup3(1, -5) used to install fd -5 in the table."""
    sys = Syscalls(arch, tmp_path)
    assert sys("dup3", 1, (1 << 64) - 5, 0) == -errno.EBADF
    assert sys("dup3", 1, 5000, 0) == -errno.EBADF
    assert -5 not in sys.proc.fds.files
    assert sys("dup3", 1, 7, 0) == 7 and sys.proc.fds.get(7) is sys.proc.fds.get(1)


def test_nanosleep_validates_and_advances_model_time(arch, tmp_path):
    """A negative tv_sec turned the guest's clock back."""
    sys = Syscalls(arch, tmp_path)
    clock = sys.m.clock
    sys.m.memory.write(SCRATCH, struct.pack("<qq", -5, 0))
    before = clock.cycles
    assert sys("clock_nanosleep", 1, 0, SCRATCH, 0) == -errno.EINVAL
    sys.m.memory.write(SCRATCH, struct.pack("<qq", 0, 1_000_000_000))
    assert sys("clock_nanosleep", 1, 0, SCRATCH, 0) == -errno.EINVAL
    assert clock.cycles == before
    sys.m.memory.write(SCRATCH, struct.pack("<qq", 2, 500_000_000))
    mono = clock.monotonic_ns()
    assert sys("clock_nanosleep", 1, 0, SCRATCH, 0) == 0
    assert 2_500_000_000 <= clock.monotonic_ns() - mono < 2_600_000_000


def test_clock_gettime_is_model_time(arch, tmp_path):
    sys = Syscalls(arch, tmp_path)
    assert sys("clock_gettime", 0, SCRATCH) == 0
    sec, nsec = struct.unpack("<qq", sys.m.memory.read(SCRATCH, 16))
    assert sec == 1_767_225_600 and nsec == sys.m.clock.monotonic_ns()
    assert sys("clock_gettime", 1, SCRATCH) == 0
    assert struct.unpack("<qq", sys.m.memory.read(SCRATCH, 16)) == (0, sys.m.clock.monotonic_ns())


def test_statx_device_numbers(arch, tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    sys = Syscalls(arch, tmp_path, fs_root=tmp_path)
    assert sys("statx", AT_FDCWD, sys.cstr(str(tmp_path / "f")), 0, 0x7FF, SCRATCH + 0x100) == 0
    raw = sys.m.memory.read(SCRATCH + 0x100, 256)
    st = os.stat(tmp_path / "f")
    assert struct.unpack_from("<Q", raw, 0x28)[0] == 3                     # stx_size
    assert struct.unpack_from("<II", raw, 0x88) == (os.major(st.st_dev), os.minor(st.st_dev))


def test_bad_pointers_are_efault(arch, tmp_path):
    sys = Syscalls(arch, tmp_path, stdin=b"data")
    assert sys("write", 1, 0xDEAD_0000, 4) == -errno.EFAULT
    assert sys("openat", AT_FDCWD, 0xDEAD_0000, 0, 0) == -errno.EFAULT
    assert sys("uname", 0) == -errno.EFAULT
    assert sys("clock_gettime", 0, 0x401000) == -errno.EFAULT   # text: mapped, not writable
    text = sys.m.memory.read(0x401000, 16)
    assert sys("read", 0, 0x401000, 4) == -errno.EFAULT and sys.m.memory.read(0x401000, 16) == text
    assert sys("close", 77) == -errno.EBADF


def _fuzz_values(sys_) -> list[int]:
    sp = sys_.m.sp
    return [0, 1, 2, 3, 4, 0o101, 0o1101, 0o200000, 0x1000, 0xFFFFFFFF, 1 << 40, 1 << 63,
            (1 << 64) - 1, (1 << 64) - 100, SCRATCH, SCRATCH + 0x3FF0, 0x400000, sp, sp - 0x2000,
            0xDEAD_0000, 0x7FFF_FFFF_E000]


@pytest.mark.slow
def test_syscall_fuzz_never_raises(arch, tmp_path):
    """Every handler, hostile argument mixes: a -errno or a value, never a Python exception
    (each failure class found here became one of the tests above)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "file.txt").write_bytes(b"abc\n" * 100)
    rng = random.Random(1234)
    # brk has its own test: unmapping a 4 GiB heap costs Unicorn seconds (a page at a time)
    names = sorted(n for n in SYSCALLS if n in Syscalls(arch, tmp_path).arch.syscalls and n != "brk")
    assert len(names) > 70
    for name in names:
        sys = Syscalls(arch, tmp_path, fs_root=root, writable=True, stdin=b"input")
        sys.cstr(str(root / "file.txt"))
        values = _fuzz_values(sys)
        for _ in range(60):
            args = [rng.choice(values) for _ in range(6)]
            try:
                ret = sys(name, *args)
            except Exception as e:  # noqa: BLE001 - the assertion names the culprit
                raise AssertionError(f"{name}({', '.join(map(hex, args))}) raised {e!r}") from e
            assert isinstance(ret, int)
            sys.m._stop = None                    # exit/kill only request a stop


def test_tls_register(arch, tmp_path):
    """x86-64 sets FS base through arch_prctl; arm64 writes tpidr_el0 itself (no syscall)."""
    sys = Syscalls(arch, tmp_path)
    if arch == "x86_64":
        assert sys("arch_prctl", 0x1002, 0x500100) == 0                    # ARCH_SET_FS
        assert sys.m.reg("fs_base") == 0x500100
        assert sys("arch_prctl", 0x1003, SCRATCH + 0x200) == 0              # ARCH_GET_FS
        assert sys.m.memory.read_u64(SCRATCH + 0x200) == 0x500100
        assert sys("arch_prctl", 0x9999, 0) == -errno.EINVAL
    else:
        assert "arch_prctl" not in sys.arch.syscalls
        assert sys.m.reg("tpidr_el0") == 0
