"""IFUNC symbols (memcpy, strlen in static glibc): a probe lands on the implementation the
guest's own IRELATIVE resolver chose, armed when its start-up stores the choice into the GOT
slot; hit counts equal the real number of calls, counted independently."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from unicorn import UC_HOOK_CODE

from conftest import CROSS_CC, ROOT, run_emu
from emu.loader import GuestConfig, load_guest
from emu.symbols import SymbolTable
from probes.errors import KprobeError
from probes.kprobes import Kprobe, kprobes_of

DATA = ROOT / "tests" / "data" / "elf_symbols"
CROSS_CXX = {"x86_64": "g++", "arm64": "aarch64-linux-gnu-g++"}


def build_prog(tmp: Path, arch: str, name: str, link: str = "static", cxx: bool = False,
               flags: tuple[str, ...] = ()) -> Path:
    """tests/data/elf_symbols/<name>.c (or .cc) compiled for arch; skips without a compiler."""
    cc = shutil.which((CROSS_CXX if cxx else CROSS_CC)[arch])
    if cc is None:
        pytest.skip(f"{(CROSS_CXX if cxx else CROSS_CC)[arch]} not installed")
    out = tmp / f"{name}-{link}.{arch}"
    if not out.exists():
        src = DATA / f"{name}.{'cc' if cxx else 'c'}"
        proc = subprocess.run([cc, "-O1", f"-{link}", *flags, "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if proc.returncode:
            if "cannot find -l" in proc.stderr or "crt1.o" in proc.stderr:
                pytest.skip(f"no static C library for {arch}: {proc.stderr.strip()[:200]}")
            raise AssertionError(f"{cc} failed:\n{proc.stderr}")
    return out


@pytest.fixture(scope="module")
def ifunc_prog(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ifunc")
    return lambda arch, link="static": build_prog(tmp, arch, "ifunc", link, flags=("-fno-builtin",))


def _quiet_guest(path: Path, argv: list[str]):
    return load_guest(GuestConfig(str(path), argv=argv), stdin=io.BytesIO(), stdout=io.BytesIO(),
                      stderr=io.BytesIO())


def _executions(path: Path, argv: list[str], addr: int) -> int:
    """How often the unprobed guest runs `addr`: a test-only code hook, the oracle."""
    guest = _quiet_guest(path, argv)
    count = [0]
    guest.machine.uc.hook_add(UC_HOOK_CODE, lambda *_: count.__setitem__(0, count[0] + 1),
                              begin=addr, end=addr)
    assert guest.machine.run().exit_code == 0
    return count[0]


@pytest.mark.parametrize("link", ["static", "static-pie"])
def test_ifunc_probe_counts_real_calls(arch, ifunc_prog, tmp_path, link):
    path = ifunc_prog(arch, link)
    stats = tmp_path / "stats.json"
    r = run_emu("run", "--kprobe", "memcpy", "--kprobe", "strlen", "--stats", str(stats),
                str(path), "--", "25")
    assert (r.rc, r.out) == (0, "calls 25 total 250\n"), r.err
    rows = {row["ifunc"]: row for row in json.loads(stats.read_text())["probes"]}
    assert set(rows) == {"memcpy", "strlen"}
    for name, row in rows.items():
        assert row["symbol"] != name and row["offset"] == 0      # the implementation, by name
        assert f"{name} -> {row['symbol']}+0x0" in r.err         # the table says which
        real = _executions(path, ["25"], row["addr"])
        assert row["hits"] == real and real >= 25, (name, row, real)


def test_ifunc_probe_is_pending_until_the_guest_resolves_it(arch, ifunc_prog):
    guest = _quiet_guest(ifunc_prog(arch), ["3"])
    m = guest.machine
    p = Kprobe(symbol_name="strlen")
    kprobes_of(m).register_kprobe(p)
    assert p.addr is None and m.symbols.lookup("strlen") is None      # pending: not armed yet
    assert m.patches == []
    assert m.run().exit_code == 0
    impl = m.symbols.lookup("strlen")
    assert p.addr == impl.addr and impl.name != "strlen" and impl.kind == "func"
    assert m.memory.read(p.addr, len(m.arch.breakpoint)) == m.arch.breakpoint
    slot = m.symbols.ifunc_slot("strlen")
    assert int.from_bytes(m.memory.read(slot, 8), "little") == impl.addr
    assert p.hits >= 3


def test_ifunc_registered_after_resolution_arms_at_once(arch, ifunc_prog):
    guest = _quiet_guest(ifunc_prog(arch), ["4"])
    m = guest.machine
    main = m.symbols.lookup("main").addr
    assert m.run(until=main).exit_code == 0                 # start-up done, IFUNCs resolved
    p = Kprobe(symbol_name="memcpy")
    kprobes_of(m).register_kprobe(p)
    assert p.addr == m.symbols.lookup("memcpy").addr
    assert m.run().exit_code == 0 and p.hits >= 4


def test_kretprobe_on_ifunc(arch, ifunc_prog, tmp_path):
    stats = tmp_path / "s.json"
    r = run_emu("run", "--kretprobe", "strlen", "--stats", str(stats), str(ifunc_prog(arch)),
                "--", "7")
    assert r.rc == 0, r.err
    row, = json.loads(stats.read_text())["probes"]
    assert row["ifunc"] == "strlen" and row["hits"] == row["returns"] >= 7


def test_ifunc_without_slot_is_named(arch, ifunc_prog):
    m = _quiet_guest(ifunc_prog(arch), []).machine
    names = [s.linkage_name for s in m.symbols if s.kind == "ifunc"
             and m.symbols.ifunc_slot(s.linkage_name) is None]
    if not names:
        pytest.skip("every IFUNC of this glibc has an IRELATIVE slot")
    with pytest.raises(KprobeError, match="never calls through an IRELATIVE slot"):
        kprobes_of(m).register_kprobe(Kprobe(symbol_name=names[0]))


def test_symbol_table_ifunc_resolution():
    from emu.elf import ElfSymbol
    syms = SymbolTable([ElfSymbol("memcpy", 0x1000, 16, "ifunc", 0x9000),
                        ElfSymbol("__new_memcpy", 0x1000, 16, "ifunc", 0x9000),
                        ElfSymbol("__memcpy_fast", 0x2000, 64, "func")])
    assert syms.lookup("memcpy") is None and syms.is_ifunc("memcpy")
    assert syms.find(0x1004).name in ("memcpy", "__new_memcpy")     # the resolver's code
    syms.resolve_ifunc(0x9000, 0x2000)
    assert syms.lookup("memcpy").name == "__memcpy_fast"
    assert syms.lookup("__new_memcpy").addr == 0x2000                # aliases share the slot


def test_pending_ifunc_probe_unregistered_is_never_armed(arch, ifunc_prog):
    m = _quiet_guest(ifunc_prog(arch), ["3"]).machine
    kp = kprobes_of(m)
    p, q = Kprobe(symbol_name="strlen"), Kprobe(symbol_name="memcpy")
    kp.register_kprobe(p)
    kp.register_kprobe(q)
    kp.unregister_kprobe(p)
    assert m.run().exit_code == 0
    assert p.addr is None and p.hits == 0 and kp.get_kprobe(m.symbols.lookup("strlen").addr) is None
    assert q.addr == m.symbols.lookup("memcpy").addr and q.hits >= 3
