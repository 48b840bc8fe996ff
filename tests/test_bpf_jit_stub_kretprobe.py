"""Kretprobes whose JITed BPF programs run from a guest stub (issue 17, jit_direct.py
DirectCalls.kretprobe_stub): after the first (host) return has JITed the programs, the
trampoline handles the return as always (the instance off the LIFO, the hit counted) but
sends the guest to this CPU's stub instead of a nested run; the stub saves pt_regs with the
return value and ip = the real return address, calls the images and traps back, and the
return goes on to the caller. Maps, counts, program stats, guard misses and the guest's
results equal the compiled Python engine's on both hit paths."""
from __future__ import annotations

import pytest

from conftest import ARCHES, firmware_elf
from probes.bench_kinds import counting_prog
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.jit_guest import ScratchJit, install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.kretprobes import Kretprobe, kretprobes_of
from probes.testing import ProbeLab
from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, bpf_trace_of,
                                    perf_event_attach_bpf_prog, perf_event_detach_bpf_prog,
                                    prog_stats)

# PT_REGS_RC and the ip slot in pt_regs: rax / rip (x86-64), x0 / pc (arm64)
RC_OFF = {"x86_64": 80, "arm64": 0}
IP_OFF = {"x86_64": 128, "arm64": 256}


def ret_prog(arch: str) -> BpfProg:
    """sums[0] += PT_REGS_RC(ctx), sums[1] += PT_REGS_IP(ctx) (the real return address),
    sums[2] += 1."""
    sums = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 3, name="sums")
    parts = []
    for key, off in ((0, f"[r6+{RC_OFF[arch]}]"), (1, f"[r6+{IP_OFF[arch]}]"), (2, None)):
        load = f"ldxdw r7, {off}" if off else "mov r7, 1"
        parts.append(f"""
            {load}
            stw [r10-4], {key}
            mov r2, r10
            add r2, -4
            lddw r1, map_fd(3)
            call 1
            jeq r0, 0, +1
            lock add [r0], r7
        """)
    text = "mov r6, r1\n" + "".join(parts) + "mov r0, 0\nexit"
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="ret_sums", license="GPL", maps={3: sums})


class RetLab:
    """hotloop's hot_leaf with a kretprobe whose return handler is a kretprobe-PMU event
    carrying `prog`."""

    def __init__(self, arch: str, prog: BpfProg, engine: str, func: str = "hot_leaf") -> None:
        self.lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
        self.m = self.lab.machine
        self.call = KprobePerfEvent(self.m, func, is_return=True)
        self.call.register()
        assert self.call.rp is not None
        self.rp: Kretprobe = self.call.rp
        self.event = PerfEvent(self.call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE)
        assert perf_event_attach_bpf_prog(self.event, prog) == 0
        install_engine(self.m, engine)

    def run(self, n: int) -> int:
        return self.lab.call("hot_call", n)

    @property
    def stubs(self) -> dict:
        dc = direct_calls_of(self.m)
        return {} if dc is None else dc.stubs_of("kretprobe")


def _sums(prog: BpfProg) -> list[int]:
    return [int.from_bytes(prog.maps[3].lookup(k)[:8], "little") for k in range(3)]


@pytest.mark.parametrize("arch", ARCHES)
def test_returns_after_the_first_run_the_stub_not_a_nested_run(arch, hit_path, monkeypatch) -> None:
    jp, pp = ret_prog(arch), ret_prog(arch)
    jit, py = RetLab(arch, jp, "jit"), RetLab(arch, pp, "python")
    assert jit.run(3) == py.run(3)
    assert list(jit.stubs) == [jit.rp.kp.addr]
    nested: list[int] = []
    execute = ScratchJit.execute
    monkeypatch.setattr(ScratchJit, "execute",
                        lambda self, *a: nested.append(1) or execute(self, *a))
    for n in (40, 7):
        assert jit.run(n) == py.run(n)                 # hot_call's sum: every return went home
    assert nested == []
    got = _sums(jp)
    assert got == _sums(pp) and got[2] == 50 and got[1] != 0
    assert jit.rp.hits == py.rp.hits == 50 and jit.rp.nmissed == py.rp.nmissed == 0
    assert jit.call.nhit == py.call.nhit == 50
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == 50
    assert kretprobes_of(jit.m).instances == [] and len(jit.rp.free_instances) == jit.rp.maxactive


@pytest.mark.parametrize("arch", ARCHES)
def test_a_busy_guard_counts_misses_as_trace_call_bpf(arch) -> None:
    jp, pp = counting_prog(), counting_prog()
    jit, py = RetLab(arch, jp, "jit"), RetLab(arch, pp, "python")
    jit.run(2), py.run(2)                            # the stub exists
    dc = direct_calls_of(jit.m)
    jit.m.memory.write(dc.active_addr(0), (1).to_bytes(4, "little"))   # bpf_prog_active held
    bpf_trace_of(py.m).bpf_prog_active = 1
    assert jit.run(5) == py.run(5)
    count = [int.from_bytes(p.maps[3].lookup(0)[:8], "little") for p in (jp, pp)]
    assert count == [2, 2]
    assert prog_stats(jp).misses == prog_stats(pp).misses == 5
    assert jit.rp.hits == py.rp.hits == 7 and jit.call.nhit == py.call.nhit == 7


@pytest.mark.parametrize("arch", ARCHES)
def test_detach_sends_returns_back_and_a_new_program_gets_a_stub(arch, hit_path) -> None:
    jp = counting_prog()
    lab = RetLab(arch, jp, "jit")
    lab.run(3)
    assert lab.rp.kp.addr in lab.stubs
    perf_event_detach_bpf_prog(lab.event)
    assert lab.stubs == {}
    lab.run(2)
    second = counting_prog()
    assert perf_event_attach_bpf_prog(
        PerfEvent(lab.call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), second) == 0
    lab.run(4)
    assert lab.rp.kp.addr in lab.stubs
    count = [int.from_bytes(p.maps[3].lookup(0)[:8], "little") for p in (jp, second)]
    assert count == [3, 4] and lab.call.nhit == 9 and lab.rp.hits == 9


@pytest.mark.parametrize("arch", ARCHES)
def test_modelled_cycles_repeat_run_to_run(arch) -> None:
    got = []
    for _ in range(2):
        lab = RetLab(arch, counting_prog(), "jit")
        lab.m.enable_cycle_model()
        lab.run(20)
        assert lab.stubs
        got.append((lab.m.clock.cycles, dict(lab.m.clock.breakdown())))
    assert got[0] == got[1]


@pytest.mark.parametrize("arch", ARCHES)
def test_switching_engines_takes_the_stubs_away_and_back(arch) -> None:
    """install_engine("python") after the JIT: the returns go back to the host path (no
    stub left, none made); the JIT again: the same JIT wires its stubs at the next hit."""
    prog = counting_prog()
    lab = RetLab(arch, prog, "jit")
    lab.run(3)
    assert len(lab.stubs) == 1
    install_engine(lab.m, "python")
    assert lab.stubs == {}
    lab.run(5)
    assert lab.stubs == {} and bpf_trace_of(lab.m).runner is None
    install_engine(lab.m, "jit")
    lab.run(4)
    assert len(lab.stubs) == 1
    assert lab.rp.hits == 12 and int.from_bytes(prog.maps[3].lookup(0)[:8], "little") == 12


def _affine_prog(mul: int, add: int, shared) -> BpfProg:
    """v[0] = v[0] * mul + add: two such programs give a result that names their order."""
    text = f"""
        stw [r10-4], 0
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +4
        ldxdw r1, [r0]
        mul r1, {mul}
        add r1, {add}
        stxdw [r0], r1
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name=f"affine{mul}", license="GPL", maps={3: shared})


@pytest.mark.parametrize("arch", ARCHES)
def test_a_chain_of_returns_runs_its_programs_in_the_python_engines_order(arch, hit_path) -> None:
    """Two kretprobes on one function return as one chain: their programs run in the
    trampoline handler's order (the stub serves a chain of one only), on both hit paths."""
    got = []
    for engine in ("python", "jit"):
        lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
        shared = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="order")
        for mul, add in ((2, 1), (3, 0)):
            call = KprobePerfEvent(lab.machine, "hot_leaf", is_return=True)
            call.register()
            event = PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE)
            assert perf_event_attach_bpf_prog(event, _affine_prog(mul, add, shared)) == 0
        install_engine(lab.machine, engine)
        lab.call("hot_call", 4)
        got.append(int.from_bytes(shared.lookup(0)[:8], "little") % (1 << 64))
    assert got[0] == got[1] != 0
