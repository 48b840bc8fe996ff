"""pytest plugin (entry point `pytest11`: kprobe_emu): fixtures for testing probe patching.

    def test_probe_on_entry(probe_lab):
        lab = probe_lab("firmware/bin/arm64/demo.elf")
        p = lab.kprobe("do_sys_open", record=("x0",))
        assert_armed(lab, p)
        lab.run()
        assert p.hits == 16

Fixtures: `probe_lab` (a factory: `probe_lab(path, argv=..., bare=...)` or
`probe_lab.asm(arch, {"name": "asm source"})`) and `kprobe_asserts` (the assertion helpers
of probes.testing, for suites that prefer a fixture to an import)."""
from __future__ import annotations

import types

import pytest

from probes import testing


class _LabFactory:
    def __call__(self, path, **kw) -> testing.ProbeLab:
        return testing.ProbeLab.load(path, **kw)

    @staticmethod
    def asm(arch: str, functions: dict[str, str], data: bytes = b"") -> testing.ProbeLab:
        return testing.ProbeLab.from_asm(arch, functions, data)


@pytest.fixture
def probe_lab() -> _LabFactory:
    return _LabFactory()


@pytest.fixture
def kprobe_asserts() -> types.SimpleNamespace:
    return types.SimpleNamespace(armed=testing.assert_armed, disarmed=testing.assert_disarmed,
                                 slot_holds=testing.assert_slot_holds, hits=testing.assert_hits,
                                 same_run=testing.assert_same_run)
