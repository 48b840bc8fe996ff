"""Loadable guest modules, the machine side (kernel/module/main.c, arch/*/kernel/module.c).

A module is a relocatable object (ET_REL, as a kernel .ko) loaded into a machine that may
already be running: its allocated sections are laid out text first (read-execute pages),
then rodata and data/bss (read-write pages), near the main image so 26-bit branches and
32-bit PC-relative references reach it; its relocations are applied, undefined symbols
resolved against the machine's symbols (the kernel would accept only exported ones); its
symbols join the machine's table, also as `MOD:SYM`.

States and notifications follow the kernel: UNFORMED -> COMING (notifier chain) ->
init_module() run in the guest -> LIVE (chain); a failing init goes GOING (chain) and is
freed. Unloading: GOING, cleanup_module() in the guest, GOING (chain), then freed. The
chain calls higher priorities first, ties in registration order. Callers that need the
probe layer's module notifier (kprobes GONE) load through probes/module.py."""
from __future__ import annotations

import errno
import io
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Callable

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from emu.errors import KprobeEmuError
from emu.elf import ElfSymbol
from emu.machine import Machine, StopReason
from emu.memory import PROT_EXEC, PROT_READ, PROT_WRITE, page_up
from emu.symbols import Symbol
from emu.uaccess import UserFault, put_user

SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
MODULE_WINDOW = (64 << 20, 120 << 20)   # [lo, hi) past the image's end: in reach of its code
CALL_RESERVE = 16                       # bytes after the text: the return address of calls
MODULE_NAME_LEN = 56                    # MODULE_NAME_LEN (64 - sizeof(unsigned long))
MAX_MODULE_BYTES = 16 << 20             # one module's sections together


# What pyelftools raises on a truncated or inconsistent object (indexes past a table, ...).
MALFORMED = (ELFError, struct.error, ValueError, IndexError, KeyError)


class ModuleState(IntEnum):
    """enum module_state (include/linux/module.h)."""
    LIVE = 0
    COMING = 1
    GOING = 2
    UNFORMED = 3


class ModuleError(KprobeEmuError):
    """A module that cannot be loaded or unloaded; carries the kernel's errno."""

    def __init__(self, message: str, errno_: int = 8) -> None:     # ENOEXEC
        super().__init__(message)
        self.errno = errno_


@dataclass
class ModSection:
    name: str
    index: int
    addr: int
    size: int
    flags: int


@dataclass(eq=False)
class Module:
    """struct module: what other layers read (.name, .image, .state) and the ranges."""
    name: str
    image: "ModuleImage"
    state: ModuleState = ModuleState.UNFORMED
    base: int = 0
    size: int = 0
    text: tuple[int, int] = (0, 0)              # [start, end) of the core text
    symbols: dict[str, Symbol] = field(default_factory=dict)
    init_ret: int | None = None
    refcnt: int = 0                             # references taken with try_module_get

    def within_module_text(self, addr: int) -> bool:
        return self.text[0] <= addr < self.text[1]

    def within_module(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.size

    def symbol(self, name: str) -> Symbol | None:
        return self.symbols.get(name)


@dataclass
class ModuleImage:
    """The parsed object. Once loaded it reads like an ElfImage for the layers that scan
    an image's tables (`sections`: name -> (address, relocated bytes); `address_table`;
    `symbols`; `section_ranges`), so tracepoint or ftrace tables find the module's."""
    path: str
    elf: ELFFile
    by_index: dict[int, ModSection] = field(default_factory=dict)    # loaded sections
    sections: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    symbols: list[ElfSymbol] = field(default_factory=list)
    section_ranges: list[tuple[str, int, int, bool]] = field(default_factory=list)
    bias: int = 0               # addresses in `sections` are final: nothing to add

    def section_by_name(self, name: str) -> ModSection | None:
        return next((s for s in self.by_index.values() if s.name == name), None)

    def address_table(self, section: str) -> list[int]:
        """The u64 addresses a table section lists, as ElfImage.address_table."""
        if section not in self.sections:
            return []
        data = self.sections[section][1]
        return [a for (a,) in struct.iter_unpack("<Q", data[: len(data) // 8 * 8])]


@dataclass(order=True)
class NotifierBlock:
    """struct notifier_block: notifier_call(module_list, state, module)."""
    priority: int
    seq: int
    notifier_call: Callable[["Modules", ModuleState, Module], None] = field(compare=False)


class Modules:
    """The module list of one machine and its notifier chain (`modules_of(machine)`)."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.modules: list[Module] = []         # newest first, as the kernel's list
        self.chain: list[NotifierBlock] = []
        self._seq = 0

    # --- the notifier chain --------------------------------------------------------------------
    def register_module_notifier(self, call: Callable[["Modules", ModuleState, Module], None],
                                 priority: int = 0) -> NotifierBlock:
        self._seq += 1
        nb = NotifierBlock(-priority, self._seq, call)
        self.chain.append(nb)
        self.chain.sort()
        return nb

    def unregister_module_notifier(self, nb: NotifierBlock) -> None:
        if nb in self.chain:
            self.chain.remove(nb)

    def _notify(self, state: ModuleState, mod: Module) -> None:
        for nb in list(self.chain):
            nb.notifier_call(self, state, mod)

    # --- lookups ---------------------------------------------------------------------------
    def find_module(self, name: str) -> Module | None:
        return next((mod for mod in self.modules if mod.name == name
                     and mod.state != ModuleState.UNFORMED), None)

    def module_text_address(self, addr: int) -> Module | None:
        return next((mod for mod in self.modules if mod.within_module_text(addr)), None)

    # --- load and unload -------------------------------------------------------------------
    def load(self, path: str, name: str | None = None) -> Module:
        """load_module + do_init_module."""
        mod = Module(name or Path(path).name.split(".", 1)[0], parse_module(path))
        if not mod.name or len(mod.name) >= MODULE_NAME_LEN:
            raise ModuleError(f"{path}: bad module name {mod.name!r}", 22)
        if self.find_module(mod.name) is not None:
            raise ModuleError(f"module {mod.name} is already loaded", 17)    # EEXIST
        try:
            layout(self.m, mod)
        except MALFORMED as e:
            raise ModuleError(f"{path}: malformed object ({e or type(e).__name__})") from None
        try:
            apply_relocations(self.m, mod)
            add_symbols(self.m, mod)
        except (ModuleError, *MALFORMED) as e:
            self._free(mod)
            for sym in mod.symbols.values():
                self.m.symbols.remove(sym)
            if isinstance(e, ModuleError):
                raise
            raise ModuleError(f"{path}: malformed object ({e or type(e).__name__})") from None
        self.modules.insert(0, mod)
        mod.state = ModuleState.COMING
        self._notify(ModuleState.COMING, mod)
        init = mod.symbol("init_module")
        try:
            mod.init_ret = call_guest(self.m, mod, init.addr) if init else 0
        except ModuleError:
            self._going(mod)            # init crashed: as a failed init, the module goes
            raise
        if mod.init_ret != 0:
            self._going(mod)
            raise ModuleError(f"{mod.name}: init_module returned {mod.init_ret}",
                              -mod.init_ret if mod.init_ret < 0 else 22)
        mod.state = ModuleState.LIVE
        self._notify(ModuleState.LIVE, mod)
        return mod

    def unload(self, mod: Module) -> None:
        """delete_module: GOING, cleanup_module(), the GOING notification, free."""
        if mod not in self.modules or mod.state != ModuleState.LIVE:
            raise ModuleError(f"module {mod.name} is not live", 2)
        if mod.refcnt:                  # try_stop_module, not forced
            raise ModuleError(f"module {mod.name} is in use ({mod.refcnt} references)",
                              errno.EWOULDBLOCK)
        mod.state = ModuleState.GOING
        exit_fn = mod.symbol("cleanup_module")
        try:
            if exit_fn is not None:
                call_guest(self.m, mod, exit_fn.addr)
        finally:                        # a crashed cleanup still unloads, then reports
            self._going(mod)

    def _going(self, mod: Module) -> None:
        mod.state = ModuleState.GOING
        self._notify(ModuleState.GOING, mod)
        self._release(mod)

    def _release(self, mod: Module) -> None:
        self.modules.remove(mod)
        for sym in mod.symbols.values():
            self.m.symbols.remove(sym)
        self.m.symbols.drop_namespace(mod.name)
        self._free(mod)

    def _free(self, mod: Module) -> None:
        self.m.flush_code(mod.base, mod.base + mod.size)
        self.m.memory.unmap(mod.base, mod.size)


def modules_of(machine: Machine) -> Modules:
    modules: Modules = machine.layer("modules", Modules)
    return modules


def module_text_address(machine: Machine, addr: int) -> Module | None:
    """is_module_text_address, without creating the module list."""
    modules = machine.layers.get("modules")
    return modules.module_text_address(addr) if isinstance(modules, Modules) else None


def try_module_get(mod: Module) -> bool:
    """A reference that keeps `mod` from being unloaded; none once it is going."""
    if mod.state == ModuleState.GOING:
        return False
    mod.refcnt += 1
    return True


def module_put(mod: Module) -> None:
    mod.refcnt = max(0, mod.refcnt - 1)


def find_module(machine: Machine, name: str) -> Module | None:
    """find_module by name, without creating the module list."""
    modules = machine.layers.get("modules")
    return modules.find_module(name) if isinstance(modules, Modules) else None


# --- parsing and layout -----------------------------------------------------------------------
def parse_module(path: str) -> ModuleImage:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ModuleError(f"{path}: {e.strerror}", e.errno or 2) from None
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.header["e_type"] != "ET_REL":
            raise ModuleError(f"{path}: not a relocatable object (ET_REL)")
        elf.get_section_by_name(".symtab")
    except (ELFError, struct.error, ValueError) as e:
        raise ModuleError(f"{path}: not a valid ELF object ({e})") from None
    return ModuleImage(path, elf)


def _alloc_sections(elf: ELFFile) -> list[tuple[int, object]]:
    return [(i, s) for i, s in enumerate(elf.iter_sections())
            if s["sh_flags"] & SHF_ALLOC and s["sh_size"]]


def layout(m: Machine, mod: Module) -> None:
    """layout_sections: text, then read-only data, then writable data; text pages R-X."""
    if m.image is None or mod.image.elf.header["e_machine"] != m.arch.elf_machine:
        raise ModuleError(f"{mod.image.path}: not a module for this {m.arch.name} machine")
    secs = _alloc_sections(mod.image.elf)
    order = sorted(secs, key=lambda t: (not t[1]["sh_flags"] & SHF_EXECINSTR,
                                        bool(t[1]["sh_flags"] & SHF_WRITE), t[0]))
    off, text_end = 0, 0
    places = []
    for i, s in order:
        if not s["sh_flags"] & SHF_EXECINSTR and text_end == 0:
            text_end = off + CALL_RESERVE
            off = page_up(text_end)
        align = max(1, s["sh_addralign"])
        off = (off + align - 1) // align * align
        places.append((i, s, off))
        off += s["sh_size"]
    if text_end == 0:
        text_end = off + CALL_RESERVE
        off = text_end
    size = page_up(off)
    if size > MAX_MODULE_BYTES:
        raise ModuleError(f"{mod.image.path}: {size} bytes of sections, more than "
                          f"{MAX_MODULE_BYTES}", 27)
    lo = page_up(m.image.high_end) + MODULE_WINDOW[0]
    base = m.memory.find_free(size, lo, page_up(m.image.high_end) + MODULE_WINDOW[1])
    if base is None:
        raise ModuleError(f"{mod.image.path}: no room for the module near the image", 12)
    blobs = [(o, s.data()) for _i, s, o in places if s["sh_type"] != "SHT_NOBITS"]
    m.memory.map(base, size, PROT_READ | PROT_WRITE, f"[module {mod.name}]")
    for o, blob in blobs:
        m.memory.write(base + o, blob)
    for i, s, o in places:
        mod.image.by_index[i] = ModSection(s.name, i, base + o, s["sh_size"], s["sh_flags"])
    mod.base, mod.size, mod.text = base, size, (base, base + text_end - CALL_RESERVE)
    m.memory.protect(base, page_up(text_end), PROT_READ | PROT_EXEC)


# --- symbols and relocations --------------------------------------------------------------------
def _symbol_value(m: Machine, mod: Module, sym) -> int:
    shndx = sym["st_shndx"]
    if shndx == "SHN_ABS":
        return int(sym["st_value"])
    if shndx == "SHN_COMMON":
        raise ModuleError(f"{mod.name}: please compile with -fno-common ({sym.name})")
    if shndx == "SHN_UNDEF":
        found = m.symbols.lookup(sym.name) if sym.name else None
        if found is None:
            raise ModuleError(f"{mod.name}: Unknown symbol {sym.name} (err -2)")
        return found.addr
    sec = mod.image.by_index.get(shndx)
    if sec is None:                    # a symbol in a section we did not load
        raise ModuleError(f"{mod.name}: symbol {sym.name} in an unloaded section")
    return sec.addr + int(sym["st_value"])


def _symtab(mod: Module) -> SymbolTableSection:
    symtab = mod.image.elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        raise ModuleError(f"{mod.image.path}: no symbol table")
    return symtab


def apply_relocations(m: Machine, mod: Module) -> None:
    """apply_relocate_add for every SHT_RELA section whose target was loaded."""
    elf = mod.image.elf
    symtab = _symtab(mod)
    rel = RELOCATORS.get(m.arch.elf_machine)
    assert rel is not None
    for s in elf.iter_sections():
        if s["sh_type"] == "SHT_REL":
            raise ModuleError(f"{mod.image.path}: REL relocations are not supported")
        target = mod.image.by_index.get(s["sh_info"]) if s["sh_type"] == "SHT_RELA" else None
        if target is None or not isinstance(s, RelocationSection):
            continue                   # debug info and the like: not loaded
        for r in s.iter_relocations():
            sym = symtab.get_symbol(r["r_info_sym"])
            value = _symbol_value(m, mod, sym) + r["r_addend"]
            where = target.addr + r["r_offset"]
            if not (target.addr <= where < target.addr + target.size
                    and where + 8 <= mod.base + mod.size):
                raise ModuleError(f"{mod.name}: relocation outside {target.name}")
            rel(m, mod, r["r_info_type"], where, value)


def _patch(m: Machine, where: int, size: int, value: int) -> None:
    m.memory.write(where, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))


def _fits(value: int, bits: int, signed: bool = True) -> bool:
    return -(1 << bits - 1) <= value < (1 << bits - 1) if signed else 0 <= value < (1 << bits)


def _overflow(mod: Module, rtype: int, where: int) -> ModuleError:
    return ModuleError(f"{mod.name}: overflow in relocation type {rtype} at {where:#x}")


def _insn(m: Machine, where: int) -> int:
    return int.from_bytes(m.memory.read(where, 4), "little")


def _reloc_aarch64(m: Machine, mod: Module, rtype: int, where: int, value: int) -> None:
    if rtype == 257:                                     # R_AARCH64_ABS64
        _patch(m, where, 8, value)
    elif rtype in (258, 261):                            # ABS32, PREL32
        v = value - where if rtype == 261 else value
        if not (_fits(v, 32) or (rtype == 258 and _fits(v, 32, False))):
            raise _overflow(mod, rtype, where)
        _patch(m, where, 4, v)
    elif rtype == 260:                                   # PREL64
        _patch(m, where, 8, value - where)
    elif rtype in (275, 276):                            # ADR_PREL_PG_HI21(_NC): adrp
        pages = (value >> 12) - (where >> 12)
        if rtype == 275 and not _fits(pages, 21):
            raise _overflow(mod, rtype, where)
        insn = _insn(m, where) & ~(0x3 << 29 | 0x7FFFF << 5)
        _patch(m, where, 4, insn | (pages & 3) << 29 | (pages >> 2 & 0x7FFFF) << 5)
    elif rtype in LO12_SHIFT:                            # ADD_ABS_LO12_NC, LDSTn_ABS_LO12_NC
        imm = (value & 0xFFF) >> LO12_SHIFT[rtype]
        _patch(m, where, 4, _insn(m, where) & ~(0xFFF << 10) | imm << 10)
    elif rtype in (282, 283):                            # JUMP26, CALL26
        off = value - where
        if off & 3 or not _fits(off >> 2, 26):
            raise _overflow(mod, rtype, where)
        _patch(m, where, 4, _insn(m, where) & ~0x3FFFFFF | (off >> 2) & 0x3FFFFFF)
    elif rtype in (280, 273):                            # CONDBR19, LD_PREL_LO19
        off = value - where
        if off & 3 or not _fits(off >> 2, 19):
            raise _overflow(mod, rtype, where)
        _patch(m, where, 4, _insn(m, where) & ~(0x7FFFF << 5) | ((off >> 2) & 0x7FFFF) << 5)
    else:
        raise ModuleError(f"{mod.name}: unsupported RELA relocation: {rtype}")


LO12_SHIFT = {277: 0, 278: 0, 284: 1, 285: 2, 286: 3, 299: 4}


def _reloc_x86_64(m: Machine, mod: Module, rtype: int, where: int, value: int) -> None:
    if rtype == 1:                                       # R_X86_64_64
        _patch(m, where, 8, value)
    elif rtype == 24:                                    # PC64
        _patch(m, where, 8, value - where)
    elif rtype in (2, 4):                                # PC32, PLT32
        if not _fits(value - where, 32):
            raise _overflow(mod, rtype, where)
        _patch(m, where, 4, value - where)
    elif rtype in (10, 11):                              # 32, 32S
        if not _fits(value, 32, signed=rtype == 11) and not (rtype == 10 and _fits(value, 32, False)):
            raise _overflow(mod, rtype, where)
        _patch(m, where, 4, value)
    else:
        raise ModuleError(f"{mod.name}: Unknown rela relocation: {rtype}")


RELOCATORS: dict[str, Callable[[Machine, Module, int, int, int], None]] = {
    "EM_AARCH64": _reloc_aarch64, "EM_X86_64": _reloc_x86_64}


def add_symbols(m: Machine, mod: Module) -> None:
    """The module's functions and objects (locals too, as its kallsyms)."""
    symtab = _symtab(mod)
    kinds = {"STT_FUNC": "func", "STT_OBJECT": "object"}
    for sym in symtab.iter_symbols():
        kind = kinds.get(sym["st_info"]["type"])
        sec = mod.image.by_index.get(sym["st_shndx"]) if isinstance(sym["st_shndx"], int) else None
        if kind is None or sec is None or not sym.name or sym.name in mod.symbols:
            continue
        mod.symbols[sym.name] = m.symbols.add(sym.name, sec.addr + sym["st_value"],
                                              sym["st_size"], kind)
        mod.image.symbols.append(ElfSymbol(sym.name, sec.addr + sym["st_value"],
                                           sym["st_size"], kind))
    m.symbols.add_namespace(mod.name, mod.symbols)
    for sec in mod.image.by_index.values():      # as relocated, NOBITS as zeros
        mod.image.sections[sec.name] = (sec.addr, bytes(m.memory.read(sec.addr, sec.size)))
        mod.image.section_ranges.append((sec.name, sec.addr, sec.size,
                                         bool(sec.flags & SHF_EXECINSTR)))


# --- calling into the guest ------------------------------------------------------------------------
# Selectors and aliases: rewriting them would reset what they select (x86 fs base) or
# repeat another entry (eflags, pstate). SIMD registers are not kept: modules are built
# general-registers-only, as the kernel builds them.
UNSAVED_REGS = frozenset({"cs", "ss", "ds", "es", "fs", "gs", "eflags", "pstate", "cpacr_el1"})


def call_guest(m: Machine, mod: Module, fn: int) -> int:
    """Run fn() in the guest to its return (a nested run when called from a hook), every
    register as it was before; returns its int result (sign-extended from 32 bits)."""
    arch = m.arch
    saved = {name: m.reg(name) for name in arch.regs if name not in UNSAVED_REGS}
    ret_addr = mod.text[1]                  # the reserved bytes after the text: never run
    sp = (m.sp - 512) & ~15                 # below the red zone and the current frame
    if arch.link is not None:
        m.set_reg(arch.link, ret_addr)
    else:
        sp -= 8
        try:                                # the guest's stack: the checked path
            put_user(m.memory, sp, ret_addr)
        except UserFault:
            raise ModuleError(f"{mod.name}: no stack to call {m.describe(fn)} on "
                              f"(sp {m.sp:#x})", 14) from None      # EFAULT
    m.sp = sp
    try:
        result = m.run(begin=fn, until=ret_addr)
        if result.reason != StopReason.HALT or m.pc != ret_addr:
            raise ModuleError(f"{mod.name}: {m.describe(fn)} did not return: {result.message}")
        value = m.reg(arch.ret) & 0xFFFFFFFF
    finally:
        for name, v in saved.items():
            m.set_reg(name, v)
    return value - (1 << 32) if value & 0x80000000 else value
