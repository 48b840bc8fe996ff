"""musl-static guests (x86-64: Debian's musl-gcc targets the host only), against native
runs: musl's own start-up (no PT_TLS, TIOCGWINSZ, writev stdio), stdin, malloc via
brk/mmap."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT, run_emu, run_reference

MACHINE_DATA = ROOT / "tests" / "data" / "machine"
STDIN = b"alpha beta\ngamma\n\n  delta epsilon zeta\nno newline"


@pytest.fixture(scope="module")
def musl_prog(tmp_path_factory):
    cc = shutil.which("musl-gcc")
    if cc is None:
        pytest.skip("musl-gcc not installed (Debian musl-tools)")
    out_dir = tmp_path_factory.mktemp("musl")

    def build(name: str):
        out = out_dir / f"{name}.musl"
        if not out.exists():
            subprocess.run([cc, "-static", "-O2", "-o", str(out), str(MACHINE_DATA / f"{name}.c")],
                           check=True, capture_output=True)
        return out
    return build


@pytest.mark.parametrize("name, args, stdin", [
    ("hello", ["one", "two words"], b""),
    ("stdin", [], STDIN),
    ("malloc", [], b""),
])
def test_musl_static_matches_native(musl_prog, name, args, stdin):
    prog = musl_prog(name)
    emu = run_emu("run", str(prog), "--", *args, stdin=stdin)
    ref = run_reference("x86_64", [str(prog), *args], stdin=stdin)
    assert (emu.rc, emu.stdout) == (ref.rc, ref.stdout), emu.err


def test_musl_uses_its_own_syscalls(musl_prog):
    """musl asks TIOCGWINSZ (not TCGETS) and writes stdio with writev."""
    r = run_emu("run", "--strace", str(musl_prog("hello")), "--", "x")
    assert "writev(" in r.err and "ioctl(1, TIOCGWINSZ" in r.err.replace("0x5413", "TIOCGWINSZ")
