"""No test relies on unbounded host memory (issue 11): representative work under the
`ulimit -v 4194304` the issue asks `make test` to pass under, in a subprocess.

The cause it guards: Unicorn reserved 1 GiB of address space per machine for translated
code, and machines (reference cycles) waited for a full collection, so a process that made
a few dozen of them died silently. Machines now reserve TCG_BUFFER_SIZE and unreleased ones
trigger a collection (emu/machine.py)."""
from __future__ import annotations

import re
import resource
import subprocess
import sys

from conftest import ROOT

LIMIT = 4 << 30                       # `ulimit -v 4194304` (KiB)

MANY_MACHINES = """
from emu.loader import GuestConfig, load_guest
from probes.kprobes import Kprobe, kprobes_of
for i in range(48):
    arch = ("x86_64", "arm64")[i % 2]
    g = load_guest(GuestConfig(path=f"firmware/bin/{arch}/demo.elf"))
    p = Kprobe(symbol_name="do_sys_open")
    kprobes_of(g.machine).register_kprobe(p)
    g.machine.run()
    assert p.hits > 0
print("ok")
"""


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def run_limited(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, preexec_fn=_limited)


def test_many_machines_in_one_process_fit_in_4_gib():
    proc = run_limited("-c", MANY_MACHINES)
    assert proc.returncode == 0 and proc.stdout.endswith("\nok\n"), proc.stderr[-2000:]


def test_representative_tests_pass_under_the_limit():
    """Every probe-instruction row (a machine each: where the full suite used to die) and
    the CLI's hostile inputs in-process."""
    proc = run_limited("-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "-x",
                       "tests/test_kprobes_insn.py", "tests/test_cli_input.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b\d{3} passed", proc.stdout), proc.stdout[-500:]
