"""pytest plugin (entry point `pytest11`: kprobe_emu): fixtures for testing probe patching.

    def test_probe_on_entry(probe_lab):
        lab = probe_lab("firmware/bin/arm64/demo.elf")
        p = lab.kprobe("do_sys_open", record=("x0",))
        assert_armed(lab, p)
        lab.run()
        assert p.hits == 16

Fixtures: `probe_lab` (a factory: `probe_lab(path, argv=..., bare=...)` or
`probe_lab.asm(arch, {"name": "asm source"})`) and `kprobe_asserts` (the assertion helpers
of probes.testing, for suites that prefer a fixture to an import). Assertion messages name
addresses as `sym+0xoff (0xaddr)`."""
from __future__ import annotations

import types
from typing import Any

import pytest

from probes import testing


class _LabFactory:
    def __call__(self, path: str, **kw: Any) -> testing.ProbeLab:
        return testing.ProbeLab.load(path, **kw)

    @staticmethod
    def asm(arch: str, functions: dict[str, str], data: bytes = b"") -> testing.ProbeLab:
        return testing.ProbeLab.from_asm(arch, functions, data)


@pytest.fixture
def probe_lab() -> _LabFactory:
    """Factory of ProbeLabs, guests to place probes in and run:
    probe_lab(path, argv=(), bare=False, arch="auto", stdin=b"", fs=None) loads an ELF;
    probe_lab.asm(arch, {"f": "asm source"}, data=b"") assembles functions with keystone.
    A lab has kprobe(where, record=(...)) and kretprobe(where, record=(...)), which record
    every handler call in `.events`; run(), call(func, *args); text(), original(), slot(),
    inspect() and disasm() to look at the patch; stdout/stderr of the guest."""
    return _LabFactory()


@pytest.fixture
def kprobe_asserts() -> types.SimpleNamespace:
    """The assertion helpers of probes.testing as attributes: armed(lab, p),
    disarmed(lab, addr, original), slot_holds(lab, p, insn), hits(p, n, nmissed=0) and
    same_run(probed, plain). Failures show the disassembly side by side and name addresses
    as sym+off."""
    return types.SimpleNamespace(armed=testing.assert_armed, disarmed=testing.assert_disarmed,
                                 slot_holds=testing.assert_slot_holds, hits=testing.assert_hits,
                                 same_run=testing.assert_same_run)
