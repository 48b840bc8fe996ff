"""The clock's default source: guest time moves with the code the guest executes.

Without the cycle model (`--cycles`), from the first time the guest or a trace reads the
clock, every executed block advances it by one cycle per BYTES_PER_CYCLE bytes of its code:
exactly one cycle per instruction on arm64, about one per instruction on x86-64 (whose
instructions average near 4 bytes). Syscalls, traps and counter reads add their fixed costs
(emu/clock.py) on top. Starting at the first read keeps guests that never look at the time
at full speed (the hook costs 3-6 ns per block); differences between reads, which is what
time means to a program, count all the work between them. The native block counter
(native.c, cm_on_block_bytes) does the counting, ~1 ns per block with no Python; a block is
charged whole when it starts, so the sum is the code executed however Unicorn cuts it into
blocks, and two runs of the same guest read the same times. Without a C compiler there is
no work clock (time moves with syscalls and traps only): a Python block hook would cost
~270 ns per block."""
from __future__ import annotations

import ctypes

from emu.clock import FP_SHIFT
from emu.cycles import native
from emu.native_lib import address_of

BYTES_PER_CYCLE = 4
LAYER = "work-clock"


class WorkClock:
    """The native byte counter attached to one machine's clock (`machine.layers["work-clock"]`
    until the cycle model replaces it)."""

    def __init__(self, machine, lib) -> None:
        self.m, self.lib = machine, lib
        clock = machine.clock
        st = self.state = native.CmState()
        st.fp = clock.acc.fp
        st.byte_cost = (1 << FP_SHIFT) // BYTES_PER_CYCLE
        clock.acc = st                  # the clock and the hook share one counter
        clock.model_counts = self.counts
        self.handle: int | None = machine.hooks.native_block(
            address_of(lib.cm_on_block_bytes), ctypes.addressof(st))

    @classmethod
    def attach(cls, machine) -> "WorkClock | None":
        lib = native.load()
        if lib is None:
            return None
        work = machine.layers[LAYER] = cls(machine, lib)
        return work

    def detach(self) -> None:
        """Stop counting (the cycle model takes over the clock from the same value)."""
        if self.handle is not None:
            self.m.hooks.delete(self.handle)
            self.handle = None
            if self.m.clock.model_counts == self.counts:
                self.m.clock.model_counts = None

    def counts(self) -> dict[str, int]:
        """code_fp (1/256 cycles charged for code) and the code bytes executed."""
        return {"code_fp": self.state.bytes * self.state.byte_cost, "code_bytes": self.state.bytes}
