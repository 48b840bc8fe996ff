"""function_graph on several CPUs: each line's CPU column is the CPU the call ran on, and a
leaf is decided by the next event on the same CPU (per-CPU printers), both arches. Before,
every line said CPU 0."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from conftest import ARCHES, ROOT, run_emu

SMP = ROOT / "tests" / "data" / "smp"
CALLS = [300 + 100 * i for i in range(8)]       # percpu.c: thread i calls work() so often
FTRACE_FLAGS = {"x86_64": ("-fno-pic", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount"),
                "arm64": ("-fpatchable-function-entry=2",)}
LINE = re.compile(r"^ (\d)\) .*\|  (\S.*)$")


def _switch_block(line: str) -> bool:
    """A line of the context-switch block (test_smp_fgraph_switch.py checks them)."""
    return line in ("", " ------------------------------------------") or " => " in line


@pytest.mark.parametrize("arch", ARCHES)
def test_graph_lines_carry_the_cpu_each_call_ran_on(c_prog, arch, tmp_path):
    exe = c_prog(arch, SMP / "percpu.c", extra=("-pthread", *FTRACE_FLAGS[arch]))
    out = tmp_path / "graph.txt"
    r = run_emu("run", "--cpus", "4", "--graph-filter", "work", "--trace-out", str(out),
                str(exe), "--", "5")
    assert r.rc == 0, r.err
    rows = [LINE.match(line) for line in out.read_text().splitlines()
            if not line.startswith("#") and not _switch_block(line)]
    assert all(rows)
    # a call is a leaf, or an entry whose return came after another task's events on
    # that CPU (a switch inside work())
    per_cpu = Counter(int(m[1]) for m in rows if m and m[2] in ("work();", "work() {"))
    want: Counter[int] = Counter()
    for k, calls in enumerate(CALLS[:5]):       # the k-th thread created runs on (k+1) % 4
        want[(k + 1) % 4] += calls
    assert per_cpu == want
    texts = Counter(m[2] for m in rows if m)
    closes = texts["}"] + texts["} /* work */"]
    # (turns of a few thousand modelled cycles split a call now and then, not often)
    assert texts["work() {"] == closes < texts["work();"] // 20, texts
