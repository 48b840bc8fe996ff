"""The C→Python call of a kprobe pre handler on the C hit path (probes/native: one closure
called through the CPython API, one reused pt_regs view): a handler's exception stops the
run and is raised after it, as on the Python path; registers a handler writes reach the
guest; a handler that keeps its regs sees only its own hit's values while it runs."""
from __future__ import annotations

import pytest

from probes.kprobes import Kprobe
from probes.native import PYAPI
from probes.testing import ProbeLab


SRC = {"arm64": "mov x0, #3; add x0, x0, #1; ret", "x86_64": "mov eax, 3; add eax, 1; ret"}
SECOND = {"arm64": 4, "x86_64": 5}


class Boom(Exception):
    pass


def test_handler_exception_stops_the_run(arch, hit_path):
    lab = ProbeLab.from_asm(arch, {"f": SRC[arch]})
    calls: list[int] = []

    def pre(kp, regs):
        calls.append(regs.ip)
        raise Boom("from the handler")
    p = Kprobe(symbol_name="f", offset=SECOND[arch], pre_handler=pre)
    lab.kprobes.register_kprobe(p)
    with pytest.raises(Boom):
        lab.call("f")
    assert len(calls) == 1 and p.hits == 1
    if hit_path == "native":
        assert lab.kprobes.native.st.py is not None or PYAPI is None   # through the C API


def test_register_writes_reach_the_guest_and_regs_are_per_hit(arch, hit_path):
    """The handler changes the return register before `add`: the guest adds to it. Each
    hit's view starts from the CPU (a write of the previous hit is not seen as cached)."""
    lab = ProbeLab.from_asm(arch, {"f": SRC[arch]})
    ret = lab.machine.arch.ret
    seen: list[int] = []

    def pre(kp, regs):
        seen.append(regs[ret])
        regs[ret] = regs[ret] * 10
        return 0
    p = Kprobe(symbol_name="f", offset=SECOND[arch], pre_handler=pre)
    lab.kprobes.register_kprobe(p)
    assert [lab.call("f") for _ in range(3)] == [31, 31, 31]
    assert seen == [3, 3, 3] and p.hits == 3
