"""Event filters: the kernel's grammar evaluated on binary records (event fields, common_*,
comm), checked against a Python oracle over the unfiltered trace; and the refused filters
with the kernel's messages and caret columns."""
from __future__ import annotations

import errno
import io
import re
from pathlib import Path

import pytest

from emu.loader import GuestConfig, load_guest
from probes.trace.trace_events_filter import FILTER_ERRORS
from probes.trace.tracefs import tracefs_of

from conftest import ARCHES, firmware_elf

EVENT = "p:t/open do_sys_open dfd=$arg1:s32 path=+0($arg2):string flags=$arg3:x32"
LINE = re.compile(r'dfd=(-?\d+) path="(.*)" flags=0x([0-9a-f]+)$')

CASES = [
    ("dfd >= 0", lambda d, p, f: d >= 0),
    ("dfd < -99", lambda d, p, f: d < -99),
    ('path ~ "/dev/*"', lambda d, p, f: p.startswith("/dev/")),
    ("path ~ *null", lambda d, p, f: p.endswith("null")),
    ('path ~ "*tc*"', lambda d, p, f: "tc" in p),
    ('path == "/etc/passwd"', lambda d, p, f: p == "/etc/passwd"),
    ("path != '/etc/passwd'", lambda d, p, f: p != "/etc/passwd"),
    ("flags & 0x40", lambda d, p, f: bool(f & 0x40)),
    ("flags > 1 || dfd != -100", lambda d, p, f: f > 1 or d != -100),
    ('!(path ~ "*null") && dfd < 0', lambda d, p, f: not p.endswith("null") and d < 0),
    ("(flags == 0 || flags == 1) && !(dfd == 6)", lambda d, p, f: f in (0, 1) and d != 6),
    ("common_pid == 1000", lambda d, p, f: True),
    ("common_pid != 1000 || common_preempt_count > 0", lambda d, p, f: False),
    ('comm == "demo.elf" && flags <= 0x42', lambda d, p, f: f <= 0x42),
    ("common_flags & 1", lambda d, p, f: True),       # IRQS_OFF, as a trap handler runs
]


def run(arch: str, flt: str | None):
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=io.BytesIO())
    fs = tracefs_of(g.machine)
    assert fs.write("kprobe_events", EVENT) == 0
    if flt is not None:
        assert fs.write("events/t/open/filter", flt) == 0, fs.read("events/t/open/filter")
        assert fs.read("events/t/open/filter") == flt + "\n"
    fs.write("events/t/open/enable", "1")
    g.machine.run(timeout=60)
    return [x for x in fs.read("trace_pipe").splitlines()]


@pytest.fixture(scope="module", params=ARCHES)
def unfiltered(request):
    return request.param, run(request.param, None)


@pytest.mark.parametrize("flt,oracle", CASES, ids=[c[0] for c in CASES])
def test_filter_against_oracle(unfiltered, flt, oracle):
    arch, everything = unfiltered
    assert len(everything) == 16

    def keep(line):
        d, p, f = LINE.search(line).groups()
        return oracle(int(d), p, int(f, 16))

    want = [x for x in everything if keep(x)]
    got = run(arch, flt)
    assert got == want
    assert 0 < len(want) < 16 or flt.startswith(("common", "comm ")) or flt == "common_flags & 1"


def _error_cases():
    table = Path(__file__).parent / "data" / "trace" / "filter_errors.txt"
    for n, line in enumerate(table.read_text().splitlines(), 1):
        if line and not line.startswith("#"):
            marked, code = line.split("\t")
            yield pytest.param(marked, code, id=f"{n}-{code}")


@pytest.mark.parametrize("marked,code", list(_error_cases()))
def test_filter_errors(marked, code):
    g = load_guest(GuestConfig(path=str(firmware_elf("x86_64", "demo"))), stdout=io.BytesIO())
    fs = tracefs_of(g.machine)
    fs.write("kprobe_events", EVENT)
    pos = marked.index("^")
    text = marked.replace("^", "", 1)
    assert fs.write("events/t/open/filter", text) == -errno.EINVAL
    assert fs.read("events/t/open/filter") == f"{text}\n{' ' * pos}^\nparse_error: {FILTER_ERRORS[code]}\n"
    log = fs.read("error_log").splitlines()
    assert log[0].endswith(f"event filter parse error: error: {FILTER_ERRORS[code]}")
    assert log[2] == " " * (11 + pos) + "^"
    assert fs.events["t/open"].filter is None
    assert fs.write("events/t/open/filter", "0") == 0 and fs.read("events/t/open/filter") == "none\n"
