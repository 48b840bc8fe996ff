"""The machine's structure (issue 12): arch facts as data behind a narrow protocol, the
region ownership record the cycle model books by, costs by reason, the one reader of
address-table sections, and the one error root."""
from __future__ import annotations

import ast
import re
import struct
from pathlib import Path

import capstone
import pytest

from conftest import ARCHES, ROOT, firmware_elf
from emu.arch import ARCH_NAMES, get_arch, requested_arch
from emu.clock import DEFAULT_COSTS, Clock, Reason
from emu.cycles import profile_for, profile_names, load_profile
from emu.elf import ElfImage, load_elf
from emu.errors import ElfError, EmuError, KprobeEmuError, NotApplicable, UsageError
from emu.machine import Machine, StopReason
from emu.memory import PROT_EXEC, PROT_READ
from emu.owners import RegionOwner, RegionOwners
from probes.testing import ProbeLab

EMU = ROOT / "emu"


# --- emu/arch: data behind a protocol --------------------------------------------------------
def _emu_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("emu"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("emu")}
    return out


def test_arch_package_imports_nothing_above_it():
    files = sorted((EMU / "arch").glob("*.py"))
    assert len(files) >= 4
    for path in files:
        above = {m for m in _emu_imports(path) if not m.startswith("emu.arch") and m != "emu.errors"}
        assert not above, f"{path.name} imports {sorted(above)}"


def test_arch_names_are_the_one_list():
    assert ARCH_NAMES == tuple(ARCHES)
    assert [get_arch(n).name for n in ARCH_NAMES] == list(ARCH_NAMES)
    assert get_arch("aarch64") is get_arch("arm64") and get_arch("AMD64") is get_arch("x86_64")
    assert requested_arch("auto") is None and requested_arch("arm64") is get_arch("arm64")
    with pytest.raises(UsageError, match="arm64 or x86_64"):
        get_arch("riscv64")


@pytest.mark.parametrize("arch", ARCHES)
def test_halt_insn_is_the_arch_halt_and_ends_a_bare_run(arch):
    a = get_arch(arch)
    insn = next(capstone.Cs(a.cs_arch, a.cs_mode).disasm(a.halt_insn, 0))
    assert f"{insn.mnemonic} {insn.op_str}".strip() == a.halt_asm
    assert len(a.halt_insn) == insn.size
    m = Machine(a)
    base = a.bare_base + 0x10000
    m.memory.map(base, 0x1000, PROT_READ | PROT_EXEC, "ram")
    m.memory.write(base, a.halt_insn)
    m.halt_allowed = True
    r = m.run(base, max_insns=10)
    assert (r.reason, r.exit_code) == (StopReason.HALT, 0)
    m.halt_allowed = False                   # in user mode the same bytes are a fault
    r = m.run(base, max_insns=10)
    assert r.reason is StopReason.FAULT and "privileged instruction" in r.message


@pytest.mark.parametrize("arch", ARCHES)
def test_default_cpu_profile_is_arch_data(arch):
    a = get_arch(arch)
    assert a.cpu_profile in profile_names(arch)
    assert profile_for(arch).name == a.cpu_profile


def test_no_arch_branches_in_the_cycle_model_or_loader():
    branch = re.compile(r'arch ==|== "arm64"|== "x86_64"')
    for path in [*sorted((EMU / "cycles").glob("*.py")), EMU / "loader.py", EMU / "machine.py",
                 EMU / "clock.py"]:
        hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
        assert not hits, f"{path.name}: lines {hits}"


# --- the region ownership record ------------------------------------------------------------
def test_owner_record_claims_finds_and_releases():
    rec = RegionOwners()
    rec.claim(0x5000, 0x1000, RegionOwner.PROBES, "[kprobe insn slots]")
    rec.claim(0x1000, 0x2000, RegionOwner.BPF, "jit image")
    assert [r.start for r in rec.ranges] == [0x1000, 0x5000]
    assert rec.owner_of(0x1fff) is RegionOwner.BPF and rec.owner_of(0x3000) is RegionOwner.GUEST
    assert rec.owner_of(0x5fff) is RegionOwner.PROBES and rec.owner_of(0x6000) is RegionOwner.GUEST
    assert rec.find(0x5000).purpose == "[kprobe insn slots]"
    with pytest.raises(ValueError, match="already claimed"):
        rec.claim(0x5800, 0x1000, RegionOwner.PROBES, "overlap")
    assert [r.start for r in rec.layers_in(0x2000, 0x5001)] == [0x1000, 0x5000]
    rec.release(0x5000, 0x1000)
    assert rec.owner_of(0x5000) is RegionOwner.GUEST and len(rec.ranges) == 1


LOOP = {"arm64": "mov x0, #0; mov x1, #200; l: add x0, x0, #3; subs x1, x1, #1; b.ne l; ret",
        "x86_64": "xor eax, eax; mov ecx, 200; l: add rax, 3; dec ecx; jnz l; ret"}
ELSEWHERE = 0x50_0000


def _lab_with_code_in(arch: str, name: str) -> ProbeLab:
    """A lab whose function `g` lies in a page of its own, mapped under `name`."""
    lab = ProbeLab.from_asm(arch, {"f": "nop"})
    m = lab.machine
    m.memory.map(ELSEWHERE, 0x1000, PROT_READ | PROT_EXEC, name)
    from conftest import assemble
    code = assemble(arch, LOOP[arch], ELSEWHERE)
    m.memory.write(ELSEWHERE, code)
    m.symbols.add("g", ELSEWHERE, len(code), "func")
    return lab


@pytest.mark.parametrize("arch", ARCHES)
def test_cycle_model_books_layer_code_by_owner_not_by_name(arch):
    # a guest page whose name looks like the probe layer's is still guest code
    lab = _lab_with_code_in(arch, "[kprobe insn slots]")
    lab.machine.enable_cycle_model()
    assert lab.call("g") == 600
    bd = lab.machine.clock.breakdown()
    assert "probe-code" not in bd and bd["code"] > 0
    # the same code in a page the probe layer claimed is booked apart, whatever its name
    lab = _lab_with_code_in(arch, "plain")
    lab.machine.claim_text(ELSEWHERE, 0x1000, RegionOwner.PROBES, "test page")
    lab.machine.enable_cycle_model()
    assert lab.call("g") == 600
    bd2 = lab.machine.clock.breakdown()
    assert bd2["probe-code"] > 0 and bd2["probe-code"] + bd2.get("code", 0) == bd["code"]


@pytest.mark.parametrize("arch", ARCHES)
def test_probe_slot_pages_are_claimed_by_the_probe_layer(arch):
    lab = ProbeLab.load(firmware_elf(arch, "hotloop"))
    lab.kprobe("hot_leaf")
    m = lab.machine
    claims = m.owners.ranges
    assert claims and all(r.owner is RegionOwner.PROBES for r in claims)
    assert m.owners.owner_of(lab.addr_of("hot_leaf")) is RegionOwner.GUEST
    assert m.owned_text == [(r.start, r.end) for r in claims]
    for r in claims:                      # each claim is a mapped page named for its purpose
        region = m.memory.find(r.start)
        assert region is not None and region.name == r.purpose


# --- costs by reason ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", profile_names())
def test_profile_gives_a_cost_for_every_reason(name):
    p = load_profile(name)
    costs = p.reason_costs()
    assert set(costs) == set(Reason)
    assert costs[Reason.TRAP] == p.exc_entry + p.exc_return
    assert costs[Reason.STEP] == costs[Reason.TRAP] + p.single_step
    assert costs[Reason.SYSCALL] == p.syscall_cost


def test_clock_charges_by_reason():
    c = Clock()
    c.charge(Reason.TRAP, 3)
    c.charge2(Reason.DETOUR, Reason.HANDLER)
    c.charge_bpf(10)
    want = {"trap": 3 * DEFAULT_COSTS[Reason.TRAP], "detour": DEFAULT_COSTS[Reason.DETOUR],
            "handler": DEFAULT_COSTS[Reason.HANDLER],
            "bpf": DEFAULT_COSTS[Reason.BPF] + 10 * DEFAULT_COSTS[Reason.BPF_INSN]}
    assert c.by_reason == want and c.cycles == sum(want.values())
    with pytest.raises(ValueError, match="missing"):
        Clock(costs={Reason.TRAP: 1})


@pytest.mark.parametrize("arch", ARCHES)
def test_cycle_model_sets_the_clock_costs_from_its_profile(arch):
    m = Machine(arch)
    model = m.enable_cycle_model()
    assert {r: m.clock.cost(r) for r in Reason} == model.profile.reason_costs()


# --- the address-table reader -----------------------------------------------------------------
def test_address_table_relocates_link_time_entries():
    bias = 0x5555_5555_0000
    table = struct.pack("<4Q", 0x1040, 0x2000, bias + 0x3000, 7) + b"\x01\x02"
    img = ElfImage("x", get_arch("x86_64"), "ET_DYN", bias + 0x1000, bias, 64, 56, 0, [], [],
                   sections={"__mcount_loc": (bias + 0x4000, table)})
    assert img.address_table("__mcount_loc") == [bias + 0x1040, bias + 0x2000, bias + 0x3000,
                                                 bias + 7]
    assert img.address_table("__jump_table") == []
    exec_img = ElfImage("x", get_arch("x86_64"), "ET_EXEC", 0x401000, 0, 64, 56, 0, [], [],
                        sections={"_kprobe_blacklist": (0x405000, struct.pack("<Q", 0x401000))})
    assert exec_img.address_table("_kprobe_blacklist") == [0x401000]


@pytest.mark.parametrize("arch", ARCHES)
def test_address_tables_of_the_firmware_name_functions(arch):
    img = load_elf(str(firmware_elf(arch, "demo")))
    funcs = {s.addr: s.name for s in img.symbols if s.kind == "func"}
    black = img.address_table("_kprobe_blacklist")
    assert black and all(a in funcs for a in black)
    ft = load_elf(str(firmware_elf(arch, "recurse.ftrace")))
    sites = ft.address_table("__mcount_loc") or ft.address_table("__patchable_function_entries")
    spans = [(s.addr, s.addr + s.size) for s in ft.symbols if s.kind == "func"]
    assert sites and all(any(lo <= a < hi for lo, hi in spans) for a in sites)


# --- errors -------------------------------------------------------------------------------------
def test_one_error_root():
    import probes.bpf.errors as bpf_errors
    import probes.errors as probe_errors
    assert KprobeEmuError is EmuError
    for cls in (UsageError, ElfError, NotApplicable, probe_errors.KprobeError):
        assert issubclass(cls, EmuError), cls
    e = NotApplicable("arm64", "boosting")
    assert (e.arch, e.feature, str(e), e.exit_code) == ("arm64", "boosting",
                                                         "boosting: not applicable on arm64", 2)
    assert bpf_errors.BpfError                   # (its move under EmuError is the probe core's)
