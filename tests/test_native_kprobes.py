"""The C hit path of kprobes (probes/native, issue 14) against the Python one: the same
hits, misses, guest output, cycles and cycle breakdown on both arches, with the C path
really taking the traps (its `handled` counter) and the Python path really off."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import firmware_elf, needs_native
from probes.errors import KprobeError
from probes.kprobes import Kprobe
from probes.native import Sim
from probes.testing import ProbeLab

ROOT = Path(__file__).resolve().parent.parent


def _probe_every_insn(lab: ProbeLab, prefix: str = "") -> list[Kprobe]:
    """A handler-less kprobe on every instruction of every function (named with `prefix`)
    that the kprobe core accepts."""
    step = lab.machine.arch.insn_align
    done = []
    for sym in list(lab.machine.symbols):
        if sym.kind != "func" or not sym.name.startswith(prefix) or sym.name.startswith("_start"):
            continue
        for off in range(0, sym.size, step):
            p = Kprobe(symbol_name=sym.name, offset=off)
            try:
                lab.kprobes.register_kprobe(p)
            except KprobeError:
                continue
            done.append(p)
    return done


def _summary(arch: str, elf: str, prefix: str, native: bool, monkeypatch,
             handlers: bool = False) -> dict:
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    lab = ProbeLab.load(str(firmware_elf(arch, elf)))
    lab.machine.enable_cycle_model()
    probes = _probe_every_insn(lab, prefix)
    seen: list[tuple] = []
    if handlers:                 # every probe records what its pre handler sees
        def pre(p, regs):
            seen.append((p.addr, regs.ip, regs.sp, regs.return_value, p.hits,
                         lab.kprobes.kcb.current is p))
            return 0
        for p in probes:
            p.pre_handler = pre
    res = lab.run(timeout=120)
    kp = lab.kprobes
    kp.probes()                                  # folds the C counters
    out = {"exit": res.exit_code, "stdout": lab.stdout, "cycles": lab.machine.clock.cycles,
           "breakdown": lab.machine.clock.breakdown(),
           "probes": [(p.addr, p.hits, p.nmissed, p.ainsn.kind, p.ainsn.boosted) for p in probes],
           "seen": seen}
    native_state = kp.native
    if native:
        assert native_state is not None
        out["handled"] = native_state.st.handled
        out["simulated_rows"] = sum(1 for p in native_state.probes if p.ainsn.handler is not None)
        out["c_hits"] = sum(p.hits for p in native_state.probes)   # of the probes C serves
    else:
        assert native_state is None
    return out


@needs_native
@pytest.mark.parametrize("handlers", [False, True], ids=["counters", "pre-handlers"])
@pytest.mark.parametrize("elf,prefix", [("insns", "t_"), ("recurse", "")])
def test_native_path_gives_the_python_results(arch, elf, prefix, handlers, monkeypatch):
    native = _summary(arch, elf, prefix, True, monkeypatch, handlers)
    python = _summary(arch, elf, prefix, False, monkeypatch, handlers)
    handled, simulated, c_hits = (native.pop(k) for k in ("handled", "simulated_rows", "c_hits"))
    assert native == python
    hits = sum(h for _a, h, _n, _k, _b in native["probes"])
    assert hits > 100 and native["exit"] == 0
    assert 0 < c_hits <= hits and handled >= c_hits   # those hits all went through C
    if handlers:
        assert len(native["seen"]) == hits      # each hit ran its handler once, as in Python
    if arch == "arm64" and elf == "insns":
        assert simulated >= 10          # b, bl, b.cond, cbz, tbz, adr(p), br, blr, ret in C


@needs_native
def test_arm64_operands_are_decoded_once(monkeypatch):
    """Each simulated class C runs has its row: kind and operands from registration."""
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1")
    lab = ProbeLab.load(str(firmware_elf("arm64", "insns")))
    _probe_every_insn(lab, "t_")
    kp = lab.kprobes
    sims = {sim for p in kp.table.values() if (row := kp.native_row(p)) is not None
            for sim in [row[2][0]]}
    assert {Sim.B, Sim.BL, Sim.BCOND, Sim.CBZ, Sim.TBZ, Sim.ADR, Sim.BR} <= sims
    literal = [p for p in kp.table.values() if p.ainsn.mnemonic.startswith(("ldr", "ldrsw"))
               and p.ainsn.handler is not None]
    assert literal and all(kp.native_row(p) is None for p in literal)   # uaccess: Python


def test_handler_given_after_registration_runs(arch, hit_path):
    """A perf event attaches its handler to a registered probe: C must hand its hits over."""
    lab = ProbeLab.load(str(firmware_elf(arch, "recurse")))
    p = Kprobe(symbol_name="fib")
    lab.kprobes.register_kprobe(p)
    seen = []
    p.pre_handler = lambda kp, regs: seen.append(regs.ip) and 0
    lab.run()
    lab.kprobes.probes()
    assert len(seen) == p.hits > 1000
    assert set(seen) == {p.addr + lab.kprobes.ip_offset}


def test_fault_in_a_slot_is_reported_at_the_probe(arch, hit_path):
    """A stepped load that faults: the report names the probed instruction, as in Python."""
    load_insn = {"arm64": "ldr x0, [x1]; ret", "x86_64": "mov rax, qword ptr [rdi]; ret"}[arch]
    lab = ProbeLab.from_asm(arch, {"deref": load_insn})
    p = Kprobe(symbol_name="deref")
    lab.kprobes.register_kprobe(p)
    lab.call("deref", 0x10, regs={"x1": 0x10} if arch == "arm64" else None)
    res = lab.result
    assert res is not None and res.exit_code == 139
    assert res.fault is not None and res.fault.pc == p.addr
    assert lab.kprobes.kcb.current is None
    lab.kprobes.probes()
    assert p.hits == 1


def test_snapshot_restore_then_probe_again(arch, hit_path):
    lab = ProbeLab.load(str(firmware_elf(arch, "recurse")))
    snap = lab.machine.snapshot()
    hits = []
    for _ in range(2):
        lab.machine.restore(snap)
        p = Kprobe(symbol_name="fib")
        lab.kprobes.register_kprobe(p)
        assert lab.run().exit_code == 0
        hits.append(p.hits)                   # folded when the run stopped
    lab.machine.restore(snap)
    assert lab.run().exit_code == 0           # no probe left behind: nothing traps
    assert hits[0] == hits[1] > 1000


@pytest.mark.slow
@needs_native
def test_kprobe_suites_pass_on_the_python_path():
    """The kprobe test files again with the C path off (the fallback gives the same results)."""
    files = ["tests/test_kprobes_core.py", "tests/test_boost_optprobes.py",
             "tests/test_kprobes_insn.py", "tests/test_kretprobes.py", "tests/test_ftrace.py",
             "tests/test_trace_fetchargs.py"]
    env = dict(os.environ, KPROBE_EMU_NATIVE="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:]


def _optimized_run(arch: str, native: bool, monkeypatch, handler_at: int | None = None) -> dict:
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    from probes.optprobes import enable_optprobes
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    lab.machine.enable_cycle_model()
    opt = enable_optprobes(lab.kprobes)
    p = Kprobe(symbol_name="hot_leaf")
    lab.kprobes.register_kprobe(p)
    opt.kick_kprobe_optimizer()
    assert p.ainsn.optimized
    calls = []
    for i in range(3):
        if i == handler_at:          # a handler given to an optimized probe mid-way
            p.pre_handler = lambda kp, regs: calls.append(1) and 0
        lab.call("hot_call", 50)
    lab.kprobes.probes()
    native_state = lab.kprobes.native
    return {"hits": p.hits, "nmissed": p.nmissed, "calls": len(calls),
            "cycles": lab.machine.clock.cycles, "breakdown": lab.machine.clock.breakdown(),
            "handled": native_state.st.handled if native_state is not None else None}


@needs_native
@pytest.mark.parametrize("handler_at", [None, 1])
def test_optimized_detour_counts_in_c(arch, handler_at, monkeypatch):
    native = _optimized_run(arch, True, monkeypatch, handler_at)
    python = _optimized_run(arch, False, monkeypatch, handler_at)
    handled = native.pop("handled")
    assert python.pop("handled") is None
    assert native == python
    assert native["hits"] == 150 and native["breakdown"]["detour"] > 0
    assert native["calls"] == (0 if handler_at is None else 100)
    assert handled == (150 if handler_at is None else 50)   # C counted the handler-less hits


def test_pre_handler_that_sets_ip_skips_the_step(arch, hit_path):
    """A pre handler returning 1 after moving ip: no single-step, execution goes there."""
    lab = ProbeLab.from_asm(arch, {
        "f": {"arm64": "mov x0, #1; mov x0, #2; ret", "x86_64": "mov eax, 1; mov eax, 2; ret"}[arch]})
    p = Kprobe(symbol_name="f")
    second = {"arm64": 4, "x86_64": 5}[arch]

    def pre(kp, regs):
        regs.return_value = 7
        regs.ip = kp.addr + 2 * second            # skip both moves
        return 1
    p.pre_handler = pre
    lab.kprobes.register_kprobe(p)
    assert lab.call("f") == 7
    assert p.hits == 1 and lab.kprobes.kcb.current is None


def test_handler_unregistering_a_probe_mid_hit(arch, hit_path):
    """A pre handler that changes the probe table while C holds the hit: Python finishes
    the step, with the guest's results unchanged."""
    lab = ProbeLab.load(str(firmware_elf(arch, "recurse")))
    expected = ProbeLab.load(str(firmware_elf(arch, "recurse")))
    expected.run()
    other = Kprobe(symbol_name="sum_rec")
    lab.kprobes.register_kprobe(other)
    calls = []

    def pre(kp, regs):
        calls.append(1)
        if len(calls) == 100:
            lab.kprobes.unregister_kprobe(other)
        return 0
    p = Kprobe(symbol_name="fib", pre_handler=pre)
    lab.kprobes.register_kprobe(p)
    assert lab.run().exit_code == 0
    assert lab.stdout == expected.stdout
    assert len(calls) == p.hits > 1000
