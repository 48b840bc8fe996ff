"""The function_graph tracer (probes/trace/trace_functions_graph.py) on the ftrace builds of
the firmware, both arches: the kernel's layout (header, cpu column, duration column with
its marks, `{`/`}` nesting, leaves on one line), durations from the modelled clock that
repeat run to run, set_graph_function (--graph-filter), max_graph_depth, a kretprobe on a
graphed function (both hijack the same return address), `emu trace`, and refusals."""
from __future__ import annotations

import io
import json
import re

import pytest

from conftest import FIRMWARE, firmware_elf, run_emu
from probes.testing import ProbeLab
from probes.trace.trace_functions_graph import (FunctionGraphTracer, GraphEnt, GraphPrinter,
                                                GraphRet, graph_header, print_graph_duration,
                                                trace_find_mark)

HEADER = ("# tracer: function_graph\n#\n# CPU  DURATION                  FUNCTION CALLS\n"
          "# |     |   |                     |   |   |   |\n")
# ` 0) ` + mark + duration padded to the bar, or 14 blanks; `|  `; indent; the call
LINE = re.compile(r"^ 0\) (?:(?P<mark>[ +!#*@$]) (?P<us>\d+(?:\.\d+)?) us +|              )"
                  r"\|  (?P<indent> *)(?P<text>\S.*)$")


def graph(arch: str, tmp_path, *opts: str, prog: str = "callpath.ftrace") -> list[str]:
    out = tmp_path / f"graph-{arch}.txt"
    r = run_emu("run", *opts, "--trace-out", str(out), str(firmware_elf(arch, prog)))
    assert r.rc == 0, r.stderr
    text = out.read_text()
    assert text.startswith(HEADER)
    return text[len(HEADER):].splitlines()


def parse(lines: list[str]) -> list[tuple[int, str, float | None]]:
    """(depth, text, duration µs or None) per line; every line must match the layout."""
    rows = []
    for line in lines:
        m = LINE.match(line)
        assert m, f"not a function_graph line: {line!r}"
        assert len(m["indent"]) % 2 == 0
        us = float(m["us"]) if m["us"] else None
        rows.append((len(m["indent"]) // 2, m["text"], us))
    return rows


def tree_check(rows) -> dict[str, int]:
    """Entries and returns nest by depth; a parent lasts longer than its direct children
    together. Returns how many times each function was called."""
    stack: list[tuple[str, float]] = []          # (func, children's total µs)
    calls: dict[str, int] = {}
    for depth, text, us in rows:
        if text.endswith("() {"):
            assert depth == len(stack) and us is None
            stack.append((text[:-4], 0.0))
        elif text.endswith("();"):
            assert depth == len(stack) and us is not None
            calls[text[:-3]] = calls.get(text[:-3], 0) + 1
            if stack:
                stack[-1] = (stack[-1][0], stack[-1][1] + us)
        else:
            assert text == "}" and depth == len(stack) - 1 and us is not None
            func, children = stack.pop()
            calls[func] = calls.get(func, 0) + 1
            assert us > children, (func, us, children)
            if stack:
                stack[-1] = (stack[-1][0], stack[-1][1] + us)
    assert not stack
    return calls


# --- the layout, piece by piece (trace_print_graph_duration, trace_find_mark) ---------------------
@pytest.mark.parametrize("ns, text", [
    (123, "  0.123 us    |  "), (15_000, "+ 15.000 us   |  "), (10_000, "  10.000 us   |  "),
    (100_001, "! 100.001 us  |  "), (1_234_567, "# 1234.567 us |  "), (12_345_678, "* 12345.67 us |  "),
    (123_456_789, "@ 123456.7 us |  "), (1_234_567_890, "$ 1234567 us  |  "), (None, " " * 14 + "|  "),
])
def test_duration_column(ns, text):
    assert print_graph_duration(ns) == text


def test_marks_are_strictly_greater():
    assert [trace_find_mark(n) for n in (10_000, 10_001, 100_000, 100_001, 1_000_001)] == \
        [" ", "+", "+", "!", "#"]


def test_printer_leaf_nested_and_unseen_entry():
    out = io.StringIO()
    p = GraphPrinter(out)
    p.entry(GraphEnt("outer", 0))
    p.entry(GraphEnt("leaf", 1))
    p.ret(GraphRet("leaf", 1, 100, 223))
    p.ret(GraphRet("outer", 0, 0, 15_000))
    p.ret(GraphRet("caller", 0, 0, 2_000))        # its entry was never seen
    p.entry(GraphEnt("last", 0))
    p.flush()                                     # no next event: printed as nested
    assert out.getvalue() == (" 0)               |  outer() {\n"
                              " 0)   0.123 us    |    leaf();\n"
                              " 0) + 15.000 us   |  }\n"
                              " 0)   2.000 us    |  } /* caller */\n"
                              " 0)               |  last() {\n")
    assert graph_header() == HEADER


# --- on the guest ----------------------------------------------------------------------------------
def test_graph_nests_as_the_call_graph(arch, tmp_path):
    rows = parse(graph(arch, tmp_path, "--function-graph"))
    calls = tree_check(rows)
    # callpath runs its request list twice: 'open' requests go sys_open -> do_sys_open
    assert calls["do_sys_open"] >= 2 and calls["main"] == 1
    texts = [(d, t) for d, t, _ in rows]
    i = texts.index((4, "sys_open() {"))
    assert texts[i + 1] == (5, "do_sys_open() {")
    assert texts[i + 2] == (6, "build_open_flags();")
    assert texts[0] == (0, "main() {")
    assert any(t == "enter_from_user_mode();" for _d, t in texts)


def test_durations_repeat_run_to_run(arch, tmp_path):
    first = graph(arch, tmp_path, "--function-graph", "--cycles")
    second = graph(arch, tmp_path, "--function-graph", "--cycles")
    assert first == second
    assert any(line.startswith(" 0) ! ") for line in first)        # main lasts > 100 µs


def test_graph_filter_starts_the_graph_at_the_function(arch, tmp_path):
    full = tree_check(parse(graph(arch, tmp_path, "--function-graph")))
    rows = parse(graph(arch, tmp_path, "--graph-filter", "do_sys_open"))
    calls = tree_check(rows)
    assert calls["do_sys_open"] == full["do_sys_open"]
    assert {"main", "sys_open", "syscall_entry", "sys_close"}.isdisjoint(calls)
    assert calls["getname_flags"] <= full["getname_flags"] and "getname_flags" in calls
    assert all(t == "do_sys_open() {" for d, t, _ in rows if d == 0 and t.endswith("{"))


def test_max_graph_depth(arch, tmp_path):
    rows = parse(graph(arch, tmp_path, "--max-graph-depth", "3"))
    assert max(d for d, _t, _u in rows) == 2
    calls = tree_check(rows)
    # syscall_entry (depth 2) calls functions, but at this depth it prints as a leaf
    assert ("syscall_entry" in calls
            and not any(t == "syscall_entry() {" for _d, t, _u in rows))


def test_recursion_depth(arch, tmp_path):
    rows = parse(graph(arch, tmp_path, "--graph-filter", "fib", prog="recurse.ftrace"))
    tree_check(rows)
    assert max(d for d, _t, _u in rows) >= 3
    assert {t.rstrip("();{ ") for _d, t, _u in rows if t != "}"} == {"fib"}


def test_coexists_with_a_kretprobe(arch, tmp_path):
    stats = tmp_path / "stats.json"
    rows = parse(graph(arch, tmp_path, "--function-graph", "--kretprobe", "do_sys_open",
                       "--stats", str(stats)))
    calls = tree_check(rows)
    probe = json.loads(stats.read_text())["probes"][0]
    assert probe["hits"] == probe["returns"] == calls["do_sys_open"]
    fg = json.loads(stats.read_text())["function_graph"]
    assert fg["entries"] == fg["returns"] == sum(calls.values())
    plain = tree_check(parse(graph(arch, tmp_path, "--function-graph")))
    assert calls == plain


def test_guest_output_unchanged(arch, tmp_path):
    elf = str(firmware_elf(arch, "callpath.ftrace"))
    plain = run_emu("run", elf)
    traced = run_emu("run", "--function-graph", "--trace-out", str(tmp_path / "t"), elf)
    assert traced.rc == plain.rc == 0 and traced.stdout == plain.stdout


def test_emu_trace_prints_the_graph_on_stdout(arch):
    r = run_emu("trace", "--graph-filter", "vfs_open", str(firmware_elf(arch, "callpath.ftrace")))
    assert r.rc == 0, r.stderr
    assert r.out.startswith(HEADER)
    rows = parse(r.out[len(HEADER):].splitlines())
    assert rows and all(t == "vfs_open();" for _d, t, _u in rows)


def test_unregister_restores_the_nops(arch):
    lab = ProbeLab.load(str(firmware_elf(arch, "callpath.ftrace")))
    m = lab.machine
    from probes.ftrace import ftrace_of
    sites = ftrace_of(m).sites
    before = {a: lab.text(a, ftrace_of(m).site_size) for a in sites}
    out = io.StringIO()
    tracer = FunctionGraphTracer(m, out, ["do_sys_open"])
    assert tracer.enabled_sites == len(sites)
    assert any(lab.text(a, len(b)) != b for a, b in before.items())
    tracer.stop()
    assert {a: lab.text(a, len(b)) for a, b in before.items()} == before


@pytest.mark.parametrize("opts, message", [
    (["--graph-filter", "no_such_fn"], "no_such_fn: no function with an ftrace site"),
    (["--function-graph", "--ftrace-filter", "main"], "one tracer at a time"),
    (["--max-graph-depth", "-1"], "--max-graph-depth"),
])
def test_refusals(arch, opts, message):
    r = run_emu("run", *opts, str(firmware_elf(arch, "callpath.ftrace")))
    assert r.rc == 2 and message in r.stderr.decode() and "Traceback" not in r.stderr.decode()


def test_refuses_a_guest_without_ftrace_sites(arch):
    r = run_emu("run", "--function-graph", str(firmware_elf(arch, "callpath")))
    assert r.rc == 2 and "no ftrace site" in r.stderr.decode()
    assert FIRMWARE.is_dir()


def test_stop_mid_run_leaves_pending_calls_returning(arch):
    """Stopped from a probe inside graphed calls: nothing more is recorded, and the calls
    whose return address still points at the trampoline return to their callers."""
    lab = ProbeLab.load(str(firmware_elf(arch, "callpath.ftrace")))
    out = io.StringIO()
    tracer = FunctionGraphTracer(lab.machine, out)
    stopped = []

    def stop_once(_p, _regs):
        if not stopped:
            tracer.stop()
            stopped.append(len(out.getvalue().splitlines()))
        return 0

    lab.kprobe("lookup_fast", pre=stop_once)
    r = lab.run(max_insns=50_000_000)
    assert r.exit_code == 0
    assert lab.stdout == (FIRMWARE / "expected" / arch / "callpath.ftrace.out").read_bytes()
    lines = out.getvalue().splitlines()
    assert stopped and len(lines) == stopped[0] and tracer.returns < tracer.entries
    # graphed before the probe on the same site stopped the tracer: its return is not seen
    assert lines[-1].endswith("lookup_fast() {") and lines[-2].endswith("walk_component() {")


def test_graph_and_events_share_the_trace_file(arch, tmp_path):
    out = tmp_path / "trace.txt"
    r = run_emu("run", "--graph-filter", "vfs_open", "--event", "p:grp/open do_sys_open",
                "--trace-out", str(out), str(firmware_elf(arch, "callpath.ftrace")))
    assert r.rc == 0, r.stderr
    lines = out.read_text().splitlines()
    events = [line for line in lines if "open: (do_sys_open" in line]
    graph_lines = [line for line in lines if line.endswith("vfs_open();")]
    assert lines[:4] == HEADER.splitlines() and events and len(graph_lines) <= len(events)


def test_emu_trace_refuses_json_with_the_graph(arch):
    r = run_emu("trace", "--json", "--function-graph", str(firmware_elf(arch, "callpath.ftrace")))
    assert r.rc == 2 and "drop --json" in r.stderr.decode()
