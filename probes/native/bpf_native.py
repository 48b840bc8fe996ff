"""The BPF hash maps' storage and the helper trampoline's host entry in C (bpf_native.c,
issue 17), built with the system cc into the per-user cache at first use and loaded with
ctypes, as probes/native builds kprobe_native.c. ``KPROBE_EMU_NATIVE=0`` or no C compiler:
``load()`` is None, hash maps keep their Python storage and every helper call its Python
host entry, with the same results."""
from __future__ import annotations

import ctypes
import weakref
from pathlib import Path
from typing import Any, ClassVar

from emu.native_lib import load_library

from . import enabled

SOURCE = Path(__file__).with_name("bpf_native.c")
PREALLOC_LIMIT = 64 << 20      # bytes: a larger hash map keeps the Python storage (on demand)


class BnHtab(ctypes.Structure):
    """struct bn_htab, field for field."""
    key_size: int
    value_size: int
    vstride: int
    ncpus: int
    max_entries: int
    count: int
    keys: int
    values: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        (n, ctypes.c_uint32) for n in ("key_size", "value_size", "vstride", "ncpus",
                                       "max_entries", "nbuckets", "count", "lru", "head",
                                       "tail", "free_head", "pad")] + [
        (n, ctypes.c_void_p) for n in ("bucket", "chain", "onext", "oprev", "keys", "values")]


class BnMap(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, Any]]] = [("handle", ctypes.c_uint64),
                                                 ("htab", ctypes.c_void_p)]


class BnImage(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("maps", ctypes.c_void_p),
        ("nmaps", ctypes.c_uint64)]


class BnJit(ctypes.Structure):
    """struct bn_jit: one ScratchJit's C side."""
    helper_cycles: int
    executing: int
    served: int
    deferred: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("reg_read", ctypes.c_void_p), ("reg_write", ctypes.c_void_p),
        ("mem_read", ctypes.c_void_p), ("fp", ctypes.c_void_p), ("handler_fp", ctypes.c_void_p),
        ("helper_cycles", ctypes.c_uint64), ("args", ctypes.c_int32 * 5),
        ("ret_reg", ctypes.c_int32), ("link_reg", ctypes.c_int32), ("sp_reg", ctypes.c_int32),
        ("call_size", ctypes.c_uint32), ("executing", ctypes.c_uint32),
        ("stack_lo", ctypes.c_uint64), ("stack_hi", ctypes.c_uint64),
        ("images", ctypes.c_void_p), ("nimages", ctypes.c_uint64),
        ("served", ctypes.c_uint64), ("deferred", ctypes.c_uint64)]


class BnStub(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("j", ctypes.c_void_p), ("orig", ctypes.c_void_p), ("orig_data", ctypes.c_void_p),
        ("fid", ctypes.c_uint64)]


_LIB: ctypes.CDLL | None = None
_TRIED = False


def load() -> ctypes.CDLL | None:
    """The library, built first if needed; None when disabled or not buildable."""
    global _LIB, _TRIED
    if not enabled():
        return None
    if _TRIED:
        return _LIB
    _TRIED = True
    lib = load_library(SOURCE, "bpf-native")
    if lib is None:
        return None
    vp, u8p = ctypes.c_void_p, ctypes.c_char_p
    for name, args, res in (
            ("bn_htab_new", [ctypes.c_uint32] * 5, vp),
            ("bn_htab_free", [vp], None),
            ("bn_htab_find", [vp, u8p, ctypes.c_uint32], ctypes.c_int64),
            ("bn_htab_update", [vp, u8p, u8p, ctypes.c_uint64, ctypes.c_int64], ctypes.c_int64),
            ("bn_htab_delete", [vp, u8p], ctypes.c_int64),
            ("bn_htab_next", [vp, u8p], ctypes.c_int64)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    _LIB = lib
    return lib


class NativeHtab:
    """A hash map's elements in C (struct bn_htab): preallocated slots, each a key and one
    value per CPU; ``value(slot, cpu)`` is a writable view of the pool (one object per
    slot and CPU, so a program's region for it stays the same while the slot lives).
    Attributes: ``ptr`` (the struct bn_htab *, for the helper entry), ``lib``."""

    def __init__(self, lib: ctypes.CDLL, ptr: int) -> None:
        self.lib, self.ptr = lib, ptr
        self.h = BnHtab.from_address(ptr)
        h = self.h
        self._keys = memoryview((ctypes.c_char * (h.max_entries * h.key_size or 1))
                                .from_address(h.keys)).cast("B")
        size = h.max_entries * h.ncpus * (h.vstride or 8)
        self._values = memoryview((ctypes.c_char * size).from_address(h.values)).cast("B")
        self._views: dict[int, memoryview] = {}
        weakref.finalize(self, lib.bn_htab_free, ptr)

    @classmethod
    def new(cls, key_size: int, value_size: int, max_entries: int, ncpus: int,
            lru: bool) -> "NativeHtab | None":
        lib = load()
        size = max_entries * (key_size + ncpus * ((value_size + 7) & ~7) + 16)
        if lib is None or size > PREALLOC_LIMIT:
            return None
        ptr = lib.bn_htab_new(key_size, value_size, max_entries, ncpus, int(lru))
        return cls(lib, ptr) if ptr else None

    def __len__(self) -> int:
        return int(self.h.count)

    def find(self, key: bytes, touch: bool) -> int:
        return int(self.lib.bn_htab_find(self.ptr, key, int(touch)))

    def key(self, slot: int) -> bytes:
        ks = self.h.key_size
        return bytes(self._keys[slot * ks:(slot + 1) * ks])

    def value(self, slot: int, cpu: int) -> memoryview:
        idx = slot * self.h.ncpus + cpu
        view = self._views.get(idx)
        if view is None:
            off = idx * self.h.vstride
            view = self._views[idx] = self._values[off:off + self.h.value_size]
        return view

    def update(self, key: bytes, value: bytes, flags: int, cpu: int | None) -> int:
        return int(self.lib.bn_htab_update(self.ptr, key, value, flags & (2**64 - 1),
                                           -1 if cpu is None else cpu))

    def delete(self, key: bytes) -> int:
        return int(self.lib.bn_htab_delete(self.ptr, key))

    def next(self, key: bytes | None) -> int:
        """The slot of the key after ``key`` (the first: None or absent), or -ENOENT."""
        return int(self.lib.bn_htab_next(self.ptr, key))
