"""Modules built with ftrace patch sites (x86 -pg -mfentry -mnop-mcount -mrecord-mcount,
arm64 -fpatchable-function-entry=2), both arches: the module's sites join the ftrace table
as it comes (the tracers already on get them), function_graph graphs its functions, a
kprobe on a module site takes the ftrace path and goes GONE with the module, and the
sites leave with it."""
from __future__ import annotations

import io

import pytest

from conftest import run_emu
from probes.ftrace import ftrace_of
from probes.kprobes import KPROBE_FLAG_FTRACE, KPROBE_FLAG_GONE, Kprobe
from probes.module import load_module, unload_module
from probes.testing import ProbeLab
from probes.trace.trace_functions_graph import FunctionGraphTracer
from test_module_load import module_builder

FTRACE_FLAGS = {"arm64": ["-mgeneral-regs-only", "-fpatchable-function-entry=2"],
                "x86_64": ["-mno-sse", "-mno-red-zone", "-pg", "-mfentry", "-mnop-mcount",
                           "-mrecord-mcount"]}


@pytest.fixture(scope="module")
def build(c_prog):
    return module_builder(c_prog, FTRACE_FLAGS)


def test_emu_run_graphs_module_functions(arch, build, tmp_path):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    out = tmp_path / "graph"
    r = run_emu("run", "--module", str(obj), "--graph-filter", "mod_work", "--trace-out", str(out),
                str(host))
    assert r.rc == 0 and r.out == "sum=1080 host_calls=8\n", r.stderr
    body = [line.split("|  ", 1)[1] for line in out.read_text().splitlines()[4:]]
    assert body == ["mod_work() {", "  mod_mix();", "}"] * 8


def test_sites_come_and_go_with_the_module(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    lab = ProbeLab.load(str(host))
    m = lab.machine
    ft = ftrace_of(m)
    graph_out = io.StringIO()
    FunctionGraphTracer(m, graph_out)          # on before the module exists
    host_sites = set(ft.sites)
    seen: dict[str, object] = {}

    def at_checkpoint(_p, _regs):
        i = m.arg(0)
        if i == 3:
            mod = seen["mod"] = load_module(m, str(obj), "counter_mod")
            new = set(ft.sites) - host_sites
            assert {ft.sites[a].func for a in new} >= {"mod_work", "mod_mix", "init_module"}
            assert all(ft.sites[a].enabled for a in new)           # the graph's ops got them
            p = seen["probe"] = Kprobe(symbol_name="counter_mod:mod_mix")
            lab.kprobes.register_kprobe(p)
            assert p.flags & KPROBE_FLAG_FTRACE
            seen["site"] = p.addr
        if i == 6:
            unload_module(m, "counter_mod")
        return 0

    lab.kprobe("checkpoint", pre=at_checkpoint)
    assert lab.run(max_insns=50_000_000).exit_code == 0
    assert lab.stdout == b"sum=420 host_calls=3\n"       # i = 3, 4, 5: 10 * i + 100 each
    p = seen["probe"]
    assert isinstance(p, Kprobe) and p.hits == 3 and p.flags & KPROBE_FLAG_GONE
    assert not p.ainsn.armed and set(ft.sites) == host_sites
    text = graph_out.getvalue()
    # init_module ran (graphed, from inside checkpoint's probe) and mod_work 3 times
    assert text.count("mod_work() {") == 3 and text.count("mod_mix();") == 3
    assert "init_module();" in text and "cleanup_module();" in text
