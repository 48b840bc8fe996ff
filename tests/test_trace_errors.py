"""kprobe_events error_log: every refused command's message and caret column (one case per
line in tests/data/trace/kprobe_syntax_errors.txt, as the kernel selftest's table)."""
from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from emu.loader import GuestConfig, load_guest
from probes.trace.trace_probe import ERRORS
from probes.trace.tracefs import tracefs_of

from conftest import ARCHES, firmware_elf

TABLE = Path(__file__).parent / "data" / "trace" / "kprobe_syntax_errors.txt"


def _cases():
    for n, line in enumerate(TABLE.read_text().splitlines(), 1):
        if line and not line.startswith("#"):
            cmd, code = line.split("\t")
            yield pytest.param(cmd, code, id=f"{n}-{code}")


def tracefs(arch: str):
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=io.BytesIO())
    return tracefs_of(g.machine)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("marked,code", list(_cases()))
def test_syntax_error_table(arch, marked, code):
    fs = tracefs(arch)
    pos = marked.index("^")
    cmd = marked.replace("^", "", 1)
    assert fs.write("kprobe_events", cmd, append=True) < 0
    log = fs.read("error_log").splitlines()
    assert len(log) == 3, log
    assert log[0].endswith(f"] trace_kprobe: error: {ERRORS[code]}")
    assert log[1] == f"  Command: {cmd}"
    assert log[2] == " " * (11 + pos) + "^"
    assert fs.read("kprobe_events") == ""             # nothing half-made


def test_error_log_keeps_last_eight():
    fs = tracefs("x86_64")
    for i in range(10):
        fs.write("kprobe_events", f"p:g/e{i} vfs_read ^$none{i}", append=True)
    entries = fs.read("error_log").split("trace_kprobe: error:")
    assert len(entries) - 1 == 8
    assert fs.write("error_log", "") == 0 and fs.read("error_log") == ""


@pytest.mark.parametrize("arch", ARCHES)
def test_errnos(arch):
    fs = tracefs(arch)
    assert fs.write("kprobe_events", "p non_exist_func", append=True) == -errno.EINVAL   # parse error
    assert fs.write("kprobe_events", "p 0x10", append=True) == -errno.ENOENT   # register_kprobe's
    assert fs.write("kprobe_events", "p vfs_read $none", append=True) == -errno.EINVAL
    assert fs.write("kprobe_events", "x vfs_read", append=True) == -errno.EINVAL
    assert fs.write("kprobe_events", "-:nothere", append=True) == -errno.ENOENT
    many = " ".join(f"a{i}=@11" for i in range(129))
    assert fs.write("kprobe_events", f"p vfs_read {many}", append=True) == -errno.E2BIG


@pytest.mark.parametrize("arch", ARCHES)
def test_probe_point_refused_by_core(arch):
    """Register failures map as the kernel maps them: -EILSEQ (x86, mid-instruction) ->
    BAD_INSN_BNDRY, other errors (arm64 misaligned: -EINVAL) -> FAIL_REG_PROBE; index 1."""
    fs = tracefs(arch)
    ret = fs.write("kprobe_events", "p vfs_read+3", append=True)   # inside `mov rbx, rdi`
    log = fs.read("error_log").splitlines()
    want = {"x86_64": ("BAD_INSN_BNDRY", -errno.EILSEQ), "arm64": ("FAIL_REG_PROBE", -errno.EINVAL)}[arch]
    assert ret == want[1]
    assert log[0].endswith(ERRORS[want[0]]) and log[2] == " " * (11 + 2) + "^"


def _last_error(fs) -> list[str]:
    return fs.read("error_log").splitlines()[-3:]


@pytest.mark.parametrize("arch", ARCHES)
def test_non_unique_symbol(arch):
    fs = tracefs(arch)
    syms = fs.machine.symbols
    for name in ("vfs_read", "vfs_write"):       # two functions called `twin`
        s = syms.lookup(name)
        syms.add("twin", s.addr, s.size, "func")
    assert fs.write("kprobe_events", "p twin", append=True) == -errno.EINVAL
    log = _last_error(fs)
    assert log[0].endswith(ERRORS["NON_UNIQ_SYMBOL"]) and log[2] == " " * (11 + 2) + "^"


@pytest.mark.parametrize("arch", ARCHES)
def test_event_exist_too_big_too_many(arch):
    fs = tracefs(arch)
    fs.trace_bpf_printk("x")                      # a non-kprobe event: bpf_trace/bpf_trace_printk
    assert fs.write("kprobe_events", "p:bpf_trace/bpf_trace_printk vfs_read", append=True) == -errno.EEXIST
    assert _last_error(fs)[0].endswith(ERRORS["EVENT_EXIST"])
    big = " ".join(f"a{i}=+0(@11):u64[64]" for i in range(7))    # 7 x 512 bytes > 3072
    cmd = f"p vfs_read {big}"
    assert fs.write("kprobe_events", cmd, append=True) == -errno.E2BIG
    log = _last_error(fs)
    assert log[0].endswith(ERRORS["EVENT_TOO_BIG"])
    assert log[2] == " " * (11 + cmd.index("a6=") + 3) + "^"
    many = "p vfs_read " + " ".join(f"a{i}=@11" for i in range(129))
    assert fs.write("kprobe_events", many, append=True) == -errno.E2BIG
    log = _last_error(fs)
    assert log[0].endswith(ERRORS["TOO_MANY_ARGS"]) and log[2] == " " * (11 + 11) + "^"
