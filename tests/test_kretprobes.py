"""kretprobes (probes/kretprobes.py) on both arches, KUnit-like: register on a firmware
function, run the guest, check what the entry and return handlers saw and the counters.

Covered: return values and per-instance data on the recursive functions of
firmware/src/recurse.c (plain and ftrace builds, breakpoint / boosted / optimized entry
probes), maxactive exhaustion (nmissed), entry_handler refusing an instance, data_size
limits, registration refusals (not at the entry: -EINVAL before anything is written),
two kretprobes and a kretprobe + kprobe on one function, kretprobe_find_ret_addr with
instances pending, arm64 lr after the return, unregistering with pending instances, and
`emu run --kretprobe`."""
from __future__ import annotations

import errno
import json

import pytest

from conftest import FIRMWARE, firmware_elf
from probes.errors import KprobeError
from probes.kprobes import KPROBE_FLAG_FTRACE, Kprobe
from probes.kretprobes import KRETPROBE_DATA_MAX, Kretprobe, kretprobes_of
from probes.optprobes import enable_optprobes
from probes.testing import ASM_BASE, ProbeLab

U64 = (1 << 64) - 1


# --- the functions of recurse.c, mirrored ---------------------------------------------------
def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def factorial(n: int) -> int:
    return 1 if n <= 1 else n * factorial(n - 1) & U64


def is_even(n: int) -> int:
    return int(n % 2 == 0)


def ackermann(m: int, n: int) -> int:
    if m == 0:
        return n + 1
    return ackermann(m - 1, 1) if n == 0 else ackermann(m - 1, ackermann(m, n - 1))


MODEL = {  # function -> (number of arguments, result from the arguments)
    "fib": (1, fib),
    "factorial": (1, factorial),
    "is_even": (1, is_even),
    "is_odd": (1, lambda n: 1 - is_even(n)),
    "sum_rec": (1, lambda n: n * (n + 1) // 2),
    "ackermann": (2, ackermann),
}
# Who may call each function (the real return address must be in one of these).
CALLERS = {"fib": {"fib"}, "factorial": {"factorial"}, "is_even": {"is_odd"},
           "is_odd": {"is_even"}, "sum_rec": {"sum_rec"}, "ackermann": {"ackermann"}}
TOP = {"recurse_main", "main"}      # recurse_main may be inlined into main


def expected_out(arch: str, prog: str = "recurse") -> bytes:
    return (FIRMWARE / "expected" / arch / f"{prog}.out").read_bytes()


def calls_of(out: bytes, func: str) -> int:
    """Total calls of `func` from the program's own `calls=` counts. is_even/is_odd share
    one counter, so their lines are recomputed from the arguments."""
    if func in ("is_even", "is_odd"):
        total = 0
        for n in (0, 1, 7, 10, 25):       # is_even(n) and is_odd(n): n+1 calls, alternating
            for start_even in (True, False):
                seq = [(start_even + i) % 2 == 1 for i in range(n + 1)]
                total += sum(s == (func == "is_even") for s in seq)
        return total
    total = 0
    for line in out.decode().splitlines():
        if line.startswith(func + "("):
            total += int(line.rsplit("calls=", 1)[1])
    return total


def factorial_args() -> list[int]:
    """The argument of every factorial call the program makes (tops 0, 1, 5, 12, 20)."""
    return [n for top in (0, 1, 5, 12, 20) for n in ([top] if top <= 1 else range(top, 0, -1))]


def load(arch: str, prog: str = "recurse") -> ProbeLab:
    return ProbeLab.load(str(firmware_elf(arch, prog)))


def guest_patches(lab: ProbeLab) -> list:
    """text_pokes into guest text (not into the probe layer's own pages)."""
    return [pt for pt in lab.machine.patches if not lab.kprobes.arch.owns(pt.addr)]


def register(lab: ProbeLab, rp: Kretprobe) -> Kretprobe:
    kretprobes_of(lab.machine).register_kretprobe(rp)
    return rp


def recording_kretprobe(func: str, maxactive: int = 256, **kw) -> tuple[Kretprobe, list, list]:
    """A kretprobe whose entry handler saves the arguments in the instance's data and whose
    return handler records (args, return value, regs.ip, ri.ret_addr)."""
    nargs = MODEL[func][0]
    entries, returns = [], []

    def entry(ri, regs):
        args = [regs.arg(i + 1) for i in range(nargs)]
        entries.append(tuple(args))
        for i, a in enumerate(args):
            ri.data[8 * i:8 * i + 8] = a.to_bytes(8, "little")
        return 0

    def ret(ri, regs):
        args = tuple(int.from_bytes(ri.data[8 * i:8 * i + 8], "little") for i in range(nargs))
        returns.append((args, regs.return_value, regs.ip, ri.ret_addr))
        return 0

    rp = Kretprobe(kp=Kprobe(symbol_name=func), handler=ret, entry_handler=entry,
                   data_size=8 * nargs, maxactive=maxactive, **kw)
    return rp, entries, returns


def check_returns(lab: ProbeLab, func: str, returns: list) -> None:
    nargs, model = MODEL[func]
    syms = lab.machine.symbols
    for args, value, ip, ret_addr in returns:
        if func in ("is_even", "is_odd"):
            value &= 0xFFFFFFFF                     # int return: upper half is undefined
        assert value == model(*args), (func, args, value)
        assert ip == ret_addr                       # handlers see the real return address
        assert syms.find(ret_addr).name in CALLERS[func] | TOP


# --- return values and data -------------------------------------------------------------------
@pytest.mark.parametrize("prog", ["recurse", "recurse.ftrace"])
@pytest.mark.parametrize("func", list(MODEL))
def test_return_values_and_data_on_recursion(arch, prog, func):
    """Each return handler reads the arguments its own entry handler stored in the
    instance's private data (nested calls pending at once must not share it) and sees the
    function's result; every call is seen once, the program's output is unchanged. In the
    ftrace build the entry probe is served by the function's ftrace site."""
    lab = load(arch, prog)
    rp, entries, returns = recording_kretprobe(func)
    register(lab, rp)
    assert bool(rp.kp.flags & KPROBE_FLAG_FTRACE) == (prog == "recurse.ftrace")
    lab.run()
    out = expected_out(arch, prog)
    assert lab.stdout == out
    calls = calls_of(out, func)
    assert len(entries) == len(returns) == rp.hits == rp.kp.hits == calls
    assert (rp.nmissed, rp.kp.nmissed) == (0, 0)
    assert sorted(entries) == sorted(r[0] for r in returns)
    check_returns(lab, func, returns)
    krp = kretprobes_of(lab.machine)
    assert krp.instances == [] and krp.frame_warnings == 0
    assert len(rp.free_instances) == rp.maxactive


@pytest.mark.parametrize("entry_kind", ["boosted", "optimized"])
def test_return_values_with_fast_entry_probe(arch, entry_kind):
    """The entry kprobe has no post handler, so it may be boosted (x86) or jump-optimized:
    the return side must not notice ("rb"/"ro" of the kernel's table)."""
    lab = load(arch)
    if entry_kind == "optimized":
        opt = enable_optprobes(lab.kprobes)
    rp, entries, returns = recording_kretprobe("fib")
    register(lab, rp)
    if entry_kind == "optimized":
        assert opt.kick_kprobe_optimizer() == 1 and rp.kp.ainsn.optimized
    lab.run()
    assert lab.stdout == expected_out(arch)
    assert len(returns) == rp.hits == calls_of(lab.stdout, "fib") == 2155
    check_returns(lab, "fib", returns)
    if entry_kind == "boosted":
        assert rp.kp.ainsn.boosted == (arch == "x86_64")    # arm64 never boosts
    else:
        assert rp.kp.ainsn.optimized


def test_return_handler_changes_return_value(arch):
    """A return handler's change of the return register reaches the caller (its ip change
    does not: the trampoline always goes to the real return address)."""
    lab = load(arch)

    def entry(ri, regs):
        ri.data[0] = regs.arg(1)
        return 0

    def ret(ri, regs):
        if ri.data[0] == 5:
            regs.return_value = 99
            regs.ip = 0x1234
        return 0

    register(lab, Kretprobe(kp=Kprobe(symbol_name="factorial"), entry_handler=entry,
                            handler=ret, data_size=1, maxactive=32))
    lab.run()
    # factorial(12) and (20) go through n = 5 too: n!/5! * 99
    want = expected_out(arch)
    for n in (5, 12, 20):
        want = want.replace(f"factorial({n}) = {factorial(n)} ".encode(),
                            f"factorial({n}) = {factorial(n) // 120 * 99 & U64} ".encode())
    assert want != expected_out(arch) and lab.stdout == want


def test_maxactive_exhaustion_counts_nmissed(arch):
    """sum_rec(100) nests 101 calls; with 10 instances the 10 outermost calls get one, the
    91 inner calls count rp.nmissed and do not reach the entry handler."""
    lab = load(arch)
    rp, entries, returns = recording_kretprobe("sum_rec", maxactive=10)
    register(lab, rp)
    lab.run()
    assert lab.stdout == expected_out(arch)
    assert rp.nmissed == 91 and rp.kp.nmissed == 0 and rp.kp.hits == 101
    assert entries == [(n,) for n in range(100, 90, -1)]
    assert [r[0] for r in returns] == [(n,) for n in range(91, 101)]   # innermost first
    assert rp.hits == 10
    check_returns(lab, "sum_rec", returns)
    assert len(rp.free_instances) == 10


def test_entry_handler_nonzero_skips_instance(arch):
    """An entry handler returning non-zero gives the instance back: no hijack, no return
    handler, and no miss either."""
    lab = load(arch)
    seen = []

    def entry(ri, regs):
        return regs.arg(1) % 2                       # odd n: no return probe

    rp = Kretprobe(kp=Kprobe(symbol_name="factorial"), entry_handler=entry, maxactive=64,
                   handler=lambda ri, regs: seen.append(regs.return_value))
    register(lab, rp)
    lab.run()
    assert lab.stdout == expected_out(arch)
    evens = [n for n in factorial_args() if n % 2 == 0]
    assert rp.kp.hits == 39 and rp.hits == len(seen) == len(evens)
    assert sorted(seen) == sorted(factorial(n) for n in evens)
    assert rp.nmissed == 0 and len(rp.free_instances) == 64


def test_data_size_limit_e2big(arch):
    lab = load(arch)
    before = lab.text("fib", 4)
    with pytest.raises(KprobeError) as exc:
        register(lab, Kretprobe(kp=Kprobe(symbol_name="fib"), data_size=KRETPROBE_DATA_MAX + 1))
    assert exc.value.errno == errno.E2BIG
    assert lab.text("fib", 4) == before and not guest_patches(lab)
    rp = register(lab, Kretprobe(kp=Kprobe(symbol_name="fib"), data_size=KRETPROBE_DATA_MAX))
    assert all(len(ri.data) == KRETPROBE_DATA_MAX for ri in rp.free_instances)


NOT_ENTRY = {"arm64": [4, 8, 2], "x86_64": [1, 3, 2]}   # x86 fib+2 is mid-instruction


def test_not_at_function_entry_einval(arch):
    """kprobe_on_func_entry() comes first: any offset other than the entry is -EINVAL
    (even one that is not an instruction boundary), an unknown symbol -ENOENT; the
    text and rp.kp are left alone, and -EINVAL wins over a bad data_size."""
    lab = load(arch)
    for off in NOT_ENTRY[arch]:
        kp = Kprobe(symbol_name="fib", offset=off)
        with pytest.raises(KprobeError) as exc:
            register(lab, Kretprobe(kp=kp, data_size=KRETPROBE_DATA_MAX + 1))
        assert exc.value.errno == errno.EINVAL, off
        assert kp.pre_handler is None and kp.kretprobe is None
    assert not guest_patches(lab) and not lab.kprobes.table
    with pytest.raises(KprobeError) as exc:
        register(lab, Kretprobe(kp=Kprobe(symbol_name="no_such_function")))
    assert exc.value.errno == errno.ENOENT


@pytest.mark.parametrize("prog,bare", [("recurse", False), ("insns.bare", True)])
def test_program_entry_refused(arch, prog, bare):
    """The program entry is jumped to, never called: refused with -EINVAL, as the kernel's
    kretprobe_blacklist. (Hijacking the word at sp there overwrote argc on x86 Linux and
    read past the end of RAM on x86 bare metal, a Python error.)"""
    lab = ProbeLab.load(str(firmware_elf(arch, prog)), bare=bare)
    assert lab.machine.symbols.lookup("_start").addr == lab.machine.image.entry
    with pytest.raises(KprobeError) as exc:
        register(lab, Kretprobe(kp=Kprobe(symbol_name="_start")))
    assert exc.value.errno == errno.EINVAL and "entry point" in exc.value.reason
    assert not guest_patches(lab)
    lab.run()
    assert lab.result.exit_code == 0


# --- several probes on one function -------------------------------------------------------------
def test_two_kretprobes_on_one_function(arch):
    """Both return handlers run for every call, in LIFO order of their hijacks, and the
    function still returns to its real caller with the right value."""
    lab = load(arch)
    order = []

    def make(tag):
        return Kretprobe(kp=Kprobe(symbol_name="factorial"), maxactive=32,
                         entry_handler=lambda ri, regs: order.append(("entry", tag)) or 0,
                         handler=lambda ri, regs: order.append(("ret", tag, regs.return_value,
                                                                regs.ip)))
    a, b = register(lab, make("a")), register(lab, make("b"))
    lab.run()
    assert lab.stdout == expected_out(arch)
    assert a.hits == b.hits == 39 and a.nmissed == b.nmissed == 0
    entries = [o[1] for o in order if o[0] == "entry"]
    assert entries == ["b", "a"] * 39                    # aggregated: newest first
    rets = [o for o in order if o[0] == "ret"]
    assert [r[1] for r in rets] == ["a", "b"] * 39       # the last hijack returns first
    for first, second in zip(rets[::2], rets[1::2]):
        assert first[2:] == second[2:]
    assert sorted(r[2] for r in rets[::2]) == sorted(factorial(n) for n in factorial_args())
    assert kretprobes_of(lab.machine).frame_warnings == 0


def test_kretprobe_and_kprobe_on_one_function(arch):
    lab = load(arch)
    rp, _entries, returns = recording_kretprobe("fib")
    kp_events = []
    p = Kprobe(symbol_name="fib", pre_handler=lambda p, regs: kp_events.append(regs.ip) or 0,
               post_handler=lambda p, regs, flags: kp_events.append(regs.ip))
    lab.kprobes.register_kprobe(p)
    register(lab, rp)
    lab.run()
    assert lab.stdout == expected_out(arch)
    assert p.hits == rp.hits == 2155 and p.nmissed == rp.nmissed == 0
    entry = lab.addr_of("fib")
    pre_ip = entry + (1 if arch == "x86_64" else 0)
    assert kp_events[:2] == [pre_ip, entry + p.ainsn.length]
    check_returns(lab, "fib", returns)


# --- unwinding and the return path --------------------------------------------------------------
def test_find_ret_addr_while_pending(arch):
    """Inside the entry handler of the innermost sum_rec(0), 100 instances are pending:
    the stack holds the trampoline address 100 times and kretprobe_find_ret_addr turns
    them, innermost first, into 99 return sites in sum_rec and one in the caller."""
    lab = load(arch)
    krp = kretprobes_of(lab.machine)
    m = lab.machine
    seen = {}

    def entry(ri, regs):
        if regs.arg(1) != 0:
            return 0
        tramp = krp.trampoline
        found, cursor = [], 0
        while True:
            addr, nxt = krp.kretprobe_find_ret_addr(tramp, cursor)
            if nxt == cursor:
                assert addr == tramp                      # nothing left: unchanged
                break
            found.append(addr)
            cursor = nxt
        top = m.memory.read(m.sp, m.memory.find(m.sp).end - m.sp)
        words = [int.from_bytes(top[i:i + 8], "little") for i in range(0, len(top) - 7, 8)]
        seen.update(found=found, pending=krp.pending_ret_addrs(),
                    on_stack=words.count(tramp), lr=regs.get("x30"))
        return 0

    rp = register(lab, Kretprobe(kp=Kprobe(symbol_name="sum_rec"), entry_handler=entry,
                                 maxactive=200))
    lab.run()
    assert lab.stdout == expected_out(arch)
    found = seen["found"]
    assert len(found) == 100 and found == seen["pending"]
    names = [m.symbols.find(a).name for a in found]
    assert names[:99] == ["sum_rec"] * 99 and names[99] in TOP
    assert len(set(found[:99])) == 1                     # one call site inside sum_rec
    assert seen["on_stack"] == 100
    if arch == "arm64":
        assert seen["lr"] == found[0]                    # this call's own lr: not yet hijacked
    assert rp.hits == 101 and not krp.instances


LEAF = {"arm64": {"f": "add x0, x0, #1\nret",
                  "g": "stp x29, x30, [sp, #-16]!\nmov x29, sp\nbl {f}\nadd x0, x0, #10\n"
                       "ldp x29, x30, [sp], #16\nret"},
        "x86_64": {"f": "lea rax, [rdi + 1]\nret",
                   "g": "push rbp\nmov rbp, rsp\ncall {f}\nadd rax, 10\npop rbp\nret"}}


def leaf_lab(arch: str) -> ProbeLab:
    """f comes first, at ASM_BASE, so g can call it by address."""
    src = {"f": LEAF[arch]["f"], "g": LEAF[arch]["g"].replace("{f}", hex(ASM_BASE))}
    lab = ProbeLab.from_asm(arch, src)
    assert lab.addr_of("f") == ASM_BASE
    return lab


def test_registers_after_return_match_unprobed(arch):
    """After the return through the trampoline every register is as without the probes;
    on arm64 in particular lr holds the real return address, not the trampoline."""
    plain = leaf_lab(arch)
    assert plain.call("g", 5) == 16
    want = {n: plain.machine.reg(n) for n in plain.machine.arch.regs}
    lab = leaf_lab(arch)
    krp = kretprobes_of(lab.machine)
    values = []
    for func in ("f", "g"):
        register(lab, Kretprobe(kp=Kprobe(symbol_name=func),
                                handler=lambda ri, regs: values.append(regs.return_value)))
    assert lab.call("g", 5) == 16 and values == [6, 16]
    got = {n: lab.machine.reg(n) for n in lab.machine.arch.regs}
    assert got == want
    if arch == "arm64":
        assert got["x30"] == lab.halt_addr != krp.trampoline
    assert not krp.instances


def test_unregister_with_pending_instances(arch):
    """Unregistering while 51 calls of sum_rec are still pending: their returns still go
    through the trampoline back to the right callers, but no handler of the gone
    kretprobe runs; the text is restored and the guest output is unchanged."""
    lab = load(arch)
    krp = kretprobes_of(lab.machine)
    handled = []
    rp = register(lab, Kretprobe(kp=Kprobe(symbol_name="sum_rec"), maxactive=200,
                                 handler=lambda ri, regs: handled.append(regs.return_value)))
    pending = {}

    def pre(p, regs):
        if regs.arg(1) == 50 and rp in krp.registered:
            krp.unregister_kretprobe(rp)
            pending["n"] = len(krp.instances)
        return 0

    second = {"arm64": 4, "x86_64": 1}[arch]           # sum_rec's second instruction
    lab.kprobes.register_kprobe(Kprobe(symbol_name="sum_rec", offset=second, pre_handler=pre))
    lab.run()
    assert lab.stdout == expected_out(arch) and lab.result.exit_code == 0
    assert pending == {"n": 51} and handled == []
    assert not krp.instances and krp.frame_warnings == 0
    assert lab.text("sum_rec", 1) == lab.original("sum_rec", 1)


def test_reregister_with_pending_instances(arch):
    """Unregistered and registered again while 51 calls are pending: those 51 returns run
    no handler (they belong to the old registration, as the kernel's freed rethook) and do
    not swell the new pool; the 50 calls made after it are handled."""
    lab = load(arch)
    krp = kretprobes_of(lab.machine)
    handled = []
    rp = register(lab, Kretprobe(kp=Kprobe(symbol_name="sum_rec"), maxactive=200,
                                 handler=lambda ri, regs: handled.append(regs.return_value)))
    done = []

    def pre(p, regs):
        if regs.arg(1) == 50 and not done:
            krp.unregister_kretprobe(rp)
            rp.kp = Kprobe(symbol_name="sum_rec")
            register(lab, rp)
            done.append(len(krp.instances))
        return 0

    second = {"arm64": 4, "x86_64": 1}[arch]
    lab.kprobes.register_kprobe(Kprobe(symbol_name="sum_rec", offset=second, pre_handler=pre))
    lab.run()
    assert lab.stdout == expected_out(arch) and done == [51]
    assert handled == [n * (n + 1) // 2 for n in range(50)]
    assert rp.hits == 50 and len(rp.free_instances) == rp.maxactive == 200
    assert not krp.instances and krp.frame_warnings == 0


# --- the CLI ------------------------------------------------------------------------------
def test_emu_run_kretprobe_stats(arch, emu_cli, tmp_path):
    stats = tmp_path / "stats.json"
    r = emu_cli("run", "--kretprobe", "factorial", "--stats", str(stats),
                str(firmware_elf(arch, "recurse")))
    assert r.rc == 0, r.err
    assert r.stdout == expected_out(arch)
    (row,) = json.loads(stats.read_text())["probes"]
    # default maxactive 10: factorial(20) misses 10 levels, factorial(12) two
    assert (row["symbol"], row["offset"], row["kind"]) == ("factorial", 0, "kretprobe")
    assert (row["hits"], row["returns"], row["nmissed"]) == (39, 27, 12)
    assert "factorial+0x0" in r.err and "kretprobe" in r.err
