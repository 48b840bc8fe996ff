"""Host-state, output and probe-read helpers called from guest code (issue 17,
probes/bpf/jit_direct.py TRAMPOLINE_HELPERS): a kprobe program that calls
bpf_get_current_pid_tgid, get_current_uid_gid, get_current_comm, probe_read*_str,
trace_printk, perf_event_output (ctx in r1) or ringbuf_output runs from its stub or
optprobe thunk, no nested run after the first hit, and gives what the compiled Python
engine gives: r0, maps, printk lines, records and their order, on both arches and both hit
paths. current is the task and CPU that hit (threads on two CPUs); a faulting probe read
returns -EFAULT with the buffer zeroed; a program whose output would come out in another
order keeps the host path."""
from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import ARCHES, ROOT, firmware_elf, run_emu
from emu.loader import GuestConfig, load_guest
from probes.bench_kinds import parm_offset
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of, direct_eligible, output_order
from probes.bpf.jit_guest import ScratchJit, install_engine
from probes.bpf.libbpf import BpfObject
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.trace.bpf_trace import bpf_trace_of, prog_stats
from test_bpf_jit_direct import _lab as optimized_lab
from test_bpf_jit_kprobe_stub import Lab
from test_bpf_jit_stub_cpus import CALLS, SMP, CpuLab

DATA = ROOT / "tests" / "data"
CLANG = shutil.which("clang")
INCLUDE = {"x86_64": ("-D__TARGET_ARCH_x86", "/usr/include/x86_64-linux-gnu"),
           "arm64": ("-D__TARGET_ARCH_arm64", "/usr/aarch64-linux-gnu/include")}
EFAULT = (1 << 64) - 14


@pytest.fixture(scope="session")
def snoop_obj(tmp_path_factory):
    """snoop.bpf.c built for an arch (clang -target bpf), once a session."""
    out, built = tmp_path_factory.mktemp("bpf-direct-objs"), {}

    def build(arch: str) -> Path:
        if CLANG is None:
            pytest.skip("clang is not installed (apt install clang)")
        if arch not in built:
            define, inc = INCLUDE[arch]
            if not Path(inc, "asm", "ptrace.h").exists():
                pytest.skip(f"no {arch} asm/ptrace.h under {inc}")
            obj = out / f"snoop-{arch}.o"
            subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", define, "-I", inc,
                            "-I", str(DATA / "bpf_trace"), "-c",
                            str(DATA / "bpf_jit_direct" / "snoop.bpf.c"), "-o", str(obj)],
                           check=True, capture_output=True)
            built[arch] = obj
        return built[arch]
    return build


@pytest.fixture
def nested(monkeypatch) -> list[int]:
    """Counts the nested runs (ScratchJit.execute: a host hit running an image)."""
    calls: list[int] = []
    execute = ScratchJit.execute
    monkeypatch.setattr(ScratchJit, "execute",
                        lambda self, *a: calls.append(1) or execute(self, *a))
    return calls


# --- the clang program on the demo firmware's do_sys_open (16 hits) -----------------------

def _snoop(arch: str, obj_path: Path, engine: str):
    out = io.BytesIO()
    m = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=out).machine
    obj = BpfObject.open(obj_path).load(m)
    link = obj.attach(m, "snoop_open")
    got: list[tuple] = []
    obj.ring_buffer(m, "events", lambda data: got.append(("ringbuf", data)))
    obj.perf_buffer(m, "samples", lambda cpu, data: got.append(("perf", cpu, data)))
    trace = bpf_trace_of(m)
    trace.printk_sink = lambda text: got.append(("printk", text))
    install_engine(m, engine)
    assert m.run().exit_code == 0
    maps = {name: sorted(mp.items()) for name, mp in obj.maps.items()
            if name in ("last", ".rodata")}
    return m, link, got, maps, out.getvalue()


@pytest.mark.parametrize("arch", ARCHES)
def test_snoop_runs_from_its_stub_as_the_python_engine(arch, snoop_obj, hit_path, nested) -> None:
    obj = snoop_obj(arch)
    m, link, got, maps, out = _snoop(arch, obj, "jit")
    assert len(nested) == 1                       # the first hit JITs it; 15 from the stub
    dc = direct_calls_of(m)
    assert dc is not None and list(dc.stubs) == [link.call.kp.addr] and dc.refused == {}
    py = _snoop(arch, obj, "python")
    assert (got, maps, out) == py[2:]             # lines and records interleaved as there
    assert prog_stats(link.prog).run_cnt == 16
    kinds = [g[0] for g in got]
    assert kinds == ["printk", "printk", "ringbuf", "perf"] * 16
    first = got[2][1]
    tgid, pid, uid_gid, length, bad, word = struct.unpack_from("<IIQqqQ", first)
    assert (tgid, pid) == (m.task[1], m.task[1]) and uid_gid == 0
    assert (bad, word) == (-14, 0)                # the read of address 16: -EFAULT, zeroed
    name = first[64:96]
    assert name.rstrip(b"\0") == b"/etc/passwd" and length == len(b"/etc/passwd") + 1
    assert got[0] == ("printk", "map /etc/passwd 12")           # %s of a map value
    assert got[1][1].startswith("open /etc/passwd comm demo.elf")  # %s of the stack


def _norm(text: bytes) -> bytes:
    """A printk line's timestamp is the machine clock, which the engines charge
    differently (BPF instructions vs the JITed code)."""
    return re.sub(rb"\d+\.\d{6}: ", b"T: ", text)


@pytest.mark.parametrize("arch", ARCHES)
def test_emu_run_bpf_output_matches_the_python_engine(arch, snoop_obj, nested) -> None:
    obj = snoop_obj(arch)
    runs = {e: run_emu("run", str(firmware_elf(arch, "demo")), "--bpf", f"{obj}:snoop_open",
                       "--bpf-engine", e, "--dump-maps") for e in ("jit", "python")}
    assert runs["jit"].rc == runs["python"].rc == 0
    assert len(nested) == 1
    assert _norm(runs["jit"].stderr) == _norm(runs["python"].stderr)
    assert runs["jit"].stdout == runs["python"].stdout
    lines = runs["jit"].stderr.decode().splitlines()
    assert sum("bpf_trace_printk: open " in ln for ln in lines) == 16
    assert sum(ln.startswith("bpf perf samples cpu 0: ") for ln in lines) == 16


# --- assembled programs on hotloop's hot_leaf(i) ---------------------------------------------

def mix_prog(arch: str) -> BpfProg:
    """pid_tgid and comm on the stack; probe_read_kernel of PARM1 (a small int: -EFAULT)
    and probe_read of the comm into an array map's value; a printk of "%s %lx" (the comm on
    the stack, the pid_tgid)."""
    vals = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 64, 1, name="vals")
    text = f"""
        mov r6, r1
        call 14
        stxdw [r10-8], r0
        mov r1, r10
        add r1, -32
        mov r2, 16
        call 16
        stw [r10-40], 0
        mov r2, r10
        add r2, -40
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +29
        mov r7, r0
        stdw [r7+0], -1
        stdw [r7+8], -1
        mov r1, r7
        mov r2, 16
        ldxdw r3, [r6+{parm_offset(arch)}]
        call 113
        stxdw [r7+16], r0
        mov r1, r7
        add r1, 24
        mov r2, 16
        mov r3, r10
        add r3, -32
        call 4
        stxdw [r7+40], r0
        stb [r10-48], 0x25
        stb [r10-47], 0x73
        stb [r10-46], 0x20
        stb [r10-45], 0x25
        stb [r10-44], 0x6c
        stb [r10-43], 0x78
        stb [r10-42], 0
        mov r1, r10
        add r1, -48
        mov r2, 7
        mov r3, r10
        add r3, -32
        ldxdw r4, [r10-8]
        call 6
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="mix", license="GPL", maps={3: vals})


def _vals(prog: BpfProg) -> bytes:
    return bytes(prog.maps[3].lookup(0))


@pytest.mark.parametrize("arch", ARCHES)
def test_stub_helpers_read_and_write_where_the_program_holds_them(arch, hit_path, nested) -> None:
    jp, pp = mix_prog(arch), mix_prog(arch)
    assert direct_eligible(jp) is None
    jit, py = Lab(arch, jp, "jit"), Lab(arch, pp, "python")
    for n in (2, 9):
        assert jit.run(n) == py.run(n)
    assert len(nested) == 1 and jit.p.addr in jit.stubs
    assert _vals(jp) == _vals(pp)
    assert bpf_trace_of(jit.m).printk_lines == bpf_trace_of(py.m).printk_lines
    v = _vals(jp)
    assert v[:16] == bytes(16)                            # faulted read: zeroed, not -1s
    assert struct.unpack_from("<q", v, 16)[0] == -14      # -EFAULT
    assert v[24:40].rstrip(b"\0") == b"hotloop.elf"       # comm, read off the stack
    assert struct.unpack_from("<q", v, 40)[0] == 0
    lines = bpf_trace_of(jit.m).printk_lines
    assert len(lines) == 11 and lines[-1] == f"hotloop.elf {(1000 << 32) | 1000:x}"


@pytest.mark.parametrize("arch", ARCHES)
def test_optprobe_thunk_calls_the_helpers_in_the_same_run(arch, nested) -> None:
    jp, pp = mix_prog(arch), mix_prog(arch)
    jit, p, _event = optimized_lab(arch, jp)
    py, _pp, _pe = optimized_lab(arch, pp, "python")
    for n in (3, 20):
        assert jit.call("hot_call", n) == py.call("hot_call", n)
    assert p.addr in direct_calls_of(jit.machine).thunks
    assert len(nested) == 1
    assert _vals(jp) == _vals(pp)
    assert bpf_trace_of(jit.machine).printk_lines == bpf_trace_of(py.machine).printk_lines
    assert len(bpf_trace_of(jit.machine).printk_lines) == 23
    assert prog_stats(jp).run_cnt == 23


# --- current on threads and CPUs ------------------------------------------------------------

def task_prog() -> BpfProg:
    """Per thread (slot = tid - tgid): hits, and the last CPU and comm it saw."""
    hits = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 32, 8, name="by_thread")
    text = """
        call 14
        mov r6, r0
        rsh r0, 32
        mov r1, r6
        lsh r1, 32
        rsh r1, 32
        sub r1, r0
        and r1, 7
        stxw [r10-4], r1
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +9
        mov r7, r0
        mov r1, 1
        lock add [r7+0], r1
        call 8
        stxdw [r7+8], r0
        mov r1, r7
        add r1, 16
        mov r2, 16
        call 16
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="by_thread", license="GPL", maps={3: hits})


@pytest.fixture(scope="module")
def percpu(c_prog):
    return lambda arch: c_prog(arch, SMP / "percpu.c", extra=("-pthread",))


def _threads(prog: BpfProg) -> list[tuple[int, int, bytes]]:
    out = []
    for slot in range(8):
        v = bytes(prog.maps[3].lookup(slot))
        n, cpu = struct.unpack_from("<QQ", v)
        if n:
            out.append((n, cpu, v[16:32].rstrip(b"\0")))
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_each_thread_and_cpu_sees_its_own_current(percpu, arch, hit_path, nested) -> None:
    jp, pp = task_prog(), task_prog()
    jit, py = CpuLab(percpu(arch), "jit", jp), CpuLab(percpu(arch), "python", pp)
    assert jit.run() == py.run()
    assert len(nested) <= 2                       # a first hit per CPU at most
    dc = direct_calls_of(jit.m)
    assert dc is not None and {k[2] for k in dc.copies} == {0, 1}
    got = _threads(jp)
    assert got == _threads(pp)
    assert sorted(n for n, _c, _comm in got) == sorted(CALLS)   # a stale pid: one slot
    assert {c for _n, c, _comm in got} == {0, 1}                # and a stale CPU: one CPU


# --- what keeps the host path ---------------------------------------------------------------

def _output_prog(first: int, second: int) -> BpfProg:
    """Two output calls in this order (6 trace_printk, 130 ringbuf_output, 25 perf)."""
    rb = create_map(BpfMapType.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096, name="rb")
    pe = create_map(BpfMapType.BPF_MAP_TYPE_PERF_EVENT_ARRAY, 4, 4, 2, name="pe")
    calls = {
        6: "mov r1, r10\nadd r1, -8\nmov r2, 8\ncall 6",
        130: "lddw r1, map_fd(3)\nmov r2, r10\nadd r2, -8\nmov r3, 8\nmov r4, 0\ncall 130",
        25: "mov r1, r6\nlddw r2, map_fd(4)\nlddw r3, 0xffffffff\nmov r4, r10\nadd r4, -8\n"
            "mov r5, 8\ncall 25",
    }
    text = f"mov r6, r1\nstdw [r10-8], 0x216968\n{calls[first]}\n{calls[second]}\n" \
           "mov r0, 0\nexit"
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="out", license="GPL", maps={3: rb, 4: pe})


@pytest.mark.parametrize("first, second, ok", [(6, 130, True), (130, 25, True), (6, 25, True),
                                               (130, 6, False), (25, 6, False), (25, 130, False)])
def test_output_in_another_order_than_the_host_s_is_refused(first, second, ok) -> None:
    prog = _output_prog(first, second)
    why = direct_eligible(prog)
    assert (why is None) == ok, why
    if not ok:
        assert f"helper call {second} after" in why

def test_the_order_holds_across_the_programs_of_a_hit() -> None:
    """The host path delivers after the whole array: every program's lines first."""
    assert output_order([_output_prog(6, 6), _output_prog(130, 25)]) is None
    assert "helper call 6 after" in (output_order([_output_prog(6, 130), _output_prog(6, 25)])
                                     or "")


@pytest.mark.parametrize("arch", ARCHES)
def test_a_refused_order_runs_nested_and_still_matches(arch, nested) -> None:
    out = {}
    for engine in ("jit", "python"):
        prog = _output_prog(130, 6)
        lab = Lab(arch, prog, engine)
        got: list[tuple] = []
        trace = bpf_trace_of(lab.m)
        trace.ring_buffer(prog.maps[3], lambda data: got.append(("rb", data)))
        trace.printk_sink = lambda text: got.append(("printk", text))
        lab.run(3)
        out[engine] = got
        if engine == "jit":
            assert lab.stubs == {}
            assert "after" in direct_calls_of(lab.m).refused[lab.p.addr]
    assert out["jit"] == out["python"]
    assert out["jit"][:2] == [("printk", "hi!"), ("rb", b"hi!\0\0\0\0\0")]
    assert len(nested) == 3


# --- kretprobe, tracepoint and raw tracepoint stubs; a hash value as the destination -------

@pytest.mark.parametrize("arch", ARCHES)
def test_kretprobe_stub_sends_perf_samples(arch, snoop_obj, hit_path, nested) -> None:
    """snoop_ret: perf_event_output(ctx, &samples, BPF_F_CURRENT_CPU, &rc, 8)."""
    got = {}
    for engine in ("jit", "python"):
        m = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))),
                       stdout=io.BytesIO()).machine
        obj = BpfObject.open(snoop_obj(arch)).load(m)
        obj.attach(m, "snoop_ret")
        samples: list = []
        obj.perf_buffer(m, "samples", lambda cpu, data: samples.append((cpu, data)))
        install_engine(m, engine)
        assert m.run().exit_code == 0
        got[engine] = samples
        if engine == "jit" and hit_path == "native":    # (Python's trampoline: no stub
            assert direct_calls_of(m).stubs_of("kretprobe") and len(nested) == 1   # on x86)
    assert got["jit"] == got["python"] and len(got["jit"]) == 16
    rets = [struct.unpack("<q", data)[0] for _cpu, data in got["jit"]]
    assert -2 in rets and 3 in rets                # -ENOENT, fd 3 (the demo's opens)


def tp_prog(kind: str) -> BpfProg:
    """pid_tgid and comm on the stack, a printk of "%s %d" (comm, the context's second
    word: tp_work's v), and the pid_tgid out to a ring buffer."""
    from test_bpf_jit_stub_tracepoint import TYPE, V_OFF
    rb = create_map(BpfMapType.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096, name="rb")
    text = f"""
        ldxdw r6, [r1+{V_OFF[kind]}]
        call 14
        stxdw [r10-8], r0
        mov r1, r10
        add r1, -24
        mov r2, 16
        call 16
        stw [r10-32], 0x25207325
        stw [r10-28], 0x0064
        mov r1, r10
        add r1, -32
        mov r2, 6
        mov r3, r10
        add r3, -24
        mov r4, r6
        call 6
        lddw r1, map_fd(3)
        mov r2, r10
        add r2, -8
        mov r3, 8
        mov r4, 0
        call 130
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=TYPE[kind], name=f"tp_{kind}",
                              license="GPL", maps={3: rb})


@pytest.mark.parametrize("kind", ["tp", "raw_tp"])
@pytest.mark.parametrize("arch", ARCHES)
def test_tracepoint_stub_helpers_match_the_python_engine(arch, kind, hit_path, nested) -> None:
    from test_bpf_jit_stub_tracepoint import TpLab
    got = {}
    for engine in ("jit", "python"):
        prog = tp_prog(kind)
        lab = TpLab(arch, kind, prog, engine, 12)
        out: list = []
        trace = bpf_trace_of(lab.m)
        trace.printk_sink = lambda text: out.append(text)
        trace.ring_buffer(prog.maps[3], lambda data: out.append(data))
        got[engine] = (lab.run(), out)
        if engine == "jit" and kind == "raw_tp":
            assert lab.stubs(kind) and len(nested) == 1
        elif engine == "jit":       # the host path writes a tracepoint event's output
            assert not lab.stubs(kind)      # before its record: a stub would write it after
            assert any("output on a tracepoint event" in why
                       for why in direct_calls_of(lab.m).refused.values())
    assert got["jit"] == got["python"]
    lines = got["jit"][1]
    assert len(lines) == 24 and lines[0].startswith("tpdemo.elf ")
    assert isinstance(lines[1], bytes) and len(lines[1]) == 8


def hash_dst_prog(arch: str) -> BpfProg:
    """A C-held hash map's value (guest-mapped pages) as probe_read's and comm's buffer."""
    seen = create_map(BpfMapType.BPF_MAP_TYPE_HASH, 4, 32, 4, name="seen")
    text = f"""
        mov r6, r1
        stw [r10-4], 7
        stdw [r10-40], 0
        stdw [r10-32], 0
        stdw [r10-24], 0
        stdw [r10-16], 0
        mov r2, r10
        add r2, -4
        mov r3, r10
        add r3, -40
        mov r4, 0
        lddw r1, map_fd(3)
        call 2
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +9
        mov r7, r0
        mov r1, r7
        mov r2, 16
        call 16
        mov r1, r7
        add r1, 16
        mov r2, 16
        ldxdw r3, [r6+{parm_offset(arch)}]
        call 112
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="hash_dst", license="GPL", maps={3: seen})


@pytest.mark.parametrize("arch", ARCHES)
def test_a_hash_value_in_c_pages_is_a_helper_buffer(arch, nested) -> None:
    from conftest import _native_off
    if _native_off():
        pytest.skip("the C hit path is off: hash values are not guest-mapped")
    jp, pp = hash_dst_prog(arch), hash_dst_prog(arch)
    jp.ensure_loaded()                       # (the verifier's context record)
    assert direct_eligible(jp) is None
    jit, py = Lab(arch, jp, "jit"), Lab(arch, pp, "python")
    for n in (2, 5):
        assert jit.run(n) == py.run(n)
    assert jit.p.addr in jit.stubs and len(nested) == 1
    key = (7).to_bytes(4, "little")
    assert bytes(jp.maps[3].lookup(key)) == bytes(pp.maps[3].lookup(key))
    value = bytes(jp.maps[3].lookup(key))
    assert value[:16].rstrip(b"\0") == b"hotloop.elf" and value[16:] == bytes(16)   # -EFAULT


# --- get_func_ip and get_attach_cookie --------------------------------------------------------

def site_prog() -> BpfProg:
    """vals[0] = {bpf_get_func_ip(ctx), bpf_get_attach_cookie(ctx)}."""
    vals = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 16, 1, name="site")
    text = """
        mov r6, r1
        call 173
        mov r7, r0
        mov r1, r6
        call 174
        mov r8, r0
        stw [r10-4], 0
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +2
        stxdw [r0+0], r7
        stxdw [r0+8], r8
        mov r0, 0
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="site", license="GPL", maps={3: vals})


def _site_lab(arch: str, prog: BpfProg, engine: str, funcs: tuple[str, ...],
              optimized: bool = False):
    from probes.kprobes import Kprobe
    from probes.testing import ProbeLab
    from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType,
                                        perf_event_attach_bpf_prog)
    from probes.bpf.libbpf import KprobePerfEvent
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    if optimized:
        from probes.optprobes import enable_optprobes
        enable_optprobes(lab.kprobes)
    probes = []
    for n, func in enumerate(funcs):
        p = Kprobe(symbol_name=func)
        lab.kprobes.register_kprobe(p)
        call = KprobePerfEvent(lab.machine, func, kp=p)
        p.pre_handler = call.kprobe_perf_func
        event = PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE)
        assert perf_event_attach_bpf_prog(event, prog, bpf_cookie=0xC00C1E + n) == 0
        probes.append(p)
    if optimized:
        lab.kprobes.optimizer.kick_kprobe_optimizer()
    install_engine(lab.machine, engine)
    return lab, probes


@pytest.mark.parametrize("optimized", [False, True])
@pytest.mark.parametrize("arch", ARCHES)
def test_func_ip_and_cookie_of_the_event(arch, optimized, nested) -> None:
    got = {}
    for engine in ("jit", "python"):
        prog = site_prog()
        lab, (p,) = _site_lab(arch, prog, engine, ("hot_leaf",), optimized)
        for n in (2, 6):
            lab.call("hot_call", n)
        got[engine] = bytes(prog.maps[3].lookup(0))
        if engine == "jit":
            dc = direct_calls_of(lab.machine)
            assert p.addr in (dc.thunks if optimized else dc.stubs) and len(nested) == 1
    assert got["jit"] == got["python"]
    assert struct.unpack("<QQ", got["jit"]) == (p.addr, 0xC00C1E)


@pytest.mark.parametrize("arch", ARCHES)
def test_func_ip_for_a_second_event_keeps_the_host_path(arch) -> None:
    got = {}
    for engine in ("jit", "python"):
        prog = site_prog()
        lab, (leaf, caller) = _site_lab(arch, prog, engine, ("hot_leaf", "hot_call"))
        seen = []
        for n in (3, 4):
            lab.call("hot_call", n)
            seen.append(struct.unpack("<QQ", bytes(prog.maps[3].lookup(0))))
        got[engine] = seen
        if engine == "jit":
            dc = direct_calls_of(lab.machine)
            assert leaf.addr in dc.stubs and caller.addr not in dc.stubs
            assert "second event" in dc.refused[caller.addr]
    assert got["jit"] == got["python"]
    assert got["jit"][-1] == (got["jit"][-1][0], 0xC00C1E)       # the last hit: hot_leaf's


@pytest.mark.parametrize("arch", ARCHES)
def test_emu_trace_printk_lines_keep_their_place_among_kprobe_events(arch, snoop_obj,
                                                                    nested) -> None:
    """`emu trace --bpf`: the program's printk lines are trace events; from its stub they
    land between the kprobe events of getname (before the hit) and build_open_flags
    (after), as on the host path."""
    runs = {}
    for engine in ("jit", "python"):
        r = run_emu("trace", "--bpf", f"{snoop_obj(arch)}:snoop_open", "--bpf-engine", engine,
                    "--event", "p:t/getname getname", "--event", "p:t/bof build_open_flags",
                    str(firmware_elf(arch, "demo")))
        assert r.rc == 0, r.err
        runs[engine] = [ln for ln in _norm(r.stdout).decode().splitlines()
                        if "bpf_trace_printk" in ln or ": (" in ln]
    assert runs["jit"] == runs["python"] and len(nested) == 1     # one JIT run: the first
    kinds = ["printk" if "bpf_trace_printk" in ln else ln.split(":")[-2].split()[-1]
             for ln in runs["jit"]]
    assert kinds[:4] == ["printk", "printk", "bof", "getname"], runs["jit"][:4]
