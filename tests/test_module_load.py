"""Loadable guest modules (emu/module.py, probes/module.py), both arches: a relocatable
object compiled here, loaded into a running glibc program from a probe handler (its init
runs in the guest and hooks it into the host; it calls back into the host), probed by
`MOD:SYM` through kprobe_events, then unloaded (its probes GONE: flag, original bytes,
slot freed, `[GONE]` listed); the notifier chain's order and states; `emu run --module`;
refusals (not an object, unknown symbol, failing init)."""
from __future__ import annotations


import pytest

from conftest import ROOT, run_emu
from emu.module import ModuleError, ModuleState, modules_of
from probes.kprobes import KPROBE_FLAG_GONE, Kprobe
from probes.module import load_module, unload_module
from probes.testing import ProbeLab
from probes.trace.tracefs import tracefs_of

DATA = ROOT / "tests" / "data" / "module"
MOD_FLAGS = {"arm64": ["-mgeneral-regs-only"], "x86_64": ["-mno-sse", "-mno-red-zone"]}
# sum over the iterations that find the hook set: (10 * i + 100) each
ALL_RUNS = "sum=1080 host_calls=8\n"


MODULE_FLAGS = ("-fno-pic", "-fno-common", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
                "-fno-stack-protector")


def module_builder(c_prog, arch_flags: dict[str, list[str]]):
    """cc(arch, name, module=True, extra=()) -> tests/data/module/<name>.c as a relocatable
    module object (built as the kernel builds modules), or with module=False a static host."""
    def cc(arch: str, name: str, module: bool = True, extra: tuple[str, ...] = ()):
        if not module:
            return c_prog(arch, DATA / f"{name}.c")
        return c_prog(arch, DATA / f"{name}.c", "object", (*MODULE_FLAGS, *arch_flags[arch], *extra))
    return cc


@pytest.fixture(scope="module")
def build(c_prog):
    return module_builder(c_prog, MOD_FLAGS)


def test_load_probe_unload_while_running(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    lab = ProbeLab.load(str(host))
    m = lab.machine
    fs = tracefs_of(m)
    seen: dict[str, object] = {}

    def at_checkpoint(p, regs):
        i = m.arg(0)
        if i == 2:
            mod = seen["mod"] = load_module(m, str(obj), "counter_mod")
            assert mod.state == ModuleState.LIVE and mod.within_module_text(mod.symbols["mod_mix"].addr)
            assert fs.write("kprobe_events", "p:grp/mix counter_mod:mod_mix a=$arg1:s64", append=True) == 0
            assert fs.write("events/grp/mix/enable", "1") == 0
            probe = fs.kprobes.probes[-1].probe
            seen["probe"], seen["addr"] = probe, probe.addr
            seen["orig"] = lab.original(probe.addr, len(m.arch.breakpoint))
            assert lab.text(probe.addr, len(m.arch.breakpoint)) == m.arch.breakpoint
        if i == 5:
            unload_module(m, "counter_mod")
        return 0

    lab.kprobe("checkpoint", pre=at_checkpoint)
    r = lab.run(max_insns=20_000_000)
    assert r.exit_code == 0
    # the hook was set from iteration 2 to 4: 3 calls into the module, each back into the host
    assert lab.stdout == b"sum=390 host_calls=3\n"
    probe, mod = seen["probe"], seen["mod"]
    assert isinstance(probe, Kprobe)
    assert probe.hits == 3 and probe.flags & KPROBE_FLAG_GONE
    assert not probe.ainsn.armed and probe.ainsn.slot is None
    assert mod.state == ModuleState.GOING and modules_of(m).find_module("counter_mod") is None
    assert not m.memory.is_mapped(mod.base)
    assert m.symbols.lookup("counter_mod:mod_mix") is None and m.symbols.find(seen["addr"]) is None
    assert fs.read("kprobe_events") == "p:grp/mix counter_mod:mod_mix a=$arg1:s64 [GONE]\n"
    trace = fs.read("trace")
    assert [line.split("a=")[1] for line in trace.splitlines() if "mix:" in line] == ["2", "3", "4"]


def test_gone_probe_cannot_be_enabled_and_unregisters(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    lab = ProbeLab.load(str(host))
    m = lab.machine
    mod = load_module(m, str(obj))
    p = Kprobe(symbol_name="counter_mod:mod_work")
    kp = lab.kprobes
    kp.register_kprobe(p)
    orig = lab.original(p.addr, len(m.arch.breakpoint))
    before = bytes(m.memory.read(p.addr, 4))
    assert before[:len(m.arch.breakpoint)] == m.arch.breakpoint
    unload_module(m, mod)
    assert p.flags & KPROBE_FLAG_GONE and p in kp.probes()
    with pytest.raises(Exception, match="gone"):
        kp.enable_kprobe(p)
    kp.unregister_kprobe(p)
    assert p not in kp.probes()
    # loaded again (same place, fresh text): no stale breakpoint in it
    again = load_module(m, str(obj))
    addr = again.symbols["mod_work"].addr
    assert lab.text(addr, len(orig)) == orig


def test_notifier_chain_order_and_states(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    lab = ProbeLab.load(str(host))
    m = lab.machine
    mods = modules_of(m)
    calls = []
    hook_addr = m.symbols.lookup("mod_hook").addr
    for name, prio in (("low", -1), ("first-0", 0), ("high", 2), ("second-0", 0)):
        mods.register_module_notifier(
            lambda _l, state, mod, name=name: calls.append(
                (name, state.name, mod.state.name, m.memory.read_u64(hook_addr) != 0)), prio)
    mod = load_module(m, str(obj))
    unload_module(m, mod)
    # the object's tables read as an image's (ElfImage.address_table), relocated
    assert mod.image.address_table("mod_table") == [mod.symbols["mod_work"].addr,
                                                    mod.symbols["mod_mix"].addr]
    assert mod.name == "counter_mod" and mod.image.address_table("none") == []
    order = ["high", "first-0", "second-0", "low"]
    # COMING before init (hook unset), LIVE after it, GOING after cleanup_module
    assert calls == ([(n, "COMING", "COMING", False) for n in order]
                     + [(n, "LIVE", "LIVE", True) for n in order]
                     + [(n, "GOING", "GOING", False) for n in order])


def test_failing_init_goes_going_and_is_freed(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "failing_mod")
    lab = ProbeLab.load(str(host))
    states = []
    modules_of(lab.machine).register_module_notifier(lambda _l, s, mod: states.append(s.name))
    with pytest.raises(ModuleError, match="init_module returned -12") as e:
        load_module(lab.machine, str(obj))
    assert e.value.errno == 12 and states == ["COMING", "GOING"]
    assert modules_of(lab.machine).modules == []


def test_emu_run_module(arch, build):
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    plain = run_emu("run", str(host))
    assert plain.rc == 0 and plain.out == "sum=0 host_calls=0\n"
    r = run_emu("run", "--module", str(obj), "--kprobe", "counter_mod:mod_mix",
                "--event", "p:grp/mix counter_mod:mod_mix a=$arg1:s64", str(host))
    assert r.rc == 0, r.stderr
    assert r.out == ALL_RUNS
    err = r.stderr.decode()
    assert [line.split("a=")[1] for line in err.splitlines() if "mix:" in line] == \
        [str(i) for i in range(8)]
    assert "mod_mix+0x0" in err


@pytest.mark.parametrize("name, message", [
    ("unresolved_mod", "Unknown symbol no_such_host_symbol"),
    ("failing_mod", "init_module returned -12"),
])
def test_emu_run_module_refusals(arch, build, name, message):
    host, obj = build(arch, "modhost", module=False), build(arch, name)
    r = run_emu("run", "--module", str(obj), str(host))
    assert r.rc == 2 and message in r.stderr.decode() and "Traceback" not in r.stderr.decode()


def test_emu_run_module_not_an_object(arch, build, tmp_path):
    host = build(arch, "modhost", module=False)
    r = run_emu("run", "--module", str(host), str(host))       # an executable, not ET_REL
    assert r.rc == 2 and "not a relocatable object" in r.stderr.decode()
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"\x7fELF" + b"\x00" * 60)
    r = run_emu("run", "--module", str(junk), str(host))
    assert r.rc == 2 and "Traceback" not in r.stderr.decode()


def test_corrupted_objects_are_refused_cleanly(arch, build):
    """Bytes flipped anywhere in the object (headers, symbols, relocations, code): each load
    either works or raises ModuleError, and leaves no module mapped behind."""
    import random
    host, obj = build(arch, "modhost", module=False), build(arch, "counter_mod")
    lab = ProbeLab.load(str(host))
    m = lab.machine
    blob = obj.read_bytes()
    rng = random.Random(15)
    outcomes = {"loaded": 0, "refused": 0}
    mapped = m.memory.mapped_bytes
    for n in range(40):
        data = bytearray(blob)
        for _ in range(1 + n % 4):
            data[rng.randrange(len(data))] = rng.randrange(256)
        bad = obj.parent / f"bad{n}.{arch}.o"
        bad.write_bytes(bytes(data))
        try:
            mod = load_module(m, str(bad), "bad")
        except ModuleError:
            outcomes["refused"] += 1
        else:
            outcomes["loaded"] += 1
            try:
                unload_module(m, mod)
            except ModuleError as e:        # a broken cleanup_module: unloaded all the same
                assert "did not return" in str(e)
        assert modules_of(m).modules == [] and m.memory.mapped_bytes == mapped
    assert outcomes["refused"] > 0


def test_module_tracepoints_found_and_released(arch, build):
    """A real ET_REL module with a static tracepoint: insmod makes it findable (tracepoint,
    raw tracepoint) and callable through its site; rmmod releases both."""
    from probes.trace.bpf_tracepoint import bpf_raw_tracepoints_of
    from probes.tracepoint import tracepoints_of
    obj = build(arch, "tp_mod", extra=("-I", str(ROOT / "firmware" / "include")))
    lab = ProbeLab.load(str(build(arch, "modhost", module=False)))
    m = lab.machine
    mod = load_module(m, str(obj), "tp_mod")
    tps, raw = tracepoints_of(m), bpf_raw_tracepoints_of(m)
    tp = tps.lookup("mod_tick")
    assert tp is not None and tp.module is mod
    assert raw.bpf_get_raw_tracepoint("mod_tick").tp is tp
    got: list[tuple[int, ...]] = []
    assert tps.tracepoint_probe_register(tp, lambda data, args: got.append(args)) == 0
    assert lab.call(m.symbols.lookup("mod_tick_fire").addr, 41) == 42 and got == [(41,)]
    unload_module(m, mod)
    assert tps.lookup("mod_tick") is None and raw.bpf_get_raw_tracepoint("mod_tick") is None
