"""kprobe events on a module's `MOD:SYM` across its life (trace_kprobe_module_callback):
defined before the module is loaded they are listed but not registered; insmod registers
them (armed when the event is enabled); rmmod leaves them GONE; insmod again re-arms them
on the new text. Both arches, the ET_REL module of test_module_load.py."""
from __future__ import annotations

import errno

import pytest

from emu.module import ModuleState
from probes.kprobes import KPROBE_FLAG_GONE
from probes.module import load_module, module_notifier_of, unload_module
from probes.testing import ProbeLab
from probes.trace.tracefs import tracefs_of
from test_module_load import MOD_FLAGS, module_builder

ARG1 = {"arm64": "%x0", "x86_64": "%di"}       # $arg1 needs a known function entry
MIX = "p:grp/mix counter_mod:mod_mix a={}:s64"
MIXRET = "r:grp/mixret counter_mod:mod_mix ret=$retval:s64"


@pytest.fixture(scope="module")
def build(c_prog):
    return module_builder(c_prog, MOD_FLAGS)


def _define(fs, arch: str) -> None:
    assert fs.write("kprobe_events", MIX.format(ARG1[arch]), append=True) == 0
    assert fs.write("kprobe_events", MIXRET, append=True) == 0
    for ev in ("mix", "mixret"):
        assert fs.write(f"events/grp/{ev}/enable", "1") == 0


@pytest.mark.slow
def test_events_wait_for_the_module_go_gone_and_come_back(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    lab = ProbeLab.load(str(host))
    m, fs = lab.machine, tracefs_of(lab.machine)
    _define(fs, arch)
    mix, mixret = fs.kprobes.probes
    listed = f"{MIX.format(ARG1[arch])}\n{MIXRET}\n"
    assert fs.read("kprobe_events") == listed
    # once registered, a kretprobe shows the maxactive register_kretprobe gave it
    listed = listed.replace("r:", "r10:")
    assert mix.probe.addr is None and not lab.kprobes.table       # registered nowhere yet
    seen: dict[int, object] = {}

    def at_checkpoint(p, regs):
        i = m.arg(0)
        if i in (1, 6):
            mod = load_module(m, str(obj))
            addr = mod.symbols["mod_mix"].addr
            assert mix.probe.addr == mixret.probe.addr == addr
            assert lab.text(addr, len(m.arch.breakpoint)) == m.arch.breakpoint
            assert not mix.probe.flags & KPROBE_FLAG_GONE
            seen[i] = mod
        elif i == 4:
            unload_module(m, "counter_mod")
        elif i == 5:
            seen[5] = fs.read("kprobe_events")
        return 0

    lab.kprobe("checkpoint", pre=at_checkpoint)
    assert lab.run(max_insns=20_000_000).exit_code == 0
    hooked = [1, 2, 3, 6, 7]            # the module's hook is set from checkpoint 1 to 4, 6 on
    assert lab.stdout == b"sum=%d host_calls=%d\n" % (sum(10 * i + 100 for i in hooked),
                                                      len(hooked))
    assert seen[5] == listed.replace("\n", " [GONE]\n")
    assert fs.read("kprobe_events") == listed
    assert seen[1].state == ModuleState.GOING and seen[6].state == ModuleState.LIVE
    lines = fs.read("trace").splitlines()
    assert [ln.split("a=")[1] for ln in lines if " mix:" in ln] == [str(i) for i in hooked]
    assert [ln.split("ret=")[1] for ln in lines if " mixret:" in ln] == \
        [str(10 * i + 100) for i in hooked]
    assert mix.nhit == len(hooked) and not module_notifier_of(m).killed[-1].flags & KPROBE_FLAG_GONE


def test_a_disabled_event_is_registered_unarmed(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    lab = ProbeLab.load(str(host))
    m, fs = lab.machine, tracefs_of(lab.machine)
    assert fs.write("kprobe_events", MIX.format(ARG1[arch])) == 0
    mod = load_module(m, str(obj))
    (mix,) = fs.kprobes.probes
    addr = mod.symbols["mod_mix"].addr
    assert lab.kprobes.get_kprobe(addr) is mix.probe and mix.probe.disabled()
    assert lab.text(addr, len(m.arch.breakpoint)) == lab.original(addr, len(m.arch.breakpoint))
    assert fs.write("events/grp/mix/enable", "1") == 0
    assert lab.text(addr, len(m.arch.breakpoint)) == m.arch.breakpoint
    unload_module(m, mod)
    assert mix.probe.flags & KPROBE_FLAG_GONE and fs.read("kprobe_events").endswith("[GONE]\n")
    assert fs.write("events/grp/mix/enable", "0") == 0
    mod = load_module(m, str(obj))                     # back, and the event is off: unarmed
    addr = mod.symbols["mod_mix"].addr
    assert mix.probe.addr == addr and mix.probe.disabled()
    assert not mix.probe.flags & KPROBE_FLAG_GONE and "[GONE]" not in fs.read("kprobe_events")
    assert lab.text(addr, len(m.arch.breakpoint)) == lab.original(addr, len(m.arch.breakpoint))
    assert fs.write("events/grp/mix/enable", "1") == 0    # and on again: armed on the new text
    assert lab.text(addr, len(m.arch.breakpoint)) == m.arch.breakpoint


@pytest.mark.parametrize("command, message", [
    # a module symbol is not known to be a function until the module is there
    ("p:grp/a counter_mod:mod_mix x=$arg1", "$arg* can be used only on function entry or exit"),
    ("p:grp/b no_such_symbol", "Invalid probed address or symbol"),   # the image's: now
])
def test_what_a_deferred_probe_may_not_do(arch, build, command, message):
    lab = ProbeLab.load(str(build(arch, "modhost", module=False)))
    fs = tracefs_of(lab.machine)
    assert fs.write("kprobe_events", command) == -errno.EINVAL
    assert f"trace_kprobe: error: {message}\n  Command: {command}\n" in fs.read("error_log")
    assert fs.kprobes.probes == []


def test_a_deferred_probe_that_cannot_register_is_warned_about(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    lab = ProbeLab.load(str(host))
    fs = tracefs_of(lab.machine)
    # accepted while the module is away (-ENOENT is deferred); mod_mix+4 is no entry
    assert fs.write("kprobe_events", "r:grp/late counter_mod:mod_mix+4") == 0
    load_module(lab.machine, str(obj))
    (late,) = fs.kprobes.probes
    assert lab.machine.layers["trace-kprobe-module-nb"].warnings == \
        [f"Failed to re-register probe late on counter_mod: {-errno.EINVAL}"]
    assert late.probe.addr is None and not lab.kprobes.table


def test_a_symbol_missing_from_a_loaded_module_is_refused(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    lab = ProbeLab.load(str(host))
    load_module(lab.machine, str(obj))
    fs = tracefs_of(lab.machine)
    assert fs.write("kprobe_events", "p:grp/c counter_mod:no_such_function") < 0
    assert fs.kprobes.probes == []
