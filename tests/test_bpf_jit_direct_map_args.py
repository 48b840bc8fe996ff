"""Map helpers called from guest stubs and thunks with a key or value held elsewhere than
the BPF stack (a value another lookup returned), and maps read from user space right after
the JIT engine comes back: the JIT gives the python engine's results (review of session 8:
the value was read from the map's stale host copy, or faulted in C's hash pages; user
lookups copied stale windows over the python engine's counts)."""
from __future__ import annotations

import pytest

from conftest import ARCHES
from test_bpf_jit_percpu import _counts, _hot_counter, _hot_lab
from probes.bench_kinds import parm_offset
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of, direct_eligible
from probes.bpf.jit_guest import install_engine
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg

SOURCES = ["BPF_MAP_TYPE_ARRAY", "BPF_MAP_TYPE_PERCPU_ARRAY", "BPF_MAP_TYPE_HASH"]


def _copying_prog(arch: str, source: str, target: str) -> BpfProg:
    """v = lookup(counts, PARM1 % 4); *v += 1; update(snap, same key, v): the value
    argument points into the source map (a window, or C's hash value pages)."""
    counts = create_map(BpfMapType[source], 4, 8, 4, name="counts", nr_cpus=1)
    if source == "BPF_MAP_TYPE_HASH":
        for k in range(4):
            counts.update(k, bytes(8))
    snap = create_map(BpfMapType[target], 4, 8, 4, name="snap", nr_cpus=1)
    text = "\n".join([f"ldxdw r6, [r1+{parm_offset(arch, 1)}]", "mod r6, 4", "stxw [r10-4], r6",
                      "mov r2, r10", "add r2, -4", "lddw r1, map_fd(3)", "call 1",
                      "jeq r0, 0, +10", "mov r7, r0", "mov r1, 1", "lock add [r7], r1",
                      "mov r2, r10", "add r2, -4", "mov r3, r7", "mov r4, 0",
                      "lddw r1, map_fd(4)", "call 2", "mov r0, 0", "exit"])
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="copy", license="GPL", maps={3: counts, 4: snap})


def _u64s(mp, keys=range(4)) -> list[int]:
    out = []
    for k in keys:
        v = mp.lookup(k)
        out.append(int.from_bytes(v[0] if isinstance(v, list) else v, "little"))
    return out


@pytest.mark.parametrize("target", ["BPF_MAP_TYPE_PERCPU_ARRAY", "BPF_MAP_TYPE_HASH"])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("optimize", [True, False], ids=["optprobe", "kprobe"])
@pytest.mark.parametrize("arch", ARCHES)
def test_an_update_with_a_value_from_another_map(arch, optimize, source, target) -> None:
    got = {}
    for engine in ("jit", "python"):
        prog = _copying_prog(arch, source, target)
        lab = _hot_lab(arch, prog, engine, optimize)
        lab.call("hot_call", 20)
        got[engine] = (_u64s(prog.maps[3]), _u64s(prog.maps[4]))
        if engine == "jit":
            dc = direct_calls_of(lab.machine)
            assert dc is not None and dc.refused == {} and (dc.stubs or dc.thunks)
    assert got["jit"] == got["python"]
    assert got["python"][1] == [5, 5, 5, 5]


@pytest.mark.parametrize("arch", ARCHES)
def test_a_user_read_right_after_the_jit_comes_back_keeps_the_other_engines_counts(arch) -> None:
    seen = {}
    for first in ("jit", "python"):
        prog = _hot_counter(arch)
        lab = _hot_lab(arch, prog, first, True)
        lab.call("hot_call", 10)
        install_engine(lab.machine, "python")
        lab.call("hot_call", 10)
        install_engine(lab.machine, "jit")
        after_switch = _counts(prog)
        lab.call("hot_call", 10)
        seen[first] = (after_switch, _counts(prog))
    assert seen["jit"] == seen["python"] == ([6, 6, 4, 4], [9, 9, 6, 6])


def test_perf_output_of_ctx_beside_a_map_update_keeps_the_frame_exact() -> None:
    """perf_event_output(ctx, ...) reads none of ctx: a program that also updates a map
    still runs from guest code, with only the slots it reads in the frame."""
    counts = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="h")
    events = create_map(BpfMapType.BPF_MAP_TYPE_PERF_EVENT_ARRAY, 4, 4, 2, name="pe")
    text = """
        mov r6, r1
        stw [r10-4], 0
        stdw [r10-16], 1
        lddw r1, map_fd(3)
        mov r2, r10
        add r2, -4
        mov r3, r10
        add r3, -16
        mov r4, 0
        call 2
        mov r1, r6
        lddw r2, map_fd(4)
        lddw r3, 0xffffffff
        mov r4, r10
        add r4, -16
        mov r5, 8
        call 25
        mov r0, 0
        exit"""
    prog = BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="u", license="GPL", maps={3: counts, 4: events})
    prog.ensure_loaded()
    assert prog.ctx_reads == set() and direct_eligible(prog) is None


def _printing_values_prog() -> BpfProg:
    """trace_printk("%llx") of two values whose high halves name window keys (the context's
    and the BPF stack's): values, not pointers."""
    lines = []
    for value in (0x1_0000_0010, 0x10_0000_0020):
        lines += ["stw [r10-8], 0x786c6c25", "stw [r10-4], 0", "mov r1, r10", "add r1, -8",
                  "mov r2, 5", f"lddw r3, {value:#x}", "call 6"]
    return BpfProg.from_bytes(assemble("\n".join(lines + ["mov r0, 0", "exit"])),
                              prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE, name="pk",
                              license="GPL")


@pytest.mark.parametrize("arch", ARCHES)
def test_printk_values_are_not_taken_for_window_pointers(arch) -> None:
    from test_bpf_jit_kprobe_stub import Lab
    from probes.trace.bpf_trace import bpf_trace_of

    got = {}
    for engine in ("jit", "python"):
        lab = Lab(arch, _printing_values_prog(), engine)
        lab.run(3)                  # the first hit's nested run, then the stub's
        got[engine] = list(bpf_trace_of(lab.m).printk_lines)
    assert got["jit"] == got["python"] == ["100000010", "1000000020"] * 3
