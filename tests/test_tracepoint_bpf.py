"""BPF on guest tracepoints: a clang-compiled raw_tp program counting tp_work hits into
a map, the record-context tracepoint program, attach refusals, zero-extended arguments
and the recursion counter."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CROSS_CC, ROOT, firmware_elf, run_emu
from probes.bpf.libbpf import BpfObject, LibbpfError
from probes.testing import ProbeLab
from probes.trace.bpf_trace import prog_stats
from probes.trace.bpf_tracepoint import bpf_raw_tracepoints_of
from probes.tracepoint import tracepoints_of

DATA = ROOT / "tests" / "data" / "tracepoint"
CLANG = shutil.which("clang")
pytestmark = pytest.mark.skipif(CLANG is None, reason="clang is not installed (apt install clang)")


@pytest.fixture(scope="module")
def bpf_obj(tmp_path_factory) -> Path:
    obj = tmp_path_factory.mktemp("tp-bpf") / "count_tp.o"
    proc = subprocess.run([CLANG, "-O2", "-g", "-target", "bpf",
                           "-I", "/usr/include/x86_64-linux-gnu",
                           "-c", str(DATA / "count_tp.bpf.c"), "-o", str(obj)],
                          capture_output=True, text=True)
    if proc.returncode and "linux/bpf.h" in proc.stderr:
        pytest.skip("no linux/bpf.h (linux-libc-dev)")
    assert proc.returncode == 0, proc.stderr
    return obj


def _u64(value: list[str]) -> int:
    return int.from_bytes(bytes(int(b, 16) for b in value), "little")


def _map(obj: BpfObject, name: str) -> dict[int, int]:
    (dump,) = [d for d in obj.dump_maps() if d["name"] == name]
    return {_u64(e["key"]): _u64(e["value"]) for e in dump["elements"]}


def _loaded(arch: str, obj_path: Path, n: int = 10) -> tuple[ProbeLab, BpfObject]:
    lab = ProbeLab.load(str(firmware_elf(arch, "tpdemo")), argv=[str(n)])
    return lab, BpfObject.open(str(obj_path)).load(lab.machine)


def test_raw_tp_program_counts_hits_into_a_map(arch, bpf_obj):
    lab, obj = _loaded(arch, bpf_obj, 10)
    link = obj.attach(lab.machine, "count_raw")
    tp = tracepoints_of(lab.machine).lookup("tp_work")
    assert tp.key.enabled == 1                         # the program's probe enabled the key
    assert lab.run().exit_code == 0
    assert lab._stdout.getvalue() == b"tpdemo n=10 sum=65\n"
    # counted from the source: i = 0..9, key i % 4
    assert _map(obj, "by_mod") == {k: sum(1 for i in range(10) if i % 4 == k) for k in range(4)}
    assert _map(obj, "seen")[0] == 3 * 9 - 7            # the last v
    assert prog_stats(obj.program("count_raw")).run_cnt == 10
    link.destroy()
    assert tp.key.enabled == 0 and not tp.funcs


def test_tracepoint_program_reads_the_record(arch, bpf_obj):
    lab, obj = _loaded(arch, bpf_obj, 7)
    obj.attach(lab.machine, "count_rec")
    assert lab.run().exit_code == 0
    assert _map(obj, "seen")[1] == sum(range(7))


def test_attach_refusals(arch, bpf_obj):
    lab, obj = _loaded(arch, bpf_obj)
    with pytest.raises(LibbpfError) as e:             # ctx[2] of a 2-argument tracepoint
        obj.attach(lab.machine, "too_far")
    assert e.value.errno == errno.EINVAL and "2 arguments" in str(e.value)
    assert not tracepoints_of(lab.machine).lookup("tp_work").funcs
    with pytest.raises(LibbpfError) as e:             # tpdemo has no user_mix
        obj.attach(lab.machine, "mix_args")
    assert e.value.errno == errno.ENOENT
    raw = bpf_raw_tracepoints_of(lab.machine)
    assert sorted((b.tp.name, b.num_args, b.writable_size) for b in raw.core) == \
        [("tp_done", 2, 0), ("tp_work", 2, 0)]
    done = raw.bpf_get_raw_tracepoint("tp_done")
    iterator = lab.machine.symbols.lookup("__traceiter_tp_done").addr
    assert done.bpf_func == done.tp.iterator == iterator


def test_nested_hit_counts_a_miss(arch, bpf_obj):
    lab, obj = _loaded(arch, bpf_obj, 4)
    link = obj.attach(lab.machine, "count_raw")
    link.active = 1                                    # as if the program were running
    assert lab.run().exit_code == 0
    assert link.misses == 4 and prog_stats(link.prog).misses == 4
    assert prog_stats(link.prog).run_cnt == 0 and sum(_map(obj, "by_mod").values()) == 0


def test_arguments_are_zero_extended_from_their_size(arch, bpf_obj, tmp_path):
    cc = shutil.which(CROSS_CC[arch])
    if cc is None:
        pytest.skip(f"{CROSS_CC[arch]} not installed")
    exe = tmp_path / "tp_user"
    proc = subprocess.run([cc, "-O2", "-static", "-I", str(ROOT / "firmware" / "include"),
                           "-o", str(exe), str(DATA / "tp_user.c")], capture_output=True, text=True)
    if proc.returncode and ("cannot find -lc" in proc.stderr or "crt1.o" in proc.stderr):
        pytest.skip(f"no static C library for {arch}")
    assert proc.returncode == 0, proc.stderr
    lab = ProbeLab.load(str(exe))
    obj = BpfObject.open(str(bpf_obj)).load(lab.machine)
    obj.attach(lab.machine, "mix_args")
    assert lab.run().exit_code == 0
    seen = _map(obj, "seen")
    assert seen[0] == 0xFF                             # c = -1 as an unsigned char
    assert seen[1] == (-5 * 1000) & 0xFFFFFFFF         # i = -5000 as an unsigned int


def test_emu_trace_with_a_raw_tp_object(arch, bpf_obj):
    r = run_emu("trace", str(firmware_elf(arch, "tpdemo")), "--bpf", f"{bpf_obj}:count_raw",
                "--dump-maps", "--", "6")
    assert r.rc == 0, r.err
    dumps = json.loads(r.out.strip().splitlines()[-1])
    (by_mod,) = [d for d in dumps if d["name"] == "by_mod"]
    counts = {_u64(e["key"]): _u64(e["value"]) for e in by_mod["elements"]}
    assert counts == {0: 2, 1: 2, 2: 1, 3: 1}
