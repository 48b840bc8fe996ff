"""kprobe events end to end on the firmware (both arches): every fetch-arg form and type
recorded and printed exactly as the kernel's trace_pipe prints them; kretprobe lines; the
format file, id, kprobe_profile; enable/disable; appending probes to an event; -EBUSY and
truncation; ring-buffer size and lost events; JSON records."""
from __future__ import annotations

import errno
import io
import json
import re
from pathlib import Path

import pytest

from emu.loader import GuestConfig, load_guest
from probes.trace.tracefs import tracefs_of

from conftest import ARCHES, firmware_elf

DATA = Path(__file__).parent / "data" / "trace"
REGS = {"arm64": {"ARG1": "%x0", "ARG3": "%x2", "SP": "%sp", "RET": "%lr:symbol"},
        "x86_64": {"ARG1": "%di", "ARG3": "%dx", "SP": "%sp", "RET": "$stack0:symbol"}}
TS = re.compile(r"(\] d\.\.\.\. )[ \d]{5}\.\d{6}(: )")


def mask_ts(text: str) -> str:
    return TS.sub(r"\1<ts>\2", text)


def guest(arch: str, prog: str = "demo", path: str | None = None):
    return load_guest(GuestConfig(path=path or str(firmware_elf(arch, prog))), stdout=io.BytesIO())


def commands(arch: str) -> list[str]:
    out = []
    for line in (DATA / "firmware_events.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            for k, v in REGS[arch].items():
                line = line.replace("{" + k + "}", v)
            out.append(line)
    return out


def run_commands(arch: str, cmds: list[str] | None = None, path: str | None = None) -> str:
    g = guest(arch, path=path)
    fs = tracefs_of(g.machine)
    for c in cmds or commands(arch):
        assert fs.write("kprobe_events", c, append=True) == 0, fs.read("error_log")
    assert fs.write("events/enable", "1") == 0
    g.machine.run(timeout=60)
    return fs.read("trace_pipe")


@pytest.mark.parametrize("arch", ARCHES)
def test_fetch_args_exact_lines(arch, monkeypatch):
    # argv[0] and AT_EXECFN sit on the initial stack, so %sp depends on the path's length:
    # run from the firmware's directory so the expected lines hold on any checkout.
    elf = firmware_elf(arch, "demo")
    monkeypatch.chdir(elf.parent)
    got = mask_ts(run_commands(arch, path=elf.name))
    want = (DATA / "expected" / arch / "firmware_events.txt").read_text()
    assert got.splitlines() == want.splitlines()


FORMAT_P = """\
name: f
ID: {id}
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;
\tfield:u32 a;\toffset:16;\tsize:4;\tsigned:0;
\tfield:__data_loc char[] s;\toffset:20;\tsize:4;\tsigned:1;
\tfield:u8 arr[2];\toffset:24;\tsize:2;\tsigned:0;
\tfield:s64 arg4;\toffset:26;\tsize:8;\tsigned:1;

print fmt: "(%lx) a=%u s=\\"%s\\" arr={{0x%x,0x%x}} arg4=%Ld", REC->__probe_ip, REC->a, __get_str(s), REC->arr[0], REC->arr[1], REC->arg4
"""

FORMAT_R = """\
name: fr
ID: {id}
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long __probe_func;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long __probe_ret_ip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u64 arg1;\toffset:24;\tsize:8;\tsigned:0;

print fmt: "(%lx <- %lx) arg1=0x%Lx", REC->__probe_func, REC->__probe_ret_ip, REC->arg1
"""


@pytest.mark.parametrize("arch", ARCHES)
def test_format_id_and_readback(arch):
    fs = tracefs_of(guest(arch).machine)
    assert fs.write("kprobe_events", "p:t/f vfs_read a=$arg3:u32 s=+0($arg2):string "
                    "arr=+0($arg1):x8[2] \\-5:s64") == 0
    assert fs.write("dynamic_events", "r:t/fr vfs_read $retval", append=True) == 0
    fid = int(fs.read("events/t/f/id"))
    assert fs.read("events/t/f/format") == FORMAT_P.format(id=fid)
    assert fs.read("events/t/fr/format") == FORMAT_R.format(id=int(fs.read("events/t/fr/id")))
    assert int(fs.read("events/t/fr/id")) == fid + 1
    assert fs.read("kprobe_events") == ("p:t/f vfs_read a=$arg3:u32 s=+0($arg2):string "
                                        "arr=+0($arg1):x8[2] arg4=\\-5:s64\n"
                                        "r10:t/fr vfs_read arg1=$retval\n")
    assert fs.read("dynamic_events") == fs.read("kprobe_events")


@pytest.mark.parametrize("arch", ARCHES)
def test_default_event_names(arch):
    m = guest(arch).machine
    fs = tracefs_of(m)
    addr = m.symbols.lookup("vfs_write").addr
    off = {"arm64": 4, "x86_64": 5}[arch]               # an instruction boundary
    for cmd in ("p vfs_read", "r vfs_read", f"p vfs_read+{off}", "p:grp/ vfs_read%return",
                f"p {addr:#x}", "r7 ksys_read"):
        assert fs.write("kprobe_events", cmd, append=True) == 0, (cmd, fs.read("error_log"))
    assert fs.read("kprobe_events").splitlines() == [
        "p:kprobes/p_vfs_read_0 vfs_read", "r10:kprobes/r_vfs_read_0 vfs_read",
        f"p:kprobes/p_vfs_read_{off} vfs_read+{off}", "r10:grp/r_vfs_read_0 vfs_read",
        f"p:kprobes/p_0x{addr:x} 0x{addr:x}", "r7:kprobes/r_ksys_read_0 ksys_read"]
    assert sorted(fs.events) == ["grp/r_vfs_read_0", f"kprobes/p_0x{addr:x}", "kprobes/p_vfs_read_0",
                                 f"kprobes/p_vfs_read_{off}", "kprobes/r_ksys_read_0", "kprobes/r_vfs_read_0"]


@pytest.mark.parametrize("arch", ARCHES)
def test_enable_disable_and_profile(arch):
    g = guest(arch)
    m, fs = g.machine, tracefs_of(g.machine)
    fs.write("kprobe_events", "p:a/rd vfs_read\np:a/wr vfs_write\nr:b/open do_sys_open ret=$retval:s32")
    addr = m.symbols.lookup("vfs_read").addr
    original = m.memory.read(addr, len(m.arch.breakpoint))
    assert original != m.arch.breakpoint                          # registered but disarmed
    assert fs.read("events/a/enable") == "0\n"
    assert fs.write("events/a/rd/enable", "1") == 0
    assert m.memory.read(addr, len(m.arch.breakpoint)) == m.arch.breakpoint
    assert fs.read("events/a/enable") == "X\n" and fs.read("events/enable") == "X\n"
    assert fs.write("events/b/enable", "1") == 0
    assert fs.write("events/a/rd/enable", "2") == -errno.EINVAL
    m.run(timeout=60)
    names = [line.split(": ")[1] for line in fs.read("trace").splitlines() if not line.startswith("#")]
    assert set(names) == {"rd", "open"} and names.count("rd") == 7 and names.count("open") == 16
    assert fs.read("kprobe_profile") == (f"  {'rd':<44} {7:>15} {0:>15}\n"
                                         f"  {'wr':<44} {0:>15} {0:>15}\n"
                                         f"  {'open':<44} {16:>15} {0:>15}\n")
    assert fs.write("events/enable", "0") == 0
    assert m.memory.read(addr, len(m.arch.breakpoint)) == original


@pytest.mark.parametrize("arch", ARCHES)
def test_busy_delete_and_truncate(arch):
    fs = tracefs_of(guest(arch).machine)
    assert fs.write("kprobe_events", "p:a/rd vfs_read\np:a/wr vfs_write") == 0
    fs.write("events/a/rd/enable", "1")
    assert fs.write("kprobe_events", "-:a/rd", append=True) == -errno.EBUSY
    assert fs.write("kprobe_events", "p:a/x vfs_read") == -errno.EBUSY      # O_TRUNC refused
    assert len(fs.read("kprobe_events").splitlines()) == 2
    assert fs.write("kprobe_events", "-:wr", append=True) == 0            # group optional
    fs.write("events/a/rd/enable", "0")
    assert fs.write("kprobe_events", "p:a/x vfs_read") == 0                # deletes all first
    assert fs.read("kprobe_events") == "p:a/x vfs_read\n"
    assert "a/rd" not in fs.events
    with pytest.raises(FileNotFoundError):
        fs.read("events/a/rd/format")


@pytest.mark.parametrize("arch", ARCHES)
def test_append_probe_to_event(arch):
    g = guest(arch)
    fs = tracefs_of(g.machine)
    assert fs.write("kprobe_events", "p:io/rw vfs_read n=$arg3:u32") == 0
    assert fs.write("kprobe_events", "p:io/rw vfs_write n=$arg3:u32", append=True) == 0
    assert fs.read("kprobe_events") == "p:io/rw vfs_read n=$arg3:u32\np:io/rw vfs_write n=$arg3:u32\n"
    for bad, code in (("r:io/rw vfs_write n=$retval:u32", "Probe type is different from existing probe"),
                      ("p:io/rw ksys_write m=$arg3:u32", "Argument type or name is different from existing probe"),
                      ("p:io/rw ksys_write n=$arg3:u64", "Argument type or name is different from existing probe"),
                      ("p:io/rw ksys_write", "Argument type or name is different from existing probe"),
                      ("p:io/rw vfs_write n=$arg3:u32", "There is already the exact same probe event")):
        assert fs.write("kprobe_events", bad, append=True) == -errno.EEXIST
        log = fs.read("error_log").splitlines()[-3:]
        assert log[0].endswith(code) and log[1] == f"  Command: {bad}"
        caret = {"Probe": 0, "There": 0}.get(code.split()[0], len(bad.split()[0]) + len(bad.split()[1]) + 2)
        if bad == "p:io/rw ksys_write":
            caret = len(bad) + 1                                         # past the end
        assert log[2] == " " * (11 + caret) + "^", (bad, log)
    fs.write("events/io/rw/enable", "1")
    g.machine.run(timeout=60)
    text = fs.read("trace_pipe")
    assert text.count("rw: (vfs_read+0x0/") == 7 and text.count("rw: (vfs_write+0x0/") > 0
    assert fs.read("kprobe_profile").count("rw ") == 2


@pytest.mark.parametrize("arch", ARCHES)
def test_ring_buffer_size_overwrite_and_lost(arch):
    g = guest(arch)
    fs = tracefs_of(g.machine)
    fs.write("kprobe_events", "p:t/open do_sys_open path=+0($arg2):string")
    fs.write("events/t/open/enable", "1")
    assert fs.write("buffer_size_kb", "0") == -errno.EINVAL
    assert fs.write("buffer_size_kb", "7") == 0 and fs.read("buffer_size_kb") == "7\n"
    assert fs.buffer.cpus[0].size == 7 * 1024
    fs.buffer.cpus[0].size = 256                        # a few records only (below 1 KB)
    g.machine.run(timeout=60)
    b = fs.buffer
    assert b.written == 16 - b.cpus[0].dropped and b.lost == b.cpus[0].overrun > 0
    kept = fs.read("trace").splitlines()
    assert f"# entries-in-buffer/entries-written: {b.entries}/{b.written}   #P:1" in kept
    assert kept[-1].endswith('path="/tmp/x"')           # overwrite keeps the newest


@pytest.mark.parametrize("arch", ARCHES)
def test_no_overwrite_drops_newest_and_tracing_off(arch):
    g = guest(arch)
    fs = tracefs_of(g.machine)
    fs.write("kprobe_events", "p:t/open do_sys_open path=+0($arg2):string")
    fs.write("events/t/open/enable", "1")
    assert fs.write("options/overwrite", "0") == 0
    fs.buffer.cpus[0].size = 256
    g.machine.run(timeout=60)
    lines = [x for x in fs.read("trace").splitlines() if not x.startswith("#")]
    assert lines[0].endswith('path="/etc/passwd"') and fs.buffer.cpus[0].dropped > 0
    assert fs.read("trace_pipe") and fs.read("trace_pipe") == ""   # consumed
    g2 = guest(arch)
    fs2 = tracefs_of(g2.machine)
    fs2.write("kprobe_events", "p:t/open do_sys_open")
    fs2.write("events/t/open/enable", "1")
    fs2.write("tracing_on", "0")
    g2.machine.run(timeout=60)
    assert fs2.buffer.written == 0 and fs2.kprobes.probes[0].nhit == 16


@pytest.mark.parametrize("arch", ARCHES)
def test_json_records(arch):
    g = guest(arch)
    fs = tracefs_of(g.machine)
    fs.write("kprobe_events", "r:t/open do_sys_open ret=$retval:s32 path=+0($arg2):string")
    fs.write("events/enable", "1")
    g.machine.run(timeout=60)
    recs = [json.loads(x) for x in fs.read_pipe(as_json=True).splitlines()]
    assert len(recs) == 16
    assert recs[0]["event"] == "t/open" and recs[0]["fields"]["ret"] == 3
    assert recs[0]["fields"]["path"] == "/etc/passwd" and recs[0]["pid"] == 1000
    assert recs[0]["comm"] == "demo.elf" and recs[0]["flags"] == "d...."
    assert recs[0]["fields"]["__probe_func"] == g.machine.symbols.lookup("do_sys_open").addr


@pytest.mark.parametrize("arch", ARCHES)
def test_profile_counts_kretprobe_misses(arch):
    """maxactive 1 on a recursive function: nested calls find no free instance, and
    kprobe_profile's misses (entry kprobe's nmissed + the kretprobe's) say how many."""
    g = guest(arch, "recurse")
    fs = tracefs_of(g.machine)
    assert fs.write("kprobe_events", "r1:t/fib fib ret=$retval:u64\np:t/fibe fib") == 0
    assert fs.read("kprobe_events").startswith("r1:t/fib fib ret=$retval:u64\n")
    fs.write("events/enable", "1")
    g.machine.run(timeout=60)
    rows = {r.split()[0]: (int(r.split()[1]), int(r.split()[2])) for r in fs.read("kprobe_profile").splitlines()}
    calls = rows["fibe"][0]
    returns, misses = rows["fib"]
    assert calls > 10 and misses > 0 and returns + misses == calls
    assert len([x for x in fs.read("trace_pipe").splitlines() if " fib: " in x]) == returns
