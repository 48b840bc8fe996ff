"""The probe-everywhere sweep (probes/sweep.py) in its kretprobe and optprobe modes, on a
representative slice of the firmware (the full sweep over every function of every program
is benchmarks/sweep_all.py): no mismatches, the expected refusals, hit counts that agree
with the programs' own call counts and with the breakpoint sweep, and the CLI."""
from __future__ import annotations

import json

import pytest

from conftest import FIRMWARE, firmware_elf
from probes.sweep import SweepConfig, sweep

# Functions of callpath the kernel would not probe (firmware/README.md).
CALLPATH_REFUSED = {"syscall_entry": "NOKPROBE", "do_trap": "NOKPROBE",
                    "handle_bad_syscall": "kprobes", "enter_from_user_mode": "noinstr"}


def mismatches(res) -> list[str]:
    return [f"{r.function}+{r.offset:#x} {r.insn}: {r.detail}" for r in res.results
            if r.verdict == "MISMATCH"]


def calls_from_output(arch: str, prog: str) -> dict[str, int]:
    """recurse's `name(args) = v calls=N` lines summed per function."""
    calls: dict[str, int] = {}
    for line in (FIRMWARE / "expected" / arch / f"{prog}.out").read_text().splitlines():
        if " calls=" in line:
            name = line.split("(", 1)[0]
            calls[name] = calls.get(name, 0) + int(line.rsplit("calls=", 1)[1])
    calls["is_even"] = calls["is_odd"] = calls.pop("is_even") // 2    # they share one counter
    return calls


@pytest.mark.parametrize("prog", ["recurse", "recurse.ftrace"])
@pytest.mark.slow
def test_kretprobe_mode_recurse(arch, prog):
    """A kretprobe on every function: the guest is unchanged, and each entry count equals
    the calls the program itself reports (is_even/is_odd share a counter: 96 in all)."""
    res = sweep(SweepConfig(path=str(firmware_elf(arch, prog)), mode="kretprobe", jobs=2))
    assert not mismatches(res)
    by = {r.function: r for r in res.results}
    start = by.pop("_start")             # the program entry: no return address to hijack
    assert start.verdict == "rejected" and start.detail.startswith("-EINVAL")
    assert all(r.offset == 0 and r.verdict == "ok" and r.step == "kretprobe" for r in by.values())
    calls = calls_from_output(arch, prog)
    for func in ("fib", "factorial", "sum_rec", "ackermann"):
        assert by[func].hits == calls[func], func
    assert by["is_even"].hits + by["is_odd"].hits == 96
    assert by["main"].hits == 1


def test_kretprobe_mode_reports_instance_misses(arch):
    res = sweep(SweepConfig(path=str(firmware_elf(arch, "recurse")), mode="kretprobe",
                            funcs=["sum_rec"]))
    # default maxactive 10: sum_rec(100) nests 101 calls, 91 of them find no free instance
    assert res.results[0].nmissed == 91


@pytest.mark.slow
def test_kretprobe_mode_callpath_ftrace(arch):
    res = sweep(SweepConfig(path=str(firmware_elf(arch, "callpath.ftrace")), mode="kretprobe",
                            jobs=2))
    assert not mismatches(res)
    rejected = {r.function: r.detail for r in res.results if r.verdict == "rejected"}
    assert set(rejected) == set(CALLPATH_REFUSED) | {"_start"}
    assert all(d.startswith("-EINVAL") for d in rejected.values())
    ok = [r for r in res.results if r.verdict == "ok"]
    assert len(ok) == len(res.results) - 5 and sum(r.hits > 0 for r in ok) >= 40


OPT_SLICE = {
    "x86_64": ("insns", ["t_rip_load", "t_rip_store", "t_rip_lea", "t_rip_cmp", "t_jcc",
                         "t_loop", "t_jmp_indirect", "t_pushf_popf", "t_rep_movsb"]),
    "arm64": ("insns", ["t_adr", "t_ldr_lit", "t_cbnz", "t_tbz", "t_blr", "t_plain",
                        "t_ldxr_stxr", "t_nop_hint"]),
}


@pytest.mark.slow
def test_optprobe_mode_agrees_with_kprobe_mode(arch):
    """Every instruction of the slice with a jump-optimized probe where can_optimize allows:
    no mismatch, the same verdict and hit count at each offset as the breakpoint sweep,
    and a good share really optimized (x86: never in t_jmp_indirect, whose indirect jump
    forbids it)."""
    prog, funcs = OPT_SLICE[arch]
    cfg = dict(path=str(firmware_elf(arch, prog)), funcs=funcs, jobs=2)
    opt = sweep(SweepConfig(mode="optprobe", **cfg))
    ref = sweep(SweepConfig(mode="kprobe", **cfg))
    assert not mismatches(opt)
    assert [(r.function, r.offset, r.verdict, r.hits) for r in opt.results] == \
        [(r.function, r.offset, r.verdict, r.hits) for r in ref.results]
    run = [r for r in opt.results if r.verdict == "ok" and r.hits]
    optimized = [r for r in run if r.step == "optimized"]
    assert len(optimized) >= len(run) // 3
    if arch == "x86_64":
        assert not [r for r in run if r.function == "t_jmp_indirect" and r.step == "optimized"]
        assert {r.function for r in optimized} >= {"t_rip_load", "t_rip_store", "t_rip_lea",
                                                   "t_rip_cmp"}
        assert {r.step for r in run} >= {"optimized", "boosted", "emulate"}
    else:
        assert all(r.step in ("optimized", "simulate") or r.function == "t_adr" for r in run)


@pytest.mark.slow
def test_optprobe_mode_recurse(arch):
    res = sweep(SweepConfig(path=str(firmware_elf(arch, "recurse")), mode="optprobe", jobs=2,
                            funcs=["fib", "sum_rec", "ackermann"]))
    assert not mismatches(res)
    entry = {r.function: r for r in res.results if r.offset == 0}
    assert (entry["fib"].hits, entry["sum_rec"].hits, entry["ackermann"].hits) == (2155, 101, 44)
    assert all(r.step == "optimized" for r in entry.values())


def test_cli_sweep_modes(arch, emu_cli):
    path = str(firmware_elf(arch, "recurse"))
    r = emu_cli("sweep", "--mode", "kretprobe", "--func", "factorial", "--json", path)
    assert r.rc == 0, r.err
    data = json.loads(r.out)
    assert (data["checked"], data["mismatches"]) == (1, 0)
    (row,) = data["functions"]["factorial"]
    # default maxactive 10: factorial(20) misses 10 instances, factorial(12) two
    assert (row["verdict"], row["step"], row["hits"], row["nmissed"]) == \
        ("ok", "kretprobe", 39, 12)
    r = emu_cli("sweep", "--mode", "optprobe", "--func", "is_odd", path)
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["FUNCTION+OFF", "VERDICT", "STEP"]
    assert "optimized" in lines[1] and lines[-1].endswith("mismatches 0")


def test_sweep_arm64_bare():
    res = sweep(SweepConfig(path=str(firmware_elf("arm64", "insns.bare")), bare=True,
                            funcs=["t_plain"], mode="kretprobe"))
    assert not mismatches(res)


@pytest.mark.parametrize("mode", ["kretprobe", "optprobe"])
@pytest.mark.slow
def test_sweep_x86_bare(mode):
    """x86 bare metal, including `_start` (entered with sp at the end of RAM: a kretprobe
    there used to end the whole sweep with a Python error)."""
    res = sweep(SweepConfig(path=str(firmware_elf("x86_64", "insns.bare")), bare=True,
                            funcs=["_start", "t_plain", "t_rip_cmp"], mode=mode))
    assert not mismatches(res) and res.checked >= 2
    if mode == "kretprobe":
        assert [r.verdict for r in res.results] == ["rejected", "ok", "ok"]


def test_sweep_x86_bare_exit_path():
    res = sweep(SweepConfig(path=str(firmware_elf("x86_64", "insns.bare")), bare=True,
                            funcs=["sys_exit"], mode="kprobe"))
    assert not mismatches(res)
