"""The probe layer's arch interface (probes/arch/__init__.py): one Protocol per job, answered
in full by both arches, and everything the generic core asks of `self.arch` is declared.
Also: typed states keep their JSON spelling, refusals are typed, and the generic probe
modules hold no arch facts."""
from __future__ import annotations

import ast
import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import firmware_elf
from emu.arch import ARCH_NAMES
from probes.arch import (IMPLS, ArchFtrace, ArchJumpLabel, ArchKprobes, ArchKretprobes,
                         ArchOptprobes, ArchStacktrace, arch_probes_of)
from probes.arch.common import StepKind, Verdict
from probes.errors import NotApplicable, OptimizeRefused, ProbeError
from probes.kprobes import ProbeKind, probe_kind
from probes.optprobes import enable_optprobes
from probes.testing import ProbeLab

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"kprobes": ArchKprobes, "kretprobes": ArchKretprobes, "optprobes": ArchOptprobes,
        "ftrace": ArchFtrace}
CORE = {"kprobes.py": ArchKprobes, "kretprobes.py": ArchKretprobes,
        "optprobes.py": ArchOptprobes, "ftrace.py": ArchFtrace, "jump_label.py": ArchJumpLabel}


def members(proto: type) -> set[str]:
    """A Protocol's declared attributes and methods."""
    own = set(getattr(proto, "__annotations__", {})) | {
        name for name, value in vars(proto).items() if callable(value)}
    return {name for name in own if not name.startswith("_")}


def test_table_covers_every_arch_emu_knows():
    assert set(IMPLS) == set(ARCH_NAMES)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_each_arch_answers_every_member(arch, job):
    lab = ProbeLab.from_asm(arch, {"f": "nop"})
    answer = getattr(arch_probes_of(lab.machine), job)
    missing = {name for name in members(JOBS[job]) if not hasattr(answer, name)}
    assert not missing, f"{arch} {job} lacks {sorted(missing)}"


def _arch_attrs(path: Path) -> set[str]:
    """Names the module reads off `self.arch` (or `<x>.arch` of its own state)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "arch" and isinstance(node.value.value, ast.Name) \
                and node.value.value.id == "self":
            names.add(node.attr)
    return names


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_uses_only_declared_members(module):
    used = _arch_attrs(ROOT / "probes" / module)
    assert used, module
    assert used <= members(CORE[module]), sorted(used - members(CORE[module]))


def test_placeholders_are_declared_and_explicitly_not_applicable(arch):
    assert {"arch_jump_label_transform"} <= members(ArchJumpLabel)
    assert {"unwind_next", "frame_pointer"} <= members(ArchStacktrace)
    answers = arch_probes_of(ProbeLab.from_asm(arch, {"f": "nop"}).machine)
    # jump labels have their answer now (probes/arch/<arch>/jump_label.py)
    jl = answers.need_jump_label()
    assert jl.arch_jump_label_transform(0x1000, 0x1000, False) == \
        {"arm64": bytes.fromhex("1f2003d5"), "x86_64": bytes.fromhex("0f1f440000")}[arch]
    for need in (answers.need_stacktrace,):
        with pytest.raises(NotApplicable) as e:
            need()
        assert e.value.errno == errno.EOPNOTSUPP and arch in e.value.reason
        assert isinstance(e.value, ProbeError)


def test_ftrace_does_not_reach_through_the_kprobe_registry():
    code = "import sys, probes.ftrace; print('probes.kprobes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "False"


GENERIC = ["kprobes.py", "kretprobes.py", "optprobes.py", "ftrace.py", "insn_slots.py",
           "blacklist.py", "errors.py", "regs.py", "testing.py", "inspect.py",
           "pytest_plugin.py", "location.py", "reserved_text.py"]
ARCH_FACT = re.compile(r'arch ==|== "arm64"|== "x86_64"|"x31"|"xzr"|\.link is|hlt|\bHALT\b')


@pytest.mark.parametrize("module", GENERIC)
def test_generic_probe_modules_hold_no_arch_facts(module):
    text = (ROOT / "probes" / module).read_text()
    assert not ARCH_FACT.findall(text)


def test_typed_states_keep_their_json_spelling():
    assert [v.value for v in Verdict] == ["rejected", "simulate", "out-of-line"]
    assert [k.value for k in StepKind] == ["simulate", "emulate", "out-of-line", "ftrace"]
    assert [k.value for k in ProbeKind] == ["kprobe", "boosted", "optimized", "ftrace",
                                            "kretprobe"]
    row = {"kind": ProbeKind.BOOSTED, "step": StepKind.OUT_OF_LINE}
    assert json.dumps(row) == '{"kind": "boosted", "step": "out-of-line"}'
    assert f"{StepKind.EMULATE}" == "emulate" and StepKind.EMULATE == "emulate"


def test_probe_kinds_and_step_kinds_on_a_real_guest(arch):
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    p = lab.kprobe("hot_call", post_events=False)
    assert isinstance(p.ainsn.kind, StepKind) and probe_kind(p) is ProbeKind.KPROBE
    lab.run()
    assert probe_kind(p) is (ProbeKind.BOOSTED if lab.kprobes.arch.boost_supported
                             else ProbeKind.KPROBE)


REFUSED = {   # a function whose first instruction the arch cannot jump-optimize
    "arm64": ("blr x30\nret", errno.EINVAL, "blr x30 needs a scratch register"),
    "x86_64": ("ret", errno.EINVAL, "fewer than 5 bytes of instructions before the function end"),
}


def test_cannot_optimize_is_a_typed_refusal(arch):
    src, err, reason = REFUSED[arch]
    lab = ProbeLab.from_asm(arch, {"f": src})
    enable_optprobes(lab.kprobes)
    p = lab.kprobe("f", post_events=False)
    assert not p.ainsn.optimized and p.ainsn.opt_reason == reason
    opt = arch_probes_of(lab.machine).optprobes
    with pytest.raises(OptimizeRefused) as e:
        opt.can_optimize(p, lab.kprobes.reserved)
    assert (e.value.errno, e.value.reason) == (err, reason)


def test_one_error_root_for_probe_bpf_and_location_errors():
    from emu.errors import KprobeEmuError
    from probes.bpf.errors import BpfError, VerifierError
    from probes.errors import KprobeError
    from probes.location import LocationError
    from probes.reserved_text import TextBusy
    for cls in (KprobeError, OptimizeRefused, NotApplicable, TextBusy, LocationError, BpfError,
                VerifierError):
        assert issubclass(cls, KprobeEmuError), cls
    assert not issubclass(OptimizeRefused, KprobeError)   # a refusal to optimize is no failure
