"""kretprobes on functions a guest leaves without returning (issue 10): longjmp out of a
probed frame, and across several probed frames at once. As Linux uretprobes, the stale
instances are dropped by stack pointer (cleanup_return_instances at entry, handle_trampoline
at the return), counted as `dropped`, and the guest's output and exit code are those of the
unprobed run and of the reference (native or qemu-user)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CROSS_CC, ROOT, run_emu, run_reference
from probes.kprobes import Kprobe
from probes.kretprobes import Kretprobe, kretprobes_of

DATA = ROOT / "tests" / "data" / "probes_robust"
# longjmp_kret.c: f(0) three times (f(1) longjmps each time), deep(1..4) (g recurses d+1
# deep, the innermost g longjmps to deep).
ENTRIES = {"f": 6, "g": 14, "deep": 4}
RETURNS = {"f": 3, "g": 0, "deep": 4}
RESULTS = {"f": [20, 20, 20], "g": [], "deep": [8, 9, 10, 11]}


def build(tmp_path_factory, arch: str, libc: str, name: str = "longjmp_kret") -> Path:
    cc = "musl-gcc" if libc == "musl" else CROSS_CC[arch]
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed")
    out = tmp_path_factory.mktemp("pr") / f"{name}-{libc}.{arch}"
    proc = subprocess.run([cc, "-O2", "-static", "-o", str(out), str(DATA / f"{name}.c")],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"{cc} cannot build static programs: {proc.stderr.strip()[:200]}")
    return out


TARGETS = [("x86_64", "glibc"), ("arm64", "glibc"), ("x86_64", "musl")]


@pytest.fixture(scope="module", params=TARGETS, ids=lambda t: f"{t[0]}-{t[1]}")
def prog(request, tmp_path_factory):
    arch, libc = request.param
    return arch, build(tmp_path_factory, arch, libc)


def test_emu_run_kretprobe_survives_longjmp(prog, tmp_path):
    arch, path = prog
    ref = run_reference(arch, [str(path)])
    plain = run_emu("run", str(path))
    stats = tmp_path / "stats.json"
    probed = run_emu("run", "--stats", str(stats), "--kretprobe", "f", "--kretprobe", "g",
                     "--kretprobe", "deep", str(path))
    assert ref.rc == 98 and b"total 98" in ref.stdout
    assert (plain.rc, plain.stdout) == (ref.rc, ref.stdout)
    assert (probed.rc, probed.stdout) == (ref.rc, ref.stdout), probed.err
    assert "Traceback" not in probed.err and "guest fault" not in probed.err
    rows = {r["symbol"]: r for r in json.loads(stats.read_text())["probes"]}
    for func in ENTRIES:
        r = rows[func]
        assert (r["hits"], r["returns"], r["dropped"], r["nmissed"]) == \
            (ENTRIES[func], RETURNS[func], ENTRIES[func] - RETURNS[func], 0), r


def test_api_kretprobe_sees_only_real_returns(prog, probe_lab):
    """Through the pytest plugin's lab and the Python API: the return handler runs once per
    real return, with the value the guest printed; entries = returns + dropped."""
    arch, path = prog
    lab = probe_lab(str(path))
    krp = kretprobes_of(lab.machine)
    seen: dict[str, list[int]] = {f: [] for f in ENTRIES}
    rps = {}
    for func in ENTRIES:
        def handler(ri, regs, func=func):
            seen[func].append(regs.return_value & 0xFFFFFFFF)
            return 0
        rps[func] = Kretprobe(kp=Kprobe(symbol_name=func), handler=handler)
        krp.register_kretprobe(rps[func])
    result = lab.run(timeout=60)
    assert result.exit_code == 98 and lab.stdout.endswith(b"total 98\n")
    assert seen == RESULTS
    for func, rp in rps.items():
        assert (rp.kp.hits, rp.hits, rp.ndropped, rp.nmissed) == \
            (ENTRIES[func], RETURNS[func], ENTRIES[func] - RETURNS[func], 0)
    assert krp.instances == [] and krp.frame_warnings == 0
    assert len(rps["f"].free_instances) == rps["f"].maxactive       # all back in the pool


def test_stale_instances_do_not_exhaust_the_pool(prog, probe_lab):
    """maxactive 1: the f(1) instance left by the longjmp is dropped when f(0)'s return
    reaches the trampoline, so every later f(0) gets an instance again (no nmissed beyond
    the nested f(1) entries, which find the pool empty)."""
    arch, path = prog
    lab = probe_lab(str(path))
    rets = []
    rp = Kretprobe(kp=Kprobe(symbol_name="f"), maxactive=1,
                   handler=lambda ri, regs: rets.append(regs.return_value & 0xFFFFFFFF))
    kretprobes_of(lab.machine).register_kretprobe(rp)
    assert lab.run(timeout=60).exit_code == 98
    assert rets == [20, 20, 20] and (rp.nmissed, rp.ndropped) == (3, 0)


def test_sweep_kretprobe_mode_has_no_mismatch(prog):
    """`emu sweep --mode kretprobe` compares registers and live memory with the unprobed
    run: the hijack words left by longjmp'ed frames are the only tolerated difference."""
    arch, path = prog
    r = run_emu("sweep", "--mode", "kretprobe", "--json", "--func", "f", "--func", "g",
                "--func", "deep", str(path))
    assert r.rc == 0, r.out[-2000:] + r.err
    data = json.loads(r.out)
    assert (data["checked"], data["mismatches"]) == (3, 0)
    hits = {f: rows[0]["hits"] for f, rows in data["functions"].items()}
    assert hits == ENTRIES
