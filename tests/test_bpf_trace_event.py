"""BPF programs on a kprobe event made through tracefs (both arches): several programs
decide together whether the event is recorded, the query on the event with each ids_len
case, and the run state a program keeps across hits (built once, reset per hit)."""
from __future__ import annotations

import errno
import io

import pytest

from emu.loader import GuestConfig, load_guest
from probes import bpf
from probes.bpf import BpfProgType, create_map
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.trace.bpf_trace import (
    EventKind, PerfEvent, PerfEventQueryBpf, PerfType, bpf_trace_of, perf_event_attach_bpf_prog,
    perf_event_detach_bpf_prog, perf_event_query_prog_array, prog_stats,
)
from probes.trace.tracefs import tracefs_of

from conftest import ARCHES, firmware_elf

KPROBE = BpfProgType.BPF_PROG_TYPE_KPROBE
# PT_REGS_PARM3 (the flags of do_sys_open(dfd, name, flags, mode)) in each arch's pt_regs
PARM3 = {"x86_64": 96, "arm64": 16}


def prog(asm: str, name: str, maps=None) -> BpfProg:
    return BpfProg.from_bytes(bpf.assemble(asm), prog_type=KPROBE, name=name, license="GPL",
                              maps=maps or {})


def setup(arch: str):
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=io.BytesIO())
    fs = tracefs_of(g.machine)
    assert fs.write("kprobe_events", "p:b/open do_sys_open fl=$arg3:u32") == 0
    return g.machine, fs, fs.events["b/open"]


def attach(call, p: BpfProg) -> PerfEvent:
    ev = PerfEvent(call, PerfType.PERF_TYPE_TRACEPOINT, EventKind.KPROBE)
    assert perf_event_attach_bpf_prog(ev, p) == 0
    return ev


def opens(fs) -> list[str]:
    return [ln.rsplit("fl=", 1)[1] for ln in fs.read("trace").splitlines()
            if not ln.startswith("#")]


@pytest.mark.parametrize("arch", ARCHES)
def test_several_programs_decide_what_the_event_records(arch):
    """The AND of the u32 results: 1, 3 and (flags == 0) record the 10 opens with flags 0
    of the 16; a program returning 2 alongside 1 (1 & 2 = 0) would record none; every
    program runs on every hit, in attach order, whether or not the event records."""
    m, fs, call = setup(arch)
    flags_zero = prog(f"ldxdw r2, [r1+{PARM3[arch]}]\nmov r0, 0\njne r2, 0, +1\nmov r0, 1\nexit",
                      "fz")
    progs = [prog("mov r0, 1\nexit", "one"), prog("mov r0, 3\nexit", "three"), flags_zero]
    for p in progs:
        attach(call, p)
    fs.write("events/b/open/enable", "1")
    m.run(timeout=60)
    assert opens(fs) == ["0"] * 10
    assert [prog_stats(p).run_cnt for p in progs] == [16] * 3
    assert fs.read("kprobe_profile").split()[:2] == ["open", "16"]


@pytest.mark.parametrize("arch", ARCHES)
def test_programs_run_with_the_event_disabled(arch):
    """A perf/BPF user arms the probes (perf_register): programs run on every hit while
    nothing is recorded; AND = 0 (1 & 2) with the event enabled records nothing."""
    m, fs, call = setup(arch)
    one, two = prog("mov r0, 1\nexit", "one"), prog("mov r0, 2\nexit", "two")
    attach(call, one)
    attach(call, two)
    call.perf_register()              # what opening the perf event does (TRACE_REG_PERF_REGISTER)
    m.run(timeout=60)
    assert opens(fs) == [] and prog_stats(one).run_cnt == 16
    m2, fs2, call2 = setup(arch)
    attach(call2, prog("mov r0, 1\nexit", "one"))
    attach(call2, prog("mov r0, 2\nexit", "two"))
    fs2.write("events/b/open/enable", "1")
    m2.run(timeout=60)
    assert opens(fs2) == []


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("ids_len, rc, n_ids", [
    (0, 0, 0), (1, -errno.ENOSPC, 1), (2, -errno.ENOSPC, 2), (3, 0, 3), (64, 0, 3),
    (65, -errno.E2BIG, None)])
def test_query_on_a_tracefs_event(arch, ids_len, rc, n_ids):
    m, fs, call = setup(arch)
    progs = [prog("mov r0, 1\nexit", n) for n in "abc"]
    events = [attach(call, p) for p in progs]
    q = PerfEventQueryBpf(ids_len)
    assert perf_event_query_prog_array(events[0], q) == rc
    if n_ids is not None:
        assert q.prog_cnt == 3 and q.ids == [prog_stats(p).id for p in progs][:n_ids]
    perf_event_detach_bpf_prog(events[1])
    q = PerfEventQueryBpf(ids_len)
    if ids_len <= 64:
        perf_event_query_prog_array(events[0], q)
        assert q.prog_cnt == 2 and q.ids == [prog_stats(progs[i]).id for i in (0, 2)][:ids_len]


# On each hit: insert {flags: hits}, look it up, add 1 through the pointer, then delete it
# again; count every hit in an array. Each lookup hands the program a new element's
# address, which the reused run state must not keep from one hit to the next.
CHURN = """
    ldxdw r6, [r1+{parm3}]
    stxw [r10-4], r6
    stdw [r10-16], 41
    mov r2, r10
    add r2, -4
    mov r3, r10
    add r3, -16
    mov r4, 0
    lddw r1, map_fd(3)
    call 2
    mov r2, r10
    add r2, -4
    lddw r1, map_fd(3)
    call 1
    jeq r0, 0, +16
    ldxdw r7, [r0]
    add r7, 1
    stxdw [r0], r7
    mov r2, r10
    add r2, -4
    lddw r1, map_fd(3)
    call 3
    stw [r10-20], 0
    mov r2, r10
    add r2, -20
    lddw r1, map_fd(4)
    call 1
    jeq r0, 0, +1
    lock add [r0], r7
    mov r0, 1
    exit
"""


@pytest.mark.parametrize("arch", ARCHES)
def test_run_state_is_reused_and_reset(arch):
    m, fs, call = setup(arch)
    hashmap = create_map(BpfMapType.BPF_MAP_TYPE_HASH, 4, 8, 4, name="churn")
    total = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="total")
    p = prog(CHURN.format(parm3=PARM3[arch]), "churn", maps={3: hashmap, 4: total})
    attach(call, p)
    call.perf_register()
    m.run(timeout=60)
    st = bpf_trace_of(m)
    run, _compiled, stats = st._runs[p]
    assert stats.run_cnt == 16
    assert int.from_bytes(total.lookup(0), "little") == 16 * 42
    assert hashmap.keys() == []                                 # every element deleted again
    # what a hit adds (the element it looked up) is dropped at the next hit: after 16 hits
    # the address space holds the static regions and the last hit's one element
    assert len(run.mem.regions) == len(run._static[0]) + 1
    assert run.mem._next_key == run._static[2] + 1
