"""`emu sweep` and `emu inspect --run` on programs the tests compile (tests/data/tools/):
the sweep takes `emu run`'s inputs (stdin, --fs, --fs-write into a scratch copy per run,
--seed, --max-insns, --timeout), reports the baseline, skips chosen functions the baseline
never runs, and neither command holds a guest's output in host memory."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import CROSS_CC, ROOT, run_emu

TOOLS_DATA = ROOT / "tests" / "data" / "tools"


@pytest.fixture(scope="session")
def tools_prog(tmp_path_factory):
    """tools_prog(arch, name) -> Path of tests/data/tools/<name>.c built static for arch
    (cached for the session; skips if the cross compiler or its libc is missing)."""
    cache = tmp_path_factory.mktemp("tools-progs")
    built: dict = {}

    def build(arch: str, name: str):
        if (arch, name) not in built:
            cc = shutil.which(CROSS_CC[arch])
            if cc is None:
                pytest.skip(f"{CROSS_CC[arch]} not installed")
            out = cache / f"{name}.{arch}"
            proc = subprocess.run([cc, "-O2", "-static", "-o", str(out), str(TOOLS_DATA / f"{name}.c")],
                                  capture_output=True, text=True)
            if proc.returncode:
                pytest.skip(f"cannot build {name}.c for {arch}: {proc.stderr.strip()[:200]}")
            built[arch, name] = out
        return built[arch, name]

    return build


def mix_hash(data: bytes) -> int:
    h = 0
    for c in data[:256]:
        h = (h * 31 + c) & 0xFFFFFFFF
    return h


@pytest.fixture
def fsdir(tmp_path):
    root = tmp_path / "fs"
    root.mkdir()
    (root / "in.txt").write_text("some input data\n")
    return root


@pytest.mark.slow
def test_sweep_takes_run_inputs(arch, tools_prog, fsdir):
    """stdin reaches every run (the probed function hashes it, the exit code is the hash);
    each run appends to out.txt in its own scratch copy of --fs (a shared tree would grow
    and every run would print a different size: mismatches); the granted tree is left as
    it was; the baseline is reported; a chosen function never run is skipped with a warning."""
    prog = str(tools_prog(arch, "sweep_io"))
    stdin = b"hello sweep"
    r = run_emu("sweep", "--json", "--func", "mix", "--func", "never_called", "--fs", str(fsdir),
                "--fs-write", "--seed", "7", prog, "--", "in.txt", "out.txt", stdin=stdin)
    assert r.rc == 0, r.err
    data = json.loads(r.out)
    assert data["mismatches"] == 0 and data["checked"] >= 4
    assert data["not_executed"] == ["never_called"] and "never_called" not in data["functions"]
    assert "never executes never_called" in r.err
    rows = data["functions"]["mix"]
    assert all(row["verdict"] == "ok" and row["hits"] == len(stdin) for row in rows)
    base = data["baseline"]
    expect = run_emu("run", "--fs", str(fsdir), "--fs-write", "--seed", "7", prog, "--",
                     "in.txt", "out.txt", stdin=stdin)
    assert b"out.txt: now 14 bytes" in expect.stdout and expect.rc == mix_hash(stdin) & 0x3F
    assert (base["exit_code"], base["stop_reason"]) == (expect.rc, "exit")
    assert base["stdout_bytes"] == len(expect.stdout) and base["stderr_bytes"] == 0
    (fsdir / "out.txt").unlink()                 # the run above wrote into the real tree
    r = run_emu("sweep", "--jobs", "2", "--func", "mix", "--fs", str(fsdir), "--fs-write", prog,
                "--", "in.txt", "out.txt", stdin=stdin)
    assert r.rc == 0, r.err
    assert sorted(p.name for p in fsdir.iterdir()) == ["in.txt"]
    lines = r.out.splitlines()
    assert lines[-2] == (f"baseline: exit {mix_hash(stdin) & 0x3F}, "
                         f"stdout {len(expect.stdout)} bytes, stderr 0 bytes")
    assert lines[-1].startswith("checked ") and lines[-1].endswith("mismatches 0")


@pytest.mark.slow
def test_sweep_seed_and_stdin_change_the_baseline(arch, tools_prog):
    prog = str(tools_prog(arch, "sweep_io"))
    runs = [json.loads(run_emu("sweep", "--json", "--func", "mix", "--seed", seed, prog,
                               stdin=stdin).out)["baseline"]
            for seed, stdin in (("1", b"ab"), ("2", b"ab"), ("1", b"abc"))]
    assert runs[0]["stdout_sha256"] != runs[1]["stdout_sha256"]      # AT_RANDOM follows --seed
    assert runs[0]["exit_code"] == mix_hash(b"ab") & 0x3F
    assert runs[2]["exit_code"] == mix_hash(b"abc") & 0x3F


def test_sweep_max_insns_limit_is_the_baseline(arch, tools_prog):
    """--max-insns applies to every run: a baseline cut short before main is reported as
    the limit it hit, and the chosen function it never reached is not swept."""
    prog = str(tools_prog(arch, "sweep_io"))
    r = run_emu("sweep", "--json", "--func", "mix", "--max-insns", "5000", prog, stdin=b"x")
    assert r.rc == 0, r.err
    data = json.loads(r.out)
    assert data["baseline"]["stop_reason"] == "limit" and data["baseline"]["exit_code"] == 124
    assert data["not_executed"] == ["mix"] and data["offsets"] == 0


@pytest.mark.slow
def test_sweep_counts_mismatches(arch, tools_prog, fsdir, monkeypatch):
    """Without the per-run scratch copy every run appends to the same out.txt, so each
    probed run prints a different size than the baseline: the sweep flags every offset and
    its summary counts them."""
    from probes import sweep as sweep_mod
    from contextlib import nullcontext

    monkeypatch.setattr(sweep_mod, "_fs_for_run", lambda cfg: nullcontext(cfg.fs_root))
    prog = str(tools_prog(arch, "sweep_io"))
    res = sweep_mod.sweep(sweep_mod.SweepConfig(
        path=prog, funcs=["mix"], stdin=b"ab", fs_root=str(fsdir), fs_writable=True,
        argv=["in.txt", "out.txt"]))
    assert res.mismatches == len(res.results) >= 4
    assert all("stdout differs at byte" in r.detail for r in res.results)
    assert sweep_mod.format_table(res).splitlines()[-1].endswith(f"mismatches {res.mismatches}")
    assert res.to_json()["mismatches"] == res.mismatches


def test_sweep_refuses_bad_inputs(arch, tools_prog, fsdir, capsys):
    from emu.cli import main
    prog = str(tools_prog(arch, "sweep_io"))
    for opts in (["--fs-write"], ["--fs", ""], ["--fs", str(fsdir / "in.txt")],
                 ["--fs", str(fsdir / "missing")], ["--max-insns", "-5"], ["--timeout", "nan"],
                 ["--timeout", "0"]):
        rc = main(["sweep", "--func", "mix", *opts, prog])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("emu: "), (opts, err)


@pytest.mark.slow
def test_sweep_stdin_must_end_within_timeout(arch, tools_prog):
    """A stdin that never closes is a limit (124), not a hang."""
    prog = str(tools_prog(arch, "sweep_io"))
    import os
    rfd, wfd = os.pipe()                  # the test holds the write end open throughout
    try:
        proc = subprocess.run([sys.executable, "-m", "emu.cli", "sweep", "--timeout", "1",
                               "--func", "mix", prog], stdin=rfd, capture_output=True,
                              cwd=ROOT, timeout=60)
    finally:
        os.close(rfd)
        os.close(wfd)
    err = proc.stderr
    assert proc.returncode == 124 and b"stdin still open" in err


# --- unbounded guest output --------------------------------------------------------------------
RSS_PROBE = """
import resource, subprocess, sys
p = subprocess.run([sys.executable, "-m", "emu.cli", *sys.argv[1:]], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
sys.stdout.write(p.stdout.decode())
"""

FLOOD_MIB = 256


def peak_rss(*argv: str) -> tuple[int, int, str]:
    """(exit code, peak RSS in MiB, stdout tail) of `emu ARGV` in its own process."""
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    head, _, rest = proc.stdout.partition("\n")
    rc, rss = map(int, head.split())
    return rc, rss, rest


@pytest.mark.slow
def test_inspect_run_does_not_hold_guest_output(arch, tools_prog):
    prog = str(tools_prog(arch, "flood"))
    rc, rss, out = peak_rss("inspect", "--run", "--json", prog, "tick", "--", str(FLOOD_MIB))
    assert rc == 0
    assert json.loads(out)[0]["hits"] == 1
    assert rss < FLOOD_MIB // 2, f"peak RSS {rss} MiB for {FLOOD_MIB} MiB of guest output"


@pytest.mark.slow
def test_sweep_does_not_hold_guest_output(arch, tools_prog):
    prog = str(tools_prog(arch, "flood"))
    rc, rss, out = peak_rss("sweep", "--json", "--func", "tick", prog, "--", str(FLOOD_MIB))
    assert rc == 0
    data = json.loads(out)
    assert data["baseline"]["stdout_bytes"] == FLOOD_MIB << 20
    assert data["mismatches"] == 0 and data["checked"] >= 2
    assert rss < FLOOD_MIB // 2, f"peak RSS {rss} MiB for {FLOOD_MIB} MiB of guest output"


@pytest.mark.slow
def test_sweep_does_not_copy_untouched_mappings(arch, tools_prog):
    """The guest maps 1 GiB and writes two bytes of it: every run's live-memory snapshot
    keeps only the chunks that hold data."""
    prog = str(tools_prog(arch, "bigmap"))
    rc, rss, out = peak_rss("sweep", "--json", "--func", "tick", prog)
    assert rc == 0
    data = json.loads(out)
    assert data["mismatches"] == 0 and data["checked"] >= 2
    assert rss < 256, f"peak RSS {rss} MiB for a 1 GiB mapping"


def test_memory_snapshots_still_find_a_difference():
    """A byte changed deep inside a mostly-zero region is found, at its address; a word
    holding only the kretprobe trampoline (stale_word) is not a difference."""
    from probes.sweep import MemorySnapshot, Outcome, OutputDigest

    size, start = 8 * MemorySnapshot.CHUNK, 0x10000000
    ref_mem = bytearray(size)
    ref_mem[5] = 1
    run_mem = bytearray(ref_mem)
    run_mem[3 * MemorySnapshot.CHUNK + 0x123] = 0x55
    stale = (0xDEAD0000).to_bytes(8, "little")
    run_mem[6 * MemorySnapshot.CHUNK + 8:6 * MemorySnapshot.CHUNK + 16] = stale

    def outcome(mem: bytes, stale_word=None) -> Outcome:
        snap = MemorySnapshot.take(lambda a, n: bytes(mem[a - start:a - start + n]), start, size)
        empty = OutputDigest().summary()
        return Outcome(0, "exit", empty, empty, {}, {start: snap}, stale_word)

    ref = outcome(ref_mem)
    assert sum(c is not None for c in ref.memory[start].chunks) == 1
    assert outcome(run_mem, stale).first_difference(ref) == \
        f"written memory differs at {start + 3 * MemorySnapshot.CHUNK + 0x120:#x}"
    run_mem[3 * MemorySnapshot.CHUNK + 0x123] = 0
    assert outcome(run_mem, stale).first_difference(ref) is None
    assert outcome(run_mem).first_difference(ref) == \
        f"written memory differs at {start + 6 * MemorySnapshot.CHUNK + 8:#x}"
