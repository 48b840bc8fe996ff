"""File descriptors and the guest's view of the host file system.

Guests are untrusted: host files are visible only under the directory the user grants
(`--fs DIR`), read-only unless writes are granted too. Paths are resolved on the host
(symlinks included) and must stay inside the granted directory; anything else is ENOENT,
as if the file did not exist. stdin/stdout/stderr pass through."""
from __future__ import annotations

import errno
import os
import select
import stat as st
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from emu.linux.pipe import Pipe, PipeError

O_ACCMODE, O_WRONLY, O_RDWR = 3, 1, 2
O_CREAT, O_TRUNC, O_APPEND, O_DIRECTORY = 0o100, 0o1000, 0o2000, 0o200000
O_NONBLOCK = 0o4000
AT_FDCWD = -100
PATH_MAX = 4096
_WAIT_SLICE = 0.05                 # seconds between deadline checks of a blocking host read


class ReadPastDeadline(Exception):
    """A blocking read of a host stream was still waiting at the run's deadline."""


class FsError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err


@dataclass
class OpenFile:
    """An open file description (shared by dup'ed descriptors)."""
    kind: str                    # "stream" | "host" | "dir" | "null" | "pipe"
    path: str = ""
    flags: int = 0
    stream: BinaryIO | None = None
    host_fd: int | None = None
    pipe: Pipe | None = None
    dir_entries: list[tuple[bytes, int, int]] | None = None
    dir_pos: int = 0

    @property
    def nonblock(self) -> bool:
        return bool(self.flags & O_NONBLOCK)

    def read(self, n: int, deadline: float | None = None) -> bytes:
        """At most n bytes; a host stream waits no later than `deadline` (time.monotonic)."""
        if self.kind == "stream":
            return _read_stream(self.stream, n, deadline)
        if self.kind == "host":
            return os.read(self.host_fd, n)
        if self.kind == "pipe":
            if self.flags & O_ACCMODE != 0:
                raise FsError(errno.EBADF)
            return _pipe_call(self.pipe.read, n, self.nonblock)
        if self.kind == "dir":
            raise FsError(errno.EISDIR)
        return b""

    def write(self, data: bytes) -> int:
        if (self.flags & O_ACCMODE) == 0 and self.kind != "stream":
            raise FsError(errno.EBADF)
        if self.kind == "stream":
            self.stream.write(data)
            return len(data)
        if self.kind == "host":
            return os.write(self.host_fd, data)
        if self.kind == "pipe":
            return _pipe_call(self.pipe.write, data, self.nonblock)
        if self.kind == "dir":
            raise FsError(errno.EISDIR)
        return len(data)

    def close(self) -> None:
        if self.host_fd is not None:
            os.close(self.host_fd)
            self.host_fd = None
        if self.pipe is not None:
            if self.flags & O_ACCMODE:
                self.pipe.writers -= 1
            else:
                self.pipe.readers -= 1
            self.pipe = None


def _pipe_call(fn, arg, nonblock: bool):
    try:
        return fn(arg, nonblock)
    except PipeError as e:
        raise FsError(e.errno) from None


def _read_stream(stream: BinaryIO | None, n: int, deadline: float | None) -> bytes:
    if stream is None:
        return b""
    try:
        fileno = stream.fileno()
    except (OSError, AttributeError, ValueError):
        return stream.read(n) or b""
    if deadline is not None:     # wait in slices so --timeout holds while the guest blocks
        while not select.select([fileno], [], [], _WAIT_SLICE)[0]:
            if time.monotonic() >= deadline:
                raise ReadPastDeadline()
    return os.read(fileno, n)     # like read(2): what is available, not necessarily n bytes


@dataclass
class FileSystem:
    """The granted root (None: no host files) and the guest's working directory."""
    root: str | None = None
    writable: bool = False
    cwd: str = "/"
    exe_path: str = ""

    def __post_init__(self) -> None:
        if self.root is not None:
            self.root = os.path.realpath(self.root)
            here = os.path.realpath(os.getcwd())
            self.cwd = here if _inside(here, self.root) else self.root

    def resolve(self, path: str, base: str | None = None, follow: bool = True) -> str:
        """The host path for a guest path, or FsError(ENOENT) outside the granted root.
        With follow=False a symlink in the last component is not followed (lstat,
        readlink): its directory is resolved and must lie inside the root."""
        if not path:
            raise FsError(errno.ENOENT)
        full = os.path.normpath(os.path.join(base or self.cwd, path))
        if self.root is None:
            raise FsError(errno.ENOENT)
        head, tail = os.path.split(full)
        if follow or tail in ("", ".", ".."):
            real = os.path.realpath(full)
        else:
            real = os.path.join(os.path.realpath(head), tail)
        if not _inside(real, self.root):
            raise FsError(errno.ENOENT)
        return real

    def guest_path(self, host: str) -> str:
        """How the guest may name a host path: itself inside the granted root (the guest
        sees host paths there), else only its base name under / (no host directory leaks)."""
        real = os.path.realpath(host) if host else "/"
        if self.root is not None and _inside(real, self.root):
            return real
        return "/" + os.path.basename(real) if real != "/" else "/"

    def open(self, path: str, flags: int, mode: int, base: str | None = None) -> OpenFile:
        if path == "/dev/null":
            return OpenFile("null", path, flags)
        if path in ("/dev/tty", "/dev/console"):
            raise FsError(errno.ENXIO)
        host = self.resolve(path, base)
        wants_write = (flags & O_ACCMODE) != 0 or flags & (O_CREAT | O_TRUNC | O_APPEND)
        if wants_write and not self.writable:
            raise FsError(errno.EROFS)
        try:
            mode_bits = os.stat(host).st_mode if os.path.exists(host) else 0
            if st.S_ISFIFO(mode_bits) or st.S_ISSOCK(mode_bits):
                raise FsError(errno.ENXIO)      # opening a host FIFO would block the emulator
            if os.path.isdir(host):
                if (flags & O_ACCMODE) != 0:
                    raise FsError(errno.EISDIR)
                return OpenFile("dir", host, flags, dir_entries=_dir_entries(host))
            if flags & O_DIRECTORY:
                raise FsError(errno.ENOTDIR if os.path.exists(host) else errno.ENOENT)
            host_flags = (flags & (O_ACCMODE | O_CREAT | O_TRUNC | O_APPEND)) | os.O_CLOEXEC
            return OpenFile("host", host, flags, host_fd=os.open(host, host_flags, mode & 0o777))
        except OSError as e:
            raise FsError(e.errno) from None

    def stat(self, path: str, base: str | None = None, follow: bool = True) -> os.stat_result:
        host = self.resolve(path, base, follow)
        try:
            return os.stat(host) if follow else os.lstat(host)
        except OSError as e:
            raise FsError(e.errno) from None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _dir_entries(host: str) -> list[tuple[bytes, int, int]]:
    """(name, ino, d_type) sorted by name so listings are deterministic; names are the
    host's bytes (not necessarily UTF-8)."""
    out = [(b".", 1, 4), (b"..", 2, 4)]
    for name in sorted(os.listdir(os.fsencode(host))):
        try:
            s = os.lstat(os.path.join(os.fsencode(host), name))
        except OSError:
            continue
        dtype = 4 if st.S_ISDIR(s.st_mode) else 10 if st.S_ISLNK(s.st_mode) else 8
        out.append((name, s.st_ino, dtype))
    return out


@dataclass
class FdTable:
    files: dict[int, OpenFile] = field(default_factory=dict)
    cloexec: set[int] = field(default_factory=set)

    def get(self, fd: int) -> OpenFile:
        f = self.files.get(fd)
        if f is None:
            raise FsError(errno.EBADF)
        return f

    def install(self, f: OpenFile, lowest: int = 0) -> int:
        fd = lowest
        while fd in self.files:
            fd += 1
        if fd >= 1024:
            raise FsError(errno.EMFILE)
        self.files[fd] = f
        return fd

    def close(self, fd: int) -> None:
        f = self.files.pop(fd, None)
        if f is None:
            raise FsError(errno.EBADF)
        self.cloexec.discard(fd)
        if not any(g is f for g in self.files.values()):    # identity: equal-looking files differ
            f.close()
