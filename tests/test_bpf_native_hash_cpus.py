"""The helper trampoline's C entry on a machine with two CPUs (probes/native/bpf_native.c):
bpf_get_smp_processor_id and updates of per-CPU hashes are served in C on the running CPU
(a word a Machine.cpu_listeners callback keeps current), with the maps the python engine
leaves and the same ones with KPROBE_EMU_NATIVE=0. The guest is tests/data/smp/percpu.c:
three threads call work(id, i) for i < 300, 400, 500, placed on CPUs 1, 0, 1."""
from __future__ import annotations

import io

import pytest

from conftest import ARCHES, ROOT
from emu.loader import GuestConfig, load_guest
from probes.bench_kinds import parm_offset
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_guest import install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BpfMapType as T
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe, kprobes_of
from probes.native import bpf_native
from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, bpf_trace_of, \
    perf_event_attach_bpf_prog

SMP = ROOT / "tests" / "data" / "smp"


def cpu_prog(arch: str, map_type: T) -> BpfProg:
    """pcpu[i & 7] = cpu + 1 on this CPU; by_cpu[cpu] = cpu + 1 (i: work's second argument)."""
    pcpu = create_map(map_type, 4, 8, 16, name="pcpu", nr_cpus=2)   # never full
    by_cpu = create_map(T.BPF_MAP_TYPE_HASH, 4, 8, 4, name="by_cpu")
    text = f"""
        ldxdw r6, [r1+{parm_offset(arch, 2)}]
        call 8
        mov r7, r0
        add r0, 1
        stxdw [r10-16], r0
        and r6, 7
        stxw [r10-4], r6
        mov r2, r10
        add r2, -4
        mov r3, r10
        add r3, -16
        mov r4, 0
        lddw r1, map_fd(3)
        call 2
        stxw [r10-4], r7
        mov r2, r10
        add r2, -4
        mov r3, r10
        add r3, -16
        mov r4, 0
        lddw r1, map_fd(4)
        call 2
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="cpu_ids", license="GPL", maps={3: pcpu, 4: by_cpu})


@pytest.fixture(scope="module")
def percpu(c_prog):
    return lambda arch: c_prog(arch, SMP / "percpu.c", extra=("-pthread",))


def _run(exe, arch: str, engine: str, map_type: T, optimized: bool):
    out = io.BytesIO()
    m = load_guest(GuestConfig(path=str(exe), argv=["3"], cpus=2, seed=3), stdout=out).machine
    prog = cpu_prog(arch, map_type)
    p = Kprobe(symbol_name="work")
    kprobes_of(m).register_kprobe(p)
    if optimized:
        from probes.optprobes import enable_optprobes
        enable_optprobes(kprobes_of(m)).kick_kprobe_optimizer()
    call = KprobePerfEvent(m, "work", kp=p)
    p.pre_handler = call.kprobe_perf_func
    assert perf_event_attach_bpf_prog(PerfEvent(call, PerfType.PERF_TYPE_KPROBE,
                                                EventKind.KPROBE), prog) == 0
    install_engine(m, engine)
    assert m.run().exit_code == 0
    native = bpf_trace_of(m).runner.jit._native if engine == "jit" else None
    served = native.jit.served if native else 0
    state = {"out": out.getvalue(), "hits": p.hits, "pcpu": prog.maps[3].items(),
             "by_cpu": prog.maps[4].items()}
    return state, served


def _case(percpu, arch, map_type, optimized, monkeypatch):
    if bpf_native.load() is None:
        pytest.skip("no C compiler for probes/native/bpf_native.c (or KPROBE_EMU_NATIVE=0)")
    exe = percpu(arch)
    got, served = _run(exe, arch, "jit", map_type, optimized)
    want, _ = _run(exe, arch, "python", map_type, optimized)
    assert got == want
    assert served > 2 * 1000                      # both helpers of (nearly) every hit
    u64 = lambda v: v.to_bytes(8, "little")      # noqa: E731
    assert got["by_cpu"] == [((1).to_bytes(4, "little"), u64(2)),
                             ((0).to_bytes(4, "little"), u64(1))]
    assert [v for _k, v in got["pcpu"]] == [[u64(1), u64(2)]] * 8   # each CPU wrote its own
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "0")
    py, served0 = _run(exe, arch, "jit", map_type, optimized)
    assert served0 == 0 and py == got


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("map_type", [T.BPF_MAP_TYPE_PERCPU_HASH, T.BPF_MAP_TYPE_LRU_PERCPU_HASH],
                         ids=["percpu_hash", "lru_percpu_hash"])
@pytest.mark.parametrize("optimized", [True, False], ids=["optprobe", "kprobe"])
def test_percpu_hash_updates_on_the_running_cpu(percpu, arch, map_type, optimized,
                                                monkeypatch) -> None:
    """(Each case is under a second: no slow tier.)"""
    _case(percpu, arch, map_type, optimized, monkeypatch)
