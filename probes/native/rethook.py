"""Return probes in C (kprobe_native.c, `struct kn_rethook`): the entry and the trampoline
of kretprobes with no Python entry handler, on the C dispatcher of probes/native; a Python
return handler is called from C's trampoline (`_ret_entry`), once per returning instance.

Ownership of the instance LIFO moves between the two sides. While C holds the running
task's LIFO (`py_owns` == 0) it pushes, pops and drops records itself; a record of a
kretprobe C serves has no Python object (its KretprobeInstance stays in the pool's list,
lent), any other carries the index of its object. Whenever Python code needs the LIFO --
an entry or return C does not model, a handler, a reader, a table change, a task switch
(Unicorn's context_restore), the end of a run -- `pull` hands every record back as
Python objects and folds C's counters; the next Python entry or return `push`es the
running task's LIFO to C again. Both sides run the same algorithm (probes/kretprobes.py)."""
from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from emu.ucfast import lib_symbol
from probes.native import NativeDispatch, on_task_switch, swap_code_hook

if TYPE_CHECKING:
    from probes.kretprobes import Kretprobe, KretprobeInstance, Kretprobes


class KnRi(ctypes.Structure):
    """struct kn_ri: one pending return."""
    ret_addr: int
    fp: int
    stack: int
    rp: int
    obj: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("ret_addr", ctypes.c_uint64), ("fp", ctypes.c_uint64), ("stack", ctypes.c_uint64),
        ("rp", ctypes.c_int64), ("obj", ctypes.c_int64)]


class KnRp(ctypes.Structure):
    """struct kn_rp: the counters and free count of one kretprobe C serves."""
    hits: int
    nmissed: int
    ndropped: int
    nfree: int
    py: int
    tprog: Any
    tev: Any
    func: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        (n, ctypes.c_uint64) for n in ("hits", "nmissed", "ndropped", "nfree", "py")] + [
        ("tprog", ctypes.c_void_p), ("tev", ctypes.c_void_p), ("func", ctypes.c_uint64)]


class KnRethook(ctypes.Structure):
    """struct kn_rethook of kprobe_native.c, field for field."""
    n: int
    nrps: int
    ndropped: int
    frame_warnings: int
    lifo_tid: int
    py_owns: int
    cur: KnRi
    correct: int
    resume: int
    chain_len: int
    handled: int
    deferred: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("s", ctypes.c_void_p), ("trampoline", ctypes.c_uint64),
        ("lifo", ctypes.c_void_p), ("n", ctypes.c_uint64), ("cap", ctypes.c_uint64),
        ("rps", ctypes.c_void_p), ("nrps", ctypes.c_uint64),
        ("ndropped", ctypes.c_uint64), ("frame_warnings", ctypes.c_uint64),
        ("lifo_tid", ctypes.c_uint64), ("py_owns", ctypes.c_uint32), ("x86", ctypes.c_uint32),
        ("sp_reg", ctypes.c_int32), ("fp_reg", ctypes.c_int32), ("lr_reg", ctypes.c_int32),
        ("pad", ctypes.c_int32), ("task_size", ctypes.c_uint64),
        ("mem_regions", ctypes.c_void_p), ("uc_free", ctypes.c_void_p),
        ("mem_read", ctypes.c_void_p), ("mem_write", ctypes.c_void_p),
        ("orig", ctypes.c_void_p), ("orig_data", ctypes.c_void_p),
        ("handled", ctypes.c_uint64), ("deferred", ctypes.c_uint64),
        ("py_ret", ctypes.c_void_p), ("cur", KnRi), ("correct", ctypes.c_uint64),
        ("resume", ctypes.c_uint64), ("chain_len", ctypes.c_uint64)]


def _setup(lib: ctypes.CDLL) -> None:
    lib.kn_rethook_reserve.argtypes = [ctypes.POINTER(KnRethook), ctypes.c_uint64]
    lib.kn_rethook_reserve.restype = ctypes.c_void_p
    lib.kn_rethook_free.argtypes = [ctypes.c_void_p]
    lib.kn_rethook_free.restype = None


def _live_instance(h: KnRethook) -> "KretprobeInstance":
    """The kretprobe_instance C's trampoline hands a return handler: ret_addr, fp and stack
    are read from C's record of the returning instance when the handler asks (valid during
    the handler, as the kernel's instance is until it goes back to the pool)."""
    from probes.kretprobes import KretprobeInstance
    cur = h.cur

    class LiveInstance(KretprobeInstance):
        ret_addr = property(lambda self: cur.ret_addr)
        fp = property(lambda self: cur.fp)
        stack = property(lambda self: cur.stack)

    ri = object.__new__(LiveInstance)
    object.__setattr__(ri, "rp", None)
    object.__setattr__(ri, "data", bytearray())
    return ri


@dataclass(eq=False)
class NativeRethook:
    """The C side of one Kretprobes layer. `rows[i]` is the kretprobe of C's row i."""
    d: NativeDispatch
    krp: "Kretprobes"
    h: KnRethook = field(default_factory=KnRethook)
    rows: list["Kretprobe"] = field(default_factory=list)
    lent: list["KretprobeInstance"] = field(default_factory=list)  # objects of C's records
    _rps: Any = None                          # the ctypes array `h.rps` points into
    _ret_obj: Any = None                      # the return-handler entry C calls (alive)
    _ret_rows: list[tuple[Any, Any, Any]] = field(default_factory=list)  # (rp, handler, kp)

    @property
    def redirects(self) -> bool:
        """C resumes where a return handler asked (`resume`: a BPF stub, jit_direct.py)."""
        return self._ret_obj is not None

    @property
    def calls_handlers(self) -> bool:
        """C can call kretprobes' Python return handlers (through the C API)."""
        return self._ret_obj is not None

    def _ret_entry(self) -> Any:
        """C took the return of a kretprobe whose Python return handler must run (HANDLER
        charged there, the chain off the LIFO, `h.cur` the instance, `h.correct` the real
        return address): `ret(row)` runs it as __kretprobe_trampoline_handler does, with a
        view of C's record as the instance and one reused pt_regs view; C then restores
        the return. Returns 0."""
        from probes.regs import PtRegs
        m, krp, h = self.d.m, self.krp, self.h
        regs = PtRegs(m)
        dirty, flush, pc = regs._dirty, regs.flush, m.arch.pc
        ri = _live_instance(h)

        def ret(row: int) -> int:
            try:
                ri.rp, handler, kp = self._ret_rows[row]
                # its programs may run from a guest stub instead: a chain of one only, as
                # Python's trampoline handler offers it (the stub runs after the others)
                if not h.resume and h.chain_len == 1:
                    to = krp.native_bpf_stub(ri.rp, h.correct)
                    if to is not None:
                        h.resume = to
                        return 0
                regs._cache = {pc: h.correct}
                if dirty:
                    dirty.clear()
                kcb = krp.kprobes.kcb
                cur, status = kcb.current, kcb.status
                kcb.current = kp                   # probes hit in here are missed
                try:
                    if handler is not None:
                        handler(ri, regs)
                finally:
                    kcb.current, kcb.status = cur, status
                if dirty:
                    dirty.discard(pc)              # the return goes to `correct` anyway
                    flush()
            except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
                m.hooks.fail(exc)
            return 0
        return ret

    @classmethod
    def attach(cls, d: NativeDispatch, krp: "Kretprobes", x86: bool,
               tramp_entry: int | None) -> "NativeRethook | None":
        """C serves the return probes of `krp` on dispatcher `d`; None if libunicorn lacks
        a function it needs. `tramp_entry`: x86's trampoline host entry (a code hook)."""
        syms = [lib_symbol(n) for n in ("uc_mem_regions", "uc_free", "uc_mem_read", "uc_mem_write")]
        if None in syms:
            return None
        _setup(d.lib)
        m = d.m
        nr = cls(d, krp)
        h = nr.h
        h.s, h.trampoline, h.py_owns, h.x86 = ctypes.addressof(d.st), krp.trampoline, 1, int(x86)
        h.sp_reg = m.arch.regs[m.arch.sp]
        h.mem_regions, h.uc_free, h.mem_read, h.mem_write = syms
        if tramp_entry is not None and not nr._swap_tramp_hook(tramp_entry):
            return None
        weakref.finalize(nr, d.lib.kn_rethook_free, ctypes.addressof(h))
        if d.st.py:                           # C calls return handlers through the C API
            nr._ret_obj = nr._ret_entry()
            h.py_ret = id(nr._ret_obj)
        d.st.rh = ctypes.addressof(h)
        m.hooks._keep.append(nr)              # C points into it: it lives as the Unicorn does
        nr._watch(m)
        return nr

    def _swap_tramp_hook(self, handle: int) -> bool:
        return swap_code_hook(self.d.m, handle, self.d.lib.kn_tramp_hook, self.h)

    def _watch(self, m: Any) -> None:
        """Python takes the LIFO back at the end of every run and at every task switch (the
        LIFO C holds is one task's)."""
        m.stop_listeners.append(self.settle)
        on_task_switch(m, self.pull)

    # --- the hand-over ----------------------------------------------------------------------
    def settle(self) -> None:
        """After a run: counters fold into the Kretprobes. C keeps serving the next run
        unless instances are pending (their objects are then Python's to show)."""
        self.pull()
        if not self.krp.by_task.get(self.d.m.task[1]):
            self.push()

    def pull(self) -> None:
        """C's records become the Python LIFO of the task they belong to; counters fold."""
        h, krp = self.h, self.krp
        if h.py_owns:
            return
        h.py_owns = 1
        rps = self._rps
        for i, rp in enumerate(self.rows):
            r = rps[i]
            rp.hits += r.hits
            rp.nmissed += r.nmissed
            rp.ndropped += r.ndropped
            r.hits = r.nmissed = r.ndropped = 0
        krp.ndropped += h.ndropped
        krp.frame_warnings += h.frame_warnings
        h.ndropped = h.frame_warnings = 0
        lifo = krp.by_task.setdefault(h.lifo_tid, [])
        recs = (KnRi * h.n).from_address(h.lifo) if h.n else ()
        for rec in recs:
            if rec.rp >= 0:
                rp = self.rows[rec.rp]
                ri = rp.free_instances.pop()
                ri.rp = rp
            else:
                ri = self.lent[rec.obj]
            ri.ret_addr, ri.fp, ri.stack = rec.ret_addr, rec.fp, rec.stack
            lifo.append(ri)
        h.n = 0
        self.lent = []

    def push(self) -> None:
        """The running task's LIFO goes to C (after a Python entry or return)."""
        h, krp, m = self.h, self.krp, self.d.m
        if not h.py_owns or not self.rows:
            return
        if self.settle not in m.stop_listeners:        # a snapshot restore dropped it
            m.stop_listeners.append(self.settle)
        tid = m.task[1]
        lifo = krp.by_task.get(tid, [])
        base = self.d.lib.kn_rethook_reserve(ctypes.byref(h), len(lifo))
        if base is None and lifo:
            return                                     # no memory: Python keeps it
        rps = self._rps
        for i, row_rp in enumerate(self.rows):
            rps[i].nfree = len(row_rp.free_instances)
        recs = (KnRi * len(lifo)).from_address(base) if lifo else ()
        lent: list[KretprobeInstance] = []
        for rec, ri in zip(recs, lifo):
            owner = ri.rp
            if owner is not None and owner.native_row >= 0:
                owner.free_instances.append(ri)       # lent to C's record
                rec.rp, rec.obj = owner.native_row, -1
            else:
                rec.rp, rec.obj = -1, len(lent)
                lent.append(ri)
            rec.ret_addr, rec.fp, rec.stack = ri.ret_addr, ri.fp, ri.stack
        h.n, h.lifo_tid, h.task_size = len(lifo), tid, min(m.memory.task_size, 2**64 - 1)
        lifo.clear()
        self.lent = lent
        h.py_owns = 0

    def set_rows(self, rows: list["Kretprobe"]) -> None:
        """The kretprobes C serves (those with no Python handler), after any change."""
        self.pull()
        for rp in self.rows:
            rp.native_row = -1
        for i, rp in enumerate(rows):
            rp.native_row = i
        self.rows = list(rows)
        self._rps = (KnRp * max(1, len(rows)))()
        for i, rp in enumerate(rows):
            r = self._rps[i]
            r.py = int(rp.handler is not None)
            tprog, tev = rp.__dict__.get("native_tprog"), rp.__dict__.get("native_tev")
            if tprog is not None and tev is not None and rp.kp.addr is not None:
                r.tprog, r.tev, r.func = ctypes.addressof(tprog), ctypes.addressof(tev), rp.kp.addr
                tev.pend_valid = 0
        self._ret_rows = [(rp, rp.handler, rp.kp) for rp in rows]
        self.h.rps, self.h.nrps = ctypes.addressof(self._rps), len(rows)
        self.settle()
