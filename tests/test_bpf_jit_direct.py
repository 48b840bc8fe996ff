"""Optimized probes that call their JITed BPF programs from a guest thunk (issue 17,
probes/bpf/jit_direct.py): after the first (host) hit the probe's jump targets a thunk
that saves pt_regs on the guest stack and calls the images, so later hits never leave
the guest; the maps, hit counts and program stats still add up, the guest's registers
and flags come back intact, programs that need the host keep the host path, and a
change of programs sends the probe back to it."""
from __future__ import annotations

import pytest

from conftest import ARCHES, firmware_elf
from probes.bench_kinds import counting_prog, parm_offset
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of, direct_eligible
from probes.bpf.jit_guest import install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe
from probes.optprobes import enable_optprobes
from probes.testing import ProbeLab
from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog,
                                    perf_event_detach_bpf_prog, prog_stats)

# PT_REGS_PARM1 in the pt_regs frame: rdi (x86-64), x0 (arm64)


def sum_parm1_prog(arch: str, ret: int = 0) -> BpfProg:
    """sums[0] += PT_REGS_PARM1(ctx): reads the frame the thunk saved; returns `ret`."""
    sums = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="sums")
    text = f"""
        ldxdw r6, [r1+{parm_offset(arch)}]
        stw [r10-4], 0
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +1
        lock add [r0], r6
        mov r0, {ret}
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="sum_parm1", license="GPL", maps={3: sums})


def helper_prog() -> BpfProg:
    """Calls bpf_get_stack: a stack walk from the hit's registers, which only the host
    path has."""
    text = "mov r2, r10\nadd r2, -64\nmov r3, 64\nmov r4, 0\ncall 67\nmov r0, 0\nexit"
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="clock", license="GPL")


def _lab(arch: str, prog: BpfProg | None, engine: str = "jit"):
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    opt = enable_optprobes(lab.kprobes)
    p = Kprobe(symbol_name="hot_leaf")
    lab.kprobes.register_kprobe(p)
    opt.kick_kprobe_optimizer()
    assert p.ainsn.optimized, p.ainsn.opt_reason
    call = KprobePerfEvent(lab.machine, "hot_leaf", kp=p)
    p.pre_handler = call.kprobe_perf_func
    event = PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE)
    if prog is not None:
        assert perf_event_attach_bpf_prog(event, prog) == 0
    install_engine(lab.machine, engine)
    return lab, p, event


def _u64(prog: BpfProg) -> int:
    return int.from_bytes(prog.maps[3].lookup(0)[:8], "little")


@pytest.mark.parametrize("arch", ARCHES)
def test_counting_hits_stay_in_the_guest(arch) -> None:
    prog = counting_prog()
    lab, p, _event = _lab(arch, prog)
    plain = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    assert lab.call("hot_call", 3) == plain.call("hot_call", 3)
    thunks = direct_calls_of(lab.machine).thunks
    assert list(thunks) == [p.addr]                    # the first hit installed it
    entries = []                                        # no host entry on the next hits
    lab.machine.add_host_entry(p.ainsn.optinsn.detour, lambda addr: entries.append(addr))
    assert lab.call("hot_call", 50) == plain.call("hot_call", 50)
    assert entries == []
    assert _u64(prog) == 53 and p.hits == 53
    assert prog_stats(prog).run_cnt == 53 and p.pre_handler.__self__.nhit == 53


@pytest.mark.parametrize("arch", ARCHES)
def test_the_frame_is_pt_regs_and_registers_come_back(arch) -> None:
    prog = sum_parm1_prog(arch)
    assert direct_eligible(prog) is None
    lab, p, _event = _lab(arch, prog)
    plain = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    for n in (1, 40, 7):
        assert lab.call("hot_call", n) == plain.call("hot_call", n)
    assert p.addr in direct_calls_of(lab.machine).thunks
    assert _u64(prog) == sum(range(40)) + sum(range(7))     # hot_leaf(i): PARM1 = i


@pytest.mark.parametrize("arch", ARCHES)
def test_a_program_needing_the_host_keeps_the_host_path(arch) -> None:
    prog = helper_prog()
    assert "helper call 67" in (direct_eligible(prog) or "")
    lab, p, _event = _lab(arch, prog)
    lab.call("hot_call", 5)
    dc = direct_calls_of(lab.machine)
    assert dc.thunks == {} and "helper call 67" in dc.refused[p.addr]
    assert prog_stats(prog).run_cnt == 5 and p.hits == 5


@pytest.mark.parametrize("arch", ARCHES)
def test_detaching_sends_the_probe_back_to_the_detour(arch) -> None:
    prog = counting_prog()
    lab, p, event = _lab(arch, prog)
    lab.call("hot_call", 4)
    opt = lab.kprobes.optimizer
    assert opt.entries == {p.addr: direct_calls_of(lab.machine).thunks[p.addr].addr}
    perf_event_detach_bpf_prog(event)
    assert opt.entries == {} and direct_calls_of(lab.machine).thunks == {}
    assert _u64(prog) == 4 and p.hits == 4              # folded before it went
    lab.call("hot_call", 6)
    assert _u64(prog) == 4 and p.hits == 10             # the probe still counts its hits


@pytest.mark.parametrize("arch", ARCHES)
def test_the_recursion_guard_counts_misses(arch) -> None:
    """trace_call_bpf's bpf_prog_active: taken, a hit runs no program and is a miss."""
    from probes.bpf.jit_direct import ACTIVE_OFF

    prog = counting_prog()
    lab, p, _event = _lab(arch, prog)
    lab.call("hot_call", 2)
    active = direct_calls_of(lab.machine).runner.jit.tcc_addr + ACTIVE_OFF
    lab.machine.memory.write(active, (1).to_bytes(4, "little"))
    lab.call("hot_call", 3)
    assert _u64(prog) == 2 and p.hits == 5
    assert prog_stats(prog).misses == 3 and prog_stats(prog).run_cnt == 2


@pytest.mark.parametrize("arch", ARCHES)
def test_direct_hits_cycles_repeat(arch) -> None:
    cycles = []
    for _ in range(2):
        lab, _p, _event = _lab(arch, counting_prog())
        lab.machine.enable_cycle_model()
        lab.call("hot_call", 30)
        cycles.append(lab.machine.clock.cycles)
    assert cycles[0] == cycles[1] > 0


@pytest.mark.parametrize("arch", ARCHES)
def test_user_space_map_access_sees_the_guest_bytes(arch) -> None:
    """The values live in the guest while hits bypass the host: an update from user space
    reaches the program, and a lookup from a host handler in the middle of a run sees
    what the program wrote so far."""
    prog = counting_prog()
    lab, p, _event = _lab(arch, prog)
    lab.call("hot_call", 2)
    counts = prog.maps[3]
    counts.update(0, (1000).to_bytes(8, "little"))
    seen = []
    lab.kprobe("hot_call", pre=lambda kp, regs: seen.append(_u64(prog)))
    lab.call("hot_call", 5)
    lab.call("hot_call", 1)
    assert seen == [1000, 1005] and _u64(prog) == 1006


def hash_update_prog(arch: str) -> BpfProg:
    """seen[PARM1 & 7] = PARM1 through bpf_map_update_elem: the helper trampoline."""
    seen = create_map(BpfMapType.BPF_MAP_TYPE_HASH, 4, 8, 16, name="seen")
    text = f"""
        ldxdw r6, [r1+{parm_offset(arch)}]
        mov r2, r6
        and r2, 7
        stxw [r10-4], r2
        stxdw [r10-16], r6
        mov r2, r10
        add r2, -4
        mov r3, r10
        add r3, -16
        mov r4, 0
        lddw r1, map_fd(3)
        call 2
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="hash_update", license="GPL", maps={3: seen})


@pytest.mark.parametrize("arch", ARCHES)
def test_hash_update_through_the_helper_trampoline(arch) -> None:
    got = {}
    for engine in ("python", "jit"):
        prog = hash_update_prog(arch)
        lab, p, _event = _lab(arch, prog, engine)
        lab.call("hot_call", 1)
        lab.call("hot_call", 13)
        got[engine] = sorted(prog.maps[3].items())
        if engine == "jit":
            assert direct_eligible(prog) is None
            assert p.addr in direct_calls_of(lab.machine).thunks
            assert prog_stats(prog).run_cnt == 14 and p.hits == 14
    assert got["jit"] == got["python"]
    assert len(got["jit"]) == 8
    assert got["jit"][7] == ((7).to_bytes(4, "little"), (7).to_bytes(8, "little"))


@pytest.mark.parametrize("arch", ARCHES)
def test_array_update_helper_and_inlined_lookup_share_the_bytes(arch) -> None:
    """counts[0] += 1 through the inlined lookup, counts[1] = PARM1 through
    bpf_map_update_elem: the helper's write must not undo the guest's increments."""
    counts = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 2, name="counts")
    text = f"""
        ldxdw r6, [r1+{parm_offset(arch)}]
        stw [r10-4], 0
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +2
        mov r1, 1
        lock add [r0], r1
        stw [r10-4], 1
        stxdw [r10-16], r6
        mov r2, r10
        add r2, -4
        mov r3, r10
        add r3, -16
        mov r4, 0
        lddw r1, map_fd(3)
        call 2
        mov r0, 0
        exit
    """
    prog = BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="both", license="GPL", maps={3: counts})
    lab, p, _event = _lab(arch, prog)
    lab.call("hot_call", 2)
    lab.call("hot_call", 9)
    assert p.addr in direct_calls_of(lab.machine).thunks
    assert [int.from_bytes(counts.lookup(k), "little") for k in (0, 1)] == [11, 8]


@pytest.mark.parametrize("arch", ["x86_64"])
def test_unoptimize_and_reoptimize_keeps_the_counts(arch) -> None:
    prog = counting_prog()
    lab, p, _event = _lab(arch, prog)
    lab.call("hot_call", 3)
    opt = lab.kprobes.optimizer
    opt.unoptimize_kprobe(p)                # the breakpoint is back: host hits
    lab.call("hot_call", 2)
    assert p.addr not in opt.entries and _u64(prog) == 5
    opt.try_to_optimize_kprobe(p)
    opt.kick_kprobe_optimizer()
    lab.call("hot_call", 4)                 # a host hit builds a new thunk, then direct hits
    assert p.addr in opt.entries and _u64(prog) == 9 and p.hits == 9


# The probe sits between a compare and the branch that reads its flags; the program's own
# compares (the inlined lookup's bounds check) change them: the thunk must put them back.
FLAGS_LIVE = {
    "x86_64": "cmp rdi, 5\nmovabs rax, 0x1122334455667788\njl below\nmov rax, 1\nret\n"
              "below: mov rax, 2\nret",
    "arm64": "cmp x0, #5\nmov x1, #7\nb.lt below\nmov x0, #1\nret\nbelow: mov x0, #2\nret",
}
PROBE_OFF = {"x86_64": 4, "arm64": 4}


@pytest.mark.parametrize("arch", ARCHES)
def test_flags_live_across_the_probe_come_back(arch) -> None:
    lab = ProbeLab.from_asm(arch, {"flagfn": FLAGS_LIVE[arch]})
    opt = enable_optprobes(lab.kprobes)
    p = Kprobe(symbol_name="flagfn", offset=PROBE_OFF[arch])
    lab.kprobes.register_kprobe(p)
    opt.kick_kprobe_optimizer()
    assert p.ainsn.optimized, p.ainsn.opt_reason
    prog = sum_parm1_prog(arch)
    call = KprobePerfEvent(lab.machine, "flagfn", offset=PROBE_OFF[arch], kp=p)
    p.pre_handler = call.kprobe_perf_func
    assert perf_event_attach_bpf_prog(PerfEvent(call, PerfType.PERF_TYPE_KPROBE,
                                                EventKind.KPROBE), prog) == 0
    install_engine(lab.machine, "jit")
    got = [lab.call("flagfn", x) for x in (3, 9, 2, 5, 4, 100)]
    assert p.addr in direct_calls_of(lab.machine).thunks
    assert got == [2, 1, 2, 1, 2, 1]
    assert _u64(prog) == 3 + 9 + 2 + 5 + 4 + 100
