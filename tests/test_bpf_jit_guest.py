"""JITed programs live and run in the traced guest (issue 17): the image sits in pages of the
traced machine that the BPF layer claims (r-x, written through text_poke, named as kallsyms
names BPF images), the maps and the pt_regs context in windows it maps, and a probe hit runs
the image on the traced CPU, putting the guest's registers back after. Probes refuse the
image; a program the JIT refuses falls back to the compiled Python path and says why."""
from __future__ import annotations

import json

import pytest

from conftest import ARCHES, firmware_elf, run_emu
from emu.memory import PROT_EXEC, PROT_READ
from emu.owners import RegionOwner
from probes.bpf.errors import BpfError
from probes.bpf.jit_guest import ScratchJit
from probes.errors import KprobeError
from probes.kprobes import Kprobe, kprobes_of
from probes.trace.bpf_trace import bpf_trace_of
from test_bpf_jit_attach import traced
from test_bpf_trace_attach import CLANG, DEMO_FLAGS, _counts, _guest, bpf_obj  # noqa: F401

pytestmark = pytest.mark.skipif(CLANG is None, reason="clang is not installed (apt install clang)")


@pytest.mark.parametrize("arch", ARCHES)
def test_image_is_in_the_traced_machine(arch, bpf_obj) -> None:
    m, obj, links = traced(arch, bpf_obj("count_open", arch))
    assert m.run().exit_code == 0
    runner = bpf_trace_of(m).runner
    prog = links[0].prog
    image = runner.image_of(prog)
    assert image is not None and runner.jit.machine is m
    assert bytes(m.memory.read(image.addr, len(image.code))) == image.code
    assert m.owners.owner_of(image.addr) is RegionOwner.BPF
    region = m.memory.find(image.addr)
    assert region is not None and region.prot == PROT_READ | PROT_EXEC
    sym = m.symbols.find(image.entry)
    assert sym is not None and sym.name.startswith("bpf_prog_")
    # the maps the JITed code updated are the maps host code reads
    assert _counts(obj.maps["by_flags"]) == DEMO_FLAGS
    assert not runner.fallback


@pytest.mark.parametrize("arch", ARCHES)
def test_probe_on_the_image_is_refused(arch, bpf_obj) -> None:
    m, _obj, links = traced(arch, bpf_obj("count_open", arch))
    assert m.run().exit_code == 0
    image = bpf_trace_of(m).runner.image_of(links[0].prog)
    with pytest.raises(KprobeError):
        kprobes_of(m).register_kprobe(Kprobe(addr=image.entry))


@pytest.mark.parametrize("arch", ARCHES)
def test_hit_runs_on_the_traced_cpu_and_restores_it(arch, bpf_obj) -> None:
    """The guest's registers around a hit are what they were (the program clobbers the
    arch's BPF registers on the same CPU); the JITed cycles are charged and repeat."""
    m, _obj, links = traced(arch, bpf_obj("count_open", arch), cycles=True)
    trace = bpf_trace_of(m)
    runner, seen = trace.runner, []

    def spy(prog, ctx, env):
        before = {r: m.reg(r) for r in runner.jit.emitter.reg_names[:11]}
        before["sp"], before["pc"] = m.sp, m.pc
        r0 = type(runner).__call__(runner, prog, ctx, env)
        after = {r: m.reg(r) for r in runner.jit.emitter.reg_names[:11]}
        after["sp"], after["pc"] = m.sp, m.pc
        seen.append(before == after)
        return r0
    trace.runner = spy
    assert m.run().exit_code == 0
    assert seen and all(seen)
    assert runner.cycles[links[0].prog] > 0


@pytest.mark.parametrize("arch", ARCHES)
def test_jit_cycles_repeat_run_to_run(arch, bpf_obj) -> None:
    got = []
    for _ in range(2):
        m, _obj, links = traced(arch, bpf_obj("count_open", arch), cycles=True)
        assert m.run().exit_code == 0
        got.append((bpf_trace_of(m).runner.cycles[links[0].prog], m.clock.cycles))
    assert got[0] == got[1] and got[0][0] > 0


@pytest.mark.parametrize("arch", ARCHES)
def test_refused_program_falls_back_to_python(arch, bpf_obj, monkeypatch) -> None:
    def refuse(self, prog, probe_mem=frozenset()):
        raise BpfError("refused for the test")
    monkeypatch.setattr(ScratchJit, "compile", refuse)
    m, obj, links = traced(arch, bpf_obj("count_open", arch))
    assert m.run().exit_code == 0
    runner = bpf_trace_of(m).runner
    assert dict(runner.fallback) == {link.prog: "refused for the test" for link in links}
    assert _counts(obj.maps["by_flags"]) == DEMO_FLAGS


@pytest.mark.parametrize("arch", ARCHES)
def test_cli_runs_jit_by_default_and_stats_say_so(arch, bpf_obj, tmp_path) -> None:
    stats = tmp_path / "stats.json"
    obj = bpf_obj("count_open", arch)
    exe = str(firmware_elf(arch, "demo"))
    got = run_emu("run", "--bpf", str(obj), "--stats", str(stats), exe)
    assert got.rc == 0, got.err
    progs = {p["name"]: p for p in json.loads(stats.read_text())["bpf"]["programs"]}
    assert set(progs) == {"count_flags", "count_ret"}
    for p in progs.values():
        assert p["engine"] == "jit" and p["jit_image"] > 0 and p["jit_size"] > 0
        assert p["run_cnt"] == 16
    python = run_emu("run", "--bpf-engine", "python", "--bpf", str(obj), "--stats",
                     str(tmp_path / "py.json"), exe)
    assert python.rc == 0 and python.out == got.out
    py = json.loads((tmp_path / "py.json").read_text())["bpf"]
    assert py["maps"] == json.loads(stats.read_text())["bpf"]["maps"]
    assert all(p["engine"] == "python" for p in py["programs"])


@pytest.mark.parametrize("arch", ARCHES)
def test_inspect_shows_the_image_address(arch, bpf_obj) -> None:
    obj = bpf_obj("count_open", arch)
    exe = str(firmware_elf(arch, "demo"))
    got = run_emu("inspect", "--bpf", str(obj), exe, "do_sys_open")
    assert got.rc == 0, got.err
    lines = [ln for ln in got.out.splitlines() if ln.startswith("bpf:")]
    assert len(lines) == 2 and all(" JITed at 0x" in ln for ln in lines), got.out
    js = json.loads(run_emu("inspect", "--json", "--bpf", str(obj), exe, "do_sys_open").out)
    addrs = [p["jit_image"] for p in js[0]["bpf"]]
    assert [ln.split(" JITed at ")[1].split()[0] for ln in lines] == [hex(a) for a in addrs]
