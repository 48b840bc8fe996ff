"""The native block counter (native.c): built with gcc into a cache directory at first use,
loaded with ctypes. `load()` returns None when no compiler is available; the cycle model
then counts blocks with a Python hook (same numbers, ~100x slower per block).

Cache: $KPROBE_EMU_CACHE, else $XDG_CACHE_HOME/kprobe-emu, else ~/.cache/kprobe-emu; the
library's name carries a hash of the C source, so an edited source is rebuilt."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, ClassVar

from emu.native_lib import cached_library

SOURCE = Path(__file__).with_name("native.c")

MISS_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)


class CmEntry(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("cost", ctypes.c_uint64), ("count", ctypes.c_uint64),
                ("size", ctypes.c_uint32), ("n", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class CmState(ctypes.Structure):
    """cm_state of native.c (field for field)."""
    # The fields Python reads and writes, for type checkers (ctypes makes them from _fields_).
    fp: int
    prev_end: int
    taken_cost: int
    mispredict_cost: int
    taken: int
    mispredicts: int
    limit_fp: int
    stop: int | None
    limit_hit: int
    byte_cost: int
    bytes: int
    loop_cost: int
    loop_max: int
    loops: int
    table: int | None
    cur: Any
    miss: Any
    _fields_: ClassVar[list[tuple[str, Any]]] = [(name, ctypes.c_uint64) for name in (
        "fp", "prev_end", "taken_cost", "mispredict_cost", "taken", "mispredicts", "misses",
        "unknown", "count", "mask")] + [
        ("gone", ctypes.c_uint64 * 4), ("table", ctypes.c_void_p),
        ("cur", ctypes.POINTER(CmEntry)), ("miss", MISS_CB),
        ("limit_fp", ctypes.c_uint64), ("stop", ctypes.c_void_p), ("limit_hit", ctypes.c_uint64),
        ("byte_cost", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
        ("loop_cost", ctypes.c_uint64), ("loop_max", ctypes.c_uint64), ("loops", ctypes.c_uint64)]


def _declare(lib: ctypes.CDLL) -> None:
    P = ctypes.POINTER(CmState)
    lib.cm_init.argtypes = [P, ctypes.c_uint64]
    lib.cm_free.argtypes = [P]
    lib.cm_insert.argtypes = [P, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32,
                              ctypes.c_uint32]
    lib.cm_invalidate.argtypes = [P, ctypes.c_uint64, ctypes.c_uint64]
    lib.cm_totals.argtypes = [P, ctypes.POINTER(ctypes.c_uint64)]
    lib.cm_totals.restype = None
    for fn in (lib.cm_init, lib.cm_insert, lib.cm_invalidate):
        fn.restype = ctypes.c_int
    lib.cm_free.restype = None


# the block counter, built first if needed; None under KPROBE_EMU_NO_NATIVE or not buildable
load = cached_library(SOURCE, "cyclecount", _declare,
                      lambda: not os.environ.get("KPROBE_EMU_NO_NATIVE"))
