"""The native block counter (native.c): built with gcc into a cache directory at first use,
loaded with ctypes. `load()` returns None when no compiler is available; the cycle model
then counts blocks with a Python hook (same numbers, ~100x slower per block).

Cache: $KPROBE_EMU_CACHE, else $XDG_CACHE_HOME/kprobe-emu, else ~/.cache/kprobe-emu; the
library's name carries a hash of the C source, so an edited source is rebuilt."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, ClassVar

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


def address_of(fn: Any) -> int:
    """The address of a function of the loaded library (to register it as a native hook)."""
    addr = ctypes.cast(fn, ctypes.c_void_p).value
    if addr is None:
        raise ValueError("null native function")
    return addr


def cache_dir() -> Path:
    env = os.environ.get("KPROBE_EMU_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kprobe-emu"


def _lib_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"cyclecount-{platform.machine()}-{digest}.so"


def build(path: Path) -> bool:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses (pytest -n) never see a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return False
        os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_LIB: ctypes.CDLL | None = None
_TRIED = False


def load() -> ctypes.CDLL | None:
    """The loaded library, building it first if needed; None if that is not possible."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    if os.environ.get("KPROBE_EMU_NO_NATIVE"):
        return None
    path = _lib_path()
    try:
        if not path.exists() and not build(path):
            return None
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
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
    _LIB = lib
    return lib
