"""Addresses kprobes refuse (kernel/kprobes.c kprobe_blacklist): functions a guest marks
with NOKPROBE_SYMBOL (their addresses in section `_kprobe_blacklist`, whole extents
refused), `name.suffix` clones of those, and the probe layer's own pages."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from emu.machine import Machine

SECTION = "_kprobe_blacklist"
# Whole sections the kernel never probes: __kprobes functions, noinstr, entry code.
REFUSED_SECTIONS = {".kprobes.text": "__kprobes section", ".noinstr.text": "noinstr section",
                    ".entry.text": "entry text"}


@dataclass
class Blacklist:
    ranges: list[tuple[int, int, str]] = field(default_factory=list)   # [start, end), name
    owned: Callable[[int], bool] = lambda addr: False

    @classmethod
    def from_machine(cls, m: Machine, owned: Callable[[int], bool]) -> "Blacklist":
        bl = cls(owned=owned)
        image = m.image
        if image is None:
            return bl
        for name, addr, size, _x in image.section_ranges:
            if name in REFUSED_SECTIONS:
                bl.add(addr, size, REFUSED_SECTIONS[name])
        names = set()
        for fn in image.address_table(SECTION):
            sym = m.symbols.find(fn)
            if sym is not None:
                bl.add(sym.addr, max(sym.size, 1), sym.name)
                names.add(sym.name)
        for sym in m.symbols.functions():      # foo.isra.0 of a blacklisted foo
            base = sym.name.split(".", 1)[0]
            if base != sym.name and base in names:
                bl.add(sym.addr, max(sym.size, 1), sym.name)
        return bl

    def add(self, start: int, size: int, name: str) -> None:
        self.ranges.append((start, start + size, name))

    def reason(self, addr: int) -> str | None:
        if self.owned(addr):
            return "probe layer's own code"
        for start, end, name in self.ranges:
            if start <= addr < end:
                return name if " " in name else f"NOKPROBE_SYMBOL({name})"
        return None
