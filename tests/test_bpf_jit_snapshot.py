"""Snapshots of a machine whose probes run JITed BPF programs (issue 17). A snapshot is
taken before probes and programs are set up (``snapshot()`` refuses a machine with the
JIT's layers); each restore drops the JIT's images, thunks, stubs, windows, the C hash
values mapped with ``Memory.map_host`` and the this-CPU words, and programs attached
again run exactly as on a fresh machine: the same results, maps and direct calls, restore
after restore, with no host memory kept from one cycle to the next (hooks' callbacks and
C records let go, the old JIT collected). Maps are host objects, as in the kernel: one
kept across a restore keeps its values, which user space reads and writes between the
restore and the next attach without touching the JIT's dropped windows."""
from __future__ import annotations

import gc
import io
import weakref

import pytest

from conftest import ARCHES, ROOT, _native_off, firmware_elf
from emu.loader import GuestConfig, load_guest
from emu.snapshot import SnapshotError
from probes.bench_kinds import key_counting_prog
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.jit_guest import install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe, kprobes_of
from probes.optprobes import enable_optprobes
from probes.testing import ProbeLab
from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog
from test_bpf_jit_percpu import _hot_counter, percpu_counter

SMP = ROOT / "tests" / "data" / "smp"


def _attach(m, progs: list[BpfProg], func: str, optimize: bool, engine: str = "jit") -> Kprobe:
    kp = kprobes_of(m)
    opt = enable_optprobes(kp) if optimize else None
    p = Kprobe(symbol_name=func)
    if not optimize:                    # a post handler keeps a plain kprobe plain
        p.post_handler = lambda *_a: None
    kp.register_kprobe(p)
    if opt is not None:
        opt.kick_kprobe_optimizer()
    call = KprobePerfEvent(m, func, kp=p)
    p.pre_handler = call.kprobe_perf_func
    for prog in progs:
        assert perf_event_attach_bpf_prog(
            PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog) == 0
    install_engine(m, engine)
    return p


def _progs(arch: str) -> list[BpfProg]:
    """A per-CPU array counter (inlined lookup) and a hash counter (C's values, mapped
    into the guest with map_host)."""
    return [_hot_counter(arch), key_counting_prog(arch, keys=16, entries=64)]


def _maps(progs: list[BpfProg]) -> tuple:
    return ([progs[0].maps[3].lookup(k) for k in range(4)], sorted(progs[1].maps[3].items()))


def _hot_lab(arch: str) -> ProbeLab:
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    lab.halt_addr = lab._map_halt_stub()        # the lab's return stub: before the snapshot
    return lab


def _cycle(lab: ProbeLab, progs: list[BpfProg], optimize: bool, engine: str = "jit") -> tuple:
    p = _attach(lab.machine, progs, "hot_leaf", optimize, engine)
    results = [lab.call("hot_call", n) for n in (3, 50, 30)]
    dc = direct_calls_of(lab.machine)
    direct = dc is not None and p.addr in (dc.thunks if optimize else dc.stubs)
    return results, _maps(progs), p.hits, direct


@pytest.mark.parametrize("optimize", [True, False], ids=["optprobe", "kprobe"])
@pytest.mark.parametrize("arch", ARCHES)
def test_each_restore_runs_as_a_fresh_machine(arch, optimize) -> None:
    fresh = _cycle(_hot_lab(arch), _progs(arch), optimize)
    if not _native_off():               # (without C the hash map's values are Python's)
        assert fresh[3]                 # the programs run from the thunk or stub
    lab = _hot_lab(arch)
    snap = lab.machine.snapshot()
    mapped = lab.machine.memory.mapped_bytes
    for _ in range(3):
        lab.machine.restore(snap)
        assert lab.machine.memory.mapped_bytes == mapped
        assert not lab.machine.memory._external         # no map_host mapping left
        assert _cycle(lab, _progs(arch), optimize) == fresh
    assert fresh[:3] == _cycle(_hot_lab(arch), _progs(arch), optimize, "python")[:3]


@pytest.mark.parametrize("arch", ARCHES)
def test_a_snapshot_with_the_jit_set_up_is_refused(arch) -> None:
    lab = _hot_lab(arch)
    _cycle(lab, _progs(arch), True)
    with pytest.raises(SnapshotError):
        lab.machine.snapshot()


@pytest.mark.parametrize("arch", ARCHES)
def test_maps_kept_across_restores_as_the_python_engine(arch, hit_path) -> None:
    """The same programs attached again after each restore: their maps go on counting
    (host objects), user space reads and updates them between the restore and the
    attach, and the JIT's run equals the python engine's."""
    got = {}
    for engine in ("jit", "python"):
        lab, progs = _hot_lab(arch), _progs(arch)
        snap = lab.machine.snapshot()
        seen = []
        for i in range(3):
            lab.machine.restore(snap)
            seen.append(_maps(progs))                     # the dropped JIT's maps: no fault
            progs[0].maps[3].update(1, (100 * i).to_bytes(8, "little"))
            progs[1].maps[3].update(5, (7 * i).to_bytes(8, "little"))
            seen.append(_cycle(lab, progs, True, engine)[:3])
            assert progs[0].maps[3].backing is (None if engine == "python" else
                                                lab.machine.layers["bpf_probe_jit"].jit)
        got[engine] = seen
    assert got["jit"] == got["python"]
    assert int.from_bytes(got["jit"][-1][1][0][1][0], "little") > 200   # counted on from 200


@pytest.mark.parametrize("arch", ARCHES)
def test_restores_keep_no_host_memory(arch) -> None:
    """Each cycle's JIT (its images, windows, native stack, C helper records) is collected
    once the next cycle is set up (the C dispatcher, which outlives restores, names the
    last cycle's probes until then): the hooks' callbacks and held C records go with the
    hooks, so many cycles hold what one does."""
    lab = _hot_lab(arch)
    m = lab.machine
    snap = m.snapshot()
    kept, jits = [], []
    for _ in range(5):
        m.restore(snap)
        _cycle(lab, _progs(arch), True)
        jits.append(weakref.ref(m.layers["bpf_probe_jit"].jit))
        kept.append(len(m.hooks._keep))
    m.restore(snap)
    gc.collect()
    assert len(set(kept)) == 1
    assert [j() for j in jits[:-1]] == [None] * 4


@pytest.fixture(scope="module")
def percpu(c_prog):
    return lambda arch: c_prog(arch, SMP / "percpu.c", extra=("-pthread",))


def _smp_run(m, out: io.BytesIO, arch: str) -> tuple:
    prog = percpu_counter(arch, 2, cpu_hash=True)
    _attach(m, [prog], "work", False)
    assert m.run().exit_code == 0
    mp = prog.maps[3]
    return out.getvalue(), [mp.lookup(k) for k in range(mp.max_entries)], \
        sorted(prog.maps[4].items())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_a_threaded_guest_on_two_cpus_restores(percpu, arch, hit_path) -> None:
    """Per-CPU arrays and hashes, per-CPU stubs and this-CPU words on two CPUs: each
    restore of the guest at its start runs as a fresh load does."""
    def load():
        out = io.BytesIO()
        return load_guest(GuestConfig(path=str(percpu(arch)), argv=["3"], cpus=2, seed=3),
                          stdout=out).machine, out

    m, out = load()
    fresh = _smp_run(m, out, arch)
    m, out = load()
    snap = m.snapshot()
    for _ in range(2):
        m.restore(snap)
        out.seek(0)
        out.truncate()
        assert _smp_run(m, out, arch) == fresh
