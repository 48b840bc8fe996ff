"""The CLI's plumbing (issue 12): the layers' `emu run` options come from one explicit,
ordered list of providers; a layer that fails to import is an error, never a missing
command; `bench` is the probe layer's; every command writes to the streams it is given, so
`main(argv, stdout=, stderr=)` captures everything and nothing reaches the process's own
stdout/stderr; the arch names are written once (emu.arch.ARCH_NAMES)."""
from __future__ import annotations

import argparse
import io
import json
import sys
import types

import pytest

import emu.cli as cli
from conftest import ARCHES, firmware_elf, run_emu, run_emu_inprocess
from emu.arch import ARCH_NAMES
from emu.session import RunOptionProvider, Session


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions}


# --- run options: an explicit, ordered list ----------------------------------------------------
def test_run_option_providers_in_the_order_they_apply():
    names = [p.name for p in cli.run_option_providers()]
    assert names == ["linux", "cycles", "kprobes", "trace events", "bpf"]


def test_every_provider_declares_its_options_and_nothing_is_registered_globally():
    import emu.session
    assert not hasattr(emu.session, "RUN_OPTION_HANDLERS")
    base = argparse.ArgumentParser()
    before = _dests(base)
    added: dict[str, set[str]] = {}
    for p in cli.run_option_providers():
        known = _dests(base)
        p.add(base)
        added[p.name] = _dests(base) - known
    assert all(added.values()), added                   # each provider adds its own options
    assert {"max_memory"} <= added["linux"] and {"cycles", "max_cycles"} <= added["cycles"]
    assert {"kprobe", "kretprobe", "ftrace_filter"} <= added["kprobes"]
    assert {"event", "filter"} <= added["trace events"] and {"bpf"} <= added["bpf"]
    run = _subparsers(cli.build_parser())["run"]
    assert set().union(*added.values()) <= _dests(run) - before
    # building the parser again gives the same options (nothing accumulates)
    assert _dests(_subparsers(cli.build_parser())["run"]) == _dests(run)


def test_session_applies_the_providers_given_in_order(arch):
    calls: list[tuple[str, str]] = []

    def provider(name: str) -> RunOptionProvider:
        return RunOptionProvider(name, lambda p: None,
                                 lambda s, a: calls.append((name, s.machine.arch.name)))
    args = cli.parse_args(["run", str(firmware_elf(arch, "hotloop"))])
    session = Session.from_args(args, [], io.BytesIO(), io.BytesIO(), io.BytesIO(),
                                providers=[provider("b"), provider("a"), provider("c")])
    assert calls == [("b", arch), ("a", arch), ("c", arch)]
    assert session.attachments == []
    # without providers a session is the bare guest: no layer acts on its own
    assert Session.from_args(args, [], io.BytesIO(), io.BytesIO(), io.BytesIO()).attachments == []


def test_run_applies_the_providers_of_the_list(monkeypatch, arch):
    """`emu run` uses run_option_providers(): a provider added there acts, in its place."""
    seen: list[str] = []
    real = cli.run_option_providers

    def with_probe_spy() -> list[RunOptionProvider]:
        spy = RunOptionProvider("spy", lambda p: p.add_argument("--spy", action="store_true"),
                                lambda s, a: seen.append(f"spy={a.spy} kprobes={len(a.kprobe)}"))
        return [*real(), spy]
    monkeypatch.setattr(cli, "run_option_providers", with_probe_spy)
    r = run_emu("run", "--spy", "--kprobe", "do_sys_open", str(firmware_elf(arch, "demo")))
    assert r.rc == 0, r.err
    assert seen == ["spy=True kprobes=1"]
    assert "do_sys_open+0x0" in r.err                     # the kprobes provider still acted


# --- an import error is an error ---------------------------------------------------------------
def test_a_subcommand_module_that_fails_to_import_ends_the_command(monkeypatch):
    broken = types.ModuleType("broken_layer")

    def add_subcommands(sub):
        raise ImportError("No module named 'missing_dependency'")
    broken.add_subcommands = add_subcommands            # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "broken_layer", broken)
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", (*cli.SUBCOMMAND_MODULES, "broken_layer"))
    for argv in (["info", str(firmware_elf("x86_64", "hotloop"))], ["bench", "--help"]):
        r = run_emu_inprocess(*argv)
        assert r.rc == 70 and r.out == "", (r.rc, r.out)
        assert r.err == ("emu: internal error: ImportError: No module named 'missing_dependency' "
                         "(emu --traceback ... shows where)\n")


def test_a_missing_subcommand_module_ends_the_command(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("probes.no_such_cli",))
    r = run_emu_inprocess("info", str(firmware_elf("arm64", "hotloop")))
    assert r.rc == 70 and "ModuleNotFoundError: No module named 'probes.no_such_cli'" in r.err


def test_a_run_option_provider_that_fails_to_import_ends_the_command(monkeypatch):
    def broken() -> list[RunOptionProvider]:
        import probes.no_such_options  # type: ignore[import-not-found]  # noqa: F401
        return []
    monkeypatch.setattr(cli, "run_option_providers", broken)
    r = run_emu_inprocess("run", str(firmware_elf("arm64", "hotloop")))
    assert r.rc == 70 and r.out == ""
    assert "ModuleNotFoundError: No module named 'probes.no_such_options'" in r.err


def test_trace_option_providers_are_not_optional(monkeypatch):
    from probes.trace import cli as trace_cli
    monkeypatch.setattr(trace_cli, "PROVIDER_MODULES", ("probes.trace.no_such_provider",))
    r = run_emu_inprocess("info", str(firmware_elf("arm64", "hotloop")))
    assert r.rc == 70 and "No module named 'probes.trace.no_such_provider'" in r.err


# --- the subcommands and where they live -------------------------------------------------------
def test_subcommands_and_their_modules():
    subs = _subparsers(cli.build_parser())
    assert list(subs) == ["run", "info", "disasm", "inspect", "sweep", "trace", "bpf", "bench", "filter"]
    assert subs["sweep"].get_default("func").__module__ == "probes.sweep_cli"
    assert subs["bench"].get_default("func").__module__ == "probes.bench_cli"
    assert subs["inspect"].get_default("func").__module__ == "probes.cli"
    from conftest import ROOT
    assert not (ROOT / "emu" / "bench_cli.py").exists()           # not in the machine layer


@pytest.mark.parametrize("command", ["run", "inspect", "sweep", "trace", "bench"])
def test_arch_choices_come_from_the_arch_package(command):
    p = _subparsers(cli.build_parser())[command]
    choices = next(a.choices for a in p._actions if a.dest == "arch")
    assert [c for c in choices if c not in ("auto", "all")] == list(ARCH_NAMES)


# --- every command writes to the streams it is given -------------------------------------------
def _commands(arch: str, tmp_path) -> dict[str, list[str]]:
    hotloop, demo = str(firmware_elf(arch, "hotloop")), str(firmware_elf(arch, "demo"))
    asm = tmp_path / "p.s"
    asm.write_text("mov r0, 7\nexit\n")
    return {
        "info": ["info", hotloop],
        "disasm": ["disasm", hotloop, "hot_leaf"],
        "run": ["run", "--kprobe", "do_sys_open", "--cycles", demo],
        "run-ftrace": ["run", "--ftrace-filter", "fib", str(firmware_elf(arch, "recurse.ftrace"))],
        "run-event": ["run", "--event", "p:g/open do_sys_open", demo],
        "run-fault": ["run", "--max-insns", "1000", hotloop],
        "inspect": ["inspect", "--run", demo, "do_sys_open"],
        "sweep": ["sweep", "--func", "getname", "--json", str(firmware_elf(arch, "callpath"))],
        "trace": ["trace", "--event", "p:g/open do_sys_open", demo],
        "bpf": ["bpf", "run", "--asm", str(asm)],
        "bench": ["bench", "--arch", arch, "--kind", "k", "--calls", "20", "--repeat", "1"],
        "usage": ["run", "--no-such-option", hotloop],
        "help": ["info", "--help"],
    }


@pytest.mark.parametrize("name", ["info", "disasm", "run", "run-ftrace", "run-event", "run-fault",
                                  "inspect", "sweep", "trace", "bpf", "bench", "usage", "help"])
def test_commands_write_only_to_the_given_streams(arch, tmp_path, capfd, name):
    argv = _commands(arch, tmp_path)[name]
    capfd.readouterr()
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(argv, stdin=io.StringIO(""), stdout=out, stderr=err)
    leaked = capfd.readouterr()
    assert (leaked.out, leaked.err) == ("", ""), (name, leaked)
    assert out.getvalue() or err.getvalue(), name
    expected_rc = {"usage": 2, "run-fault": 124}.get(name, 0)
    assert rc == expected_rc, (name, rc, err.getvalue())
    if name in ("run", "run-ftrace", "run-event"):
        assert err.getvalue()                         # probe table / trace lines: stderr
    if name == "sweep":
        result = json.loads(out.getvalue())
        assert (result["arch"], result["mismatches"]) == (arch, 0) and result["checked"] > 1
    if name == "help":
        assert out.getvalue().startswith("usage: emu info")


# --- the fast tier -------------------------------------------------------------------------------
def test_slow_cases_name_existing_tests():
    """A renamed test would silently leave the slow tier: every listed case must exist."""
    import re

    from conftest import ROOT, SLOW_CASES
    for case in SLOW_CASES:
        path, _, rest = case.partition("::")
        func, _, params = rest.partition("[")
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {re.escape(func)}\(", source, re.M), case
        assert not params or params.endswith("]"), case
