"""The `emu` command as a user meets it: exit codes (the guest's, 139, 124, 2), bad input as
exactly one stderr line and never a traceback, `emu info` and `emu disasm` on both arches.

Most tests call `emu.cli.main` in-process (conftest's `run_emu`, here also `emu_main`); the
few that are about real stdio and exit status keep a subprocess."""
from __future__ import annotations

import re
import struct

import pytest

from conftest import LINUX_EXIT, run_emu_subprocess, tiny_elf
from conftest import run_emu_inprocess as emu_main
from emu.elf import STATIC_PIE_BASE

run_emu = emu_main

HELLO = {
    "arm64": "adr x1, msg; mov x0, #1; mov x2, #6; mov x8, #64; svc #0; mov x0, #{code}; "
             "mov x8, #94; svc #0; msg: .ascii \"hello\\n\"",
    "x86_64": "mov edi, 1; lea rsi, [rip + msg]; mov edx, 6; mov eax, 1; syscall; "
              "mov edi, {code}; mov eax, 231; syscall; msg: .ascii \"hello\\n\"",
}


@pytest.fixture
def hello_elf(arch, make_tiny):
    return make_tiny(arch, [("_start", "nop"), ("say_hello", HELLO[arch].format(code=5))],
                     data=b"\x01" * 24, bss=0x2000)


def one_line_error(r, part: str, rc: int = 2) -> None:
    assert r.rc == rc, (r.rc, r.err)
    assert r.out == ""
    assert "Traceback" not in r.err
    assert len(r.err.splitlines()) == 1 and r.err.endswith("\n"), r.err
    assert r.err.startswith("emu: ") and part in r.err, r.err


# --- run ---------------------------------------------------------------------------------------
def test_exit_code_and_stdout_are_the_guests(hello_elf):
    r = run_emu_subprocess("run", str(hello_elf))
    assert (r.rc, r.out, r.err) == (5, "hello\n", "")


@pytest.mark.parametrize("code", [0, 1, 255])
def test_exit_code_values(arch, make_tiny, code):
    r = run_emu("run", str(make_tiny(arch, [("_start", LINUX_EXIT[arch].format(code=code))])))
    assert (r.rc, r.err) == (code, "")


@pytest.mark.slow
def test_guest_args_after_double_dash(arch, glibc_prog):
    r = run_emu_subprocess("run", str(glibc_prog(arch, "hello")), "--", "3", "--strace", "-x")
    assert r.rc == 3 and "argv[2]=--strace (8)\nargv[3]=-x (2)\n" in r.out
    assert r.err == "to stderr\n"                 # --strace after -- is the guest's


def test_explicit_arch(arch, hello_elf):
    assert run_emu("run", "--arch", arch, str(hello_elf)).rc == 5
    other = {"arm64": "x86_64", "x86_64": "arm64"}[arch]
    one_line_error(run_emu("run", "--arch", other, str(hello_elf)), f"is {arch}, not {other}")


# --- bad input: exit 2, one line, no traceback ---------------------------------------------------
def _bad_inputs(tmp_path, glibc_prog, arch) -> dict:
    good = tiny_elf(arch, [("_start", LINUX_EXIT[arch].format(code=0))], data=b"x" * 64)
    real = glibc_prog(arch, "hello").read_bytes()
    files = {
        "not-elf": (b"just text\n", "not an ELF file"),
        "empty": (b"", "not an ELF file"),
        "truncated-header": (real[:30], "truncated ELF header"),
        "truncated-phdrs": (real[:100], "program headers run past the end"),
        "truncated-half": (real[: len(real) // 2], "truncated ELF"),
        "elf32": (good[:4] + b"\x01" + good[5:], "unsupported ELF class"),
        "big-endian": (good[:5] + b"\x02" + good[6:], "unsupported ELF data encoding"),
        "wrong-machine": (good[:18] + struct.pack("<H", 40) + good[20:], "unsupported machine EM_ARM"),
        "object-file": (good[:16] + struct.pack("<H", 1) + good[18:], "ET_REL is not an executable"),
        "page-zero": (good[:64 + 56 + 16] + struct.pack("<Q", 0) + good[64 + 56 + 24:],
                      "lies outside the user address space"),
    }
    paths = {}
    for name, (blob, part) in files.items():
        p = tmp_path / name
        p.write_bytes(blob)
        paths[name] = (p, part)
    paths["missing"] = (tmp_path / "does-not-exist", "no such file")
    paths["directory"] = (tmp_path, "is a directory")
    paths["dynamic"] = (glibc_prog(arch, "hello", "dynamic"), "dynamically linked executable")
    return paths


BAD = ["not-elf", "empty", "truncated-header", "truncated-phdrs", "truncated-half", "elf32",
       "big-endian", "wrong-machine", "object-file", "page-zero", "missing", "directory", "dynamic"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_run(arch, tmp_path, glibc_prog, name):
    path, part = _bad_inputs(tmp_path, glibc_prog, arch)[name]
    one_line_error(run_emu("run", str(path)), part)
    if name in ("truncated-half", "dynamic"):           # and the same through real stdio
        one_line_error(run_emu_subprocess("run", str(path)), part)


@pytest.mark.parametrize("cmd", [["info"], ["disasm"], ["run", "--bare"]])
def test_bad_input_other_commands(tmp_path, glibc_prog, cmd):
    paths = _bad_inputs(tmp_path, glibc_prog, "x86_64")
    for name in ("truncated-phdrs", "missing", "dynamic", "wrong-machine"):
        if name == "dynamic" and cmd == ["info"]:
            continue                    # info describes dynamic files (test_elf_symbols_input)
        path, part = paths[name]
        extra = ["main"] if cmd == ["disasm"] else []
        one_line_error(run_emu(*cmd, str(path), *extra), part)


def test_bad_symbol_for_disasm(hello_elf):
    one_line_error(run_emu("disasm", str(hello_elf), "no_such_function"), "unknown symbol 'no_such_function'")
    one_line_error(run_emu("disasm", str(hello_elf), "say_hello+zz"), "bad offset")
    one_line_error(run_emu("disasm", str(hello_elf), "0x10"), "not in a loaded segment")


# --- info --------------------------------------------------------------------------------------
def test_info_tiny(arch, hello_elf):
    r = run_emu("info", str(hello_elf))
    assert r.rc == 0 and r.err == ""
    lines = r.out.splitlines()
    assert lines[0] == f"file:     {hello_elf}"
    assert lines[1:5] == [f"arch:     {arch}", "type:     ET_EXEC", "entry:    0x401000",
                          "segments: 2"]
    assert re.fullmatch(r"  0x000000400000-0x0000004010[0-9a-f]{2} r-x filesz 0x10[0-9a-f]{2} "
                        r"memsz 0x10[0-9a-f]{2}", lines[5]), lines[5]
    assert lines[6] == "  0x000000500000-0x000000502018 rw- filesz 0x18 memsz 0x2018"
    assert lines[7] == "symbols:  3 (2 functions)"
    assert len(lines) == 8


@pytest.mark.parametrize("link", ["static", "static-pie"])
def test_info_glibc(arch, glibc_prog, link):
    r = run_emu("info", str(glibc_prog(arch, "hello", link)))
    assert r.rc == 0
    assert f"arch:     {arch}\n" in r.out
    if link == "static":
        assert "type:     ET_EXEC\n" in r.out and "entry:    0x40" in r.out
    else:
        assert f"type:     ET_DYN (static-pie, bias {STATIC_PIE_BASE:#x})\n" in r.out
        assert f"entry:    {STATIC_PIE_BASE >> 16:#x}" in r.out
    n = int(re.search(r"^segments: (\d+)$", r.out, re.M).group(1))
    segs = re.findall(r"^  0x[0-9a-f]{12}-0x[0-9a-f]{12} ([r-][w-][x-]) ", r.out, re.M)
    assert len(segs) == n and "r-x" in segs and "rw-" in segs
    count, funcs = map(int, re.search(r"^symbols:  (\d+) \((\d+) functions\)$", r.out, re.M).groups())
    assert count > funcs > 500


# --- disasm ------------------------------------------------------------------------------------
def test_disasm_tiny(arch, hello_elf):
    r = run_emu("disasm", str(hello_elf), "say_hello")
    assert r.rc == 0 and r.err == ""
    lines = r.out.splitlines()
    first = {"arm64": "0x000000401004 <say_hello+0x0>:  01 01 00 10              adr x1, #0x401024",
             "x86_64": "0x000000401001 <say_hello+0x0>:  bf 01 00 00 00           mov edi, 1"}[arch]
    assert lines[0] == first
    mnemonics = [re.split(r"\s{2,}", l)[-1] for l in lines]
    syscall = {"arm64": "svc #0", "x86_64": "syscall"}[arch]
    assert mnemonics.count(syscall) == 2
    assert all(re.match(r"0x[0-9a-f]{12} <say_hello\+0x[0-9a-f]+>:  ", l) for l in lines)


def test_disasm_symbol_plus_offset(arch, hello_elf):
    step = {"arm64": 4, "x86_64": 5}[arch]
    r = run_emu("disasm", str(hello_elf), f"say_hello+{step}")
    assert r.rc == 0
    assert r.out.startswith(f"0x{0x401001 + (arch == 'arm64') * 3 + step:012x} <say_hello+{step:#x}>:")


def test_disasm_glibc_main(arch, glibc_prog):
    r = run_emu("disasm", str(glibc_prog(arch, "hello", "static-pie")), "main")
    assert r.rc == 0
    lines = r.out.splitlines()
    m = re.match(r"0x([0-9a-f]{12}) <main\+0x0>:", lines[0])
    assert m and STATIC_PIE_BASE < int(m[1], 16) < STATIC_PIE_BASE + 0x100000   # relocated
    assert any(l.endswith(" ret") for l in lines)
    assert all("<main+0x" in l for l in lines)
