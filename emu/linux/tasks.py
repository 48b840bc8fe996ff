"""Tasks (threads of the one guest process) and the deterministic scheduler that runs them
on the machine's vCPUs (emu/smp.py), each CPU its own Unicorn (one with `--cpus 1`).

A task not running keeps its whole CPU state as a Unicorn context (registers, FP/SIMD,
TLS). Switches happen inside a syscall hook or a block hook, where every task not running
was saved: the x86 syscall hook sees RIP on the `syscall` (the CPU adds its length
afterwards) and arm64's sees PC past the `svc`, so a restored context resumes right after
its own syscall. A switch loads the next task into its CPU's Uc; when that is another
CPU's, the running Uc stops and the run goes on on that one (Machine.use_cpu). The
schedule depends only on the guest's code, its syscalls and the seed, never on host time:
a task runs until it blocks (futex, sleep, pause), yields, or has run its quantum of code
bytes (QUANTUM_BYTES plus a part the seed picks), counted by a block hook that exists only
while two tasks live or a signal timer is armed.

When every task is blocked, model time jumps to the earliest futex timeout, sleep or
timer; with none, nothing can ever run again: the run ends as a limit (exit 124, one
`emu: deadlock: ...` line), as a guest blocked for ever on a pipe does.

With N CPUs (`--cpus N`) tasks are placed on CPUs round robin at creation (Task.cpu) and
each CPU runs its own tasks round robin. The CPUs take turns: a turn ends after a
seed-drawn quantum of modelled cycles (emu/smp.py CpuTurns; the cycle model's with
`--cycles`, else the work clock's, which starts with the second task) or when its task
blocks or yields, and the next CPU in id order with a runnable task runs next. Everything
the clock charges during a turn uses it up: the task's code, and the probe layer's slots,
trampolines, traps and handlers run for it. With one CPU the turn is the quantum."""
from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable

from emu.clock import FP_SHIFT
from emu.cycles.work import BYTES_PER_CYCLE
from emu.native_lib import address_of
from emu.linux import preempt
from emu.machine import Machine
from emu.memory import PROT_EXEC
from emu.smp import CpuTurns

ETIMEDOUT = 110
EINTR = 4
# A blocked call's result when it must run again (include/linux/errno.h): ERESTARTSYS when
# a signal interrupted it (restarted only if the handler has SA_RESTART, else EINTR),
# ERESTARTNOINTR when what it waited for happened (always run again).
ERESTARTSYS, ERESTARTNOINTR = 512, 513
# The quantum: code bytes a task runs before it is preempted (about 4 bytes an instruction),
# QUANTUM_BYTES plus a seed-chosen part of it, so that --seed varies the interleaving.
QUANTUM_BYTES = 64 << 10


class TurnUnit(StrEnum):
    """What a CPU's turn (several CPUs) is measured in."""
    CYCLES = "cycles"      # modelled time: all the clock charges, probe traps and handlers too
    # Code bytes executed, whoever's (slots included), blind to what traps and handlers
    # cost: the sweep compares probed runs with unprobed ones, which needs one schedule.
    CODE = "code"


class TaskState(StrEnum):
    RUNNING = "running"
    RUNNABLE = "runnable"
    BLOCKED = "blocked"          # in a futex wait (or another wait with a wake-up condition)
    EXITED = "exited"


@dataclass
class FutexWait:
    """What a blocked task waits for: a futex word (the key: one process, one address
    space), the bitset of FUTEX_WAIT_BITSET, and a deadline in modelled ns (or None)."""
    key: int
    bitset: int = 0xFFFFFFFF
    deadline_ns: int | None = None
    timeout_result: int = -ETIMEDOUT        # a sleep (key -1, no waker) returns 0
    restart: bool = False                   # a signal makes it -ERESTARTSYS (SA_RESTART decides)


@dataclass
class Task:
    tid: int
    cpu: int = 0                            # the vCPU it is placed on
    state: TaskState = TaskState.RUNNABLE
    context: Any = None                     # Unicorn context while not running
    resume_pc: int = 0                      # where it continues when switched back in
    clear_child_tid: int = 0                # CLONE_CHILD_CLEARTID / set_tid_address
    robust_list: int = 0                    # set_robust_list head and length
    robust_len: int = 0
    sigmask: int = 0                        # blocked signals
    pending: list[tuple[int, bytes]] = field(default_factory=list)   # (signal, siginfo)
    saved_mask: int | None = None           # sigsuspend's mask to restore after the handler
    altstack: Any = None                    # sigaltstack (emu/linux/signal.py AltStack)
    wait: FutexWait | None = None
    wake_result: int | None = None          # the syscall's return value when it resumes
    seq: int = 0                            # order of arrival in a wait queue (FIFO wake)
    orig_ret: int = 0                       # the return register at the blocked call's entry
    restart: int | None = None              # orig_ret while an interrupted call may restart


class Deadlock(Exception):
    """Every task is blocked and none has a timeout: nothing can ever run again."""


@dataclass
class Scheduler:
    """Round robin over the tasks in tid order. `need_resched` is set by a syscall that
    blocks or yields; the dispatcher calls `schedule()` after writing the return value."""
    machine: Machine
    ret_reg: int
    pid: int
    seed: int = 0
    nr_cpus: int = 1
    tasks: dict[int, Task] = field(default_factory=dict)
    current: Task = field(init=False)
    need_resched: bool = False
    switches: int = 0
    next_tid: int = 0
    _seq: int = 0
    on_exit: list[Callable[[Task], None]] = field(default_factory=list)
    preemptions: int = 0
    timers: Any = None                      # the process's Signals: timers and delivery
    timer_due: int | None = None            # the earliest armed timer, modelled ns
    turn_unit: TurnUnit = TurnUnit.CYCLES

    def __post_init__(self) -> None:
        self.current = Task(self.pid, state=TaskState.RUNNING)
        self.tasks[self.pid] = self.current
        self.next_tid = self.pid + 1
        self.step = self.machine.arch.syscall_pc_step
        # The quantum is a pure function of the seed: same seed, same interleaving.
        rng = random.Random(self.seed ^ 0x7A5C)
        self.quantum = QUANTUM_BYTES + rng.randrange(QUANTUM_BYTES)
        self._turns = CpuTurns(self.seed) if self.nr_cpus > 1 else None
        self._turn_end: int | None = None      # clock fp at which the CPU's turn ends
        self._budget = self._turn()
        self.machine.set_nr_cpus(self.nr_cpus)
        self.last_ran: dict[int, int] = {0: self.pid}   # cpu -> tid it last ran (its rotation)
        self.machine.busy_cpus = self.busy_cpus
        self._placed = 1
        self._hook: int | None = None
        self._native: preempt.PreState | None = None
        self._slow: Any = None

    # --- tasks ---------------------------------------------------------------------------
    def live(self) -> list[Task]:
        return [t for t in self.tasks.values() if t.state != TaskState.EXITED]

    def busy_cpus(self) -> set[int]:
        """The CPUs with a task running or runnable."""
        return {t.cpu for t in self.tasks.values()
                if t.state in (TaskState.RUNNABLE, TaskState.RUNNING)}

    def new_task(self, context: Any, resume_pc: int) -> Task:
        """A task created inside a syscall hook from `context` (clone's child)."""
        task = Task(self.next_tid, cpu=self._placed % self.nr_cpus, context=context,
                    resume_pc=resume_pc, sigmask=self.current.sigmask)
        self.next_tid += 1
        self._placed += 1
        self.tasks[task.tid] = task
        self._arm_preemption()
        return task

    def block(self, wait: FutexWait) -> None:
        cur = self.current
        cur.state, cur.wait, cur.wake_result = TaskState.BLOCKED, wait, None
        self._seq += 1
        cur.seq = self._seq
        self.need_resched = True

    def wake(self, task: Task, result: int = 0) -> None:
        task.state, task.wait, task.wake_result = TaskState.RUNNABLE, None, result

    def waiters(self, key: int, bitset: int = 0xFFFFFFFF) -> list[Task]:
        """Tasks blocked on futex `key` whose bitset meets `bitset`, first come first."""
        found = [t for t in self.tasks.values() if t.state == TaskState.BLOCKED and t.wait
                 and t.wait.key == key and t.wait.bitset & bitset]
        return sorted(found, key=lambda t: t.seq)

    def exit_current(self) -> None:
        self.current.state = TaskState.EXITED
        self.current.context = None
        for hook in self.on_exit:
            hook(self.current)
        self.need_resched = True

    # --- preemption ------------------------------------------------------------------------
    def _arm_preemption(self) -> None:
        """A block hook counts the code each task runs while more than one task lives or a
        timer is armed (a single-threaded guest pays nothing): native when a C compiler is
        there (emu/linux/preempt.c), else Python. Hooks added in a callback miss cached
        blocks (unicorn-notes rule 3): drop the cached code of executable regions."""
        if self._hook is not None:
            self._sync_native()
            return
        m = self.machine
        if self._turns is not None:
            m.clock.now()               # turns in modelled time: start the work clock
            self._budget = self._turn()
        lib = preempt.load()
        if lib is None:
            self._hook = m.hooks.block(self._on_block)
        else:
            st = self._native = preempt.PreState()
            self._slow = preempt.SLOW_CB(self._on_native)
            st.slow = self._slow
            self._sync_native()
            self._hook = m.hooks.native_block(address_of(lib.pre_on_block),
                                              ctypes.addressof(st))
        for r in m.memory.regions:
            if r.prot & PROT_EXEC:
                m.flush_code(r.start, r.end)

    def _sync_native(self) -> None:
        """Give the native hook the budget left, the clock's counter and the next timer."""
        st = self._native
        if st is None:
            return
        clock = self.machine.clock
        st.budget = self._budget
        st.clock_fp = preempt.clock_fp_address(clock)
        due = preempt.NO_TIMER if self._turn_end is None else self._turn_end
        if self.timer_due is not None:
            cycles = -(-self.timer_due * clock.freq_hz // 1_000_000_000)
            due = min(cycles << FP_SHIFT, due)
        st.due_fp = due

    def _on_native(self, _uc, addr: int, size: int, _ud) -> None:
        m, st = self.machine, self._native
        try:
            if st is not None:
                self._budget = st.budget + size       # _on_block subtracts it again
            self._on_block(addr, size)
            self._sync_native()
        except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start
            m.hooks.fail(exc)

    def _disarm_preemption(self) -> None:
        if self._hook is not None:
            self.machine.hooks.delete(self._hook)
            self._hook = None
            self._native = None

    def _on_block(self, addr: int, size: int) -> None:
        self._budget -= size
        m = self.machine
        due = self.timer_due is not None and m.clock.monotonic_ns() >= self.timer_due
        if self._turn_end is not None and m.clock.acc.fp >= self._turn_end:
            self._budget = 0
        if (self._budget > 0 and not due) or m.stopping:
            return
        if m.owners.find(addr) is not None:      # never in a probe slot or trampoline
            return
        if due:
            self.poll_timers()
            if self.timers.deliverable(self.current):
                m.pc = addr
                self.timers.deliver(in_syscall=False)
                return
        if self._budget > 0:
            return
        self._budget = self._turn()
        nxt = self._pick()
        if nxt is None or nxt is self.current:
            return
        self.preemptions += 1
        self._switch(nxt, in_syscall=False, here=addr)
        if self.timers is not None:
            self.timers.deliver(in_syscall=False)

    # --- switching -----------------------------------------------------------------------
    def schedule(self) -> None:
        """Pick the next task to run and switch to it (inside the syscall hook). Raises
        Deadlock when nothing can run."""
        self.need_resched = False
        self._budget = self._turn()
        self._sync_native()
        nxt = self._pick()
        if nxt is None:
            nxt = self._wake_first_timeout()
        if nxt is self.current:
            nxt.state = TaskState.RUNNING
            self._resume(nxt)
            return
        self._switch(nxt, in_syscall=True, here=self.machine.pc + self.step)

    def _turn(self) -> int:
        """Code bytes until the next switch: the quantum on one CPU. With several, a CPU's
        turn ends at a clock value (`_turn_end`, modelled cycles); in TurnUnit.CODE, or
        without a clock that counts code (no C compiler), its cycles are counted as code
        bytes at the work clock's rate instead."""
        if self._turns is None:
            return self.quantum
        cycles = self._turns.next()
        clock = self.machine.clock
        if clock.model_counts is None or self.turn_unit is TurnUnit.CODE:
            self._turn_end = None
            return cycles * BYTES_PER_CYCLE
        self._turn_end = min(clock.acc.fp + (cycles << FP_SHIFT), preempt.NO_TIMER)
        return 1 << 62

    def _pick(self) -> Task | None:
        """The next CPU after the current one (in id order, the current one last) that has
        a runnable task, and on it the first runnable task after the one it ran last (tid
        order, round robin). On one CPU: the first runnable task after the current one."""
        self._expire_timeouts()
        here = self.current.cpu
        if self.machine.nested:                 # a run inside a hook stays on its CPU
            return self._cpu_pick(here)
        for k in range(1, self.nr_cpus + 1):
            t = self._cpu_pick((here + k) % self.nr_cpus)
            if t is not None:
                return t
        return None

    def _cpu_pick(self, cpu: int) -> Task | None:
        tids = sorted(tid for tid, t in self.tasks.items() if t.cpu == cpu)
        last = self.last_ran.get(cpu)
        start = tids.index(last) + 1 if last in tids else 0
        for tid in tids[start:] + tids[:start]:
            t = self.tasks[tid]
            if t.state in (TaskState.RUNNABLE, TaskState.RUNNING):
                return t
        return None

    def _expire_timeouts(self) -> None:
        now = self.machine.clock.monotonic_ns()
        self.poll_timers(now)
        for t in self.tasks.values():
            if t.state == TaskState.BLOCKED and t.wait and t.wait.deadline_ns is not None \
                    and t.wait.deadline_ns <= now:
                self.wake(t, t.wait.timeout_result)

    def poll_timers(self, now: int | None = None) -> None:
        """Fire the signal timers that are due (a syscall exit, a block, a switch)."""
        if self.timer_due is None:
            return
        now = self.machine.clock.monotonic_ns() if now is None else now
        if now >= self.timer_due:
            self.timers.expire(now)
            self.timers_changed()

    def timers_changed(self) -> None:
        self.machine.clock.now()        # time moves with the code from here (work clock)
        self.timer_due = self.timers.next_deadline() if self.timers else None
        if self.timer_due is not None:
            self._arm_preemption()
        self._sync_native()

    def _wake_first_timeout(self) -> Task:
        """All blocked: model time jumps to the earliest timeout or timer, until a task
        can run."""
        clock = self.machine.clock
        while True:
            due = [t.wait.deadline_ns for t in self.tasks.values() if t.state == TaskState.BLOCKED
                   and t.wait and t.wait.deadline_ns is not None]
            if self.timer_due is not None:
                due.append(self.timer_due)
            if not due:
                raise Deadlock(f"all {len(self.live())} threads blocked for ever, "
                               f"no timer armed")
            gap = min(due) - clock.monotonic_ns()
            clock.advance(max(0, -(-gap * clock.freq_hz // 1_000_000_000)), "sleep")
            nxt = self._pick()
            if nxt is not None:
                return nxt

    def _switch(self, nxt: Task, in_syscall: bool, here: int) -> None:
        """Save the running task (to resume at `here`) and load `nxt`. In a syscall hook
        the CPU still adds its step to the pc afterwards; in a block hook a pc write makes
        Unicorn leave the block before it runs."""
        m = self.machine
        cur = self.current
        bias = self.step if in_syscall else 0
        if cur.state != TaskState.EXITED:
            cur.context, cur.resume_pc = m.uc.context_save(), here
            if cur.state == TaskState.RUNNING:
                cur.state = TaskState.RUNNABLE
        m.use_cpu(nxt.cpu, bias)                # its CPU's Uc (another's: a hand-off)
        m.uc.context_restore(nxt.context)
        m.pc = nxt.resume_pc - bias
        nxt.context = None
        nxt.state = TaskState.RUNNING
        self.current = nxt
        self.last_ran[nxt.cpu] = nxt.tid
        m.task = (m.task[0], nxt.tid)           # traces and per-task probe state follow it
        m.set_cpu(nxt.cpu)                      # and per-CPU state (kcb, buffers, maps)
        self.switches += 1
        self._resume(nxt)
        if len(self.live()) < 2 and self.timer_due is None:
            self._disarm_preemption()

    def _resume(self, task: Task) -> None:
        """Give a woken task its call's result; a call to run again gets its return register
        back and the pc of its syscall instruction (the caller has set the resume pc)."""
        res, task.wake_result = task.wake_result, None
        m = self.machine
        if res == -ERESTARTNOINTR:
            m.regs.write(self.ret_reg, task.orig_ret)
            m.pc = m.pc - m.arch.syscall_insn_size
        elif res == -ERESTARTSYS:          # the signal's delivery decides (SA_RESTART)
            m.regs.write(self.ret_reg, -EINTR & (1 << 64) - 1)
            task.restart = task.orig_ret
        elif res is not None:
            m.regs.write(self.ret_reg, res & (1 << 64) - 1)
