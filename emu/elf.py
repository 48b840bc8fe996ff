"""ELF images (pyelftools): validation with one-line errors, segments, symbols, and the
sections the probe layer reads (`_kprobe_blacklist`, ftrace patch-site tables)."""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from emu.arch import Arch, arch_for_elf_machine
from emu.errors import ElfError

STATIC_PIE_BASE = 0x5555_5555_0000      # 64 KiB aligned: arm64 segments use 64 KiB p_align


@dataclass
class Segment:
    vaddr: int          # relocated address
    memsz: int
    data: bytes         # file contents (filesz bytes)
    prot: int           # PROT_* bits
    offset: int


@dataclass
class ElfSymbol:
    name: str
    addr: int           # relocated
    size: int
    kind: str           # "func" | "object" | "notype"


@dataclass
class ElfImage:
    path: str
    arch: Arch
    etype: str          # "ET_EXEC" | "ET_DYN"
    entry: int          # relocated
    bias: int
    phoff: int
    phentsize: int
    phnum: int
    segments: list[Segment]
    symbols: list[ElfSymbol]
    sections: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # name -> (addr, data)
    tls: tuple[int, int, int] | None = None   # (vaddr, filesz, memsz) of PT_TLS
    stripped: bool = False
    # (name, addr, size, executable) of every allocated section: text vs data inside an RX
    # segment, and the sections the kernel refuses to probe (.kprobes.text, .noinstr.text)
    section_ranges: list[tuple[str, int, int, bool]] = field(default_factory=list)

    @property
    def phdr_addr(self) -> int:
        """Where the program headers are in guest memory (AT_PHDR)."""
        for seg in self.segments:
            if seg.offset <= self.phoff < seg.offset + len(seg.data):
                return seg.vaddr + (self.phoff - seg.offset)
        return self.bias + self.phoff

    @property
    def high_end(self) -> int:
        return max(s.vaddr + s.memsz for s in self.segments)


_KEEP_SECTIONS = ("_kprobe_blacklist", "__mcount_loc", "__patchable_function_entries")


def load_elf(path: str, want_arch: Arch | None = None) -> ElfImage:
    """Parse and validate `path`; raises ElfError with a one-line reason."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise ElfError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ElfError(f"{path}: is a directory") from None
    except OSError as e:
        raise ElfError(f"{path}: {e.strerror}") from None
    if blob[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    try:
        return _parse(path, blob, want_arch)
    except ElfError:
        raise
    except (_PyElfError, ValueError, KeyError, IndexError, AssertionError, EOFError, OSError) as e:
        raise ElfError(f"{path}: truncated or malformed ELF ({e})") from None
    except Exception as e:  # pyelftools raises assorted errors on hostile input
        raise ElfError(f"{path}: malformed ELF ({type(e).__name__}: {e})") from None


EHDR_SIZE, PHDR_SIZE, SHDR_SIZE = 64, 56, 64


def _check_header(path: str, blob: bytes) -> None:
    """What pyelftools would report obscurely (or not at all), as one clear line."""
    if len(blob) < 6:
        raise ElfError(f"{path}: truncated ELF header ({len(blob)} bytes)")
    if blob[4] != 2:
        raise ElfError(f"{path}: unsupported ELF class (only 64-bit ELF is supported)")
    if blob[5] != 1:
        raise ElfError(f"{path}: unsupported ELF data encoding (only little-endian is supported)")
    if len(blob) < EHDR_SIZE:
        raise ElfError(f"{path}: truncated ELF header ({len(blob)} bytes)")
    phoff, = struct.unpack_from("<Q", blob, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", blob, 0x36)
    if phnum and phentsize < PHDR_SIZE:
        raise ElfError(f"{path}: malformed ELF (e_phentsize {phentsize})")
    if phoff + phnum * phentsize > len(blob):
        raise ElfError(f"{path}: truncated ELF (program headers run past the end of the file)")


def _check_section_headers(path: str, blob: bytes) -> None:
    """After the segments, so a file cut inside a segment is reported as such."""
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", blob, 0x3A)
    if shnum and shentsize < SHDR_SIZE:
        raise ElfError(f"{path}: malformed ELF (e_shentsize {shentsize})")
    if shoff + shnum * shentsize > len(blob):
        raise ElfError(f"{path}: truncated ELF (section headers run past the end of the file)")


def _parse(path: str, blob: bytes, want_arch: Arch | None) -> ElfImage:
    _check_header(path, blob)
    elf = ELFFile(io.BytesIO(blob))
    arch = arch_for_elf_machine(elf["e_machine"])
    if arch is None:
        raise ElfError(f"{path}: unsupported machine {elf['e_machine']} (arm64 or x86_64 only)")
    if want_arch is not None and want_arch is not arch:
        raise ElfError(f"{path}: is {arch.name}, not {want_arch.name}")
    etype = elf["e_type"]
    if etype not in ("ET_EXEC", "ET_DYN"):
        raise ElfError(f"{path}: {etype} is not an executable")
    segments, tls = [], None
    for ph in elf.iter_segments():
        ptype = ph["p_type"]
        if ptype == "PT_INTERP":
            raise ElfError(f"{path}: dynamically linked executable (PT_INTERP); only static binaries run")
        if ptype == "PT_TLS":
            tls = (ph["p_vaddr"], ph["p_filesz"], ph["p_memsz"])
        if ptype != "PT_LOAD" or ph["p_memsz"] == 0:
            continue
        off, filesz = ph["p_offset"], ph["p_filesz"]
        if off + filesz > len(blob) or filesz > ph["p_memsz"]:
            raise ElfError(f"{path}: truncated ELF (segment at offset {off:#x} runs past the end)")
        if ph["p_vaddr"] + ph["p_memsz"] > 1 << 64:
            raise ElfError(f"{path}: segment at {ph['p_vaddr']:#x} wraps around the address space")
        flags = ph["p_flags"]
        prot = (1 if flags & P_FLAGS.PF_R else 0) | (2 if flags & P_FLAGS.PF_W else 0) | \
               (4 if flags & P_FLAGS.PF_X else 0)
        segments.append(Segment(ph["p_vaddr"], ph["p_memsz"], blob[off:off + filesz], prot, off))
    if not segments:
        raise ElfError(f"{path}: no loadable segments")
    bias = STATIC_PIE_BASE if etype == "ET_DYN" and min(s.vaddr for s in segments) < 0x10000 else 0
    for s in segments:
        s.vaddr += bias
    _check_section_headers(path, blob)
    symbols, sections, stripped = _symbols(elf, bias)
    ranges = [(sec.name, sec["sh_addr"] + bias, sec["sh_size"], bool(sec["sh_flags"] & 0x4))
              for sec in elf.iter_sections()
              if sec["sh_flags"] & 0x2 and sec["sh_size"] and sec.name]          # SHF_ALLOC
    image = ElfImage(path=os.path.abspath(path), arch=arch, etype=etype, entry=elf["e_entry"] + bias,
                     bias=bias, phoff=elf["e_phoff"], phentsize=elf["e_phentsize"], phnum=elf["e_phnum"],
                     segments=segments, symbols=symbols, sections=sections, stripped=stripped,
                     section_ranges=ranges,
                     tls=tls)
    if not any(s.vaddr <= image.entry < s.vaddr + s.memsz for s in segments):
        raise ElfError(f"{path}: entry point {image.entry:#x} is outside every loadable segment")
    return image


def _symbols(elf: ELFFile, bias: int) -> tuple[list[ElfSymbol], dict, bool]:
    symbols: list[ElfSymbol] = []
    sections: dict[str, tuple[int, bytes]] = {}
    symtab = elf.get_section_by_name(".symtab")
    for sec in elf.iter_sections():
        if sec.name in _KEEP_SECTIONS and sec["sh_type"] != "SHT_NOBITS":
            sections[sec.name] = (sec["sh_addr"] + bias, sec.data())
    if symtab is not None:
        for sym in symtab.iter_symbols():
            stype = sym["st_info"]["type"]
            if not sym.name or stype not in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE"):
                continue
            if sym["st_shndx"] in ("SHN_UNDEF", "SHN_ABS") or sym.name.startswith("$"):
                continue
            kind = {"STT_FUNC": "func", "STT_OBJECT": "object"}.get(stype, "notype")
            symbols.append(ElfSymbol(sym.name, sym["st_value"] + bias, sym["st_size"], kind))
    return symbols, sections, symtab is None
