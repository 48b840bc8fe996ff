"""Executable pages the probe layer maps into the guest for out-of-line slots, detour
buffers and trampolines (kernel/kprobes.c kprobe_insn_slots). Pages are placed near the
probed text so PC-relative fixes fit (x86 ±2 GiB; arm64 B ±128 MiB)."""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

from emu.machine import Machine
from emu.memory import PAGE, PROT_EXEC, PROT_READ, MemoryLimit
from emu.owners import RegionOwner
from probes.errors import KprobeError

WINDOW = 64 << 20          # search this far below the text, then above it


@dataclass
class InsnSlots:
    machine: Machine
    slot_size: int
    name: str = "[kprobe insn slots]"
    pages: list[int] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    used: set[int] = field(default_factory=set)

    def get(self, near: int) -> int:
        """A free slot (get_insn_slot); maps a new page near `near` when all are used."""
        if not self.free:
            self._grow(near)
        slot = self.free.pop(0)
        self.used.add(slot)
        return slot

    def put(self, slot: int) -> None:
        """free_insn_slot: the slot is reusable; its bytes are poisoned with zeros."""
        if slot in self.used:
            self.used.remove(slot)
            self.machine.text_poke(slot, bytes(self.slot_size))
            self.free.append(slot)
            self.free.sort()

    def owns(self, addr: int) -> bool:
        return any(p <= addr < p + PAGE for p in self.pages)

    def _grow(self, near: int) -> None:
        page = place_near(self.machine, near, PAGE)
        try:
            self.machine.memory.map(page, PAGE, PROT_READ | PROT_EXEC, self.name)
        except MemoryLimit as e:    # --max-memory covers the probe layer's pages too
            raise KprobeError(errno.ENOMEM, f"no room for an instruction slot page "
                              f"({e.mapped} of {e.limit} bytes mapped)") from None
        self.machine.claim_text(page, PAGE, RegionOwner.PROBES, self.name)
        self.pages.append(page)
        self.free.extend(range(page, page + PAGE - self.slot_size + 1, self.slot_size))


TRAMPOLINE_SLOT = 64       # a return trampoline, a detour buffer, an ftrace trampoline


@dataclass
class ProbePages:
    """The probe layer's own executable pages in one machine: the out-of-line slots
    (kprobe_insn_slots) and the trampoline/detour buffers (kprobe_optinsn_slots). Every
    arch job that writes code of its own takes them from here."""
    slots: InsnSlots
    tramps: InsnSlots

    @classmethod
    def for_machine(cls, machine: Machine, slot_size: int) -> "ProbePages":
        return cls(InsnSlots(machine, slot_size),
                   InsnSlots(machine, TRAMPOLINE_SLOT, name="[kprobe trampolines]"))

    def owns(self, addr: int) -> bool:
        return self.slots.owns(addr) or self.tramps.owns(addr)


def place_near(m: Machine, near: int, size: int) -> int:
    """A free, page-aligned range of `size` bytes as close below `near` as possible within
    WINDOW (else above the highest mapping near it); deterministic."""
    mem = m.memory
    hi = (min((r.start for r in mem.regions if r.start <= near < r.end), default=near) & ~(PAGE - 1))
    lo = max(PAGE * 16, hi - WINDOW)
    addr = hi - size
    while addr >= lo:
        clash = mem.overlapping(addr, addr + size)
        if not clash:
            return addr
        addr = (min(r.start for r in clash) - size) & ~(PAGE - 1)
    # Nothing below: go above, leaving room for the heap of a Linux process.
    start = max(r.end for r in mem.regions if r.start < near + WINDOW) + (256 << 20)
    found = mem.find_free(size, start, start + WINDOW)
    if found is None:
        raise MemoryError("no room for probe pages near the text")
    return found
