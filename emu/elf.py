"""ELF images: validation with one-line errors, segments, symbols, IRELATIVE slots and the
sections the probe layer reads (`_kprobe_blacklist`, ftrace patch-site tables).

A direct `struct` reader of ELF64 little-endian files. pyelftools spent most of a second on
the symbol table of a large static binary (issue 10); this reads it with one `iter_unpack`.
The checks follow binfmt_elf where it has them (the 64 KiB limit on program headers), and
every refusal is one line naming the file: the input is untrusted."""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field

from emu.arch import Arch, arch_for_elf_machine
from emu.errors import ElfError

STATIC_PIE_BASE = 0x5555_5555_0000      # 64 KiB aligned: arm64 segments use 64 KiB p_align
MAX_FILE_SIZE = 1 << 30                 # a guest file larger than this is refused, not read
MAX_PHDRS_BYTES = 65536                 # binfmt_elf load_elf_phdrs(): more is -ENOEXEC
EHDR_SIZE, PHDR_SIZE, SHDR_SIZE, SYM_SIZE, RELA_SIZE = 64, 56, 64, 24, 24

PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_TLS = 1, 2, 3, 7
SHT_SYMTAB, SHT_RELA, SHT_NOBITS = 2, 4, 8
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
SHN_UNDEF, SHN_ABS, PN_XNUM = 0, 0xFFF1, 0xFFFF
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_SONAME = 0, 1, 5, 10, 14
STT_GNU_IFUNC = 10
R_IRELATIVE = {"EM_X86_64": 37, "EM_AARCH64": 1032}    # R_X86_64_IRELATIVE, R_AARCH64_IRELATIVE

_ETYPES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_MACHINES = {3: "EM_386", 8: "EM_MIPS", 20: "EM_PPC", 21: "EM_PPC64", 22: "EM_S390", 40: "EM_ARM",
             43: "EM_SPARCV9", 62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV", 247: "EM_BPF",
             258: "EM_LOONGARCH"}
_STT_KIND = {0: "notype", 1: "object", 2: "func", STT_GNU_IFUNC: "ifunc"}
# Address tables the probe layer reads (ElfImage.address_table).
_KEEP_SECTIONS = ("_kprobe_blacklist", "__mcount_loc", "__patchable_function_entries",
                  "__jump_table")


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
    kind: str           # "func" | "object" | "notype" | "ifunc" (addr = the resolver)
    slot: int | None = None   # ifunc: the GOT slot its IRELATIVE relocation fills (relocated)


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
    interp: str | None = None                 # PT_INTERP: a dynamically linked file
    needed: list[str] = field(default_factory=list)   # DT_NEEDED libraries
    soname: str | None = None
    irelative: list[tuple[int, int]] = field(default_factory=list)   # (GOT slot, resolver)

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

    @property
    def kind(self) -> str:
        """What the file is, as `emu info` says it."""
        if self.interp is not None:
            return "dynamically linked executable"
        if self.etype == "ET_DYN" and self.entry == self.bias:
            return "shared library"
        return "static-pie executable" if self.etype == "ET_DYN" else "static executable"

    def address_table(self, section: str) -> list[int]:
        """The u64 addresses a table section lists (`__mcount_loc`, `_kprobe_blacklist`,
        `__jump_table`), relocated: a static-PIE keeps link-time addresses in the file's
        copy (its RELATIVE relocations apply to memory, not to this copy), so an entry
        below the load bias gets it added. [] when the file has no such section; a
        trailing partial entry is ignored."""
        if section not in self.sections:
            return []
        data, bias = self.sections[section][1], self.bias
        return [a + bias if a < bias else a
                for (a,) in struct.iter_unpack("<Q", data[: len(data) // 8 * 8])]

    def initial_bytes(self, addr: int, size: int) -> bytes:
        """The file's bytes at a guest address (zeros in bss; b"" outside every segment)."""
        for s in self.segments:
            if s.vaddr <= addr and addr + size <= s.vaddr + s.memsz:
                got = s.data[addr - s.vaddr:addr - s.vaddr + size]
                return got + bytes(size - len(got))
        return b""


@dataclass(frozen=True)
class _Shdr:
    name: int
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


def read_file(path: str) -> bytes:
    """The file's bytes, after checking it is a regular file of sane size: a FIFO, a device
    (/dev/zero, /dev/urandom) or a huge file is refused before anything blocks or grows."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ElfError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ElfError(f"{path}: is a directory") from None
    except OSError as e:
        raise ElfError(f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ElfError(f"{path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ElfError(f"{path}: not a regular file ({_file_type(st.st_mode)})")
        if st.st_size > MAX_FILE_SIZE:
            raise ElfError(f"{path}: file of {st.st_size} bytes is larger than the "
                           f"{MAX_FILE_SIZE >> 20} MiB limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_FILE_SIZE)
    except OSError as e:
        raise ElfError(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def load_elf(path: str, want_arch: Arch | None = None, *, describe: bool = False) -> ElfImage:
    """Parse and validate `path`; raises ElfError with a one-line reason. Only static
    executables load unless `describe` (for `emu info`), which also accepts dynamically
    linked executables and shared libraries."""
    blob = read_file(path)
    if blob[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    try:
        return _parse(path, blob, want_arch, describe)
    except ElfError:
        raise
    except (struct.error, ValueError, IndexError) as e:
        raise ElfError(f"{path}: truncated or malformed ELF ({e})") from None


def _check_header(path: str, blob: bytes) -> None:
    if len(blob) < 6:
        raise ElfError(f"{path}: truncated ELF header ({len(blob)} bytes)")
    if blob[4] != 2:
        raise ElfError(f"{path}: unsupported ELF class (only 64-bit ELF is supported)")
    if blob[5] != 1:
        raise ElfError(f"{path}: unsupported ELF data encoding (only little-endian is supported)")
    if len(blob) < EHDR_SIZE:
        raise ElfError(f"{path}: truncated ELF header ({len(blob)} bytes)")


def _parse(path: str, blob: bytes, want_arch: Arch | None, describe: bool) -> ElfImage:
    _check_header(path, blob)
    (e_type, e_machine, _ver, entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", blob, 16)
    machine = _MACHINES.get(e_machine, f"{e_machine}")
    arch = arch_for_elf_machine(machine)
    if arch is None:
        raise ElfError(f"{path}: unsupported machine {machine} (arm64 or x86_64 only)")
    if want_arch is not None and want_arch is not arch:
        raise ElfError(f"{path}: is {arch.name}, not {want_arch.name}")
    etype = _ETYPES.get(e_type, f"e_type {e_type:#x}")
    if etype not in ("ET_EXEC", "ET_DYN"):
        raise ElfError(f"{path}: {etype} is not an executable")
    shdrs_ok = shnum == 0 or (shentsize >= SHDR_SIZE and shoff + shnum * shentsize <= len(blob))
    if phnum == PN_XNUM and shdrs_ok and shnum:        # the real count is in section 0
        phnum = struct.unpack_from("<I", blob, shoff + 44)[0]
    phdrs = _program_headers(path, blob, phoff, phentsize, phnum)
    segments, tls, interp, dynamic = _segments(path, blob, phdrs)
    bias = STATIC_PIE_BASE if etype == "ET_DYN" and min(s.vaddr for s in segments) < 0x10000 else 0
    for s in segments:
        s.vaddr += bias
    if interp is not None and not describe:
        raise ElfError(f"{path}: dynamically linked executable (PT_INTERP); only static "
                       f"binaries run (interpreter {interp})")
    if etype == "ET_DYN" and interp is None and entry == 0 and not describe:
        raise ElfError(f"{path}: not an executable (a shared library: ET_DYN with entry 0 "
                       "and no PT_INTERP)")
    if not shdrs_ok:
        if shentsize < SHDR_SIZE:
            raise ElfError(f"{path}: malformed ELF (e_shentsize {shentsize})")
        raise ElfError(f"{path}: truncated ELF (section headers run past the end of the file)")
    shdrs = [_Shdr(*struct.unpack_from("<IIQQQQIxxxxxxxxxxxxQ", blob, shoff + i * shentsize)[:8])
             for i in range(shnum)]
    image = ElfImage(path=os.path.abspath(path), arch=arch, etype=etype, entry=entry + bias,
                     bias=bias, phoff=phoff, phentsize=phentsize, phnum=phnum,
                     segments=segments, symbols=[], tls=tls, interp=interp)
    _read_sections(path, blob, shdrs, shstrndx, image)
    if dynamic is not None:
        _read_dynamic(blob, dynamic, segments, bias, image)
    if not any(s.vaddr <= image.entry < s.vaddr + s.memsz for s in segments) and \
            not (describe and image.kind == "shared library"):
        raise ElfError(f"{path}: entry point {image.entry:#x} is outside every loadable segment")
    return image


def _program_headers(path: str, blob: bytes, phoff: int, phentsize: int,
                     phnum: int) -> list[tuple]:
    if phnum and phentsize < PHDR_SIZE:
        raise ElfError(f"{path}: malformed ELF (e_phentsize {phentsize})")
    if phnum * phentsize > MAX_PHDRS_BYTES:
        raise ElfError(f"{path}: too many program headers ({phnum}; Linux refuses more than "
                       f"{MAX_PHDRS_BYTES} bytes of them)")
    if phoff + phnum * phentsize > len(blob):
        raise ElfError(f"{path}: truncated ELF (program headers run past the end of the file)")
    return [struct.unpack_from("<IIQQQQQQ", blob, phoff + i * phentsize) for i in range(phnum)]


def _segments(path: str, blob: bytes, phdrs: list[tuple]):
    segments, tls, interp, dynamic = [], None, None, None
    for ptype, flags, off, vaddr, _paddr, filesz, memsz, _align in phdrs:
        if ptype == PT_INTERP:
            interp = _interp(path, blob, off, filesz)
        elif ptype == PT_TLS:
            tls = (vaddr, filesz, memsz)
        elif ptype == PT_DYNAMIC:
            dynamic = (off, filesz)
        if ptype != PT_LOAD or memsz == 0:
            continue
        if off + filesz > len(blob):
            raise ElfError(f"{path}: truncated ELF (segment at offset {off:#x} runs past the end)")
        if filesz > memsz:
            raise ElfError(f"{path}: malformed ELF (segment at offset {off:#x}: p_filesz "
                           f"{filesz:#x} runs past the end of p_memsz {memsz:#x})")
        if vaddr + memsz > 1 << 64:
            raise ElfError(f"{path}: segment at {vaddr:#x} wraps around the address space")
        prot = (1 if flags & 4 else 0) | (2 if flags & 2 else 0) | (4 if flags & 1 else 0)
        segments.append(Segment(vaddr, memsz, blob[off:off + filesz], prot, off))
    if not segments:
        raise ElfError(f"{path}: no loadable segments")
    _check_overlap(path, segments)
    return segments, tls, interp, dynamic


def _check_overlap(path: str, segments: list[Segment]) -> None:
    spans = sorted((s.vaddr, s.vaddr + s.memsz) for s in segments)
    for (a_lo, a_hi), (b_lo, b_hi) in zip(spans, spans[1:]):
        if b_lo < a_hi:
            raise ElfError(f"{path}: malformed ELF (segments {a_lo:#x}-{a_hi:#x} and "
                           f"{b_lo:#x}-{b_hi:#x} overlap)")


def _interp(path: str, blob: bytes, off: int, filesz: int) -> str:
    if off + filesz > len(blob) or filesz > 4096:
        raise ElfError(f"{path}: malformed ELF (PT_INTERP at offset {off:#x})")
    return blob[off:off + filesz].split(b"\0", 1)[0].decode("utf-8", "replace")


def _section_data(path: str, blob: bytes, sh: _Shdr, name: str) -> bytes:
    if sh.type == SHT_NOBITS:
        return b""
    if sh.offset + sh.size > len(blob):
        raise ElfError(f"{path}: truncated ELF (section {name or '#'} runs past the end of the file)")
    return blob[sh.offset:sh.offset + sh.size]


def _read_sections(path: str, blob: bytes, shdrs: list[_Shdr], shstrndx: int,
                   image: ElfImage) -> None:
    shstr = _section_data(path, blob, shdrs[shstrndx], ".shstrtab") if shstrndx < len(shdrs) else b""
    names = [_cstr(shstr, sh.name) for sh in shdrs]
    bias, symtab = image.bias, None
    for sh, name in zip(shdrs, names):
        if sh.flags & SHF_ALLOC and sh.size and name:
            image.section_ranges.append((name, sh.addr + bias, sh.size, bool(sh.flags & SHF_EXECINSTR)))
        if name in _KEEP_SECTIONS and sh.type != SHT_NOBITS:
            image.sections[name] = (sh.addr + bias, _section_data(path, blob, sh, name))
        if sh.type == SHT_SYMTAB and symtab is None:
            symtab = sh
        elif sh.type == SHT_RELA:
            image.irelative += _irelative(_section_data(path, blob, sh, name), sh.entsize,
                                          R_IRELATIVE[image.arch.elf_machine], bias)
    image.stripped = symtab is None
    if symtab is not None:
        if symtab.link >= len(shdrs) or symtab.entsize not in (0, SYM_SIZE):
            raise ElfError(f"{path}: malformed ELF (symbol table links section {symtab.link}, "
                           f"entry size {symtab.entsize})")
        strtab = _section_data(path, blob, shdrs[symtab.link], ".strtab")
        image.symbols = _symbols(_section_data(path, blob, symtab, ".symtab"), strtab, bias,
                                 {resolver: slot for slot, resolver in image.irelative})


def _cstr(table: bytes, off: int) -> str:
    end = table.find(b"\0", off)
    return table[off:end if end >= 0 else len(table)].decode("utf-8", "replace")


def _symbols(data: bytes, strtab: bytes, bias: int, slots: dict[int, int]) -> list[ElfSymbol]:
    """Defined function, object and untyped symbols (no mapping symbols `$x`/`$d`), and
    IFUNC symbols with the GOT slot their resolver fills."""
    out: list[ElfSymbol] = []
    kinds, find = _STT_KIND, strtab.find
    data = data[:len(data) - len(data) % SYM_SIZE]
    for st_name, info, _other, shndx, value, size in struct.iter_unpack("<IBBHQQ", data):
        kind = kinds.get(info & 0xF)
        if kind is None or not st_name or shndx == SHN_UNDEF or shndx == SHN_ABS:
            continue
        end = find(b"\0", st_name)
        raw = strtab[st_name:end if end >= 0 else len(strtab)]
        if not raw or raw[0] == 0x24:                      # "$x", "$d": arm64 mapping symbols
            continue
        name = raw.decode("utf-8", "replace")
        if kind == "ifunc":
            out.append(ElfSymbol(name, value + bias, size, kind, slots.get(value + bias)))
        else:
            out.append(ElfSymbol(name, value + bias, size, kind))
    return out


def _irelative(data: bytes, entsize: int, r_type: int, bias: int) -> list[tuple[int, int]]:
    """(slot, resolver) of every IRELATIVE relocation: the slot the resolver's choice goes to."""
    if entsize not in (0, RELA_SIZE):
        return []
    data = data[:len(data) - len(data) % RELA_SIZE]
    return [(off + bias, addend + bias) for off, info, addend in struct.iter_unpack("<QQq", data)
            if info & 0xFFFFFFFF == r_type]


def _read_dynamic(blob: bytes, dynamic: tuple[int, int], segments: list[Segment], bias: int,
                  image: ElfImage) -> None:
    """DT_NEEDED and DT_SONAME, for describing a dynamically linked file."""
    off, size = dynamic
    data = blob[off:min(off + size, len(blob))]
    tags = list(struct.iter_unpack("<qQ", data[:len(data) - len(data) % 16]))
    strtab_addr = next((v for t, v in tags if t == DT_STRTAB), None)
    strsz = next((v for t, v in tags if t == DT_STRSZ), 0)
    if strtab_addr is None:
        return
    seg = next((s for s in segments if s.vaddr <= strtab_addr + bias < s.vaddr + len(s.data)), None)
    if seg is None:
        return
    start = seg.offset + strtab_addr + bias - seg.vaddr
    strtab = blob[start:start + min(strsz, MAX_FILE_SIZE)]
    for tag, value in tags:
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            image.needed.append(_cstr(strtab, value))
        elif tag == DT_SONAME:
            image.soname = _cstr(strtab, value)
