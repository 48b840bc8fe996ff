"""The cycle model at run time: per-block accounting (native and Python counters), the
one clock behind every guest-visible counter and timestamp, determinism, probe costs by
reason, `emu run --cycles`."""
from __future__ import annotations

import dataclasses
import io
import json
import re

import pytest

from conftest import ARCHES, firmware_elf, run_emu
from emu.clock import EPOCH_NS, FP_SHIFT, Clock
from emu.cycles import load_profile, profile_for
from emu.cycles import native
from emu.loader import GuestConfig
from emu.session import Session
from probes.kprobes import Kprobe
from probes.testing import ProbeLab

HAVE_NATIVE = native.load() is not None


def run_guest(arch: str, name: str, profile: str | None = None, argv=(), use_native=None):
    out = io.BytesIO()
    s = Session.load(GuestConfig(path=str(firmware_elf(arch, name)), arch="auto", argv=list(argv)),
                     io.BytesIO(), out, io.BytesIO())
    model = s.machine.enable_cycle_model(profile, use_native=use_native)
    result = s.run(timeout=60)
    assert result.exit_code == 0, result.message
    return s.machine.clock, model, out.getvalue()


# --- determinism and the two counters ---------------------------------------------------------
@pytest.mark.parametrize("profile", ["cortex-a72", "cortex-a55", "skylake"])
@pytest.mark.slow
def test_two_runs_same_cycles_instructions_output(profile):
    arch = load_profile(profile).isa
    a_clock, a_model, a_out = run_guest(arch, "callpath", profile)
    b_clock, b_model, b_out = run_guest(arch, "callpath", profile)
    assert a_out == b_out and b"open(" in a_out
    assert a_clock.acc.fp == b_clock.acc.fp > 0
    assert a_model.counts() == b_model.counts()
    assert a_clock.breakdown() == b_clock.breakdown()


@pytest.mark.skipif(not HAVE_NATIVE, reason="no C compiler for the native counter")
@pytest.mark.parametrize("arch", ARCHES)
def test_native_and_python_counters_agree(arch):
    n_clock, n_model, n_out = run_guest(arch, "hotloop", None, ["3000", "300"], use_native=True)
    p_clock, p_model, p_out = run_guest(arch, "hotloop", None, ["3000", "300"], use_native=False)
    assert n_model.native and not p_model.native
    assert n_out == p_out
    assert n_clock.acc.fp == p_clock.acc.fp
    assert n_model.counts() == p_model.counts()


@pytest.mark.parametrize("arch", ARCHES)
def test_instruction_count_matches_a_code_hook(arch):
    from unicorn import UC_HOOK_CODE
    lab = ProbeLab.load(firmware_elf(arch, "recurse"))
    model = lab.machine.enable_cycle_model()
    n = [0]

    def count(*_a):
        n[0] += 1
    lab.machine.uc.hook_add(UC_HOOK_CODE, count)
    lab.call("fib", 12)
    # The lab's halt stub: `hlt` traps before it retires (pc stays on it: an undefined
    # instruction at EL0, #GP at CPL3) and the model takes its cost back when the run stops.
    unretired = 1
    assert model.instructions == n[0] - unretired > 1000


@pytest.mark.parametrize("arch", ARCHES)
def test_loop_cost_is_block_cost_plus_loop_back(arch):
    """A one-block loop that fits the loop buffer pays `loop_back` on its back edge, not
    `branch_taken` (profiles: notes.loop_back)."""
    lab = ProbeLab.load(firmware_elf(arch, "hotloop"))
    model = lab.machine.enable_cycle_model()
    acc = lab.machine.clock.acc

    def fp_of(n: int) -> int:
        before = acc.fp
        lab.call("hot_loop", n)
        return acc.fp - before

    f100, f101, f200 = fp_of(100), fp_of(101), fp_of(200)
    per_iter = f101 - f100
    assert f200 - f100 == 100 * per_iter
    prof = model.profile
    assert prof.loop_back < prof.branch_taken
    back = prof.loop_back << FP_SHIFT
    loop = [(a, b) for (a, _s), b in model.blocks.items() if b.cost.cost + back == per_iter
            and b.cost.cond and b.cost.n <= prof.loop_buffer]
    assert loop, "one iteration = the loop block + its loop-back edge"
    sym = lab.machine.symbols.lookup("hot_loop")
    assert any(sym.addr <= a < sym.addr + sym.size for a, _b in loop)


def test_mispredicts_with_a_one_bit_predictor():
    prof = dataclasses.replace(load_profile("skylake"), mispredict_rate=1)
    lab = ProbeLab.load(firmware_elf("x86_64", "hotloop"))
    lab.machine.enable_cycle_model(prof)
    lab.call("hot_loop", 1000)
    first = lab.machine.clock.breakdown()["mispredict"]
    lab.call("hot_loop", 1000)
    # a loop branch mispredicts at its exit and on re-entry only, not per iteration
    assert lab.machine.clock.breakdown()["mispredict"] - first <= 3 * prof.branch_mispredict


@pytest.mark.parametrize("arch", ARCHES)
def test_a_run_stopped_inside_a_block_pays_only_for_its_prefix(arch):
    """A run stopped mid-block (here by max_insns) takes back the part not run; the run
    that resumes there is not charged a taken branch."""
    one = {"arm64": "add x2, x2, #1", "x86_64": "add rbx, 1"}[arch]
    lab = ProbeLab.from_asm(arch, {"f": "; ".join([one] * 12) + "; ret"})
    model = lab.machine.enable_cycle_model()
    m, f = lab.machine, lab.addr_of("f")
    r = m.run(begin=f, max_insns=5)
    assert r.reason.value == "limit" and m.pc == f + 5 * 4
    block = model.blocks[max(k for k in model.blocks if k[0] == f)]
    assert model.instructions == 5
    assert m.clock.acc.fp == (model.profile.branch_taken << FP_SHIFT) + block.cost.prefix[4]
    taken = m.clock.breakdown().get("branch", 0)
    m.run(max_insns=3)
    assert model.instructions == 8 and m.clock.breakdown().get("branch", 0) == taken


# --- guest-visible counters -------------------------------------------------------------------
def _counters_delta(out: bytes) -> int:
    return int(re.search(rb" delta=(\d+)", out).group(1))


@pytest.mark.parametrize("arch", ARCHES)
def test_counters_elf_sees_the_modelled_count(arch):
    """read_cycles() around spin(100000): rdtsc (cycles) / cntvct_el0 (counter ticks)."""
    clock, _, out = run_guest(arch, "counters")
    assert b"monotonic=yes" in out
    lab = ProbeLab.load(firmware_elf(arch, "counters"))
    lab.machine.enable_cycle_model()
    lab.call("spin", 1000)                       # warm up: translate and cost the blocks
    c0 = lab.machine.clock.cycles
    lab.call("spin", 100000)
    spin = lab.machine.clock.cycles - c0
    delta = _counters_delta(out)
    if arch == "x86_64":
        assert spin <= delta <= spin + 200        # plus the call and the counter reads
    else:
        ticks = spin * clock.counter_hz // clock.freq_hz
        assert ticks <= delta <= ticks + 3
    assert _counters_delta(run_guest(arch, "counters")[2]) == delta


def test_counters_follow_the_profile():
    a72 = _counters_delta(run_guest("arm64", "counters", "cortex-a72")[2])
    a55 = _counters_delta(run_guest("arm64", "counters", "cortex-a55")[2])
    assert a72 != a55 and min(a72, a55) > 1000


READS = {
    "arm64": ("mrs x1, pmccntr_el0; {pad}; mrs x0, pmccntr_el0; sub x0, x0, x1; {pad}; {pad}; ret",
              "add x2, x2, #1"),
    "x86_64": ("rdtsc; mov rcx, rax; {pad}; rdtsc; sub rax, rcx; {pad}; {pad}; ret", "add rbx, 1"),
}


@pytest.mark.parametrize("arch", ARCHES)
def test_a_counter_read_sees_only_the_block_prefix(arch):
    src, one = READS[arch]
    pad = "; ".join([one] * 8)
    lab = ProbeLab.from_asm(arch, {"f": src.format(pad=pad)})
    model = lab.machine.enable_cycle_model()
    delta = lab.call("f")
    block = max(model.blocks.values(), key=lambda b: b.cost.n)
    i, j = 0, 10                                  # the two reads
    between = block.cost.prefix[j] - block.cost.prefix[i]
    expected = (between + (lab.machine.clock.counter_read_cost << FP_SHIFT)) >> FP_SHIFT
    assert expected - 1 <= delta <= expected + 1
    # the reads bracket a third of the block, not all of it
    assert (delta - lab.machine.clock.counter_read_cost) * 2 < block.cost.cost >> FP_SHIFT


@pytest.mark.parametrize("arch", ARCHES)
def test_back_to_back_counter_reads_strictly_increase(arch):
    src = {"arm64": "mrs x1, pmccntr_el0; mrs x0, pmccntr_el0; sub x0, x0, x1; ret",
           "x86_64": "rdtsc; mov rcx, rax; rdtsc; sub rax, rcx; ret"}[arch]
    lab = ProbeLab.from_asm(arch, {"f": src})
    lab.machine.enable_cycle_model()
    assert lab.call("f") >= lab.machine.clock.counter_read_cost


def test_one_cycle_model_per_machine():
    from emu.cycles import ProfileError
    lab = ProbeLab.load(firmware_elf("arm64", "hotloop"))
    model = lab.machine.enable_cycle_model("cortex-a55")
    assert lab.machine.enable_cycle_model() is model
    assert lab.machine.enable_cycle_model("cortex-a55") is model
    with pytest.raises(ProfileError, match="already on with profile cortex-a55"):
        lab.machine.enable_cycle_model("cortex-a72")


def test_clock_conversions_are_integer_math():
    c = Clock()
    prof = profile_for("x86_64")
    c.freq_hz, c.counter_hz = prof.freq_hz, prof.counter_hz
    c.advance(3_000_000_001, "code")
    assert c.monotonic_ns() == 1_000_000_000         # floor(3e9+1 cycles / 3 GHz)
    assert c.realtime_ns() == EPOCH_NS + 1_000_000_000
    c.cycles = 7
    assert c.acc.fp == 7 << FP_SHIFT and c.cycles == 7
    c.counter_hz = 25_000_000
    assert c.read_counter() == (7 + c.counter_read_cost) * 25_000_000 // prof.freq_hz


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.slow
def test_clock_gettime_and_traces_are_reproducible(arch, tmp_path):
    outs = []
    for i in range(2):
        trace = tmp_path / f"trace{i}.txt"
        r = run_emu("run", "--cycles", "--ftrace-filter", "fib", "--trace-out", str(trace),
                    str(firmware_elf(arch, "recurse.ftrace")))
        assert r.rc == 0, r.err
        lines = trace.read_text().splitlines()
        stamps = [float(line.split()[3].rstrip(":")) for line in lines]
        assert len(lines) > 100 and stamps == sorted(stamps) and stamps[-1] > 0
        outs.append((r.stdout, trace.read_text(), r.err))
    assert outs[0] == outs[1]
    clock = [run_emu("run", "--cycles", str(firmware_elf(arch, "libc-clock"))) for _ in range(2)]
    assert clock[0].stdout == clock[1].stdout and b"advanced: yes" in clock[0].stdout


# --- probes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHES)
def test_probe_costs_come_from_the_profile_with_reasons(arch):
    lab = ProbeLab.load(firmware_elf(arch, "hotloop"))
    model = lab.machine.enable_cycle_model()
    prof, clock = model.profile, lab.machine.clock
    assert (clock.exc_entry, clock.single_step, clock.handler_cost, clock.freq_hz) == \
        (prof.exc_entry, prof.single_step, prof.handler, prof.freq_hz)
    p = Kprobe(symbol_name="hot_leaf", pre_handler=lambda p, r: 0, post_handler=lambda p, r, f: None)
    lab.kprobes.register_kprobe(p)
    lab.call("hot_call", 50)
    assert p.hits == 50
    bd = clock.breakdown()
    assert bd["trap"] == 50 * (prof.exc_entry + prof.exc_return)
    assert bd["handler"] == 50 * 2 * prof.handler
    assert bd["step"] >= 50 * prof.single_step
    assert bd["probe-code"] > 0                      # the out-of-line slot ran as guest code


@pytest.mark.parametrize("arch", ARCHES)
def test_text_poke_forgets_block_costs(arch):
    lab = ProbeLab.load(firmware_elf(arch, "hotloop"))
    model = lab.machine.enable_cycle_model()
    lab.call("hot_call", 10)
    leaf = lab.addr_of("hot_leaf")
    before = {k for k in model.blocks if k[0] <= leaf < k[0] + k[1]}
    assert before
    lab.kprobes.register_kprobe(Kprobe(symbol_name="hot_leaf", pre_handler=lambda p, r: 0))
    assert not before & set(model.blocks)
    if model.native:
        table = model.counts()
        assert table["blocks"] > 0
    lab.call("hot_call", 10)
    assert any(k[0] == leaf for k in model.blocks)


# --- the CLI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHES)
def test_emu_run_cycles_stats_and_exit_line(arch, tmp_path):
    stats = tmp_path / "s.json"
    r = run_emu("run", "--cycles", "--stats", str(stats), str(firmware_elf(arch, "hotloop")),
                "--", "1000", "100")
    assert r.rc == 0, r.err
    data = json.loads(stats.read_text())
    m = re.search(r"cycles: (\d+) instructions: (\d+) profile: (\S+)", r.err)
    assert m, r.err
    assert (data["cycles"], data["instructions"], data["profile"]) == \
        (int(m[1]), int(m[2]), profile_for(arch).name)
    assert data["cycles_by_reason"]["code"] > 0 and data["cycles_by_reason"]["syscall"] > 0
    assert sum(data["cycles_by_reason"].values()) <= data["cycles"] + 4


def test_emu_run_profile_choice_and_errors():
    elf = str(firmware_elf("arm64", "hotloop"))
    a72 = run_emu("run", "--cycles", elf, "--", "1000", "100")
    a55 = run_emu("run", "--profile", "cortex-a55", elf, "--", "1000", "100")
    insns = [re.search(r"instructions: (\d+)", r.err)[1] for r in (a72, a55)]
    cycles = [re.search(r"cycles: (\d+)", r.err)[1] for r in (a72, a55)]
    assert insns[0] == insns[1] and cycles[0] != cycles[1]
    assert "profile: cortex-a55" in a55.err
    bad = run_emu("run", "--profile", "skylake", elf)
    assert bad.rc == 2 and "skylake is for x86_64" in bad.err
    plain = run_emu("run", elf, "--", "1000", "100")
    assert "cycles:" not in plain.err
