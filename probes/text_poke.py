"""Patching live text with other CPUs running it (arch/x86/kernel/alternative.c
text_poke_bp, arch/arm64/kernel/patching.c aarch64_insn_patch_text).

`text_poke_live(machine, addr, data)` is the one path kprobes, optprobes, ftrace sites and
jump labels patch guest text through. A poke becomes a plan of steps, each step one or
more writes through `Machine.text_poke`. Every CPU has its own Unicorn and translation
cache: a step's write drops the patching CPU's translations of the range only, and each
other CPU drops its own when it syncs, so until then it may run the text it translated
before, as a CPU that has not yet serialised runs what it fetched.

The arch answers the plan and the emulation (probes/arch/<arch>/text_poke.py):

* x86, more than one byte (text_poke_bp): int3 on the first byte; sync; the tail; sync;
  the first byte; sync. A CPU that hits the int3 meanwhile has the new instruction emulated
  (poke_int3_handler: jmp, call, ret, nop; an int3 goes on to its owner, a kprobe).
* arm64: one aligned instruction is one atomic 32-bit write (patch_text_nosync); several
  instructions are written under stop_machine: one step, every other CPU parked.
* `PokeMode.NAIVE` (a demonstration): one byte per step, nothing else, which is what a
  plain memcpy over code another CPU is running amounts to.

A sync is the kernel's text_poke_sync: every other CPU with work passes a serialising
point (the IPI), and there drops its translations of the poked range. Here a CPU has
synced when its turn ends (emu/smp.py), an idle one at once, so between two steps every
other busy CPU runs one turn and may execute the text as it stands. With one CPU, or when
the guest is not running, nothing runs between steps and a plan is written at once. A poke
that meets one still in flight on the same bytes first finishes the older one (the
kernel's text_mutex); so does the end of a run."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import StrEnum

from emu.machine import Machine


class PokeMode(StrEnum):
    PROTOCOL = "protocol"        # text_poke_bp / patch_text (the kernel's)
    NAIVE = "naive"              # byte by byte, no breakpoint, no sync (demonstration)


Write = tuple[int, bytes]


@dataclass
class PokeOp:
    """One poke in flight: `steps` left to write, the CPU that patches, the CPUs that
    still have to sync before the next step, and the trap owner the int3 displaced."""
    addr: int
    old: bytes
    new: bytes
    steps: list[list[Write]]
    patcher: int
    pending: set[int] = field(default_factory=set)
    emulate: bool = False
    displaced: object = None

    @property
    def end(self) -> int:
        return self.addr + len(self.new)


class TextPoker:
    """The machine's live patcher: its plans, the pokes in flight and their int3 handler.
    Get it with `text_poker_of(machine)`."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.mode = PokeMode.PROTOCOL
        from probes.arch import IMPLS
        self.arch = importlib.import_module(f"{IMPLS[machine.arch.name]}.text_poke")
        self.inflight: list[PokeOp] = []
        self.pokes = 0                  # pokes made while other CPUs ran
        self.emulated = 0               # CPUs that met a poke's int3 and were let through
        # cpu -> ranges written since it last synced (its translations may be stale)
        self.stale: dict[int, list[tuple[int, int]]] = {}
        self._cpu = machine.cpu
        machine.cpu_listeners.append(self._cpu_switched)
        machine.stop_listeners.append(self._run_stopped)
        machine.fault_notifiers.append(self._name_torn_fault)

    # --- plans -----------------------------------------------------------------------------
    def plan(self, addr: int, data: bytes) -> tuple[list[list[Write]], bool]:
        """The steps of a poke and whether CPUs meeting it need the int3 emulation."""
        if self.mode is PokeMode.NAIVE:
            return [[(addr + i, data[i:i + 1])] for i in range(len(data))], False
        return self.arch.poke_steps(addr, data)

    # --- poking ----------------------------------------------------------------------------
    def poke(self, addr: int, data: bytes) -> None:
        self.settle(addr, len(data))
        if not self._concurrent():            # nothing runs between steps: all at once
            self.m.text_poke(addr, bytes(data))
            return
        steps, emulate = self.plan(addr, bytes(data))
        self.pokes += 1
        if len(steps) == 1:
            self._write(steps[0])
            return
        op = PokeOp(addr, self.m.memory.read(addr, len(data)), bytes(data), steps, self.m.cpu,
                    emulate=emulate)
        if emulate:
            op.displaced = self.m.break_addrs.get(addr)
            self.m.register_break_addr(addr, self._poke_int3_handler)
        self.inflight.append(op)
        self._advance(op)

    def settle(self, addr: int, size: int) -> None:
        """Finish every poke in flight over [addr, addr+size) (text_mutex)."""
        for op in [o for o in self.inflight if o.addr < addr + size and addr < o.end]:
            while op.steps:
                self._write(op.steps.pop(0))
            self._done(op)

    def _concurrent(self) -> bool:
        """Other CPUs could run between two steps: several busy CPUs, inside a run."""
        return self.m.running and len(self.m.busy_cpus() - {self.m.cpu}) > 0

    def _write(self, step: list[Write], live: bool = False) -> None:
        """Write one step: at once for every CPU, or (`live`) for the patching CPU only,
        the others' translations of it stale until each syncs."""
        for addr, data in step:
            self.m.text_poke(addr, data, sync=not live)
            if live:
                for cpu in range(self.m.nr_cpus):
                    if cpu != self.m.cpu:
                        self.stale.setdefault(cpu, []).append((addr, addr + len(data)))
        if not live:
            self._sync_all()

    def _sync(self, cpu: int) -> None:
        """CPU `cpu` serialises: its translations of the text poked meanwhile are dropped."""
        for lo, hi in self.stale.pop(cpu, ()):
            self.m.flush_code(lo, hi, cpu)

    def _sync_all(self) -> None:
        for cpu in list(self.stale):
            self._sync(cpu)

    def _advance(self, op: PokeOp) -> None:
        """Write the next step, then wait for every other busy CPU to sync (an idle one
        does at once); after the last step too, before the int3 handler goes (a CPU may
        still run its old translation with the int3 until then)."""
        self._write(op.steps.pop(0), live=True)
        busy = self.m.busy_cpus()
        for cpu in [c for c in self.stale if c not in busy]:
            self._sync(cpu)
        op.pending = busy - {op.patcher}
        if not op.pending:
            self._done(op)

    def _done(self, op: PokeOp) -> None:
        if op in self.inflight:
            self.inflight.remove(op)
        if op.emulate and self.m.break_addrs.get(op.addr) == self._poke_int3_handler:
            if op.displaced is None:
                self.m.unregister_break_addr(op.addr)
            else:
                self.m.register_break_addr(op.addr, op.displaced)   # type: ignore[arg-type]

    def _cpu_switched(self, cpu: int) -> None:
        """The CPU that ran a turn has passed a serialising point (it synced)."""
        left, self._cpu = self._cpu, cpu
        if not self.stale and not self.inflight:  # nothing poked since the last syncs
            return
        busy = self.m.busy_cpus()
        for c in [c for c in self.stale if c == left or c not in busy]:
            self._sync(c)
        for op in list(self.inflight):
            op.pending.discard(left)
            op.pending &= busy                  # an idle CPU runs nothing stale
            if op.pending:
                continue
            if op.steps:
                self._advance(op)
            else:
                self._done(op)

    def _name_torn_fault(self, fault) -> None:
        """A CPU faulted on bytes a poke is half-way through: say what it executed."""
        op = next((o for o in self.inflight if o.addr <= fault.pc < o.end), None)
        if op is not None:
            now = self.m.memory.read(op.addr, len(op.new))
            fault.kind += (f" (a torn instruction: {now.hex()} while {op.old.hex()} was being "
                           f"rewritten to {op.new.hex()})")

    def _run_stopped(self) -> None:
        if not self.m.running:
            for op in list(self.inflight):
                self.settle(op.addr, len(op.new))
            self._sync_all()

    # --- poke_int3_handler -----------------------------------------------------------------
    def _poke_int3_handler(self, addr: int) -> bool:
        op = next((o for o in self.inflight if o.addr == addr), None)
        if op is None or op.new.startswith(self.m.arch.breakpoint):
            owner = op.displaced if op is not None else None
            return bool(owner(addr)) if owner is not None else False   # type: ignore[operator]
        self.emulated += 1
        return bool(self.arch.poke_emulate(self.m, addr, op.new))


def text_poker_of(machine: Machine) -> TextPoker:
    poker: TextPoker = machine.layer("text_poke", TextPoker)
    return poker


def text_poke_live(machine: Machine, addr: int, data: bytes) -> None:
    """Patch text the guest may be running (see the module docstring)."""
    text_poker_of(machine).poke(addr, data)


def _register_snapshot_layer() -> None:
    """A snapshot may be taken after live pokes (a static key flipped before it): between
    runs none is in flight, so the mode and the counters are the whole state."""
    from emu.snapshot import LayerHooks, register_snapshot_layer

    def take(poker: TextPoker) -> tuple[PokeMode, int, int]:
        return poker.mode, poker.pokes, poker.emulated

    def restore(_m: Machine, poker: TextPoker, state: tuple[PokeMode, int, int]) -> None:
        poker.inflight.clear()
        poker.stale.clear()
        poker.mode, poker.pokes, poker.emulated = state
        poker._cpu = poker.m.cpu

    register_snapshot_layer("text_poke", LayerHooks(take, restore))


_register_snapshot_layer()
