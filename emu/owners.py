"""Who mapped a region of guest memory, and for what: the machine's ownership record.

The guest owns everything it (or its loader) mapped. A layer that maps pages for code of
its own (the probe layer's instruction slots and trampolines, later a BPF JIT's images)
claims them here. The record is what the rest of the machine asks, never a region's name:
the cycle model books blocks in a layer's pages apart from guest code, and the syscalls
keep the guest from unmapping or replacing them (kernel memory is not in a process's
address space either)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from enum import StrEnum


class RegionOwner(StrEnum):
    GUEST = "guest"          # the program, its loader, its mmaps (the default)
    PROBES = "probe"         # kprobe slots, trampolines, detour buffers
    BPF = "bpf"              # BPF program images


@dataclass(frozen=True)
class OwnedRange:
    """[start, end) claimed by `owner` for `purpose` (e.g. "[kprobe insn slots]")."""
    start: int
    end: int
    owner: RegionOwner
    purpose: str

    def __contains__(self, addr: int) -> bool:
        return self.start <= addr < self.end


class RegionOwners:
    """The claimed ranges, sorted and non-overlapping; anything unclaimed is the guest's.
    Layers claim a handful of pages, so lookups bisect a short list."""

    def __init__(self) -> None:
        self.ranges: list[OwnedRange] = []

    def claim(self, start: int, size: int, owner: RegionOwner, purpose: str) -> OwnedRange:
        """Record [start, start+size) as `owner`'s; ValueError if it overlaps a claim."""
        r = OwnedRange(start, start + size, RegionOwner(owner), purpose)
        i = bisect.bisect_left(self.ranges, r.start, key=lambda o: o.start)
        if (i > 0 and self.ranges[i - 1].end > r.start) or \
                (i < len(self.ranges) and self.ranges[i].start < r.end):
            raise ValueError(f"{purpose}: [{r.start:#x}, {r.end:#x}) is already claimed")
        self.ranges.insert(i, r)
        return r

    def release(self, start: int, size: int) -> None:
        """Forget the claims inside [start, start+size) (a layer unmapped its pages)."""
        end = start + size
        self.ranges = [r for r in self.ranges if not (start <= r.start and r.end <= end)]

    def find(self, addr: int) -> OwnedRange | None:
        i = bisect.bisect_right(self.ranges, addr, key=lambda o: o.start) - 1
        if i >= 0 and addr in self.ranges[i]:
            return self.ranges[i]
        return None

    def owner_of(self, addr: int) -> RegionOwner:
        r = self.find(addr)
        return RegionOwner.GUEST if r is None else r.owner

    def layers_in(self, start: int, end: int) -> list[OwnedRange]:
        """Claims meeting [start, end), in address order."""
        return [r for r in self.ranges if r.start < end and start < r.end]
