"""Loading ``clang -O2 -g -target bpf -c`` objects (libbpf's bpf_object__open/load).

An object is an ELF64 relocatable for EM_BPF. Every global function in an
executable section is a program whose type comes from the section name
(``kprobe/``, ``tracepoint/``, ``xdp``...); static functions in ``.text``
are subprograms, appended to each program that calls them. Maps come from
the BTF-described ``.maps`` section, the legacy ``maps`` section of
struct bpf_map_def, and the global-data sections (``.data*``, ``.rodata*``,
``.bss*``), each a one-element array map. Relocations patch lddw
instructions with map fds (``R_BPF_64_64``) and calls with the callee's
position (``R_BPF_64_32``).

Left out: CO-RE relocations (.BTF.ext), kconfig/ksym externs, static
prog-array initialisers, map-in-map, BPF_F_MMAPABLE semantics.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from .btf import BtfMapDef, btf_map_defs, parse_btf
from .errors import BpfError, LoaderError, MapError
from .isa import (
    BPF_LDDW, BPF_PSEUDO_CALL, BPF_PSEUDO_FUNC, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE,
    BPF_CALL_OP, Insn, decode,
)
from .maps import BPF_F_RDONLY_PROG, ArrayMap, BpfMap, BpfMapType, ProgArrayMap, create_map
from .program import BpfProg
from .prog_types import BpfProgType

EM_BPF = 247
R_BPF_64_64 = 1
R_BPF_64_32 = 10
FIRST_FD = 3  # fds 0-2 are stdio in the process the object pretends to live in

P = BpfProgType
# libbpf's section_defs: prefix -> (program type, attach kind)
SECTION_DEFS: list[tuple[str, BpfProgType, str]] = [
    ("kprobe/", P.BPF_PROG_TYPE_KPROBE, "kprobe"),
    ("kretprobe/", P.BPF_PROG_TYPE_KPROBE, "kretprobe"),
    ("uprobe/", P.BPF_PROG_TYPE_KPROBE, "uprobe"),
    ("uretprobe/", P.BPF_PROG_TYPE_KPROBE, "uretprobe"),
    ("ksyscall/", P.BPF_PROG_TYPE_KPROBE, "ksyscall"),
    ("kretsyscall/", P.BPF_PROG_TYPE_KPROBE, "kretsyscall"),
    ("tracepoint/", P.BPF_PROG_TYPE_TRACEPOINT, "tracepoint"),
    ("tp/", P.BPF_PROG_TYPE_TRACEPOINT, "tracepoint"),
    ("raw_tracepoint/", P.BPF_PROG_TYPE_RAW_TRACEPOINT, "raw_tp"),
    ("raw_tp/", P.BPF_PROG_TYPE_RAW_TRACEPOINT, "raw_tp"),
    ("raw_tracepoint.w/", P.BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE, "raw_tp"),
    ("raw_tp.w/", P.BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE, "raw_tp"),
    ("tp_btf/", P.BPF_PROG_TYPE_TRACING, "tp_btf"),
    ("fentry/", P.BPF_PROG_TYPE_TRACING, "fentry"),
    ("fexit/", P.BPF_PROG_TYPE_TRACING, "fexit"),
    ("perf_event", P.BPF_PROG_TYPE_PERF_EVENT, "perf_event"),
    ("socket", P.BPF_PROG_TYPE_SOCKET_FILTER, "socket"),
    ("xdp", P.BPF_PROG_TYPE_XDP, "xdp"),
    ("tc", P.BPF_PROG_TYPE_SCHED_CLS, "tc"),
    ("classifier", P.BPF_PROG_TYPE_SCHED_CLS, "tc"),
    ("action", P.BPF_PROG_TYPE_SCHED_ACT, "action"),
]


def section_prog_type(sec_name: str) -> tuple[BpfProgType, str, str] | None:
    """(type, attach kind, attach point) for a program section name."""
    for prefix, ptype, kind in SECTION_DEFS:
        base = prefix.rstrip("/")
        if sec_name == base:
            return ptype, kind, ""
        if sec_name.startswith(base + "/"):
            return ptype, kind, sec_name[len(base) + 1:]
    return None


@dataclass
class _Func:
    """A function symbol: slots [start, start + size) of its section."""

    section: str
    name: str
    start: int
    size: int
    is_global: bool


@dataclass
class BpfObject:
    """An opened and loaded object. Attributes: ``path``, ``programs`` (name
    -> BpfProg), ``maps`` (name -> BpfMap), ``license``, ``kern_version``,
    ``map_fds`` (fd -> BpfMap, shared by all programs), ``prog_fds``."""

    path: str
    programs: dict[str, BpfProg] = field(default_factory=dict)
    maps: dict[str, BpfMap] = field(default_factory=dict)
    license: str = ""
    kern_version: int = 0
    map_fds: dict[int, BpfMap] = field(default_factory=dict)
    prog_fds: dict[int, BpfProg] = field(default_factory=dict)

    def program_by_section(self, section: str) -> BpfProg:
        for prog in self.programs.values():
            if prog.section == section:
                return prog
        raise KeyError(section)


class _Loader:
    """One load: ELF parsing, map creation, linking. ``fail`` raises a
    LoaderError naming the object."""

    def __init__(self, path: str, elf: ELFFile, nr_cpus: int):
        self.path = path
        self.elf = elf
        self.nr_cpus = nr_cpus
        self.obj = BpfObject(path)
        self.symbols = self._symbols()
        self.section_maps: dict[str, ArrayMap] = {}  # global data section -> map
        self.sym_maps: dict[tuple[int, int], BpfMap] = {}  # (shndx, value) -> map
        self.funcs: dict[str, list[_Func]] = {}
        self.code: dict[str, list[Insn]] = {}

    def fail(self, reason: str) -> None:
        raise LoaderError(reason, self.path)

    def _symbols(self) -> list[Any]:
        symtab = self.elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            self.fail("no symbol table (.symtab)")
        return list(symtab.iter_symbols())  # type: ignore[union-attr]

    def section_name(self, shndx: Any) -> str:
        if not isinstance(shndx, int) or shndx >= self.elf.num_sections():
            return ""
        return self.elf.get_section(shndx).name

    # -- maps --
    def _add_map(self, name: str, m: BpfMap) -> BpfMap:
        fd = FIRST_FD + len(self.obj.map_fds)
        m.fd = fd
        m.name = name
        self.obj.map_fds[fd] = m
        self.obj.maps[name] = m
        return m

    def _create(self, d: BtfMapDef) -> BpfMap:
        try:
            return create_map(d.map_type, d.key_size, d.value_size, d.max_entries,
                              d.map_flags, d.name, self.nr_cpus)
        except MapError as e:
            self.fail(f"map {d.name!r}: {e.reason}")
            raise  # unreachable

    def load_btf_maps(self) -> None:
        sec = self.elf.get_section_by_name(".maps")
        if sec is None:
            return
        btf_sec = self.elf.get_section_by_name(".BTF")
        if btf_sec is None:
            self.fail(".maps section without .BTF to describe it")
        defs = btf_map_defs(parse_btf(btf_sec.data()))  # type: ignore[union-attr]
        shndx = self._index_of(".maps")
        for sym in self.symbols:
            if sym["st_shndx"] != shndx or sym["st_info"]["type"] != "STT_OBJECT":
                continue
            d = defs.get(sym.name)
            if d is None:
                self.fail(f"map {sym.name!r} has no BTF definition in .maps")
            self.sym_maps[(shndx, sym["st_value"])] = self._add_map(sym.name, self._create(d))

    def load_legacy_maps(self) -> None:
        sec = self.elf.get_section_by_name("maps")
        if sec is None:
            return
        data, shndx = sec.data(), self._index_of("maps")
        for sym in sorted(self.symbols, key=lambda s: s["st_value"]):
            if sym["st_shndx"] != shndx or not sym.name:
                continue
            off = sym["st_value"]
            if off + 20 > len(data):
                self.fail(f"legacy map {sym.name!r} is truncated")
            mtype, ksize, vsize, maxent, flags = struct.unpack_from("<5I", data, off)
            d = BtfMapDef(sym.name, mtype, ksize, vsize, maxent, flags)
            self.sym_maps[(shndx, off)] = self._add_map(sym.name, self._create(d))

    def load_global_data(self) -> None:
        for idx, sec in enumerate(self.elf.iter_sections()):
            name = sec.name
            if not name.startswith((".data", ".rodata", ".bss")) or not sec["sh_flags"] & 2:
                continue  # SHF_ALLOC only: .rodata.str1.1 etc. are data too
            size = sec["sh_size"]
            if size == 0:
                continue
            flags = BPF_F_RDONLY_PROG if name.startswith(".rodata") else 0
            m = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, size, 1, flags, name, self.nr_cpus)
            assert isinstance(m, ArrayMap)
            if sec["sh_type"] != "SHT_NOBITS":
                m.values[:size] = sec.data()
            self.section_maps[name] = m
            self._add_map(name, m)

    def _index_of(self, name: str) -> int:
        for idx, sec in enumerate(self.elf.iter_sections()):
            if sec.name == name:
                return idx
        return -1

    # -- code --
    def load_code(self) -> None:
        for idx, sec in enumerate(self.elf.iter_sections()):
            if sec["sh_type"] != "SHT_PROGBITS" or not sec["sh_flags"] & 4:  # SHF_EXECINSTR
                continue
            data = sec.data()
            if len(data) % 8:
                self.fail(f"section {sec.name!r} is not a whole number of instructions")
            self.code[sec.name] = decode(data)
            funcs = [
                _Func(sec.name, s.name, s["st_value"] // 8, s["st_size"] // 8,
                      s["st_info"]["bind"] == "STB_GLOBAL")
                for s in self.symbols
                if s["st_shndx"] == idx and s["st_info"]["type"] == "STT_FUNC"]
            self.funcs[sec.name] = sorted(funcs, key=lambda f: f.start)

    def relocations(self, sec_name: str) -> dict[int, tuple[int, Any]]:
        """slot -> (relocation type, symbol) for a code section."""
        rel = self.elf.get_section_by_name(".rel" + sec_name)
        if rel is None:
            return {}
        if not isinstance(rel, RelocationSection):
            self.fail(f".rel{sec_name} is not a relocation section")
        out = {}
        for r in rel.iter_relocations():  # type: ignore[union-attr]
            if r["r_info_sym"] >= len(self.symbols):
                self.fail(f"relocation in {sec_name} names symbol {r['r_info_sym']} out of range")
            out[r["r_offset"] // 8] = (r["r_info_type"], self.symbols[r["r_info_sym"]])
        return out

    def func_at(self, section: str, slot: int) -> _Func:
        for f in self.funcs.get(section, []):
            if f.start <= slot < f.start + max(f.size, 1):
                return f
        self.fail(f"no function at instruction {slot} of section {section!r}")
        raise AssertionError  # unreachable

    def link(self, entry: _Func) -> list[Insn]:
        """The program's instructions with its subprograms appended and every
        relocation applied (bpf_object__relocate)."""
        out: list[Insn] = []
        placed: dict[tuple[str, int], int] = {}
        todo = [entry]
        placed[(entry.section, entry.start)] = 0
        while todo:
            func = todo.pop(0)
            base = placed[(func.section, func.start)]
            assert base == len(out)
            out.extend(self.code[func.section][func.start:func.start + func.size])
            relocs = self.relocations(func.section)
            for slot in range(func.start, func.start + func.size):
                idx = base + slot - func.start
                if slot in relocs:
                    self._apply(out, idx, slot, func, relocs[slot], placed, todo)
                elif out[idx].code == BPF_CALL_OP and out[idx].src_reg == BPF_PSEUDO_CALL:
                    self._link_call(out, idx, func.section, slot + 1 + out[idx].imm, placed, todo)
        return out

    def _place(self, func: _Func, placed: dict[tuple[str, int], int], todo: list[_Func],
               out: list[Insn]) -> int:
        key = (func.section, func.start)
        if key not in placed:
            placed[key] = len(out) + sum(f.size for f in todo)
            todo.append(func)
        return placed[key]

    def _link_call(self, out: list[Insn], idx: int, section: str, target_slot: int,
                   placed: dict[tuple[str, int], int], todo: list[_Func]) -> None:
        callee = self.func_at(section, target_slot)
        where = self._place(callee, placed, todo, out) + target_slot - callee.start
        i = out[idx]
        out[idx] = Insn(i.code, i.dst_reg, i.src_reg, i.off, where - (idx + 1))

    def _apply(self, out: list[Insn], idx: int, slot: int, func: _Func, reloc: tuple[int, Any],
               placed: dict[tuple[str, int], int], todo: list[_Func]) -> None:
        rtype, sym = reloc
        insn = out[idx]
        target_sec = self.section_name(sym["st_shndx"])
        if rtype == R_BPF_64_32 and insn.code == BPF_CALL_OP:
            self._link_call(out, idx, target_sec, sym["st_value"] // 8 + insn.imm + 1,
                            placed, todo)
            return
        if rtype != R_BPF_64_64 or insn.code != BPF_LDDW or idx + 1 >= len(out):
            self.fail(f"unsupported relocation type {rtype} at instruction {slot} "
                      f"of {func.section!r} (symbol {sym.name!r})")
        second = out[idx + 1]
        m = self.sym_maps.get((sym["st_shndx"], sym["st_value"]))
        if m is not None:
            out[idx] = Insn(BPF_LDDW, insn.dst_reg, BPF_PSEUDO_MAP_FD, 0, m.fd or 0)
            out[idx + 1] = Insn(0, 0, 0, 0, 0)
        elif target_sec in self.section_maps:
            m = self.section_maps[target_sec]
            offset = sym["st_value"] + insn.imm
            out[idx] = Insn(BPF_LDDW, insn.dst_reg, BPF_PSEUDO_MAP_VALUE, 0, m.fd or 0)
            out[idx + 1] = Insn(0, 0, 0, 0, offset)
        elif target_sec in self.code:
            target_slot = (sym["st_value"] + insn.imm) // 8
            callee = self.func_at(target_sec, target_slot)
            where = self._place(callee, placed, todo, out) + target_slot - callee.start
            out[idx] = Insn(BPF_LDDW, insn.dst_reg, BPF_PSEUDO_FUNC, 0, where - (idx + 1))
            out[idx + 1] = Insn(0, 0, 0, 0, 0)
        else:
            self.fail(f"relocation at instruction {slot} of {func.section!r} refers to "
                      f"{sym.name or target_sec!r}, which is not a map, global data or code")
        _ = second

    def load_programs(self) -> None:
        for sec_name, funcs in self.funcs.items():
            if sec_name == ".text":
                continue
            kind = section_prog_type(sec_name)
            if kind is None:
                self.fail(f"section {sec_name!r}: unknown program type")
            ptype, attach_kind, attach_point = kind  # type: ignore[misc]
            for func in funcs:
                if not func.is_global:
                    continue
                prog = BpfProg(self.link(func), ptype, func.name, dict(self.obj.map_fds),
                               self.obj.license, sec_name)
                prog.attach_kind, prog.attach_point = attach_kind, attach_point
                prog.fd = FIRST_FD + len(self.obj.map_fds) + len(self.obj.prog_fds)
                self.obj.prog_fds[prog.fd] = prog
                self.obj.programs[func.name] = prog

    def read_license(self) -> None:
        sec = self.elf.get_section_by_name("license")
        if sec is not None:
            self.obj.license = sec.data().split(b"\0", 1)[0].decode("latin-1")
        ver = self.elf.get_section_by_name("version")
        if ver is not None and ver["sh_size"] >= 4:
            self.obj.kern_version = struct.unpack_from("<I", ver.data())[0]


def _check_header(elf: ELFFile, path: str) -> None:
    if elf.elfclass != 64 or not elf.little_endian:
        raise LoaderError("not a 64-bit little-endian ELF object", path)
    if elf["e_machine"] not in ("EM_BPF", EM_BPF):
        raise LoaderError(f"not a BPF object (machine {elf['e_machine']})", path)
    if elf["e_type"] != "ET_REL":
        raise LoaderError(f"not a relocatable object (type {elf['e_type']})", path)


def load_object(path: str | Path, *, nr_cpus: int = 1, verify: bool = True) -> BpfObject:
    """Open, relocate and (by default) verify every program of an object.

    Raises LoaderError (one line naming the file) for a malformed object,
    VerifierError if a program is refused.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            _check_header(elf, path)
            loader = _Loader(path, elf, nr_cpus)
            loader.read_license()
            loader.load_btf_maps()
            loader.load_legacy_maps()
            loader.load_global_data()
            loader.load_code()
            loader.load_programs()
    except OSError as e:
        raise LoaderError(e.strerror or str(e), path) from None
    except (ELFError, struct.error, ValueError, KeyError, IndexError) as e:
        raise LoaderError(f"malformed ELF: {e}", path) from None
    obj = loader.obj
    if not obj.programs:
        raise LoaderError("no programs found", path)
    for m in obj.maps.values():
        if isinstance(m, ProgArrayMap):
            m.prog_resolver = obj.prog_fds.get
    if verify:
        for prog in obj.programs.values():
            try:
                prog.load()
            except BpfError as e:
                e.args = (f"{path}: program {prog.name}: {e}",)
                raise
    return obj
