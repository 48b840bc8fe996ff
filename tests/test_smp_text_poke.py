"""Cross-modifying code on several CPUs (issue 19): live text pokes follow the kernel's
protocols (x86 text_poke_bp with the int3 emulation, arm64 single-instruction writes /
stop_machine) through probes/text_poke.py. A static key flipped from a kprobe while another
CPU runs its jump-label site: the naive byte-by-byte rewrite tears the instruction (a
fault, the same for a given seed), the protocol never does over many seeds. Live
optimization of kprobes on several CPUs keeps exact counts."""
from __future__ import annotations

import json

import pytest

from conftest import ARCHES, ROOT, run_emu
from emu.machine import Machine
from probes.arch.x86_64.text_poke import INT3
from probes.arch.x86_64.text_poke import poke_emulate as emulate_x86
from probes.text_poke import PokeMode, TextPoker

SMP = ROOT / "tests" / "data" / "smp"
GOOD = "flips=20 others=0 saw_both=1 runner=ok\n"


@pytest.fixture(scope="module")
def xmodify(c_prog):
    return lambda arch: c_prog(arch, SMP / "xmodify.c",
                               extra=("-pthread", "-I", str(ROOT / "firmware" / "include")))


def _flip(exe, mode: str, seed: int, cpus: str = "2"):
    return run_emu("run", "--cpus", cpus, "--seed", str(seed), "--timeout", "120",
                   "--text-poke", mode, "--flip-static-key", "flip_key@flip", str(exe), "--", "20")


# --- the plans ------------------------------------------------------------------------------
def test_plans_are_the_kernels():
    x86 = TextPoker(Machine("x86_64"))
    x86.mode = PokeMode.PROTOCOL
    jmp = bytes.fromhex("e9 10 00 00 00")
    assert x86.plan(0x1000, jmp) == ([[(0x1000, bytes((INT3,)))], [(0x1001, jmp[1:])],
                                      [(0x1000, jmp[:1])]], True)
    assert x86.plan(0x1000, b"\xcc") == ([[(0x1000, b"\xcc")]], False)   # one byte: atomic
    arm = TextPoker(Machine("arm64"))
    two = bytes(8)
    assert arm.plan(0x1000, two[:4]) == ([[(0x1000, two[:4])]], False)    # one insn: atomic
    assert arm.plan(0x1000, two) == ([[(0x1000, two)]], False)            # stop_machine
    for poker in (x86, arm):
        poker.mode = PokeMode.NAIVE
        assert poker.plan(0x1000, jmp[:4]) == ([[(0x1000 + i, jmp[i:i + 1])] for i in range(4)],
                                               False)


def test_int3_emulation_of_the_new_instruction():
    m = Machine("x86_64")
    m.memory.map(0x10000, 0x1000, 3, "[stack]")
    m.sp = 0x10800
    assert emulate_x86(m, 0x4000, bytes.fromhex("e9 fb 0f 00 00")) and m.pc == 0x5000
    assert emulate_x86(m, 0x4000, bytes.fromhex("0f 1f 44 00 00")) and m.pc == 0x4005
    assert emulate_x86(m, 0x4000, bytes.fromhex("e8 fb 0f 00 00"))
    assert (m.pc, m.sp) == (0x5000, 0x107F8)
    assert int.from_bytes(m.memory.read(0x107F8, 8), "little") == 0x4005
    assert emulate_x86(m, 0x5000, b"\xc3") and (m.pc, m.sp) == (0x4005, 0x10800)
    assert not emulate_x86(m, 0x4000, bytes.fromhex("48 89 c7"))    # not a patchable insn


# --- the demonstration --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHES)
def test_protocol_keeps_every_cpu_on_a_whole_instruction(xmodify, arch):
    r = _flip(xmodify(arch), "protocol", 1)
    assert (r.rc, r.out) == (0, GOOD), r.err
    flips, pokes, emulated = map(int, _report(r.err))
    assert flips == 20 and pokes == 20
    if arch == "x86_64":
        assert emulated > 0                  # the runner met the int3 and was let through


@pytest.mark.parametrize("arch", ARCHES)
def test_naive_patch_tears_an_instruction_deterministically(xmodify, arch):
    exe = xmodify(arch)
    first = _flip(exe, "naive", 1)
    assert first.rc == 139 and first.out != GOOD
    fault = [line for line in first.err.splitlines() if "guest fault" in line]
    assert len(fault) == 1, first.err
    assert _flip(exe, "naive", 1) == first               # the same tear, byte for byte


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_protocol_over_many_seeds_naive_tears_for_some(xmodify, arch):
    exe = xmodify(arch)
    for seed in range(8):
        r = _flip(exe, "protocol", seed, cpus="4" if seed % 2 else "2")
        assert (r.rc, r.out) == (0, GOOD), (seed, r.err)
    torn = [seed for seed in range(8) if _flip(exe, "naive", seed).out != GOOD]
    assert torn


def test_one_cpu_has_nothing_to_tear(xmodify):
    r = _flip(xmodify("x86_64"), "naive", 1, cpus="1")
    assert (r.rc, r.out) == (0, GOOD), r.err
    assert _report(r.err)[1:] == ("0", "0")               # no poke met a running CPU


def _report(err: str) -> tuple[str, ...]:
    import re
    m = re.search(r"(\d+) flips, (\d+) pokes while other CPUs ran, (\d+) int3 hits", err)
    assert m, err
    return m.groups()


# --- live optimization on several CPUs ---------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHES)
def test_live_optimization_on_four_cpus_counts_exactly(c_prog, arch, tmp_path):
    exe = c_prog(arch, SMP / "percpu.c", extra=("-pthread",))
    stats = tmp_path / "stats.json"
    r = run_emu("run", "--cpus", "4", "--optimize", "--kprobe", "work", "--stats", str(stats),
                str(exe), "--", "5")
    assert r.rc == 0, r.err
    (probe,) = json.loads(stats.read_text())["probes"]
    assert (probe["kind"], probe["hits"], probe["nmissed"]) == ("optimized", 2500, 0)
