"""bpf_get_stack and bpf_get_stackid give one answer on every engine (issue 17): the
interpreter, the compiled Python path and the JIT (whose programs that walk the stack run
nested on the traced CPU) all walk from the pt_regs the probe saved, as the kernel's
get_perf_callchain does, never from the CPU's live registers. A kprobe at a function's
entry, one on a call site inside a function, a kretprobe and an optimized probe, on both
arches and both hit paths, also with the callers kretprobed: the frames are compared with the call chain of the compiled
program (each return address follows a call to the frame below it) and the stack-id map
with the frames get_stack returned."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import capstone
import pytest

from conftest import ARCHES
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_guest import install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe
from probes.kretprobes import Kretprobe, kretprobes_of
from probes.optprobes import enable_optprobes
from probes.testing import ProbeLab
from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, bpf_trace_of,
                                    perf_event_attach_bpf_prog, symbolize_stack)

CHAIN = Path(__file__).parent / "data" / "bpf_stack" / "chain.c"
ENGINES = ("interp", "python", "jit")
DEPTH = 8                      # the get_stack buffer: 8 frames
REC = struct.Struct(f"<qq{DEPTH}Q")   # get_stack's r0, get_stackid's r0, the frames


@pytest.fixture
def chain(c_prog):
    def build(arch: str) -> Path:
        return c_prog(arch, CHAIN, extra=("-fno-omit-frame-pointer",))
    return build


def stack_prog() -> BpfProg:
    """Each hit: id = get_stackid(ctx, stacks, 0), n = get_stack(ctx, buf, 64, 0), and
    the record {n, id, buf} to the ring buffer."""
    text = f"""
        mov r6, r1
        lddw r2, map_fd(5)
        mov r3, 0
        call 27
        stxdw [r10-72], r0
        mov r1, r6
        mov r2, r10
        add r2, -64
        mov r3, {8 * DEPTH}
        mov r4, 0
        call 67
        stxdw [r10-80], r0
        lddw r1, map_fd(4)
        mov r2, r10
        add r2, -80
        mov r3, {REC.size}
        mov r4, 0
        call 130
        mov r0, 0
        exit"""
    maps = {4: create_map(BpfMapType.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096, name="recs"),
            5: create_map(BpfMapType.BPF_MAP_TYPE_STACK_TRACE, 4, 8 * DEPTH, 64, name="stacks")}
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="walk", license="GPL", maps=maps)


@dataclass
class Walks:
    """What one run produced: per hit (get_stack's r0, get_stackid's r0, the frames)."""
    lab: ProbeLab
    recs: list[tuple[int, int, tuple[int, ...]]]
    stacks: dict[int, tuple[int, ...]]

    def names(self, ips: tuple[int, ...]) -> list[str]:
        return [f.split("+")[0] for f in symbolize_stack(self.lab.machine, list(ips))]


def _calls(lab: ProbeLab, func: str) -> list[tuple[int, int, int]]:
    """(address, return address, target) of each direct call in `func`."""
    m = lab.machine
    sym = m.symbols.lookup(func)
    cs = capstone.Cs(m.arch.cs_arch, m.arch.cs_mode)
    out = []
    for insn in cs.disasm(lab.original(sym.addr, sym.size), sym.addr):
        if insn.mnemonic in ("call", "bl"):
            out.append((insn.address, insn.address + insn.size, int(insn.op_str.lstrip("#"), 0)))
    return out


def _hijack(lab: ProbeLab) -> list[Kretprobe]:
    """kretprobes on middle and outer: their return addresses on the stack become the
    trampoline's while they run, and the walk must show the real ones."""
    rps = [Kretprobe(kp=Kprobe(symbol_name=f), handler=lambda ri, regs: 0)
           for f in ("middle", "outer")]
    for rp in rps:
        kretprobes_of(lab.machine).register_kretprobe(rp)
    return rps


def _attach(lab: ProbeLab, kind: str) -> KprobePerfEvent:
    m = lab.machine
    if kind == "kretprobe":
        call = KprobePerfEvent(m, "leaf", is_return=True)
    elif kind == "callsite":       # middle's last call of leaf, after its frame is built
        site = _calls(lab, "middle")[-1][0]
        call = KprobePerfEvent(m, "middle", site - m.symbols.lookup("middle").addr)
    else:
        if kind == "optprobe":
            enable_optprobes(lab.kprobes)
        call = KprobePerfEvent(m, "leaf")
    call.register()
    if kind == "optprobe":
        lab.kprobes.optimizer.kick_kprobe_optimizer()
        assert call.kp.ainsn.optimized, call.kp.ainsn.opt_reason
    return call


def walks(exe: Path, kind: str, engine: str, hijacked: bool = False) -> Walks:
    lab = ProbeLab.load(str(exe))
    rps = _hijack(lab) if hijacked else []
    prog = stack_prog()
    call = _attach(lab, kind)
    assert perf_event_attach_bpf_prog(
        PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog) == 0
    install_engine(lab.machine, engine)
    raw: list[bytes] = []
    bpf_trace_of(lab.machine).ring_buffer(prog.maps[4], raw.append)
    res = lab.run()
    assert res.exit_code == 0, res
    assert [rp.hits for rp in rps] == [3] * len(rps)      # every return handled
    recs = [(n, sid, tuple(ips)) for n, sid, *ips in map(REC.unpack, raw)]
    return Walks(lab, recs, dict(prog.maps[5].buckets))


def _chain_of(arch: str, kind: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The expected innermost names and, for each frame after the first, the caller whose
    call (to the frame below) it must return past. At a function's entry x86's unwinder
    (ORC) finds the return address at sp, so the caller is the second frame; arm64's walks
    frame records from x29 and never reads lr, so it has no frame for the caller. A
    kretprobe's first frame is where leaf returns to (the trampoline handler sets the
    regs' ip to it)."""
    if kind in ("callsite", "kretprobe"):
        return ["middle", "outer", "main"], [("outer", "middle"), ("main", "outer")]
    if arch == "arm64":
        return ["leaf", "outer", "main"], [("outer", "middle"), ("main", "outer")]
    return (["leaf", "middle", "outer", "main"],
            [("middle", "leaf"), ("outer", "middle"), ("main", "outer")])


def check_chain(w: Walks, kind: str) -> None:
    names, links = _chain_of(w.lab.machine.arch.name, kind)
    lab = w.lab
    for n, sid, ips in w.recs:
        assert n > 0 and n % 8 == 0
        frames = ips[:n // 8]
        assert not any(ips[n // 8:])                   # get_stack zero-fills the rest
        assert w.names(frames)[:len(names)] == names, symbolize_stack(lab.machine, list(frames))
        if kind == "kretprobe":
            assert frames[0] in {ret for _a, ret, t in _calls(lab, "middle")
                                 if t == lab.machine.symbols.lookup("leaf").addr}
        for i, (caller, callee) in enumerate(links):
            target = lab.machine.symbols.lookup(callee).addr
            rets = {ret for _a, ret, t in _calls(lab, caller) if t == target}
            assert frames[1 + i] in rets, (caller, callee, hex(frames[1 + i]))
        # the stack-id map holds the same frames get_stack returned
        assert sid >= 0 and w.stacks[sid] == frames[:DEPTH]


KINDS = ("entry", "callsite", "kretprobe", "optprobe")
HITS = {"entry": 6, "callsite": 3, "kretprobe": 6, "optprobe": 6}


def _same_everywhere(exe: Path, kind: str, hijacked: bool = False) -> None:
    runs = {engine: walks(exe, kind, engine, hijacked) for engine in ENGINES}
    ref = runs["python"]
    assert len(ref.recs) == HITS[kind]
    # one id per distinct chain (main's calls of outer are three sites once unrolled)
    assert len(ref.stacks) == len({ips for _n, _sid, ips in ref.recs}) > 1
    check_chain(ref, kind)
    for engine, w in runs.items():
        assert (w.recs, w.stacks) == (ref.recs, ref.stacks), engine


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHES)
def test_frames_on_every_engine(arch, kind, chain, hit_path) -> None:
    _same_everywhere(chain(arch), kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHES)
def test_return_addresses_kretprobes_hijacked(arch, kind, chain, hit_path) -> None:
    """With middle and outer kretprobed, the walk shows where they really return (the
    kernel's unwinders recover the trampoline's slots with kretprobe_find_ret_addr)."""
    _same_everywhere(chain(arch), kind, hijacked=True)


@pytest.mark.parametrize("arch", ARCHES)
def test_the_jit_walk_has_no_frame_of_its_own(arch, chain) -> None:
    """The nested run's own code (the image, the helper trampoline) never shows up."""
    w = walks(chain(arch), "entry", "jit")
    assert w.recs
    for n, _sid, ips in w.recs:
        names = w.names(ips[:n // 8])
        assert not [f for f in names if f.startswith(("bpf_", "0x"))], names
