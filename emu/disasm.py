"""Capstone listings with addresses and symbol+offset labels."""
from __future__ import annotations

import capstone

from emu.elf import ElfImage
from emu.errors import UsageError
from emu.symbols import SymbolTable
from probes.location import LocationError, LocationFault, parse_probe_location


def image_bytes(image: ElfImage, addr: int, size: int) -> bytes:
    for s in image.segments:
        if s.vaddr <= addr < s.vaddr + len(s.data):
            return s.data[addr - s.vaddr: addr - s.vaddr + size]
    return b""


def parse_location(symbols: SymbolTable, spec: str) -> int:
    """`SYM`, `SYM+OFF` or an address, as the kprobe and disasm commands take them. Any
    Python integer is an address here (a negative one is simply in no segment)."""
    try:
        return int(spec, 0)
    except ValueError:
        pass
    try:
        loc = parse_probe_location(spec)
    except LocationError as e:
        raise UsageError(f"bad offset in {spec!r}" if e.why is LocationFault.BAD_OFFSET
                         else str(e)) from None
    if loc.addr is not None:
        return loc.addr
    name = str(loc.symbol)
    sym = symbols.lookup(name)
    if sym is None:
        raise UsageError(f"unknown symbol {name!r}{symbols.hint(name)}")
    return sym.addr + loc.offset


def branch_target(insn) -> int | None:
    """The immediate target of a direct jump or call (needs a detail-mode Cs), else None."""
    if not (insn.group(capstone.CS_GRP_JUMP) or insn.group(capstone.CS_GRP_CALL)):
        return None
    imms = [op.imm for op in insn.operands if op.type == capstone.CS_OP_IMM]
    return imms[-1] if imms else None      # cbz/tbz: the target is the last operand


def target_label(symbols: SymbolTable, target: int) -> str:
    """` <sym+0xoff>` for an address inside a symbol, else nothing."""
    sym = symbols.find(target)
    return f" <{sym.name}+{target - sym.addr:#x}>" if sym is not None else ""


def disassemble(arch, code: bytes, addr: int, symbols: SymbolTable | None = None) -> list[str]:
    md = capstone.Cs(arch.cs_arch, arch.cs_mode)
    md.detail = symbols is not None
    out = []
    for insn in md.disasm(code, addr):
        label = f" <{symbols.format(insn.address, with_size=False)}>" if symbols else ""
        target = branch_target(insn) if symbols else None
        tail = target_label(symbols, target) if target is not None and symbols is not None else ""
        out.append(f"{insn.address:#014x}{label}:  {insn.bytes.hex(' '):<24} "
                   f"{insn.mnemonic} {insn.op_str}".rstrip() + tail)
    return out


def disassemble_symbol(image: ElfImage, spec: str) -> list[str]:
    symbols = SymbolTable(image.symbols)
    addr = parse_location(symbols, spec)
    sym = symbols.find(addr)
    size = (sym.end - addr) if sym and sym.size else 64
    code = image_bytes(image, addr, size)
    if not code:
        raise UsageError(f"{spec}: not in a loaded segment")
    return disassemble(image.arch, code, addr, symbols)
