"""The ftrace caller in C (probes/native, issue 14) against the Python one: kprobes on
ftrace sites with no Python handler are counted by C (`kn_ftrace_hook`), with the same hits,
misses, guest output, cycles and breakdown as the Python path on both arches; a site that
has another ops (the function tracer) or a probe that gains a handler goes back to Python."""
from __future__ import annotations

import io

import pytest

from conftest import firmware_elf, needs_native
from probes.ftrace import FunctionTracer
from probes.kprobes import Kprobe
from probes.testing import ProbeLab


FUNCS = ("fib", "factorial", "ackermann", "is_even", "is_odd", "sum_rec")


def _run(arch: str, native: bool, monkeypatch, funcs=FUNCS,
         tracer: list[str] | None = None) -> dict:
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    lab = ProbeLab.load(str(firmware_elf(arch, "recurse.ftrace")))
    lab.machine.enable_cycle_model()
    probes = []
    for f in funcs:
        p = Kprobe(symbol_name=f)
        lab.kprobes.register_kprobe(p)
        assert p.ainsn.ftrace
        probes.append(p)
    trace = io.StringIO()
    if tracer:
        FunctionTracer(lab.machine, tracer, trace)
    res = lab.run(timeout=120)
    lab.kprobes.probes()                                  # folds C's counters
    d = lab.kprobes.native
    out = {"exit": res.exit_code, "stdout": lab.stdout, "cycles": lab.machine.clock.cycles,
           "breakdown": lab.machine.clock.breakdown(), "trace_lines": len(trace.getvalue().splitlines()),
           "probes": [(p.symbol_name, p.hits, p.nmissed) for p in probes]}
    assert (d is not None) == native
    if native:
        out["c_handled"] = sum(rec.handled for rec, _p in d.ftrace.values())
    return out


def _compare(arch, monkeypatch, **kw) -> dict:
    native = _run(arch, True, monkeypatch, **kw)
    python = _run(arch, False, monkeypatch, **kw)
    c_handled = native.pop("c_handled")
    assert native == python
    native["c_handled"] = c_handled
    return native


@needs_native
def test_ftrace_probes_counted_in_c(arch, monkeypatch):
    r = _compare(arch, monkeypatch)
    hits = sum(h for _f, h, _n in r["probes"])
    assert r["exit"] == 0 and hits == 2435 and r["c_handled"] == hits


@needs_native
def test_site_shared_with_the_function_tracer(arch, monkeypatch):
    """fib's site also runs the function tracer: C's caller runs both ops' funcs, in order,
    through the ops entry (FS_OPS); the other sites are counted in C."""
    r = _compare(arch, monkeypatch, tracer=["fib"])
    hits = dict((f, h) for f, h, _n in r["probes"])
    assert r["trace_lines"] >= hits["fib"] == 2155
    assert r["c_handled"] == sum(hits.values())


@needs_native
def test_function_tracer_alone_runs_from_c(arch, monkeypatch):
    """Sites whose only ops is the function tracer: C's caller calls its func on every hit
    (the sites are handed to C when the tracer registers); the trace is Python's."""
    def run(native: bool) -> tuple[str, int, int]:
        monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
        lab = ProbeLab.load(str(firmware_elf(arch, "recurse.ftrace")))
        lab.machine.enable_cycle_model()
        out = io.StringIO()
        FunctionTracer(lab.machine, ["fib", "is_*"], out)
        assert lab.run(timeout=120).exit_code == 0
        d = lab.kprobes.native
        handled = sum(rec.handled for rec, _p in d.ftrace.values()) if d is not None else 0
        return out.getvalue(), lab.machine.clock.cycles, handled
    (c_trace, c_cycles, handled), (py_trace, py_cycles, _) = run(True), run(False)
    assert c_trace == py_trace and c_cycles == py_cycles
    lines = len(c_trace.splitlines())
    assert lines > 2000 and handled == lines


@needs_native
def test_a_handler_given_later_runs_on_every_hit(monkeypatch):
    """A pre handler set on a served probe after registration: C's caller now calls it
    (FS_PRE) on every hit; with a post handler too it runs the kprobes' ops (FS_OPS)."""
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1")
    lab = ProbeLab.load(str(firmware_elf("x86_64", "recurse.ftrace")))
    p = Kprobe(symbol_name="factorial")
    lab.kprobes.register_kprobe(p)
    seen: list[int] = []
    p.pre_handler = lambda kp, regs: seen.append(regs.ip) or 0
    assert lab.run(timeout=60).exit_code == 0
    lab.kprobes.probes()
    assert p.hits == len(seen) == 39
    assert sum(rec.handled for rec, _p in lab.kprobes.native.ftrace.values()) == 39
    p.post_handler = lambda kp, regs, flags: None
    assert lab.call("factorial", 4) == 24
    lab.kprobes.probes()
    assert p.hits == len(seen) == 43            # the kprobes' ops func runs, from C's caller
    assert sum(rec.handled for rec, _p in lab.kprobes.native.ftrace.values()) == 43
