"""Prog array updates and stubs (findings of session 8's review of the direct path's
tail calls): an array reached only through a target added later is watched too, a stub
refused for a target comes back once the array no longer holds it, and a context pointer
moved by an unknown offset before a tail call keeps the whole frame."""
from __future__ import annotations

import pytest

from conftest import ARCHES
from test_bpf_jit_direct_loops import (
    ADD_R8_TO_CNT1, _u64, chain, kprobe_prog, other_slot_target, stack_target,
)
from test_bpf_jit_kprobe_stub import Lab
from probes.bench_kinds import parm_offset
from probes.bpf import create_map
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.maps import BpfMapType
from probes.trace.bpf_trace import prog_stats

TAIL_CALL_0 = "lddw r2, map_fd(3)\nmov r3, 0\ncall 12\nmov r0, 0\nexit"
LOOP_INTO_CNT1 = """
        mov r8, 0
        mov r7, 0
    again:
        add r8, 1
        add r7, 1
        jlt r7, 5, again""" + ADD_R8_TO_CNT1


def _two_levels(arch: str, engine: str, last: str) -> list:
    """root -> X[0] -> B -> Y[0]; B is put in X after the stub exists, then ``last`` in Y."""
    x = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, name="X")
    y = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, name="Y")
    parts = {"cnt": create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 2, name="cnt")}
    root = kprobe_prog(TAIL_CALL_0, "root", {3: x})
    lab = Lab(arch, root, engine)
    out = [lab.run(3)]
    x.update(0, kprobe_prog(TAIL_CALL_0, "B", {3: y}))
    out.append(lab.run(3))
    y.update(0, other_slot_target(arch, parts) if last == "slot"
             else kprobe_prog(LOOP_INTO_CNT1, "loop", {4: parts["cnt"]}))
    out += [lab.run(5), _u64(parts["cnt"], 1), prog_stats(root).run_cnt]
    return out


@pytest.mark.parametrize("last", ["slot", "loop"])
@pytest.mark.parametrize("arch", ARCHES)
def test_an_array_reached_through_a_later_target_is_watched(arch, last) -> None:
    assert _two_levels(arch, "jit", last) == _two_levels(arch, "python", last)


@pytest.mark.parametrize("arch", ARCHES)
def test_a_stub_refused_for_a_target_comes_back_when_the_array_changes(arch) -> None:
    root, parts = chain(arch)
    parts["jt"].update(1, stack_target(parts))
    lab = Lab(arch, root, "jit")
    lab.run(4)
    dc = direct_calls_of(lab.m)
    assert not lab.stubs and "helper call 67" in dc.refused[lab.p.addr]
    parts["jt"].update(1, parts["target"])
    lab.run(6)
    assert list(lab.stubs) == [lab.p.addr]


@pytest.mark.parametrize("arch", ARCHES)
def test_a_context_moved_before_a_tail_call_keeps_the_whole_frame(arch) -> None:
    po = parm_offset(arch, 1)
    got = {}
    for engine in ("jit", "python", "interp"):
        jt = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, name="jt")
        cnt = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 2, name="cnt")
        jt.update(0, kprobe_prog(f"""
            ldxdw r8, [r1+{po}]
            stw [r10-4], 1
            mov r2, r10
            add r2, -4
            lddw r1, map_fd(4)
            call 1
            jeq r0, 0, +1
            lock add [r0], r8
            mov r0, 1
            exit""", "target", {4: cnt}))
        root = kprobe_prog(f"ldxdw r6, [r1+{po}]\nand r6, 8\nadd r1, r6\n" + TAIL_CALL_0,
                           "root", {3: jt})
        lab = Lab(arch, root, engine)
        got[engine] = [lab.run(3), lab.run(20), _u64(cnt, 1)]
    assert got["jit"] == got["python"] == got["interp"]
