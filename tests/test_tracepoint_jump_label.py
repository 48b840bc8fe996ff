"""Static tracepoints on jump labels: the site flips between its nop and a branch as the
key follows the registered probe functions, which run in priority order with the
arguments as C values; kprobes refuse a site, optimized probes stay breakpoints."""
from __future__ import annotations

import errno
import shutil
import subprocess

import pytest

from conftest import CROSS_CC, ROOT, firmware_elf
from probes.errors import KprobeError
from probes.jump_label import JumpLabelError, jump_labels_of
from probes.optprobes import enable_optprobes
from probes.testing import ProbeLab
from probes.tracepoint import TRACEPOINT_DEFAULT_PRIO, parse_proto, tracepoints_of

NOP = {"arm64": bytes.fromhex("1f2003d5"), "x86_64": bytes.fromhex("0f1f440000")}


def _lab(arch: str, n: int = 5) -> ProbeLab:
    return ProbeLab.load(str(firmware_elf(arch, "tpdemo")), argv=[str(n)])


def _branch(arch: str, code: int, target: int) -> bytes:
    if arch == "arm64":
        return (0x14000000 | ((target - code) >> 2) & 0x3FFFFFF).to_bytes(4, "little")
    return b"\xe9" + ((target - code - 5) & 0xFFFFFFFF).to_bytes(4, "little")


def test_table_lists_both_tracepoints(arch):
    lab = _lab(arch)
    tps = tracepoints_of(lab.machine)
    assert [t.name for t in tps.tps] == ["tp_work", "tp_done"]
    work = tps.lookup("tp_work")
    assert [(a.name, a.size, a.signed) for a in work.args] == [("i", 4, True), ("v", 8, True)]
    assert (work.fmt, work.fmt_args) == ("i=%d v=%ld", ["i", "v"])
    assert work.iterator == lab.machine.symbols.lookup("__traceiter_tp_work").addr
    # one site each, inside the function that calls trace_*(), starting as the nop
    (site,) = work.key.entries
    assert lab.machine.symbols.find(site.code).name == "work_step"
    assert not site.branch and lab.machine.memory.read(site.code, len(NOP[arch])) == NOP[arch]


def test_site_flips_and_probes_run_in_priority_order(arch):
    lab = _lab(arch)
    m, tps = lab.machine, tracepoints_of(lab.machine)
    tp = tps.lookup("tp_work")
    (site,) = tp.key.entries
    size = len(NOP[arch])
    calls: list[tuple[str, tuple[int, ...]]] = []

    def probe(tag):
        return lambda data, args: calls.append((tag + data, args))

    lo, hi, mid = probe("lo"), probe("hi"), probe("mid")
    assert tps.tracepoint_probe_register_prio(tp, lo, "", 5) == 0
    assert m.memory.read(site.code, size) == _branch(arch, site.code, site.target)
    assert tps.tracepoint_probe_register_prio(tp, hi, "", 20) == 0
    assert tps.tracepoint_probe_register(tp, mid, "") == 0           # default prio 10
    assert tps.tracepoint_probe_register(tp, mid, "") == -errno.EEXIST
    assert [f.prio for f in tp.funcs] == [20, TRACEPOINT_DEFAULT_PRIO, 5]
    assert lab.run().exit_code == 0
    assert calls[:3] == [("hi", (0, -7)), ("mid", (0, -7)), ("lo", (0, -7))]
    assert [a for t, a in calls if t == "hi"] == [(i, 3 * i - 7) for i in range(5)]
    assert tp.hits == 5
    # the key stays on while any func is registered, and the nop returns with the last
    assert tps.tracepoint_probe_unregister(tp, hi, "") == 0
    assert tps.tracepoint_probe_unregister(tp, lo, "") == 0
    assert m.memory.read(site.code, size) != NOP[arch]
    assert tps.tracepoint_probe_unregister(tp, mid, "") == 0
    assert m.memory.read(site.code, size) == NOP[arch]
    assert tps.tracepoint_probe_unregister(tp, mid, "") == -errno.ENOENT


def test_output_is_the_same_traced_or_not(arch):
    plain = _lab(arch, 9)
    plain.run()
    traced = _lab(arch, 9)
    tps = tracepoints_of(traced.machine)
    done: list[tuple[int, ...]] = []
    tps.tracepoint_probe_register(tps.lookup("tp_done"), lambda d, a: done.append(a))
    traced.run()
    out = plain._stdout.getvalue()
    assert out == traced._stdout.getvalue() == b"tpdemo n=9 sum=45\n"
    assert done == [(9, 45)]


def test_regfunc_refusal_and_unregfunc(arch):
    lab = _lab(arch)
    tps = tracepoints_of(lab.machine)
    tp = tps.lookup("tp_done")
    seen: list[str] = []
    tp.regfunc = lambda: -errno.ENOMEM
    assert tps.tracepoint_probe_register(tp, lambda d, a: None) == -errno.ENOMEM
    assert not tp.funcs and tp.key.enabled == 0
    tp.regfunc, tp.unregfunc = (lambda: seen.append("reg") or 0), (lambda: seen.append("unreg"))
    f = lambda d, a: None                                              # noqa: E731
    tps.tracepoint_probe_register(tp, f)
    tps.tracepoint_probe_register(tp, f, "other")
    tps.tracepoint_probe_unregister(tp, f)
    tps.tracepoint_probe_unregister(tp, f, "other")
    assert seen == ["reg", "unreg"]


def test_kprobe_on_a_site_is_refused_and_neighbours_coexist(arch):
    lab = _lab(arch)
    m, tps = lab.machine, tracepoints_of(lab.machine)
    tp = tps.lookup("tp_work")
    (site,) = tp.key.entries
    assert jump_labels_of(m).jump_label_text_reserved(site.code, site.code)
    with pytest.raises(KprobeError) as e:                    # check_kprobe_address_safe
        lab.kprobe(site.code)
    assert e.value.errno == errno.EINVAL
    # a jump-optimized probe at the function's entry and the tracepoint share the function
    enable_optprobes(lab.kprobes)
    p = lab.kprobe("work_step", post_events=False)
    got: list[tuple[int, ...]] = []
    tps.tracepoint_probe_register(tp, lambda d, a: got.append(a))
    assert lab.run().exit_code == 0
    assert len(p.events) == 5 and got == [(i, 3 * i - 7) for i in range(5)]
    tps.tracepoint_probe_unregister(tp, got.append)            # not registered: no change
    assert m.memory.read(site.code, len(NOP[arch])) != NOP[arch]


def test_unexpected_site_bytes_are_a_fatal_bug(arch):
    lab = _lab(arch)
    tps = tracepoints_of(lab.machine)
    tp = tps.lookup("tp_work")
    (site,) = tp.key.entries
    lab.machine.text_poke(site.code, bytes(len(NOP[arch])))             # neither form
    with pytest.raises(JumpLabelError, match="unexpected op"):
        tps.tracepoint_probe_register(tp, lambda d, a: None)


def test_parse_proto_types():
    args = parse_proto("PARAMS(const char *s, unsigned char u, short h, u32 x, s64 y, bool b)")
    assert [(a.name, a.size, a.signed) for a in args] == [
        ("s", 8, False), ("u", 1, False), ("h", 2, True), ("x", 4, False), ("y", 8, True),
        ("b", 1, False)]
    assert args[1].value(0x1FF) == 0xFF and args[2].value(0xFFFF) == -1


def test_users_program_compiled_with_the_header(arch, tmp_path):
    cc = shutil.which(CROSS_CC[arch])
    if cc is None:
        pytest.skip(f"{CROSS_CC[arch]} not installed")
    out = tmp_path / f"tp_user.{arch}"
    proc = subprocess.run([cc, "-O2", "-static", "-I", str(ROOT / "firmware" / "include"), "-o",
                           str(out), str(ROOT / "tests" / "data" / "tracepoint" / "tp_user.c")],
                          capture_output=True, text=True)
    if proc.returncode and ("cannot find -lc" in proc.stderr or "crt1.o" in proc.stderr):
        pytest.skip(f"no static C library for {arch}")
    assert proc.returncode == 0, proc.stderr
    lab = ProbeLab.load(str(out))
    tps = tracepoints_of(lab.machine)
    tp = tps.lookup("user_mix")
    got: list[tuple[int, ...]] = []
    tps.tracepoint_probe_register(tp, lambda d, a: got.append(a))
    assert lab.run().exit_code == 0
    assert lab._stdout.getvalue() == b"user s=16\n"
    table = lab.machine.symbols.lookup("table").addr
    assert got == [(k - 2, 60000 + k, -k * 1000, table + 4 * (k & 3)) for k in range(6)]


def test_parse_jump_table_fields_are_self_relative():
    import struct

    from probes.jump_label import parse_jump_table
    base = 0x10000
    # entry 0: code 0x400100, target 0x400180, key 0x601000 | branch
    # entry 1: code 0x400200, target 0x400100, key 0x601010 | init
    data = struct.pack("<iiq", 0x400100 - base, 0x400180 - (base + 4), 0x601001 - (base + 8))
    data += struct.pack("<iiq", 0x400200 - (base + 16), 0x400100 - (base + 20),
                        0x601012 - (base + 24))
    e0, e1 = parse_jump_table(base, data)
    assert (e0.code, e0.target, e0.key, e0.branch, e0.init) == \
        (0x400100, 0x400180, 0x601000, True, False)
    assert (e1.code, e1.target, e1.key, e1.branch, e1.init) == \
        (0x400200, 0x400100, 0x601010, False, True)
    with pytest.raises(JumpLabelError):
        parse_jump_table(base, data[:20])
