"""bpf_prog_array, perf_event_{attach,detach,query}_bpf_prog and trace_call_bpf with the
kernel's rules (kernel/trace/bpf_trace.c), the pt_regs layouts, and the verifier's
context bounds for kprobe programs. Programs are assembled; the recording decision and
the recursion guard are checked on real probe hits of the firmware on both arches."""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import pytest

from emu.loader import GuestConfig, load_guest
from probes import bpf
from probes.bpf import BpfProgType, VerifierError
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe, kprobes_of
from probes.trace.bpf_trace import (
    BPF_TRACE_MAX_PROGS, BpfProgArray, EventKind, PerfEvent, PerfEventQueryBpf, PerfType,
    arch_ptrace, bpf_prog_array_copy, bpf_trace_of, perf_event_attach_bpf_prog,
    perf_event_detach_bpf_prog, perf_event_query_prog_array, prog_stats, trace_call_bpf,
)

from conftest import ARCHES, firmware_elf

KPROBE = BpfProgType.BPF_PROG_TYPE_KPROBE


@dataclass(eq=False)
class Call:
    """A trace event call as the trace layer has one: just the prog_array."""
    prog_array: BpfProgArray | None = None


def prog(asm: str, ptype: BpfProgType = KPROBE, name: str = "p", ctx_size: int | None = None,
         license: str = "GPL") -> BpfProg:
    return BpfProg.from_bytes(bpf.assemble(asm), prog_type=ptype, name=name, license=license,
                              ctx_size=ctx_size)


def ret(n: int, name: str = "p") -> BpfProg:
    return prog(f"lddw r0, {n:#x}\nexit" if n >> 31 else f"mov r0, {n}\nexit", name=name)


def event(call, kind=EventKind.KPROBE, attr=PerfType.PERF_TYPE_TRACEPOINT, **kw) -> PerfEvent:
    return PerfEvent(call, attr, kind, **kw)


# --- attach / detach ----------------------------------------------------------------------

def test_attach_appends_copy_on_update() -> None:
    call = Call()
    a, b = ret(1, "a"), ret(1, "b")
    assert perf_event_attach_bpf_prog(event(call), a) == 0
    first = call.prog_array
    assert perf_event_attach_bpf_prog(event(call), b, bpf_cookie=7) == 0
    assert first.progs() == [a]                       # the old array is never changed
    assert call.prog_array.progs() == [a, b] and call.prog_array.items[1].bpf_cookie == 7


def test_attach_rules() -> None:
    call = Call()
    a = ret(1, "a")
    ev = event(call)
    assert perf_event_attach_bpf_prog(ev, a) == 0
    assert perf_event_attach_bpf_prog(ev, ret(1)) == -errno.EEXIST          # event has one
    assert perf_event_attach_bpf_prog(event(call), a) == -errno.EEXIST      # same prog again
    tp = prog("mov r0, 1\nexit", BpfProgType.BPF_PROG_TYPE_TRACEPOINT)
    assert perf_event_attach_bpf_prog(event(call), tp) == -errno.EINVAL     # not KPROBE
    assert perf_event_attach_bpf_prog(event(Call(), EventKind.TRACEPOINT), a) == -errno.EINVAL
    assert perf_event_attach_bpf_prog(event(Call(), EventKind.OTHER), a) == -errno.EINVAL


def test_override_programs_need_an_injectable_function_entry() -> None:
    ov = prog("mov r2, 0\ncall 58\nmov r0, 0\nexit", name="ov")
    assert perf_event_attach_bpf_prog(event(Call()), ov) == -errno.EINVAL
    assert perf_event_attach_bpf_prog(event(Call(), func_entry=True), ov) == -errno.EINVAL
    assert perf_event_attach_bpf_prog(event(Call(), error_injectable=True), ov) == -errno.EINVAL
    assert perf_event_attach_bpf_prog(event(Call(), func_entry=True, error_injectable=True),
                                      ov) == 0
    tp = prog("mov r2, 0\ncall 58\nmov r0, 0\nexit", BpfProgType.BPF_PROG_TYPE_TRACEPOINT)
    with pytest.raises(VerifierError):               # helper 58 is for kprobe programs only
        tp.load()


def test_max_progs() -> None:
    call = Call()
    for i in range(BPF_TRACE_MAX_PROGS):
        assert perf_event_attach_bpf_prog(event(call), ret(1, f"p{i}")) == 0
    assert perf_event_attach_bpf_prog(event(call), ret(1)) == -errno.E2BIG
    assert len(call.prog_array) == BPF_TRACE_MAX_PROGS


def test_detach() -> None:
    call = Call()
    ea, eb = event(call), event(call)
    a, b = ret(1, "a"), ret(1, "b")
    perf_event_attach_bpf_prog(ea, a)
    perf_event_attach_bpf_prog(eb, b)
    perf_event_detach_bpf_prog(ea)
    assert call.prog_array.progs() == [b] and ea.prog is None
    perf_event_detach_bpf_prog(ea)                    # nothing attached: no-op
    perf_event_detach_bpf_prog(eb)
    assert call.prog_array is None
    assert bpf_prog_array_copy(None, a, None) == -errno.ENOENT


# --- query ------------------------------------------------------------------------------------

@pytest.fixture
def three():
    call = Call()
    progs = [ret(1, n) for n in "abc"]
    for p in progs:
        assert perf_event_attach_bpf_prog(event(call), p) == 0
    return call, [prog_stats(p).id for p in progs]


@pytest.mark.parametrize("ids_len, rc, ids", [
    (0, 0, 0), (1, -errno.ENOSPC, 1), (2, -errno.ENOSPC, 2), (3, 0, 3), (64, 0, 3),
    (65, -errno.E2BIG, None)])
def test_query_ids_len(three, ids_len, rc, ids) -> None:
    call, want = three
    q = PerfEventQueryBpf(ids_len)
    assert perf_event_query_prog_array(event(call), q) == rc
    if ids is not None:
        assert q.prog_cnt == 3 and q.ids == want[:ids]


def test_query_rules(three) -> None:
    call, _ = three
    assert perf_event_query_prog_array(event(call), PerfEventQueryBpf(3), perfmon=False) \
        == -errno.EPERM
    kpmu = event(call, attr=PerfType.PERF_TYPE_KPROBE)   # only tracepoint-type perf events
    assert perf_event_query_prog_array(kpmu, PerfEventQueryBpf(3)) == -errno.EINVAL
    q = PerfEventQueryBpf(4)
    assert perf_event_query_prog_array(event(Call()), q) == 0 and q.prog_cnt == 0 and q.ids == []


# --- pt_regs layouts --------------------------------------------------------------------------

@pytest.fixture
def demo(arch):
    return load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))))


@pytest.mark.parametrize("arch", ARCHES)
def test_pt_regs_image_roundtrip(demo, arch) -> None:
    from probes.regs import PtRegs
    m = demo.machine
    pt = arch_ptrace(m)
    assert (pt.PT_REGS_SIZE, pt.USER_PT_REGS_SIZE) == {"x86_64": (168, 168),
                                                       "arm64": (336, 272)}[arch]
    regs = PtRegs(m, ip=0x1234)
    regs[m.arch.args[2]] = 0xDEAD
    image = pt.pack_pt_regs(regs)
    assert len(image) == pt.PT_REGS_SIZE
    parm3 = {"x86_64": 96, "arm64": 16}[arch]             # dx / regs[2]
    ip = {"x86_64": 128, "arm64": 256}[arch]
    assert struct.unpack_from("<Q", image, parm3)[0] == 0xDEAD
    assert struct.unpack_from("<Q", image, ip)[0] == 0x1234
    struct.pack_into("<Q", image, parm3, 77)
    pt.unpack_pt_regs(regs, image)
    assert regs.arg(3) == 77 and regs.ip == 0x1234


# --- trace_call_bpf on probe hits ---------------------------------------------------------------

def _flags_is_zero(arch: str) -> BpfProg:
    off = {"x86_64": 96, "arm64": 16}[arch]
    return prog(f"ldxdw r2, [r1+{off}]\nmov r0, 0\njne r2, 0, +1\nmov r0, 1\nexit", name="f0")


@pytest.mark.parametrize("arch", ARCHES)
def test_several_programs_decide_recording(demo, arch) -> None:
    """AND of the u32 results: 1 & 3 & (flags == 0) records only the 10 opens with flags 0;
    every program runs on every hit."""
    m = demo.machine
    call, recorded, hits = Call(), [], []
    progs = [ret(1, "one"), ret(3, "three"), _flags_is_zero(arch), ret(0x1_0000_0001, "hi")]
    for p in progs:
        assert perf_event_attach_bpf_prog(event(call), p) == 0

    def dispatcher(p, regs):
        hits.append(1)
        if trace_call_bpf(call, regs):
            recorded.append(regs.arg(3))
        return 0
    kprobes_of(m).register_kprobe(Kprobe(symbol_name="do_sys_open", pre_handler=dispatcher))
    m.run()
    assert len(hits) == 16 and recorded == [0] * 10
    assert [prog_stats(p).run_cnt for p in progs] == [16] * 4


@pytest.mark.parametrize("arch", ARCHES)
def test_no_programs_records(demo, arch) -> None:
    from probes.regs import PtRegs
    assert trace_call_bpf(Call(), PtRegs(demo.machine, ip=0)) == 1


@pytest.mark.parametrize("arch", ARCHES)
def test_recursion_counts_misses(demo, arch) -> None:
    """A hit while a program runs on this CPU (bpf_prog_active set) runs nothing: 0, and
    every program of the array counts a miss."""
    m = demo.machine
    call, inner = Call(), Call()
    a, b = ret(1, "a"), ret(1, "b")
    perf_event_attach_bpf_prog(event(inner), a)
    perf_event_attach_bpf_prog(event(inner), b)
    results = []

    def nested_helper(run, *args):
        from probes.regs import PtRegs
        results.append(trace_call_bpf(inner, PtRegs(m, ip=0)))
        return 0
    outer = prog("call 1000\nmov r0, 1\nexit", name="outer")
    outer.helpers = {**outer.helpers, 1000: bpf.BpfFuncProto(1000, "nested", nested_helper)}
    perf_event_attach_bpf_prog(event(call), outer)
    from probes.regs import PtRegs
    assert trace_call_bpf(call, PtRegs(m, ip=0)) == 1
    assert results == [0]
    assert (prog_stats(a).misses, prog_stats(b).misses, prog_stats(a).run_cnt) == (1, 1, 0)
    assert bpf_trace_of(m).bpf_prog_active == 0


# --- the verifier knows the context ---------------------------------------------------------------

@pytest.mark.parametrize("asm, ctx_size, reason", [
    ("ldxdw r0, [r1+600]", None, "invalid bpf_context access off=600 size=8"),
    ("ldxw r0, [r1+3]", None, "invalid bpf_context access off=3 size=4"),
    ("ldxdw r0, [r1+164]", 168, "invalid bpf_context access off=164 size=8"),
    ("ldxdw r0, [r1+168]", 168, "invalid bpf_context access off=168 size=8"),
    ("ldxdw r0, [r1+336]", 336, "invalid bpf_context access off=336 size=8"),
    ("ldxdw r0, [r1-8]", 336, "invalid bpf_context access off=-8 size=8"),
    ("stdw [r1+8], 1", 168, "read-only"),
])
def test_ctx_refusals(asm, ctx_size, reason) -> None:
    p = prog(f"{asm}\nmov r0, 0\nexit", ctx_size=ctx_size)
    with pytest.raises(VerifierError) as e:
        p.load()
    assert reason in str(e.value) and e.value.insn_idx == 0


@pytest.mark.parametrize("asm, ctx_size", [
    ("ldxdw r0, [r1+160]", 168), ("ldxdw r0, [r1+328]", 336), ("ldxw r0, [r1+4]", 168),
    ("ldxb r0, [r1+167]", 168), ("ldxdw r0, [r1+264]", None)])
def test_ctx_accepted(asm, ctx_size) -> None:
    prog(f"{asm}\nmov r0, 0\nexit", ctx_size=ctx_size).load()


@pytest.mark.parametrize("arch", ARCHES)
def test_load_for_arch_sets_ctx_size(demo, arch, tmp_path) -> None:
    """libbpf's load sizes the context by the machine's pt_regs: offset 200 is inside the
    arm64 pt_regs but past x86-64's."""
    from probes.bpf.libbpf import BpfObject, LibbpfError
    from probes.bpf.loader import BpfObject as Loaded
    p = prog("ldxdw r0, [r1+200]\nexit", name="p")
    p.attach_kind, p.attach_point, p.section = "kprobe", "do_sys_open", "kprobe/do_sys_open"
    obj = BpfObject(Loaded(path="mem.o", programs={"p": p}))
    if arch == "x86_64":
        with pytest.raises(LibbpfError) as e:
            obj.load(demo.machine)
        assert "invalid bpf_context access off=200 size=8" in str(e.value)
    else:
        obj.load(demo.machine)
        assert p.ctx_size == 336


# --- on the guest: image, override on ftrace-based probes, a faulting program -------------------

def _kprobe_prog(asm: str, point: str):
    from probes.bpf.libbpf import BpfObject
    from probes.bpf.loader import BpfObject as Loaded
    p = prog(asm, name="p")
    p.attach_kind, p.attach_point, p.section = "kprobe", point, f"kprobe/{point}"
    return BpfObject(Loaded(path="mem.o", programs={"p": p}))


@pytest.mark.parametrize("arch", ARCHES)
def test_fast_image_equals_the_reference_packing(demo, arch) -> None:
    m = demo.machine
    pt, trace, seen = arch_ptrace(m), bpf_trace_of(m), []

    def check(p, regs):
        regs[m.arch.args[0]] = 0x5A5A            # a change not flushed yet: the image shows it
        seen.append((trace.image.pack(regs), pt.pack_pt_regs(regs), regs.ip))
        regs.forget(m.arch.args[0])
        return 0
    kprobes_of(m).register_kprobe(Kprobe(symbol_name="vfs_read", pre_handler=check))
    m.run()
    assert seen and all(fast == ref for fast, ref, _ip in seen)
    ip_off = {"x86_64": 128, "arm64": 256}[arch]
    assert all(struct.unpack_from("<Q", fast, ip_off)[0] == ip for fast, _r, ip in seen)
    assert struct.unpack_from("<Q", seen[0][0], {"x86_64": 112, "arm64": 0}[arch])[0] == 0x5A5A


@pytest.mark.parametrize("arch", ARCHES)
def test_override_on_an_ftrace_site(arch) -> None:
    """A kprobe on an ftrace site (IPMODIFY): the override returns through the arch's
    just_return_func / lr; fib() returns 1 without running its body."""
    import io
    from probes.trace.error_inject import error_injection_list
    out = io.BytesIO()
    m = load_guest(GuestConfig(path=str(firmware_elf(arch, "recurse.ftrace"))), stdout=out).machine
    error_injection_list(m).allow("fib")
    obj = _kprobe_prog("mov r2, 1\ncall 58\nmov r0, 0\nexit", "fib").load(m)
    link = obj.attach(m, "p")
    assert link.call.kp.ainsn.kind == "ftrace"
    assert m.run().exit_code == 0
    text = out.getvalue().decode()
    assert "fib(10) = 1 calls=0\n" in text and "factorial(5) = 120 calls=5\n" in text


@pytest.mark.parametrize("arch", ARCHES)
def test_a_program_that_overruns_its_budget_stops_the_run(demo, arch) -> None:
    from probes.trace.bpf_trace import BpfTraceError
    m = demo.machine
    obj = _kprobe_prog("mov r1, 0\nl: add r1, 1\njlt r1, 2000000, l\nmov r0, 0\nexit",
                       "do_sys_open").load(m)
    obj.attach(m, "p")
    with pytest.raises(BpfTraceError) as e:
        m.run()
    assert e.value.prog == "p" and e.value.exit_code == 2
