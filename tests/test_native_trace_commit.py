"""Kprobe-event records committed by C (kprobe_native.c kn_trace_commit into the ring
buffer's C-writable rings, issue 14): the `trace` and `trace_pipe` text, the snapshot
buffer, kprobe_profile, every per-CPU counter (entries, written, overrun, dropped, read)
and the guest's run are identical to the Python path's on both arches -- with and without
a filter C evaluates, a filter it does not (strings: Python commits), a buffer that
overwrites or drops, and a Python handler that switches tracing off and on and takes
snapshots in the middle of the run (C must ask Python again after it ran)."""
from __future__ import annotations

import io

import pytest

from conftest import firmware_elf, needs_native
from emu.loader import GuestConfig, load_guest
from probes.kprobes import Kprobe, kprobes_of
from probes.trace.tracefs import tracefs_of

A1 = {"x86_64": "%di", "arm64": "%x0"}
EVENTS = [
    "p:n/read vfs_read f=$arg1:x64 cnt=$arg3:u32 ino=+0(+0({a1})):u32 sp=$stack:x64",
    "p:n/getname getname path=+0($arg1):string lo=+0($arg1):b4@4/8 imm=\\1234:s16",
    "p:n/open do_sys_open dfd=$arg1:s32 fn=+0($arg2):string flags=$arg3:x32",
    # return probes (not on a probed function: the kprobe and the kretprobe would share
    # an aggregate probe, Python's): $retval and the stack in C; a saved $argN is Python's
    "r:n/rread ksys_read rv=$retval:s64 st=$stack:x64 s1=$stack1:x64",
    "r:n/ropen getname_flags rv=$retval:x64 path=+0($arg1):string",
]


def _counters(buf) -> list[tuple[int, ...]]:
    return [(len(b), b.used, b.written, b.overrun, b.dropped, b.read) for b in buf.cpus]


def _run(arch: str, native: bool, monkeypatch, setup=None, size_kb: int | None = None,
         cycles: bool = False) -> dict:
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    out_stream = io.BytesIO()
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=out_stream)
    m, fs = g.machine, tracefs_of(g.machine)
    if cycles:
        m.enable_cycle_model()
    for ev in EVENTS:
        assert fs.write("kprobe_events", ev.format(a1=A1[arch]), append=True) == 0, fs.read("error_log")
    if size_kb is not None:
        fs.buffer.cpus[0].size = size_kb
    if setup is not None:
        setup(m, fs)
    fs.write("events/enable", "1")
    res = m.run(timeout=60)
    d = kprobes_of(m).native
    ts = d.tstate if d is not None else None
    out = {"exit": res.exit_code, "guest": out_stream.getvalue(), "counters": _counters(fs.buffer),
           "trace": fs.read("trace"), "profile": fs.read("kprobe_profile"),
           "snapshot": fs.read("snapshot"), "cycles": m.clock.cycles,
           "comms": dict(fs.comms), "by_reason": dict(m.clock.by_reason)}
    out["pipe"] = fs.read("trace_pipe")
    out["after_pipe"] = _counters(fs.buffer)
    return {"out": out, "committed": ts.committed if ts is not None else 0}


def _both(arch, monkeypatch, **kw) -> tuple[dict, int]:
    c = _run(arch, True, monkeypatch, **kw)
    py = _run(arch, False, monkeypatch, **kw)
    assert c["out"] == py["out"]
    assert py["committed"] == 0
    return c["out"], c["committed"]


@needs_native
def test_c_commits_the_python_records(arch, monkeypatch):
    out, committed = _both(arch, monkeypatch)
    n = out["counters"][0][2]
    ropen = out["trace"].count(" ropen: ")
    assert out["exit"] == 0 and n > 20 and ropen > 0 and out["trace"].count(" rread: ") > 0
    assert committed == n - ropen                 # every record but ropen's written by C
    assert 'fn="/etc/passwd"' in out["trace"]            # a string fetched by C
    assert out["after_pipe"][0][0] == 0 and out["after_pipe"][0][5] == n


def _filters(numeric: bool):
    def setup(m, fs):
        if numeric:
            assert fs.write("events/n/read/filter", "cnt > 100 && !(cnt == 0x1000) || cpu != 0") == 0
            assert fs.write("events/n/open/filter", "flags & 0x40 || dfd < -100") == 0
        else:
            assert fs.write("events/n/getname/filter", 'path ~ "*pass*"') == 0
    return setup


@needs_native
@pytest.mark.parametrize("numeric", [True, False], ids=["numeric", "string"])
def test_filters(arch, monkeypatch, numeric):
    out, committed = _both(arch, monkeypatch, setup=_filters(numeric))
    unfiltered, _ = _both(arch, monkeypatch) if numeric else (None, 0)
    if numeric:                                    # some refused, by C
        assert 0 < out["counters"][0][2] < unfiltered["counters"][0][2]
        assert committed == out["counters"][0][2] - out["trace"].count(" ropen: ")
    else:                                          # getname's records are Python's
        assert 0 < committed < out["counters"][0][2]


@needs_native
@pytest.mark.parametrize("overwrite", [1, 0])
def test_full_buffer(arch, monkeypatch, overwrite):
    def setup(m, fs):
        assert fs.write("options/overwrite", str(overwrite)) == 0
    out, committed = _both(arch, monkeypatch, setup=setup, size_kb=700)
    entries, used, written, overrun, dropped, _read = out["counters"][0]
    assert used <= 700 and committed > 0
    assert (overrun > 0 and dropped == 0) if overwrite else (dropped > 0 and overrun == 0)


def _toggler(m, fs):
    """A Python pre handler on strncpy_from_user: every other call switches tracing off or on, every
    third takes a snapshot (swapping the live buffer under C's feet)."""
    calls = [0]

    def pre(p, regs):
        calls[0] += 1
        if calls[0] % 2 == 0:
            fs.write("tracing_on", "0" if fs.tracing_on else "1")
        if calls[0] % 3 == 0:
            fs.write("snapshot", "1")
        return 0
    kprobes_of(m).register_kprobe(Kprobe(symbol_name="strncpy_from_user", pre_handler=pre))


@needs_native
def test_python_changes_mid_run(arch, monkeypatch):
    out, committed = _both(arch, monkeypatch, setup=_toggler)
    assert committed > 0
    assert "# entries-in-buffer" in out["snapshot"]


@needs_native
def test_with_the_cycle_model(arch, monkeypatch):
    """Timestamps subtract the running block's cost after the probed instruction, which
    Python's path learns once per block; cycles and their reasons are the same."""
    out, committed = _both(arch, monkeypatch, cycles=True)
    n = out["counters"][0][2]
    ropen = out["trace"].count(" ropen: ")
    assert n > 20 and 0 < committed < n - ropen    # the first hit of each block: Python
    assert committed >= n - ropen - 4 * 4
