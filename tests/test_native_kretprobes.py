"""Kretprobes on the C hit path (probes/native/rethook.py, issue 14) against the Python
one: the same entries, returns, misses, dropped frames, free pools, guest output, cycles
and cycle breakdown on both arches, with C really taking the entries and returns (its
`handled` counter, the Python entry never running) and the Python path really off. And
the C twin of uaccess's check (kn_access_ok) refuses exactly what emu/uaccess refuses."""
from __future__ import annotations

import ctypes
import io
import os

import pytest

from conftest import firmware_elf, needs_native, tiny_elf
from emu.loader import GuestConfig, load_guest
from emu.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from emu.uaccess import access_ok
from probes.kprobes import Kprobe
from probes.kretprobes import Kretprobe, Kretprobes, kretprobes_of
from probes.native import KnUaccess
from probes.native.rethook import KnRethook
from probes.testing import ProbeLab


RECURSE = ("fib", "factorial", "ackermann", "is_even", "is_odd", "sum_rec")


def _counting_python_entries(monkeypatch) -> list[int]:
    """Counts the kretprobe entries Python handles (the C path must leave it idle)."""
    calls: list[int] = []
    real = Kretprobes._entry

    def entry(self, rp, regs):
        calls.append(1)
        return real(self, rp, regs)
    monkeypatch.setattr(Kretprobes, "_entry", entry)
    return calls


def _recurse(arch: str, native: bool, monkeypatch, maxactive: int = 0,
             handled: tuple[str, ...] = (), funcs: tuple[str, ...] = RECURSE,
             entry_handled: bool = False) -> dict:
    """Kretprobes on the recursive functions of recurse.c; those in `handled` get a return
    handler that records what it sees (and with `entry_handled` an entry handler too)."""
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    lab = ProbeLab.load(str(firmware_elf(arch, "recurse")))
    lab.machine.enable_cycle_model()
    krp = kretprobes_of(lab.machine)
    seen: list[tuple] = []
    rps = {}
    for f in funcs:
        def handler(ri, regs, f=f):
            seen.append((f, regs.return_value, ri.ret_addr, regs.sp))
            return 0
        def entry(ri, regs, f=f):
            seen.append((f, "entry", regs.arg(1)))
            return 0
        rps[f] = Kretprobe(kp=Kprobe(symbol_name=f), maxactive=maxactive,
                           handler=handler if f in handled else None,
                           entry_handler=entry if f in handled and entry_handled else None)
        krp.register_kretprobe(rps[f])
    res = lab.run(timeout=120)
    out = {"exit": res.exit_code, "stdout": lab.stdout, "cycles": lab.machine.clock.cycles,
           "breakdown": lab.machine.clock.breakdown(), "seen": seen,
           "rps": {f: (rp.kp.hits, rp.hits, rp.nmissed, rp.ndropped, len(rp.free_instances))
                   for f, rp in rps.items()},
           "pending": len(krp.instances), "warnings": krp.frame_warnings}
    assert (krp.native is not None) == native
    if native:
        out["c_handled"] = krp.native.h.handled
    return out


def _compare(arch, monkeypatch, **kw) -> dict:
    calls = _counting_python_entries(monkeypatch)
    native = _recurse(arch, True, monkeypatch, **kw)
    c_entries = len(calls)
    python = _recurse(arch, False, monkeypatch, **kw)
    c_handled = native.pop("c_handled")
    assert native == python
    native["c_handled"], native["python_entries_on_c_path"] = c_handled, c_entries
    return native


@needs_native
def test_counting_kretprobe_in_c_cheap(monkeypatch):
    """One arch, one function: C takes every entry and return, results as Python's."""
    r = _compare("x86_64", monkeypatch, funcs=("factorial",))
    entries, returns, nmissed, dropped, free = r["rps"]["factorial"]
    assert entries == 39 and returns + nmissed == entries and dropped == 0 and free == 10
    assert r["python_entries_on_c_path"] == 0 and r["c_handled"] == entries + returns


@needs_native
@pytest.mark.parametrize("maxactive", [0, 3], ids=["pool10", "pool3"])
def test_native_kretprobes_give_the_python_results(arch, maxactive, monkeypatch):
    r = _compare(arch, monkeypatch, maxactive=maxactive)
    entries = sum(e for e, _r, _m, _d, _f in r["rps"].values())
    returns = sum(n for _e, n, _m, _d, _f in r["rps"].values())
    missed = sum(m for _e, _n, m, _d, _f in r["rps"].values())
    assert r["exit"] == 0 and entries == 2435 and returns + missed == entries
    assert missed > (1000 if maxactive == 0 else 2000)           # the pool really ran dry
    assert r["python_entries_on_c_path"] == 0 and r["c_handled"] == entries + returns
    assert r["pending"] == 0 and r["warnings"] == 0


@needs_native
def test_handler_and_counting_kretprobes_share_the_lifo(arch, monkeypatch):
    """is_even and is_odd call each other: is_odd's instances (a Python entry and return
    handler) sit between is_even's (counted in C) on one LIFO; the handlers see what they
    see on the Python path, and C still takes is_even's entries."""
    r = _compare(arch, monkeypatch, funcs=("is_even", "is_odd", "fib"), handled=("is_odd",),
                 entry_handled=True)
    returns = [s for s in r["seen"] if s[1] != "entry"]
    assert len(returns) == r["rps"]["is_odd"][1] > 10
    assert r["python_entries_on_c_path"] == r["rps"]["is_odd"][0]     # only is_odd's
    assert r["c_handled"] > r["rps"]["fib"][0]


@needs_native
def test_return_handlers_called_from_c(arch, monkeypatch):
    """A return handler only: C takes every entry and return and calls the handler once
    per returning instance (with the pt_regs view of the Python path: return value,
    ri.ret_addr, sp), between instances C only counts."""
    r = _compare(arch, monkeypatch, funcs=("is_even", "is_odd", "fib"), handled=("is_odd", "fib"))
    assert len(r["seen"]) == r["rps"]["is_odd"][1] + r["rps"]["fib"][1] > 100
    entries = sum(e for e, _r, _m, _d, _f in r["rps"].values())
    returns = sum(n for _e, n, _m, _d, _f in r["rps"].values())
    assert r["python_entries_on_c_path"] == 0 and r["c_handled"] == entries + returns


NOSTACK, RO_STACK = 0x10000, 0x400800      # unmapped; the R-X headers page of the text


def _hostile(arch: str, sp: int, native: bool, monkeypatch) -> tuple:
    """A kretprobe entered with sp on a page the guest cannot write: the hijack is refused
    (nmissed) and the guest meets its own fault, on either path."""
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    if arch == "x86_64":
        funcs = [("_start", f"mov rsp, {sp:#x}; mov rax, {{sym:other}}; jmp {{sym:victim}}"),
                 ("victim", "push rbp; mov rbp, rsp; pop rbp; ret"),
                 ("other", "mov edi, 3; mov eax, 231; syscall")]
    else:
        funcs = [("_start", f"mov x9, #{sp & ~0xfff:#x}; add x9, x9, #{sp & 0xfff:#x}; "
                            "mov sp, x9; bl {sym:victim}"),
                 ("victim", "mov x1, #1; str x0, [sp, #-16]!; ret")]
    g = load_guest(GuestConfig(path=_elf(arch, funcs)), io.BytesIO(), io.BytesIO(), io.BytesIO())
    krp = kretprobes_of(g.machine)
    rp = Kretprobe(kp=Kprobe(symbol_name="victim"))
    krp.register_kretprobe(rp)
    res = g.machine.run(timeout=10)
    handled = krp.native.h.handled if krp.native is not None else None
    return (res.exit_code, res.message, rp.kp.hits, rp.hits, rp.nmissed,
            len(rp.free_instances), g.machine.clock.cycles), handled


_ELVES: dict[str, str] = {}


def _elf(arch: str, funcs: list) -> str:
    import tempfile
    key = repr((arch, funcs))
    if key not in _ELVES:
        fd, path = tempfile.mkstemp(suffix=".elf")
        os.write(fd, tiny_elf(arch, funcs))
        os.close(fd)
        _ELVES[key] = path
    return _ELVES[key]


@needs_native
@pytest.mark.parametrize("sp", [NOSTACK, RO_STACK], ids=["unmapped", "read-only"])
def test_hostile_sp_refused_the_same_way(arch, sp, monkeypatch):
    calls = _counting_python_entries(monkeypatch)
    native, handled = _hostile(arch, sp, True, monkeypatch)
    in_python = len(calls)
    python, _ = _hostile(arch, sp, False, monkeypatch)
    assert native == python and native[0] == 139
    assert native[2] == 1                          # the entry probe was hit once
    assert in_python == 0 and handled >= 1        # C decided, not Python
    if arch == "x86_64":                           # the slot at sp: refused, nothing written
        assert native[3:6] == (0, 1, 10)


@needs_native
@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_c_access_check_matches_uaccess(arch, monkeypatch):
    """kn_access_ok, address by address around every region edge, TASK_SIZE and the top of
    the address space, against emu/uaccess.access_ok (for reads and writes)."""
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1")
    g = load_guest(GuestConfig(path=_elf(arch, [("_start", "nop")])), io.BytesIO(), io.BytesIO(), io.BytesIO())
    m = g.machine
    krp = kretprobes_of(m)
    assert krp.native is not None
    lib = krp.native.d.lib
    ua = KnUaccess.from_address(ctypes.addressof(krp.native.h) + KnRethook.task_size.offset)
    ua.task_size = min(m.memory.task_size, 2**64 - 1)     # as a push sets it
    m.memory.map(0x7000_0000, 0x1000, PROT_READ | PROT_WRITE | PROT_EXEC, "rwx")
    m.memory.map(0x7000_2000, 0x1000, PROT_READ, "ro")
    m.memory.map(0x7000_3000, 0x1000, PROT_READ | PROT_WRITE, "rw")
    fn = lib.kn_access_ok
    fn.argtypes = [ctypes.POINTER(KnUaccess), ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                   ctypes.c_uint32]
    fn.restype = ctypes.c_int
    edges = {m.memory.task_size - 8, m.memory.task_size - 4, 2**64 - 8, 2**64 - 4, 0}
    for r in m.memory.regions:
        edges.update({r.start - 8, r.start - 4, r.start, r.end - 8, r.end - 4, r.end})
    checked = 0
    for addr in sorted(a for a in edges if 0 <= a < 2**64):
        for prot, uc_prot in ((PROT_READ, 1), (PROT_WRITE, 2)):
            want = access_ok(m.memory, addr, 8, prot)
            got = fn(ctypes.byref(ua), m.uc._uch, addr, 8, uc_prot)
            region = m.memory.find(addr)
            if got == -1:                          # a write to an executable page: Python's
                assert prot == PROT_WRITE and want and region and region.prot & PROT_EXEC
            else:
                assert bool(got) == want, (hex(addr), prot)
            checked += 1
    assert checked > 40


def _longjmp(path: str, native: bool, monkeypatch) -> tuple:
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    out = io.BytesIO()
    g = load_guest(GuestConfig(path=path), io.BytesIO(), out, io.BytesIO())
    krp = kretprobes_of(g.machine)
    rps = {f: Kretprobe(kp=Kprobe(symbol_name=f)) for f in ("f", "g", "deep")}
    for rp in rps.values():
        krp.register_kretprobe(rp)
    res = g.machine.run(timeout=60)
    state = {f: (rp.kp.hits, rp.hits, rp.ndropped, rp.nmissed, len(rp.free_instances))
             for f, rp in rps.items()}
    handled = krp.native.h.handled if krp.native is not None else 0
    return (res.exit_code, out.getvalue(), g.machine.clock.cycles, state, krp.ndropped,
            len(krp.instances), krp.frame_warnings), handled


@pytest.mark.slow
@needs_native
@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_longjmp_frames_dropped_in_c_as_in_python(arch, tmp_path_factory, monkeypatch):
    """longjmp out of probed frames (tests/data/probes_robust/longjmp_kret.c): C drops the
    stale instances by sp at the next entry or return, as Python does."""
    from test_probes_robust_longjmp import ENTRIES, RETURNS, build
    path = str(build(tmp_path_factory, arch, "glibc"))
    calls = _counting_python_entries(monkeypatch)
    native, handled = _longjmp(path, True, monkeypatch)
    in_python = len(calls)
    python, _ = _longjmp(path, False, monkeypatch)
    assert native == python
    state = native[3]
    for f in ENTRIES:
        assert state[f][:3] == (ENTRIES[f], RETURNS[f], ENTRIES[f] - RETURNS[f])
    assert in_python == 0 and handled == sum(ENTRIES.values()) + sum(RETURNS.values())
