"""Fast paths around the Unicorn binding, measured in shared/reference/unicorn-notes.md.

The binding's reg_read/reg_write cost ~1.3 µs each and its hooks ~270 ns a call; raw
`uc_reg_*` with a prebuilt c_uint64 cost ~0.3 µs and raw CFUNCTYPE hooks ~115 ns. Hooks
registered here store the first exception they raise on `errors`, stop the emulation and
let the machine re-raise it after `emu_start` (ctypes would otherwise print and drop it)."""
from __future__ import annotations

import ctypes
import functools
from typing import Callable, Iterable

# The Python 3 binding by its module: type checkers read `unicorn.Uc` as the Python 2 one.
from unicorn.unicorn_py3.unicorn import Uc
from unicorn import unicorn_const as UC
import unicorn.unicorn_py3.unicorn as _ucmod

uclib = _ucmod.uclib
# Second handles on libunicorn without the binding's argtypes: UC_HOOK_INSN takes a variadic
# instruction id after `end`, and argtype conversion doubles the cost of a register access.
_raw = ctypes.CDLL(uclib._name)
raw_lib = _raw                  # for other modules' raw calls (one handle, no argtypes)
_hook_add_va = _raw.uc_hook_add
_hook_add_va.restype = ctypes.c_int
_reg_read, _reg_write = _raw.uc_reg_read, _raw.uc_reg_write
_mem_read = _raw.uc_mem_read

INTR_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
CODE_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)
INSN_SYSCALL_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
INSN_RDTSC_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p)


def uc_emu_stop_address() -> int:
    """libunicorn's uc_emu_stop, for native hooks that stop a run themselves."""
    return lib_symbol("uc_emu_stop") or 0


def lib_symbol(name: str) -> int | None:
    """The address of a symbol libunicorn exports (native code that calls or patches it),
    None if this build has no such symbol."""
    try:
        return ctypes.cast(getattr(_raw, name), ctypes.c_void_p).value
    except AttributeError:
        return None


class RegAccess:
    """Register reads and writes through raw libunicorn calls (4x faster than the binding)."""

    __slots__ = ("_uch", "_buf", "_ref", "_read", "_write")

    def __init__(self, uc: Uc) -> None:
        self._uch = uc._uch
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.byref(self._buf)
        self._read = _reg_read
        self._write = _reg_write

    def retarget(self, uc: Uc) -> None:
        """Read and write `uc`'s registers from now on (the machine's running vCPU): holders
        of this object or its bound methods follow a CPU switch."""
        self._uch = uc._uch

    def read(self, reg_id: int) -> int:
        self._read(self._uch, reg_id, self._ref)
        return self._buf.value

    def write(self, reg_id: int, value: int) -> None:
        self._buf.value = value & 0xFFFFFFFFFFFFFFFF
        self._write(self._uch, reg_id, self._ref)

    def read_u64(self, addr: int) -> int:
        """8 bytes of guest memory, little-endian (raw uc_mem_read: hot paths only)."""
        if _mem_read(self._uch, ctypes.c_uint64(addr), self._ref, ctypes.c_size_t(8)):
            raise ValueError(f"unmapped guest memory at {addr:#x}")
        return self._buf.value


class RawHooks:
    """Owns raw hooks on the machine's Ucs (one per vCPU): keeps the ctypes objects alive,
    funnels exceptions, and puts every hook on every Uc, those added later included. A
    handle is the hook's handle on the first Uc; `handles_of` gives all of them."""

    def __init__(self, uc: Uc) -> None:
        self.uc = uc                       # the Uc running now: the one a hook error stops
        self.ucs: list[Uc] = [uc]
        self.errors: list[BaseException] = []
        self._keep: list[object] = []
        # handle -> its ctypes callback and the objects held with it (`hold`): let go by
        # `release` once the hook is deleted (a snapshot restore), not kept for ever
        self._held: dict[int, list[object]] = {}
        self.installed: dict[int, tuple[int, int, int]] = {}   # handle -> (type, begin, end)
        # handle -> (type, callback address, user data, begin, end, extra args) to replay
        # on a Uc added later, and its handles on the other Ucs.
        self._recipes: dict[int, tuple] = {}
        self._more: dict[int, list[int]] = {}

    def add_uc(self, uc: Uc) -> None:
        """Another vCPU's Uc: every hook installed so far goes on it, in the same order."""
        self.ucs.append(uc)
        for handle, (htype, fn, ud, begin, end, extra) in self._recipes.items():
            self._more[handle].append(hook_add_at(uc, htype, fn, ud, begin, end, extra))

    def replay_as(self, handle: int, fn: int, user_data: int) -> None:
        """Ucs added from now on get hook `handle` with the native callback `fn` and its
        `user_data` (for a layer that swapped the callback in place on the Ucs of now)."""
        htype, _fn, _ud, begin, end, extra = self._recipes[handle]
        self._recipes[handle] = (htype, fn, user_data, begin, end, extra)

    def handles_of(self, handle: int) -> list[int]:
        """The hook's handles on every Uc, the first Uc's first."""
        return [handle, *self._more.get(handle, ())]

    def fail(self, exc: BaseException) -> None:
        """A hook's exception: the first is kept, to be re-raised after emu_start, and the
        running Uc stops (every layer's hook callbacks end this way)."""
        if not self.errors:
            self.errors.append(exc)
        self.uc.emu_stop()

    def _guard(self, fn: Callable, default=None) -> Callable:
        def guarded(*args):
            try:
                return fn(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
                self.fail(exc)
                return default

        return guarded

    def _add(self, htype: int, cfunc, begin: int, end: int, *extra) -> int:
        self._keep.append(cfunc)
        handle = self._add_on_all(htype, ctypes.cast(cfunc, ctypes.c_void_p).value, None,
                                  begin, end, extra)
        self._held[handle] = [cfunc]
        return handle

    def hold(self, handle: int, obj: object) -> None:
        """Keep `obj` alive while hook `handle` is installed (C data its callback uses)."""
        self._held.setdefault(handle, []).append(obj)
        self._keep.append(obj)

    def release(self, handles: Iterable[int]) -> None:
        """Let go of the callbacks and held objects of hooks deleted already: only outside
        a run (a callback deleted inside one may still be on the stack)."""
        gone = {id(o) for h in handles if h not in self.installed for o in self._held.pop(h, ())}
        if gone:
            gone -= {id(o) for objs in self._held.values() for o in objs}
            self._keep[:] = [o for o in self._keep if id(o) not in gone]

    def _add_on_all(self, htype: int, fn: int | None, ud: int | None, begin: int, end: int,
                    extra: tuple) -> int:
        handle = hook_add_at(self.ucs[0], htype, fn, ud, begin, end, extra)
        self.installed[handle] = (htype, begin, end)
        self._recipes[handle] = (htype, fn, ud, begin, end, extra)
        self._more[handle] = [hook_add_at(uc, htype, fn, ud, begin, end, extra)
                              for uc in self.ucs[1:]]
        return handle

    def intr(self, fn: Callable[[int], None]) -> int:
        guarded = self._guard(fn)
        return self._add(UC.UC_HOOK_INTR, INTR_CB(lambda _uc, intno, _ud: guarded(intno)), 1, 0)

    def code(self, fn: Callable[[int, int], None], begin: int = 1, end: int = 0) -> int:
        guarded = self._guard(fn)
        return self._add(UC.UC_HOOK_CODE, CODE_CB(lambda _uc, addr, size, _ud: guarded(addr, size)),
                         begin, end)

    def entry(self, fn: Callable[[int], None], addr: int) -> int:
        """A code hook on exactly `addr` calling fn(addr), with no wrapper frames: the hot
        path of trampolines and detours."""
        def cb(_uc, a, _size, _ud):
            try:
                fn(a)
            except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
                self.fail(exc)
        return self._add(UC.UC_HOOK_CODE, CODE_CB(cb), addr, addr)

    def block(self, fn: Callable[[int, int], None], begin: int = 1, end: int = 0) -> int:
        guarded = self._guard(fn)
        return self._add(UC.UC_HOOK_BLOCK, CODE_CB(lambda _uc, addr, size, _ud: guarded(addr, size)),
                         begin, end)

    def insn_syscall(self, fn: Callable[[], None], insn_id: int) -> int:
        guarded = self._guard(fn)
        return self._add(UC.UC_HOOK_INSN, INSN_SYSCALL_CB(lambda _uc, _ud: guarded()), 1, 0,
                         ctypes.c_int(insn_id))

    def insn_counter(self, fn: Callable[[], int], insn_id: int) -> int:
        """A hook on rdtsc/rdtscp: `fn` writes the result registers and returns 1 to skip."""
        guarded = self._guard(fn, default=1)
        return self._add(UC.UC_HOOK_INSN, INSN_RDTSC_CB(lambda _uc, _ud: guarded()), 1, 0,
                         ctypes.c_int(insn_id))

    def native_block(self, fn: int, user_data: int) -> int:
        """A BLOCK hook on all code whose callback is native: `fn` is the address of a C
        function taking (uc, addr, size, user_data). No Python runs per block; the C code
        reports its own errors (emu/cycles/native.c)."""
        return self._add_on_all(UC.UC_HOOK_BLOCK, fn, user_data, 1, 0, ())

    def delete(self, handle: int) -> None:
        for uc, h in zip(self.ucs, self.handles_of(handle)):
            uclib.uc_hook_del(uc._uch, h)
        self.installed.pop(handle, None)
        self._recipes.pop(handle, None)
        self._more.pop(handle, None)

    def per_instruction(self) -> list[tuple[int, int, int]]:
        """CODE or BLOCK hooks not limited to one address: the ones that slow all code."""
        return [h for h in self.installed.values()
                if h[0] in (UC.UC_HOOK_CODE, UC.UC_HOOK_BLOCK) and not (h[1] == h[2])]


def hook_add_at(uc: Uc, htype: int, fn: int | None, ud: int | None, begin: int, end: int,
                extra: tuple = ()) -> int:
    """uc_hook_add of a callback by address (every RawHooks hook goes through here, and
    hooks a layer keeps outside RawHooks: the TLB's)."""
    handle = ctypes.c_size_t()
    err = _hook_add_va(uc._uch, ctypes.byref(handle), ctypes.c_int(htype), ctypes.c_void_p(fn),
                       ctypes.c_void_p(ud), ctypes.c_uint64(begin), ctypes.c_uint64(end), *extra)
    if err:
        raise RuntimeError(f"uc_hook_add failed: {err}")
    return handle.value


_TLB_FLUSH = (1 << 30) | UC.UC_CTL_TLB_FLUSH          # UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0)


def tlb_flush(uc: Uc) -> None:
    """uc_ctl(UC_CTL_TLB_FLUSH) without the binding's wrapping (a flush follows every map,
    unmap and protect)."""
    _raw.uc_ctl(uc._uch, ctypes.c_int(_TLB_FLUSH))


# --- instruction limits across nested runs --------------------------------------------------
# uc_emu_start keeps its `count` in the Uc, not in the call: every start sets uc->emu_count,
# zeroes uc->emu_counter, and a start with count 0 deletes the count hook and flushes every
# translated block (Unicorn 2.1.4 uc.c). So a run started from a hook of a counted run would
# end the outer run's --max-insns and throw its code away. `emu_start_nested` keeps both:
# it starts a counted nested run (the hook stays, nothing is flushed), then puts the outer
# limit back and adds the nested run's instructions to the outer counter: the limit counts
# every instruction the CPU retires, as the cycle model's `instructions` does (JITed BPF
# code included, wherever it runs). A nested run is never cut by the limit (the hook's work
# is whole); past the limit the outer run stops at its next instruction. The two fields
# have no API: their offsets are found once by running a known count on a scratch Uc
# (`_count_fields`, once per process); if that fails the plain start is kept.
_NESTED_COUNT = 1 << 62          # a nested run's own count: never reached
_SCAN_BYTES = 2048               # uc_struct is larger; the fields sit at ~1.4 KB in 2.1.4
def _uc_address(uc: Uc) -> int:
    """The uc_struct behind a Uc (the binding keeps it as a c_void_p)."""
    return int(uc._uch.value or 0)


@functools.cache
def _count_fields() -> tuple[int, int] | None:
    """(offset of uc->emu_counter, offset of uc->emu_count) in uc_struct, or None, found
    once per process: two runs of a `jmp $` loop with different counts K; the word pairs
    that read (K + 1, K) after both are (emu_counter, emu_count): a unique adjacent pair."""
    from unicorn import UC_ARCH_X86, UC_MODE_64
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\xeb\xfe")
    words = (ctypes.c_size_t * (_SCAN_BYTES // 8)).from_address(_uc_address(uc))
    found: set[int] | None = None
    for k in (0x1357, 0x2468):
        uc.emu_start(0x1000, 0x2000, count=k)
        pairs = {8 * i for i in range(len(words) - 1) if (words[i], words[i + 1]) == (k + 1, k)}
        found = pairs if found is None else found & pairs
    if not found or len(found) != 1:
        return None
    off = found.pop()
    return off, off + 8


# uc_struct address -> its (emu_counter, emu_count) views: building them costs ~1 µs a hit
_count_views: dict[int, tuple[ctypes.c_size_t, ctypes.c_size_t]] = {}


def _counts_of(uc: Uc, offs: tuple[int, int]) -> tuple[ctypes.c_size_t, ctypes.c_size_t]:
    base = _uc_address(uc)
    views = _count_views.get(base)
    if views is None:
        if len(_count_views) >= 64:     # Ucs come and go (a freed one's address is reused)
            _count_views.clear()
        views = _count_views[base] = (ctypes.c_size_t.from_address(base + offs[0]),
                                      ctypes.c_size_t.from_address(base + offs[1]))
    return views


def emu_start_nested(uc: Uc, begin: int, until: int) -> None:
    """emu_start from inside a hook of a run on the same `uc`, keeping the outer run's
    instruction limit, its count now including the nested run's (see above)."""
    offs = _count_fields()
    if offs is None:
        uc.emu_start(begin, until)
        return
    counter, count = _counts_of(uc, offs)
    saved = counter.value, count.value
    if not saved[1]:                    # the outer run has no count hook: nothing to keep
        uc.emu_start(begin, until)
        return
    try:                                # (the start zeroes the counter)
        uc.emu_start(begin, until, count=_NESTED_COUNT)
    finally:
        counter.value, count.value = saved[0] + counter.value, saved[1]
