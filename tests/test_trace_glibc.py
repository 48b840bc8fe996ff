"""Exact trace lines of kprobe and kretprobe events on a static glibc program compiled here
(tests/data/trace/score.c, both arches): every fetch-argument form the program's data
allows and every type, against values worked out from the program's source. The only
numbers taken from the binary are addresses: symbol sizes from its symbol table and the
return sites of the calls to score() from a disassembly of main()."""
from __future__ import annotations

import io
import re
from pathlib import Path

import capstone
import pytest

from emu.cli import main as emu_main
from emu.elf import load_elf

from conftest import ARCHES

DATA = Path(__file__).parent / "data" / "trace"
CS = {"x86_64": (capstone.CS_ARCH_X86, capstone.CS_MODE_64),
      "arm64": (capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)}
RET_ADDR = {"x86_64": "$stack0", "arm64": "%lr"}     # the return address at function entry

# items[] of score.c: name, weight, flags; score = weight * 10 + argc + strlen(name)
ITEMS = [("alpha", 3, 0x1), ("beta", -7, 0x12), ("gamma", 42, 0x300)]


@pytest.fixture(scope="session")
def score_elf(c_prog):
    return lambda arch: c_prog(arch, DATA / "score.c")


def return_sites(exe: Path, arch: str) -> tuple[list[int], int]:
    """Addresses after each call of score() in main, in address order, and main's size."""
    elf = load_elf(str(exe))
    syms = {s.name: s for s in elf.symbols if s.kind == "func"}
    main, score = syms["main"], syms["score"]
    code = _text_bytes(exe, main.addr, main.size)
    md = capstone.Cs(*CS[arch])
    sites = [i.address + i.size for i in md.disasm(code, main.addr)
             if i.mnemonic in ("call", "bl") and i.op_str.strip() in (hex(score.addr), f"#{hex(score.addr)}")]
    assert sites, "no call of score in main"
    return sites, main.size


def _text_bytes(exe: Path, addr: int, size: int) -> bytes:
    from elftools.elf.elffile import ELFFile
    with open(exe, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            start = sec["sh_addr"]
            if sec["sh_type"] == "SHT_PROGBITS" and start <= addr < start + sec["sh_size"]:
                return sec.data()[addr - start:addr - start + size]
    raise AssertionError(f"{addr:#x} in no section")


def sym_size(exe: Path, name: str) -> int:
    return next(s.size for s in load_elf(str(exe)).symbols if s.name == name)


def emu(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = emu_main(list(argv), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("arch", ARCHES)
def test_kprobe_and_kretprobe_lines_exactly(arch, score_elf, monkeypatch):
    exe = score_elf(arch)
    monkeypatch.chdir(exe.parent)           # argv[0] as given: no dependence on the path
    sites, main_size = return_sites(exe, arch)
    score_size, items_size = sym_size(exe, "score"), sym_size(exe, "items")
    ra = RET_ADDR[arch]
    entry = ("p:s/score score name=+0(+0($arg1)):string w=+8($arg1):s32 fl=+12($arg1):x16 "
             "bonus=$arg2:s32 tot=@total:s64 nib=+12($arg1):b4@4/16 c=+0(+0($arg1)):char "
             "pre=+0(+0($arg1)):u8[3] it=$arg1:symbol its=$arg1:symstr uw=+u8($arg1):u32 "
             f"by=+8($arg1):s8 comm=$comm lit=\\\"k\" n=\\7:u8 ret={ra}:symbol")
    ret = "r:s/scorer score%return rv=$retval:s64 rx=$retval:x32 w=+8($arg1):s32 a2=$arg2:u16"
    # The return probe first: aggregated probes run newest first, so the kprobe event then
    # sees the return address before the kretprobe hijacks it (as in the kernel).
    rc, out, err = emu("trace", exe.name, "--event", ret, "--event", entry)
    assert (rc, err) == (13, "alpha 36\nbeta -65\ngamma 426\n"), out
    comm = exe.name[:15]
    head = re.compile(rf"^ *{re.escape(comm)}-(\d+) +\[000\] d\.\.\.\. +(\d+)\.(\d{{6}}): (.*)$")
    lines = [head.match(ln) for ln in out.splitlines()]
    assert all(lines) and len(lines) == 6, out
    assert len({m.group(1) for m in lines}) == 1                       # one pid
    stamps = [int(m.group(2)) * 10**6 + int(m.group(3)) for m in lines]
    assert stamps == sorted(stamps) and stamps[0] < stamps[-1]
    total = 0
    want = []
    for i, (name, w, fl) in enumerate(ITEMS):
        s = w * 10 + 1 + len(name)
        site = sites[i] if len(sites) == len(ITEMS) else sites[0]
        caller = f"main+{site - _main_addr(exe):#x}/{main_size:#x}"
        pre = ",".join(str(b) for b in name[:3].encode())
        want.append(
            f"score: (score+0x0/{score_size:#x}) name=\"{name}\" w={w} fl={fl:#x} bonus=1 "
            f"tot={total} nib={(fl >> 4) & 0xF} c='{name[0]}' pre={{{pre}}} "
            f"it=items+{16 * i:#x}/{items_size:#x} its=\"items+{16 * i:#x}/{items_size:#x}\" "
            f"uw={w & 0xFFFFFFFF} by={w} comm=\"{comm}\" lit=\"k\" n=7 ret={caller}")
        want.append(f"scorer: ({caller} <- score) rv={s} rx={s & 0xFFFFFFFF:#x} w={w} a2=1")
        total += s
    assert [m.group(4) for m in lines] == want


def _main_addr(exe: Path) -> int:
    return next(s.addr for s in load_elf(str(exe)).symbols if s.name == "main")


@pytest.mark.parametrize("arch", ARCHES)
def test_glibc_trace_is_identical_run_to_run(arch, score_elf, monkeypatch):
    exe = score_elf(arch)
    monkeypatch.chdir(exe.parent)
    ev = "p:s/score score w=+8($arg1):s32 bonus=$arg2:s32"
    first = emu("trace", exe.name, "--event", ev, "--event", "r:s/r score rv=$retval:s64")
    assert first[0] == 13 and first[1].count("\n") == 6
    assert emu("trace", exe.name, "--event", ev, "--event", "r:s/r score rv=$retval:s64") == first


@pytest.mark.parametrize("arch", ARCHES)
def test_events_on_an_ifunc(arch, score_elf, monkeypatch):
    """strlen is an IFUNC in static glibc: the events are created and enabled before the
    guest's resolver runs, and fire on the implementation it picked."""
    exe = score_elf(arch)
    monkeypatch.chdir(exe.parent)
    rc, out, err = emu("trace", exe.name, "--event", "p:s/len strlen s=+0($arg1):string",
                       "--event", "r:s/lenr strlen n=$retval:u64",
                       "--filter", "s/len", 's == "alpha" || s == "beta" || s == "gamma"')
    assert rc == 13, err
    lens = [ln for ln in out.splitlines() if ": len: (" in ln]
    # each name twice: score() takes its length, then printf("%s") does
    assert [ln.rsplit("s=", 1)[1] for ln in lens] == [f'"{n}"' for n in ("alpha", "beta", "gamma")
                                                     for _ in range(2)]
    impl = lens[0].split(": len: (", 1)[1].split("+0x0/", 1)[0]
    assert impl.startswith("__strlen_") and all(f"({impl}+0x0/" in ln for ln in lens)
    rets = [int(ln.rsplit("n=", 1)[1]) for ln in out.splitlines() if ": lenr: (" in ln]
    assert {5, 4} <= set(rets) and all(f"<- {impl})" in ln for ln in out.splitlines()
                                       if ": lenr: (" in ln)
