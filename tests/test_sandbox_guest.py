"""Untrusted guests, continued (issue 11): tests/data/sandbox/sandbox.c, compiled here for both
arches, attacks the top of the user address space, region bookkeeping and privileged
instructions under probes. One subcommand per attack."""
from __future__ import annotations

import io
import re

import pytest

from conftest import ROOT
from emu.cli import main

SOURCE = ROOT / "tests" / "data" / "sandbox" / "sandbox.c"
TASK_SIZE = {"x86_64": 0x7FFF_FFFF_F000, "arm64": 1 << 47}


@pytest.fixture(scope="session")
def sandbox_prog(c_prog):
    return lambda arch: c_prog(arch, SOURCE)


def emu(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main([str(a) for a in argv], stdin=io.BytesIO(b""), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


# --- the top of the user address space --------------------------------------------------------
def test_nothing_at_or_above_task_size_is_the_guests(arch, sandbox_prog):
    """x86's [gdt] page sits at TASK_SIZE_MAX (2^47 - 4096): mmap, munmap, mprotect, mremap
    and syscall buffers there fail as Linux's range checks make them fail (arm64: at the
    emulator's 2^47). The answers are the ones native x86-64 Linux gives the same program."""
    rc, out, err = emu("run", sandbox_prog(arch), "--", "tasksize")
    assert rc == 0, err
    assert out.splitlines() == [
        "fixed-top ENOMEM", "fixed-straddle ENOMEM", "noreplace-top ENOMEM", "fixed-below ok",
        "hint-top ok", "munmap-top EINVAL", "mprotect-top ENOMEM", "mremap-top EFAULT",
        "write-top EFAULT", "read-top EFAULT"]


def test_segment_loads_still_find_the_gdt(arch, sandbox_prog):
    """The CPU's own descriptor reads must keep working although the guest can no longer
    map, change or pass the page to a syscall."""
    rc, out, err = emu("run", sandbox_prog(arch), "--", "segload")
    assert (rc, out) == (0, "segload ok\n"), err


def test_arm64_touching_task_size_faults(sandbox_prog):
    rc, out, err = emu("run", sandbox_prog("arm64"), "--", "touchtop")
    assert rc == 139
    assert re.search(rf"read of unmapped address {TASK_SIZE['arm64']:#x} at pc", err), err


# --- many small mappings ------------------------------------------------------------------------
def test_hundreds_of_unmergeable_mmaps(arch, sandbox_prog):
    """500 one-page mmaps with alternating protections (none can merge) all succeed and
    each page keeps its own contents (Unicorn makes thousands slow: benchmarks/bench_mmap.py)."""
    rc, out, err = emu("run", sandbox_prog(arch), "--", "mmaps", "500")
    assert (rc, out) == (0, "mapped 500\n"), err


# --- probed privileged IF changes at CPL3 / EL0 ----------------------------------------------
@pytest.mark.parametrize("insn", ["cli", "sti"])
def test_probed_interrupt_flag_change_faults_as_unprobed(arch, sandbox_prog, insn):
    """x86 `cli`/`sti` at CPL3 (IOPL 0) take #GP. The probe layer emulates them, and used to
    let a probed one run; now the probed instruction gives the unprobed report, at the
    probe address. arm64's `msr daifset/daifclr` is undefined at EL0 and the kernel refuses
    to probe it."""
    prog = sandbox_prog(arch)
    rc, out, plain = emu("run", prog, "--", insn)
    assert (rc, out) == (139, "before\n"), plain
    fault = plain.strip().splitlines()[-1]
    assert re.fullmatch(rf"emu: guest fault: \w[\w ]+ at pc 0x[0-9a-f]+ <do_{insn}\+0x0>: .+", fault)
    rc, out, probed = emu("run", prog, "--kprobe", f"do_{insn}", "--", insn)
    if arch == "x86_64":
        assert "general protection" in fault
        assert (rc, out) == (139, "before\n"), probed
        assert probed.splitlines()[0] == fault
        assert re.search(rf"do_{insn}\+0x0 .* emulate +1 +0", probed)
    else:
        assert "privileged instruction" in fault
        assert rc == 2 and "-EINVAL" in probed and "MSR writes system state" in probed


def test_probed_popf_cannot_raise_iopl_at_cpl3(sandbox_prog):
    """x86 only (arm64 has no user-writable interrupt mask to pop). `popf` at CPL3 leaves
    IOPL, and with IOPL 0 also IF, as they were; the probe layer's emulation used to apply
    the CPL0 mask, so a probed popf gave the guest IOPL 3 and with it `cli`."""
    prog = sandbox_prog("x86_64")
    plain = emu("run", prog, "--", "popf")
    probed = emu("run", prog, "--kprobe", "do_popf+1", "--", "popf")
    assert plain[:2] == (0, "iopl=0 if=1\n"), plain[2]
    assert probed[:2] == plain[:2], probed[2]
    assert re.search(r"do_popf\+0x1 .* emulate +1 +0", probed[2])
