"""Several vCPUs: the deterministic CPU turns and per-CPU variables.

`--cpus N` gives the guest N CPUs, each its own Unicorn instance over one guest memory
(host buffers every Uc maps, emu/memory.py) with every hook on every Uc (RawHooks,
Machine.for_each_uc) and its own translation cache, which a text poke flushes on every CPU
(Machine.flush_code). The host runs one CPU at a time (Machine.use_cpu hands the run from
one Uc to the next), so CPUs interleave in turns of modelled cycles whose lengths are drawn
from the seed: the interleaving is a pure function of the inputs and `--seed`.

`PerCpu` is DEFINE_PER_CPU: one value per CPU, `this_cpu` follows the CPU that runs."""
from __future__ import annotations

import random
from typing import Callable, Generic, TypeVar

from emu.machine import Machine

MAX_CPUS = 64          # one word of sched_getaffinity's mask
# A CPU's turn: TURN_CYCLES of modelled time (about as many instructions; the work clock
# counts 4 code bytes a cycle) plus a part the seed draws for each turn, so different
# seeds interleave the CPUs differently.
TURN_CYCLES = 2 << 10

T = TypeVar("T")


class CpuTurns:
    """The lengths of successive CPU turns, in modelled cycles: a pure function of the seed."""

    def __init__(self, seed: int, base: int = TURN_CYCLES) -> None:
        self._rng = random.Random(seed ^ 0x5D1C_0C95)
        self.base = base

    def next(self) -> int:
        return self.base + self._rng.randrange(self.base)


class PerCpu(Generic[T]):
    """One `factory()` value per CPU of `machine`; `this_cpu` is the running CPU's, and
    `on_switch` (given the new value) runs whenever another CPU's context is loaded."""

    def __init__(self, machine: Machine, factory: Callable[[], T],
                 on_switch: Callable[[T], None] | None = None) -> None:
        self.machine = machine
        self._factory = factory
        self._values: list[T] = [factory() for _ in range(max(1, machine.nr_cpus))]
        self._on_switch = on_switch
        machine.cpu_listeners.append(self._switched)

    def __getitem__(self, cpu: int) -> T:
        while cpu >= len(self._values):          # --cpus set after this was made
            self._values.append(self._factory())
        return self._values[cpu]

    def __len__(self) -> int:
        return max(len(self._values), self.machine.nr_cpus)

    @property
    def this_cpu(self) -> T:
        return self[self.machine.cpu]

    def _switched(self, cpu: int) -> None:
        if self._on_switch is not None:
            self._on_switch(self[cpu])
