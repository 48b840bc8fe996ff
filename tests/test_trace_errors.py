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
    assert fs.write("kprobe_events", "p ^non_exist_func", append=True) == -errno.ENOENT
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
