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


def guest(arch: str, prog: str = "demo"):
    return load_guest(GuestConfig(path=str(firmware_elf(arch, prog))), stdout=io.BytesIO())


def commands(arch: str) -> list[str]:
    out = []
    for line in (DATA / "firmware_events.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            for k, v in REGS[arch].items():
                line = line.replace("{" + k + "}", v)
            out.append(line)
    return out


def run_commands(arch: str, cmds: list[str] | None = None) -> str:
    g = guest(arch)
    fs = tracefs_of(g.machine)
    for c in cmds or commands(arch):
        assert fs.write("kprobe_events", c, append=True) == 0, fs.read("error_log")
    assert fs.write("events/enable", "1") == 0
    g.machine.run(timeout=60)
    return fs.read("trace_pipe")


@pytest.mark.parametrize("arch", ARCHES)
def test_fetch_args_exact_lines(arch):
    got = mask_ts(run_commands(arch))
    want = (DATA / "expected" / arch / "firmware_events.txt").read_text()
    assert got.splitlines() == want.splitlines()
