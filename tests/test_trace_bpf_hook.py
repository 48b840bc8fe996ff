"""The contract with the BPF layer (probes/trace/bpf_trace.py, another module): a
dispatcher calls trace_call_bpf(call, regs) only when the event's prog_array is non-empty,
records the event only if it returns non-zero, and skips the single-step (pre handler
returns 1) when a program moved ip. A stand-in module plays bpf_trace here."""
from __future__ import annotations

import io
import sys
import types

import pytest

from emu.loader import GuestConfig, load_guest
from probes.trace.tracefs import tracefs_of

from conftest import ARCHES, firmware_elf


@pytest.fixture
def fake_bpf(monkeypatch):
    calls = []
    mod = types.ModuleType("probes.trace.bpf_trace")
    mod.verdicts = []

    def trace_call_bpf(call, regs):
        calls.append((call.full_name, regs.ip))
        return mod.verdicts.pop(0) if mod.verdicts else 1

    mod.trace_call_bpf = trace_call_bpf
    mod.calls = calls
    monkeypatch.setitem(sys.modules, "probes.trace.bpf_trace", mod)
    return mod


def _setup(arch):
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=io.BytesIO())
    fs = tracefs_of(g.machine)
    fs.write("kprobe_events", "p:b/rd vfs_read n=$arg3:u32\nr:b/rdr vfs_read ret=$retval:s32")
    return g, fs


@pytest.mark.parametrize("arch", ARCHES)
def test_no_programs_no_call(arch, fake_bpf):
    g, fs = _setup(arch)
    assert fs.events["b/rd"].prog_array is None
    fs.write("events/b/enable", "1")
    g.machine.run(timeout=60)
    assert fake_bpf.calls == [] and fs.read("trace_pipe").count(" rd: ") == 7


@pytest.mark.parametrize("arch", ARCHES)
def test_bpf_verdict_decides_recording(arch, fake_bpf):
    g, fs = _setup(arch)
    rd, rdr = fs.events["b/rd"], fs.events["b/rdr"]
    rd.prog_array, rdr.prog_array = ["prog"], ["prog"]
    # vfs_read runs 7 times: entry (rd) and return (rdr) alternate.
    fake_bpf.verdicts = [0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1]
    fs.write("events/b/enable", "1")
    g.machine.run(timeout=60)
    assert [c[0] for c in fake_bpf.calls] == ["b/rd", "b/rdr"] * 7
    recorded = [x.split(": ")[1] for x in fs.read("trace_pipe").splitlines()]
    assert recorded == ["rdr", "rd", "rd", "rdr", "rd", "rdr", "rd", "rdr", "rd", "rdr"]
    assert [tk.nhit for tk in fs.kprobes.probes] == [7, 7]   # counted whatever BPF says


@pytest.mark.parametrize("arch", ARCHES)
def test_perf_register_arms_without_trace_enable(arch, fake_bpf):
    g, fs = _setup(arch)
    rd = fs.events["b/rd"]
    rd.prog_array = ["prog"]
    rd.perf_register()                                     # BPF attached, trace file disabled
    g.machine.run(timeout=60)
    assert len(fake_bpf.calls) == 7 and fs.buffer.written == 0
    assert fs.write("kprobe_events", "-:b/rd", append=True) == -16   # in use: -EBUSY
    rd.perf_unregister()
    assert fs.write("kprobe_events", "-:b/rd", append=True) == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_ip_change_skips_the_step(arch, fake_bpf, monkeypatch):
    """As bpf_override_return does: the program sets the return value and ip = the return
    address; vfs_read then returns -1 at once and the guest sees it."""
    g, fs = _setup(arch)
    rd = fs.events["b/rd"]
    rd.prog_array = ["prog"]
    m = g.machine

    def override(call, regs):
        ret_addr = regs[m.arch.link] if m.arch.link else m.memory.read_u64(regs.sp)
        regs.return_value = (-9) & (1 << 64) - 1
        if m.arch.link:
            regs.ip = ret_addr
        else:
            regs.sp = regs.sp + 8
            regs.ip = ret_addr
        return 1

    monkeypatch.setattr(fake_bpf, "trace_call_bpf", override)
    fs.write("events/b/rdr/enable", "1")
    rd.perf_register()
    m.run(timeout=60)
    rets = [x.rsplit("=", 1)[1] for x in fs.read("trace_pipe").splitlines()]
    # every call returned at once with the program's value (the body never ran)
    assert len(rets) == 7 and set(rets) == {"-9"}


@pytest.mark.parametrize("arch", ARCHES)
def test_bpf_printk_lines_in_the_trace(arch, fake_bpf, monkeypatch):
    """bpf_trace_printk messages are records of bpf_trace/bpf_trace_printk in the same
    buffer, printed between the events as trace_pipe shows them."""
    g, fs = _setup(arch)
    rd = fs.events["b/rd"]
    rd.prog_array = ["prog"]

    def printk(call, regs):
        fs.trace_bpf_printk(f"read of {regs.arg(3)} bytes\n")
        return 1

    monkeypatch.setattr(fake_bpf, "trace_call_bpf", printk)
    fs.write("events/b/rd/enable", "1")
    g.machine.run(timeout=60)
    lines = fs.read("trace_pipe").splitlines()
    assert len(lines) == 14
    assert lines[0].endswith(": bpf_trace_printk: read of 16 bytes") and " rd: (vfs_read+0x0/" in lines[1]
    assert fs.read("events/bpf_trace/bpf_trace_printk/format").endswith(
        'print fmt: "%s", __get_str(bpf_string)\n')
