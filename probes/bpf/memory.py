"""The address space a BPF program sees while it runs.

Every byte a program may touch directly (its context, its stack frames,
map values, ring-buffer records, a packet) is a ``Region`` at a fixed
address; anything else is a fault. Regions are keyed by ``addr >> 32``, so
finding one is a dict lookup and a region never crosses a 4 GiB boundary.
The machine's region addresses are non-canonical on x86-64 and arm64
(0x4000... upward) so helpers can tell them from guest addresses: an
address outside every region is handed to the guest memory accessor
(probe_read), never dereferenced directly.

Left out: memory the kernel exposes through BTF pointers (PTR_TO_BTF_ID).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

VM_BASE = 0x4000_0000_0000_0000
CTX_ADDR = VM_BASE + (0x01 << 32)
MAP_PTR_BASE = VM_BASE + (0x02 << 32)    # map handles: never dereferenceable
FUNC_PTR_BASE = VM_BASE + (0x03 << 32)   # lddw PSEUDO_FUNC code "addresses"
STACK_BASE = VM_BASE + (0x10 << 32)      # frame i's stack at STACK_BASE + i<<32
DYN_BASE_KEY = (VM_BASE >> 32) + 0x1000  # map values, ringbuf records...
# Packets sit below 4 GiB so that the u32 data/data_end fields of xdp_md and
# __sk_buff hold the whole pointer, as the kernel's ctx rewriting provides.
PACKET_ADDR = 0x1000_0000

_UNPACK = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
           8: struct.Struct("<Q")}


class MemoryFault(Exception):
    """Internal: an access outside the program's regions. The machine turns
    it into a BpfRuntimeError naming the instruction."""

    def __init__(self, addr: int, size: int, access: str, why: str = ""):
        self.addr, self.size, self.access = addr, size, access
        why = why or ("write to read-only memory" if access == "write+ro" else "out of bounds")
        verb = "write" if access.startswith("write") else "read"
        super().__init__(f"invalid {verb} of {size} bytes at {addr:#x}: {why}")


@dataclass(eq=False, slots=True)
class Region:
    """A piece of memory at ``base``. ``data`` is shared with its owner
    (a map element, the caller's context buffer), so writes are visible."""

    base: int
    data: bytearray
    writable: bool = True
    name: str = ""

    @property
    def end(self) -> int:
        return self.base + len(self.data)


def _make_load(regions: dict[int, Region], size: int):
    """A load of ``size`` bytes bound to one address space (the compiled path
    calls these in its inner loops, so they avoid attribute lookups)."""
    unpack = _UNPACK[size].unpack_from

    def load(addr: int) -> int:
        region = regions.get(addr >> 32)
        if region is not None:
            off = addr - region.base
            if 0 <= off and off + size <= len(region.data):
                return unpack(region.data, off)[0]
        raise MemoryFault(addr, size, "read")
    return load


def _make_store(regions: dict[int, Region], size: int):
    pack = _UNPACK[size].pack_into
    mask = (1 << (size * 8)) - 1

    def store(addr: int, value: int) -> None:
        region = regions.get(addr >> 32)
        if region is not None:
            off = addr - region.base
            if 0 <= off and off + size <= len(region.data):
                if not region.writable:
                    raise MemoryFault(addr, size, "write+ro")
                pack(region.data, off, value & mask)
                return
        raise MemoryFault(addr, size, "write")
    return store


class VmMemory:
    """The regions of one program run. Attributes: ``regions`` (key ->
    Region, key = address >> 32)."""

    def __init__(self) -> None:
        self.regions: dict[int, Region] = {}
        self._next_key = DYN_BASE_KEY
        self._by_buffer: dict[int, Region] = {}
        self._accessors: dict[tuple[str, int], object] = {}

    def loader(self, size: int):  # -> Callable[[int], int]
        """A load of ``size`` bytes bound to this address space, made on first
        use (the compiled path calls these in its inner loops)."""
        fn = self._accessors.get(("ld", size))
        if fn is None:
            fn = self._accessors[("ld", size)] = _make_load(self.regions, size)
        return fn

    def storer(self, size: int):  # -> Callable[[int, int], None]
        fn = self._accessors.get(("st", size))
        if fn is None:
            fn = self._accessors[("st", size)] = _make_store(self.regions, size)
        return fn

    def add(self, region: Region) -> Region:
        key = region.base >> 32
        assert (region.end - 1) >> 32 == key or not region.data, "region crosses 4 GiB"
        self.regions[key] = region
        return region

    def remove(self, region: Region) -> None:
        if self.regions.get(region.base >> 32) is region:
            del self.regions[region.base >> 32]
        self._by_buffer.pop(id(region.data), None)

    def map_buffer(self, data: bytearray, writable: bool = True, name: str = "") -> Region:
        """The region for an owner's buffer, added on first use. Addresses are
        handed out in order of first use, so runs are reproducible."""
        region = self._by_buffer.get(id(data))
        if region is None or region.data is not data:
            region = Region(self._next_key << 32, data, writable, name)
            self._next_key += 1
            self.add(region)
            self._by_buffer[id(data)] = region
        return region

    def find(self, addr: int, size: int) -> tuple[Region, int] | None:
        region = self.regions.get(addr >> 32)
        if region is None:
            return None
        off = addr - region.base
        if off < 0 or off + size > len(region.data):
            return None
        return region, off

    def contains(self, addr: int) -> bool:
        return self.regions.get(addr >> 32) is not None

    def load(self, addr: int, size: int) -> int:
        region = self.regions.get(addr >> 32)
        if region is not None:
            off = addr - region.base
            if 0 <= off and off + size <= len(region.data):
                return _UNPACK[size].unpack_from(region.data, off)[0]
        raise MemoryFault(addr, size, "read")

    def store(self, addr: int, size: int, value: int) -> None:
        region = self.regions.get(addr >> 32)
        if region is not None:
            off = addr - region.base
            if 0 <= off and off + size <= len(region.data):
                if not region.writable:
                    raise MemoryFault(addr, size, "write+ro")
                _UNPACK[size].pack_into(region.data, off, value & ((1 << (size * 8)) - 1))
                return
        raise MemoryFault(addr, size, "write")

    def read(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        hit = self.find(addr, size)
        if hit is None:
            raise MemoryFault(addr, size, "read")
        region, off = hit
        return bytes(region.data[off:off + size])

    def write(self, addr: int, data: bytes) -> None:
        if not data:
            return
        hit = self.find(addr, len(data))
        if hit is None:
            raise MemoryFault(addr, len(data), "write")
        region, off = hit
        if not region.writable:
            raise MemoryFault(addr, len(data), "write+ro")
        region.data[off:off + len(data)] = data
