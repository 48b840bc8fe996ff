"""Stub slots are reused (issue 17, jit_direct.py DirectCalls._reclaim): a dropped stub's
slot is filled with breakpoints and retired, and becomes free once no CPU can be inside
it (its pc outside the slot, and not inside a program a stub called), as the kernel frees
kprobe insn slots after synchronize_rcu. Attach/detach loops do not grow guest memory
nor the symbol table."""
from __future__ import annotations

import pytest

from conftest import ARCHES
from test_bpf_jit_kprobe_stub import Lab
from test_bpf_jit_stub_kretprobe import RetLab
from probes.bench_kinds import counting_prog
from probes.bpf.jit_direct import THUNK_SLOT, direct_calls_of
from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog,
                                    perf_event_detach_bpf_prog, prog_stats)


def _loop(lab, event_of, n: int) -> list[tuple[int, int]]:
    """Detach and attach the same program `n` times, a few hits each: guest memory mapped
    and symbols named after each round (a dropped stub's name goes with it)."""
    prog = lab.event.prog
    sizes = []
    event = lab.event
    for _ in range(n):
        perf_event_detach_bpf_prog(event)
        event = event_of(lab)
        assert perf_event_attach_bpf_prog(event, prog) == 0
        lab.run(3)
        sizes.append((lab.m.memory.mapped_bytes, len(lab.m.symbols)))
    return sizes


def _retired(dc) -> list[int]:
    return [slot for slot, _counters, _guard in dc._retired]


@pytest.mark.parametrize("arch", ARCHES)
def test_kprobe_attach_detach_loop_does_not_grow_memory(arch) -> None:
    prog = counting_prog()
    lab = Lab(arch, prog, "jit")
    lab.run(3)
    sizes = _loop(lab, lambda lab: PerfEvent(lab.call, PerfType.PERF_TYPE_KPROBE,
                                             EventKind.KPROBE), 24)   # 3 pages' worth of slots
    assert len(set(sizes)) == 1
    assert list(lab.stubs) == [lab.p.addr]
    assert prog_stats(prog).run_cnt == 3 + 24 * 3


@pytest.mark.parametrize("arch", ARCHES)
def test_kretprobe_attach_detach_loop_does_not_grow_memory(arch) -> None:
    lab = RetLab(arch, counting_prog(), "jit")
    lab.run(3)
    sizes = _loop(lab, lambda lab: PerfEvent(lab.call, PerfType.PERF_TYPE_KPROBE,
                                             EventKind.KPROBE), 24)
    assert len(set(sizes)) == 1
    assert lab.rp.hits == 3 + 24 * 3


@pytest.mark.parametrize("arch", ARCHES)
def test_a_slot_a_cpu_is_in_is_not_reused_until_it_leaves(arch) -> None:
    prog = counting_prog()
    lab = Lab(arch, prog, "jit")
    lab.run(3)
    dc = direct_calls_of(lab.m)
    stub = lab.stubs[lab.p.addr].addr
    lab.m.pc = stub + 8                  # as if the run had stopped inside the stub
    perf_event_detach_bpf_prog(lab.event)
    assert stub in _retired(dc) and stub not in dc._free
    bp = lab.m.arch.breakpoint
    assert lab.m.memory.read(stub, THUNK_SLOT) == bp * (THUNK_SLOT // len(bp))
    lab.m.pc = lab.m.symbols.lookup("hot_call").addr       # the CPU left it
    dc.fold()                            # a run stopped: a quiescent point
    assert stub in dc._free and not _retired(dc)
    # a CPU inside a program (its bpf_prog_active held) may return into any stub
    event = PerfEvent(lab.call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE)
    assert perf_event_attach_bpf_prog(event, prog) == 0
    lab.run(3)
    second = lab.stubs[lab.p.addr].addr
    lab.m.memory.write(dc.active_addr(0), (1).to_bytes(4, "little"))
    perf_event_detach_bpf_prog(event)
    assert second in _retired(dc)
    lab.m.memory.write(dc.active_addr(0), bytes(4))
    dc.fold()
    assert second in dc._free
