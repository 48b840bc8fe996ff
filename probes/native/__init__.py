"""The kprobe hit path in C (kprobe_native.c, issue 14): built with the system cc into the
per-user cache at first use (as emu/cycles/native.py builds the block counter), loaded with
ctypes. The machine's Python INTR hook keeps its Unicorn handle; its callback is swapped
for the C dispatcher, which calls the Python one for every trap it does not own. So a
snapshot's hook bookkeeping is unchanged, and a machine without probes pays one C call per
trap. `KPROBE_EMU_NATIVE=0` (or no C compiler) keeps the whole hit path in Python, with the
same results."""
from __future__ import annotations

import ctypes
import os
from enum import IntEnum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from emu.clock import DETOUR, FP_MAX, FP_SHIFT, HANDLER, STEP, TRAP, Clock, Reason
from emu.native_lib import cached_library
from emu.ucfast import CODE_CB, INTR_CB, lib_symbol
from unicorn import unicorn_const as UC

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.kprobes import Kprobe

SOURCE = Path(__file__).with_name("kprobe_native.c")
KN_BOOSTED, KN_PY_SS, KN_PRE, KN_RET = 1, 2, 4, 8
PRE_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32)
ROW = 11                       # uint64 per row of kn_set_table


class Sim(IntEnum):
    """arm64 simulations C runs (enum SIM_* of kprobe_native.c); `aux` packs the register
    (bits 0-7), the condition (8-11), the tested bit (16-21) and the AUX_* flags."""
    NONE = 0
    B = 1
    BL = 2
    BCOND = 3
    CBZ = 4
    TBZ = 5
    ADR = 6
    BR = 7


AUX_X64, AUX_NZ, AUX_LINK = 1 << 24, 1 << 25, 1 << 26
NativeSim = tuple[Sim, int, int]        # (kind, imm: target or value, aux)
HOOK_CALLBACK_OFFSET = 40      # struct hook (unicorn 2.1 uc_priv.h): 5 ints, bool, begin, end, callback


class KnState(ctypes.Structure):
    """struct kn_state of kprobe_native.c, field for field."""
    current: int
    rh: Any
    detour_cycles: int
    handler_cycles: int
    trap_fp: int
    step_fp: int
    trap_cycles: int
    step_cycles: int
    fp: Any
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("fp", ctypes.c_void_p), ("trap_fp", ctypes.c_uint64), ("step_fp", ctypes.c_uint64),
        ("trap_cycles", ctypes.c_uint64), ("step_cycles", ctypes.c_uint64),
        ("reg_read", ctypes.c_void_p), ("reg_write", ctypes.c_void_p),
        ("fallback", ctypes.c_void_p), ("fallback_data", ctypes.c_void_p),
        ("pc_reg", ctypes.c_int32), ("pc_adjust", ctypes.c_int32), ("brk_intno", ctypes.c_uint32),
        ("current", ctypes.c_int32), ("mask", ctypes.c_uint32), ("nprobes", ctypes.c_uint32),
        ("table", ctypes.c_void_p), ("probes", ctypes.c_void_p),
        ("handled", ctypes.c_uint64), ("deferred", ctypes.c_uint64), ("stopping", ctypes.c_void_p),
        ("xregs", ctypes.c_int32 * 32), ("nzcv_reg", ctypes.c_int32),
        ("detour_fp", ctypes.c_uint64), ("detour_cycles", ctypes.c_uint64),
        ("pre", PRE_CB), ("handler_fp", ctypes.c_uint64), ("handler_cycles", ctypes.c_uint64),
        ("py_busy", ctypes.c_uint32), ("pad2", ctypes.c_uint32), ("rh", ctypes.c_void_p),
        ("py", ctypes.c_void_p), ("py_pre", ctypes.c_void_p), ("ua", ctypes.c_void_p),
        ("trace_buf", ctypes.c_void_p), ("trace_len", ctypes.c_uint64),
        ("trace_cap", ctypes.c_uint64), ("traced", ctypes.c_uint64),
        ("ua_sp_reg", ctypes.c_int32), ("pad3", ctypes.c_int32), ("ts", ctypes.c_void_p),
        ("py_fpre", ctypes.c_void_p), ("hit_sp", ctypes.c_uint64), ("py_fops", ctypes.c_void_p)]


class KnUaccess(ctypes.Structure):
    """struct kn_uaccess: what kn_access_ok, the C twin of emu/uaccess's check, reads."""
    task_size: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("task_size", ctypes.c_uint64), ("mem_regions", ctypes.c_void_p),
        ("uc_free", ctypes.c_void_p), ("mem_read", ctypes.c_void_p), ("mem_write", ctypes.c_void_p)]


UACCESS_SYMBOLS = ("uc_mem_regions", "uc_free", "uc_mem_read", "uc_mem_write")


class KnPyapi(ctypes.Structure):
    """struct kn_pyapi: CPython's functions C calls a Python entry with."""
    _fields_: ClassVar[list[tuple[str, Any]]] = [(n, ctypes.c_void_p) for n in (
        "PyGILState_Ensure", "PyGILState_Release", "PyObject_CallOneArg",
        "PyLong_FromUnsignedLong", "PyLong_AsLong", "Py_DecRef", "PyErr_WriteUnraisable")]


def _pyapi() -> KnPyapi | None:
    try:
        return KnPyapi(*(ctypes.cast(getattr(ctypes.pythonapi, n), ctypes.c_void_p).value
                         for n, _t in KnPyapi._fields_))
    except AttributeError:                 # not CPython, or an older one: ctypes callbacks
        return None


PYAPI = _pyapi()


class KnProbe(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        (n, ctypes.c_uint64) for n in ("addr", "slot", "resume", "ss_trap", "hits", "nmissed")] + [
        ("flags", ctypes.c_uint32), ("sim", ctypes.c_uint32), ("imm", ctypes.c_uint64),
        ("aux", ctypes.c_uint64), ("rp", ctypes.c_int64), ("tprog", ctypes.c_void_p),
        ("tev", ctypes.c_void_p)]


class KnTstate(ctypes.Structure):
    """struct kn_tstate: what every record C commits shares (the task, the CPU, the clock's
    rate) and whether Python has checked it since it last ran (`valid`)."""
    valid: int
    pid: int
    cpu: int
    freq_hz: int
    committed: int
    revalidations: int
    cm_cur: Any
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("valid", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("pid", ctypes.c_int32),
        ("cpu", ctypes.c_int32), ("freq_hz", ctypes.c_uint64), ("committed", ctypes.c_uint64),
        ("revalidations", ctypes.c_uint64), ("revalidate", ctypes.c_void_p),
        ("cm_cur", ctypes.c_void_p)]


class KnTevent(ctypes.Structure):
    """struct kn_tevent: one kprobe event's probe, as C commits its records."""
    ok: int
    type: int
    flags: int
    tracing_on: int
    nhit: int
    rbs: Any
    nrbs: int
    filter: Any
    pend_entry: int
    pend_addr: int
    pend_size: int
    pend_fp: int
    pend_valid: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("ok", ctypes.c_uint32), ("type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("tracing_on", ctypes.c_uint32), ("nhit", ctypes.c_uint64), ("rbs", ctypes.c_void_p),
        ("nrbs", ctypes.c_uint64), ("filter", ctypes.c_void_p)] + [
        (n, ctypes.c_uint64) for n in ("pend_entry", "pend_addr", "pend_size", "pend_fp")] + [
        ("pend_valid", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class KnDetour(ctypes.Structure):
    """struct kn_detour: one optprobe detour's host entry."""
    hits: int
    nmissed: int
    native: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("s", ctypes.c_void_p), ("orig", ctypes.c_void_p), ("orig_data", ctypes.c_void_p),
        ("hits", ctypes.c_uint64), ("nmissed", ctypes.c_uint64),
        ("native", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class KnFsite(ctypes.Structure):
    """struct kn_fsite: one ftrace site served by a trampoline host entry."""
    key: int
    hits: int
    nmissed: int
    used: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("key", ctypes.c_uint64), ("hits", ctypes.c_uint64), ("nmissed", ctypes.c_uint64),
        ("native", ctypes.c_uint32), ("used", ctypes.c_uint32), ("idx", ctypes.c_uint64)]


class KnFtrace(ctypes.Structure):
    """struct kn_ftrace: the C side of one ftrace trampoline host entry."""
    mask: int
    sites: Any
    handled: int
    deferred: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("s", ctypes.c_void_p), ("orig", ctypes.c_void_p), ("orig_data", ctypes.c_void_p),
        ("sp_reg", ctypes.c_int32), ("mask", ctypes.c_uint32),
        ("back", ctypes.c_uint64), ("sites", ctypes.c_void_p),
        ("handled", ctypes.c_uint64), ("deferred", ctypes.c_uint64)]


# (host entry hook, key, back, probe, how C serves it: FS_*, the FS_PRE entry's row)
FtraceRow = tuple[int, int, int, "Kprobe", int, int]
FS_PYTHON, FS_COUNT, FS_PRE, FS_OPS = 0, 1, 2, 3


class NativeAcc(ctypes.Structure):
    """The clock's counter where C can reach it (duck-types emu.clock.Accumulator)."""
    fp: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [("fp", ctypes.c_uint64)]


def enabled() -> bool:
    return os.environ.get("KPROBE_EMU_NATIVE", "1") != "0"


def _declare(lib: ctypes.CDLL) -> None:
    lib.kn_set_table.argtypes = [ctypes.POINTER(KnState), ctypes.POINTER(ctypes.c_uint64),
                                 ctypes.c_uint32]
    lib.kn_set_table.restype = ctypes.c_int
    lib.kn_free.argtypes = [ctypes.POINTER(KnState)]
    lib.kn_free.restype = None
    lib.kn_ftrace_table.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.kn_ftrace_table.restype = ctypes.c_void_p
    lib.kn_ftrace_add.argtypes = [ctypes.POINTER(KnFtrace), ctypes.c_uint64, ctypes.c_uint32,
                                  ctypes.c_uint64]
    lib.kn_ftrace_add.restype = None
    lib.kn_free_ptr.argtypes = [ctypes.c_void_p]
    lib.kn_free_ptr.restype = None


# kprobe_native.c, built first if needed; None when disabled or not buildable
load = cached_library(SOURCE, "kprobe-native", _declare, enabled)


class NativeClock(Clock):
    """The machine's Clock once native probes are on: its counter lives in C-reachable
    memory wherever it is moved to (the cycle model and snapshots replace `acc`), TRAP and
    STEP costs are mirrored into C, and the cycles C charged are folded into `by_reason`
    whenever it is read."""

    native: "NativeDispatch"

    @property
    def acc(self) -> Any:
        return self.__dict__["_acc"]

    @acc.setter
    def acc(self, value: Any) -> None:
        if not isinstance(value, ctypes.Structure):
            value = NativeAcc(value.fp)
        self.__dict__["_acc"] = value
        self.native.st.fp = ctypes.addressof(value) + type(value).fp.offset

    @property
    def by_reason(self) -> dict[str, int]:
        by: dict[str, int] = self.__dict__["_by_reason"]
        st = self.native.st
        if st.trap_cycles or st.step_cycles or st.detour_cycles or st.handler_cycles:
            for reason, n in ((TRAP, st.trap_cycles), (STEP, st.step_cycles),
                              (DETOUR, st.detour_cycles), (HANDLER, st.handler_cycles)):
                if n:
                    by[reason] = by.get(reason, 0) + n
            st.trap_cycles = st.step_cycles = st.detour_cycles = st.handler_cycles = 0
        return by

    @by_reason.setter
    def by_reason(self, value: dict[str, int]) -> None:
        st = self.native.st
        # a restore: what C charged goes with the old dict
        st.trap_cycles = st.step_cycles = st.detour_cycles = st.handler_cycles = 0
        self.__dict__["_by_reason"] = value

    # The hit path's charges, as Clock's, without the folding getters (C's share is added
    # whenever `by_reason` is read; sums commute).
    def charge(self, reason: Reason, times: int = 1) -> None:
        d = self.__dict__
        n = self.costs[reason] * times
        acc = d["_acc"]
        fp = acc.fp + (n << FP_SHIFT)
        acc.fp = fp if fp < FP_MAX else FP_MAX
        by = d["_by_reason"]
        by[reason] = by.get(reason, 0) + n

    def charge2(self, reason1: Reason, reason2: Reason) -> None:
        d, costs = self.__dict__, self.costs
        n1, n2 = costs[reason1], costs[reason2]
        acc = d["_acc"]
        fp = acc.fp + ((n1 + n2) << FP_SHIFT)
        acc.fp = fp if fp < FP_MAX else FP_MAX
        by = d["_by_reason"]
        by[reason1] = by.get(reason1, 0) + n1
        by[reason2] = by.get(reason2, 0) + n2

    def set_costs(self, costs: Any, trap_parts: Any = None) -> None:
        super().set_costs(costs, trap_parts)
        native = self.__dict__.get("native")
        if native is not None:
            native.mirror_costs()


@dataclass(eq=False)
class NativeDispatch:
    """The C dispatcher of one machine (kept for the machine's life: the swapped hook
    points at `st`). `probes[i]` is the Kprobe of row i of the C table."""
    m: "Machine"
    lib: ctypes.CDLL
    st: KnState = field(default_factory=KnState)
    probes: list["Kprobe"] = field(default_factory=list)
    # optprobe detours: hook handle -> (its record, the probe); records of deleted hooks
    # stay alive (`gone`) as Unicorn frees a hook only later.
    detours: dict[int, tuple[KnDetour, "Kprobe"]] = field(default_factory=dict)
    gone: list[KnDetour] = field(default_factory=list)
    # ftrace trampoline host entries: hook handle -> (its record, key -> probe)
    ftrace: dict[int, tuple[KnFtrace, dict[int, "Kprobe"]]] = field(default_factory=dict)
    _pre: Any = None                     # the ctypes callback C calls (kept alive here)
    _pre_obj: Any = None                 # the callable C calls through the C API (alive)
    _fpre_obj: Any = None                # the ftrace sites' pre entry (alive)
    _fops_obj: Any = None                # the ftrace sites' ops entry (alive)
    ua: KnUaccess = field(default_factory=KnUaccess)
    stopping: ctypes.c_uint32 = field(default_factory=ctypes.c_uint32)
    run_returned: Any = None
    flush_later: list[tuple[int, int]] = field(default_factory=list)  # see swap_code_hook
    tstate: KnTstate | None = None       # trace events C commits (trace_state)
    revalidators: list[Callable[[KnTstate], None]] = field(default_factory=list)
    _revalidate_obj: Any = None          # the entry C calls (kept alive here)

    def mirror_costs(self) -> None:
        costs, st = self.m.clock.costs, self.st
        st.trap_fp, st.step_fp = costs[Reason.TRAP] << 8, costs[Reason.STEP] << 8
        st.detour_fp, st.handler_fp = costs[Reason.DETOUR] << 8, costs[Reason.HANDLER] << 8

    def set_pre_entry(self, fn: Callable[[int], int], guarded: bool = False) -> None:
        """`fn(row)` runs the Python pre handler of a KN_PRE row; 1 if it set pc itself.
        Its exceptions stop the run and are raised after it, as every hook's are
        (`guarded`: fn does that itself, saving a frame on the hot path)."""
        self._pre = PRE_CB(fn if guarded else self.m.hooks._guard(fn, default=1))
        self.st.pre = self._pre
        if guarded and PYAPI is not None:       # C calls fn through the C API
            self._pre_obj = fn
            self.st.py, self.st.py_pre = ctypes.addressof(PYAPI), id(fn)
        else:
            self.st.py = self.st.py_pre = None

    def serve_detours(self, rows: list[tuple[int, "Kprobe", bool]]) -> None:
        """Optprobe detours: (host entry hook handle, probe, counted in C?). The first time
        a handle is seen its Python callback is swapped for C's, which calls it back for
        probes that are not counted in C."""
        self.fold_detours()
        live = {h for h, _p, _n in rows}
        for h in [h for h in self.detours if h not in live]:
            self.gone.append(self.detours.pop(h)[0])
        for handle, p, native in rows:
            entry = self.detours.get(handle)
            if entry is None:
                rec = self._swap_detour_hook(handle)
                if rec is None:
                    continue
                entry = self.detours[handle] = (rec, p)
            entry[0].native = int(native)
            self.detours[handle] = (entry[0], p)

    def _swap_detour_hook(self, handle: int) -> KnDetour | None:
        rec = KnDetour(s=ctypes.addressof(self.st))
        if not swap_code_hook(self.m, handle, self.lib.kn_detour_hook, rec):
            return None
        return rec

    def set_fpre_entry(self, fn: Callable[[int], int]) -> bool:
        """`fn(row)` runs the Python pre handler of an FS_PRE ftrace site (C charged the
        detour and the handler); False if C cannot call Python (those sites stay Python's)."""
        if PYAPI is None or not self.st.py:
            return False
        self._fpre_obj = fn
        self.st.py_fpre = id(fn)
        return True

    def set_fops_entry(self, fn: Callable[[int], int]) -> bool:
        """`fn(row)` runs the ops of an FS_OPS ftrace site (C charged the detour); False if
        C cannot call Python."""
        if PYAPI is None or not self.st.py:
            return False
        self._fops_obj = fn
        self.st.py_fops = id(fn)
        return True

    def serve_ftrace(self, rows: list[FtraceRow]) -> None:
        """Ftrace trampoline host entries: each row a site C may serve (FS_COUNT: its one
        ops is the kprobes' one and the kprobe has no Python handler; FS_PRE: only a
        Python pre handler, which C calls; FS_OPS: any other ops, whose funcs C's entry
        runs). A hook's Python callback is swapped for C's the first time it is seen; C
        calls it back for every site it does not serve."""
        self.fold_ftrace()
        by_hook: dict[int, list[FtraceRow]] = {}
        for row in rows:
            by_hook.setdefault(row[0], []).append(row)
        for handle, (rec, _probes) in self.ftrace.items():
            if handle not in by_hook:
                by_hook[handle] = []             # nothing served there any more
        for handle, hrows in by_hook.items():
            entry = self.ftrace.get(handle)
            if entry is None:
                if handle not in self.m.hooks.installed:
                    continue
                rec = KnFtrace(s=ctypes.addressof(self.st),
                               sp_reg=self.m.arch.regs[self.m.arch.sp], back=hrows[0][2])
                if not swap_code_hook(self.m, handle, self.lib.kn_ftrace_hook, rec):
                    continue
                entry = self.ftrace[handle] = (rec, {})
            rec, probes = entry
            mask = ctypes.c_uint32()
            table = self.lib.kn_ftrace_table(len(hrows), ctypes.byref(mask))
            if table is None:
                raise MemoryError("kprobe native ftrace table")
            old = rec.sites
            rec.mask, rec.sites = mask.value, table
            for _h, key, _b, _p, native, idx in hrows:
                self.lib.kn_ftrace_add(ctypes.byref(rec), key, native, idx)
            if old:
                self.lib.kn_free_ptr(old)
            self.ftrace[handle] = (rec, {key: p for _h, key, _b, p, _n, _i in hrows})

    def fold_ftrace(self) -> None:
        for rec, probes in self.ftrace.values():
            if not rec.sites or not (rec.handled or probes):
                continue
            for e in (KnFsite * (rec.mask + 1)).from_address(rec.sites):
                if e.used and (e.hits or e.nmissed):
                    p = probes[e.key]
                    p.hits += e.hits
                    p.nmissed += e.nmissed
                    e.hits = e.nmissed = 0

    def fold_detours(self) -> None:
        for rec, p in self.detours.values():
            if rec.hits or rec.nmissed:
                p.hits += rec.hits
                p.nmissed += rec.nmissed
                rec.hits = rec.nmissed = 0

    def set_table(self, rows: list[tuple["Kprobe", int, NativeSim]]) -> None:
        """Replace the owned probes: (probe, KN_* flags, simulation) rows; counters are
        folded first. An out-of-line probe has Sim.NONE and a slot; a simulated one none."""
        self.fold_counts()
        flat = (ctypes.c_uint64 * max(1, ROW * len(rows)))()
        for i, (p, flags, (sim, imm, aux)) in enumerate(rows):
            a, addr = p.ainsn, p.addr or 0
            rp = p.kretprobe.native_row if flags & KN_RET else -1
            tprog = p.__dict__.get("native_tprog") if flags & KN_PRE else None
            tev = p.__dict__.get("native_tev") if tprog is not None else None
            if tev is not None:
                tev.pend_valid = 0              # text may have changed: blocks are costed anew
            flat[ROW * i:ROW * i + ROW] = [addr, a.slot or 0, addr + a.length, a.ss_trap or 0,
                                           flags, sim, imm & (2**64 - 1), aux, rp & (2**64 - 1),
                                           ctypes.addressof(tprog) if tprog is not None else 0,
                                           ctypes.addressof(tev) if tev is not None else 0]
        self.ua.task_size = min(self.m.memory.task_size, 2**64 - 1)
        if self.lib.kn_set_table(ctypes.byref(self.st), flat, len(rows)):
            raise MemoryError("kprobe native table")
        self.probes = [p for p, _f, _s in rows]
        self.trace_stale()

    # --- trace events committed in C -----------------------------------------------------------
    def trace_state(self, revalidate: Callable[[KnTstate], None]) -> KnTstate | None:
        """C commits trace records: `revalidate(ts)` (one per trace layer) sets every
        event's KnTevent and the shared state whenever C asks (after Python ran). None if C
        cannot call Python through the C API (records are then Python's)."""
        if PYAPI is None:
            return None
        ts = self.tstate
        if ts is None:
            ts = self.tstate = KnTstate()
            m = self.m

            def entry(_arg: int) -> int:
                try:
                    for fn in list(self.revalidators):
                        fn(ts)
                    ts.valid = 1
                except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
                    ts.valid = 0
                    m.hooks.fail(exc)
                return 0
            self._revalidate_obj = entry
            ts.revalidate = id(entry)
            self.st.ts = ctypes.addressof(ts)
            m.cpu_listeners.append(lambda _cpu: self.trace_stale())
            on_task_switch(m, self.trace_stale)
        if revalidate not in self.revalidators:
            self.revalidators.append(revalidate)
        return ts

    def trace_stale(self) -> None:
        """Python may have changed what C's commits depend on: C asks again first."""
        if self.tstate is not None:
            self.tstate.valid = 0

    def fold_counts(self) -> None:
        """Add the hits and misses C counted to the Kprobes (kprobe_profile reads them)."""
        self.fold_detours()
        self.fold_ftrace()
        if not self.probes or not self.st.probes:
            return
        rows = ctypes.cast(self.st.probes, ctypes.POINTER(KnProbe))
        for i, p in enumerate(self.probes):
            r = rows[i]
            if r.hits or r.nmissed:
                p.hits += r.hits
                p.nmissed += r.nmissed
                r.hits = r.nmissed = 0

    def take_current(self) -> "Kprobe | None":
        """The probe C is stepping (its slot runs), handed over to Python; None if none."""
        cur = self.st.current
        if cur < 0:
            return None
        self.st.current = -1
        return self.probes[cur]


def swap_code_hook(m: "Machine", handle: int, fn: Any, rec: Any) -> bool:
    """Point the CODE hook `handle` (one RawHooks made) at C function `fn` with `rec` as
    its data; `rec.orig`/`rec.orig_data` get the Python callback, which C calls back.
    False if the handle is not such a hook."""
    if handle not in m.hooks.installed:
        return False
    slots = (ctypes.c_void_p * 2).from_address(handle + HOOK_CALLBACK_OFFSET)
    known = {ctypes.cast(c, ctypes.c_void_p).value for c in m.hooks._keep if isinstance(c, CODE_CB)}
    if (ctypes.c_int * 1).from_address(handle)[0] != UC.UC_HOOK_CODE or slots[0] not in known:
        return False
    rec.orig, rec.orig_data = slots[0], slots[1]
    _swap_on_every_cpu(m, handle, ctypes.cast(fn, ctypes.c_void_p).value, ctypes.addressof(rec))
    # Unicorn 2.1 bakes a one-address code hook's callback into the translated block
    # (inline hooks): code translated before the swap must go, on every CPU's Uc, now or,
    # inside a run (no flush in a callback), when it returns. Until then it calls the
    # Python callback, which C calls anyway: the same results, more slowly.
    _t, begin, end = m.hooks.installed[handle]
    d = _installed(m)
    if m.running and d is not None:
        d.flush_later.append((begin, end))
    else:
        m.memory.remove_cache(begin, end + 1)
    return True


def _swap_on_every_cpu(m: "Machine", handle: int, fn: Any, data: int) -> None:
    """The hook's callback becomes C's on every vCPU's Uc, and on those made later."""
    for h in m.hooks.handles_of(handle):
        slots = (ctypes.c_void_p * 2).from_address(h + HOOK_CALLBACK_OFFSET)
        slots[1], slots[0] = data, fn
    m.hooks.replay_as(handle, fn, data)


def _installed(m: "Machine") -> NativeDispatch | None:
    """The dispatcher installed on `m`: kept among the machine's hook objects, which live
    as long as its Unicorn (the swapped hooks point into it) and survive snapshot restores,
    and which hold no reference from outside the machine (so it is collected with it)."""
    return next((k for k in m.hooks._keep if isinstance(k, NativeDispatch)), None)


def dispatch_of(m: "Machine", trap_intno: int, pc_adjust: int,
                sim_regs: tuple[list[int], int] | None = None) -> NativeDispatch | None:
    """The machine's C dispatcher, installed on first use; None on the Python path.
    `sim_regs`: the Unicorn ids of x0..x30 and NZCV where the arch simulates (arm64)."""
    d = _installed(m)
    if d is not None:
        for listener in (d.fold_counts, d.run_returned):
            if listener not in m.stop_listeners:     # a snapshot restore dropped it
                m.stop_listeners.append(listener)
        return d
    if not enabled():
        return None
    lib = load()
    if lib is None:
        return None
    handle = _python_intr_hook(m)
    if handle is None:
        return None
    d = NativeDispatch(m, lib)
    st = d.st
    st.current = -1
    reg_read, reg_write = lib_symbol("uc_reg_read"), lib_symbol("uc_reg_write")
    if reg_read is None or reg_write is None:
        return None
    st.reg_read, st.reg_write = reg_read, reg_write
    syms = [lib_symbol(n) for n in UACCESS_SYMBOLS]
    if None not in syms:                       # trace events' fetches read guest memory
        ua = d.ua
        ua.mem_regions, ua.uc_free, ua.mem_read, ua.mem_write = syms
        ua.task_size = min(m.memory.task_size, 2**64 - 1)
        st.ua, st.ua_sp_reg = ctypes.addressof(ua), m.arch.regs[m.arch.sp]
    slots = (ctypes.c_void_p * 2).from_address(handle + HOOK_CALLBACK_OFFSET)
    st.fallback, st.fallback_data = slots[0], slots[1]
    st.pc_reg, st.pc_adjust, st.brk_intno = m.arch.regs[m.arch.pc], pc_adjust, trap_intno
    if sim_regs is not None:
        xregs, st.nzcv_reg = sim_regs
        st.xregs[:len(xregs)] = xregs
    clock = m.clock
    acc, by = clock.acc, clock.by_reason
    clock.__class__ = NativeClock
    clock.__dict__["native"] = d
    clock.acc, clock.__dict__["_by_reason"] = acc, by
    clock.__dict__.pop("by_reason", None)
    clock.__dict__.pop("acc", None)
    d.mirror_costs()
    _swap_on_every_cpu(m, handle, ctypes.cast(lib.kn_hook, ctypes.c_void_p).value,
                       ctypes.addressof(st))
    m.stop_listeners.append(d.fold_counts)
    _watch_stops(m, d)
    m.hooks._keep.append(d)
    return d


def _watch_stops(m: "Machine", d: NativeDispatch) -> None:
    """Once a stop is requested (an exit, a fault, a hook's error) C hands every trap to
    the Python hook, which ignores traps after a stop; cleared when the run returns."""
    flag = d.stopping
    d.st.stopping = ctypes.addressof(flag)

    def watch(uc: Any) -> None:                 # every vCPU's Uc
        uc_stop = uc.emu_stop

        def emu_stop() -> None:
            flag.value = 1
            uc_stop()
        uc.emu_stop = emu_stop

    def run_returned() -> None:
        flag.value = 0
        d.trace_stale()                          # the host may change anything until the next
        if d.flush_later and not m.running:
            for begin, end in d.flush_later:
                m.memory.remove_cache(begin, end + 1)
            d.flush_later.clear()
    m.for_each_uc(watch)
    m.stop_listeners.append(run_returned)
    d.run_returned = run_returned


def on_task_switch(m: "Machine", fn: Callable[[], None]) -> None:
    """Call `fn` before every task switch on any vCPU: a switch loads the next task's
    registers with the Uc's context_restore, which this wraps on every Uc."""
    def watch(uc: Any) -> None:
        restore = uc.context_restore

        def context_restore(context: Any) -> None:
            fn()
            restore(context)
        uc.context_restore = context_restore
    m.for_each_uc(watch)


def _python_intr_hook(m: "Machine") -> int | None:
    """The Unicorn handle (a struct hook *) of the machine's one INTR hook, checked against
    the callbacks RawHooks keeps, or None if the layout is not the one we know."""
    intr = [h for h, (t, b, e) in m.hooks.installed.items() if t == UC.UC_HOOK_INTR]
    if len(intr) != 1:
        return None
    handle = intr[0]
    known = {ctypes.cast(c, ctypes.c_void_p).value for c in m.hooks._keep if isinstance(c, INTR_CB)}
    callback = ctypes.c_void_p.from_address(handle + HOOK_CALLBACK_OFFSET).value
    head = (ctypes.c_int * 1).from_address(handle)[0]
    return handle if callback in known and head == UC.UC_HOOK_INTR else None


NO_SIM: NativeSim = (Sim.NONE, 0, 0)
