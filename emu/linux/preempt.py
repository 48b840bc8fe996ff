"""The native side of preemption (preempt.c): built with the host C compiler into the
cache directory the cycle model's library uses, loaded with ctypes; None without a
compiler (the scheduler then uses a Python block hook, ~100x slower per block)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, ClassVar

from emu.native_lib import cached_library

SOURCE = Path(__file__).with_name("preempt.c")
SLOW_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)
NO_TIMER = (1 << 64) - 1


class PreState(ctypes.Structure):
    budget: int
    clock_fp: Any
    due_fp: int
    slow: Any
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("budget", ctypes.c_int64), ("clock_fp", ctypes.c_void_p), ("due_fp", ctypes.c_uint64),
        ("slow", SLOW_CB)]


# the preemption hook, built first if needed; None under KPROBE_EMU_NO_NATIVE or not buildable
load = cached_library(SOURCE, "preempt",
                      enabled=lambda: not os.environ.get("KPROBE_EMU_NO_NATIVE"))


def clock_fp_address(clock) -> int | None:
    """The address of the clock's native accumulator (the work clock's or the cycle
    model's counter), or None while time moves only with syscalls and traps."""
    acc = clock.acc
    if isinstance(acc, ctypes.Structure):
        return ctypes.addressof(acc) + type(acc).fp.offset
    return None
