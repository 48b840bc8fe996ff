"""Bare-metal firmware mode: an ELF with no OS, run from its entry.

Memory map and devices (documented in README.md and firmware/README.md):
- arm64: RAM 0x40000000-0x47ffffff, sp = 0x48000000 at entry, EL1; PL011-style UART data
  register at 0x09000000 (a store of one byte = one character); exit device at 0x09100000
  (a 32-bit store of v halts with exit code v); `hlt #imm` halts with exit code 0.
- x86-64: long mode, RAM 0x1000-0x7ffffff (page 0 unmapped), sp = 0x8000000; console on
  port 0x3f8 (`out` of one byte); exit device on port 0xf4 (`out` of v halts with exit
  code v); `hlt` halts with exit code 0."""
from __future__ import annotations

from emu.elf import ElfImage
from emu.linux.process import map_image
from emu.machine import Machine
from emu.memory import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, page_down, page_up


def setup_bare(m: Machine, image: ElfImage) -> None:
    """Map RAM around the image's segments, then the segments, devices and stack."""
    arch = m.arch
    ram_lo, ram_hi = max(arch.bare_base, PAGE), arch.bare_base + arch.bare_ram_size
    map_image(m, image)
    cursor = ram_lo
    for r in sorted(m.memory.overlapping(ram_lo, ram_hi), key=lambda r: r.start):
        if r.start > cursor:
            m.memory.map(cursor, r.start - cursor, PROT_READ | PROT_WRITE | PROT_EXEC, "ram")
        cursor = max(cursor, r.end)
    if cursor < ram_hi:
        m.memory.map(cursor, ram_hi - cursor, PROT_READ | PROT_WRITE | PROT_EXEC, "ram")
    arch.install_bare_devices(m)
    m.halt_allowed = True
    m.sp = arch.bare_stack_top
    m.pc = image.entry


def image_fits_ram(m: Machine, image: ElfImage) -> bool:
    arch = m.arch
    lo, hi = arch.bare_base, arch.bare_base + arch.bare_ram_size
    return all(lo <= page_down(s.vaddr) and page_up(s.vaddr + s.memsz) <= hi for s in image.segments)
