"""Kprobes on ftrace sites whose JITed BPF programs run from a guest stub (issue 17,
jit_direct.py DirectCalls.kprobe_stub): after the first (host) hit has JITed the programs,
kprobe_ftrace_handler (or C's ftrace caller's pre entry) leaves the ftrace trampoline for
this CPU's stub instead of a nested run; the stub saves pt_regs as ftrace_regs presents
them (ip as after a breakpoint), calls the images and traps back, and the hit goes on over
the nop (the post handler, if any). Maps, counts and the guest's output equal the compiled
Python engine's on both hit paths."""
from __future__ import annotations

import io

import pytest

from conftest import ARCHES, firmware_elf
from test_bpf_jit_direct import sum_parm1_prog
from emu.loader import GuestConfig, load_guest
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.jit_guest import ScratchJit, install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe, kprobes_of
from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog, prog_stats


class FtraceLab:
    """recurse.ftrace's fib (an ftrace site at its entry) with a kprobe whose pre handler
    is a kprobe-PMU event carrying `prog` (and a post handler when `post`)."""

    def __init__(self, arch: str, prog: BpfProg, engine: str, post: bool) -> None:
        self.out = io.BytesIO()
        self.m = load_guest(GuestConfig(path=str(firmware_elf(arch, "recurse.ftrace"))),
                            stdout=self.out).machine
        self.posts: list[int] = []
        self.p = Kprobe(symbol_name="fib", post_handler=(
            (lambda p, regs, flags: self.posts.append(regs.ip)) if post else None))
        kprobes_of(self.m).register_kprobe(self.p)
        assert self.p.ainsn.kind == "ftrace"
        self.call = KprobePerfEvent(self.m, "fib", kp=self.p)
        self.p.pre_handler = self.call.kprobe_perf_func
        event = PerfEvent(self.call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE)
        assert perf_event_attach_bpf_prog(event, prog) == 0
        install_engine(self.m, engine)

    def run(self) -> str:
        assert self.m.run().exit_code == 0
        return self.out.getvalue().decode()

    @property
    def stubs(self) -> dict:
        dc = direct_calls_of(self.m)
        return {} if dc is None else dc.stubs


def _u64(prog: BpfProg) -> int:
    return int.from_bytes(prog.maps[3].lookup(0)[:8], "little")


@pytest.mark.parametrize("post", [False, True])
@pytest.mark.parametrize("arch", ARCHES)
def test_hits_after_the_first_run_the_stub_not_a_nested_run(arch, post, hit_path,
                                                             monkeypatch) -> None:
    jp, pp = sum_parm1_prog(arch), sum_parm1_prog(arch)
    jit, py = FtraceLab(arch, jp, "jit", post), FtraceLab(arch, pp, "python", post)
    nested: list[int] = []
    execute = ScratchJit.execute
    monkeypatch.setattr(ScratchJit, "execute",
                        lambda self, *a: nested.append(1) or execute(self, *a))
    out = jit.run()
    assert out == py.run() and "fib(10) = 55 calls=177\n" in out
    calls = py.p.hits                            # every fib call of the program
    assert calls > 177
    assert list(jit.stubs) == [jit.p.addr]
    assert nested == [1]                         # the first hit only: it JITed the program
    assert _u64(jp) == _u64(pp) > 0              # sum of n over every fib(n) call
    assert jit.p.hits == py.p.hits == calls and jit.p.nmissed == py.p.nmissed == 0
    assert jit.call.nhit == py.call.nhit == calls
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == calls
    assert jit.posts == py.posts and len(jit.posts) == (calls if post else 0)
