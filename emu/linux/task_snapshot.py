"""Snapshots of a threaded guest: the snapshot layer "tasks" (emu/snapshot.py
register_snapshot_layer) keeps the process's tasks, their scheduler and its signal state,
so `machine.restore(snap)` of a multi-threaded guest continues exactly as the straight run.

Kept: every task (its saved register context, state, the futex or sleep it waits in with
its deadline, wake result, robust list, clear-tid address, signal mask, pending signals,
altstack, the call it may restart, its CPU), the scheduler's counters and rotation (the
quantum or turn budget left, the seed-drawn turn generator, the last task each CPU ran, the
placement counter, wait-queue order), the process's dispositions, process-directed pending
signals and timers, and whether the preemption hook was armed. The running task's registers
are the machine's CPU context, which the snapshot keeps anyway.

A saved Unicorn context is never written after context_save (a switch saves a new one), so
the snapshot and the live tasks share them; everything else is copied, on take and again on
each restore, so one snapshot restores any number of times. The Scheduler's and Task's
fields are copied generically (a field added to either is kept without a change here);
only the scheduler's links to the machine and its hook handles are not state."""
from __future__ import annotations

import copy
import ctypes
from dataclasses import dataclass
from typing import Any

from unicorn.unicorn import UcContext

from emu.machine import Machine
from emu.snapshot import LayerHooks, register_snapshot_layer

LAYER = "tasks"
# Scheduler attributes that are wiring, not state: its machine and constants, the hooks
# other layers hung on it, the Signals it delivers through (kept below), the preemption
# hook's handles (re-made on restore from `armed`).
_WIRING = frozenset({"machine", "ret_reg", "pid", "seed", "nr_cpus", "step", "on_exit",
                     "timers", "_hook", "_native", "_slow"})
_SIGNAL_STATE = ("actions", "shared", "timers")
# Values kept by reference: saved Unicorn contexts and ctypes data.
_OPAQUE = (UcContext, ctypes._SimpleCData, ctypes.Structure, ctypes.Array)


@dataclass(frozen=True)
class TaskSetState:
    """The scheduler's state (its attributes but the wiring), the Signals' state, the
    preemption budget left and whether the preemption hook was on."""
    sched: dict[str, Any]
    signals: dict[str, Any]
    budget: int
    armed: bool


def _shared(sched: Any, tasks: Any) -> dict[int, Any]:
    """A deepcopy memo of the objects shared, not copied: the machine, the Signals, and
    every saved register context or ctypes value of `tasks` (immutable once saved)."""
    memo: dict[int, Any] = {id(sched.machine): sched.machine}
    if sched.timers is not None:
        memo[id(sched.timers)] = sched.timers
    for task in tasks:
        for value in vars(task).values():
            if isinstance(value, _OPAQUE):
                memo[id(value)] = value
    return memo


def _budget(sched: Any) -> int:
    """Code left in the current quantum or turn: the native hook counts it down in its own
    struct and hands it back only on its slow path."""
    native = getattr(sched, "_native", None)
    return int(native.budget) if native is not None else int(sched._budget)


def take_tasks(sched: Any) -> TaskSetState:
    state = {k: v for k, v in vars(sched).items() if k not in _WIRING}
    sigs = sched.timers
    signals = {k: getattr(sigs, k) for k in _SIGNAL_STATE} if sigs is not None else {}
    # One deepcopy for the whole state: `current` stays the same object as its table entry.
    kept = copy.deepcopy(state, _shared(sched, sched.tasks.values()))
    return TaskSetState(kept, copy.deepcopy(signals), _budget(sched),
                        getattr(sched, "_hook", None) is not None)


def restore_tasks(m: Machine, sched: Any, st: TaskSetState) -> None:
    """After memory and the registries are back (the hooks added since are gone)."""
    state = copy.deepcopy(st.sched, _shared(sched, st.sched.get("tasks", {}).values()))
    for key, value in state.items():
        setattr(sched, key, value)
    if sched.timers is not None:
        for key, value in copy.deepcopy(st.signals).items():
            setattr(sched.timers, key, value)
    _restore_preemption(m, sched, st)


def _restore_preemption(m: Machine, sched: Any, st: TaskSetState) -> None:
    """The preemption hook as it was: kept if it survived, dropped if made since (the
    registries' restore already deleted its hook), made again if it ended since."""
    if sched._hook is not None and sched._hook not in m.hooks.installed:
        sched._hook, sched._native, sched._slow = None, None, None
    if st.armed and sched._hook is None:
        # Arming draws a new turn from the seed: keep the restored one and its generator.
        turns, turn_end = copy.deepcopy(sched._turns), sched._turn_end
        sched._arm_preemption()
        sched._turns, sched._turn_end = turns, turn_end
    elif not st.armed and sched._hook is not None:
        sched._disarm_preemption()
    sched._budget = st.budget
    sched._sync_native()


register_snapshot_layer(LAYER, LayerHooks(take_tasks, restore_tasks))
