"""futex(2) over the scheduler's wait queues: WAIT/WAKE, their BITSET forms, REQUEUE and
CMP_REQUEUE, WAKE_OP, with timeouts on the modelled clock. One process: a futex's key is
its address, private or shared alike."""
from __future__ import annotations

import errno as E
import struct

from emu.linux.tasks import FutexWait, Scheduler
from emu.uaccess import UserFault, copy_from_user, copy_to_user

FUTEX_WAIT, FUTEX_WAKE, FUTEX_REQUEUE, FUTEX_CMP_REQUEUE, FUTEX_WAKE_OP = 0, 1, 3, 4, 5
FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 9, 10
FUTEX_PRIVATE_FLAG, FUTEX_CLOCK_REALTIME = 128, 256
FUTEX_BITSET_MATCH_ANY = 0xFFFFFFFF


def get_u32(mem, addr: int) -> int:
    return struct.unpack("<I", copy_from_user(mem, addr, 4))[0]


def futex_wait(sched: Scheduler, mem, uaddr: int, val: int, deadline_ns: int | None,
               bitset: int = FUTEX_BITSET_MATCH_ANY) -> int:
    """Block the current task unless *uaddr != val (EAGAIN). Returns the value the task
    gets if the wait does not block; a woken task gets 0, a timed-out one -ETIMEDOUT."""
    if not bitset:
        return -E.EINVAL
    if get_u32(mem, uaddr) != val & 0xFFFFFFFF:
        return -E.EAGAIN
    if deadline_ns is not None and deadline_ns <= sched.machine.clock.monotonic_ns():
        return -E.ETIMEDOUT
    # Interrupted by a handled signal, an untimed wait is -ERESTARTSYS (run again under
    # SA_RESTART), a timed one -ERESTART_RESTARTBLOCK, which a handler makes EINTR.
    sched.block(FutexWait(uaddr, bitset, deadline_ns, restart=deadline_ns is None))
    return 0


def futex_wake(sched: Scheduler, uaddr: int, nr: int, bitset: int = FUTEX_BITSET_MATCH_ANY) -> int:
    if not bitset:
        return -E.EINVAL
    woken = sched.waiters(uaddr, bitset)[:max(nr, 0)]
    for t in woken:
        sched.wake(t, 0)
    return len(woken)


def futex_requeue(sched: Scheduler, mem, uaddr: int, uaddr2: int, nr_wake: int,
                  nr_requeue: int, cmpval: int | None) -> int:
    if cmpval is not None and get_u32(mem, uaddr) != cmpval & 0xFFFFFFFF:
        return -E.EAGAIN
    queue = sched.waiters(uaddr)
    woken, moved = queue[:max(nr_wake, 0)], queue[max(nr_wake, 0):][:max(nr_requeue, 0)]
    for t in woken:
        sched.wake(t, 0)
    for t in moved:
        assert t.wait is not None
        t.wait.key = uaddr2
    return len(woken) + len(moved)


def futex_wake_op(sched: Scheduler, mem, uaddr: int, uaddr2: int, nr: int, nr2: int,
                  encoded: int) -> int:
    """Atomically *uaddr2 = op(*uaddr2, oparg); wake nr on uaddr, and nr2 on uaddr2 if the
    old value compares true (the kernel's FUTEX_OP encoding)."""
    op, cmp = (encoded >> 28) & 7, (encoded >> 24) & 15
    oparg, cmparg = (encoded >> 12) & 0xFFF, encoded & 0xFFF
    if encoded & (8 << 28):                     # FUTEX_OP_OPARG_SHIFT
        oparg = 1 << (oparg & 31)
    old = get_u32(mem, uaddr2)
    ops = {0: lambda: oparg, 1: lambda: old + oparg, 2: lambda: old | oparg,
           3: lambda: old & ~oparg, 4: lambda: old ^ oparg}
    if op not in ops or cmp > 5:
        return -E.ENOSYS
    copy_to_user(mem, uaddr2, struct.pack("<I", ops[op]() & 0xFFFFFFFF))
    woken = futex_wake(sched, uaddr, nr)
    sold, sarg = _s32(old), _sext12(cmparg)
    hit = (sold == sarg, sold != sarg, sold < sarg, sold <= sarg, sold > sarg, sold >= sarg)[cmp]
    if hit:
        woken += futex_wake(sched, uaddr2, nr2)
    return woken


def _s32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & (1 << 31) else x


def _sext12(x: int) -> int:
    return x - (1 << 12) if x & (1 << 11) else x


# --- robust futexes (kernel/futex/core.c exit_robust_list) ---------------------------------
FUTEX_WAITERS, FUTEX_OWNER_DIED, FUTEX_TID_MASK = 0x80000000, 0x40000000, 0x3FFFFFFF
ROBUST_LIST_LIMIT = 2048            # the kernel's bound on a (possibly circular) list


def exit_robust_list(sched: Scheduler, mem, task) -> None:
    """A dying thread's robust list: every futex it still owns gets FUTEX_OWNER_DIED (and
    one waiter woken), so the next locker sees EOWNERDEAD. The list is the guest's: a bad
    pointer ends the walk, as in the kernel."""
    head = task.robust_list
    if not head:
        return
    try:
        entry, offset, pending = struct.unpack("<QqQ", copy_from_user(mem, head, 24))
        for _ in range(ROBUST_LIST_LIMIT):
            if entry & ~1 == head:
                break
            nxt = struct.unpack("<Q", copy_from_user(mem, entry & ~1, 8))[0]
            if entry != pending:
                _futex_death(sched, mem, (entry & ~1) + offset, task.tid, bool(entry & 1), False)
            entry = nxt
        if pending:
            _futex_death(sched, mem, (pending & ~1) + offset, task.tid, bool(pending & 1), True)
    except UserFault:
        return


def _futex_death(sched: Scheduler, mem, uaddr: int, tid: int, pi: bool, pending_op: bool) -> None:
    """handle_futex_death: mark a futex its dead owner held, wake one waiter."""
    uaddr &= (1 << 64) - 1
    if uaddr & 3:
        return
    uval = get_u32(mem, uaddr)
    if pending_op and not pi and not uval:      # died between taking and setting it
        futex_wake(sched, uaddr, 1)
        return
    if uval & FUTEX_TID_MASK != tid:
        return
    copy_to_user(mem, uaddr, struct.pack("<I", (uval & FUTEX_WAITERS) | FUTEX_OWNER_DIED))
    if not pi and uval & FUTEX_WAITERS:
        futex_wake(sched, uaddr, 1)
