"""A clang-compiled raw_tp program on a module's raw tracepoint (bpf_get_raw_tracepoint
finds it among the modules'): it counts the module's tracepoint hits; while it is attached
the module cannot be unloaded (the link holds a module reference, rmmod gets
-EWOULDBLOCK); released, the module unloads and its raw tracepoint is gone. Both arches."""
from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from emu.module import ModuleError, ModuleState, modules_of
from probes.bpf.libbpf import BpfObject, LibbpfError
from probes.module import load_module, unload_module
from probes.testing import ProbeLab
from probes.trace.bpf_tracepoint import bpf_raw_tracepoints_of
from test_module_load import MOD_FLAGS, module_builder

DATA = ROOT / "tests" / "data" / "module"
CLANG = shutil.which("clang")


@pytest.fixture(scope="module")
def build(c_prog):
    return module_builder(c_prog, MOD_FLAGS)


@pytest.fixture(scope="module")
def bpf_obj(tmp_path_factory) -> Path:
    if CLANG is None:
        pytest.skip("clang is not installed (apt install clang)")
    obj = tmp_path_factory.mktemp("mod-bpf") / "tick_raw_tp.o"
    proc = subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", "-I",
                           "/usr/include/x86_64-linux-gnu", "-c",
                           str(DATA / "tick_raw_tp.bpf.c"), "-o", str(obj)],
                          capture_output=True, text=True)
    if proc.returncode and "linux/bpf.h" in proc.stderr:
        pytest.skip("no linux/bpf.h (linux-libc-dev)")
    assert proc.returncode == 0, proc.stderr
    return obj


def _ticks(obj: BpfObject) -> list[int]:
    (dump,) = [d for d in obj.dump_maps() if d["name"] == "ticks"]
    return [int.from_bytes(bytes(int(b, 16) for b in e["value"]), "little")
            for e in dump["elements"]]


def test_a_module_raw_tracepoint_is_held_while_attached(arch, build, bpf_obj):
    mod_obj = build(arch, "tp_mod", extra=("-I", str(ROOT / "firmware" / "include")))
    lab = ProbeLab.load(str(build(arch, "modhost", module=False)))
    m = lab.machine
    obj = BpfObject.open(str(bpf_obj)).load(m)
    with pytest.raises(LibbpfError) as e:              # not loaded yet
        obj.attach(m, "count_tick")
    assert e.value.errno == errno.ENOENT
    mod = load_module(m, str(mod_obj), "tp_mod")
    link = obj.attach(m, "count_tick")
    assert link.btp.module is mod and mod.refcnt == 1
    fire = m.symbols.lookup("tp_mod:mod_tick_fire").addr
    assert [lab.call(fire, v) for v in (41, 1, 100)] == [42, 2, 101]
    assert _ticks(obj) == [3, 142]
    with pytest.raises(ModuleError) as e:              # in use: rmmod refuses
        unload_module(m, mod)
    assert e.value.errno == errno.EWOULDBLOCK and mod.state == ModuleState.LIVE
    assert lab.call(fire, 8) == 9 and _ticks(obj) == [4, 150]      # still hooked
    link.destroy()
    link.destroy()                                     # a second release drops nothing
    assert mod.refcnt == 0 and not link.btp.tp.funcs
    unload_module(m, mod)
    assert modules_of(m).modules == []
    assert bpf_raw_tracepoints_of(m).bpf_get_raw_tracepoint("mod_tick") is None
    with pytest.raises(LibbpfError) as e:
        obj.attach(m, "count_tick")
    assert e.value.errno == errno.ENOENT


def test_a_refused_attach_takes_no_reference(arch, build, bpf_obj, tmp_path):
    """The module's reference is dropped again when attach fails after finding it."""
    mod_obj = build(arch, "tp_mod", extra=("-I", str(ROOT / "firmware" / "include")))
    lab = ProbeLab.load(str(build(arch, "modhost", module=False)))
    m = lab.machine
    mod = load_module(m, str(mod_obj), "tp_mod")
    obj = BpfObject.open(str(bpf_obj)).load(m)
    prog = obj.program("count_tick")
    prog.max_ctx_offset = 16                           # as if it read ctx[1] of 1 argument
    with pytest.raises(LibbpfError) as e:
        obj.attach(m, "count_tick")
    assert e.value.errno == errno.EINVAL and mod.refcnt == 0
    unload_module(m, mod)
