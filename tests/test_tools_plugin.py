"""The pytest plugin: documented fixtures, `lab.kretprobe()`, and assertion messages that
name addresses as sym+off, on both arches with a program the tests compile."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from probes.kprobes import Kprobe
from probes.testing import (assert_armed, assert_disarmed, assert_hits, assert_slot_holds,
                            describe)
from test_tools_sweep import mix_hash, tools_prog  # noqa: F401  (fixture)

ARGS = {"x86_64": ("rdi", "rsi"), "arm64": ("x0", "x1")}


def test_fixtures_are_documented():
    r = subprocess.run([sys.executable, "-m", "pytest", "--fixtures", "-v", "-p", "no:cacheprovider",
                        "tests/test_readme_examples.py"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    text = r.stdout
    section = text[text.index("from probes.pytest_plugin"):]
    for name in ("probe_lab", "kprobe_asserts"):
        block = section[section.index(name):].split("\n\n")[0]
        assert "no docstring available" not in block, block
    assert "kretprobe(where" in section and "sym+off" in section


def test_lab_kretprobe_records_entries_and_returns(arch, tools_prog, probe_lab):
    stdin = b"abc"
    lab = probe_lab(tools_prog(arch, "sweep_io"), stdin=stdin)
    rp = lab.kretprobe("mix", record=ARGS[arch])
    lab.run()
    assert lab.result.exit_code == mix_hash(stdin) & 0x3F
    assert_hits(rp, len(stdin))
    assert rp.hits == len(stdin)                      # every return handled
    entries = [e for e in rp.events if e.handler == "entry"]
    returns = [e for e in rp.events if e.handler == "return"]
    assert [e.handler for e in rp.events] == ["entry", "return"] * len(stdin)
    main = lab.machine.symbols.lookup("main")
    h = 0
    for c, entry, ret in zip(stdin, entries, returns):
        a, b = ARGS[arch]
        assert entry.ip == lab.addr_of("mix") + (1 if arch == "x86_64" else 0)
        assert (entry.regs[a] & 0xFFFFFFFF, entry.regs[b] & 0xFF) == (h, c)
        h = (h * 31 + c) & 0xFFFFFFFF
        assert ret.retval & 0xFFFFFFFF == h
        assert main.addr <= ret.ret_addr < main.end and ret.ip == ret.ret_addr


def test_lab_kretprobe_maxactive_misses(arch, probe_lab):
    """sum_rec(100) nests 101 calls: with one instance, 100 of them are missed."""
    lab = probe_lab(ROOT / "firmware" / "bin" / arch / "recurse.elf")
    rp = lab.kretprobe("sum_rec", maxactive=1)
    lab.run()
    assert_hits(rp, 101, nmissed=100)
    assert [e.handler for e in rp.events] == ["entry", "return"]
    with pytest.raises(AssertionError, match=r"probe at sum_rec\+0x0 \(0x[0-9a-f]+\) .*nmissed=100"):
        assert_hits(rp, 101)


def test_assertion_messages_name_sym_off(arch, tools_prog, probe_lab):
    lab = probe_lab(tools_prog(arch, "sweep_io"), stdin=b"x")
    mix = lab.addr_of("mix")
    p = lab.kprobe("mix")
    before = lab.original("mix", 4)
    lab.kprobes.disable_kprobe(p)
    with pytest.raises(AssertionError) as e:
        assert_armed(lab, p)
    text = str(e.value)
    assert f"probe not armed at mix+0x0 ({mix:#x})" in text
    assert f"{mix:#x} <mix+0x0>:" in text            # the listings are labelled too
    lab.kprobes.enable_kprobe(p)
    with pytest.raises(AssertionError, match=rf"text not restored at mix\+0x0 \({mix:#x}\)"):
        assert_disarmed(lab, mix, before)
    with pytest.raises(AssertionError, match=rf"slot of the probe at mix\+0x0 \({mix:#x}\)"):
        assert_slot_holds(lab, p, b"\x00" * 4)
    with pytest.raises(AssertionError, match=rf"probe at mix\+0x0 \({mix:#x}\)"):
        assert_hits(p, 7)
    raw = Kprobe(addr=int(lab.disasm("mix", 16, original=True)[1].split(":")[0], 16))
    lab.kprobes.register_kprobe(raw)                  # by address, outside the lab
    off = raw.addr - mix
    with pytest.raises(AssertionError, match=rf"probe at mix\+{off:#x} \({raw.addr:#x}\)"):
        assert_hits(raw, 7, lab=lab)
    assert describe(lab.machine, 0x10) == "0x10"
