"""`emu trace --bpf OBJ` with a tracepoint program (was an internal error: the CLI JITs
every link's program, and a tracepoint link had none to name)."""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ARCHES, firmware_elf
from emu.cli import main

DATA = Path(__file__).parent / "data" / "bpf_trace_cli"


@pytest.fixture(scope="module")
def tp_obj(tmp_path_factory) -> Path:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is not installed (apt install clang)")
    # the host's asm/types.h (the object does not depend on the guest's arch)
    inc = [f"-I{d}" for d in ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu")
           if Path(d, "asm", "types.h").exists()][:1]
    obj = tmp_path_factory.mktemp("tp-obj") / "tp_printk.o"
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", *inc, "-c",
                    str(DATA / "tp_printk.bpf.c"), "-o", str(obj)], check=True, capture_output=True)
    return obj


@pytest.mark.parametrize("engine", ["jit", "python"])
@pytest.mark.parametrize("arch", ARCHES)
def test_a_tracepoint_program_prints_each_hit(arch, engine, tp_obj) -> None:
    out, err = io.StringIO(), io.StringIO()
    rc = main(["trace", str(firmware_elf(arch, "tpdemo")), "--bpf", str(tp_obj),
               "--bpf-engine", engine], stdout=out, stderr=err)
    assert rc == 0, err.getvalue()
    lines = [ln for ln in out.getvalue().splitlines() if "bpf_trace_printk" in ln]
    assert [ln.rsplit(": ", 1)[1] for ln in lines] == [f"hello {i}" for i in range(16)]
