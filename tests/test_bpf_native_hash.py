"""The hash map family in C and the helper trampoline's C entry (issue 17,
probes/native/bpf_native.c): the preallocated storage gives exactly the Python storage's
results (return codes, values, iteration order, LRU eviction) for random operation
sequences; programs updating and deleting hash-map entries on thousands of optprobe and
plain-kprobe hits (and updates of an array map's guest window) leave the same maps under
the JIT with C helpers, the compiled Python
engine and the interpreter; C really serves the calls, and KPROBE_EMU_NATIVE=0 gives the
same maps and the same modelled cycles; inside a nested run (a kretprobe) Python serves
every helper."""
from __future__ import annotations

import random

import pytest

from conftest import ARCHES, firmware_elf
from probes.bench_kinds import parm_offset
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.errors import MapError
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.jit_guest import install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BPF_F_NO_PREALLOC, BpfMapType as T
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe
from probes.native import bpf_native
from probes.optprobes import enable_optprobes
from probes.testing import ProbeLab
from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, bpf_trace_of, \
    perf_event_attach_bpf_prog

HASHES = (T.BPF_MAP_TYPE_HASH, T.BPF_MAP_TYPE_LRU_HASH, T.BPF_MAP_TYPE_PERCPU_HASH,
          T.BPF_MAP_TYPE_LRU_PERCPU_HASH)


@pytest.fixture
def native():
    if bpf_native.load() is None:
        pytest.skip("no C compiler for probes/native/bpf_native.c (or KPROBE_EMU_NATIVE=0)")


def _ops(map_type: T, nr_cpus: int, seed: int, n: int = 2000) -> tuple[list, object]:
    """A random sequence of user-space and program-side calls: every result, in order."""
    rng = random.Random(seed)
    m = create_map(map_type, 4, 12, 16, nr_cpus=nr_cpus)
    out: list = []
    for _ in range(n):
        k = rng.randrange(24).to_bytes(4, "little")
        v = rng.randbytes(12)
        op = rng.choices(range(7), weights=(4, 3, 1, 1, 1, 1, 1))[0]
        try:
            if op == 0:
                m.update(k, v, rng.choice([0, 1, 2, 3, 4, 5, 6, 8]))
            elif op == 1:
                out.append(m.update_elem(k, v, rng.choice([0, 1, 2, 3, 4, 5, 6]),
                                         rng.choice([None, 0, nr_cpus - 1])))
            elif op == 2:
                out.append(m.lookup(k))
            elif op == 3:
                m.delete(k)
            elif op == 4:
                out.append(m.get_next_key(k if rng.random() < 0.8 else None))
            elif op == 5:                      # a program's lookup, then a write through it
                slot = m.value_slot(k, rng.randrange(nr_cpus))
                if slot is not None:
                    buf, off = slot
                    buf[off:off + 4] = v[:4]
                out.append(slot is not None)
            else:
                out.append(m.keys())
            out.append("ok")
        except MapError as e:
            out.append(e.errno)
    out.append(m.items())
    return out, m


@pytest.mark.parametrize("map_type", HASHES, ids=lambda t: t.name[13:].lower())
@pytest.mark.parametrize("nr_cpus", [1, 3])
def test_native_storage_equals_python_storage(map_type, nr_cpus, native, monkeypatch) -> None:
    got, m = _ops(map_type, nr_cpus, seed=nr_cpus * 7 + map_type)
    assert m.native is not None
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "0")
    want, m2 = _ops(map_type, nr_cpus, seed=nr_cpus * 7 + map_type)
    assert m2.native is None
    assert got == want
    errnos = {abs(x) for x in got if type(x) is int}
    lru = map_type in (T.BPF_MAP_TYPE_LRU_HASH, T.BPF_MAP_TYPE_LRU_PERCPU_HASH)
    assert errnos >= {2, 17, 22} | (set() if lru else {7})   # ENOENT EEXIST EINVAL (E2BIG)


def test_lru_evicts_the_least_recently_used(native) -> None:
    m = create_map(T.BPF_MAP_TYPE_LRU_HASH, 4, 8, 3)
    for k in (1, 2, 3):
        m.update(k, k)
    assert m.value_slot((1).to_bytes(4, "little"), 0) is not None   # a program's use:
    m.update(4, 4)                                # 2 is now the oldest
    assert [int.from_bytes(k, "little") for k in m.keys()] == [3, 1, 4]
    h = create_map(T.BPF_MAP_TYPE_HASH, 4, 8, 3)
    for k in (1, 2, 3):
        h.update(k, k)
    with pytest.raises(MapError) as e:
        h.update(4, 4)
    assert e.value.errno == 7                     # E2BIG
    h.update(1, 9)                                # an existing key keeps its place
    assert [int.from_bytes(k, "little") for k in h.keys()] == [1, 2, 3]


@pytest.mark.parametrize("map_type", HASHES, ids=lambda t: t.name[13:].lower())
@pytest.mark.parametrize("storage", ["c", "python"])
def test_a_dump_of_a_full_map_returns_every_key(map_type, storage, native, monkeypatch) -> None:
    """bpftool's dump: get_next_key, then lookup. A user-space lookup does not use an LRU
    element (htab_lru_map_lookup_elem_sys), so the walk sees every key once."""
    if storage == "python":
        monkeypatch.setenv("KPROBE_EMU_NATIVE", "0")
    m = create_map(map_type, 4, 8, 6, nr_cpus=2)
    assert (m.native is not None) == (storage == "c")
    for k in (5, 3, 9, 1, 7, 2):
        m.update(k, k * 10)
    dumped, key = [], None
    while True:
        try:
            key = m.get_next_key(key)
        except MapError as e:
            assert e.errno == 2                   # ENOENT: the end
            break
        value = m.lookup(key)
        v = value[-1] if isinstance(value, list) else value
        dumped.append((int.from_bytes(key, "little"), int.from_bytes(v, "little")))
        assert len(dumped) <= 6
    assert sorted(dumped) == [(k, k * 10) for k in (1, 2, 3, 5, 7, 9)]
    assert [int.from_bytes(k, "little") for k in m.keys()] == [5, 3, 9, 1, 7, 2]


# (flags, program-side errno on a present key, on an absent key); 0 is success. Every
# flag past BPF_EXIST is -EINVAL: no map here has a bpf_spin_lock (htab_map_update_elem
# refuses BPF_F_LOCK without one, the LRU and per-CPU updates anything past BPF_EXIST).
HASH_FLAGS = [(0, 0, 0), (1, 17, 0), (2, 0, 2), (3, 22, 22), (4, 22, 22), (5, 22, 22),
              (6, 22, 22), (7, 22, 22), (1 << 32, 22, 22)]


@pytest.mark.parametrize("map_type", HASHES, ids=lambda t: t.name[13:].lower())
@pytest.mark.parametrize("storage", ["c", "python"])
def test_update_flags_are_the_kernels(map_type, storage, native, monkeypatch) -> None:
    if storage == "python":
        monkeypatch.setenv("KPROBE_EMU_NATIVE", "0")
    for flags, present, absent in HASH_FLAGS:
        m = create_map(map_type, 4, 8, 4, nr_cpus=2)
        assert (m.native is not None) == (storage == "c")
        m.update(1, 1)
        v = (9).to_bytes(8, "little")
        assert m.update_elem((1).to_bytes(4, "little"), v, flags) == -present, flags
        assert m.update_elem((2).to_bytes(4, "little"), v, flags) == -absent, flags
        try:
            m.update(1, 9, flags)                 # bpf(2): the same answers
            got = 0
        except MapError as e:
            got = e.errno
        assert got == present, flags


def test_array_update_flags_in_array_map_update_elems_order() -> None:
    """arraymap.c: unknown flags, then the index (E2BIG), then NOEXIST (EEXIST), then
    BPF_F_LOCK without a spin lock (EINVAL); bpf(2) refuses BPF_F_LOCK first."""
    m = create_map(T.BPF_MAP_TYPE_ARRAY, 4, 8, 2)
    v = (9).to_bytes(8, "little")
    inside, past = (1).to_bytes(4, "little"), (2).to_bytes(4, "little")
    want = {0: (0, -7), 1: (-17, -7), 2: (0, -7), 3: (-22, -22), 4: (-22, -7),
            5: (-17, -7), 6: (-22, -7), 7: (-22, -22)}
    for flags, (at_inside, at_past) in want.items():
        assert (m.update_elem(inside, v, flags), m.update_elem(past, v, flags)) == \
            (at_inside, at_past), flags
    for flags in (4, 5, 6):
        with pytest.raises(MapError) as e:
            m.update(5, 9, flags)
        assert e.value.errno == 22


def test_short_keys_and_values_never_reach_c(native) -> None:
    """NativeHtab refuses a key or value of the wrong length before C copies key_size /
    value_size bytes from it."""
    m = create_map(T.BPF_MAP_TYPE_HASH, 8, 16, 4)
    n = m.native
    n.update(bytes(8), bytes(16), 0, None)
    assert n.update(b"\1", bytes(16), 0, None) == -22
    assert n.update(bytes(8), b"\1", 0, None) == -22
    assert n.delete(b"\1") == -22 and n.next(b"\1") == -22
    assert n.find(b"\1", True) == -1 and n.view(b"", 0, False) is None
    assert len(n) == 1 and m.keys() == [bytes(8)]


@pytest.mark.parametrize("storage", ["c", "python"])
def test_a_full_lru_map_evicts_before_it_looks_the_key_up(storage, native, monkeypatch) -> None:
    """htab_lru_map_update_elem takes a free element first (prealloc_lru_pop): on a full
    map even an update of a present key, or one its flags then refuse, evicts the least
    recently used element; the per-CPU form takes none for BPF_EXIST."""
    if storage == "python":
        monkeypatch.setenv("KPROBE_EMU_NATIVE", "0")
    keys = lambda m: [int.from_bytes(k, "little") for k in m.keys()]   # noqa: E731
    k = lambda n: n.to_bytes(4, "little")                              # noqa: E731
    v = bytes(8)
    m = create_map(T.BPF_MAP_TYPE_LRU_HASH, 4, 8, 3)
    assert (m.native is not None) == (storage == "c")
    for n in (1, 2, 3):
        m.update(n, n)
    assert m.update_elem(k(3), v, 0) == 0 and keys(m) == [2, 3]          # 1 went
    m.update(4, 4)
    assert m.update_elem(k(4), v, 1) == -17 and keys(m) == [3, 4]        # EEXIST, 2 went
    m.update(5, 5)
    assert m.update_elem(k(3), v, 2) == -2 and keys(m) == [4, 5]         # 3 itself went
    p = create_map(T.BPF_MAP_TYPE_LRU_PERCPU_HASH, 4, 8, 2, nr_cpus=2)
    p.update(1, 1)
    p.update(2, [2, 3])
    nine = (9).to_bytes(8, "little")
    assert p.update_elem(k(1), nine, 2, 0) == 0 and keys(p) == [2, 1]    # EXIST: no pop
    assert p.update_elem(k(1), nine, 0, 1) == 0 and keys(p) == [1]       # ANY: 2 went first
    assert p.lookup(1) == [nine, nine]                                   # 1 kept, in place


def test_a_value_pointer_is_the_preallocated_element(native) -> None:
    m = create_map(T.BPF_MAP_TYPE_HASH, 4, 8, 4)
    m.update(1, 5)
    buf, off = m.value_slot((1).to_bytes(4, "little"), 0)
    buf[off:off + 8] = (77).to_bytes(8, "little")
    assert m.lookup(1) == (77).to_bytes(8, "little")
    again, _ = m.value_slot((1).to_bytes(4, "little"), 0)
    assert again is buf                           # one view per element: one region per run


def test_a_value_view_outlives_its_map(native) -> None:
    """A run's region or a JIT window may hold a value after the map is gone: its bytes
    are Python's buffer, which the view keeps alive (C frees only its index)."""
    import gc

    m = create_map(T.BPF_MAP_TYPE_HASH, 4, 8, 4)
    m.update(1, 5)
    buf, off = m.value_slot((1).to_bytes(4, "little"), 0)
    del m
    gc.collect()
    buf[off:off + 8] = (9).to_bytes(8, "little")
    assert bytes(buf) == (9).to_bytes(8, "little")


def test_no_prealloc_keeps_the_python_storage(native) -> None:
    m = create_map(T.BPF_MAP_TYPE_HASH, 4, 8, 4, map_flags=BPF_F_NO_PREALLOC)
    big = create_map(T.BPF_MAP_TYPE_HASH, 8, 1 << 20, 1 << 10)     # 1 GiB preallocated: no
    assert m.native is None and big.native is None
    m.update(1, 2)
    big.update(1, bytes(1 << 20))
    assert m.items() == [((1).to_bytes(4, "little"), (2).to_bytes(8, "little"))]


# --- programs on probe hits ------------------------------------------------------------------

def hash_mix_prog(arch: str, map_type: T) -> BpfProg:
    """From PARM1, mixed: update (flags ANY/NOEXIST/EXIST/3) or delete key & 31 of a
    16-entry map, then count the helper's return code in rcs[-rc & 31]."""
    seen = create_map(map_type, 4, 8, 16, name="seen", nr_cpus=2)
    rcs = create_map(T.BPF_MAP_TYPE_ARRAY, 4, 8, 32, name="rcs")
    text = f"""
        ldxdw r6, [r1+{parm_offset(arch)}]
        mul r6, 0x5bd1e995
        mov r7, r6
        rsh r7, 7
        and r7, 31
        stxw [r10-4], r7
        stxdw [r10-16], r6
        mov r8, r6
        rsh r8, 13
        and r8, 7
        mov r2, r10
        add r2, -4
        jge r8, 6, delete
        mov r3, r10
        add r3, -16
        mov r4, r8
        and r4, 3
        lddw r1, map_fd(3)
        call 2
        ja record
    delete:
        lddw r1, map_fd(3)
        call 3
    record:
        neg r0
        and r0, 31
        stxw [r10-20], r0
        mov r2, r10
        add r2, -20
        lddw r1, map_fd(4)
        call 1
        jeq r0, 0, +2
        mov r1, 1
        lock add [r0], r1
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="hash_mix", license="GPL", maps={3: seen, 4: rcs})


def helper_value_prog(arch: str, map_type: T, value: str, name: str) -> BpfProg:
    """seen[PARM1 & 7] = the r0 the `value` instructions leave (a helper call)."""
    seen = create_map(map_type, 4, 8, 16, name="seen")
    text = f"""
        ldxdw r6, [r1+{parm_offset(arch)}]
        {value}
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
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name=name, license="GPL", maps={3: seen, 4: create_map(
                                  T.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="rcs")})


def cpu_id_prog(arch: str, map_type: T) -> BpfProg:
    """seen[PARM1 & 7] = bpf_get_smp_processor_id() + 1."""
    return helper_value_prog(arch, map_type, "call 8\n        add r0, 1", "cpu_id")


def prandom_prog(arch: str, map_type: T) -> BpfProg:
    """seen[PARM1 & 7] = bpf_get_prandom_u32()."""
    return helper_value_prog(arch, map_type, "call 7", "prandom")


def _run(arch: str, map_type: T, engine: str, optimized: bool, calls: tuple[int, ...],
         make=hash_mix_prog):
    """hot_leaf probed (optimized: a thunk; else a plain kprobe: a stub) with hash_mix.
    (The calls' host-time limit is far off: the interpreter on a loaded host once took
    more than the default 10 s for 2,500 hits.)"""
    prog = make(arch, map_type)
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    opt = enable_optprobes(lab.kprobes) if optimized else None
    p = Kprobe(symbol_name="hot_leaf",
               post_handler=None if optimized else (lambda *_a: None))
    lab.kprobes.register_kprobe(p)
    if opt is not None:
        opt.kick_kprobe_optimizer()
        assert p.ainsn.optimized, p.ainsn.opt_reason
    call = KprobePerfEvent(lab.machine, "hot_leaf", kp=p)
    p.pre_handler = call.kprobe_perf_func
    assert perf_event_attach_bpf_prog(PerfEvent(call, PerfType.PERF_TYPE_KPROBE,
                                                EventKind.KPROBE), prog) == 0
    install_engine(lab.machine, engine)
    results = [lab.call("hot_call", n, timeout=600) for n in calls]
    m = lab.machine
    state = {"results": results, "seen": prog.maps[3].items(), "rcs": prog.maps[4].items(),
             "hits": p.hits, "cycles": m.clock.cycles,
             "helper_cycles": m.clock.by_reason.get("bpf helper", 0)}
    return state, lab, p


def _served(lab: ProbeLab) -> tuple[int, int]:
    native = bpf_trace_of(lab.machine).runner.jit._native
    return (native.jit.served, native.jit.deferred) if native else (0, 0)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("optimized", [True, False], ids=["optprobe", "kprobe"])
def test_hash_updates_equal_the_python_engine(arch, optimized, native) -> None:
    """The cheap version of test_thousands_of_hits_equal_every_engine (slow tier)."""
    calls = (3, 200)
    want, _lab, _p = _run(arch, T.BPF_MAP_TYPE_HASH, "python", optimized, calls)
    got, lab, p = _run(arch, T.BPF_MAP_TYPE_HASH, "jit", optimized, calls)
    dc = direct_calls_of(lab.machine)
    assert p.addr in (dc.thunks if optimized else dc.stubs)
    for key in ("results", "seen", "rcs", "hits"):
        assert got[key] == want[key], key
    served, _deferred = _served(lab)
    assert served > 150                  # C ran the helper on the thunk's hits
    assert 8 <= len(got["seen"]) <= 16
    rcs = {int.from_bytes(k, "little"): int.from_bytes(v, "little") for k, v in got["rcs"]}
    assert all(rcs[e] for e in (0, 2, 7, 17, 22))   # ok ENOENT E2BIG EEXIST EINVAL


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("map_type", [T.BPF_MAP_TYPE_HASH, T.BPF_MAP_TYPE_LRU_HASH,
                                      T.BPF_MAP_TYPE_PERCPU_HASH, T.BPF_MAP_TYPE_ARRAY],
                         ids=["hash", "lru_hash", "percpu_hash", "array"])
@pytest.mark.parametrize("optimized", [True, False], ids=["optprobe", "kprobe"])
def test_thousands_of_hits_equal_every_engine(arch, map_type, optimized, monkeypatch) -> None:
    """(Also meaningful under KPROBE_EMU_NATIVE=0: the engines on the Python storage.)"""
    calls = (1, 2500, 700)
    got, lab, _p = _run(arch, map_type, "jit", optimized, calls)
    assert _served(lab)[0] > 3000 or bpf_native.load() is None
    for engine in ("python", "interp"):
        want, _l, _p = _run(arch, map_type, engine, optimized, calls)
        for key in ("results", "seen", "rcs", "hits"):
            assert got[key] == want[key], (engine, key)
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "0")
    py, lab0, _p = _run(arch, map_type, "jit", optimized, calls)
    assert _served(lab0) == (0, 0)
    assert py == got                     # maps, order, results and modelled cycles


@pytest.mark.parametrize("arch", ARCHES)
def test_native_helpers_charge_what_python_charges(arch, native, monkeypatch) -> None:
    calls = (2, 300)
    got, lab, _p = _run(arch, T.BPF_MAP_TYPE_HASH, "jit", True, calls)
    assert _served(lab)[0] > 250 and got["helper_cycles"] > 0
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "0")
    want, _lab, _p = _run(arch, T.BPF_MAP_TYPE_HASH, "jit", True, calls)
    assert got == want


@pytest.mark.parametrize("arch", ARCHES)
def test_get_smp_processor_id_in_c_is_pythons(arch, native, monkeypatch) -> None:
    calls = (2, 100)
    got, lab, _p = _run(arch, T.BPF_MAP_TYPE_HASH, "jit", True, calls, cpu_id_prog)
    assert _served(lab)[0] > 190          # both helpers of ~100 hits
    want, _l, _p = _run(arch, T.BPF_MAP_TYPE_HASH, "python", True, calls, cpu_id_prog)
    assert {k: got[k] for k in ("results", "seen", "hits")} == \
        {k: want[k] for k in ("results", "seen", "hits")}
    assert {v for _k, v in got["seen"]} == {(1).to_bytes(8, "little")}
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "0")
    py, _l, _p = _run(arch, T.BPF_MAP_TYPE_HASH, "jit", True, calls, cpu_id_prog)
    assert py == got


def _kretprobe_run(arch: str, engine: str, calls: tuple[int, ...]):
    """hash_mix on a kretprobe of hot_leaf (PARM1 at a return is whatever that register
    holds then: any value will do), its image run from the kretprobe's guest stub."""
    from probes.kretprobes import Kretprobe, kretprobes_of

    prog = hash_mix_prog(arch, T.BPF_MAP_TYPE_HASH)
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    rp = Kretprobe(kp=Kprobe(symbol_name="hot_leaf"), handler=lambda ri, regs: 0)
    kretprobes_of(lab.machine).register_kretprobe(rp)
    call = KprobePerfEvent(lab.machine, "hot_leaf", is_return=True, rp=rp)
    rp.handler = call.kretprobe_perf_func
    assert perf_event_attach_bpf_prog(PerfEvent(call, PerfType.PERF_TYPE_KPROBE,
                                                EventKind.KPROBE), prog) == 0
    install_engine(lab.machine, engine)
    results = [lab.call("hot_call", n, timeout=600) for n in calls]
    return (results, prog.maps[3].items(), prog.maps[4].items()), lab


@pytest.mark.parametrize("arch", ARCHES)
def test_kretprobe_stubs_take_the_c_entry(arch, native) -> None:
    """A kretprobe's programs run from its guest stub (no nested run), so C serves their
    helper calls after the first, with the python engine's maps."""
    got, lab = _kretprobe_run(arch, "jit", (2, 60))
    want, _lab = _kretprobe_run(arch, "python", (2, 60))
    assert got == want
    served, _deferred = _served(lab)
    assert served >= 59


def test_native_random_is_pythons_sequence(native) -> None:
    """get_prandom_u32's generator in C (bn_mt_next) draws random.Random(seed)'s sequence."""
    for seed in (0, 1, 12345, 2**70 + 3):
        py = random.Random(seed)
        c = bpf_native.NativeRandom(bpf_native.load(), random.Random(seed).getstate())
        assert [c.getrandbits(32) for _ in range(1500)] == [py.getrandbits(32) for _ in range(1500)]
        assert [c.getrandbits(k) for k in (1, 7, 33, 64, 100)] == \
            [py.getrandbits(k) for k in (1, 7, 33, 64, 100)]


@pytest.mark.parametrize("arch", ARCHES)
def test_get_prandom_u32_in_c_is_pythons(arch, native, monkeypatch) -> None:
    calls = (2, 100, 30)
    got, lab, _p = _run(arch, T.BPF_MAP_TYPE_HASH, "jit", True, calls, prandom_prog)
    assert _served(lab)[0] > 250
    want, _l, _p = _run(arch, T.BPF_MAP_TYPE_HASH, "python", True, calls, prandom_prog)
    assert {k: got[k] for k in ("results", "seen", "hits")} == \
        {k: want[k] for k in ("results", "seen", "hits")}
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "0")
    py, _l, _p = _run(arch, T.BPF_MAP_TYPE_HASH, "jit", True, calls, prandom_prog)
    assert py == got
