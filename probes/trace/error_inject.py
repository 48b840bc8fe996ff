"""The error-injection list (lib/error-inject.c): which functions bpf_override_return
may make return early.

`ALLOW_ERROR_INJECTION(fn, TYPE)` puts a `struct error_injection_entry {unsigned long
addr; int etype;}` (16 bytes) into the `_error_injection_whitelist` section; each entry
allows the whole function that contains `addr`. A guest built with the macro carries its
own list; a test or tool may add functions with `allow`."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emu.machine import Machine

SECTION = "_error_injection_whitelist"
_ENTRY = struct.Struct("<Qi4x")


class EiEtype(IntEnum):
    EI_ETYPE_NULL = 0
    EI_ETYPE_ERRNO = 1
    EI_ETYPE_ERRNO_NULL = 2
    EI_ETYPE_TRUE = 3


@dataclass
class ErrorInjectionList:
    """Function start address -> etype, from the guest's section plus `allow`."""
    m: "Machine"
    entries: dict[int, EiEtype] = field(default_factory=dict)

    @classmethod
    def from_machine(cls, machine: "Machine") -> "ErrorInjectionList":
        eil = cls(machine)
        image = machine.image
        for name, addr, size, _x in (image.section_ranges if image is not None else []):
            if name != SECTION:
                continue
            data = machine.memory.read(addr, size - size % _ENTRY.size)
            for off in range(0, len(data), _ENTRY.size):
                ea, etype = _ENTRY.unpack_from(data, off)
                eil._add(ea, etype)
        return eil

    def _add(self, addr: int, etype: int) -> None:
        sym = self.m.symbols.find(addr)
        if sym is not None:     # populate_error_injection_list: the kallsyms range of addr
            self.entries[sym.addr] = EiEtype(etype) if 0 <= etype <= 3 else etype

    def allow(self, symbol: str, etype: EiEtype = EiEtype.EI_ETYPE_ERRNO) -> None:
        sym = self.m.symbols.lookup(symbol)
        if sym is None:
            raise KeyError(symbol)
        self.entries[sym.addr] = etype

    def within_error_injection_list(self, addr: int) -> bool:
        sym = self.m.symbols.find(addr)
        return sym is not None and sym.addr in self.entries

    def get_injectable_error_type(self, addr: int) -> int:
        sym = self.m.symbols.find(addr)
        return self.entries.get(sym.addr, -22) if sym is not None else -22


def error_injection_list(machine: "Machine") -> ErrorInjectionList:
    return machine.layer("error_inject", ErrorInjectionList.from_machine)
