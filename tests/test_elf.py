"""ELF loading: real static and static-pie binaries checked against GNU readelf, hostile and
broken files as one-line ElfErrors (one test row per defect), the Linux address-space
checks, PT_LOAD permissions, bss, and the symbol service against readelf's symbol table."""
from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess

import pytest

from conftest import LINUX_EXIT, run_emu, tiny_elf
from emu.elf import STATIC_PIE_BASE, load_elf
from emu.errors import ElfError
from emu.loader import GuestConfig, load_guest
from emu.machine import StopReason
from emu.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from emu.symbols import SymbolTable

READELF = shutil.which("readelf")
needs_readelf = pytest.mark.skipif(READELF is None, reason="binutils readelf not installed")
LINKS = ("static", "static-pie")


def readelf(*args: str) -> str:
    return subprocess.run([READELF, "-W", *args], capture_output=True, text=True, check=True).stdout


def readelf_loads(path) -> tuple[str, int, list[tuple[int, int, int, str]]]:
    text = readelf("-h", "-l", str(path))
    etype = re.search(r"Type:\s+(\w+)", text).group(1)
    entry = int(re.search(r"Entry point address:\s+(0x[0-9a-f]+)", text).group(1), 16)
    loads = [(int(m[1], 16), int(m[2], 16), int(m[3], 16), m[4].replace(" ", ""))
             for m in re.finditer(r"^\s+LOAD\s+0x[0-9a-f]+ (0x[0-9a-f]+) 0x[0-9a-f]+ "
                                  r"(0x[0-9a-f]+) (0x[0-9a-f]+) ([RWE ]{3})", text, re.M)]
    return etype, entry, loads


def readelf_funcs(path) -> list[tuple[str, int, int]]:
    out = []
    for line in readelf("-s", str(path)).splitlines():
        f = line.split()
        if len(f) == 8 and f[3] == "FUNC" and f[6] not in ("UND", "ABS"):
            out.append((f[7].split("@")[0], int(f[1], 16), int(f[2], 0)))
    return out


# --- real binaries ---------------------------------------------------------------------------
@needs_readelf
@pytest.mark.parametrize("link", LINKS)
def test_glibc_binary_matches_readelf(arch, glibc_prog, link):
    path = glibc_prog(arch, "hello", link)
    img = load_elf(str(path))
    etype, entry, loads = readelf_loads(path)
    assert img.arch.name == arch
    assert img.etype == {"EXEC": "ET_EXEC", "DYN": "ET_DYN"}[etype]
    assert img.bias == (STATIC_PIE_BASE if link == "static-pie" else 0)
    assert img.entry == img.bias + entry
    flags = {"R": PROT_READ, "W": PROT_WRITE, "E": PROT_EXEC}
    assert [(s.vaddr, len(s.data), s.memsz, s.prot) for s in img.segments] == [
        (img.bias + va, fs, ms, sum(flags[c] for c in fl if c in flags)) for va, fs, ms, fl in loads]
    assert img.tls is not None                     # glibc always has PT_TLS
    assert not img.stripped


@needs_readelf
@pytest.mark.parametrize("link", LINKS)
def test_symbols_match_readelf(arch, glibc_prog, link):
    path = glibc_prog(arch, "hello", link)
    img = load_elf(str(path))
    syms = SymbolTable(img.symbols)
    funcs = readelf_funcs(path)
    assert len(funcs) > 500
    for name, value, size in funcs:
        addrs = [s.addr for s in syms.lookup_all(name)]
        assert img.bias + value in addrs, name
    main = syms.lookup("main")
    (value, size), = [(v, s) for n, v, s in funcs if n == "main"]
    assert (main.addr, main.size, main.kind) == (img.bias + value, size, "func")
    assert syms.format(main.addr + 4) == f"main+0x4/{size:#x}"
    assert syms.find(main.addr + size - 1).name == "main"


@pytest.mark.parametrize("link", LINKS)
def test_pt_load_permissions_in_guest_memory(arch, glibc_prog, link):
    img = load_elf(str(glibc_prog(arch, "hello", link)))
    guest = load_guest(GuestConfig(img.path), stdin=io.BytesIO(), stdout=io.BytesIO(),
                       stderr=io.BytesIO())
    mem = guest.machine.memory
    text = next(s for s in img.segments if s.prot & PROT_EXEC)
    data = next(s for s in img.segments if s.prot & PROT_WRITE)
    assert mem.find(text.vaddr).prot == PROT_READ | PROT_EXEC
    assert mem.find(data.vaddr + data.memsz - 1).prot == PROT_READ | PROT_WRITE
    assert guest.machine.pc == img.entry
    assert guest.process.brk_start >= data.vaddr + data.memsz


def test_static_pie_runs_relocated(arch, glibc_prog):
    r = run_emu("run", str(glibc_prog(arch, "hello", "static-pie")), "--", "9", "pie")
    assert (r.rc, r.out) == (9, "hello from 64-bit guest, argc=3\nargv[1]=9 (1)\nargv[2]=pie (3)\n")


# --- bss and unaligned data segments ---------------------------------------------------------
def _with_unaligned_data(arch: str, shift: int, data: bytes, bss: int) -> bytes:
    """tiny_elf with its data PT_LOAD moved `shift` bytes into its page (file and address),
    the layout of glibc's RW segment."""
    blob = bytearray(tiny_elf(arch, [("_start", LINUX_EXIT[arch].format(code=0))],
                              data=bytes(shift) + data, bss=bss))
    ph = 64 + 56                                              # second program header
    off, va, pa, fs, ms = struct.unpack_from("<QQQQQ", blob, ph + 8)
    struct.pack_into("<QQQQQ", blob, ph + 8, off + shift, va + shift, pa + shift, fs - shift,
                     ms - shift)
    return bytes(blob)


def test_data_copied_exactly_and_bss_zeroed(arch, tmp_path):
    data = bytes(range(1, 200))
    path = tmp_path / "bss.elf"
    path.write_bytes(_with_unaligned_data(arch, 0x850, data, bss=0x3000))
    guest = load_guest(GuestConfig(str(path)), stdin=io.BytesIO(), stdout=io.BytesIO(),
                       stderr=io.BytesIO())
    img, mem = guest.image, guest.machine.memory
    seg = img.segments[1]
    assert seg.vaddr == 0x500850 and seg.memsz == len(data) + 0x3000
    assert mem.read(seg.vaddr, len(data)) == data
    assert mem.read(seg.vaddr + len(data), 0x3000) == bytes(0x3000)
    assert mem.find(seg.vaddr + seg.memsz - 1).prot == PROT_READ | PROT_WRITE
    assert guest.process.brk_start == (seg.vaddr + seg.memsz + 0xFFF) & ~0xFFF
    assert guest.machine.run().reason is StopReason.EXIT


# --- broken and hostile files: one row per defect -------------------------------------------
def _patch(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _tiny(arch="x86_64", **kw) -> bytes:
    return tiny_elf(arch, [("_start", LINUX_EXIT[arch].format(code=0))], data=b"d" * 64, **kw)


PH1 = 64 + 56          # the data segment's program header in _tiny()
BAD_FILES = {
    # name: (file bytes, or a callable(tmp_path) -> path; expected message part)
    "empty": (b"", "not an ELF file"),
    "not-elf": (b"#!/bin/sh\necho hi\n", "not an ELF file"),
    "magic-only": (b"\x7fELF", "truncated ELF header (4 bytes)"),
    "short-header": (_tiny()[:40], "truncated ELF header (40 bytes)"),
    "no-program-headers": (_tiny()[:64], "program headers run past the end of the file"),
    "cut-in-segment": (_tiny()[:0x1003], "segment at offset 0x0 runs past the end"),
    "cut-section-headers": (_tiny()[:-10], "section headers run past the end of the file"),
    "elf32": (_patch(_tiny(), 4, "B", 1), "unsupported ELF class"),
    "big-endian": (_patch(_tiny(), 5, "B", 2), "unsupported ELF data encoding"),
    "riscv": (_patch(_tiny(), 18, "<H", 243), "unsupported machine EM_RISCV"),
    "relocatable": (_patch(_tiny(), 16, "<H", 1), "ET_REL is not an executable"),
    "core": (_patch(_tiny(), 16, "<H", 4), "ET_CORE is not an executable"),
    "phentsize": (_patch(_tiny(), 54, "<H", 8), "malformed ELF (e_phentsize 8)"),
    "filesz>memsz": (_patch(_tiny(), PH1 + 32, "<Q", 4096), "runs past the end"),
    "entry-outside": (_patch(_tiny(), 24, "<Q", 0x900000), "entry point 0x900000 is outside"),
    "wraps": (_patch(_patch(_tiny(), PH1 + 16, "<Q", 2**64 - 0x1000), PH1 + 40, "<Q", 0x2000),
              "wraps around the address space"),
    "no-load": (_patch(_patch(_tiny(), 64, "<I", 4), PH1, "<I", 4), "no loadable segments"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_one_line_elf_error(tmp_path, name):
    blob, part = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(ElfError) as info:
        load_elf(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and part in msg and "\n" not in msg, msg
    assert info.value.exit_code == 2


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ElfError, match=r": no such file$"):
        load_elf(str(tmp_path / "nope"))
    with pytest.raises(ElfError, match=r": is a directory$"):
        load_elf(str(tmp_path))


def test_dynamic_executable_refused(arch, glibc_prog):
    with pytest.raises(ElfError, match=r"dynamically linked executable \(PT_INTERP\)"):
        load_elf(str(glibc_prog(arch, "hello", "dynamic")))


def test_arch_mismatch_refused(tmp_path):
    path = tmp_path / "x.elf"
    path.write_bytes(_tiny("x86_64"))
    from emu.arch import get_arch
    with pytest.raises(ElfError, match="is x86_64, not arm64"):
        load_elf(str(path), get_arch("arm64"))


# --- Linux address-space checks (each was a hang or a traceback) ----------------------------
LAYOUT = {
    # name: (data p_vaddr, data p_memsz)
    "page-zero": (0x0, 0x40),
    "overlaps-stack": (0x7FFF_FFF0_0000, 0x40),
    "non-canonical": (0x8000_0000_0000_0000, 0x40),
    "top-of-memory": (2**64 - 0x1000, 0x40),
    "huge-bss": (0x500000, 1 << 63),
}


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_linux_layout_outside_user_space_refused(tmp_path, name):
    vaddr, memsz = LAYOUT[name]
    path = tmp_path / name
    path.write_bytes(_patch(_patch(_tiny(), PH1 + 16, "<Q", vaddr), PH1 + 40, "<Q", memsz))
    with pytest.raises(ElfError, match="lies outside the user address space"):
        load_guest(GuestConfig(str(path)), stdin=io.BytesIO(), stdout=io.BytesIO(),
                   stderr=io.BytesIO())


def test_unmappable_bss_is_an_error_not_a_hang(tmp_path):
    """p_memsz of 16 TiB inside the user range: map_image works on extents (it used to walk
    every page) and reports the failed mapping as an ElfError."""
    path = tmp_path / "huge"
    path.write_bytes(_patch(_tiny(), PH1 + 40, "<Q", 1 << 44))
    r = run_emu("run", str(path), timeout=30)
    assert r.rc == 2 and r.err.count("\n") == 1, r.err
    assert "cannot map segment 0x500000-0x100000500000" in r.err
