"""The machine's TLB: every CPU's Unicorn in UC_TLB_VIRTUAL with a fill callback that
grants each page exactly its mapping's permissions (paddr = vaddr: our guests never
enable an MMU; the bare-metal firmware runs with it off too).

Why (Unicorn 2.1.4, benchmarks/README.md): a store to a page whose TLB entry carries
execute permission, or that any invalid-memory or memory hook covers, takes the slow
path (`notdirty_write`, 35-60 ns) every time; with Unicorn's own TLB and no guest MMU every
entry carries execute. Filled here, data pages are r or rw without execute, so their
stores go inline (~2 ns) after the first write; code pages are r-x; rwx pages keep the
slow path, which keeps self-modifying code coherent.

Faults keep their exact reports. A page whose mapping lacks the access, or that nothing
maps, is sent to a slot of the *fault window* (physical pages no guest address reaches)
instead of being refused, which would end the run with UC_ERR_EXCEPTION and only the
page. One invalid-memory hook bounded to the window sees the access with its page offset;
the slot gives the page and whether it is mapped, so the machine gets the (access,
address) Unicorn's checks would have given it: read/write/fetch of an unmapped or a
protected address.

Coherence is the owner's (emu/memory.py): `assign` on every map, unmap and protect, then
`flush` on every CPU's Uc (which also frees the window's slots: nothing translates to
them any more). A range that loses execute must drop its translated code while it is
still executable here: Unicorn finds the code to drop through a fetch translation.

The fill is C (vtlb.c) when it builds; the Python fill answers the same from the same
table algorithm (tests compare them). `KPROBE_EMU_VTLB=python` forces the Python fill
(`KPROBE_EMU_NO_NATIVE` too); `KPROBE_EMU_VTLB=off` is Unicorn's CPU TLB with one
unbounded invalid-memory hook, the machine before this module (benchmarks compare)."""
from __future__ import annotations

import bisect
import ctypes
import os
import weakref
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from unicorn import unicorn_const as UC
from unicorn.unicorn_py3.unicorn import Uc   # (not `unicorn.Uc`: type checkers read the Py2 one)

from emu.native_lib import address_of, cached_library
from emu.ucfast import hook_add_at, tlb_flush

SOURCE = Path(__file__).with_name("vtlb.c")
PAGE = 0x1000
SLOTS = 64                          # VTLB_SLOTS of vtlb.c
MAPPED = 1                          # slot_page's low bit: the denied page is mapped
# Physical address of the fault window: above every guest address (x86-64 canonical user
# space, arm64's 48-bit VA, the bare-metal RAM), never mapped.
WINDOW = 0x00F0_0000_0000_0000
_NEED = {UC.UC_MEM_READ: UC.UC_PROT_READ, UC.UC_MEM_WRITE: UC.UC_PROT_WRITE,
         UC.UC_MEM_FETCH: UC.UC_PROT_EXEC}
# The window is unmapped: Unicorn reports *_UNMAPPED; a mapped page's denial is a PROT.
_AS_PROT = {UC.UC_MEM_READ_UNMAPPED: UC.UC_MEM_READ_PROT,
            UC.UC_MEM_WRITE_UNMAPPED: UC.UC_MEM_WRITE_PROT,
            UC.UC_MEM_FETCH_UNMAPPED: UC.UC_MEM_FETCH_PROT}

FaultSink = Callable[[int, int], None]        # (UC_MEM_* access, guest address)


class VtlbMode(StrEnum):
    NATIVE = "native"
    PYTHON = "python"
    OFF = "off"


class UcTlbEntry(ctypes.Structure):
    """uc_tlb_entry of unicorn.h."""
    _fields_: ClassVar[list[tuple[str, Any]]] = [("paddr", ctypes.c_uint64),
                                                 ("perms", ctypes.c_uint32)]


class VtlbState(ctypes.Structure):
    """vtlb_state of vtlb.c (field for field); the Python fill uses its window fields."""
    window: int
    slots_used: int
    fills: int
    denials: int
    slot_page: Any
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("r", ctypes.c_void_p), ("n", ctypes.c_uint64), ("cap", ctypes.c_uint64),
        ("window", ctypes.c_uint64), ("slot_page", ctypes.c_uint64 * SLOTS),
        ("slots_used", ctypes.c_uint64), ("fills", ctypes.c_uint64),
        ("denials", ctypes.c_uint64)]


FILL_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                           ctypes.POINTER(UcTlbEntry), ctypes.c_void_p)
INVALID_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64,
                              ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
def _declare(lib: ctypes.CDLL) -> None:
    P = ctypes.POINTER(VtlbState)
    lib.vtlb_assign.argtypes = [P, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
    lib.vtlb_lookup.argtypes = [P, ctypes.c_uint64]
    lib.vtlb_fill.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                              ctypes.POINTER(UcTlbEntry), P]
    lib.vtlb_fill.restype = ctypes.c_bool
    for fn in (lib.vtlb_clear, lib.vtlb_free):
        fn.argtypes, fn.restype = [P], None


load = cached_library(SOURCE, "vtlb", _declare)        # vtlb.c (None without a compiler)


def default_mode() -> VtlbMode:
    """KPROBE_EMU_VTLB if set, Python under KPROBE_EMU_NO_NATIVE, else C when it builds."""
    env = os.environ.get("KPROBE_EMU_VTLB")
    if env:
        try:
            return VtlbMode(env)
        except ValueError:
            from emu.errors import UsageError
            raise UsageError(f"KPROBE_EMU_VTLB={env}: expected one of "
                             f"{', '.join(m.value for m in VtlbMode)}") from None
    if os.environ.get("KPROBE_EMU_NO_NATIVE") or load() is None:
        return VtlbMode.PYTHON
    return VtlbMode.NATIVE


class Vtlb:
    """The permission table behind every CPU's TLB fills, and the fault window's reader.

    Attributes: `mode`; `state` (the C struct: fills and denials counted, window slots);
    `on_fault(access, addr)`, called from the window's hook with a UC_MEM_*_UNMAPPED or
    *_PROT access and the guest address, as an invalid-memory hook would be; `on_error`
    takes an exception raised in a Python callback (the machine's RawHooks.fail: kept,
    re-raised after emu_start), which ctypes would otherwise print and drop."""

    def __init__(self, mode: VtlbMode | str | None = None,
                 on_fault: FaultSink | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.on_error = on_error
        self.mode = VtlbMode(mode) if mode is not None else default_mode()
        self._lib = load() if self.mode is VtlbMode.NATIVE else None
        if self.mode is VtlbMode.NATIVE and self._lib is None:
            self.mode = VtlbMode.PYTHON
        self.on_fault = on_fault
        self.state = VtlbState(window=WINDOW)
        self._ref = ctypes.byref(self.state)
        self._starts: list[int] = []        # the Python table: sorted, non-overlapping
        self._ends: list[int] = []
        self._perms: list[int] = []
        self._keep: list[object] = []       # ctypes callbacks the Ucs call
        if self._lib is not None:
            weakref.finalize(self, self._lib.vtlb_free, self._ref)

    # --- the table ----------------------------------------------------------------------
    def assign(self, start: int, end: int, perms: int | None) -> None:
        """[start, end) now has Unicorn `perms` (None: unmapped)."""
        if self._lib is not None:
            if self._lib.vtlb_assign(self._ref, start, end, -1 if perms is None else perms):
                raise MemoryError("vtlb: no memory for the permission table")
        elif self.mode is VtlbMode.PYTHON:
            self._assign_py(start, end, perms)

    def _assign_py(self, start: int, end: int, perms: int | None) -> None:
        """vtlb_assign in Python: split the ranges crossing the bounds, replace the rest."""
        if start >= end:
            return
        s, e, p = self._starts, self._ends, self._perms
        i = bisect.bisect_right(e, start)
        j = bisect.bisect_left(s, end, lo=i)
        add: list[tuple[int, int, int]] = []
        if i < j and s[i] < start:
            add.append((s[i], start, p[i]))
        if perms is not None:
            add.append((start, end, perms))
        if i < j and e[j - 1] > end:
            add.append((end, e[j - 1], p[j - 1]))
        s[i:j], e[i:j], p[i:j] = ([a[k] for a in add] for k in range(3))

    def reset(self, mappings: Iterable[tuple[int, int, int]]) -> None:
        """The table becomes `mappings` ([start, end) with perms), e.g. Unicorn's own."""
        if self._lib is not None:
            self._lib.vtlb_clear(self._ref)
        self._starts, self._ends, self._perms = [], [], []
        for start, end, perms in sorted(mappings):
            self.assign(start, end, perms)

    def lookup(self, addr: int) -> int | None:
        """The perms the table gives the page of `addr` (None: unmapped)."""
        if self._lib is not None:
            got = self._lib.vtlb_lookup(self._ref, addr)
            return None if got < 0 else got
        i = bisect.bisect_right(self._ends, addr)
        if i < len(self._starts) and self._starts[i] <= addr:
            return self._perms[i]
        return None

    def fill(self, vaddr: int, access: int) -> tuple[int, int]:
        """(paddr, perms) a TLB fill of `vaddr`'s page for `access` (UC_MEM_READ, _WRITE,
        _FETCH) gets: what Unicorn's TLB is told."""
        entry = UcTlbEntry()
        if self._lib is not None:
            self._lib.vtlb_fill(None, vaddr & ~(PAGE - 1), access, ctypes.byref(entry), self._ref)
        else:
            self._fill_py(vaddr & ~(PAGE - 1), access, entry)
        return entry.paddr, entry.perms

    def _fill_py(self, page: int, access: int, entry: UcTlbEntry) -> bool:
        perms, need, st = self.lookup(page), _NEED.get(access, UC.UC_PROT_READ), self.state
        st.fills += 1
        if perms is not None and perms & need:
            entry.paddr, entry.perms = page, perms
            return True
        tag = page | (MAPPED if perms is not None else 0)
        used = st.slots_used
        slot = next((k for k in range(used) if st.slot_page[k] == tag), None)
        if slot is None:
            slot = used if used < SLOTS else st.denials % SLOTS
            st.slots_used = min(used + 1, SLOTS)
            st.slot_page[slot] = tag
        st.denials += 1
        entry.paddr, entry.perms = WINDOW + slot * PAGE, need
        return True

    # --- the Ucs --------------------------------------------------------------------------
    def attach(self, uc: Uc) -> None:
        """Run `uc` on this TLB: virtual mode, the fill, and the fault window's hook."""
        if self.mode is VtlbMode.OFF:
            hook_add_at(uc, UC.UC_HOOK_MEM_INVALID, self._invalid_cb(self._on_invalid),
                        None, 1, 0)
            return
        uc.ctl_set_tlb_mode(UC.UC_TLB_VIRTUAL)
        if self._lib is not None:
            hook_add_at(uc, UC.UC_HOOK_TLB_FILL, address_of(self._lib.vtlb_fill),
                        ctypes.addressof(self.state), 1, 0)
        else:
            cb = FILL_CB(self._guarded(lambda _uc, vaddr, access, entry, _ud:
                                       self._fill_py(vaddr, access, entry.contents)))
            self._keep.append(cb)
            hook_add_at(uc, UC.UC_HOOK_TLB_FILL, address_of(cb), None, 1, 0)
        hook_add_at(uc, UC.UC_HOOK_MEM_UNMAPPED, self._invalid_cb(self._on_window), None,
                    WINDOW, WINDOW + SLOTS * PAGE - 1)

    def _invalid_cb(self, fn: Callable[[int, int], None]) -> int:
        def cb(_uc, access, addr, _size, _value, _ud) -> bool:
            fn(access, addr)
            return False
        c = INVALID_CB(self._guarded(cb))
        self._keep.append(c)
        return address_of(c)

    def _guarded(self, fn: Callable[..., bool]) -> Callable[..., bool]:
        """`fn` with its exception handed to `on_error` (the run then stops and re-raises
        it) and False returned: the access is refused, never silently granted."""
        def guarded(*args) -> bool:
            try:
                return fn(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
                if self.on_error is None:
                    raise
                self.on_error(exc)
                return False
        return guarded

    def _on_invalid(self, access: int, addr: int) -> None:
        if self.on_fault is not None:
            self.on_fault(access, addr)

    def _on_window(self, access: int, paddr: int) -> None:
        """An access sent to the window: the guest address and kind behind the slot."""
        slot, off = divmod(paddr - WINDOW, PAGE)
        tag = self.state.slot_page[slot % SLOTS]
        addr = (tag & ~MAPPED) + off      # (Unicorn's arm64 pages are 1 KiB: off < 1 KiB)
        self._on_invalid(_AS_PROT.get(access, access) if tag & MAPPED else access, addr)

    def flush(self, ucs: Iterable[Uc]) -> None:
        """Drop every translation of every Uc (after the table changed); the window's
        slots are free again since nothing translates to them."""
        if self.mode is VtlbMode.OFF:
            return
        for uc in ucs:
            tlb_flush(uc)
        self.state.slots_used = 0

    def after_fault(self, ucs: Iterable[Uc]) -> None:
        """A fault came through the window: flush, so the next access to that page fills
        again. A fill first restores the CPU state at the accessing instruction, which
        keeps a later fault's pc exact even when a trap hook wrote pc in this run (Unicorn
        then skips that restore in its memory hooks), and the page's translation to its
        window slot is gone before the slot can name another page."""
        self.flush(ucs)
