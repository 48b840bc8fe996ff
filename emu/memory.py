"""Guest memory: Unicorn mappings with names and permissions, and a deterministic allocator
for mmap-style requests. Every mapping goes through here so faults and `emu info` can name
the region an address falls in.

Every mapping — the image, the stack, the heap, mmaps and the probe layer's slot pages —
counts against one budget, `max_memory` (`emu run --max-memory`, default 4 GiB), as
RLIMIT_AS counts a process's address space: past it `map` raises `MemoryLimit`, which the
syscalls turn into ENOMEM. Adjacent regions with the same permissions and name merge as
the kernel merges VMAs, and, as vm.max_map_count, at most 65,530 regions exist, so
thousands of small mmaps stay cheap.

With several vCPUs (emu/smp.py) every CPU has its own Unicorn over one guest memory: each
mapping is then a host buffer mapped into every Uc with `mem_map_ptr` (`share_with`), and
map, unmap and protect apply to all of them. With one CPU, Unicorn owns the memory as
before.

A machine's Memory also keeps its TLB's permission table (emu/vtlb.py, `tlb`) current: every
map, unmap and protect assigns the range its permissions and flushes every Uc's TLB."""
from __future__ import annotations

import bisect
import ctypes
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unicorn import UcError
from unicorn.unicorn_py3.unicorn import Uc   # (not `unicorn.Uc`: type checkers read the Py2 one)
from unicorn import unicorn_const as UC

if TYPE_CHECKING:
    from emu.vtlb import Vtlb

PAGE = 0x1000
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
DEFAULT_MAX_MEMORY = 4 << 30        # bytes of guest mappings (RLIMIT_AS-like), --max-memory
MAX_MAP_COUNT = 65530               # Linux's default vm.max_map_count


class MemoryLimit(UcError):
    """A mapping refused by the memory budget or the region cap (the guest sees ENOMEM).
    Attributes: `requested` bytes, `mapped` bytes already mapped, `limit`."""

    def __init__(self, requested: int, mapped: int, limit: int) -> None:
        super().__init__(UC.UC_ERR_NOMEM)
        self.requested, self.mapped, self.limit = requested, mapped, limit


def page_down(x: int) -> int:
    return x & ~(PAGE - 1)


def page_up(x: int) -> int:
    return (x + PAGE - 1) & ~(PAGE - 1)


def perms_to_uc(prot: int) -> int:
    """Linux PROT_* bits and Unicorn's UC_PROT_* bits coincide (R=1, W=2, X=4)."""
    return prot & (UC.UC_PROT_READ | UC.UC_PROT_WRITE | UC.UC_PROT_EXEC)


def perms_str(prot: int) -> str:
    return "".join(c if prot & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4)))


@dataclass
class Region:
    start: int
    end: int
    prot: int
    name: str

    def __contains__(self, addr: int) -> bool:
        return self.start <= addr < self.end


class HostBuffer:
    """Host memory behind one mapping when several Ucs share it; `refs` counts the guest
    ranges still mapped over it (an unmap may split one)."""

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, size)
        self._view = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(self._view)
        self.refs = 0

    def release(self) -> None:
        del self._view
        self.mm.close()


class _ExternalBuffer(HostBuffer):
    """A host buffer map_host maps but does not own: releasing it frees nothing."""

    def __init__(self, addr: int) -> None:
        self.addr, self.refs = addr, 0

    def release(self) -> None:
        pass


@dataclass
class Backing:
    """[start, end) of guest memory lives at `buf.addr + offset`."""
    start: int
    end: int
    buf: HostBuffer
    offset: int


class Memory:
    """Page-granular guest mappings on the machine's Unicorn (one per vCPU, sharing it)."""

    def __init__(self, uc: Uc, max_memory: int = DEFAULT_MAX_MEMORY) -> None:
        self.uc = uc                      # reads and writes: any Uc sees the one memory
        self.ucs: list[Uc] = [uc]
        self._backing: list[Backing] | None = None   # host buffers once shared, by start
        self.regions: list[Region] = []   # sorted by start, non-overlapping
        self.max_memory = max_memory
        self.mapped_bytes = 0             # MMIO noted with note_region is not counted
        # TASK_SIZE: the end of what the guest may map or hand to a syscall. Linux user mode
        # sets the arch's; above it only the machine's own pages live (x86's [gdt]).
        self.task_size = 1 << 64
        # find_free's memo, the free-area cache of old Linux: for a `lo`, an address below
        # which [lo, addr) holds no free page; dropped whenever a region goes away.
        self._full_below: dict[int, int] = {}
        # The TLB whose fills answer from this memory's permissions (the machine's; None
        # for a Memory of its own, as tests and benchmarks make).
        self.tlb: Vtlb | None = None
        self._external: dict[int, Backing] = {}   # map_host's mappings, by start

    # --- mapping ----------------------------------------------------------------------------
    def map(self, start: int, size: int, prot: int, name: str) -> None:
        """Map fresh zero pages; MemoryLimit past the budget or the region cap."""
        start, end = page_down(start), page_up(start + size)
        if self.mapped_bytes + (end - start) > self.max_memory or len(self.regions) >= MAX_MAP_COUNT:
            raise MemoryLimit(end - start, self.mapped_bytes, self.max_memory)
        if self._backing is None:
            self.uc.mem_map(start, end - start, perms_to_uc(prot))
        else:
            self._map_shared(start, end, perms_to_uc(prot), None)
        self._tlb_assign(start, end, perms_to_uc(prot))
        self.mapped_bytes += end - start
        self._insert(Region(start, end, prot, name))

    def map_host(self, start: int, size: int, prot: int, name: str, host_addr: int) -> None:
        """Map page-aligned host memory the caller owns (and keeps alive while mapped) at
        ``start`` on every Uc: the guest and the host then share those bytes (BPF hash
        values). Counted in the budget like any mapping; never copied, moved or freed here."""
        if start % PAGE or size % PAGE or host_addr % PAGE or not size:
            raise ValueError("map_host: page-aligned start, size and host address only")
        if self.mapped_bytes + size > self.max_memory or len(self.regions) >= MAX_MAP_COUNT:
            raise MemoryLimit(size, self.mapped_bytes, self.max_memory)
        for uc in self.ucs:
            uc.mem_map_ptr(start, size, perms_to_uc(prot), host_addr)
        buf = _ExternalBuffer(host_addr)
        self._external[start] = Backing(start, start + size, buf, 0)
        if self._backing is not None:
            buf.refs = 1
            bisect.insort(self._backing, self._external[start], key=lambda b: b.start)
        self._tlb_assign(start, start + size, perms_to_uc(prot))
        self.mapped_bytes += size
        self._insert(Region(start, start + size, prot, name))

    def note_region(self, start: int, size: int, name: str) -> None:
        """Record a region mapped elsewhere (MMIO) so faults and listings can name it."""
        self._tlb_assign(start, start + size, UC.UC_PROT_READ | UC.UC_PROT_WRITE)
        self._insert(Region(start, start + size, PROT_READ | PROT_WRITE, name))

    def _insert(self, region: Region) -> None:
        """Insert, merging with neighbours that touch it and match (as VMAs merge)."""
        regs = self.regions
        i = bisect.bisect_left(regs, region.start, key=_start)
        if i > 0 and _mergeable(regs[i - 1], region):
            region = Region(regs[i - 1].start, region.end, region.prot, region.name)
            i -= 1
            del regs[i]
        if i < len(regs) and _mergeable(region, regs[i]):
            region = Region(region.start, regs[i].end, region.prot, region.name)
            del regs[i]
        regs.insert(i, region)

    def unmap(self, start: int, size: int) -> None:
        start, end = page_down(start), page_up(start + size)
        for r in self.overlapping(start, end):
            lo, hi = max(r.start, start), min(r.end, end)
            if r.prot & PROT_EXEC:
                self.remove_cache(lo, hi)     # while still executable: see protect
            self._unmap_pages(lo, hi)
            self.mapped_bytes -= hi - lo
            self._split(r, lo, hi, None)

    def protect(self, start: int, size: int, prot: int) -> None:
        """Change permissions. Unicorn checks fetch permission only when it translates, so
        code translated while executable would keep running: drop it (NX after mprotect),
        before the TLB loses execute (Unicorn finds the code through a fetch translation)."""
        start, end = page_down(start), page_up(start + size)
        for r in self.overlapping(start, end):
            lo, hi = max(r.start, start), min(r.end, end)
            if r.prot & PROT_EXEC and not prot & PROT_EXEC:
                self.remove_cache(lo, hi)
            for uc in self.ucs:
                uc.mem_protect(lo, hi - lo, perms_to_uc(prot))
            self._tlb_assign(lo, hi, perms_to_uc(prot))
            self._split(r, lo, hi, prot)

    def map_raw(self, start: int, end: int, perms: int) -> None:
        """Map [start, end) with Unicorn `perms` on every Uc, zeroed, without touching the
        named regions or the budget (a snapshot restore puts those back itself)."""
        if self._backing is None:
            self.uc.mem_map(start, end - start, perms)
        else:
            self._map_shared(start, end, perms, None)
        self._tlb_assign(start, end, perms)

    def unmap_raw(self, start: int, end: int) -> None:
        """Unmap [start, end) from every Uc (and its host buffer), regions untouched."""
        self.remove_cache(start, end)       # while still executable: see protect
        self._unmap_pages(start, end)

    def _unmap_pages(self, start: int, end: int) -> None:
        """[start, end) off every Uc, its host buffer (shared or map_host's) and the TLB."""
        for uc in self.ucs:
            uc.mem_unmap(start, end - start)
        if self._backing is not None:
            self._unback(start, end)
        for k in [k for k in self._external if start <= k < end]:
            del self._external[k]
        self._tlb_assign(start, end, None)

    def _tlb_assign(self, start: int, end: int, perms: int | None) -> None:
        """The TLB's table learns [start, end)'s new perms (None: unmapped) and every Uc
        forgets its translations (Unicorn flushes on map and unmap but not on protect)."""
        if self.tlb is not None:
            self.tlb.assign(start, end, perms)
            self.tlb.flush(self.ucs)

    def tlb_reset(self) -> None:
        """Rebuild the TLB's table from Unicorn's mappings and flush (a snapshot restore)."""
        if self.tlb is not None:
            self.tlb.reset((b, e + 1, p) for b, e, p in self.uc.mem_regions())
            self.tlb.flush(self.ucs)

    def remove_cache(self, start: int, end: int) -> None:
        """Drop code translated from [start, end) on every CPU (each Uc has its own cache).
        Unicorn finds the code through a fetch translation of a range's first page, which
        the TLB refuses on a page without execute: so each executable part of the regions
        the range covers goes on its own (a range no region names, as a whole)."""
        regions = self.overlapping(start, end)
        parts = [(max(r.start, start), min(r.end, end)) for r in regions if r.prot & PROT_EXEC]
        for lo, hi in parts if regions else [(start, end)]:
            for uc in self.ucs:
                uc.ctl_remove_cache(lo, hi)

    # --- several Ucs over one memory -----------------------------------------------------
    def share(self) -> None:
        """From now on every mapping is a host buffer other Ucs can map: the memory the
        first Uc owns moves into such buffers (contents kept). Not inside a run."""
        if self._backing is not None:
            return
        self._backing = []
        for begin, last, perms in sorted(self.uc.mem_regions()):
            ext = self._external.get(begin)
            if ext is not None:             # the caller's memory: stays where it is
                ext.buf.refs = 1
                self._backing.append(ext)
                continue
            data = bytes(self.uc.mem_read(begin, last + 1 - begin))
            self.uc.mem_unmap(begin, last + 1 - begin)
            self._map_shared(begin, last + 1, perms, data)

    def share_with(self, uc: Uc) -> None:
        """Map every mapping into another vCPU's `uc` too, with its permissions."""
        self.share()
        assert self._backing is not None
        for b in self._backing:
            uc.mem_map_ptr(b.start, b.end - b.start, UC.UC_PROT_NONE, b.buf.addr + b.offset)
        for begin, last, perms in self.uc.mem_regions():
            uc.mem_protect(begin, last + 1 - begin, perms)
        self.ucs.append(uc)
        if self.tlb is not None:
            self.tlb.flush(self.ucs)

    def _map_shared(self, start: int, end: int, perms: int, data: bytes | None) -> None:
        assert self._backing is not None
        buf = HostBuffer(end - start)
        if data:
            buf.mm[:len(data)] = data
        for uc in self.ucs:
            uc.mem_map_ptr(start, end - start, perms, buf.addr)
        buf.refs = 1
        bisect.insort(self._backing, Backing(start, end, buf, 0), key=lambda b: b.start)

    def _unback(self, lo: int, hi: int) -> None:
        """Forget [lo, hi) of the host buffers; a buffer nothing maps any more is freed."""
        assert self._backing is not None
        kept: list[Backing] = []
        for b in self._backing:
            if b.end <= lo or hi <= b.start:
                kept.append(b)
                continue
            b.buf.refs -= 1
            for s, e in ((b.start, lo), (hi, b.end)):
                if s < e:
                    kept.append(Backing(s, e, b.buf, b.offset + s - b.start))
                    b.buf.refs += 1
            if b.buf.refs == 0:
                b.buf.release()
        self._backing = kept

    def _split(self, r: Region, lo: int, hi: int, prot: int | None) -> None:
        """Replace r by its parts outside [lo, hi) and, if prot is given, [lo, hi) with prot.
        An earlier step of the same call may have merged r into a neighbour: split that."""
        r = self.find(lo) or r
        del self.regions[bisect.bisect_left(self.regions, r.start, key=_start)]
        if prot is None:
            self._full_below.clear()
        if r.start < lo:
            self._insert(Region(r.start, lo, r.prot, r.name))
        if hi < r.end:
            self._insert(Region(hi, r.end, r.prot, r.name))
        if prot is not None:
            self._insert(Region(lo, hi, prot, r.name))

    def overlapping(self, start: int, end: int) -> list[Region]:
        """Regions meeting [start, end), in address order (a bisect, not a scan)."""
        regs = self.regions
        i = max(bisect.bisect_right(regs, start, key=_start) - 1, 0)
        out = []
        while i < len(regs) and regs[i].start < end:
            if start < regs[i].end:
                out.append(regs[i])
            i += 1
        return out

    def is_mapped(self, start: int, size: int = 1) -> bool:
        addr = start
        while addr < start + size:
            r = self.find(addr)
            if r is None:
                return False
            addr = r.end
        return True

    def find(self, addr: int) -> Region | None:
        i = bisect.bisect_right(self.regions, addr, key=_start) - 1
        if i >= 0 and addr in self.regions[i]:
            return self.regions[i]
        return None

    def find_free(self, size: int, lo: int, hi: int) -> int | None:
        """Lowest page-aligned gap of `size` bytes in [lo, hi): a first-fit, deterministic.
        The scan starts past the fully mapped prefix an earlier call found, so packed
        mappings do not make every call walk all regions."""
        size, lo = page_up(size), page_up(lo)
        cursor = self._full_below.get(lo, lo)
        regs = self.regions
        i = max(bisect.bisect_right(regs, cursor, key=_start) - 1, 0)
        full = None                      # the first hole met: the prefix before it is full
        while i < len(regs) and regs[i].start < cursor + size:
            if regs[i].end > cursor:
                if full is None and regs[i].start > cursor:
                    full = cursor
                cursor = page_up(regs[i].end)
            i += 1
        if len(self._full_below) >= 64:   # hints give many `lo`s: keep the memo small
            self._full_below.clear()
        self._full_below[lo] = cursor if full is None else full
        return cursor if cursor + size <= hi else None

    # --- access -----------------------------------------------------------------------------
    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(addr, size))

    def write(self, addr: int, data: bytes) -> None:
        self.uc.mem_write(addr, bytes(data))

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.uc.mem_read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> None:
        self.uc.mem_write(addr, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def read_cstr(self, addr: int, limit: int = 4096) -> bytes:
        out = bytearray()
        while len(out) < limit:
            chunk = self.read_safe(addr + len(out), min(256, PAGE - ((addr + len(out)) % PAGE)))
            if chunk is None:
                raise UcError(UC.UC_ERR_READ_UNMAPPED)
            nul = chunk.find(b"\0")
            if nul >= 0:
                return bytes(out + chunk[:nul])
            out += chunk
        return bytes(out[:limit])

    def read_safe(self, addr: int, size: int) -> bytes | None:
        try:
            return bytes(self.uc.mem_read(addr, size))
        except UcError:
            return None


def _start(r: Region) -> int:
    return r.start


def _mergeable(a: Region, b: Region) -> bool:
    return a.end == b.start and a.prot == b.prot and a.name == b.name
