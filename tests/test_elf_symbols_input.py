"""Bad input is named: hostile ELF mutations and special files are one line and exit 2,
checked before anything is read in full or mapped; `emu info` describes dynamically linked
files and shared libraries; an unknown symbol suggests close names."""
from __future__ import annotations

import os
import struct

import pytest

from conftest import LINUX_EXIT, firmware_elf, run_emu, tiny_elf
from emu.elf import MAX_FILE_SIZE, load_elf
from emu.errors import ElfError

EHDR, PH1, SHDR = 64, 64 + 56, 64


def _tiny(arch: str = "x86_64") -> bytes:
    return tiny_elf(arch, [("_start", LINUX_EXIT[arch].format(code=0))], data=b"d" * 64)


def _patch(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _shdr(blob: bytes, index: int, field: int, fmt: str, value: int) -> bytes:
    """Patch a field (byte offset within the header) of section header `index`."""
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    return _patch(blob, shoff + index * SHDR + field, fmt, value)


def _many_loads(n: int, memsz: int = 16) -> bytes:
    """_tiny() with `n` more RW PT_LOADs of `memsz` bytes, one page apart, headers appended."""
    blob = bytearray(_tiny())
    phoff, old = len(blob), blob[EHDR:EHDR + 2 * 56]
    blob += old
    for i in range(n):
        blob += struct.pack("<IIQQQQQQ", 1, 6, 0, 0x700000 + i * 0x1000, 0, 0, memsz, 0x1000)
    struct.pack_into("<Q", blob, 0x20, phoff)
    struct.pack_into("<H", blob, 0x38, n + 2)
    return bytes(blob)


SYMTAB = 3             # section index of .symtab in tiny_elf
HOSTILE = {
    # name: (file bytes, expected part of the one-line message)
    "thousands-of-loads": (_many_loads(5000), "too many program headers (5002; Linux refuses"),
    "phnum-lies": (_patch(_tiny(), 0x38, "<H", 0xFFF0), "too many program headers (65520"),
    "overlapping-segments": (_patch(_tiny(), PH1 + 16, "<Q", 0x400800), "overlap"),
    "segment-offset-past-eof": (_patch(_tiny(), PH1 + 8, "<Q", 1 << 40), "runs past the end"),
    "symtab-offset-past-eof": (_shdr(_tiny(), SYMTAB, 24, "<Q", 1 << 40),
                               "section .symtab runs past the end of the file"),
    "symtab-size-past-eof": (_shdr(_tiny(), SYMTAB, 32, "<Q", 1 << 62),
                             "section .symtab runs past the end of the file"),
    "symtab-bad-link": (_shdr(_tiny(), SYMTAB, 40, "<I", 99), "symbol table links section 99"),
    "symtab-bad-entsize": (_shdr(_tiny(), SYMTAB, 56, "<Q", 7), "entry size 7"),
    "shentsize": (_patch(_tiny(), 0x3A, "<H", 10), "malformed ELF (e_shentsize 10)"),
    "unknown-etype": (_patch(_tiny(), 16, "<H", 0x1234), "e_type 0x1234 is not an executable"),
    "shared-library": (_patch(_patch(_tiny(), 16, "<H", 3), 24, "<Q", 0),
                       "not an executable (a shared library"),
    "interp-huge": (_patch(_patch(_tiny(), PH1, "<I", 3), PH1 + 32, "<Q", 1 << 40),
                    "malformed ELF (PT_INTERP"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_elf_is_one_line(tmp_path, name):
    blob, part = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(ElfError) as info:
        load_elf(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and part in msg and "\n" not in msg, msg


@pytest.mark.parametrize("name", ["thousands-of-loads", "segment-offset-past-eof", "symtab-bad-link"])
def test_hostile_elf_cli(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE[name][0])
    for cmd in ("run", "info"):
        r = run_emu(cmd, str(path), timeout=30)
        assert r.rc == 2 and r.err.count("\n") == 1 and HOSTILE[name][1] in r.err, (cmd, r.err)


def test_a_thousand_segments_load_and_run(tmp_path):
    """Under the kernel's limit, many segments are fine: mapped on extents, no hang."""
    path = tmp_path / "many"
    path.write_bytes(_many_loads(1000))
    r = run_emu("run", str(path), timeout=60)
    assert (r.rc, r.err) == (0, "")


def _special(tmp_path, kind: str) -> tuple[str, str]:
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return str(path), "not a regular file (a FIFO)"
    if kind == "huge":
        path = tmp_path / "huge"
        with open(path, "wb") as f:
            f.truncate(MAX_FILE_SIZE + 1)                    # sparse: nothing is written
        return str(path), f"file of {MAX_FILE_SIZE + 1} bytes is larger than the 1024 MiB limit"
    if kind == "dir":
        return str(tmp_path), "is a directory"
    return kind, "not a regular file (a character device)"


@pytest.mark.parametrize("cmd", ["run", "info"])
@pytest.mark.parametrize("kind", ["/dev/zero", "/dev/urandom", "fifo", "huge", "dir"])
def test_special_files_are_refused_without_reading(tmp_path, cmd, kind):
    path, part = _special(tmp_path, kind)
    r = run_emu(cmd, path, timeout=30)
    # The CLI refuses such a file before the ELF reader sees it; either names the file.
    assert r.rc == 2 and r.err.count("\n") == 1 and path in r.err, r.err
    assert ("not a regular file" in r.err) == ("not a regular file" in part), r.err


def test_info_describes_dynamic_files(arch, glibc_prog):
    r = run_emu("info", str(glibc_prog(arch, "hello", "dynamic")))
    assert r.rc == 0, r.err
    assert "dynamically linked executable" in r.out
    assert "interp:   /lib" in r.out and "needed:   libc.so.6" in r.out
    r = run_emu("run", str(glibc_prog(arch, "hello", "dynamic")))
    assert r.rc == 2 and "dynamically linked executable (PT_INTERP)" in r.err


def test_info_describes_a_shared_library(arch, tmp_path):
    import shutil
    import subprocess
    from conftest import CROSS_CC
    cc = shutil.which(CROSS_CC[arch])
    if cc is None:
        pytest.skip(f"{CROSS_CC[arch]} not installed")
    src, lib = tmp_path / "lib.c", tmp_path / "libtiny.so"
    src.write_text("int tiny_add(int a, int b) { return a + b; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libtiny.so.1", "-o", str(lib), str(src)],
                   check=True)
    r = run_emu("info", str(lib))
    assert r.rc == 0 and "shared library" in r.out and "soname:   libtiny.so.1" in r.out, r.err
    assert "entry:    none" in r.out
    r = run_emu("run", str(lib))
    assert r.rc == 2 and r.err.count("\n") == 1 and "not an executable (a shared library" in r.err


@pytest.mark.parametrize("opt", ["--kprobe", "--kretprobe"])
def test_unknown_symbol_suggests_close_names(arch, opt):
    r = run_emu("run", opt, "do_sys_opne", str(firmware_elf(arch, "demo")))
    assert r.rc == 2 and r.err.count("\n") == 1, r.err
    assert "unknown symbol 'do_sys_opne'; did you mean 'do_sys_open'" in r.err


def test_unknown_symbol_without_close_names(arch):
    r = run_emu("run", "--kprobe", "zzzzqqqq", str(firmware_elf(arch, "demo")))
    assert r.rc == 2 and r.err.rstrip().endswith("unknown symbol 'zzzzqqqq'"), r.err


def test_disasm_suggests_close_names(arch):
    r = run_emu("disasm", str(firmware_elf(arch, "demo")), "do_sys_opne")
    assert r.rc == 2 and "did you mean 'do_sys_open'" in r.err and r.err.count("\n") == 1


@pytest.mark.slow
def test_mutated_headers_never_escape_as_other_errors(tmp_path):
    """Seeded mutations of every header field of a small ELF: the reader returns an image or
    raises ElfError, nothing else (no struct.error, IndexError, MemoryError, hang)."""
    import random
    rng = random.Random(1234)
    base = _tiny("arm64")
    shoff, = struct.unpack_from("<Q", base, 0x28)
    fields = list(range(0, EHDR + 2 * 56)) + list(range(shoff, len(base)))
    path = tmp_path / "m.elf"
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(600):
        blob = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            off = rng.choice(fields)
            blob[off:off + 8] = rng.choice([b"\xff" * 8, b"\x00" * 8, rng.randbytes(8),
                                            struct.pack("<Q", rng.randint(0, 1 << 20))])
        path.write_bytes(bytes(blob[:len(base)]))
        try:
            load_elf(str(path))
            outcomes["ok"] += 1
        except ElfError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["ok"] and outcomes["refused"]
