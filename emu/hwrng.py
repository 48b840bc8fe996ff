"""Deterministic hardware randomness: x86 RDRAND/RDSEED seeded by --seed, like getrandom.

Unicorn 2.1.4 gives no hook for RDRAND/RDSEED: its helper calls qemu_guest_getrandom, which
reads a generator seeded from the host. At first use this module redirects that function
(found through the exported helper_rdrand_x86_64, which calls it) to cm_guest_getrandom in
emu/cycles/native.c: an absolute jump written over its first instruction, in the process's
own copy of libunicorn. Each machine owns a splitmix64 stream and selects it before a run.

Where the redirect is impossible (no C compiler, a host that is not x86-64, a Unicorn other
than the pinned 2.1.4, a helper that does not look as expected), `available()` is False and RDRAND stays host-random;
the arm64 CPU model has no RNDR, so arm64 guests have no hardware random instruction."""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import platform

from emu.cycles import native

PINNED_UNICORN = "2.1.4"
_STATE: dict[str, object] = {}


class CmRng(ctypes.Structure):
    _fields_ = [("state", ctypes.c_uint64), ("draws", ctypes.c_uint64)]


def _getrandom_address(helper: int) -> int | None:
    """The target of the first `call rel32` in helper_rdrand_x86_64 (after `mov esi, 8`)."""
    code = ctypes.string_at(helper, 48)
    at = code.find(b"\xbe\x08\x00\x00\x00")
    call = code.find(b"\xe8", at) if at >= 0 else -1
    if call < 0 or call + 5 > len(code):
        return None
    rel = int.from_bytes(code[call + 1:call + 5], "little", signed=True)
    return helper + call + 5 + rel


def _redirect(target: int, to: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = target & ~(mmap.PAGESIZE - 1)
    rwx = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    if libc.mprotect(page, 2 * mmap.PAGESIZE, rwx) != 0:
        return False
    stub = b"\x48\xb8" + to.to_bytes(8, "little") + b"\xff\xe0"      # movabs rax, to; jmp rax
    ctypes.memmove(target, stub, len(stub))
    libc.mprotect(page, 2 * mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC)
    return True


def _install():
    if "lib" in _STATE:
        return _STATE["lib"]
    _STATE["lib"] = None
    lib = native.load()
    if lib is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    import unicorn
    if unicorn.__version__ != PINNED_UNICORN:     # the code read below is this build's
        return None
    from emu.ucfast import lib_symbol
    helper = lib_symbol("helper_rdrand_x86_64")
    if helper is None:
        return None
    target = _getrandom_address(helper)
    ours = ctypes.cast(lib.cm_guest_getrandom, ctypes.c_void_p).value
    if target is None or not _redirect(target, ours):
        return None
    lib.cm_rng_select.argtypes = [ctypes.POINTER(CmRng)]
    lib.cm_rng_select.restype = None
    _STATE["lib"] = lib
    return lib


def available() -> bool:
    return _install() is not None


class GuestRandom:
    """One machine's hardware random stream. `draws`: 8-byte words the guest took."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = CmRng()
        self.seed(seed)
        self._lib = _install()

    def seed(self, seed: int) -> None:
        digest = hashlib.sha256(b"hwrng:" + str(seed).encode()).digest()
        self.rng.state = int.from_bytes(digest[:8], "little")
        self.rng.draws = 0

    @property
    def draws(self) -> int:
        return self.rng.draws

    def select(self) -> None:
        """Make this stream the one RDRAND reads (before every run of the machine)."""
        if self._lib is not None:
            self._lib.cm_rng_select(ctypes.byref(self.rng))
