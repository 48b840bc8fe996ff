"""Dynamic ftrace (probes/ftrace.py) on the ftrace builds of the firmware
(`{recurse,callpath}.ftrace.elf`: x86 5-byte nop in __mcount_loc, arm64 two nops in
__patchable_function_entries), both arches.

Covered: the site table; nop <-> call patching visible in guest memory, with the nop back
when the last ops goes; the function tracer's lines (format, parents checked against the
static call graph); kprobes on ftrace sites (flag FTRACE, no breakpoint byte, handler ip,
IPMODIFY: a pre handler that changes ip and returns 1 skips the function, sp changes
ignored as in ftrace_regs_caller); nmissed on recursion through ftrace probes; the
`--ftrace-filter` CLI (line format, same guest stdout as without tracing)."""
from __future__ import annotations

import collections
import io
import re

import capstone
import pytest

from conftest import FIRMWARE, firmware_elf
from probes.ftrace import FtraceOps, FunctionTracer, ftrace_of
from probes.kprobes import KPROBE_FLAG_FTRACE
from probes.testing import ProbeLab

NOP = {"x86_64": bytes.fromhex("0f1f440000"), "arm64": bytes.fromhex("1f2003d5") * 2}
BREAKPOINT = {"arm64": (0xD4200080).to_bytes(4, "little"), "x86_64": b"\xcc"}
IP_OFFSET = {"arm64": 0, "x86_64": 1}
RECURSE_FUNCS = {"fib", "factorial", "is_even", "is_odd", "sum_rec", "ackermann",
                 "recurse_main", "main"}
# comm right-aligned in 16, pid left-aligned in 7, cpu, 5 flag chars, sec.usec
LINE = re.compile(r"^(?P<comm>[ \S]{16})-(?P<pid>[0-9 ]{7}) \[000\] \.\.\.\.\. "
                  r"(?P<sec>[ \d]{5}\d*)\.(?P<usec>\d{6}): (?P<func>\w+) <-(?P<parent>\w+)$")


def load(arch: str, prog: str = "recurse.ftrace") -> ProbeLab:
    return ProbeLab.load(str(firmware_elf(arch, prog)))


def expected_out(arch: str, prog: str = "recurse.ftrace") -> bytes:
    return (FIRMWARE / "expected" / arch / f"{prog}.out").read_bytes()


def site_of(lab: ProbeLab, func: str):
    (site,) = [s for s in ftrace_of(lab.machine).sites.values() if s.func == func]
    return site


def call_target(arch: str, code: bytes, addr: int) -> int | None:
    """Where the patched site transfers to (x86 `call rel32`, arm64 `b imm26`)."""
    if arch == "x86_64":
        if code[0] != 0xE8:
            return None
        return addr + 5 + int.from_bytes(code[1:5], "little", signed=True)
    word = int.from_bytes(code[:4], "little")
    if word & 0xFC000000 != 0x14000000:
        return None
    off = (word & 0x03FFFFFF) << 2
    return addr + (off - (1 << 28) if off & (1 << 27) else off)


def trace_lines(text: str) -> list[re.Match]:
    lines = text.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), [line for line, mt in zip(lines, matches) if not mt][:3]
    return matches


# --- the site table and patching --------------------------------------------------------------
def test_sites_are_the_recorded_nops(arch):
    lab = load(arch)
    sites = ftrace_of(lab.machine).sites
    assert {s.func for s in sites.values()} == RECURSE_FUNCS
    for addr, s in sites.items():
        assert lab.machine.symbols.lookup(s.func).addr == addr      # at the function entry
        assert lab.text(addr, len(NOP[arch])) == NOP[arch] and not s.enabled
    plain = ProbeLab.load(str(firmware_elf(arch, "recurse")))
    assert not ftrace_of(plain.machine).sites                       # no -pg, no table


def test_nop_call_patching_visible_in_memory(arch):
    """Attaching an ops to fib turns only fib's nop into a call of a probe-layer
    trampoline (arm64: a `b` to the site's trampoline, the second nop kept); a second ops
    on the same site changes nothing; only when the last ops goes is the nop back."""
    lab = load(arch)
    ft = ftrace_of(lab.machine)
    fib = site_of(lab, "fib")
    others = {a: lab.text(a, len(NOP[arch])) for a in ft.sites if a != fib.addr}
    calls = []
    a = FtraceOps(lambda ip, parent, ops, regs: calls.append(("a", ip)), ["fib"])
    b = FtraceOps(lambda ip, parent, ops, regs: calls.append(("b", ip)), ["fi?"])
    assert ft.register_ftrace_function(a) == 1
    patched = lab.text(fib.addr, len(NOP[arch]))
    tramp = call_target(arch, patched, fib.addr)
    assert tramp is not None and lab.kprobes.arch.owns(tramp)
    if arch == "arm64":
        assert patched[4:] == NOP[arch][4:]
    assert {a_: lab.text(a_, len(NOP[arch])) for a_ in others} == others
    assert lab.machine.original_text(fib.addr, len(NOP[arch])) == NOP[arch]
    assert ft.register_ftrace_function(b) == 1
    assert lab.text(fib.addr, len(NOP[arch])) == patched
    assert lab.call("fib", 2) == 1
    assert calls == [("a", fib.addr), ("b", fib.addr)] * 3       # fib(2): 3 calls
    ft.unregister_ftrace_function(a)
    assert lab.text(fib.addr, len(NOP[arch])) == patched
    ft.unregister_ftrace_function(b)
    assert lab.text(fib.addr, len(NOP[arch])) == NOP[arch] and not fib.enabled
    calls.clear()
    assert lab.call("fib", 2) == 1 and calls == []


# --- the function tracer ----------------------------------------------------------------------
def test_function_tracer_recurse_lines_and_parents(arch):
    lab = load(arch)
    out = io.StringIO()
    tracer = FunctionTracer(lab.machine, ["fib", "factorial", "is_*"], out)
    assert tracer.enabled_sites == 4
    lab.run()
    assert lab.stdout == expected_out(arch)
    matches = trace_lines(out.getvalue())
    assert len(matches) == tracer.lines
    pairs = collections.Counter((mt["func"], mt["parent"]) for mt in matches)
    assert pairs == {("fib", "recurse_main"): 5, ("fib", "fib"): 2150,
                     ("factorial", "recurse_main"): 5, ("factorial", "factorial"): 34,
                     ("is_even", "recurse_main"): 5, ("is_odd", "recurse_main"): 5,
                     ("is_odd", "is_even"): 43, ("is_even", "is_odd"): 43}
    first = matches[0]
    assert first["comm"].strip() == "recurse.ftrace." and first["pid"].strip() == "1000"
    stamps = [(int(mt["sec"]), int(mt["usec"])) for mt in matches]
    assert stamps == sorted(stamps) and stamps[0] < stamps[-1]


def static_callees(lab: ProbeLab) -> tuple[dict[str, set[str]], set[str]]:
    """Direct call targets of every function (from its code), and the functions that make
    indirect calls."""
    m = lab.machine
    md = capstone.Cs(m.arch.cs_arch, m.arch.cs_mode)
    direct: dict[str, set[str]] = collections.defaultdict(set)
    indirect: set[str] = set()
    for sym in m.symbols.functions():
        for insn in md.disasm(m.original_text(sym.addr, sym.size), sym.addr):
            if insn.mnemonic in ("call", "bl"):
                try:
                    target = m.symbols.find(int(insn.op_str.lstrip("#"), 16))
                except ValueError:
                    indirect.add(sym.name)
                    continue
                direct[sym.name].add(target.name if target else "?")
            elif insn.mnemonic == "blr":
                indirect.add(sym.name)
    return direct, indirect


def test_function_tracer_parents_follow_the_call_graph(arch):
    """Every traced call on callpath (filter: all sites) names as parent a function whose
    code calls the traced one directly, or one making indirect calls (the syscall table)."""
    lab = load(arch, "callpath.ftrace")
    out = io.StringIO()
    tracer = FunctionTracer(lab.machine, [], out)
    assert tracer.enabled_sites == len(ftrace_of(lab.machine).sites) >= 40
    lab.run()
    assert lab.stdout == expected_out(arch, "callpath.ftrace")
    direct, indirect = static_callees(lab)
    pairs = collections.Counter((mt["func"], mt["parent"]) for mt in trace_lines(out.getvalue()))
    wrong = [p for p in pairs if p[0] not in direct[p[1]] and p[1] not in indirect]
    assert not wrong
    assert pairs[("do_sys_open", "sys_open")] + pairs[("do_sys_open", "sys_openat")] == \
        expected_out(arch, "callpath.ftrace").count(b"] open(") + \
        expected_out(arch, "callpath.ftrace").count(b"] openat(")
    assert any(p[1] in indirect for p in pairs)                  # sys_* <- sys_dispatch


# --- kprobes on ftrace sites --------------------------------------------------------------------
def test_kprobe_on_ftrace_site(arch):
    """A kprobe on a site takes the FTRACE path: flag FTRACE, no breakpoint written (the
    site becomes the ftrace call), handlers see ip = addr+1 (x86) / addr (arm64) before and
    the address after the nop(s) in the post handler; unregistering puts the nop back."""
    lab = load(arch)
    p = lab.kprobe("fib")
    assert p.flags & KPROBE_FLAG_FTRACE and p.ainsn.kind == "ftrace" and p.ainsn.slot is None
    text = lab.text("fib", len(NOP[arch]))
    assert BREAKPOINT[arch] not in text and call_target(arch, text, p.addr) is not None
    assert p.addr not in lab.machine.break_addrs
    assert [pt.new for pt in lab.machine.patches if pt.addr == p.addr] == [text]
    ins = lab.inspect(p)
    assert (ins.verdict, ins.kind) == ("ftrace", "ftrace")
    lab.run()
    assert lab.stdout == expected_out(arch)
    assert p.hits == 2155 and p.nmissed == 0
    assert [e.handler for e in p.events[:4]] == ["pre", "post"] * 2
    assert {e.ip for e in p.events if e.handler == "pre"} == {p.addr + IP_OFFSET[arch]}
    assert {e.ip for e in p.events if e.handler == "post"} == {p.addr + len(NOP[arch])}
    lab.kprobes.unregister_kprobe(p)
    assert lab.text("fib", len(NOP[arch])) == NOP[arch]


def test_ftrace_kprobe_disable_enable_and_aggregate(arch):
    """Disabling the only ftrace kprobe on a site puts the nop back (other sites keep
    their calls); enabling re-patches it; two probes on one site share it (aggregated)
    and the nop returns when both are gone."""
    lab = load(arch)
    p, q = lab.kprobe("fib"), lab.kprobe("factorial")
    patched = lab.text("fib", len(NOP[arch]))
    lab.kprobes.disable_kprobe(p)
    assert lab.text("fib", len(NOP[arch])) == NOP[arch]
    assert lab.text("factorial", len(NOP[arch])) != NOP[arch]
    assert lab.call("fib", 10) == 55 and p.hits == 0
    lab.kprobes.enable_kprobe(p)
    assert lab.text("fib", len(NOP[arch])) == patched
    assert lab.call("fib", 10) == 55 and p.hits == 177
    r = lab.kprobe("fib")
    assert lab.call("fib", 2) == 1 and (p.hits, r.hits) == (180, 3)
    assert [e.handler for e in r.events] == ["pre", "post"] * 3
    lab.kprobes.unregister_kprobe(p)
    assert lab.text("fib", len(NOP[arch])) == patched
    lab.kprobes.unregister_kprobe(r)
    assert lab.text("fib", len(NOP[arch])) == NOP[arch] and q.hits == 0


def test_emu_inspect_ftrace_site(arch, emu_cli):
    r = emu_cli("inspect", str(firmware_elf(arch, "recurse.ftrace")), "fib")
    assert r.rc == 0, r.err
    assert "verdict:  ftrace" in r.out and "kind:     ftrace" in r.out
    row = [line for line in r.out.splitlines() if line.strip().startswith("0x")][0]
    at = row.index("0x", row.index("0x") + 1)          # where the "in guest memory" column starts
    original, patched = row[:at], row[at:]
    assert "nop" in original and ("call 0x" if arch == "x86_64" else "b #0x") in patched
    assert "int3" not in r.out and "brk" not in r.out


def test_kprobe_after_the_site_is_a_breakpoint_probe(arch):
    """Only the site itself is served by ftrace: the first real instruction after it gets
    an ordinary breakpoint."""
    lab = load(arch)
    p = lab.kprobe(f"fib+{len(NOP[arch])}")
    assert not p.flags & KPROBE_FLAG_FTRACE
    assert lab.text(p.addr, len(BREAKPOINT[arch])) == BREAKPOINT[arch]
    assert lab.text("fib", len(NOP[arch])) == NOP[arch]


def test_kprobe_and_tracer_share_a_site(arch):
    lab = load(arch)
    out = io.StringIO()
    tracer = FunctionTracer(lab.machine, ["factorial"], out)
    p = lab.kprobe("factorial")
    patched = lab.text("factorial", len(NOP[arch]))
    lab.run()
    assert lab.stdout == expected_out(arch)
    assert p.hits == tracer.lines == 39
    lab.kprobes.unregister_kprobe(p)
    assert lab.text("factorial", len(NOP[arch])) == patched          # the tracer still wants it
    ftrace_of(lab.machine).unregister_ftrace_function(tracer.ops)
    assert lab.text("factorial", len(NOP[arch])) == NOP[arch]


def final_ret(lab: ProbeLab, func: str) -> int:
    """The function's last instruction, a plain `ret`: with ip set there at the site (before
    the prologue) the function returns at once, as the kernel's just_return_func."""
    sym = lab.machine.symbols.lookup(func)
    m = lab.machine
    insns = list(capstone.Cs(m.arch.cs_arch, m.arch.cs_mode).disasm(
        m.original_text(sym.addr, sym.size), sym.addr))
    rets = [i.address for i in insns if i.mnemonic == "ret" and not i.op_str]
    return rets[-1]


def factorial_out(arch: str, skipped: int, value: int) -> bytes:
    """recurse's output when factorial(skipped) returns `value` without running."""
    out = []
    for line in expected_out(arch).decode().splitlines(keepends=True):
        mt = re.match(r"factorial\((\d+)\) = \d+ calls=(\d+)", line)
        if mt and int(mt[1]) >= skipped:
            n = int(mt[1])
            v = value
            for k in range(skipped + 1, n + 1):
                v = v * k & (2**64 - 1)
            line = f"factorial({n}) = {v} calls={n - skipped}\n"
        out.append(line)
    return "".join(out).encode()


@pytest.mark.parametrize("touch_sp", [False, True])
def test_ipmodify_handler_skips_the_function(arch, touch_sp):
    """FTRACE_OPS_FL_IPMODIFY: a pre handler that sets ip and returns 1 is honoured — here
    factorial(12) returns 7 at once (body, counter and post handler skipped), which also
    changes factorial(20). A handler's sp change is ignored (ftrace_regs_caller restores
    sp from its own frame), on this path as on the other."""
    lab = load(arch)
    ret_at = final_ret(lab, "factorial")

    def pre(kp, regs):
        if touch_sp:
            regs.sp = regs.sp - 64
        if regs.arg(1) == 12:
            regs.return_value = 7
            regs.ip = ret_at
            return 1
        return 0

    p = lab.kprobe("factorial", pre=pre)
    lab.run()
    assert lab.result.exit_code == 0, lab.result
    assert lab.stdout == factorial_out(arch, 12, 7)
    pres = sum(e.handler == "pre" for e in p.events)
    posts = sum(e.handler == "post" for e in p.events)
    # hits: factorial(0), (1), 5 calls of (5), (12) skipped at once, (20)..(13) + (12) skipped
    assert pres == p.hits == 1 + 1 + 5 + 1 + 9 and posts == pres - 2


def test_nmissed_on_recursion_through_ftrace_probes(arch):
    """A breakpoint kprobe inside fib calls factorial(3) from its handler (a nested guest
    run): the three hits of factorial's ftrace-based kprobe meanwhile are missed (no
    handler), factorial still computes 6, and afterwards the ftrace probe works again."""
    lab = load(arch)
    m = lab.machine
    nested = []

    def pre(kp, regs):
        saved = {n: m.reg(n) for n in m.arch.regs}
        nested.append(lab.call("factorial", 3, timeout=0))
        nested.append((inner.hits, inner.nmissed, len(inner.events)))
        for n, v in saved.items():
            m.set_reg(n, v)
        return 0

    inner = lab.kprobe("factorial")
    outer = lab.kprobe(f"fib+{len(NOP[arch])}", pre=pre)
    assert inner.flags & KPROBE_FLAG_FTRACE and not outer.flags & KPROBE_FLAG_FTRACE
    lab.call("fib", 1, timeout=0)
    if lab.kprobes.kcb.current is not None:
        # arm64: the nested run's halt also stopped the outer run inside outer's slot
        # (test_kprobes_core.test_nested_run_resumes_outer); let it finish
        lab.machine.run()
    assert nested == [6, (0, 3, 0)] and outer.hits == 1
    assert m.return_value == 1 and lab.kprobes.kcb.current is None
    assert lab.call("factorial", 2) == 2 and (inner.hits, inner.nmissed) == (2, 3)


# --- the CLI -------------------------------------------------------------------------------------
def test_cli_ftrace_filter_output(arch, emu_cli, tmp_path):
    """`emu run --ftrace-filter GLOB[,GLOB]` writes `comm-pid [000] ..... sec.usec: func
    <-parent` lines (to --trace-out or stderr), and the guest prints exactly what it prints
    untraced."""
    path = str(firmware_elf(arch, "recurse.ftrace"))
    plain = emu_cli("run", path)
    assert plain.rc == 0 and plain.stdout == expected_out(arch)
    trace = tmp_path / "trace.txt"
    r = emu_cli("run", "--ftrace-filter", "is_*", "--trace-out", str(trace), path)
    assert (r.rc, r.stdout) == (0, plain.stdout)
    lines = trace.read_text().splitlines()
    assert len(trace_lines(trace.read_text())) == 96
    assert lines[0].startswith(" recurse.ftrace.-1000    [000] ..... ")
    assert lines[0].endswith(": is_even <-recurse_main")
    r = emu_cli("run", "--ftrace-filter", "fib,factorial", "--ftrace-filter", "sum_rec", path)
    assert (r.rc, r.stdout) == (0, plain.stdout)
    traced = [line for line in r.err.splitlines() if LINE.match(line)]
    funcs = collections.Counter(LINE.match(line)["func"] for line in traced)
    assert funcs == {"fib": 2155, "factorial": 39, "sum_rec": 101}
    r = emu_cli("run", "--ftrace-filter", "nosuch*", path)
    assert r.rc == 2 and "no ftrace site matches" in r.err and r.stdout == b""


def test_cli_kprobe_on_ftrace_site_stats(arch, emu_cli, tmp_path):
    stats = tmp_path / "s.json"
    r = emu_cli("run", "--kprobe", "sum_rec", "--stats", str(stats),
                str(firmware_elf(arch, "recurse.ftrace")))
    assert r.rc == 0 and r.stdout == expected_out(arch)
    import json
    (row,) = json.loads(stats.read_text())["probes"]
    assert (row["kind"], row["step"], row["hits"], row["nmissed"]) == ("ftrace", "ftrace", 101, 0)
