"""Tracepoints and raw tracepoints whose JITed BPF programs run from a guest stub (issue
17, jit_direct.py DirectCalls.tracepoint_stub): after the first (host) hit has JITed the
programs, the iterator's trap does the function's host work (a tracepoint event's record)
and writes the programs' context (the record, or the raw u64 arguments) to this CPU's
context buffer, then sends the guest to this CPU's stub, which calls the images and traps
back to the next function and the iterator's return. Maps, program stats, misses and the
guest's output equal the compiled Python engine's on both hit paths."""
from __future__ import annotations

import pytest

from conftest import ARCHES, firmware_elf
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.jit_guest import ScratchJit, install_engine
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.testing import ProbeLab
from probes.trace.bpf_trace import bpf_trace_of, prog_stats
from probes.trace.bpf_tracepoint import attach_tracepoint_prog, bpf_raw_tp_link_attach
from probes.tracepoint import tracepoints_of

# tp_work(int i, long v): raw args [i, v]; the record: 8-byte header, i at 8, v at 16
V_OFF = {"raw_tp": 8, "tp": 16}
TYPE = {"raw_tp": BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT,
        "tp": BpfProgType.BPF_PROG_TYPE_TRACEPOINT}


def sums_prog(kind: str) -> BpfProg:
    """sums[0] += v, sums[1] += 1: reads the context the stub was given."""
    sums = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 2, name="sums")
    text = f"""
        ldxdw r6, [r1+{V_OFF[kind]}]
        stw [r10-4], 0
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +1
        lock add [r0], r6
        stw [r10-4], 1
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +2
        mov r6, 1
        lock add [r0], r6
        mov r0, 1
        exit
    """
    return BpfProg.from_bytes(assemble(text), prog_type=TYPE[kind], name=f"sums_{kind}",
                              license="GPL", maps={3: sums})


class TpLab:
    """tpdemo's work loop (tp_work fires on each of its `n` iterations) with `prog` on it."""

    def __init__(self, arch: str, kind: str, prog: BpfProg, engine: str, n: int) -> None:
        self.lab = ProbeLab.load(str(firmware_elf(arch, "tpdemo")), argv=[str(n)])
        self.m = self.lab.machine
        if kind == "raw_tp":
            self.link = bpf_raw_tp_link_attach(self.m, prog, "tp_work")
        else:
            self.link = attach_tracepoint_prog(self.m, prog, "tpdemo", "tp_work")
        install_engine(self.m, engine)

    def run(self) -> bytes:
        assert self.lab.run().exit_code == 0
        return self.lab._stdout.getvalue()

    def stubs(self, kind: str) -> list:
        dc = direct_calls_of(self.m)
        return [] if dc is None else [t for k, t in dc.copies.items() if k[0] == kind]


def _sums(prog: BpfProg) -> list[int]:
    return [int.from_bytes(prog.maps[3].lookup(k)[:8], "little", signed=True) for k in range(2)]


@pytest.mark.parametrize("kind", ["raw_tp", "tp"])
@pytest.mark.parametrize("arch", ARCHES)
def test_hits_after_the_first_run_the_stub_not_a_nested_run(arch, kind, hit_path,
                                                             monkeypatch) -> None:
    jp, pp = sums_prog(kind), sums_prog(kind)
    jit, py = TpLab(arch, kind, jp, "jit", 12), TpLab(arch, kind, pp, "python", 12)
    nested: list[int] = []
    execute = ScratchJit.execute
    monkeypatch.setattr(ScratchJit, "execute",
                        lambda self, *a: nested.append(1) or execute(self, *a))
    assert jit.run() == py.run() == b"tpdemo n=12 sum=114\n"
    assert len(jit.stubs(kind)) == 1
    assert nested == [1]                             # the first hit only: it JITed the program
    assert _sums(jp) == _sums(pp) == [sum(3 * i - 7 for i in range(12)), 12]
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == 12
    tp = tracepoints_of(jit.m).lookup("tp_work")
    assert tp.hits == tracepoints_of(py.m).lookup("tp_work").hits == 12


@pytest.mark.parametrize("arch", ARCHES)
def test_a_busy_guard_counts_misses(arch) -> None:
    """A tracepoint event's programs miss when this CPU's bpf_prog_active is held; a raw
    tracepoint's have their own prog->active and do not."""
    tp_j, tp_p = sums_prog("tp"), sums_prog("tp")
    jit, py = TpLab(arch, "tp", tp_j, "jit", 3), TpLab(arch, "tp", tp_p, "python", 3)
    jit.run(), py.run()
    dc = direct_calls_of(jit.m)
    assert dc is not None and jit.stubs("tp")
    jit.m.memory.write(dc.active_addr(0), (1).to_bytes(4, "little"))
    bpf_trace_of(py.m).bpf_prog_active = 1
    for lab in (jit, py):
        for i in range(5):                           # tp_work fires in each work_step
            lab.lab.call("work_step", i)
    assert _sums(tp_j) == _sums(tp_p) and _sums(tp_j)[1] == 3
    assert prog_stats(tp_j).misses == prog_stats(tp_p).misses == 5
    assert prog_stats(tp_j).run_cnt == prog_stats(tp_p).run_cnt == 3


@pytest.mark.parametrize("arch", ARCHES)
def test_destroying_the_link_drops_the_stub(arch) -> None:
    prog = sums_prog("raw_tp")
    lab = TpLab(arch, "raw_tp", prog, "jit", 4)
    lab.run()
    assert lab.stubs("raw_tp")
    lab.link.destroy()
    for i in range(3):
        lab.lab.call("work_step", i)
    assert _sums(prog)[1] == 4 and prog_stats(prog).run_cnt == 4


@pytest.mark.parametrize("arch", ARCHES)
def test_two_functions_on_one_tracepoint(arch, monkeypatch) -> None:
    """A raw tracepoint link and a tracepoint event's program on tp_work: the first
    function's stub traps back to run the next, the last one's returns from the iterator."""
    progs = {e: (sums_prog("raw_tp"), sums_prog("tp")) for e in ("jit", "python")}
    labs = {}
    for engine, (raw, rec) in progs.items():
        lab = TpLab(arch, "raw_tp", raw, engine, 9)
        attach_tracepoint_prog(lab.m, rec, "tpdemo", "tp_work")
        labs[engine] = lab
    nested: list[int] = []
    execute = ScratchJit.execute
    monkeypatch.setattr(ScratchJit, "execute",
                        lambda self, *a: nested.append(1) or execute(self, *a))
    assert labs["jit"].run() == labs["python"].run()
    assert len(nested) == 2                          # each program's first hit JITed it
    want = [sum(3 * i - 7 for i in range(9)), 9]
    for k in range(2):
        assert _sums(progs["jit"][k]) == _sums(progs["python"][k]) == want
    stubs = {k[0]: t for k, t in direct_calls_of(labs["jit"].m).copies.items()}
    assert set(stubs) == {"raw_tp", "tp"}
    iterator_ret = [t.resume_to for t in stubs.values()]
    assert iterator_ret.count(None) == 1             # the first traps back, the last returns


@pytest.mark.parametrize("arch", ARCHES)
def test_a_restored_machine_wires_the_next_jit_engines_stubs(arch) -> None:
    """A snapshot taken before any program: after a restore the BPF layer made since is
    gone, and the next JIT engine's stubs serve the tracepoint (not the dropped one's)."""
    lab = ProbeLab.load(str(firmware_elf(arch, "tpdemo")), argv=["6"])
    m = lab.machine
    tracepoints_of(m)
    snap = m.snapshot()
    first = sums_prog("raw_tp")
    bpf_raw_tp_link_attach(m, first, "tp_work")
    install_engine(m, "jit")
    assert lab.run().exit_code == 0
    m.restore(snap)
    assert tracepoints_of(m).bpf_stub is None
    prog = sums_prog("raw_tp")
    bpf_raw_tp_link_attach(m, prog, "tp_work")
    install_engine(m, "jit")
    assert lab.run().exit_code == 0
    dc = direct_calls_of(m)
    assert dc is not None and dc.copies
    assert _sums(prog) == _sums(first)
