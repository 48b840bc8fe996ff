"""The one clock: it moves with guest work without the cycle model (issue 10), saturates
instead of wrapping (issue 11), and the run's deadline and limit stop for blocking syscalls."""
from __future__ import annotations

import io
import types

import pytest

from conftest import LINUX_EXIT, run_emu
from emu.clock import FP_MAX, FP_SHIFT, Clock
from emu.cycles import native
from emu.cycles.work import BYTES_PER_CYCLE
from emu.loader import GuestConfig, load_guest
from emu.machine import StopReason
from test_cpu_state import cpu_prog  # noqa: F401  (fixture)

needs_native = pytest.mark.skipif(native.load() is None, reason="no C compiler for the native counter")


def load(path, *argv):
    out = io.BytesIO()
    guest = load_guest(GuestConfig(path=str(path), argv=list(argv)), io.BytesIO(), out, io.BytesIO())
    return guest.machine, out


def _work_times(out: str) -> tuple[int, int]:
    lines = dict(line.split(": ") for line in out.splitlines() if line.startswith("work"))
    return int(lines["work n"]), int(lines["work 2n"])


@needs_native
def test_guest_time_moves_with_guest_work(arch, cpu_prog):
    """CLOCK_MONOTONIC around a loop of n and 2n iterations: about twice the time for twice
    the work (before: both read the same 500 ns of syscall cost), and the same in two runs."""
    prog = cpu_prog(arch, "worktime")
    first = run_emu("run", str(prog), "--", "100000")
    assert first.rc == 0, first.err
    t1, t2 = _work_times(first.out)
    assert t1 > 100_000 and 1.9 < t2 / t1 < 2.1, (t1, t2)
    assert run_emu("run", str(prog), "--", "100000").out == first.out


@needs_native
def test_work_clock_rule(arch, make_tiny):
    """One cycle per BYTES_PER_CYCLE bytes of executed code (arm64: per instruction)."""
    loop = {"arm64": "movz x0, #1000; l: subs x0, x0, #1; b.ne l; " + LINUX_EXIT["arm64"].format(code=0),
            "x86_64": "mov ecx, 1000; l: dec ecx; jnz l; " + LINUX_EXIT["x86_64"].format(code=0)}[arch]
    m, _ = load(make_tiny(arch, [("_start", loop)]))
    assert "work-clock" not in m.layers       # nothing has read the time yet: no hook
    m.clock.now()
    assert "work-clock" in m.layers
    assert m.run().reason is StopReason.EXIT
    loop_bytes = {"arm64": 8, "x86_64": 4}[arch]       # subs+b.ne / dec ecx (2) + jnz (2)
    code = m.clock.counts()["code_bytes"]
    assert 1000 * loop_bytes <= code < 1000 * loop_bytes + 64
    assert m.clock.counts()["code_fp"] == code * (1 << FP_SHIFT) // BYTES_PER_CYCLE
    # the syscall costs come on top of the code
    assert m.clock.cycles == code // BYTES_PER_CYCLE + m.clock.by_reason["syscall"]


@needs_native
def test_work_clock_starts_at_the_first_read(arch, make_tiny):
    """A guest that never reads the time runs with no block hook at all; the first read
    (here rdtsc / cntvct_el0 inside the run) starts the count for the code after it."""
    read = {"arm64": "mrs x1, cntvct_el0", "x86_64": "rdtsc"}[arch]
    loop = {"arm64": "movz x0, #1000; l: subs x0, x0, #1; b.ne l; ",
            "x86_64": "mov ecx, 1000; l: dec ecx; jnz l; "}[arch]
    quiet, _ = load(make_tiny(arch, [("_start", loop + LINUX_EXIT[arch].format(code=0))]))
    assert quiet.run().reason is StopReason.EXIT and "work-clock" not in quiet.layers
    reader, _ = load(make_tiny(arch, [("_start", read + "; " + loop + LINUX_EXIT[arch].format(code=0))],
                               name="reader"))
    assert reader.run().reason is StopReason.EXIT and "work-clock" in reader.layers
    loop_bytes = {"arm64": 8, "x86_64": 4}[arch]
    assert 1000 * loop_bytes <= reader.clock.counts()["code_bytes"] < 1000 * loop_bytes + 64


@needs_native
def test_cycle_model_takes_over_the_clock(arch, make_tiny):
    from emu.cycles import enable_cycle_model
    src = "nop; " + LINUX_EXIT[arch].format(code=0)
    m, _ = load(make_tiny(arch, [("_start", "nop"), ("f", src)]))
    m.clock.advance(12345)
    model = enable_cycle_model(m)
    assert "work-clock" not in m.layers and m.clock.cycles == 12345
    assert m.run().reason is StopReason.EXIT
    assert model.instructions > 0 and m.clock.cycles > 12345


@needs_native
@pytest.mark.slow
def test_sleep_past_the_end_saturates(arch, cpu_prog):
    """nanosleep(LONG_MAX) twice: time jumps forward, then stays (never wraps back); before,
    the second clock_gettime was a traceback."""
    prog = cpu_prog(arch, "worktime")
    r = run_emu("run", str(prog), "--", "1000", "sleep")
    assert r.rc == 0 and "after sleep: forward=1 still=1" in r.out, r.err
    limited = run_emu("run", "--max-cycles", "50000000", str(prog), "--", "1000", "sleep")
    assert limited.rc == 124 and "cycle limit of 50000000" in limited.err, limited.err


@pytest.mark.parametrize("native_acc", [False, True])
def test_clock_saturates(native_acc):
    c = Clock()
    if native_acc:
        if native.load() is None:
            pytest.skip("no C compiler")
        c.acc = native.CmState()
    c.advance(10)
    mono = c.monotonic_ns()
    c.advance(1 << 80, "sleep")
    assert c.saturated and c.cycles == FP_MAX >> FP_SHIFT
    top = c.monotonic_ns()
    assert top > mono
    c.advance2(5, "detour", 7, "handler")
    c.pending = lambda: 1 << 20               # a partly run block no longer moves time back
    assert c.cycles == FP_MAX >> FP_SHIFT and c.monotonic_ns() == top
    assert c.read_cycles() == FP_MAX >> FP_SHIFT
    c.cycles = 1 << 70
    assert c.acc.fp == FP_MAX


# --- the deadline and a limit from a syscall handler ----------------------------------------
def test_deadline_and_stop_limit(arch, make_tiny, monkeypatch):
    src = "nop; " + LINUX_EXIT[arch].format(code=3)
    m, _ = load(make_tiny(arch, [("_start", src)]))
    assert m.deadline is None
    seen = []

    def handler():
        seen.append(m.deadline)
        assert not m.past_deadline()
        m.stop_limit("wall-clock limit reached in a blocking read")

    m.syscall_handler = handler
    # The machine's host clock held still: the deadline is exactly start + timeout.
    import emu.machine
    monkeypatch.setattr(emu.machine, "time", types.SimpleNamespace(monotonic=lambda: 1000.0))
    result = m.run(timeout=5.0)
    monkeypatch.undo()
    assert (result.reason, result.exit_code) == (StopReason.LIMIT, 124)
    assert result.message == "wall-clock limit reached in a blocking read"
    assert seen == [1005.0]
    m2, _ = load(make_tiny(arch, [("_start", src)], name="again"))
    m2.syscall_handler = lambda: seen.append(m2.deadline) or m2.request_exit(0)
    assert m2.run().reason is StopReason.EXIT and seen[-1] is None


def test_timeout_message_from_machine(arch, make_tiny):
    m, _ = load(make_tiny(arch, [("_start", "nop; " + LINUX_EXIT[arch].format(code=0))]))
    m.syscall_handler = lambda: m.stop_limit(m.timeout_message())
    result = m.run(timeout=2.5)
    assert result.exit_code == 124 and result.message.startswith("wall-clock limit of 2.5 s reached at pc 0x")
