"""Triggers on function calls: set_ftrace_filter's `FUNC:COMMAND[:N]` probes
(probes/trace/trace_functions.py) on callpath.ftrace, both arches. The expected trace is
computed from the order of the calls, which a plain run with an event on each function
records: traceoff/traceon windows, stacktrace counts that tracing-off calls do not use,
enable_event/disable_event flipping a soft-disabled event, the file's probe lines, errors."""
from __future__ import annotations

import errno

from conftest import firmware_elf
from probes.testing import ProbeLab
from probes.trace.tracefs import tracefs_of

FUNCS = {"o": "do_sys_open", "r": "vfs_read", "s": "vfs_statx", "l": "ksys_lseek",
         "c": "filp_close", "w": "vfs_write"}


def _lab(arch: str, events: str):
    lab = ProbeLab.load(str(firmware_elf(arch, "callpath.ftrace")))
    fs = tracefs_of(lab.machine)
    for tag in events:
        assert fs.write("kprobe_events", f"p:g/{tag} {FUNCS[tag]}", append=True) == 0
    return lab, fs


def _sequence(fs) -> list[str]:
    """The trace as event tags, `stack` for a `<stack trace>` record."""
    out = []
    for ln in fs.read("trace").splitlines():
        if ln.startswith("#") or ln.startswith(" => "):
            continue
        what = ln.split(": ", 1)[1]
        out.append("stack" if what == "<stack trace>" else what.split(":")[0])
    return out


def _calls(arch: str) -> list[str]:
    lab, fs = _lab(arch, "".join(FUNCS))
    fs.write("events/enable", "1")
    assert lab.run().exit_code == 0
    return _sequence(fs)


def test_traceoff_traceon_windows_and_stacktraces(arch):
    calls = _calls(arch)
    lab, fs = _lab(arch, "or")
    fs.write("events/enable", "1")
    assert fs.write("set_ftrace_filter",
                    "vfs_statx:traceoff:1 ksys_lseek:traceon filp_close:stacktrace:3") == 0
    assert lab.run().exit_code == 0
    want, on, offs, stacks = [], True, 1, 3
    for tag in calls:
        if tag in "or" and on:
            want.append(tag)
        elif tag == "s" and on and offs:
            on, offs = False, offs - 1
        elif tag == "l":
            on = True
        elif tag == "c" and on and stacks:
            stacks -= 1
            want.append("stack")
    got = _sequence(fs)
    assert got == want and got.count("stack") == 3 and len(got) < calls.count("o") + calls.count("r") + 3
    # a call made while tracing was off used no count: the first filp_close calls came then
    s_at = calls.index("s")
    assert "c" in calls[s_at:calls.index("l", s_at)]
    assert fs.read("set_ftrace_filter") == ("vfs_statx:traceoff:count=0\n"
                                            "ksys_lseek:traceon:unlimited\n"
                                            "filp_close:stacktrace:count=0\n")
    lines = fs.read("trace").splitlines()
    first = lines.index(next(ln for ln in lines if ln.endswith(": <stack trace>")))
    assert lines[first + 1:first + 3] == [" => filp_close", " => close_fd"]


def test_enable_event_and_disable_event_flip_a_soft_disabled_event(arch):
    calls = _calls(arch)
    lab, fs = _lab(arch, "ow")
    fs.write("events/g/o/enable", "1")
    assert fs.write("set_ftrace_filter",
                    "ksys_lseek:enable_event:g:w:2 vfs_statx:disable_event:g:w") == 0
    assert fs.read("events/g/w/enable") == "0*\n"        # soft mode: registered, off
    assert lab.run().exit_code == 0
    want, w_on, left = [], False, 2
    for tag in calls:
        if tag == "o" or (tag == "w" and w_on):
            want.append(tag)
        elif tag == "l" and not w_on and left:
            w_on, left = True, left - 1
        elif tag == "s":
            w_on = False
    assert _sequence(fs) == want and "w" in want and want.count("w") < calls.count("w")
    assert fs.read("set_ftrace_filter") == ("ksys_lseek:enable_event:g:w:count=0\n"
                                            "vfs_statx:disable_event:g:w:unlimited\n")
    # removed, the event leaves soft mode
    assert fs.write("set_ftrace_filter", "!ksys_lseek:enable_event:g:w") == 0
    assert fs.write("set_ftrace_filter", "!vfs_statx:disable_event") == 0
    assert fs.read("set_ftrace_filter") == "" and fs.read("events/g/w/enable") == "0\n"


def test_snapshot_on_a_function_call(arch):
    """vfs_statx:snapshot:1: the buffer as it was at the first vfs_statx call is the
    snapshot; the live buffer holds what came after."""
    calls = _calls(arch)
    lab, fs = _lab(arch, "or")
    fs.write("events/enable", "1")
    assert fs.write("set_ftrace_filter", "vfs_statx:snapshot:1") == 0
    assert lab.run().exit_code == 0
    s_at = calls.index("s")
    before = [t for t in calls[:s_at] if t in "or"]
    after = [t for t in calls[s_at:] if t in "or"]
    tags = [ln.split(": ", 1)[1].split(":")[0] for ln in fs.read("snapshot").splitlines()
            if not ln.startswith("#")]
    assert tags == before and _sequence(fs) == after
    assert fs.read("set_ftrace_filter") == "vfs_statx:snapshot:count=0\n"


def test_set_ftrace_filter_commands_refused(arch):
    lab, fs = _lab(arch, "o")
    for bad in ("no_such_function:traceoff", "vfs_read:no_such_command",
                "vfs_read:traceoff:x", "vfs_read:enable_event:g:nope",
                "!vfs_read:traceoff", ":traceon"):
        assert fs.write("set_ftrace_filter", bad) == -errno.EINVAL, bad
    assert fs.read("set_ftrace_filter") == ""
    assert fs.write("set_ftrace_filter", "vfs_*:traceoff:5") == 0
    listed = fs.read("set_ftrace_filter").splitlines()        # one line per function
    assert sorted(listed) == [f"vfs_{f}:traceoff:count=5" for f in ("open", "read", "statx",
                                                                    "write")]
