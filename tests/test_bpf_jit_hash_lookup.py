"""Hash-map lookups from JITed code in optprobe thunks and kprobe stubs (issue 17): the
hash family's values live in pages the traced guest maps (ScratchJit.hash_values), the
helper trampoline's C entry answers map_lookup_elem with the value's guest address, and
the program's atomic add goes straight to the bytes Python reads. The counting pattern
``v = lookup(key); if (!v) update(key, 1) else atomic add 1`` runs with no nested run and
gives the python engine's and the interpreter's maps, on both hit paths."""
from __future__ import annotations

import pytest

from conftest import ARCHES, firmware_elf
from probes.bpf.jit_direct import direct_calls_of, direct_eligible
from probes.bpf.jit_guest import ScratchJit, install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BpfMapType
from probes.bench_kinds import key_counting_prog
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe
from probes.optprobes import enable_optprobes
from probes.testing import ProbeLab
from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog

# counts[PARM1 % keys] += 1: lookup; if NULL update(key, 1), else lock add 1
# (then_delete: then delete the key and write 100 through the stale pointer)
count_prog = key_counting_prog


def _lab(arch: str, prog: BpfProg, engine: str, optimize: bool) -> tuple[ProbeLab, Kprobe]:
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    opt = enable_optprobes(lab.kprobes) if optimize else None
    p = Kprobe(symbol_name="hot_leaf")
    if not optimize:        # a post handler keeps a plain kprobe plain (every hit steps)
        p.post_handler = lambda *_a: None
    lab.kprobes.register_kprobe(p)
    if opt is not None:
        opt.kick_kprobe_optimizer()
        assert p.ainsn.optimized, p.ainsn.opt_reason
    call = KprobePerfEvent(lab.machine, "hot_leaf", kp=p)
    p.pre_handler = call.kprobe_perf_func
    event = PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE)
    assert perf_event_attach_bpf_prog(event, prog) == 0
    install_engine(lab.machine, engine)
    return lab, p


def _run(arch: str, engine: str, optimize: bool, calls: list[int], monkeypatch=None,
         **kw) -> tuple[list, list[int], BpfProg, ProbeLab, Kprobe]:
    prog = count_prog(arch, **kw)
    lab, p = _lab(arch, prog, engine, optimize)
    nested: list[int] = []
    results = [lab.call("hot_call", calls[0])]     # the first hit JITs, later ones go direct
    if monkeypatch is not None:
        execute = ScratchJit.execute
        monkeypatch.setattr(ScratchJit, "execute",
                            lambda self, *a: nested.append(1) or execute(self, *a))
    results += [lab.call("hot_call", n) for n in calls[1:]]
    return sorted(prog.maps[3].items()), results + [len(nested)], prog, lab, p


def _direct(lab: ProbeLab, p: Kprobe, optimize: bool) -> bool:
    dc = direct_calls_of(lab.machine)
    return dc is not None and p.addr in (dc.thunks if optimize else dc.stubs)


@pytest.mark.parametrize("optimize", [True, False], ids=["optprobe", "kprobe"])
@pytest.mark.parametrize("arch", ARCHES)
def test_counting_lookups_run_in_the_guest_as_the_other_engines(arch, optimize, hit_path,
                                                                monkeypatch) -> None:
    calls = [3, 700, 300]
    jit, jres, jprog, lab, p = _run(arch, "jit", optimize, calls, monkeypatch)
    py, pres, *_ = _run(arch, "python", optimize, calls)
    it, ires, *_ = _run(arch, "interp", optimize, calls)
    assert jit == py == it
    assert len(jit) == 256 and sum(int.from_bytes(v, "little") for _k, v in jit) == 1003
    assert jres[:-1] == pres[:-1] == ires[:-1]
    if hit_path == "native":
        assert direct_eligible(jprog) is None
        assert _direct(lab, p, optimize)
        assert jres[-1] == 0                      # no nested run after the first
        native = lab.machine.layers["bpf_probe_jit"].jit._native
        # 1000 direct hits, each a lookup, and 253 first updates after the 3 nested
        # runs: C served them all (the nested runs' calls and the first direct call,
        # whose Python entry registers the image, are deferred)
        assert native.jit.served >= 1252 and native.jit.deferred <= 8
    # user space sees the guest's stores and the guest sees user space's
    key = (5).to_bytes(4, "little")
    jprog.maps[3].update(key, (1000).to_bytes(8, "little"))
    lab.call("hot_call", 6)
    assert int.from_bytes(jprog.maps[3].lookup(key), "little") == 1001


@pytest.mark.parametrize("map_type", [BpfMapType.BPF_MAP_TYPE_PERCPU_HASH,
                                      BpfMapType.BPF_MAP_TYPE_LRU_PERCPU_HASH],
                         ids=["percpu", "lru_percpu"])
@pytest.mark.parametrize("arch", ARCHES)
def test_percpu_lookups_as_the_python_engine(arch, map_type, hit_path, monkeypatch) -> None:
    kw = dict(map_type=map_type, keys=96, entries=64)
    calls = [2, 500]
    jit, jres, jprog, lab, p = _run(arch, "jit", True, calls, monkeypatch, **kw)
    py, pres, *_ = _run(arch, "python", True, calls, **kw)
    assert jit == py and jres[:-1] == pres[:-1] and len(jit) == 64
    if hit_path == "native":
        assert _direct(lab, p, True) and jres[-1] == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_lru_lookup_marks_the_element_used_as_the_python_engine(arch, hit_path) -> None:
    # 64 entries, 96 keys: evictions follow the order lookups leave
    kw = dict(map_type=BpfMapType.BPF_MAP_TYPE_LRU_HASH, keys=96, entries=64)
    calls = [2, 500, 77]
    jit, jres, *_ = _run(arch, "jit", False, calls, **kw)
    py, pres, *_ = _run(arch, "python", False, calls, **kw)
    assert jit == py and jres[:-1] == pres[:-1]
    assert len(jit) == 64


@pytest.mark.parametrize("arch", ARCHES)
def test_a_deleted_element_is_free_though_its_pointer_was_written(arch, hit_path) -> None:
    calls = [2, 40]
    jit, jres, _prog, lab, p = _run(arch, "jit", True, calls, then_delete=True, keys=8)
    py, pres, *_ = _run(arch, "python", True, calls, then_delete=True, keys=8)
    assert jit == py and jres[:-1] == pres[:-1]
    # every hit that found its key deleted it: at most the keys of single hits remain,
    # and a write through the stale pointer did not bring an element back
    assert all(v == (1).to_bytes(8, "little") for _k, v in jit)


@pytest.mark.parametrize("arch", ARCHES)
def test_the_values_are_mapped_once_rw_and_owned_by_bpf(arch) -> None:
    prog = count_prog(arch)
    lab, _p = _lab(arch, prog, "jit", True)
    lab.call("hot_call", 20)
    mp = prog.maps[3]
    if mp.native is None:
        pytest.skip("the C library cannot be built: hash maps keep Python storage")
    regions = [r for r in lab.machine.memory.regions if r.name == "[bpf htab values]"]
    assert len(regions) == 1 and regions[0].prot == 3      # rw-, not executable
    base = regions[0].start
    key = (7).to_bytes(4, "little")
    slot = mp.native.find(key, False)
    stored = lab.machine.memory.read(base + slot * mp.native.h.vstride, 8)
    assert stored == bytes(mp.lookup(key)) == (1).to_bytes(8, "little")


@pytest.mark.parametrize("arch", ARCHES)
def test_python_entry_returns_the_same_guest_pointer_without_c(arch, monkeypatch) -> None:
    """No C trampoline entry (NativeHelpers unavailable): the Python entry of a thunk's
    lookup returns the guest address of the value too, with the same maps."""
    from probes.native.bpf_native import NativeHelpers

    calls = [3, 300]
    with_c, cres, *_ = _run(arch, "jit", True, calls)
    monkeypatch.setattr(NativeHelpers, "create", classmethod(lambda cls, *a: None))
    no_c, nres, prog, lab, p = _run(arch, "jit", True, calls, monkeypatch)
    if prog.maps[3].native is None:
        pytest.skip("the C library cannot be built: hash maps keep Python storage")
    assert _direct(lab, p, True) and nres[-1] == 0
    assert no_c == with_c and nres[:-1] == cres[:-1] and len(no_c) == 256


@pytest.mark.parametrize("arch", ARCHES)
def test_map_host_is_every_cpus_and_survives_sharing(arch) -> None:
    """Memory.map_host: the caller's pages in every Uc, before and after the memory is
    shared with another vCPU's Uc (share() must not copy them), the TLB table told."""
    import ctypes
    import mmap

    from unicorn import Uc, unicorn_const as UC

    from emu.memory import PAGE, PROT_READ, PROT_WRITE, Memory

    mode = (UC.UC_ARCH_X86, UC.UC_MODE_64) if arch == "x86_64" else (UC.UC_ARCH_ARM64,
                                                                     UC.UC_MODE_ARM)
    mem = Memory(Uc(*mode))
    mem.map(0x10000, PAGE, PROT_READ | PROT_WRITE, "plain")
    mm = mmap.mmap(-1, 2 * PAGE)
    host = ctypes.c_char.from_buffer(mm)
    mem.map_host(0x40000, 2 * PAGE, PROT_READ | PROT_WRITE, "[host]", ctypes.addressof(host))
    mem.write(0x40010, b"guest")
    assert mm[0x10:0x15] == b"guest"
    other = Uc(*mode)
    mem.share_with(other)
    mm[PAGE:PAGE + 4] = b"host"
    assert bytes(other.mem_read(0x40000 + PAGE, 4)) == b"host"
    other.mem_write(0x40020, b"cpu1")
    assert mm[0x20:0x24] == b"cpu1" and mem.read(0x40020, 4) == b"cpu1"
    assert mem.find(0x40000).name == "[host]"
    mem.unmap(0x40000, 2 * PAGE)
    assert not mem.is_mapped(0x40000) and mm[0x20:0x24] == b"cpu1"   # the caller's still
    del host
    mm.close()




@pytest.mark.parametrize("map_type", [BpfMapType.BPF_MAP_TYPE_HASH,
                                      BpfMapType.BPF_MAP_TYPE_PERCPU_HASH],
                         ids=["hash", "percpu"])
@pytest.mark.parametrize("arch", ARCHES)
def test_two_cpus_count_into_one_mapped_hash(arch, map_type, c_prog, hit_path) -> None:
    """tests/data/smp/percpu.c: three threads on two CPUs call work(id, i); the stubs of
    both CPUs look up counts[i % 256] in the one mapped value pool (every CPU's Uc)."""
    import io

    from conftest import ROOT
    from emu.loader import GuestConfig, load_guest

    exe = c_prog(arch, ROOT / "tests" / "data" / "smp" / "percpu.c", extra=("-pthread",))
    got = {}
    for engine in ("jit", "python"):
        prog = count_prog(arch, map_type=map_type, arg=2, nr_cpus=2)
        out = io.BytesIO()
        m = load_guest(GuestConfig(path=str(exe), argv=["3"], cpus=2, seed=3),
                       stdout=out).machine
        p = Kprobe(symbol_name="work")
        from probes.kprobes import kprobes_of
        kprobes_of(m).register_kprobe(p)
        call = KprobePerfEvent(m, "work", kp=p)
        p.pre_handler = call.kprobe_perf_func
        assert perf_event_attach_bpf_prog(
            PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog) == 0
        install_engine(m, engine)
        assert m.run().exit_code == 0
        got[engine] = (out.getvalue(), sorted(prog.maps[3].items()))
        if engine == "jit" and hit_path == "native":
            dc = direct_calls_of(m)
            assert dc is not None and {k[2] for k in dc.copies} == {0, 1}
    assert got["jit"] == got["python"]
    # i runs 0..299, 0..399, 0..499: key k counts one per thread whose range has it
    per_value = [v if isinstance(v, list) else [v] for _k, v in got["jit"][1]]
    assert sum(int.from_bytes(x, "little") for vs in per_value for x in vs) == 1200
    if map_type == BpfMapType.BPF_MAP_TYPE_PERCPU_HASH:      # both CPUs counted
        assert all(any(int.from_bytes(vs[c], "little") for vs in per_value) for c in (0, 1))
