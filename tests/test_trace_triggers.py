"""Event triggers (kernel/trace/trace_events_trigger.c, trace_events_hist.c) on kprobe and
kretprobe events, both arches: the trigger file's syntax and errors, traceon/traceoff
windows, snapshot, stacktrace lines, soft mode (a soft-disabled event enabled by another
event's trigger, sm_ref/tm_ref in the enable files), counts and filters, hist files in the
kernel's layout; and `--trigger` with a hist on a compiled program whose histogram is
computed from its source."""
from __future__ import annotations

import errno
import io
from collections import Counter
from pathlib import Path

import pytest

from emu.cli import main as emu_main
from emu.loader import GuestConfig, load_guest
from probes.trace.trace_events_trigger import AVAILABLE
from probes.trace.tracefs import tracefs_of

from conftest import ARCHES, firmware_elf

DATA = Path(__file__).parent / "data" / "trace"
# do_sys_open's flags ($arg3) over the demo firmware's 16 opens
DEMO_FLAGS = {0: 10, 1: 2, 66: 1, 193: 1, 65536: 1, 65600: 1}
OPEN = "p:g/open do_sys_open fl=$arg3:u32"
READ = "p:g/rd vfs_read n=$arg3:u64"


def setup(arch: str, *cmds: str):
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=io.BytesIO())
    fs = tracefs_of(g.machine)
    for c in cmds:
        assert fs.write("kprobe_events", c, append=True) == 0, fs.read("error_log")
    return g.machine, fs


def names(fs, text: str | None = None) -> list[str]:
    text = fs.read("trace") if text is None else text
    return [ln.split(": ", 2)[1] for ln in text.splitlines()
            if not ln.startswith("#") and ": " in ln and not ln.startswith(" =>")]


def plain_sequence(arch: str) -> list[str]:
    m, fs = setup(arch, OPEN, READ)
    fs.write("events/enable", "1")
    m.run(timeout=60)
    return names(fs)


@pytest.mark.parametrize("arch", ARCHES)
def test_trigger_file_syntax_and_errors(arch):
    m, fs = setup(arch, OPEN, READ)
    path = "events/g/open/trigger"
    assert fs.read(path) == AVAILABLE
    assert fs.write(path, "traceoff:3 if fl == 0", append=True) == 0
    assert fs.write(path, "stacktrace", append=True) == 0
    assert fs.write(path, "enable_event:g:rd:2", append=True) == 0
    assert fs.read(path) == ("enable_event:g:rd:count=2\nstacktrace:unlimited\n"
                             "traceoff:count=3 if fl == 0\n")                  # newest first
    for bad, err in (("traceon", errno.EEXIST),             # traceon and traceoff: one type
                     ("enable_event:g:rd", errno.EEXIST), ("nosuch", errno.EINVAL),
                     ("snapshot:abc", errno.EINVAL), ("snapshot if", errno.EINVAL),
                     ("snapshot when fl == 0", errno.EINVAL), ("enable_event", errno.EINVAL),
                     ("enable_event:g", errno.EINVAL), ("enable_event:g:nosuch", errno.EINVAL)):
        assert fs.write(path, bad, append=True) == -err, bad
    assert fs.write(path, "snapshot if nosuch == 1", append=True) == -errno.EINVAL
    assert "event filter parse error" in fs.read("error_log")
    assert fs.write(path, "!stacktrace", append=True) == 0
    assert fs.write(path, "!traceon", append=True) == 0        # removes traceoff (same type)
    assert fs.read(path) == "enable_event:g:rd:count=2\n"
    assert fs.write(path, "snapshot") == 0                     # O_TRUNC: the others go first
    assert fs.read(path) == "snapshot:unlimited\n"


@pytest.mark.parametrize("arch", ARCHES)
def test_soft_mode_refs_in_the_enable_files(arch):
    """A trigger puts its own event in trigger mode and soft mode (registered, soft-disabled
    when it was off), and the enable_event target in soft mode: `0*`. Removing the trigger
    drops both refs."""
    m, fs = setup(arch, OPEN, READ)
    fs.write("events/g/open/enable", "1")
    assert fs.write("events/g/open/trigger", "enable_event:g:rd", append=True) == 0
    assert fs.read("events/g/open/enable") == "1*\n" and fs.read("events/g/rd/enable") == "0*\n"
    rd = fs.events["g/rd"]
    assert (rd.sm_ref, rd.soft_disabled, rd.enabled) == (1, True, True)
    assert fs.write("events/g/rd/enable", "1") == 0            # enabled by hand: not soft-disabled
    assert fs.read("events/g/rd/enable") == "1*\n"
    assert fs.write("events/g/rd/enable", "0") == 0            # in soft mode: soft-disabled again
    assert fs.read("events/g/rd/enable") == "0*\n" and rd.enabled
    assert fs.write("events/g/open/trigger", "!enable_event:g:rd", append=True) == 0
    assert fs.read("events/g/rd/enable") == "0\n" and not rd.enabled and rd.sm_ref == 0
    assert fs.read("events/g/open/enable") == "1\n"


@pytest.mark.parametrize("arch", ARCHES)
def test_soft_disabled_event_enabled_by_another_events_trigger(arch):
    """rd stays soft-disabled (its probe armed, nothing recorded) until the first open with
    flags 0x10000 enables it (`enable_event:g:rd:1 if fl == 65536`); from then on every rd records."""
    m, fs = setup(arch, OPEN, READ)
    fs.write("events/enable", "1")
    m.run(timeout=60)
    plain = [(n, ln.rsplit("fl=", 1)[1] if n == "open" else None)
             for n, ln in zip(names(fs), [ln for ln in fs.read("trace").splitlines()
                                          if not ln.startswith("#")])]
    m, fs = setup(arch, OPEN, READ)
    fs.write("events/g/open/enable", "1")
    assert fs.write("events/g/open/trigger", "enable_event:g:rd:1 if fl == 65536", append=True) == 0
    assert fs.read("events/g/rd/enable") == "0*\n"
    m.run(timeout=60)
    on = [i for i, (n, fl) in enumerate(plain) if n == "open" and fl == "65536"][0]
    want = [n for i, (n, _fl) in enumerate(plain) if n == "open" or i > on]
    assert names(fs) == want and "rd" in want
    assert fs.read("events/g/rd/enable") == "1*\n"
    assert fs.read("events/g/open/trigger") == "enable_event:g:rd:count=0 if fl == 65536\n"


def _opens_with(arch: str, flags: int) -> list[int]:
    """Indexes (among the opens) of the opens with these flags."""
    m, fs = setup(arch, OPEN)
    fs.write("events/enable", "1")
    m.run(timeout=60)
    fl = [int(ln.rsplit("fl=", 1)[1]) for ln in fs.read("trace").splitlines() if "fl=" in ln]
    assert Counter(fl) == DEMO_FLAGS
    return [i for i, f in enumerate(fl) if f == flags]


@pytest.mark.parametrize("arch", ARCHES)
def test_traceoff_and_traceon_windows(arch):
    """traceoff:1 on open is a post trigger (the open is recorded, then tracing stops);
    traceon on rd runs before rd's record (rd is recorded). Counts drop only when the
    state changes."""
    plain = plain_sequence(arch)
    m, fs = setup(arch, OPEN, READ)
    fs.write("events/enable", "1")
    assert fs.write("events/g/open/trigger", "traceoff:1", append=True) == 0
    assert fs.write("events/g/rd/trigger", "traceon:2", append=True) == 0
    m.run(timeout=60)
    want, on, offs, ons = [], True, 1, 2
    for n in plain:                    # the kernel's rules over the untriggered sequence
        if n == "rd" and not on and ons:
            on, ons = True, ons - 1
        if on:
            want.append(n)
        if n == "open" and on and offs:
            on, offs = False, offs - 1
    assert names(fs) == want
    assert fs.read("events/g/open/trigger") == "traceoff:count=0\n"
    assert fs.read("events/g/rd/trigger") == f"traceon:count={ons}\n"


@pytest.mark.parametrize("arch", ARCHES)
def test_snapshot_swaps_the_buffers(arch):
    """snapshot:1 on rd runs before rd's record: the snapshot holds everything before the
    first rd, the live buffer rd and what follows."""
    plain = plain_sequence(arch)
    m, fs = setup(arch, OPEN, READ)
    fs.write("events/enable", "1")
    assert fs.read("snapshot").splitlines()[3] == "# * Snapshot is freed *"
    assert fs.write("events/g/rd/trigger", "snapshot:1", append=True) == 0
    m.run(timeout=60)
    first_rd = plain.index("rd")
    assert names(fs, fs.read("snapshot")) == plain[:first_rd]
    assert names(fs) == plain[first_rd:]
    assert fs.write("snapshot", "2") == 0 and names(fs, fs.read("snapshot")) == []
    assert fs.write("snapshot", "0") == 0 and "Snapshot is freed" in fs.read("snapshot")


@pytest.mark.parametrize("arch", ARCHES)
def test_stacktrace_lines(arch):
    """stacktrace:2 if fl == 0 (a post trigger): a `<stack trace>` record right after the
    first two opens with flags 0, frames from the probed function outwards."""
    m, fs = setup(arch, OPEN)
    fs.write("events/enable", "1")
    assert fs.write("events/g/open/trigger", "stacktrace:2 if fl == 0", append=True) == 0
    m.run(timeout=60)
    lines = [ln for ln in fs.read("trace").splitlines() if not ln.startswith("#")]
    heads = [i for i, ln in enumerate(lines) if ln.endswith(": <stack trace>")]
    assert len(heads) == 2
    for i in heads:
        assert lines[i - 1].endswith(" fl=0")
        frames = []
        for ln in lines[i + 1:]:
            if not ln.startswith(" => "):
                break
            frames.append(ln[4:])
        assert frames[:2] == ["do_sys_open", "sys_open"], frames
    assert fs.read("events/g/open/trigger") == "stacktrace:count=0 if fl == 0\n"


@pytest.mark.parametrize("arch", ARCHES)
def test_hist_on_a_kprobe_argument(arch):
    m, fs = setup(arch, OPEN)
    path = "events/g/open/trigger"
    assert fs.write(path, "hist:keys=fl", append=True) == 0
    assert fs.write(path, "hist:keys=fl.hex:vals=hitcount,fl:sort=fl.descending:size=100",
                    append=True) == 0
    assert fs.write(path, "hist:keys=fl.log2,common_pid.execname", append=True) == 0
    assert fs.read("events/g/open/enable") == "0*\n"           # soft mode: nothing recorded
    m.run(timeout=60)
    assert names(fs) == []
    log2 = Counter(0 if f <= 1 else (f - 1).bit_length() for f, n in DEMO_FLAGS.items()
                   for _ in range(n))
    want = [_hist("fl.log2,common_pid.execname", "hitcount", "hitcount", 2048, [
        (f"{{ fl: ~ 2^{k:<2}, common_pid: demo.elf        [      1000] }}", n)
        for k, n in sorted(log2.items(), key=lambda kv: (kv[1], kv[0]))]),
        _hist("fl.hex", "hitcount,fl", "fl.descending", 128, [   # the val fl: vals match first
            (f"{{ fl: {f:x} }} hitcount: {n:>10}  fl: {f * n:>10}", None)
            for f, n in sorted(DEMO_FLAGS.items(), reverse=True)]),
        _hist("fl", "hitcount", "hitcount", 2048, [
            (f"{{ fl: {f:>10} }}", n)
            for f, n in sorted(DEMO_FLAGS.items(), key=lambda kv: (kv[1], kv[0]))])]
    assert fs.read("events/g/open/hist") == "\n\n".join(want)      # newest first


def _hist(keys: str, vals: str, sort: str, size: int, rows, state: str = "active") -> str:
    lines = [text if n is None else f"{text} hitcount: {n:>10}" for text, n in rows]
    total = sum(int(r[0].split("hitcount:")[1].split()[0]) if r[1] is None else r[1] for r in rows)
    return (f"# event histogram\n#\n# trigger info: hist:keys={keys}:vals={vals}:sort={sort}:"
            f"size={size} [{state}]\n#\n\n" + "".join(ln + "\n" for ln in lines)
            + f"\nTotals:\n    Hits: {total}\n    Entries: {len(rows)}\n    Dropped: 0\n")


@pytest.mark.parametrize("arch", ARCHES)
def test_hist_buckets_pause_clear_size_and_drops(arch):
    m, fs = setup(arch, OPEN)
    path = "events/g/open/trigger"
    assert fs.write(path, "hist:keys=fl.buckets=100:size=128", append=True) == 0
    assert fs.write(path, "hist:keys=fl.buckets=100:size=128:pause", append=True) == 0
    assert fs.read("events/g/open/hist").split("\n")[2].endswith("[paused]")
    assert fs.write(path, "hist:keys=fl.buckets=100:size=128:cont", append=True) == 0
    assert fs.write(path, "hist:keys=fl.buckets=100:size=128", append=True) == -errno.EEXIST
    assert fs.write(path, "hist:keys=fl:clear", append=True) == -errno.ENOENT
    m.run(timeout=60)
    want = Counter()
    for f, n in DEMO_FLAGS.items():
        want[f // 100 * 100] += n
    text = fs.read("events/g/open/hist")
    for b, n in want.items():
        assert f"{{ fl: ~ {b}-{b + 99} }} hitcount: {n:>10}\n" in text
    assert fs.write(path, "hist:keys=fl.buckets=100:size=128:clear", append=True) == 0
    assert "Hits: 0\n    Entries: 0\n" in fs.read("events/g/open/hist")
    assert fs.write(path, "!hist:keys=fl.buckets=100:size=128", append=True) == 0
    assert fs.read("events/g/open/hist") == "" and fs.read(path) == AVAILABLE


HIST_ERRORS = [
    ("hist:keys=nosuch", "Couldn't find field", "nosuch"),
    ("hist:keys=fl.bogus", "Invalid field modifier", "bogus"),
    ("hist:keys=fl:sort=nosuch", "Sort field must be a key or a val", "nosuch"),
    ("hist:keys=fl:sort=fl.up", "Invalid sort modifier", "up"),
    ("hist:keys=fl:sort=fl,hitcount,fl", "Too many sort fields (Max = 2)", None),
    ("hist:keys=fl:cont", "Can't clear or continue a nonexistent hist trigger", None),
]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("cmd, message, at", HIST_ERRORS, ids=[e[1][:24] for e in HIST_ERRORS])
def test_hist_errors_in_error_log(arch, cmd, message, at):
    m, fs = setup(arch, OPEN)
    assert fs.write("events/g/open/trigger", cmd, append=True) < 0
    log = fs.read("error_log").splitlines()
    assert log[0].endswith(f"] hist:g:open: error: {message}")
    assert log[1] == f"  Command: {cmd}"
    assert log[2] == " " * (11 + (cmd.index(at) if at else 0)) + "^"


@pytest.fixture(scope="session")
def buckets_elf(c_prog):
    return lambda arch: c_prog(arch, DATA / "buckets.c")


@pytest.mark.parametrize("arch", ARCHES)
def test_cli_hist_equals_the_counts_from_the_source(arch, buckets_elf, monkeypatch):
    exe = buckets_elf(arch)
    monkeypatch.chdir(exe.parent)
    counts = Counter((i * i + 1) % 7 for i in range(100))        # argc == 1
    out, err = io.StringIO(), io.StringIO()
    rc = emu_main(["trace", exe.name, "--event", "p:grp/ev bump a=$arg1:s64 b=$arg2:s64",
                   "--trigger", "grp/ev", "hist:keys=b"], stdout=out, stderr=err)
    sink = sum(i * ((i * i + 1) % 7) for i in range(100))
    assert rc == sink & 0x7F, err.getvalue()
    text = out.getvalue()
    hist = text[text.index("# event histogram"):]
    assert hist == _hist("b", "hitcount", "hitcount", 2048, [
        (f"{{ b: {b:>10} }}", n) for b, n in sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))])
    assert text.count(": ev: (bump+0x0/") == 100
    again = io.StringIO()
    emu_main(["trace", exe.name, "--event", "p:grp/ev bump a=$arg1:s64 b=$arg2:s64",
              "--trigger", "grp/ev", "hist:keys=b"], stdout=again, stderr=io.StringIO())
    assert again.getvalue() == text


@pytest.mark.parametrize("arch", ARCHES)
def test_cli_trigger_refusals(arch):
    out, err = io.StringIO(), io.StringIO()
    rc = emu_main(["trace", str(firmware_elf(arch, "demo")), "--event", OPEN,
                   "--trigger", "g/open", "hist:keys=nosuch"], stdout=out, stderr=err)
    assert rc == 2
    assert err.getvalue().splitlines()[:2] == ["emu: hist:g:open: error: Couldn't find field",
                                               "  Command: hist:keys=nosuch"]
    err = io.StringIO()
    assert emu_main(["trace", str(firmware_elf(arch, "demo")), "--event", OPEN,
                     "--trigger", "g/nosuch", "traceon"], stdout=out, stderr=err) == 2
    assert "--trigger: no event 'g/nosuch'" in err.getvalue()


@pytest.mark.parametrize("arch", ARCHES)
def test_triggers_on_a_kretprobe_event(arch):
    """A hist of $retval on a kretprobe event equals the values its own trace shows; a
    traceoff on it stops the trace after the first return with a negative value."""
    m, fs = setup(arch, "r:g/openr do_sys_open ret=$retval:s32")
    fs.write("events/enable", "1")
    m.run(timeout=60)
    rets = [int(ln.rsplit("ret=", 1)[1]) for ln in fs.read("trace").splitlines() if "ret=" in ln]
    assert len(rets) == 16
    m, fs = setup(arch, "r:g/openr do_sys_open ret=$retval:s32")
    fs.write("events/enable", "1")
    assert fs.write("events/g/openr/trigger", "hist:keys=ret:sort=ret", append=True) == 0
    assert fs.write("events/g/openr/trigger", "traceoff:1 if ret < 0", append=True) == 0
    m.run(timeout=60)
    counts = Counter(r & (2**64 - 1) for r in rets)               # keys print as u64
    rows = sorted(counts.items(), key=lambda kv: kv[0] - 2**64 if kv[0] >> 63 else kv[0])
    assert fs.read("events/g/openr/hist") == _hist("ret", "hitcount", "ret", 2048, [
        (f"{{ ret: {k:>10} }}", n) for k, n in rows])
    got = [int(ln.rsplit("ret=", 1)[1]) for ln in fs.read("trace").splitlines() if "ret=" in ln]
    cut = next((i for i, r in enumerate(rets) if r < 0), len(rets) - 1)
    assert got == rets[:cut + 1]


@pytest.mark.parametrize("arch", ARCHES)
def test_emu_run_trigger_writes_hist_to_trace_out(arch, tmp_path):
    out_file = tmp_path / "trace.txt"
    rc = emu_main(["run", "--event", OPEN, "--trigger", "g/open", "hist:keys=fl:sort=fl",
                   "--trace-out", str(out_file), str(firmware_elf(arch, "demo"))],
                  stdout=io.StringIO(), stderr=io.StringIO())
    assert rc == 0
    text = out_file.read_text()
    assert text.count(": open: (do_sys_open+0x0/") == 16
    assert text[text.index("# event histogram"):] == _hist("fl", "hitcount", "fl", 2048, [
        (f"{{ fl: {f:>10} }}", n) for f, n in sorted(DEMO_FLAGS.items())])
