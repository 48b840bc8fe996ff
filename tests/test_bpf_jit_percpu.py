"""Per-CPU array maps on the direct path (issue 17): a lookup in a BPF_MAP_TYPE_PERCPU_ARRAY
is inlined as the kernel's percpu_array_map_gen_lookup (array_map_gen_lookup on CPU 0's
copy, then BPF_MOV64_PERCPU_REG: plus the running CPU's offset, a this-CPU word the JIT
rewrites at every CPU switch), so a stub or thunk runs such a program with no nested run.
Every CPU's values are in guest windows the BPF layer owns; user space reads and writes
them between hits (one value per CPU, as the kernel's per-CPU lookup returns them). Maps,
counts and the guest's output equal the compiled Python engine's (and the interpreter's),
on one CPU and on two, on both hit paths. The threaded guest is tests/data/smp/percpu.c:
thread i calls work() 300 + 100 i times, threads placed on CPUs round robin."""
from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import ARCHES, ROOT, _native_off, firmware_elf, run_emu
from emu.loader import GuestConfig, load_guest
from probes.bench_kinds import parm_offset
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of, direct_eligible
from probes.bpf.jit_guest import PCPU_KEYS, ProbeJit, ScratchJit, install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe, kprobes_of
from probes.optprobes import enable_optprobes
from probes.testing import ProbeLab
from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog,
                                    prog_stats)

SMP = ROOT / "tests" / "data" / "smp"
CALLS = [300, 400, 500]                 # three threads: CPU 1, CPU 0, CPU 1 on two CPUs
PER_CPU = [400, 800]


def percpu_counter(arch: str, nr_cpus: int, keys: int = 4, callee: bool = False,
                   cpu_hash: bool = False) -> BpfProg:
    """counts[PARM2 % keys] += 1 and sums[PARM2 % keys] += PARM2 on this CPU's copy of a
    per-CPU array (`maps[3]`), plus (cpu_hash) the same count in a per-CPU hash (`maps[4]`)
    keyed by bpf_get_smp_processor_id(). `callee`: the lookup is in a bpf-to-bpf callee."""
    counts = create_map(BpfMapType.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, keys, name="pcpu",
                        nr_cpus=nr_cpus)
    maps = {3: counts}
    lookup = ["stxw [r10-4], r1", "mov r2, r10", "add r2, -4", "lddw r1, map_fd(3)", "call 1"]
    body = [f"ldxdw r6, [r1+{parm_offset(arch, 2)}]", "mov r7, r6", f"mod r6, {keys}",
            "mov r1, r6"]
    body += ["call local callee"] if callee else lookup
    body += ["jeq r0, 0, +3", "mov r1, 1", "lock add [r0], r1", "lock add [r0+8], r7"]
    if cpu_hash:
        maps[4] = create_map(BpfMapType.BPF_MAP_TYPE_PERCPU_HASH, 4, 8, 8, name="pcpu_hash",
                             nr_cpus=nr_cpus)
        body += ["call 8", "stxw [r10-8], r0", "mov r2, r10", "add r2, -8",
                 "lddw r1, map_fd(4)", "call 1", "jne r0, 0, +10",
                 "stdw [r10-16], 1", "mov r2, r10", "add r2, -8", "mov r3, r10", "add r3, -16",
                 "mov r4, 0", "lddw r1, map_fd(4)", "call 2", "ja +2",
                 "mov r1, 1", "lock add [r0], r1"]
    body += ["mov r0, 0", "exit"]
    if callee:                          # the callee after the main function's exit
        body += ["callee:", *lookup, "exit"]
    return BpfProg.from_bytes(assemble("\n".join(body)), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="pcpu_count", license="GPL", maps=maps)


def _values(prog: BpfProg, fd: int = 3) -> list[list[tuple[int, int]]]:
    """Per key, per CPU: (count, sum) of the per-CPU array."""
    mp = prog.maps[fd]
    return [[struct.unpack("<QQ", v) for v in mp.lookup(k)] for k in range(mp.max_entries)]


@pytest.fixture(scope="module")
def percpu(c_prog):
    return lambda arch: c_prog(arch, SMP / "percpu.c", extra=("-pthread",))


class CpuLab:
    """The threaded guest on ``cpus`` CPUs with ``prog`` on a kprobe (or an optimized
    one) at work()."""

    def __init__(self, exe, engine: str, prog: BpfProg, cpus: int = 2,
                 optimize: bool = False) -> None:
        self.out = io.BytesIO()
        self.m = load_guest(GuestConfig(path=str(exe), argv=["3"], cpus=cpus, seed=3),
                            stdout=self.out).machine
        kp = kprobes_of(self.m)
        opt = enable_optprobes(kp) if optimize else None
        self.p = Kprobe(symbol_name="work")
        kp.register_kprobe(self.p)
        if opt is not None:
            opt.kick_kprobe_optimizer()
            assert self.p.ainsn.optimized, self.p.ainsn.opt_reason
        self.call = KprobePerfEvent(self.m, "work", kp=self.p)
        self.p.pre_handler = self.call.kprobe_perf_func
        assert perf_event_attach_bpf_prog(
            PerfEvent(self.call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog) == 0
        install_engine(self.m, engine)

    def run(self) -> bytes:
        assert self.m.run().exit_code == 0
        return self.out.getvalue()


def _expected(cpus: int, keys: int = 4) -> list[list[tuple[int, int]]]:
    """work(id, i) for thread id, i < 300 + 100 id, on CPU (id + 1) % cpus... as the
    scheduler placed them: worked out from the calls, not from a run."""
    place = {1: [0, 0, 0], 2: [1, 0, 1]}[cpus]
    out = [[(0, 0)] * cpus for _ in range(keys)]
    for tid, n in enumerate(CALLS):
        for i in range(n):
            c, s = out[i % keys][place[tid]]
            out[i % keys][place[tid]] = (c + 1, s + i)
    return out


@pytest.mark.parametrize("cpus", [1, 2])
@pytest.mark.parametrize("arch", ARCHES)
def test_percpu_counter_runs_in_the_guest_as_the_python_engine(percpu, arch, cpus,
                                                               hit_path, monkeypatch) -> None:
    jp, pp = percpu_counter(arch, cpus), percpu_counter(arch, cpus)
    nested: list[int] = []
    jit = CpuLab(percpu(arch), "jit", jp, cpus)
    execute = ScratchJit.execute
    monkeypatch.setattr(ScratchJit, "execute",
                        lambda self, *a: nested.append(1) or execute(self, *a))
    out = jit.run()
    monkeypatch.setattr(ScratchJit, "execute", execute)
    py = CpuLab(percpu(arch), "python", pp, cpus)
    assert out == py.run()
    assert _values(jp) == _values(pp) == _expected(cpus)
    assert direct_eligible(jp) is None
    dc = direct_calls_of(jit.m)
    assert dc is not None and dc.refused == {}
    assert sorted(k[2] for k in dc.copies) == list(range(cpus))
    # one nested run per CPU: its first hit JITs (CPU 0) or builds its stub from the host
    # path's run (the others), then every hit runs from the stub
    assert len(nested) <= cpus
    assert ("helper", 1) not in jit.m.layers["bpf_probe_jit"].jit.stubs    # inlined
    assert jit.p.hits == py.p.hits == sum(CALLS)
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == sum(CALLS)


@pytest.mark.parametrize("arch", ARCHES)
def test_percpu_counter_from_an_optprobe_thunk(percpu, arch) -> None:
    """One thunk for both CPUs: each hit adds to the running CPU's copy."""
    jp, pp = percpu_counter(arch, 2), percpu_counter(arch, 2)
    jit = CpuLab(percpu(arch), "jit", jp, 2, optimize=True)
    py = CpuLab(percpu(arch), "python", pp, 2, optimize=True)
    assert jit.run() == py.run()
    assert _values(jp) == _values(pp) == _expected(2)
    dc = direct_calls_of(jit.m)
    assert dc is not None and list(dc.thunks) == [jit.p.addr]


@pytest.mark.parametrize("arch", ARCHES)
def test_percpu_hash_and_cpu_id_on_two_cpus(percpu, arch) -> None:
    """A per-CPU hash keyed by bpf_get_smp_processor_id beside the array: each CPU's
    value under its own key (C's BN_THIS_CPU on the native path; the suite's
    KPROBE_EMU_NATIVE=0 run takes the Python one)."""
    hit_path = "python" if _native_off() else "native"
    jp, pp = (percpu_counter(arch, 2, cpu_hash=True) for _ in range(2))
    jit, py = CpuLab(percpu(arch), "jit", jp, 2), CpuLab(percpu(arch), "python", pp, 2)
    assert jit.run() == py.run()
    assert _values(jp) == _values(pp) == _expected(2)
    jh, ph = sorted(jp.maps[4].items()), sorted(pp.maps[4].items())
    assert jh == ph
    zero = (0).to_bytes(8, "little")
    assert jh == [((0).to_bytes(4, "little"), [PER_CPU[0].to_bytes(8, "little"), zero]),
                  ((1).to_bytes(4, "little"), [zero, PER_CPU[1].to_bytes(8, "little")])]
    dc = direct_calls_of(jit.m)
    assert dc is not None
    if hit_path == "native":            # (without C the hash keeps Python storage: nested runs)
        assert dc.refused == {} and len(dc.copies) == 2


@pytest.mark.parametrize("arch", ARCHES)
def test_percpu_lookup_in_a_bpf_to_bpf_callee(percpu, arch) -> None:
    jp, pp = percpu_counter(arch, 2, callee=True), percpu_counter(arch, 2, callee=True)
    jit, py = CpuLab(percpu(arch), "jit", jp, 2), CpuLab(percpu(arch), "python", pp, 2)
    assert jit.run() == py.run()
    assert _values(jp) == _values(pp) == _expected(2)
    dc = direct_calls_of(jit.m)
    assert dc is not None and dc.refused == {} and len(dc.copies) == 2


@pytest.mark.parametrize("arch", ARCHES)
def test_a_map_with_fewer_cpus_than_the_machine(percpu, arch) -> None:
    """A per-CPU array made for one CPU on a machine of two (only through the Python API:
    the loader gives maps the machine's CPUs): not inlined, the helper answers from the
    same windows and gives NULL on CPU 1, as the python engine does."""
    jp, pp = percpu_counter(arch, 1), percpu_counter(arch, 1)
    jit, py = CpuLab(percpu(arch), "jit", jp, 2), CpuLab(percpu(arch), "python", pp, 2)
    assert jit.run() == py.run()
    expected = [[cpus[0]] for cpus in _expected(2)]
    assert _values(jp) == _values(pp) == expected
    assert ("helper", 1) in jit.m.layers["bpf_probe_jit"].jit.stubs


def _tail_caller(arch: str) -> tuple[BpfProg, BpfProg]:
    """A program that tail-calls the per-CPU counter (slot 0 of its prog array): the callee's
    image inlines the lookup too, and runs from the stub."""
    callee = percpu_counter(arch, 2)
    jt = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, name="jt")
    jt.update(0, callee)
    text = "lddw r2, map_fd(5)\nmov r3, 0\ncall 12\nmov r0, 1\nexit"
    caller = BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                                name="pcpu_tail", license="GPL", maps={5: jt})
    return caller, callee


@pytest.mark.parametrize("arch", ARCHES)
def test_percpu_lookup_in_a_tail_called_program(percpu, arch) -> None:
    (jc, jcallee), (pc, pcallee) = _tail_caller(arch), _tail_caller(arch)
    jit, py = CpuLab(percpu(arch), "jit", jc, 2), CpuLab(percpu(arch), "python", pc, 2)
    assert jit.run() == py.run()
    assert _values(jcallee) == _values(pcallee) == _expected(2)
    dc = direct_calls_of(jit.m)
    assert dc is not None and dc.refused == {} and dc.stubs        # no nested run
    assert ("helper", 1) not in jit.m.layers["bpf_probe_jit"].jit.stubs    # inlined there too


def test_a_cpu_switch_rewrites_this_cpu_off(percpu) -> None:
    jp = percpu_counter("x86_64", 2)
    lab = CpuLab(percpu("x86_64"), "jit", jp, 2)
    lab.run()
    jit = lab.m.layers["bpf_probe_jit"].jit
    for cpu in (1, 0, 1):
        lab.m.set_cpu(cpu)
        got = int.from_bytes(lab.m.memory.read(jit.percpu_off_addr, 8), "little")
        assert got == (cpu * PCPU_KEYS) << 32


# -- user space between hits (one CPU: the firmware's hot loop, called from the host) --

def _hot_lab(arch: str, prog: BpfProg, engine: str, optimize: bool) -> ProbeLab:
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    opt = enable_optprobes(lab.kprobes) if optimize else None
    p = Kprobe(symbol_name="hot_leaf")
    if not optimize:
        p.post_handler = lambda *_a: None
    lab.kprobes.register_kprobe(p)
    if opt is not None:
        opt.kick_kprobe_optimizer()
    call = KprobePerfEvent(lab.machine, "hot_leaf", kp=p)
    p.pre_handler = call.kprobe_perf_func
    assert perf_event_attach_bpf_prog(
        PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog) == 0
    install_engine(lab.machine, engine)
    return lab


def _hot_counter(arch: str) -> BpfProg:
    """counts[PARM1 % 4] += 1 on a per-CPU array (the machine has one CPU)."""
    counts = create_map(BpfMapType.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 4, name="pcpu", nr_cpus=1)
    text = "\n".join([f"ldxdw r6, [r1+{parm_offset(arch, 1)}]", "mod r6, 4", "stxw [r10-4], r6",
                      "mov r2, r10", "add r2, -4", "lddw r1, map_fd(3)", "call 1",
                      "jeq r0, 0, +2", "mov r1, 1", "lock add [r0], r1", "mov r0, 0", "exit"])
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="pcpu_hot", license="GPL", maps={3: counts})


def _counts(prog: BpfProg) -> list[int]:
    return [int.from_bytes(prog.maps[3].lookup(k)[0], "little") for k in range(4)]


@pytest.mark.parametrize("optimize", [True, False], ids=["optprobe", "kprobe"])
@pytest.mark.parametrize("arch", ARCHES)
def test_user_space_reads_and_writes_between_hits(arch, optimize, hit_path) -> None:
    labs = {e: (_hot_counter(arch),) for e in ("jit", "python")}
    got = {}
    for engine, (prog,) in labs.items():
        lab = _hot_lab(arch, prog, engine, optimize)
        seen = []
        for calls in (3, 40, 17):
            lab.call("hot_call", calls)
            seen.append(_counts(prog))
            mp = prog.maps[3]
            mp.update(1, (1000).to_bytes(8, "little"))             # every CPU's value
            mp.update(2, [(7).to_bytes(8, "little")])              # one value per CPU
            seen.append(_counts(prog))
        got[engine] = seen
        if engine == "jit":
            dc = direct_calls_of(lab.machine)
            assert dc is not None and dc.refused == {}
    assert got["jit"] == got["python"]
    assert got["jit"][-1][1] == 1000 and got["jit"][-1][2] == 7


# -- a clang object through the CLI: `emu run --cpus 2 --bpf OBJ --dump-maps` --

CLANG = shutil.which("clang")
BPF_TARGET = {"x86_64": ("-D__TARGET_ARCH_x86", "/usr/include/x86_64-linux-gnu"),
              "arm64": ("-D__TARGET_ARCH_arm64", "/usr/aarch64-linux-gnu/include")}


def _bpf_obj(arch: str, out: Path) -> Path:
    if CLANG is None:
        pytest.skip("clang is not installed (apt install clang)")
    define, inc = BPF_TARGET[arch]
    if not Path(inc, "asm", "ptrace.h").exists():
        pytest.skip(f"no {arch} asm/ptrace.h under {inc}")
    obj = out / f"count-{arch}.o"
    subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", define, "-I", inc, "-c",
                    str(ROOT / "tests" / "data" / "bpf_jit_percpu" / "count.bpf.c"),
                    "-o", str(obj)], check=True, capture_output=True)
    return obj


def _dumped(out: str) -> dict[str, list]:
    """The --dump-maps line (on stderr): map name -> [(key, [per-CPU value ints])]."""
    dump = json.loads(next(line for line in out.splitlines() if line.startswith('[{"name"')))
    return {m["name"]: [(int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little"),
                         [int.from_bytes(bytes(int(b, 16) for b in v["value"]), "little")
                          for v in e["values"]]) for e in m["elements"]] for m in dump}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_a_clang_object_on_two_cpus_through_the_cli(percpu, arch, tmp_path, monkeypatch) -> None:
    """The clang-built counter (two per-CPU arrays and a per-CPU hash keyed by the CPU id)
    from `emu run --cpus 2`: the JIT's map dump and the guest's output equal the compiled
    Python engine's, and the counts are the calls each CPU made. On the native hit path
    every hit after each CPU's first runs from that CPU's stub (no program refused)."""
    obj, exe = _bpf_obj(arch, tmp_path), percpu(arch)
    made: list[ProbeJit] = []           # the CLI's machine, reached through its JIT
    init = ProbeJit.__init__
    monkeypatch.setattr(ProbeJit, "__init__", lambda self, m: made.append(self) or init(self, m))
    runs = {e: run_emu("run", "--cpus", "2", "--seed", "3", "--bpf", str(obj), "--bpf-engine", e,
                       "--dump-maps", str(exe), "--", "3") for e in ("jit", "python")}
    assert len(made) == 1
    dc = direct_calls_of(made[0].machine)
    assert dc is not None
    if not _native_off():               # (without C the per-CPU hash keeps Python storage)
        assert dc.refused == {} and sorted(k[2] for k in dc.copies) == [0, 1]
    assert runs["jit"].rc == runs["python"].rc == 0, runs["jit"].err
    assert runs["jit"].out == runs["python"].out           # the guest's output
    maps = _dumped(runs["jit"].err)                        # the dump goes with the table
    assert maps == _dumped(runs["python"].err)
    place = [1, 0, 1]                   # thread -> CPU (the guest prints it)
    assert "thread 0 cpu 1 1" in runs["jit"].out and "thread 1 cpu 0 0" in runs["jit"].out
    want = [[0, 0] for _ in range(4)]
    for tid, n in enumerate(CALLS):
        for i in range(n):
            want[i % 4][place[tid]] += 1
    # a value is (count, sum of i) as one 16-byte integer: the count is its low half
    assert [[v & (2**64 - 1) for v in vals] for _k, vals in maps["counts"]] == want
    assert sorted(maps["by_cpu"]) == [(0, [PER_CPU[0], 0]), (1, [0, PER_CPU[1]])]
    assert maps["scratch"] == [(0, [CALLS[1] - 1, CALLS[2] - 1])]   # each CPU's last i


@pytest.mark.parametrize("arch", ARCHES)
def test_switching_engines_keeps_the_counts(arch) -> None:
    """jit -> python -> jit with a user update between: the python engine's counts are
    not overwritten by the JIT's windows, and the JIT goes on from them."""
    got = []
    for first in ("jit", "python"):
        prog = _hot_counter(arch)
        lab = _hot_lab(arch, prog, first, True)
        lab.call("hot_call", 10)
        install_engine(lab.machine, "python")
        lab.call("hot_call", 10)
        seen = [_counts(prog)]
        prog.maps[3].update(0, (100).to_bytes(8, "little"))
        install_engine(lab.machine, "jit")
        for _ in range(2):
            lab.call("hot_call", 10)
            seen.append(_counts(prog))
        got.append(seen)
    assert got[0] == got[1] == [[6, 6, 4, 4], [103, 9, 6, 6], [106, 12, 8, 8]]


def percpu_updater(arch: str) -> BpfProg:
    """last[PARM2 % 4] = PARM2 through bpf_map_update_elem on a per-CPU array of two CPUs
    (the running CPU's value, array_map_update_elem's this_cpu_ptr): the helper behind the
    trampoline, on the CPU that hit."""
    last = create_map(BpfMapType.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 4, name="last", nr_cpus=2)
    text = "\n".join([f"ldxdw r6, [r1+{parm_offset(arch, 2)}]", "stxdw [r10-16], r6",
                      "mod r6, 4", "stxw [r10-4], r6", "mov r2, r10", "add r2, -4",
                      "mov r3, r10", "add r3, -16", "mov r4, 0", "lddw r1, map_fd(3)",
                      "call 2", "mov r0, 0", "exit"])
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="pcpu_update", license="GPL", maps={3: last})


@pytest.mark.parametrize("arch", ARCHES)
def test_percpu_update_from_a_stub_writes_the_running_cpus_value(percpu, arch) -> None:
    jp, pp = percpu_updater(arch), percpu_updater(arch)
    jit, py = CpuLab(percpu(arch), "jit", jp, 2), CpuLab(percpu(arch), "python", pp, 2)
    assert jit.run() == py.run()
    got = [[int.from_bytes(v, "little") for v in jp.maps[3].lookup(k)] for k in range(4)]
    assert got == [[int.from_bytes(v, "little") for v in pp.maps[3].lookup(k)] for k in range(4)]
    # CPU 0 ran thread 1 (i < 400), CPU 1 threads 0 and 2 (the last, i < 500, ends there)
    assert got == [[396, 496], [397, 497], [398, 498], [399, 499]]
    dc = direct_calls_of(jit.m)
    assert dc is not None and dc.refused == {} and len(dc.copies) == 2
