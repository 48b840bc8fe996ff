"""The symbol table service: name -> address, address -> `name+0xoff/0xsize` (kallsyms
style), and function extents for the probe layer."""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from emu.elf import ElfSymbol


@dataclass(frozen=True)
class Symbol:
    name: str
    addr: int
    size: int
    kind: str

    @property
    def end(self) -> int:
        return self.addr + self.size


class SymbolTable:
    def __init__(self, symbols: list[ElfSymbol] | None = None) -> None:
        self._by_name: dict[str, list[Symbol]] = {}
        self._sorted: list[Symbol] = []
        self._starts: list[int] = []
        for s in symbols or []:
            self.add(s.name, s.addr, s.size, s.kind)

    def add(self, name: str, addr: int, size: int, kind: str = "func") -> Symbol:
        sym = Symbol(name, addr, size, kind)
        self._by_name.setdefault(name, []).append(sym)
        i = bisect.bisect_right(self._starts, addr)
        # Prefer sized, named functions when two symbols share an address (aliases).
        self._sorted.insert(i, sym)
        self._starts.insert(i, addr)
        return sym

    def __len__(self) -> int:
        return len(self._sorted)

    def __iter__(self):
        return iter(self._sorted)

    def lookup_all(self, name: str) -> list[Symbol]:
        return list(self._by_name.get(name, ()))

    def lookup(self, name: str) -> Symbol | None:
        """The symbol called `name` (kallsyms_lookup_name); functions win over data."""
        cands = self._by_name.get(name)
        if not cands:
            return None
        return sorted(cands, key=lambda s: (s.kind != "func", s.size == 0))[0]

    def find(self, addr: int) -> Symbol | None:
        """The symbol whose extent contains `addr` (sized symbols; else nearest preceding)."""
        i = bisect.bisect_right(self._starts, addr)
        best = None
        j = i - 1
        while j >= 0 and j >= i - 64:
            s = self._sorted[j]
            if s.addr <= addr < s.end:
                if best is None or (best.kind != "func" and s.kind == "func"):
                    best = s
                if best.kind == "func":
                    break
            j -= 1
        return best

    def functions(self) -> list[Symbol]:
        seen, out = set(), []
        for s in self._sorted:
            if s.kind == "func" and s.size and s.addr not in seen:
                seen.add(s.addr)
                out.append(s)
        return out

    def format(self, addr: int, with_size: bool = True) -> str:
        """kallsyms `%pS` style: `name+0xoff/0xsize`, or the bare hex address."""
        s = self.find(addr)
        if s is None:
            return f"{addr:#x}"
        if with_size:
            return f"{s.name}+{addr - s.addr:#x}/{s.size:#x}"
        return f"{s.name}+{addr - s.addr:#x}"
