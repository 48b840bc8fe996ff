"""Bounded loops and tail calls on the direct path (issue 17, probes/bpf/jit_direct.py): a
program with a backward branch or a bpf_tail_call runs from the plain kprobe's stub or the
optimized probe's thunk, with no nested run, and gives the compiled Python engine's
results (r0 through the guest, maps, run counts, hits). The stub sets the budget register
(and keeps the guest's) and zeroes the tail-call count before each image; a run out of
budget ends the run as the host path ends it; the prog array is read at every tail call;
bpf-to-bpf calls with loops inside callees; several CPUs."""
from __future__ import annotations

import pytest

from conftest import ARCHES, firmware_elf
from test_bpf_jit_direct import _lab as opt_lab
from test_bpf_jit_kprobe_stub import Lab
from probes.bench_kinds import add_reg_asm, parm_offset
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of, direct_eligible
from probes.bpf.jit_guest import ScratchJit
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.testing import ProbeLab
from probes.trace.bpf_trace import BpfTraceError, bpf_trace_of, prog_stats


def kprobe_prog(text: str, name: str, maps: dict) -> BpfProg:
    return BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name=name, license="GPL", maps=maps)


# cnt[1] += r8 (cnt at fd 4), r0 = 5: the end of the prog-array targets below
ADD_R8_TO_CNT1 = add_reg_asm(slot=1, fd=4, r0=5)
ADD_R8_TO_SLOT0 = add_reg_asm()


def loop_prog(arch: str) -> BpfProg:
    """sums[0] += sum(range(PARM1 & 63)): a for loop over a bound the verifier cannot
    unroll (a backward branch per iteration)."""
    sums = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="sums")
    text = f"""
        ldxdw r6, [r1+{parm_offset(arch)}]
        and r6, 63
        mov r7, 0
        mov r8, 0
    loop:
        jge r7, r6, done
        add r8, r7
        add r7, 1
        ja loop
    done:""" + ADD_R8_TO_SLOT0
    return kprobe_prog(text, "loop", {3: sums})


def callee_loop_prog(arch: str) -> BpfProg:
    """The same sum, from a bpf-to-bpf callee that loops (its frame, the caller's r6-r9
    kept), called twice: sums[0] += 2 * sum(range(PARM1 & 31))."""
    sums = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="sums")
    text = f"""
        ldxdw r1, [r1+{parm_offset(arch)}]
        and r1, 31
        mov r6, r1
        call local sum
        mov r8, r0
        mov r1, r6
        call local sum
        add r8, r0
        stw [r10-4], 0
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +1
        lock add [r0], r8
        mov r0, 0
        exit
    sum:
        mov r0, 0
        mov r2, 0
    again:
        jge r2, r1, out
        add r0, r2
        add r2, 1
        ja again
    out:
        exit"""
    return kprobe_prog(text, "callee_loop", {3: sums})


def spin_prog(arch: str, at: int) -> BpfProg:
    """Counts hits, but spins for ever when PARM1 == ``at`` (the budget ends it)."""
    sums = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name="sums")
    text = f"""
        ldxdw r6, [r1+{parm_offset(arch)}]
        mov r8, 1
        jne r6, {at}, done
    spin:
        add r8, 1
        jne r6, -1, spin
    done:""" + ADD_R8_TO_SLOT0
    return kprobe_prog(text, "spin", {3: sums})


def _u64(mp, key: int = 0) -> int:
    return int.from_bytes(mp.lookup(key)[:8], "little")


def _no_nested(monkeypatch) -> list[int]:
    nested: list[int] = []
    execute = ScratchJit.execute
    monkeypatch.setattr(ScratchJit, "execute",
                        lambda self, *a: nested.append(1) or execute(self, *a))
    return nested


# -- loops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_a_loop_runs_from_the_stub_as_the_python_engine(arch, hit_path, monkeypatch) -> None:
    """Against the compiled Python engine and the interpreter."""
    jp, pp, ip = loop_prog(arch), loop_prog(arch), loop_prog(arch)
    assert direct_eligible(jp) is None
    jit, py, it = Lab(arch, jp, "jit"), Lab(arch, pp, "python"), Lab(arch, ip, "interp")
    assert jit.run(3) == py.run(3) == it.run(3)
    assert list(jit.stubs) == [jit.p.addr]
    nested = _no_nested(monkeypatch)
    assert jit.run(70) == py.run(70) == it.run(70)    # PARM1 & 63: up to 63 iterations a hit
    assert nested == []
    want = sum(sum(range(i)) for i in range(3)) + sum(sum(range(i & 63)) for i in range(70))
    assert _u64(jp.maps[3]) == _u64(pp.maps[3]) == _u64(ip.maps[3]) == want
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == prog_stats(ip).run_cnt == 73
    assert jit.p.hits == py.p.hits == it.p.hits == 73 and jit.posts == py.posts == it.posts


@pytest.mark.parametrize("arch", ARCHES)
def test_a_loop_from_an_optprobe_thunk(arch) -> None:
    """The thunk enters the image with the run's budget (kept on the Thunk) and the guest
    goes on as unprobed."""
    prog = loop_prog(arch)
    lab, p, _event = opt_lab(arch, prog)
    plain = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    for n in (2, 64, 9):
        assert lab.call("hot_call", n) == plain.call("hot_call", n)
    dc = direct_calls_of(lab.machine)
    assert p.addr in dc.thunks and dc.thunks[p.addr].budget == 1_000_000
    assert _u64(prog.maps[3]) == sum(sum(range(i & 63)) for n in (2, 64, 9) for i in range(n))


# f() puts a value in the budget register (callee-saved in both ABIs), calls g(9), the
# probed function, and returns the register: the stub must hand it back untouched
BUDGET_REG_GUEST = {
    "arm64": ("stp x29, x30, [sp, #-16]!; mov x27, #0x1234; mov x0, #9; bl g; mov x0, x27; "
              "ldp x29, x30, [sp], #16; ret; g: add x0, x0, #1; ret",
              bytes.fromhex("00040091")),               # g's first word: add x0, x0, #1
    "x86_64": ("push rbx; mov r12, 0x1234; mov edi, 9; call g; mov rax, r12; pop rbx; ret; "
               "g: lea rax, [rdi + 1]; ret", bytes.fromhex("488d4701")),   # lea rax, [rdi+1]
}


@pytest.mark.parametrize("arch", ARCHES)
def test_the_stub_keeps_the_guests_budget_register(arch) -> None:
    from probes.bpf.libbpf import KprobePerfEvent
    from probes.bpf.jit_guest import install_engine
    from probes.kprobes import Kprobe
    from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog

    src, first = BUDGET_REG_GUEST[arch]
    lab = ProbeLab.from_asm(arch, {"f": src})
    f = lab.addr_of("f")
    g = f + lab.machine.memory.read(f, 64).find(first)
    p = Kprobe(addr=g, post_handler=lambda p, regs, flags: None)
    lab.kprobes.register_kprobe(p)
    call = KprobePerfEvent(lab.machine, "g", kp=p)
    p.pre_handler = call.kprobe_perf_func
    prog = loop_prog(arch)                      # PARM1 = 9: nine backward branches a hit
    assert perf_event_attach_bpf_prog(
        PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog) == 0
    install_engine(lab.machine, "jit")
    assert [lab.call("f") for _ in range(3)] == [0x1234] * 3
    assert list(direct_calls_of(lab.machine).stubs) == [g] and p.hits == 3
    assert _u64(prog.maps[3]) == 3 * sum(range(9))


@pytest.mark.parametrize("arch", ARCHES)
def test_loops_inside_bpf_to_bpf_callees(arch, monkeypatch) -> None:
    jp, pp = callee_loop_prog(arch), callee_loop_prog(arch)
    assert direct_eligible(jp) is None
    jit, py = Lab(arch, jp, "jit"), Lab(arch, pp, "python")
    assert jit.run(2) == py.run(2)
    nested = _no_nested(monkeypatch)
    assert jit.run(40) == py.run(40)
    assert nested == [] and list(jit.stubs) == [jit.p.addr]
    want = 2 * sum(sum(range(i & 31)) for n in (2, 40) for i in range(n))
    assert _u64(jp.maps[3]) == _u64(pp.maps[3]) == want


@pytest.mark.parametrize("arch", ARCHES)
def test_a_spent_budget_ends_the_run_as_the_host_path_does(arch) -> None:
    """Hit 7 spins: on the stub (the JIT), the nested run (the JIT's first hit) and the
    compiled Python engine alike the run ends with the program's error (exit 2), naming the
    program and the budget; the guard is dropped, so the probe's later hits are not
    counted as recursion misses."""
    errors, runs = {}, {}
    for engine, first in (("jit", 3), ("python", 3), ("jit-nested", 0)):
        prog = spin_prog(arch, 7 if first else 0)
        lab = Lab(arch, prog, engine.split("-")[0])
        bpf_trace_of(lab.m).env.insn_budget = 5000
        if first:
            lab.run(first)                      # the stub is made (JIT)
        with pytest.raises(BpfTraceError) as e:
            lab.run(10)
        errors[engine] = e.value
        runs[engine] = (prog_stats(prog).run_cnt, lab.p.hits, _u64(prog.maps[3]))
        if engine == "jit":
            assert list(lab.stubs) == [lab.p.addr]
            dc = direct_calls_of(lab.m)
            assert lab.m.memory.read(dc.active_addr(0), 4) == bytes(4)
    for err in errors.values():
        assert err.prog == "spin" and err.exit_code == 2
        assert "instruction budget of 5000 exhausted" in err.reason
    assert errors["jit"].reason == errors["jit-nested"].reason
    assert runs["jit"] == runs["python"] == (3 + 7, 3 + 8, 3 + 7)   # hit 8 did not complete


# -- tail calls ----------------------------------------------------------------------------

def chain(arch: str, first: bool = True) -> tuple[BpfProg, dict]:
    """root: bpf_tail_call(ctx, jt, PARM1 & 1) then r0 = 9. jt[0] = selfloop (counts in
    cnt[0] and tail-calls jt[0] again: a chain of 33), jt[1] = target (counts in cnt[1],
    puts PARM1 in a hash map through the helper trampoline, r0 = 3)."""
    jt = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 2, name="jt")
    cnt = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 2, name="cnt")
    h = create_map(BpfMapType.BPF_MAP_TYPE_HASH, 8, 8, 64, name="h")
    selfloop = kprobe_prog("""
        mov r6, r1
        stw [r10-4], 0
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(4)
        call 1
        jeq r0, 0, +2
        mov r1, 1
        lock add [r0], r1
        mov r1, r6
        lddw r2, map_fd(3)
        mov r3, 0
        call 12
        mov r0, 7
        exit""", "selfloop", {3: jt, 4: cnt})
    target = kprobe_prog(f"""
        ldxdw r6, [r1+{parm_offset(arch)}]
        stxdw [r10-8], r6
        stxdw [r10-16], r6
        mov r2, r10
        add r2, -8
        mov r3, r10
        add r3, -16
        lddw r1, map_fd(5)
        mov r4, 0
        call 2
        stw [r10-4], 1
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(4)
        call 1
        jeq r0, 0, +2
        mov r1, 1
        lock add [r0], r1
        mov r0, 3
        exit""", "target", {4: cnt, 5: h})
    root = kprobe_prog(f"""
        ldxdw r3, [r1+{parm_offset(arch)}]
        and r3, 1
        lddw r2, map_fd(3)
        call 12
        mov r0, 9
        exit""", "root", {3: jt})
    jt.update(0, selfloop)
    if first:
        jt.update(1, target)
    return root, dict(jt=jt, cnt=cnt, h=h, selfloop=selfloop, target=target)


def _host_tail_calls(lab: Lab) -> list[int]:
    """Tail calls the host serves from now on (a target its routine's table lacks)."""
    jit = bpf_trace_of(lab.m).runner.jit
    addr = jit.stubs["tail_call"]
    calls: list[int] = []
    served = jit._direct_fns[addr]
    jit._direct_fns[addr] = lambda a: calls.append(a) or served(a)
    return calls


def _state(root: BpfProg, parts: dict, lab: Lab) -> tuple:
    keys = sorted(int.from_bytes(k, "little") for k in parts["h"].keys())
    return ([_u64(parts["cnt"], i) for i in range(2)], keys, prog_stats(root).run_cnt,
            lab.p.hits)


@pytest.mark.parametrize("arch", ARCHES)
def test_tail_call_chains_from_the_stub(arch, monkeypatch) -> None:
    """Chains of length 0 (a missing entry falls through to r0 = 9), 1 (the target,
    whose helper call is served in the same run) and 33 (selfloop, stopped by the
    count the stub zeroes before each program), as the Python engine runs them."""
    (jroot, jparts), (proot, pparts), (iroot, iparts) = chain(arch), chain(arch), chain(arch)
    assert direct_eligible(jroot) is None
    jit, py, it = Lab(arch, jroot, "jit"), Lab(arch, proot, "python"), Lab(arch, iroot, "interp")
    assert jit.run(3) == py.run(3) == it.run(3)
    assert list(jit.stubs) == [jit.p.addr]
    nested, host = _no_nested(monkeypatch), _host_tail_calls(jit)
    assert jit.run(10) == py.run(10) == it.run(10)
    for parts in (jparts, pparts, iparts):
        parts["jt"].delete(1)                   # chains of length 0 on odd PARM1
    assert jit.run(5) == py.run(5) == it.run(5)
    assert nested == [] and host == []          # the guest's lookup routine served them
    assert _state(jroot, jparts, jit) == _state(proot, pparts, py) == _state(iroot, iparts, it)
    evens = 2 + 5 + 3
    assert _u64(jparts["cnt"], 0) == 33 * evens     # the root's call is the first of 33
    assert _u64(jparts["cnt"], 1) == 1 + 5


@pytest.mark.parametrize("arch", ARCHES)
def test_a_prog_array_update_after_the_stub_exists_takes_effect(arch, monkeypatch) -> None:
    """jt[1] is empty when the stub is made, then gets a program never JITed (JITed at its
    first call, its helpers served by the root's run), is emptied and filled again."""
    (jroot, jparts), (proot, pparts) = chain(arch, first=False), chain(arch, first=False)
    jit, py = Lab(arch, jroot, "jit"), Lab(arch, proot, "python")
    assert jit.run(4) == py.run(4)
    assert list(jit.stubs) == [jit.p.addr]
    nested, host = _no_nested(monkeypatch), _host_tail_calls(jit)
    for n, fill in ((6, True), (3, False), (4, True)):
        for parts in (jparts, pparts):
            if fill:
                parts["jt"].update(1, parts["target"])
            else:
                parts["jt"].delete(1)
        assert jit.run(n) == py.run(n)
        assert _state(jroot, jparts, jit) == _state(proot, pparts, py)
    assert nested == [] and list(jit.stubs) == [jit.p.addr]
    assert len(host) == 1                       # the new target's first call JITed it
    assert _u64(jparts["cnt"], 1) == 3 + 2


def stack_target(parts: dict) -> BpfProg:
    """cnt[1] += bpf_get_stack(ctx, buf, 64, 0): a stack walk from the hit's registers,
    which only the host path has."""
    return kprobe_prog("""
        mov r2, r10
        add r2, -64
        mov r3, 64
        mov r4, 0
        call 67
        mov r8, r0""" + ADD_R8_TO_CNT1, "stack", {4: parts["cnt"]})


@pytest.mark.parametrize("arch", ARCHES)
def test_a_target_needing_the_host_sends_the_stub_back(arch) -> None:
    """An update that puts a program the guest code cannot run (a host-only helper) in
    the prog array drops the stubs that reach it: the next hits take the host path, with
    the Python engine's results; putting the old target back lets the stub come again."""
    (jroot, jparts), (proot, pparts) = chain(arch), chain(arch)
    jit, py = Lab(arch, jroot, "jit"), Lab(arch, proot, "python")
    assert jit.run(4) == py.run(4) and list(jit.stubs) == [jit.p.addr]
    for parts in (jparts, pparts):
        parts["jt"].update(1, stack_target(parts))
    assert jit.stubs == {}
    assert jit.run(6) == py.run(6)
    assert "tail call target stack: insn 4: helper call 67" in \
        direct_calls_of(jit.m).refused[jit.p.addr]
    assert _state(jroot, jparts, jit) == _state(proot, pparts, py)
    assert _u64(jparts["cnt"], 1) > 0                    # stacks were walked
    for parts in (jparts, pparts):
        parts["jt"].update(1, parts["target"])
    assert jit.run(5) == py.run(5)
    assert list(jit.stubs) == [jit.p.addr]
    assert _state(jroot, jparts, jit) == _state(proot, pparts, py)


def other_slot_target(arch: str, parts: dict) -> BpfProg:
    """cnt[1] += a callee-saved register's pt_regs slot (rbp / x29), which neither the
    root reads nor the stub keeps for itself."""
    from probes.arch import arch_ptrace

    off = 8 * arch_ptrace(arch).PT_REGS_FIELDS.index({"x86_64": "rbp", "arm64": "x29"}[arch])
    return kprobe_prog(f"""
        ldxdw r8, [r1+{off}]""" + ADD_R8_TO_CNT1, "other_slot", {4: parts["cnt"]})


@pytest.mark.parametrize("arch", ARCHES)
def test_a_target_reading_more_of_the_frame_rebuilds_the_stub(arch, monkeypatch) -> None:
    """The stub's frame holds the slots its programs read; a target put in later that
    reads another one sends the stub back, and the next hit builds one with that slot."""
    (jroot, jparts), (proot, pparts) = chain(arch, first=False), chain(arch, first=False)
    jit, py = Lab(arch, jroot, "jit"), Lab(arch, proot, "python")
    assert jit.run(4) == py.run(4) and list(jit.stubs) == [jit.p.addr]
    narrow = direct_calls_of(jit.m).stubs[jit.p.addr].slots
    for parts in (jparts, pparts):
        parts["jt"].update(1, other_slot_target(arch, parts))
    assert jit.stubs == {}
    nested = _no_nested(monkeypatch)
    assert jit.run(7) == py.run(7)
    assert nested == [] and list(jit.stubs) == [jit.p.addr]
    wide = direct_calls_of(jit.m).stubs[jit.p.addr].slots
    assert narrow is not None and wide is not None and narrow < wide
    assert _state(jroot, jparts, jit) == _state(proot, pparts, py)
    assert _u64(jparts["cnt"], 1) != 0


@pytest.mark.parametrize("arch", ARCHES)
def test_a_tail_called_program_spending_the_budget_names_the_root(arch) -> None:
    """The budget trampoline finds the stub's call from the return address a tail call
    keeps at the top of the BPF stack: the error names the program the hit entered."""
    for engine in ("jit", "python"):
        spin = spin_prog(arch, 7)
        jt = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, name="jt")
        jt.update(0, spin)
        root = kprobe_prog("lddw r2, map_fd(4)\nmov r3, 0\ncall 12\nmov r0, 0\nexit",
                           "tail_root", {4: jt})
        lab = Lab(arch, root, engine)
        bpf_trace_of(lab.m).env.insn_budget = 3000
        lab.run(4)
        if engine == "jit":
            assert list(lab.stubs) == [lab.p.addr]
        with pytest.raises(BpfTraceError) as e:
            lab.run(9)
        assert e.value.prog == "tail_root" and "budget of 3000 exhausted" in e.value.reason
        assert _u64(spin.maps[3]) == 4 + 7 and prog_stats(root).run_cnt == 4 + 7


@pytest.mark.parametrize("arch", ARCHES)
def test_the_nested_run_reads_the_prog_array_at_each_call_too(arch) -> None:
    """A root the stub cannot take (a host-only helper: bpf_get_stack walks the hit's
    saved registers) runs nested on every hit; a target put in its prog array after its
    first hit is JITed at its first call there too. Both walks see the hit's frames."""
    results = {}
    for engine in ("jit", "python"):
        cnt = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 2, name="cnt")
        jt = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, name="jt")
        root = kprobe_prog("""
            mov r6, r1
            mov r2, r10
            add r2, -64
            mov r3, 64
            mov r4, 0
            call 67
            mov r1, r6
            lddw r2, map_fd(3)
            mov r3, 0
            call 12
            mov r0, 2
            exit""", "stack_root", {3: jt})
        lab = Lab(arch, root, engine)
        out = [lab.run(3)]
        jt.update(0, stack_target({"cnt": cnt}))
        out += [lab.run(4), _u64(cnt, 1), prog_stats(root).run_cnt]
        if engine == "jit":
            assert direct_calls_of(lab.m).refused[lab.p.addr].startswith(
                "stack_root: insn 5: helper call 67")
        results[engine] = out
    assert results["jit"] == results["python"] and results["jit"][2] != 0


@pytest.mark.parametrize("arch", ARCHES)
def test_tail_calls_from_an_optprobe_thunk(arch) -> None:
    root, parts = chain(arch)
    lab, p, _event = opt_lab(arch, root)
    plain = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    for n in (3, 12):
        assert lab.call("hot_call", n) == plain.call("hot_call", n)
    assert p.addr in direct_calls_of(lab.machine).thunks
    assert _u64(parts["cnt"], 0) == 33 * (2 + 6) and _u64(parts["cnt"], 1) == 1 + 6
    assert sorted(int.from_bytes(k, "little") for k in parts["h"].keys()) == [1, 3, 5, 7, 9, 11]


# -- the verifier's side -----------------------------------------------------------------

def test_callx_and_ld_abs_cannot_reach_a_stub() -> None:
    """The verifier refuses callx (unknown opcode 8d) and LD_ABS/LD_IND (not allowed for
    this program type) in kprobe programs: they stay refused with that reason."""
    from probes.bpf.errors import VerifierError

    for text in ("mov r6, r1\nldabsw 0\nexit", "mov r2, 0\ncallx r2\nmov r0, 0\nexit"):
        with pytest.raises(VerifierError):
            kprobe_prog(text, "x", {}).load()


# -- several CPUs ------------------------------------------------------------------------

def cpu_chain() -> BpfProg:
    """root tail-calls jt[0], which loops 4 times and adds 4 to by_cpu[this CPU]: the
    budget and the tail-call count of each CPU's stub."""
    from test_bpf_jit_stub_cpus import by_cpu_prog

    by_cpu = by_cpu_prog().maps[3]
    jt = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, name="jt")
    target = kprobe_prog("""
        mov r8, 0
        mov r7, 0
    loop:
        add r8, 1
        add r7, 1
        jlt r7, 4, loop
        call 8
        stxw [r10-4], r0
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +1
        lock add [r0], r8
        mov r0, 0
        exit""", "per_cpu", {3: by_cpu})
    jt.update(0, target)
    return kprobe_prog("""
        lddw r2, map_fd(4)
        mov r3, 0
        call 12
        mov r0, 1
        exit""", "root", {3: by_cpu, 4: jt})


@pytest.mark.parametrize("arch", ARCHES)
def test_loops_and_tail_calls_on_each_cpus_stub(c_prog, arch) -> None:
    from test_bpf_jit_stub_cpus import CALLS, PER_CPU, SMP, CpuLab

    exe = c_prog(arch, SMP / "percpu.c", extra=("-pthread",))
    jp, pp = cpu_chain(), cpu_chain()
    jit, py = CpuLab(exe, "jit", jp), CpuLab(exe, "python", pp)
    assert jit.run() == py.run()
    counts = [[_u64(p.maps[3], c) for c in range(2)] for p in (jp, pp)]
    assert counts[0] == counts[1] == [4 * n for n in PER_CPU]
    dc = direct_calls_of(jit.m)
    assert sorted(k[2] for k in dc.copies) == [0, 1]
    assert all(t.budget == 1_000_000 for t in dc.copies.values())
    assert jit.p.hits == py.p.hits == sum(CALLS)
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == sum(CALLS)


# -- every attach point's stub -------------------------------------------------------------

def loop_and_tail(prog_type: BpfProgType, off: int) -> BpfProg:
    """slot 0 += sum(range(ctx[off] & 15)) (a loop), then a tail call to a program of the
    same type that adds 3 to slot 1 in a loop of its own."""
    cnt = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8, 2, name="cnt")
    jt = create_map(BpfMapType.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, name="jt")
    add = """
        stw [r10-4], {key}
        mov r2, r10
        add r2, -4
        lddw r1, map_fd(3)
        call 1
        jeq r0, 0, +1
        lock add [r0], r8"""

    def prog(text: str, name: str, maps: dict) -> BpfProg:
        return BpfProg.from_bytes(assemble(text), prog_type=prog_type, name=name,
                                  license="GPL", maps=maps)

    jt.update(0, prog("""
        mov r8, 0
        mov r7, 0
    again:
        add r8, 1
        add r7, 1
        jlt r7, 3, again""" + add.format(key=1) + "\nmov r0, 1\nexit", "leaf", {3: cnt}))
    return prog(f"""
        mov r9, r1
        ldxdw r6, [r1+{off}]
        and r6, 15
        mov r7, 0
        mov r8, 0
    loop:
        jge r7, r6, done
        add r8, r7
        add r7, 1
        ja loop
    done:""" + add.format(key=0) + """
        mov r1, r9
        lddw r2, map_fd(4)
        mov r3, 0
        call 12
        mov r0, 1
        exit""", "loop_tail", {3: cnt, 4: jt})


def _attach_lab(kind: str, arch: str, engine: str) -> tuple[BpfProg, object, callable]:
    """(program, lab, run) for `kind`: run() runs the guest (or its calls) once."""
    if kind in ("tp", "raw_tp"):
        from test_bpf_jit_stub_tracepoint import TYPE, V_OFF, TpLab
        prog = loop_and_tail(TYPE[kind], V_OFF[kind])
        lab = TpLab(arch, kind, prog, engine, 12)
        return prog, lab, lambda: (lab.run(), lab.stubs(kind))
    kprobe = BpfProgType.BPF_PROG_TYPE_KPROBE
    if kind == "kretprobe":
        from test_bpf_jit_stub_kretprobe import RC_OFF, RetLab
        prog = loop_and_tail(kprobe, RC_OFF[arch])
        lab = RetLab(arch, prog, engine)
        return prog, lab, lambda: (lab.run(3), lab.run(30), list(lab.stubs))
    from test_bpf_jit_stub_ftrace import FtraceLab
    prog = loop_and_tail(kprobe, parm_offset(arch))
    lab = FtraceLab(arch, prog, engine, post=False)
    return prog, lab, lambda: (lab.run(), list(lab.stubs))


@pytest.mark.parametrize("kind", ["kretprobe", "ftrace", "tp", "raw_tp"])
@pytest.mark.parametrize("arch", ARCHES)
def test_every_stub_runs_loops_and_tail_calls(arch, kind, monkeypatch) -> None:
    nested = _no_nested(monkeypatch)
    jp, _jlab, jrun = _attach_lab(kind, arch, "jit")
    pp, _plab, prun = _attach_lab(kind, arch, "python")
    jout, pout = jrun(), prun()
    assert jout[:-1] == pout[:-1]                # the guest's results
    assert len(jout[-1]) == 1                    # the stub exists
    assert nested == [1]                         # the first hit only (it JITed the programs)
    got = [_u64(jp.maps[3], k) for k in range(2)]
    assert got == [_u64(pp.maps[3], k) for k in range(2)]
    assert got[1] > 0 and got[1] % 3 == 0
    assert prog_stats(jp).run_cnt == prog_stats(pp).run_cnt == got[1] // 3
