"""tools/mypy_check.py: mypy against a baseline that only shrinks. Errors compare without
their positions, as a multiset; an error not in the baseline fails, fixed ones are counted."""
from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def mypy_check():
    spec = importlib.util.spec_from_file_location("mypy_check", ROOT / "tools" / "mypy_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OUTPUT = """\
emu/a.py:10: error: Incompatible return value type (got "int", expected "str")  [return-value]
emu/a.py:10: note: see https://mypy.rtfd.io
emu/a.py:22:5: error: Incompatible return value type (got "int", expected "str")  [return-value]
probes/b.py:3: error: Name "x" is not defined  [name-defined]
Found 3 errors in 2 files (checked 2 source files)
"""


def test_normalise_drops_positions_notes_and_summary(mypy_check):
    found = mypy_check.normalise(OUTPUT)
    assert {k: len(v) for k, v in found.items()} == {
        'emu/a.py: error: Incompatible return value type (got "int", expected "str") [return-value]': 2,
        'probes/b.py: error: Name "x" is not defined [name-defined]': 1,
    }
    assert found['probes/b.py: error: Name "x" is not defined [name-defined]'] == [
        'probes/b.py:3: error: Name "x" is not defined  [name-defined]']


def test_baseline_round_trip(mypy_check, tmp_path):
    errors = Counter({"emu/a.py: error: one [misc]": 2, "emu/b.py: error: two [misc]": 1})
    path = tmp_path / "baseline.txt"
    mypy_check.write_baseline(path, errors)
    assert mypy_check.read_baseline(path) == errors
    assert mypy_check.read_baseline(tmp_path / "missing.txt") == Counter()


@pytest.mark.slow                   # four real mypy runs
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[dev]')")
def test_new_errors_fail_and_fixed_ones_are_counted(mypy_check, tmp_path, capsys):
    src, baseline = tmp_path / "m.py", tmp_path / "baseline.txt"
    common = ["--baseline", str(baseline), "--", "--cache-dir", str(tmp_path / "cache"), str(src)]
    src.write_text('def f() -> str:\n    return 1\n')
    assert mypy_check.main(["--update", *common]) == 0
    assert "1 errors (was 0)" in capsys.readouterr().out
    src.write_text('\n\ndef f() -> str:\n    return 1\n')          # moved: still the old one
    assert mypy_check.main(common) == 0
    assert "1 errors, 1 in the baseline, 0 new, 0 fixed" in capsys.readouterr().out
    src.write_text('def f() -> str:\n    return 1\n\n\ndef g() -> str:\n    return 2\n')
    assert mypy_check.main(common) == 1                 # a second copy of it is new
    out = capsys.readouterr().out
    assert f"{src}:2: error: Incompatible return value type" in out and "1 new" in out
    src.write_text('def f() -> str:\n    return "1"\n')
    assert mypy_check.main(common) == 0
    assert "0 errors, 1 in the baseline, 0 new, 1 fixed" in capsys.readouterr().out


def test_the_committed_baseline_is_in_the_normal_form(mypy_check):
    lines = [l for l in (ROOT / "mypy-baseline.txt").read_text().splitlines()
             if l and not l.startswith("#")]
    assert lines == sorted(lines)
    assert all(mypy_check.ERROR.match(l) is None and ": error: " in l for l in lines)
