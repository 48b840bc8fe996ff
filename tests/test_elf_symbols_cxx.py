"""C++ names: a probe takes the mangled, the demangled or the plain name (when it names one
address), and tables, fault reports and symbol+offset labels show demangled names."""
from __future__ import annotations

import json

import pytest

from conftest import run_emu
from emu.elf import load_elf
from emu.symbols import SymbolTable, demangle, plain_name
from test_elf_symbols_ifunc import build_prog

pytest.importorskip("cxxfilt")


@pytest.fixture(scope="module")
def cxx_prog(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cxx")
    return lambda arch: build_prog(tmp, arch, "names", cxx=True)


def test_demangle_and_plain_name():
    assert demangle("_Z6middlei") == "middle(int)"
    assert demangle("main") == "main" and demangle("_Znotmangled") == "_Znotmangled"
    assert plain_name("geo::Box::area() const") == "geo::Box::area"
    assert plain_name("std::vector<int, std::allocator<int> >::push_back(int const&)") == \
        "std::vector<int, std::allocator<int> >::push_back"


def test_lookup_by_every_spelling(arch, cxx_prog):
    img = load_elf(str(cxx_prog(arch)))
    syms = SymbolTable(img.symbols)
    mangled = syms.lookup("_Z6middlei")
    assert mangled is not None and mangled.name == "middle(int)"
    assert syms.lookup("middle(int)") == mangled == syms.lookup("middle")
    assert syms.lookup("geo::Box::area() const") == syms.lookup("geo::Box::area") is not None
    assert syms.lookup("scale") is None                     # two overloads: ambiguous
    assert syms.lookup("scale(double)").addr != syms.lookup("scale(int)").addr
    assert syms.format(mangled.addr + 4, with_size=False) == "middle(int)+0x4"
    assert "ambiguous: 'scale(double)', 'scale(int)'" in syms.hint("scale")


def test_probe_table_shows_demangled_names(arch, cxx_prog, tmp_path):
    stats = tmp_path / "s.json"
    r = run_emu("run", "--kprobe", "middle(int)", "--kprobe", "_Z5scaled", "--kprobe",
                "geo::Box::area", "--stats", str(stats), str(cxx_prog(arch)), "--", "6")
    assert (r.rc, r.out) == (0, "sum 108\n"), r.err
    rows = {row["symbol"]: row for row in json.loads(stats.read_text())["probes"]}
    assert set(rows) == {"middle(int)", "scale(double)", "geo::Box::area() const"}
    assert all(row["hits"] == 6 for row in rows.values())
    assert "middle(int)+0x0" in r.err and "geo::Box::area() const+0x0" in r.err


def test_plain_name_probe_and_ambiguity(arch, cxx_prog):
    r = run_emu("run", "--kprobe", "middle", str(cxx_prog(arch)), "--", "3")
    assert r.rc == 0 and "middle(int)+0x0" in r.err
    r = run_emu("run", "--kprobe", "scale", str(cxx_prog(arch)))
    assert r.rc == 2 and r.err.count("\n") == 1, r.err
    assert "unknown symbol 'scale'; ambiguous: 'scale(double)', 'scale(int)'" in r.err


def test_fault_report_names_demangled_function(arch, cxx_prog):
    r = run_emu("run", str(cxx_prog(arch)), "--", "1", "crash")
    assert r.rc == 139 and r.err.count("\n") == 1, r.err
    assert "<crash(int volatile*)+0x" in r.err


FTRACE_FLAGS = {"x86_64": ["-fno-pic", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount"],
                "arm64": ["-fpatchable-function-entry=2"]}


def test_function_trace_shows_demangled_names(arch, tmp_path):
    """names.cc with function-entry patch sites (as the kernel builds for ftrace); the trace
    names functions as C++ does."""
    import shutil
    import subprocess
    from test_elf_symbols_ifunc import CROSS_CXX, DATA
    cxx = shutil.which(CROSS_CXX[arch])
    if cxx is None:
        pytest.skip(f"{CROSS_CXX[arch]} not installed")
    obj, exe = tmp_path / "names.o", tmp_path / f"names-ftrace.{arch}"
    subprocess.run([cxx, "-c", "-O1", *FTRACE_FLAGS[arch], "-o", str(obj), str(DATA / "names.cc")],
                   check=True)
    link = subprocess.run([cxx, "-static", "-no-pie", "-o", str(exe), str(obj)], capture_output=True,
                          text=True)
    if link.returncode:
        pytest.skip(f"no static C++ library for {arch}: {link.stderr.strip()[:200]}")
    r = run_emu("run", "--ftrace-filter", "middle*", "--ftrace-filter", "geo::*", str(exe), "--", "2")
    assert (r.rc, r.out) == (0, "sum 8\n"), r.err
    funcs = [line.split(": ", 1)[1] for line in r.err.splitlines() if ": " in line]
    assert funcs == ["middle(int) <-main", "geo::Box::area() const <-main"] * 2, r.err
