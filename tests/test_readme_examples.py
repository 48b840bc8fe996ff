"""The README's pytest-plugin example, verbatim in substance: it must keep working."""
from probes.testing import assert_armed, assert_disarmed, assert_hits

from conftest import ROOT


def test_probe_on_open(probe_lab):
    lab = probe_lab(ROOT / "firmware/bin/x86_64/demo.elf")
    before = lab.text("do_sys_open", 2)
    p = lab.kprobe("do_sys_open", record=("rdi",))
    assert_armed(lab, p)
    lab.run()
    assert_hits(p, 16)
    assert p.events[0].handler == "pre" and p.events[0].ip == p.addr + 1
    lab.kprobes.unregister_kprobe(p)
    assert_disarmed(lab, p.addr, before)


def test_adr_is_simulated(probe_lab):
    lab = probe_lab.asm("arm64", {"f": "adr x0, lbl; ret; lbl: nop"})
    p = lab.kprobe("f")
    assert lab.inspect(p).verdict == "simulate"
    assert lab.call("f") == lab.addr_of("f") + 8


def test_failure_message_shows_disassembly(probe_lab):
    lab = probe_lab(ROOT / "firmware/bin/arm64/demo.elf")
    p = lab.kprobe("do_sys_open")
    lab.kprobes.disable_kprobe(p)
    try:
        assert_armed(lab, p)
    except AssertionError as e:
        text = str(e)
        assert "brk #4" in text and "stp x29, x30" in text and "expected" in text
    else:
        raise AssertionError("assert_armed passed on a disabled probe")
