"""Guest memory accessed on the guest's behalf: the one checked path (the kernel's uaccess.h).

Unicorn's host-side `mem_read`/`mem_write` ignore page protections, so a host that copies
with them would let a guest `read(fd, text_addr, n)` patch its own read-only code, or let a
probe's emulated `call` push onto a read-only page. Everything the host does *for* the guest
— syscalls copying buffers, the probe layer emulating or simulating a stepped instruction,
a kretprobe hijacking the return address, BPF helpers reading guest memory — goes through
here, honours the page permissions the guest itself would meet, and fails with a
`UserFault` that carries what the guest's own access would have faulted on.

Writes into executable pages drop Unicorn's translated code for the range, so a guest that
writes code through a syscall runs what it wrote."""
from __future__ import annotations

from unicorn import UcError

from emu.memory import PROT_EXEC, PROT_READ, PROT_WRITE, Memory

__all__ = ["UserFault", "access_ok", "copy_from_user", "copy_to_user", "get_user",
           "put_user", "strncpy_from_user"]


class UserFault(Exception):
    """A checked access met an unmapped page or one without the needed permission.

    Attributes: `addr` (first byte that failed), `write` (True for a store), `mapped`
    (False for an unmapped page). `kind` spells it as the machine's fault reports do."""

    def __init__(self, addr: int, write: bool, mapped: bool) -> None:
        self.addr, self.write, self.mapped = addr, write, mapped
        super().__init__(f"{self.kind} {addr:#x}")

    @property
    def kind(self) -> str:
        if self.write:
            return "write to protected address" if self.mapped else "write to unmapped address"
        return "read of protected address" if self.mapped else "read of unmapped address"


def _check(mem: Memory, addr: int, n: int, prot: int) -> None:
    """Raise UserFault at the first byte of [addr, addr+n) that lacks `prot`."""
    end = addr + n
    if addr < 0 or end > mem.task_size:    # access_ok's range check: nothing above is the guest's
        bad = addr if addr < 0 or addr >= mem.task_size else mem.task_size
        raise UserFault(min(max(bad, 0), (1 << 64) - 1), prot == PROT_WRITE, False)
    while addr < end:
        r = mem.find(addr)
        if r is None or not r.prot & prot:
            raise UserFault(addr, prot == PROT_WRITE, r is not None)
        addr = r.end


def access_ok(mem: Memory, addr: int, n: int, prot: int = PROT_READ) -> bool:
    """True when the guest itself could access all of [addr, addr+n) with `prot`."""
    try:
        _check(mem, addr, n, prot)
    except UserFault:
        return False
    return True


def copy_from_user(mem: Memory, addr: int, n: int) -> bytes:
    if n <= 0:
        return b""
    _check(mem, addr, n, PROT_READ)
    return bytes(mem.uc.mem_read(addr, n))


def copy_to_user(mem: Memory, addr: int, data: bytes) -> None:
    if not data:
        return
    _check(mem, addr, len(data), PROT_WRITE)
    mem.uc.mem_write(addr, bytes(data))
    end = addr + len(data)
    for r in mem.overlapping(addr, end):
        if r.prot & PROT_EXEC:   # writable and executable: drop stale translations
            mem.remove_cache(max(addr, r.start), min(end, r.end))


def get_user(mem: Memory, addr: int, size: int = 8) -> int:
    """A little-endian unsigned load of `size` bytes, checked."""
    return int.from_bytes(copy_from_user(mem, addr, size), "little")


def put_user(mem: Memory, addr: int, value: int, size: int = 8) -> None:
    copy_to_user(mem, addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))


def strncpy_from_user(mem: Memory, addr: int, limit: int = 4096) -> bytes:
    """Bytes up to (not including) the NUL, at most `limit`; faults like the guest would
    only if the string runs into a page it cannot read before its NUL."""
    out = bytearray()
    page = 0x1000
    while len(out) < limit:
        cur = addr + len(out)
        n = min(limit - len(out), page - (cur % page))
        _check(mem, cur, 1, PROT_READ)
        try:
            chunk = bytes(mem.uc.mem_read(cur, n))
        except UcError:
            raise UserFault(cur, False, False) from None
        nul = chunk.find(b"\0")
        if nul >= 0:
            return bytes(out + chunk[:nul])
        out += chunk
    return bytes(out)
