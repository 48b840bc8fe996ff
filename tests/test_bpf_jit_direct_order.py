"""Which programs may run from guest code, decided in bounded time and without changing
the order of their output (findings of session 8's review): a deep bpf-to-bpf call tree
is planned in linear time, and a tracepoint event's programs with output keep the host
path, which writes their output before the event's record."""
from __future__ import annotations

import time

import pytest

from conftest import ARCHES
from test_bpf_jit_stub_tracepoint import TpLab
from probes.bpf import BpfProgType, assemble
from probes.bpf.jit_direct import SEQUENCE_MAX, direct_eligible, helper_sequence, output_order
from probes.bpf.program import BpfProg
from probes.trace.bpf_trace import bpf_trace_of
from probes.trace.trace_tracepoint import TraceTracepointEvents


PRINTK = ["stw [r10-8], 0x0a6968", "stw [r10-4], 0", "mov r1, r10", "add r1, -8", "mov r2, 8"]


def _call_tree(fanout: int, depth: int, leaf: int) -> BpfProg:
    """Function d calls function d+1 ``fanout`` times; the last calls helper ``leaf``:
    fanout ** depth helper calls in a run from about depth * (fanout + 2) instructions."""
    lines = []
    for d in range(depth):
        lines += [f"f{d}:"] + [f"call local f{d + 1}"] * fanout + ["mov r0, 0", "exit"]
    lines += [f"f{depth}:", *(PRINTK if leaf == 6 else []), f"call {leaf}", "mov r0, 0", "exit"]
    return BpfProg.from_bytes(assemble("\n".join(lines)), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="tree", license="GPL")


def test_a_wide_call_tree_is_planned_without_walking_every_path() -> None:
    prog = _call_tree(16, 6, 5)          # 16 ** 6 ktime_get_ns calls a run, 111 insns
    prog.ensure_loaded()
    t0 = time.process_time()
    assert direct_eligible(prog) is None
    assert helper_sequence(prog.insns) is None      # past SEQUENCE_MAX: not listed
    assert time.process_time() - t0 < 5             # (was exponential: hours)
    small = _call_tree(2, 3, 5)
    assert [fid for _i, fid in helper_sequence(small.insns)] == [5] * 8
    printing = _call_tree(16, 6, 6)      # trace_printk: its order would need the list
    printing.ensure_loaded()
    assert f"more than {SEQUENCE_MAX} helper calls" in (output_order([printing]) or "")


def _printing_tp_prog() -> BpfProg:
    text = """
        stw [r10-8], 0x0a6968
        stw [r10-4], 0
        mov r1, r10
        add r1, -8
        mov r2, 8
        call 6
        mov r0, 1
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_TRACEPOINT,
                              name="pk", license="GPL")


@pytest.mark.parametrize("arch", ARCHES)
def test_a_tracepoint_programs_lines_come_before_the_record(arch, monkeypatch) -> None:
    orig = TraceTracepointEvents._commit
    got = {}
    for engine in ("python", "jit"):
        out: list[str] = []
        monkeypatch.setattr(TraceTracepointEvents, "_commit",
                            lambda self, call, data, out=out: (out.append("commit"),
                                                               orig(self, call, data))[1])
        lab = TpLab(arch, "tp", _printing_tp_prog(), engine, 3)
        bpf_trace_of(lab.m).printk_sink = lambda _t, out=out: out.append("printk")
        lab.run()
        got[engine] = out
    assert got["jit"] == got["python"] == ["printk", "commit"] * 3
