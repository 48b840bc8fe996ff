"""Writable raw tracepoints: TRACE_EVENT_WRITABLE sets bpf_raw_event_map.writable_size,
the verifier types a BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE program's ctx[0] as
PTR_TO_TP_BUFFER and records max_tp_access, attach refuses a program that reaches past
writable_size or num_args·8 (-EINVAL, bpf_probe_register), and the guest sees the
program's stores when the tracepoint returns."""
from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, firmware_elf
from probes.bpf.asm import assemble
from probes.bpf.errors import VerifierError
from probes.bpf.jit_guest import engine_info, install_engine
from probes.bpf.libbpf import BpfObject, LibbpfError
from probes.bpf.program import BpfProg
from probes.bpf.prog_types import BpfProgType
from probes.testing import ProbeLab
from probes.trace.bpf_tracepoint import bpf_raw_tp_link_attach, bpf_raw_tracepoints_of
from probes.tracepoint import TracepointError, tracepoints_of

DATA = ROOT / "tests" / "data" / "tracepoint"
CLANG = shutil.which("clang")
WRITABLE = BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE
# what tp_writable.c prints with set_verdict attached: verdict = seq*10 + 1, cookie = n*1000 + 7
WRITTEN = b"".join(b"req %d verdict=%d cookie=%d\n" % (n, n * 10 + 1, n * 1000 + 7)
                   for n in range(4)) + b"sum=%d\n" % sum(n * 1010 + 8 for n in range(4))
UNTOUCHED = b"".join(b"req %d verdict=0 cookie=0\n" % n for n in range(4)) + b"sum=0\n"


def _bpf_object(tmp: Path, *defines: str) -> Path:
    if CLANG is None:
        pytest.skip("clang is not installed (apt install clang)")
    obj = tmp / ("write_tp%s.o" % "".join(defines))
    proc = subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", *defines,
                           "-I", "/usr/include/x86_64-linux-gnu",
                           "-c", str(DATA / "write_tp.bpf.c"), "-o", str(obj)],
                          capture_output=True, text=True)
    if proc.returncode and "linux/bpf.h" in proc.stderr:
        pytest.skip("no linux/bpf.h (linux-libc-dev)")
    assert proc.returncode == 0, proc.stderr
    return obj


@pytest.fixture(scope="module")
def bpf_obj(tmp_path_factory) -> Path:
    return _bpf_object(tmp_path_factory.mktemp("tp-w"))


@pytest.fixture
def guest(c_prog, arch) -> Path:
    return c_prog(arch, DATA / "tp_writable.c", "static",
                  ("-I", str(ROOT / "firmware" / "include")))


def _lab(guest: Path, engine: str = "python") -> ProbeLab:
    lab = ProbeLab.load(str(guest))
    install_engine(lab.machine, engine)
    return lab


def test_the_raw_event_map_carries_the_writable_size(guest):
    lab = _lab(guest)
    btp = bpf_raw_tracepoints_of(lab.machine).bpf_get_raw_tracepoint("tp_req")
    assert (btp.num_args, btp.writable_size) == (2, 16)     # sizeof(struct req)
    assert lab.run().exit_code == 0
    assert lab._stdout.getvalue() == UNTOUCHED


def test_program_writes_reach_the_guest(guest, bpf_obj):
    lab = _lab(guest)
    obj = BpfObject.open(str(bpf_obj)).load(lab.machine)
    prog = obj.program("set_verdict")
    assert prog.prog_type == WRITABLE and prog.max_tp_access == 16
    link = obj.attach(lab.machine, "set_verdict")
    assert lab.run().exit_code == 0
    assert lab._stdout.getvalue() == WRITTEN
    link.destroy()
    assert not tracepoints_of(lab.machine).lookup("tp_req").funcs


@pytest.mark.parametrize("engine", ["interp", "jit"])
def test_program_writes_reach_the_guest_on_every_engine(guest, bpf_obj, engine):
    lab = _lab(guest, engine)
    obj = BpfObject.open(str(bpf_obj)).load(lab.machine)
    obj.attach(lab.machine, "set_verdict")
    assert lab.run().exit_code == 0
    assert lab._stdout.getvalue() == WRITTEN
    if engine == "jit":        # the JITed image stored into the guest's stack itself
        assert engine_info(lab.machine, obj.program("set_verdict"))["engine"] == "jit"


def test_attach_refuses_accesses_past_the_buffer_or_the_arguments(guest, bpf_obj):
    lab = _lab(guest)
    obj = BpfObject.open(str(bpf_obj)).load(lab.machine)
    with pytest.raises(LibbpfError) as e:             # byte 16 of a 16-byte buffer
        obj.attach(lab.machine, "write_past")
    assert e.value.errno == errno.EINVAL and "16 writable bytes" in str(e.value)
    with pytest.raises(LibbpfError) as e:             # ctx[2] of a 2-argument tracepoint
        obj.attach(lab.machine, "read_far")
    assert e.value.errno == errno.EINVAL and "2 arguments" in str(e.value)
    tp = tracepoints_of(lab.machine).lookup("tp_req")
    assert not tp.funcs and tp.key.enabled == 0
    assert lab.run().exit_code == 0 and lab._stdout.getvalue() == UNTOUCHED


def test_a_writable_program_on_a_read_only_tracepoint_is_refused(arch, bpf_obj):
    lab = ProbeLab.load(str(firmware_elf(arch, "tpdemo")), argv=["2"])
    obj = BpfObject.open(str(bpf_obj)).load(lab.machine)
    with pytest.raises(TracepointError) as e:         # tp_work: writable_size 0
        bpf_raw_tp_link_attach(lab.machine, obj.program("set_verdict"), "tp_work")
    assert e.value.errno == errno.EINVAL


def test_an_ordinary_raw_tp_program_may_not_store_through_its_arguments(tmp_path, guest):
    obj = _bpf_object(tmp_path, "-DPLAIN_WRITE")
    with pytest.raises(LibbpfError) as e:
        BpfObject.open(str(obj)).load(_lab(guest).machine)
    assert "plain_write" in str(e.value) and "invalid mem access 'scalar'" in str(e.value)


# --- the verifier's PTR_TO_TP_BUFFER, one row per rule (check_tp_buffer_access,
# raw_tp_writable_prog_is_valid_access) ---------------------------------------------------
VERIFIER_ROWS = [
    # name, program, refusal (None: accepted), max_tp_access
    ("write u32 at 4", "ldxdw r2, [r1]\nstw [r2+4], 1\nmov r0, 0\nexit", None, 8),
    ("reads count too", "ldxdw r2, [r1]\nldxdw r0, [r2+24]\nexit", None, 32),
    ("constant arithmetic", "ldxdw r2, [r1]\nadd r2, 8\nstb [r2+3], 1\nmov r0, 0\nexit",
     None, 12),
    ("ctx[0] read as u32", "ldxw r2, [r1]\nmov r0, 0\nexit",
     "invalid bpf_context access off=0 size=4", 0),
    ("ctx[1] is a scalar", "ldxdw r2, [r1+8]\nstw [r2], 1\nmov r0, 0\nexit",
     "R2 invalid mem access 'scalar'", 0),
    ("negative offset", "ldxdw r2, [r1]\nstw [r2-4], 1\nmov r0, 0\nexit",
     "R2 invalid tracepoint buffer access: off=-4, size=4", 0),
    ("variable offset", "ldxdw r2, [r1]\nldxdw r3, [r1+8]\nadd r2, r3\nstw [r2], 1\n"
     "mov r0, 0\nexit", "R2 invalid variable buffer offset: off=0, var_off=(unknown)", 0),
    ("context stays read-only", "stdw [r1], 1\nmov r0, 0\nexit",
     "invalid bpf_context access (the context is read-only)", 0),
]


@pytest.mark.parametrize("name,text,refusal,max_tp", VERIFIER_ROWS,
                         ids=[r[0] for r in VERIFIER_ROWS])
def test_verifier_tp_buffer(name, text, refusal, max_tp):
    prog = BpfProg.from_bytes(assemble(text), prog_type=WRITABLE, license="GPL")
    if refusal is None:
        prog.load()
        assert prog.max_tp_access == max_tp
    else:
        with pytest.raises(VerifierError) as e:
            prog.load()
        assert e.value.reason == refusal
