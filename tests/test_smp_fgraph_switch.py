"""function_graph's context-switch markers and funcgraph-proc column, as the kernel prints
them (trace_functions_graph.c verif_pid, print_graph_proc): when the task whose events a
CPU's lines show changes, a ` ------` block ` CPU)  comm-pid  =>  comm-pid ` comes first;
a leaf needs its return from the same task. Threaded programs on 1 and 2 CPUs, both arches."""
from __future__ import annotations

import io
import json
import re

import pytest

from conftest import ARCHES, ROOT, run_emu
from probes.trace.trace_functions_graph import (GraphEnt, GraphPrinter, GraphRet, graph_header,
                                                print_graph_proc)

SMP = ROOT / "tests" / "data" / "smp"
FTRACE_FLAGS = {"x86_64": ("-fno-pic", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount"),
                "arm64": ("-fpatchable-function-entry=2",)}
RULE = " ------------------------------------------"
SWITCH = re.compile(r"^ (\d)\) +(\S+)-(\d+) +=> +(\S+)-(\d+) +$")
LINE = re.compile(r"^ (\d)\) +(\S+)-(\d+) +\| .*\|  (\S.*)$")


def test_proc_column_is_centred_in_fourteen_columns():
    assert print_graph_proc("sshd", 1755) == "  sshd-1755   "
    assert print_graph_proc("migration/0", 1) == "  migrati-1   "     # comm cut to 7
    assert print_graph_proc("a-very-long", 1234567) == "a-very--1234567"   # wider: no padding
    assert graph_header(proc=True).splitlines()[2:] == [
        "# CPU  TASK/PID         DURATION                  FUNCTION CALLS",
        "# |     |    |           |   |                     |   |   |   |"]


def test_switch_block_and_leaf_of_the_same_task_only():
    out = io.StringIO()
    p = GraphPrinter(out, cpu=1, proc=False)
    p.entry(GraphEnt("work", 0, 1001, "prog"))
    p.entry(GraphEnt("work", 0, 1002, "prog"))        # another task on this CPU
    p.ret(GraphRet("work", 0, 0, 100, 1001, "prog"))  # 1001's return: not 1002's leaf
    p.ret(GraphRet("work", 0, 50, 90, 1002, "prog"))
    assert out.getvalue() == (
        " 1)               |  work() {\n"
        + RULE + "\n"
        " 1)   prog-1001    =>   prog-1002   \n"
        + RULE + "\n\n"
        " 1)               |  work() {\n"
        + RULE + "\n"
        " 1)   prog-1002    =>   prog-1001   \n"
        + RULE + "\n\n"
        " 1)   0.100 us    |  }\n"            # enter_funcs is per CPU: 1002's entry
        + RULE + "\n"
        " 1)   prog-1001    =>   prog-1002   \n"
        + RULE + "\n\n"
        " 1)   0.040 us    |  } /* work */\n")
    assert p.switches == 3


def _graph(c_prog, arch: str, cpus: str, tmp_path) -> tuple[list[str], dict]:
    exe = c_prog(arch, SMP / "percpu.c", extra=("-pthread", *FTRACE_FLAGS[arch]))
    out, stats = tmp_path / "graph.txt", tmp_path / "stats.json"
    r = run_emu("run", "--cpus", cpus, "--graph-filter", "work", "--funcgraph-proc",
                "--trace-out", str(out), "--stats", str(stats), str(exe), "--", "3")
    assert r.rc == 0, r.err
    return out.read_text().splitlines(), json.loads(stats.read_text())["function_graph"]


@pytest.mark.parametrize("cpus", ["1", "2"])
@pytest.mark.parametrize("arch", ARCHES)
def test_threads_switching_on_a_cpu_get_the_kernels_markers(c_prog, arch, cpus, tmp_path):
    lines, stats = _graph(c_prog, arch, cpus, tmp_path)
    assert lines[2].startswith("# CPU  TASK/PID")
    last: dict[int, str] = {}            # cpu -> the task of its last line
    switched: dict[int, tuple[str, str]] = {}
    blocks = 0
    body = [line for line in lines if not line.startswith("#")]
    for i, line in enumerate(body):
        if line == RULE or line == "":
            continue
        sw = SWITCH.match(line)
        if sw:
            assert body[i - 1] == RULE and body[i + 1] == RULE and body[i + 2] == ""
            cpu = int(sw[1])
            assert last.get(cpu) == sw[3], line          # from the task it last showed
            switched[cpu] = (sw[3], sw[5])
            blocks += 1
            continue
        row = LINE.match(line)
        assert row, line
        cpu, pid = int(row[1]), row[3]
        if cpu in last and last[cpu] != pid:
            assert switched.pop(cpu, None) == (last[cpu], pid), line    # a block came first
        last[cpu] = pid
    assert blocks == stats["switches"] > 0
    # percpu.c's three workers and main: on one CPU all four share CPU 0
    assert set(last) == ({0} if cpus == "1" else {0, 1})
