"""Stubs with several CPUs (issue 17): each CPU gets its own copy of a probe's stub, with
its own bpf_prog_active word (DEFINE_PER_CPU, so a hit on CPU 1 does not see CPU 0's
guard), counters and part of the BPF stack; bpf_get_smp_processor_id from a stub names
the CPU that hit; an optprobe's one thunk finds the running CPU's guard through the
this-CPU words. Maps, counts and misses equal the compiled Python engine's, and two runs
give the same modelled cycles. The guest is tests/data/smp/percpu.c: thread i calls work()
300 + 100 i times, threads placed on CPUs round robin."""
from __future__ import annotations

import io
import struct

import pytest

from conftest import ARCHES, ROOT
from emu.loader import GuestConfig, load_guest
from probes.bench_kinds import COUNT_AT_STACK_KEY
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.jit_guest import install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe, kprobes_of
from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, bpf_trace_of,
                                    perf_event_attach_bpf_prog, prog_stats)

SMP = ROOT / "tests" / "data" / "smp"
CALLS = [300, 400, 500]                 # three threads: CPU 1, CPU 0, CPU 1 on two CPUs
PER_CPU = [400, 800]


def by_cpu_prog() -> BpfProg:
    """by_cpu[bpf_get_smp_processor_id()] += 1 (a trampoline helper and an inlined lookup)."""
    by_cpu = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 4, name="by_cpu")
    text = "call 8\nstxw [r10-4], r0" + COUNT_AT_STACK_KEY
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="by_cpu", license="GPL", maps={3: by_cpu})


@pytest.fixture(scope="module")
def percpu(c_prog):
    return lambda arch: c_prog(arch, SMP / "percpu.c", extra=("-pthread",))


class CpuLab:
    def __init__(self, exe, engine: str, prog: BpfProg, cycles: bool = False) -> None:
        self.out = io.BytesIO()
        self.m = load_guest(GuestConfig(path=str(exe), argv=["3"], cpus=2, seed=3),
                            stdout=self.out).machine
        if cycles:
            self.m.enable_cycle_model()
        self.p = Kprobe(symbol_name="work")
        kprobes_of(self.m).register_kprobe(self.p)
        self.call = KprobePerfEvent(self.m, "work", kp=self.p)
        self.p.pre_handler = self.call.kprobe_perf_func
        assert perf_event_attach_bpf_prog(
            PerfEvent(self.call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog) == 0
        install_engine(self.m, engine)

    def run(self) -> bytes:
        assert self.m.run().exit_code == 0
        return self.out.getvalue()


def _counts(prog: BpfProg) -> list[int]:
    return [int.from_bytes(prog.maps[3].lookup(c)[:8], "little") for c in range(2)]


@pytest.mark.parametrize("arch", ARCHES)
def test_each_cpu_runs_its_own_stub(percpu, arch, hit_path) -> None:
    jp, pp = by_cpu_prog(), by_cpu_prog()
    jit, py = CpuLab(percpu(arch), "jit", jp), CpuLab(percpu(arch), "python", pp)
    assert jit.run() == py.run()
    assert _counts(jp) == _counts(pp) == PER_CPU
    dc = direct_calls_of(jit.m)
    assert dc is not None and sorted(k for k in dc.copies) == \
        [("kprobe", jit.p.addr, 0), ("kprobe", jit.p.addr, 1)]
    stubs = {k[2]: t for k, t in dc.copies.items()}
    assert stubs[0].addr != stubs[1].addr
    assert jit.p.hits == py.p.hits == sum(CALLS) and jit.p.nmissed == 0
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == sum(CALLS)
    assert prog_stats(jp).misses == prog_stats(pp).misses == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_a_guard_held_on_cpu0_does_not_stop_cpu1(percpu, arch) -> None:
    jp, pp = by_cpu_prog(), by_cpu_prog()
    jit, py = CpuLab(percpu(arch), "jit", jp), CpuLab(percpu(arch), "python", pp)
    runner = bpf_trace_of(jit.m).runner
    runner.jit                                   # its data page, where the words live
    from probes.bpf.jit_direct import enable_direct_calls
    dc = enable_direct_calls(jit.m, runner)
    jit.m.memory.write(dc.active_addr(0), (1).to_bytes(4, "little"))   # CPU 0's word
    for lab in (jit, py):                        # and the host path's count for CPU 0
        bpf_trace_of(lab.m)._prog_active[0] = 1
    assert jit.run() == py.run()
    assert _counts(jp) == _counts(pp) == [0, PER_CPU[1]]
    assert prog_stats(jp).misses == prog_stats(pp).misses == PER_CPU[0]
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == PER_CPU[1]


def _optimized(lab: CpuLab) -> CpuLab:
    from probes.optprobes import enable_optprobes
    enable_optprobes(kprobes_of(lab.m)).kick_kprobe_optimizer()
    return lab


@pytest.mark.parametrize("arch", ARCHES)
def test_optprobe_thunk_finds_its_cpu(percpu, arch) -> None:
    """Every CPU runs the optprobe's one jump and thunk; the thunk reaches the running
    CPU's bpf_prog_active and stack through the this-CPU words (kept at each CPU switch):
    a guard held on CPU 0 stops CPU 0's hits only, as on the host path."""
    jp, pp = by_cpu_prog(), by_cpu_prog()
    jit, py = _optimized(CpuLab(percpu(arch), "jit", jp)), _optimized(CpuLab(percpu(arch), "python", pp))
    from probes.bpf.jit_direct import enable_direct_calls
    dc = enable_direct_calls(jit.m, bpf_trace_of(jit.m).runner)
    jit.m.memory.write(dc.active_addr(0), (1).to_bytes(4, "little"))
    for lab in (jit, py):
        bpf_trace_of(lab.m)._prog_active[0] = 1
    in_guest = []                                # (hits, misses) the thunk counted

    def before_fold() -> None:
        for t in dc.thunks.values():
            in_guest.append(struct.unpack("<QQ", jit.m.memory.read(t.counters, 16)))
    jit.m.stop_listeners.insert(0, before_fold)
    assert jit.run() == py.run()
    assert list(dc.thunks) == [jit.p.addr]
    hits, misses = map(sum, zip(*in_guest))
    assert hits > PER_CPU[1] // 2 and misses > PER_CPU[0] // 2     # both CPUs in the thunk
    words = dc._this_cpu_words
    assert words is not None
    for cpu in (1, 0):                           # each switch names that CPU's guard and stack
        jit.m.set_cpu(cpu)
        assert struct.unpack("<QQ", jit.m.memory.read(words, 16)) == \
            (dc.active_addr(cpu), dc.runner.jit.stack_top_of(cpu))
    assert _counts(jp) == _counts(pp) == [0, PER_CPU[1]]
    assert prog_stats(jp).misses == prog_stats(pp).misses == PER_CPU[0]
    assert jit.p.hits == py.p.hits == sum(CALLS)


@pytest.mark.parametrize("arch", ARCHES)
def test_modelled_cycles_repeat_run_to_run(percpu, arch) -> None:
    got = []
    for _ in range(2):
        prog = by_cpu_prog()
        lab = CpuLab(percpu(arch), "jit", prog, cycles=True)
        out = lab.run()
        got.append((out, lab.m.clock.cycles, dict(lab.m.clock.breakdown()), _counts(prog)))
    assert got[0] == got[1]
