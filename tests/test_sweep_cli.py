"""`emu sweep` at scale: --jobs gives the single-process report, results stream to a JSON-lines
file keyed by (binary sha256, mode, function, offset), --resume finishes an interrupted sweep
without redoing what is filed, and progress goes to stderr (plain lines off a terminal)."""
from __future__ import annotations

import hashlib
import io
import json

import pytest

from conftest import firmware_elf
from emu.cli import main


def emu(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def sweep_args(arch: str, *extra: str) -> list[str]:
    return ["sweep", "--json", "--func", "do_sys_open", "--func", "main", *extra,
            str(firmware_elf(arch, "demo"))]


def test_jobs_give_the_single_process_report(arch, tmp_path):
    results = tmp_path / "r.jsonl"
    rc1, one, _ = emu(*sweep_args(arch, "--jobs", "1", "--progress", "none"))
    rc2, two, _ = emu(*sweep_args(arch, "--jobs", "2", "--progress", "none", "--results", str(results)))
    assert rc1 == rc2 == 0 and one == two
    report = json.loads(one)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == report["offsets"] > 50
    sha = hashlib.sha256(firmware_elf(arch, "demo").read_bytes()).hexdigest()
    keys = {(r["sha256"], r["mode"], r["function"], r["offset"]) for r in rows}
    want = {(sha, "kprobe", f, row["offset"]) for f, rs in report["functions"].items() for row in rs}
    assert keys == want
    by_key = {(r["function"], r["offset"]): r["result"] for r in rows}
    assert all(by_key[f, row["offset"]] == row for f, rs in report["functions"].items() for row in rs)


def test_resume_finishes_an_interrupted_sweep(arch, tmp_path, monkeypatch):
    from probes import sweep as sweep_mod
    full = tmp_path / "full.jsonl"
    rc, whole, _ = emu(*sweep_args(arch, "--jobs", "1", "--progress", "none", "--results", str(full)))
    assert rc == 0
    lines = full.read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    kept = sweep_mod.TASK_OFFSETS                   # one whole task, then a torn line
    cut.write_bytes(b"".join(lines[:kept]) + lines[kept][:17])
    checked = []
    real = sweep_mod.check_offset
    monkeypatch.setattr(sweep_mod, "check_offset", lambda *a: checked.append(a[4]) or real(*a))
    rc, resumed, _ = emu(*sweep_args(arch, "--jobs", "1", "--progress", "none", "--resume", str(cut)))
    assert rc == 0 and resumed == whole
    assert len(checked) == len(lines) - kept              # only what was not filed
    assert sorted(cut.read_bytes().splitlines()) == sorted(full.read_bytes().splitlines())
    checked.clear()
    rc, again, _ = emu(*sweep_args(arch, "--jobs", "1", "--progress", "none", "--resume", str(cut)))
    assert rc == 0 and again == whole and not checked       # all filed: nothing runs


def test_resume_refuses_another_sweeps_file(tmp_path):
    f = tmp_path / "r.jsonl"
    assert emu(*sweep_args("x86_64", "--progress", "none", "--results", str(f)))[0] == 0
    rc, _, err = emu(*sweep_args("x86_64", "--seed", "5", "--progress", "none", "--resume", str(f)))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "another sweep" in err


@pytest.mark.parametrize("kind", ["auto", "plain", "bar"])
def test_progress_on_stderr(kind):
    rc, out, err = emu(*sweep_args("arm64", "--jobs", "1", "--progress", kind))
    total = json.loads(out)["offsets"]
    assert rc == 0
    if kind == "bar":
        assert f"{total}/{total}" in err and "offsets/s" in err
    else:                       # a StringIO is no terminal: plain lines
        assert err.splitlines()[-1].startswith(f"emu: sweep: {total}/{total} offsets, ")
        assert "ETA 0 s" in err


@pytest.mark.parametrize("opts,word", [(["--jobs", "0"], "--jobs"), (["--address", "x:1"], "--address"),
                                       (["--results", "a", "--resume", "b"], "--resume")])
def test_bad_options_are_one_line(opts, word):
    rc, _, err = emu(*sweep_args("x86_64", *opts))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and word in err


def test_resume_after_the_process_is_killed(tmp_path):
    """A sweep killed (SIGKILL) mid-way resumes from its file to the uninterrupted report."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    f = tmp_path / "r.jsonl"
    argv = sweep_args("x86_64", "--jobs", "1", "--progress", "none")
    proc = subprocess.Popen([sys.executable, "-m", "emu.cli", *argv, "--results", str(f)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and (not f.exists() or f.read_bytes().count(b"\n") < 10):
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    filed = f.read_bytes().count(b"\n")
    rc, resumed, _ = emu(*argv, "--resume", str(f))
    rc2, whole, _ = emu(*argv)
    assert rc == rc2 == 0 and resumed == whole
    assert filed < len(f.read_bytes().splitlines()) == json.loads(whole)["offsets"]
