"""Every firmware program prints its expected output under `emu run`: each case of
firmware/expected/cases.txt in Linux user mode, and each bare-metal image
(bin/<arch>/<prog>.bare.elf) against the same expected output. Expected files were
recorded natively (x86-64) and under qemu-aarch64 (arm64) by firmware/tools/cases.py."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import ARCHES, FIRMWARE, ROOT, run_emu

EXPECTED = FIRMWARE / "expected"


def _load_cases() -> list[dict]:
    """firmware/tools/cases.py's own parser, so stems and stdin rules cannot drift."""
    tool = FIRMWARE / "tools" / "cases.py"
    if not (tool.exists() and (EXPECTED / "cases.txt").exists()):
        return []
    spec = importlib.util.spec_from_file_location("firmware_cases", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_cases()


CASES = _load_cases()
BARE = sorted((arch, p.name[: -len(".bare.elf")]) for arch in ARCHES
              for p in (FIRMWARE / "bin" / arch).glob("*.bare.elf"))


def expected_rc(path) -> int:
    """cases.py records -N for "killed by signal N"; emu exits like a shell, 128 + N."""
    rc = int(path.read_text().strip())
    return 128 - rc if rc < 0 else rc


def test_catalogue_is_present():
    assert CASES, "firmware/expected/cases.txt (and tools/cases.py) missing"
    assert {c["arch"] for c in CASES} == set(ARCHES)
    assert {arch for arch, _ in BARE} == set(ARCHES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c['arch']}-{c['stem']}" for c in CASES])
def test_linux_case(case):
    elf = FIRMWARE / "bin" / case["arch"] / f"{case['name']}.elf"
    assert elf.exists(), f"{elf} listed in cases.txt but not built"
    stdin = (ROOT / case["stdin"]).read_bytes() if case["stdin"] else b""
    # Programs read files named relative to the repository root: grant it, read-only.
    r = run_emu("run", "--fs", str(ROOT), str(elf.relative_to(ROOT)), "--", *case["args"],
                stdin=stdin)
    out = (EXPECTED / case["arch"] / f"{case['stem']}.out").read_bytes()
    rc = expected_rc(EXPECTED / case["arch"] / f"{case['stem']}.rc")
    assert (r.rc, r.stdout) == (rc, out), r.err
    if rc == 139:                                 # a crash case: the one-line fault report
        assert r.err.count("\n") == 1 and r.err.startswith("emu: guest fault: "), r.err
    else:
        assert "emu:" not in r.err


@pytest.mark.parametrize("arch,prog", BARE, ids=[f"{a}-{p}" for a, p in BARE])
def test_bare_metal(arch, prog):
    elf = FIRMWARE / "bin" / arch / f"{prog}.bare.elf"
    r = run_emu("run", "--bare", str(elf))
    assert "emu:" not in r.err, r.err
    if prog == "counters":                       # prints counter values: no expected output
        assert r.rc == 0 and r.stdout
        return
    out = (EXPECTED / arch / f"{prog}.out").read_bytes()
    assert (r.rc, r.stdout) == (expected_rc(EXPECTED / arch / f"{prog}.rc"), out)


@pytest.mark.parametrize("mode", ["linux", "bare"])
def test_counters_deterministic(arch, mode):
    """counters reads rdtsc/rdtscp or cntvct_el0/cntfrq_el0: the values are the model's,
    so two runs print the same bytes."""
    elf = FIRMWARE / "bin" / arch / ("counters.elf" if mode == "linux" else "counters.bare.elf")
    if not elf.exists():
        pytest.skip(f"{elf} not built")
    opts = ["--bare"] if mode == "bare" else []
    first, second = run_emu("run", *opts, str(elf)), run_emu("run", *opts, str(elf))
    assert first.rc == second.rc == 0
    assert first.stdout == second.stdout and b"monotonic=yes" in first.stdout
