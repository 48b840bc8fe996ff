"""Plain kprobes whose JITed BPF programs run from a guest stub (issue 17,
probes/bpf/jit_direct.py DirectCalls.kprobe_stub): after the first (host) hit has JITed the
programs, kprobe_handler sends the guest to a stub that saves pt_regs, takes
bpf_prog_active, calls the images and traps back at its own breakpoint, where the hit goes
on (the out-of-line step or the simulation, the post handler). No nested run: the maps,
counts, program stats, misses of the recursion guard and the guest's results are the
compiled Python engine's, on both hit paths."""
from __future__ import annotations

import pytest

from conftest import ARCHES, firmware_elf
from test_bpf_jit_direct import hash_update_prog, sum_parm1_prog
from probes.bench_kinds import counting_prog
from probes.bpf import BpfProgType, assemble
from probes.bpf.jit_direct import ACTIVE_OFF, direct_calls_of
from probes.bpf.jit_guest import ScratchJit, install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe
from probes.testing import ProbeLab
from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, bpf_trace_of,
                                    perf_event_attach_bpf_prog, perf_event_detach_bpf_prog,
                                    prog_stats)


def pid_prog() -> BpfProg:
    """bpf_get_stack: a stack walk from the hit's registers, which only the host path has."""
    return BpfProg.from_bytes(assemble("mov r2, r10\nadd r2, -64\nmov r3, 64\nmov r4, 0\n"
                                       "call 67\nmov r0, 0\nexit"),
                              prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE, name="pid",
                              license="GPL")


class Lab:
    """hotloop's hot_leaf with a plain kprobe (a post handler, so every hit steps) whose
    pre handler is a kprobe-PMU event carrying `prog`."""

    def __init__(self, arch: str, prog: BpfProg, engine: str) -> None:
        self.lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
        self.m = self.lab.machine
        self.posts: list[int] = []
        self.p = Kprobe(symbol_name="hot_leaf",
                        post_handler=lambda p, regs, flags: self.posts.append(regs.ip))
        self.lab.kprobes.register_kprobe(self.p)
        self.call = KprobePerfEvent(self.m, "hot_leaf", kp=self.p)
        self.p.pre_handler = self.call.kprobe_perf_func
        self.event = PerfEvent(self.call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE)
        assert perf_event_attach_bpf_prog(self.event, prog) == 0
        install_engine(self.m, engine)

    def run(self, n: int) -> int:
        return self.lab.call("hot_call", n)

    @property
    def stubs(self) -> dict:
        dc = direct_calls_of(self.m)
        return {} if dc is None else dc.stubs


def _u64(prog: BpfProg, key: int = 0) -> int:
    return int.from_bytes(prog.maps[3].lookup(key)[:8], "little")


def _counting_pair(arch: str) -> tuple[Lab, BpfProg, Lab, BpfProg]:
    jp, pp = counting_prog(), counting_prog()
    return Lab(arch, jp, "jit"), jp, Lab(arch, pp, "python"), pp


@pytest.mark.parametrize("arch", ARCHES)
def test_hits_after_the_first_run_the_stub_not_a_nested_run(arch, hit_path, monkeypatch) -> None:
    jit, jp, py, pp = _counting_pair(arch)
    assert jit.run(3) == py.run(3)
    assert list(jit.stubs) == [jit.p.addr]          # the first hit JITed it, the second made it
    nested: list[int] = []
    execute = ScratchJit.execute
    monkeypatch.setattr(ScratchJit, "execute",
                        lambda self, *a: nested.append(1) or execute(self, *a))
    assert jit.run(40) == py.run(40)
    assert nested == []
    assert _u64(jp) == _u64(pp) == 43
    assert jit.p.hits == py.p.hits == 43 and jit.p.nmissed == py.p.nmissed == 0
    assert jit.call.nhit == py.call.nhit == 43
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == 43
    assert jit.posts == py.posts and len(jit.posts) == 43   # the step and post handler go on


@pytest.mark.parametrize("arch", ARCHES)
def test_the_frame_is_pt_regs_and_r0_does_not_matter(arch, hit_path) -> None:
    for ret in (0, 1):
        jp, pp = sum_parm1_prog(arch, ret), sum_parm1_prog(arch, ret)
        jit, py = Lab(arch, jp, "jit"), Lab(arch, pp, "python")
        for n in (1, 40, 7):
            assert jit.run(n) == py.run(n)
        assert jit.p.addr in jit.stubs
        assert _u64(jp) == _u64(pp) == sum(range(40)) + sum(range(7))   # hot_leaf(i): PARM1 = i
        assert jit.posts == py.posts


@pytest.mark.parametrize("arch", ARCHES)
def test_a_trampoline_helper_updates_the_hash_map_as_the_python_engine(arch, hit_path) -> None:
    jp, pp = hash_update_prog(arch), hash_update_prog(arch)
    jit, py = Lab(arch, jp, "jit"), Lab(arch, pp, "python")
    for n in (2, 30):
        assert jit.run(n) == py.run(n)
    assert jit.p.addr in jit.stubs
    assert sorted(jp.maps[3].items()) == sorted(pp.maps[3].items())
    assert len(jp.maps[3].items()) == 8


@pytest.mark.parametrize("arch", ARCHES)
def test_a_busy_guard_counts_misses_as_trace_call_bpf(arch) -> None:
    jit, jp, py, pp = _counting_pair(arch)
    jit.run(2), py.run(2)                        # the stub exists
    runner = bpf_trace_of(jit.m).runner
    active = runner.jit.tcc_addr + ACTIVE_OFF
    jit.m.memory.write(active, (1).to_bytes(4, "little"))   # bpf_prog_active held
    bpf_trace_of(py.m).bpf_prog_active = 1
    assert jit.run(5) == py.run(5)
    assert _u64(jp) == _u64(pp) == 2
    assert prog_stats(jp).misses == prog_stats(pp).misses == 5
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == 2
    assert jit.p.hits == py.p.hits == 7 and jit.call.nhit == py.call.nhit == 7


@pytest.mark.parametrize("arch", ARCHES)
def test_a_program_needing_the_host_keeps_the_nested_run(arch) -> None:
    lab = Lab(arch, pid_prog(), "jit")
    lab.run(4)
    assert lab.stubs == {}
    assert "helper call 67" in direct_calls_of(lab.m).refused[lab.p.addr]
    assert lab.p.hits == 4 and len(lab.posts) == 4


@pytest.mark.parametrize("arch", ARCHES)
def test_detaching_drops_the_stub_and_a_new_program_gets_one(arch) -> None:
    jp = counting_prog()
    lab = Lab(arch, jp, "jit")
    lab.run(3)
    old = lab.stubs[lab.p.addr].addr
    perf_event_detach_bpf_prog(lab.event)
    assert lab.stubs == {}
    lab.run(2)
    assert _u64(jp) == 3 and lab.call.nhit == 5 and lab.p.hits == 5
    second = counting_prog()
    event = PerfEvent(lab.call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE)
    assert perf_event_attach_bpf_prog(event, second) == 0
    lab.run(4)
    assert lab.stubs[lab.p.addr].addr != old     # a dropped stub's slot is retired (others first)
    assert _u64(second) == 4 and _u64(jp) == 3


@pytest.mark.parametrize("arch", ARCHES)
def test_modelled_cycles_repeat_run_to_run(arch) -> None:
    got = []
    for _ in range(2):
        lab = Lab(arch, counting_prog(), "jit")
        lab.m.enable_cycle_model()
        lab.run(20)
        got.append((lab.m.clock.cycles, dict(lab.m.clock.breakdown())))
    assert got[0] == got[1]


@pytest.mark.parametrize("arch", ARCHES)
def test_a_queued_probe_is_optimized_at_its_stub_hit(arch, hit_path) -> None:
    """Optprobes enabled once a probe has its stub: the probe is queued (OPTIMIZED, not
    patched yet), and its next hit, through the stub, kicks the optimizer and goes on in
    the detour, as kprobe_handler does after a pre handler."""
    from probes.kprobes import KPROBE_FLAG_OPTIMIZED
    from probes.optprobes import enable_optprobes
    lab, prog = ProbeLab.load(str(firmware_elf(arch, "hotloop"))), counting_prog()
    p = Kprobe(symbol_name="hot_leaf")
    lab.kprobes.register_kprobe(p)
    call = KprobePerfEvent(lab.machine, "hot_leaf", kp=p)
    p.pre_handler = call.kprobe_perf_func
    assert perf_event_attach_bpf_prog(
        PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog) == 0
    install_engine(lab.machine, "jit")
    lab.call("hot_call", 3)
    dc = direct_calls_of(lab.machine)
    assert dc is not None and p.addr in dc.stubs
    enable_optprobes(lab.kprobes)
    assert p.flags & KPROBE_FLAG_OPTIMIZED and not p.ainsn.optimized
    lab.call("hot_call", 3)
    assert p.ainsn.optimized
    lab.call("hot_call", 4)
    assert _u64(prog) == 10 and p.hits == 10
