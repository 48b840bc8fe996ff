"""Small C libraries the layers build with the host compiler at first use (the cycle
model's block counter, the preemption hook, the kprobe dispatcher): one cache directory,
one builder, one loader. Each library's file name carries the host machine and a digest of
its source, so an edit or another host never loads a stale build."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable


def cache_dir() -> Path:
    env = os.environ.get("KPROBE_EMU_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kprobe-emu"


def address_of(fn: Any) -> int:
    """The address of a function of a loaded library (to register it as a native hook)."""
    addr = ctypes.cast(fn, ctypes.c_void_p).value
    if addr is None:
        raise ValueError("null native function")
    return addr


def library_path(source: Path, stem: str) -> Path:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"{stem}-{platform.machine()}-{digest}.so"


def build_library(source: Path, path: Path) -> bool:
    """Compile `source` into the shared library `path`; False without a compiler or on an
    error (the caller then takes its Python path)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses (pytest -n) never see a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(source)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return False
        os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(source: Path, stem: str) -> ctypes.CDLL | None:
    """The library built from `source` (built first if the cache lacks it); None if it
    cannot be built or loaded."""
    path = library_path(source, stem)
    try:
        if not path.exists() and not build_library(source, path):
            return None
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def cached_library(source: Path, stem: str, declare: Callable[[ctypes.CDLL], None] | None = None,
                   enabled: Callable[[], bool] | None = None) -> Callable[[], ctypes.CDLL | None]:
    """A layer's `load()`: its library built and loaded at the first call, once per process
    (`declare` gives its functions their argtypes), the same object afterwards; None while
    `enabled()` says no, and for good when it cannot be built."""
    loaded: list[ctypes.CDLL | None] = []

    def load() -> ctypes.CDLL | None:
        if enabled is not None and not enabled():
            return None
        if not loaded:
            lib = load_library(source, stem)
            if lib is not None and declare is not None:
                declare(lib)
            loaded.append(lib)
        return loaded[0]
    return load
