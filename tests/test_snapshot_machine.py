"""machine.snapshot() / machine.restore(): run to a point, snapshot, run to the end, restore,
run again: the same output, exit code and cycle count, every time and as a fresh run; many
variants from one snapshot; probes registered after a snapshot are gone after restore."""
from __future__ import annotations

import io
import shutil
import subprocess

import pytest

from conftest import ARCHES, ROOT, firmware_elf
from emu.loader import GuestConfig, load_guest
from emu.snapshot import SnapshotError
from probes.kprobes import Kprobe, kprobes_of

SRC = ROOT / "tests" / "data" / "snapshot" / "checkpoint.c"
CC = {"x86_64": "gcc", "arm64": "aarch64-linux-gnu-gcc"}
STDIN = b"abcdefghijk"


@pytest.fixture(scope="module")
def checkpoint_prog(tmp_path_factory):
    built: dict[str, str] = {}
    out_dir = tmp_path_factory.mktemp("snapshot-progs")

    def build(arch: str) -> str:
        if arch not in built:
            cc = shutil.which(CC[arch])
            if cc is None:
                pytest.skip(f"{CC[arch]} not installed")
            out = out_dir / f"checkpoint.{arch}"
            proc = subprocess.run([cc, "-O2", "-static", "-o", str(out), str(SRC), "-lm"],
                                  capture_output=True, text=True)
            if proc.returncode:
                pytest.skip(f"no static C library for {arch}: {proc.stderr.strip()[:200]}")
            built[arch] = str(out)
        return built[arch]
    return build


@pytest.fixture
def fs_dir(tmp_path):
    (tmp_path / "in.txt").write_bytes(b"hello snapshot world\nline2\n")
    return tmp_path


def load(path: str, fs_dir, extra: list[str]):
    out, err = io.BytesIO(), io.BytesIO()
    g = load_guest(GuestConfig(path=path, argv=[str(fs_dir / "in.txt"), *extra], fs_root=str(fs_dir)),
                   stdin=io.BytesIO(STDIN), stdout=out, stderr=err)
    return g.machine, out, err


def finish(m, out, err):
    r = m.run(timeout=30)
    return r.reason.value, r.exit_code, out.getvalue(), err.getvalue(), m.clock.cycles


def set_variant(m, value: int) -> None:
    m.memory.write(m.symbols.lookup("variant").addr, value.to_bytes(4, "little"))


@pytest.mark.parametrize("extra", [[], ["clock"]], ids=["clock-after", "clock-before"])
@pytest.mark.parametrize("arch", ARCHES)
def test_restore_repeats_the_run_exactly(checkpoint_prog, fs_dir, arch, extra):
    """Files half read, a pipe with data, heap, random, stdin, FP rounding mode: all restored;
    the clock too, whether it started before the snapshot or only after it."""
    path = checkpoint_prog(arch)
    fresh = finish(*load(path, fs_dir, extra))
    assert fresh[0:2] == ("exit", 3) and b"in=abcdefgh" in fresh[2] and b"buf=pipe" in fresh[2]
    m, out, err = load(path, fs_dir, extra)
    stop = m.run(until=m.symbols.lookup("checkpoint").addr, timeout=30)
    assert stop.reason.value == "halt" and "checkpoint" in stop.message
    snap = m.snapshot()
    runs = []
    for _ in range(3):
        runs.append(finish(m, out, err))
        m.restore(snap)
    assert runs == [fresh] * 3


@pytest.mark.parametrize("arch", ARCHES)
def test_many_variants_from_one_snapshot(checkpoint_prog, fs_dir, arch):
    path = checkpoint_prog(arch)
    m, out, err = load(path, fs_dir, ["clock"])
    m.run(until=m.symbols.lookup("checkpoint").addr, timeout=30)
    snap = m.snapshot()
    base = finish(m, out, err)
    seen = {}
    for v in (1, 2, 5, 1):
        m.restore(snap)
        set_variant(m, v)
        reason, code, stdout, stderr, _ = finish(m, out, err)
        assert (reason, code) == ("exit", 3 + v)
        assert stdout.startswith(f"variant={v} ".encode()) and stderr == f"done {v}\n".encode()
        assert seen.setdefault(v, stdout) == stdout         # the same variant, the same run
    m.restore(snap)
    assert finish(m, out, err) == base


@pytest.mark.parametrize("arch", ARCHES)
def test_probes_after_a_snapshot_are_dropped_by_restore(checkpoint_prog, fs_dir, arch):
    path = checkpoint_prog(arch)
    m, out, err = load(path, fs_dir, [])
    m.run(until=m.symbols.lookup("checkpoint").addr, timeout=30)
    snap = m.snapshot()
    base = finish(m, out, err)
    m.restore(snap)
    addr = m.symbols.lookup("checkpoint").addr      # the very pc the snapshot stopped at
    text = m.memory.read(addr, 4)
    p = Kprobe(addr=addr, pre_handler=lambda p, regs: 0)
    kprobes_of(m).register_kprobe(p)
    assert m.memory.read(addr, 4) != text
    with pytest.raises(SnapshotError, match="before probes"):
        m.snapshot()
    probed = finish(m, out, err)
    # The probe's trap costs modelled time, which the guest's clock shows; nothing else moves.
    assert (probed[0], probed[1], probed[3]) == (base[0], base[1], base[3]) and p.hits == 1
    assert probed[2].split(b"\n")[0] == base[2].split(b"\n")[0] and probed[4] > base[4]
    m.restore(snap)
    assert m.memory.read(addr, 4) == text and "kprobes" not in m.layers and not m.live_patches
    assert finish(m, out, err) == base


REGS = {"arm64": ("UC_ARM64_REG_", ["X19", "Q0", "Q8", "Q31", "FPCR", "FPSR", "TPIDR_EL0", "NZCV"]),
        "x86_64": ("UC_X86_REG_", ["RBX", "XMM0", "XMM15", "MXCSR", "FS_BASE", "EFLAGS", "FPCW"])}


@pytest.mark.parametrize("arch", ARCHES)
def test_fp_simd_and_system_registers_are_restored(checkpoint_prog, fs_dir, arch):
    import unicorn.arm64_const as a64
    import unicorn.x86_const as x86
    consts = a64 if arch == "arm64" else x86
    prefix, names = REGS[arch]
    ids = {n: getattr(consts, prefix + n) for n in names}
    m, _out, _err = load(checkpoint_prog(arch), fs_dir, [])
    m.run(until=m.symbols.lookup("checkpoint").addr, timeout=30)
    before = {n: m.uc.reg_read(i) for n, i in ids.items()}
    snap = m.snapshot()
    wide = {"Q0", "Q8", "Q31", "XMM0", "XMM15"}
    for n, i in ids.items():
        if n in wide:
            m.uc.reg_write(i, (1 << 127) | 0x1234)
        elif n in ("X19", "RBX", "TPIDR_EL0", "FS_BASE"):
            m.uc.reg_write(i, 0x1234_5678)
    m.uc.reg_write(ids["FPCR" if arch == "arm64" else "MXCSR"], 0x400000 if arch == "arm64" else 0x3f80)
    changed = {n: m.uc.reg_read(i) for n, i in ids.items()}
    assert sum(changed[n] != before[n] for n in names) >= 5
    m.restore(snap)
    assert {n: m.uc.reg_read(i) for n, i in ids.items()} == before


@pytest.mark.parametrize("arch", ARCHES)
def test_bare_metal_snapshot(arch):
    """Bare metal: MMIO devices (arm64 UART) are left alone, RAM restored."""
    out = io.BytesIO()
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo.bare")), bare=True),
                   stdin=io.BytesIO(), stdout=out, stderr=io.BytesIO())
    m = g.machine
    m.run(until=m.symbols.lookup("do_sys_open").addr, timeout=30)
    prefix = out.getvalue()
    snap = m.snapshot()
    first = (m.run(timeout=30).exit_code, out.getvalue(), m.clock.cycles)
    m.restore(snap)
    assert out.getvalue() == prefix
    assert (m.run(timeout=30).exit_code, out.getvalue(), m.clock.cycles) == first


def test_snapshot_of_another_machine_is_refused(checkpoint_prog, fs_dir):
    a, _, _ = load(checkpoint_prog("x86_64"), fs_dir, [])
    b, _, _ = load(checkpoint_prog("x86_64"), fs_dir, [])
    with pytest.raises(SnapshotError, match="only the machine"):
        b.restore(a.snapshot())
