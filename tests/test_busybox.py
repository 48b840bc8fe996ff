"""Debian's busybox-static (amd64 and arm64), a real binary nobody here wrote: each applet
case gives the same stdout and exit code under `emu run` as under the reference (native
amd64, qemu-aarch64). The debs are fetched once into .cache/busybox by tests/fetch_busybox.sh."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT, run_emu, run_reference

pytestmark = pytest.mark.slow       # ~60 cases, each against qemu/native; fetches the debs once

DEB_ARCH = {"x86_64": "amd64", "arm64": "arm64"}
TEXT = b"banana\napple\ncherry\napple\n\tkiwi fruit\nDate 2024\n"
NUMBERS = b"".join(b"%d\n" % ((i * 7919) % 1000) for i in range(300))

# id: (argv after the applet name's busybox, stdin)
CASES = {
    "echo": (["echo", "hello", "world", "-n"], b""),
    "echo-e": (["echo", "-e", "a\\tb\\nc"], b""),
    "printf": (["printf", "%s=%05.1f|%x|%c\\n", "pi", "3.14159", "255", "Z", "e", "2.5", "16", "y"], b""),
    "seq": (["seq", "1", "3", "20"], b""),
    "seq-w": (["seq", "-w", "-5", "2", "5"], b""),
    "expr-mul": (["expr", "6", "*", "7"], b""),
    "expr-false": (["expr", "1", "=", "2"], b""),
    "expr-match": (["expr", "abcdef", ":", "a\\(.*\\)e"], b""),
    "basename": (["basename", "/usr/lib/libc.so.6", ".6"], b""),
    "wc": (["wc"], TEXT),
    "wc-l": (["wc", "-l"], NUMBERS),
    "sort": (["sort"], TEXT),
    "sort-nur": (["sort", "-n", "-u", "-r"], NUMBERS),
    "tr": (["tr", "a-z", "A-Z"], TEXT),
    "tr-d": (["tr", "-d", "aeiou\\n"], TEXT),
    "cut": (["cut", "-c", "2-4"], TEXT),
    "cut-f": (["cut", "-d", " ", "-f", "2"], TEXT),
    "head": (["head", "-n", "3"], TEXT),
    "md5sum": (["md5sum"], TEXT),
    "sha256sum": (["sha256sum"], NUMBERS * 20),
    "sha256sum-empty": (["sha256sum"], b""),
    "uniq-c": (["uniq", "-c"], b"a\na\nb\nc\nc\nc\n"),
    "tail": (["tail", "-n", "2"], TEXT),
    "cat": (["cat"], NUMBERS),
    "od": (["od", "-A", "x", "-t", "x1z"], TEXT[:20]),
    "sh-arith": (["sh", "-c", "i=0; while [ $i -lt 50 ]; do i=$((i+3)); done; echo $i; exit 3"], b""),
    "true": (["true"], b""),
    "false": (["false"], b""),
    "no-such-applet": (["no-such-applet"], b""),
}


@pytest.fixture(scope="session")
def busybox_dir():
    """Runs tests/fetch_busybox.sh (idempotent); skips only when apt is unavailable."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb not available: cannot fetch Debian's busybox-static")
    proc = subprocess.run(["bash", str(ROOT / "tests" / "fetch_busybox.sh")], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"apt unavailable: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"fetch_busybox.sh failed:\n{proc.stderr}"
    return ROOT / ".cache" / "busybox"


def busybox(busybox_dir, arch: str) -> str:
    return str(busybox_dir / DEB_ARCH[arch] / "bin" / "busybox")


@pytest.mark.parametrize("case", list(CASES))
def test_applet_matches_reference(busybox_dir, arch, case):
    argv, stdin = CASES[case]
    bb = busybox(busybox_dir, arch)
    ref = run_reference(arch, [bb, *argv], stdin=stdin)
    emu = run_emu("run", bb, "--", *argv, stdin=stdin)
    assert (emu.rc, emu.stdout) == (ref.rc, ref.stdout), emu.err
    assert "emu:" not in emu.err and "Traceback" not in emu.err


def test_true_false_exit_codes(busybox_dir, arch):
    """Not just equal to the reference: the values themselves."""
    bb = busybox(busybox_dir, arch)
    assert run_emu("run", bb, "--", "true").rc == 0
    assert run_emu("run", bb, "--", "false").rc == 1


def test_busybox_is_deterministic(busybox_dir, arch):
    bb = busybox(busybox_dir, arch)
    for argv in (["sh", "-c", "echo $$ $PPID $RANDOM"], ["date", "-u", "+%s %Y-%m-%dT%H:%M:%S"]):
        first = run_emu("run", bb, "--", *argv)
        second = run_emu("run", bb, "--", *argv)
        assert first.rc == 0 and first.stdout == second.stdout, first.err
    assert first.out == "1767225600 2026-01-01T00:00:00\n"      # the model's epoch


def test_ls_sees_only_the_granted_root(busybox_dir, arch, tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "dir").mkdir()
    bb = busybox(busybox_dir, arch)
    r = run_emu("run", "--fs", str(tmp_path), bb, "--", "ls", str(tmp_path))
    assert (r.rc, r.out) == (0, "a.txt\nb.txt\ndir\n")
    r = run_emu("run", bb, "--", "ls", str(tmp_path))
    assert r.rc == 1 and r.out == "" and "No such file or directory" in r.err
    r = run_emu("run", "--fs", str(tmp_path), bb, "--", "cat", str(tmp_path / "a.txt"), "/etc/passwd")
    assert r.rc == 1 and r.out == "a" and "can't open '/etc/passwd': No such file or directory" in r.err
