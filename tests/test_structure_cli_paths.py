"""Nothing a guest or a trace shows depends on where the checkout (or the program) lives: CI
runs a fresh clone elsewhere. The guest's argv[0] is the path as given (execve's filename),
so the same command in two directories of different depth gives byte-identical output:
stack addresses (%sp), the trace, the guest's own output, the exit code."""
from __future__ import annotations

import shutil

import pytest

from conftest import ARCHES, firmware_elf, run_emu

EVENT = "p:g/main main sp=%sp argc=$arg1 argv0=+0($arg2):u64"


def _in(directory, arch: str, name: str):
    directory.mkdir(parents=True)
    shutil.copy(firmware_elf(arch, name), directory / "prog.elf")
    return directory


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.slow
def test_trace_is_the_same_wherever_the_program_lives(arch, tmp_path):
    near = _in(tmp_path / "a", arch, "libc-hello")
    far = _in(tmp_path / "a-much-longer-directory-name" / "and" / "deeper" / "still", arch,
              "libc-hello")
    runs = [run_emu("trace", "--event", EVENT, "prog.elf", "--", "x", cwd=d) for d in (near, far)]
    assert runs[0].rc == runs[1].rc == 3, runs[0].err           # the program's own exit code
    assert "main: (main+0x0/" in runs[0].out and "argc=0x2" in runs[0].out
    assert (runs[0].out, runs[0].err) == (runs[1].out, runs[1].err)


@pytest.mark.parametrize("arch", ARCHES)
def test_run_output_and_stats_are_the_same_wherever_the_program_lives(arch, tmp_path):
    near = _in(tmp_path / "n", arch, "libc-hello")
    far = _in(tmp_path / "far" / "away" / "from" / "the" / "checkout", arch, "libc-hello")
    runs = [run_emu("run", "--cycles", "--kprobe", "main", "prog.elf", cwd=d) for d in (near, far)]
    assert runs[0].rc == runs[1].rc == 3, runs[0].err
    assert "hello, world from prog.elf" in runs[0].out and "main+0x0" in runs[0].err
    assert (runs[0].out, runs[0].err) == (runs[1].out, runs[1].err)
