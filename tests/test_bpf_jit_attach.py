"""The guest JIT in the attach path (``--bpf-engine jit``): the clang objects of the trace
issue run on probe hits JITed to the traced machine's arch and give what the compiled
Python path gives (maps, ring-buffer records, perf samples, printk lines, the guest's
output); with the cycle model on, the JITed code's cycles are charged and repeat."""
from __future__ import annotations

import struct

import pytest

from conftest import ARCHES, firmware_elf, run_emu
from probes.bpf.jit_guest import install_engine
from probes.bpf.libbpf import BpfObject
from probes.trace.bpf_trace import bpf_trace_of, prog_stats
from test_bpf_trace_attach import CLANG, DEMO_FLAGS, _counts, _guest, bpf_obj, victim  # noqa: F401

pytestmark = pytest.mark.skipif(CLANG is None, reason="clang is not installed (apt install clang)")
ENGINES = ("python", "jit")


def traced(arch: str, obj_path, engine: str = "jit", cycles: bool = False):
    """The demo firmware with `obj_path`'s programs attached, run by `engine`: (m, obj, links)."""
    guest, _ = _guest(firmware_elf(arch, "demo"))
    m = guest.machine
    if cycles:
        m.enable_cycle_model()
    obj = BpfObject.open(obj_path).load(m)
    links = obj.attach_all(m)
    install_engine(m, engine)
    return m, obj, links


def _count_open(arch: str, obj_path, engine: str, cycles: bool = False):
    m, obj, links = traced(arch, obj_path, engine, cycles)
    assert m.run().exit_code == 0
    return (_counts(obj.maps["by_flags"]), _counts(obj.maps["by_ret"], signed=True),
            prog_stats(links[0].prog).run_cnt), m


@pytest.mark.parametrize("arch", ARCHES)
def test_counting_maps_match(arch, bpf_obj) -> None:
    got = {e: _count_open(arch, bpf_obj("count_open", arch), e)[0] for e in ENGINES}
    assert got["jit"] == got["python"]
    assert got["jit"][0] == DEMO_FLAGS and got["jit"][2] == 16


def _events(arch: str, obj_path, exe, engine: str):
    guest, stdout = _guest(exe)
    m = guest.machine
    obj = BpfObject.open(obj_path).load(m)
    obj.attach(m, "on_lookup")
    obj.attach(m, "on_lookup_ret")
    records, samples = [], []
    obj.ring_buffer(m, "events", records.append)
    obj.perf_buffer(m, "samples", lambda cpu, data: samples.append((cpu, data)))
    install_engine(m, engine)
    assert m.run().exit_code == 0
    # struct event: the ts field (bytes 16-24) is the machine clock, which the engines
    # charge differently (per BPF instruction vs the JITed code): leave it out
    recs = [r[:16] + r[24:] for r in records]
    return recs, samples, list(bpf_trace_of(m).printk_lines), stdout.getvalue()


@pytest.mark.parametrize("arch", ARCHES)
def test_ringbuf_perf_printk_and_probe_reads_match(arch, bpf_obj, victim) -> None:
    got = {e: _events(arch, bpf_obj("events", arch), victim(arch), e) for e in ENGINES}
    assert got["jit"] == got["python"]
    recs, samples, printk, out = got["jit"]
    assert printk == ["open /etc/hostname mode 4", "open /proc/version mode 2"]
    assert samples == [(0, struct.pack("<q", 4729)), (0, struct.pack("<q", 3084))]
    assert all(struct.unpack_from("<q", r, 24)[0] == -14 for r in recs)   # -EFAULT read


@pytest.mark.parametrize("arch", ARCHES)
def test_jited_cycles_are_charged_and_repeat(arch, bpf_obj) -> None:
    runs = [_count_open(arch, bpf_obj("count_open", arch), "jit", cycles=True)[1]
            for _ in range(2)]
    # the JITed code runs on the traced CPU: the profile charges it as guest code
    charged = [sum(bpf_trace_of(m).runner.cycles.values()) for m in runs]
    assert charged[0] > 0 and charged[0] == charged[1]
    assert runs[0].clock.cycles == runs[1].clock.cycles


def test_cli_bpf_engine_jit(bpf_obj, victim) -> None:
    arch = "x86_64"
    argv = ["run", "--bpf", f"{bpf_obj('override', arch)}:force_ok", str(victim(arch))]
    base = run_emu(*argv)
    jit = run_emu(*argv[:1], "--bpf-engine", "jit", *argv[1:])
    assert jit.rc == base.rc == 0, jit.err
    assert jit.out == base.out and "check_perm(1000) = 0" in jit.out
