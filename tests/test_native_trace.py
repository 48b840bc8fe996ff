"""Kprobe events whose fetch arguments C evaluates (probes/trace/trace_probe.py
compile_fetch_program, kprobe_native.c eval_tprog, issue 14): the ring buffer's records
(bytes and timestamps) and the `trace` text are identical to the Python path's on both
arches, for registers, $argN, $stackN, the stack pointer, immediates, @symbols, nested
dereferences, bitfields, strings and faulting loads; and C really built them."""
from __future__ import annotations

import io

import pytest

from conftest import firmware_elf, needs_native
from emu.loader import GuestConfig, load_guest
from probes.kprobes import kprobes_of
from probes.trace.trace_probe import compile_fetch_program
from probes.trace.tracefs import tracefs_of


A1 = {"x86_64": "%di", "arm64": "%x0"}
STACK0 = {"x86_64": "$stack0", "arm64": "%lr"}
EVENTS = [
    # vfs_read(struct file *file, char *buf, u64 count): f_inode -> i_ino, i_mode, i_name
    "p:n/read vfs_read f=$arg1:x64 cnt=$arg3:u32 ino=+0(+0({a1})):u32 "
    "mode=+4(+0($arg1)):x16 name=+16(+0($arg1)):string sp=$stack:x64 ret={stack0}:symbol",
    # getname(const char *filename): the path string, a bitfield, an immediate, a bad load
    "p:n/getname getname path=+0($arg1):string lo=+0($arg1):b4@4/8 imm=\\1234:s16 "
    "bad=+0(\\16):u64 badstr=+0(\\16):string s1=$stack1:x64",
    # do_sys_open(int dfd, const char *filename, int flags, u32 mode)
    "p:n/open do_sys_open dfd=$arg1:s32 fn=+0($arg2):string flags=$arg3:x32 "
    "deep=+8(+0(+0($arg2))):u8 pkt=@pkt0:u16 pktb=@pkt0:b4@4/16",
]


def _run(arch: str, native: bool, monkeypatch, events=EVENTS) -> dict:
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=io.BytesIO())
    m, fs = g.machine, tracefs_of(g.machine)
    m.enable_cycle_model()
    for ev in events:
        cmd = ev.format(a1=A1[arch], stack0=STACK0[arch])
        assert fs.write("kprobe_events", cmd, append=True) == 0, fs.read("error_log")
    fs.write("events/enable", "1")
    res = m.run(timeout=60)
    recs = [(r.ts, r.cpu, bytes(r.data)) for r in fs.buffer.records()]
    out = {"exit": res.exit_code, "records": recs, "trace": fs.read("trace"),
           "profile": fs.read("kprobe_profile"), "cycles": m.clock.cycles}
    d = kprobes_of(m).native
    out["c_built"] = d.st.traced if d is not None else None
    return out


@needs_native
def test_records_are_the_python_records(arch, monkeypatch):
    native = _run(arch, True, monkeypatch)
    python = _run(arch, False, monkeypatch)
    built = native.pop("c_built")
    python.pop("c_built")
    assert native == python
    assert native["exit"] == 0 and len(native["records"]) > 20
    assert built == len(native["records"])                 # every record's fields from C
    assert "badstr=(fault)" in native["trace"] and " bad=0 " in native["trace"]


@needs_native
def test_programs_only_for_what_c_models(monkeypatch):
    """$comm, immediate strings, arrays and symstr stay Python's (their
    records then come from the Python fetch, so C built none)."""
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1")
    g = load_guest(GuestConfig(path=str(firmware_elf("x86_64", "demo"))), stdout=io.BytesIO())
    fs = tracefs_of(g.machine)
    for cmd in ("p:n/c vfs_read c=$comm", "p:n/a vfs_read a=+0(%di):u32[2]",
                "p:n/s vfs_read s=$stack0:symstr", 'p:n/i vfs_read i=\\"x":string'):
        assert fs.write("kprobe_events", cmd, append=True) == 0, fs.read("error_log")
    fs.write("events/enable", "1")
    assert g.machine.run(timeout=60).exit_code == 0
    assert kprobes_of(g.machine).native.st.traced == 0
    assert len(fs.buffer.records()) == 4 * 7
    # at a return, $retval and the stack compile for C; a saved $argN and %ip stay Python's
    for cmd in ("r:n/rv vfs_read rv=$retval:x64 s=$stack0", "r:n/ra vfs_read a=$arg1",
                "r:n/ri vfs_read ip=%ip"):
        assert fs.write("kprobe_events", cmd, append=True) == 0, fs.read("error_log")
    compiled = {tk.call.name: compile_fetch_program(tk.args, g.machine.arch, 16, tk.is_return)
                for tk in fs.kprobes.probes if tk.is_return}
    assert compiled["rv"] is not None and compiled["ra"] is None and compiled["ri"] is None
