"""The machine: its Unicorn CPUs (one per vCPU, over one memory), registers, the run loop
and the one trap dispatcher every other layer registers with (as the kernel's break hooks).

The machine never imports `probes`: the probe layer registers break handlers keyed by
the arch's trap code (arm64 BRK immediate; x86 int3) and writes text through
`text_poke`, the only writer of guest text."""
from __future__ import annotations

import gc
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from enum import StrEnum
from typing import BinaryIO, Callable

import capstone
from unicorn import UcError
from unicorn.unicorn_py3.unicorn import Uc   # (not `unicorn.Uc`: type checkers read the Py2 one)
from unicorn import unicorn_const as UC

from emu.arch import Arch, get_arch
from emu.clock import SYSCALL, Clock
from emu.memory import PROT_EXEC, Memory
from emu.owners import RegionOwner, RegionOwners
from emu.symbols import SymbolTable
from emu.ucfast import RawHooks, RegAccess, emu_start_nested
from emu.vtlb import Vtlb

# emu_start's `until`: a non-canonical address no guest can reach without faulting first.
_NEVER = 0xDEAD_0000_0000_0000

SIGTRAP, SIGILL, SIGSEGV = 5, 4, 11
FAULT_EXIT = 139          # every guest fault: the shell's code for a SIGSEGV death
# Host address space for translated code, per machine. Unicorn's default reserves 1 GiB per
# instance, so four live machines exhaust a 4 GiB `ulimit -v`; a full buffer only flushes.
TCG_BUFFER_SIZE = 32 << 20
# A machine is a reference cycle (hooks close over it) holding ~40 MiB of native memory the
# cycle collector cannot see: past this many unreleased machines, collect before making one.
_machines: "weakref.WeakSet[Machine]" = weakref.WeakSet()
_collect_at = 8


def _release_unused_machines() -> None:
    global _collect_at
    if len(_machines) >= _collect_at:
        gc.collect()
        _collect_at = max(8, 2 * len(_machines))    # machines still in use: back off

_MEM_KIND = {
    UC.UC_MEM_READ_UNMAPPED: "read of unmapped address",
    UC.UC_MEM_WRITE_UNMAPPED: "write to unmapped address",
    UC.UC_MEM_FETCH_UNMAPPED: "fetch from unmapped address",
    UC.UC_MEM_READ_PROT: "read of protected address",
    UC.UC_MEM_WRITE_PROT: "write to protected address",
    UC.UC_MEM_FETCH_PROT: "fetch from non-executable address",
}


class StopReason(StrEnum):
    EXIT = "exit"
    FAULT = "fault"
    LIMIT = "limit"
    HALT = "halt"


@dataclass
class Fault:
    kind: str           # "read of unmapped address", "undefined instruction", ...
    pc: int
    addr: int | None
    signal: int


@dataclass
class RunResult:
    reason: StopReason
    exit_code: int
    message: str = ""
    fault: Fault | None = None


BreakHandler = Callable[[int], bool]    # (trap address) -> handled?


@dataclass
class Patch:
    """One text_poke: kept so inspection can show the bytes before and after."""
    addr: int
    old: bytes
    new: bytes


class Machine:
    """An arm64 or x86-64 CPU with named memory, a symbol table and a deterministic clock."""

    def __init__(self, arch: Arch | str, stdout: BinaryIO | None = None,
                 stderr: BinaryIO | None = None) -> None:
        self.arch = get_arch(arch) if isinstance(arch, str) else arch
        _release_unused_machines()
        _machines.add(self)
        self.uc = Uc(self.arch.uc_arch, self.arch.uc_mode)
        self.uc.ctl_set_tcg_buffer_size(TCG_BUFFER_SIZE)
        # One Uc per vCPU (set_nr_cpus), made when the CPU first runs; `uc` and `regs` are
        # the current CPU's.
        self.ucs: list[Uc] = [self.uc]
        self._cpu_ucs: dict[int, Uc] = {0: self.uc}
        self._uc_setups: list[Callable[[Uc], object]] = []
        self._handoff: int | None = None     # a run continues on another CPU's Uc (pc bias)
        self._syscall_insn = False           # inside a syscall instruction's hook
        self.handoffs = 0                    # runs handed from one CPU's Uc to another's
        self.regs = RegAccess(self.uc)
        self.hooks = RawHooks(self.uc)
        self.memory = Memory(self.uc)
        # Every CPU's TLB fills from the memory's permissions (emu/vtlb.py): data pages
        # without execute, so guest stores take Unicorn's fast path; faults come back
        # through the TLB's fault window as (access, address).
        self.tlb = Vtlb(on_fault=self._on_mem_fault, on_error=self.hooks.fail)
        self.memory.tlb = self.tlb
        self.symbols = SymbolTable()
        self.clock = Clock()
        self.stdout = stdout if stdout is not None else sys.stdout.buffer
        self.stderr = stderr if stderr is not None else sys.stderr.buffer
        self.break_handlers: dict[int, list[BreakHandler]] = {}
        self.break_addrs: dict[int, BreakHandler] = {}   # fast path: exact trap addresses
        self.fault_notifiers: list[Callable[[Fault], None]] = []
        self.live_patches: dict[int, int] = {}            # addr -> original byte under a patch
        self.owners = RegionOwners()     # pages a layer maps for itself (emu/owners.py)
        self.syscall_handler: Callable[[], None] | None = None
        # The OS layer's synchronous signals: fault -> True when a guest handler takes it.
        self.fault_handler: Callable[[Fault], bool] | None = None
        self.patches: list[Patch] = []
        self.text_listeners: list[Callable[[int, int], None]] = []   # (addr, size) of changed text
        self.stop_listeners: list[Callable[[], None]] = []   # after every emu_start returns
        self.entry: int = 0
        self.image = None           # the loaded ElfImage, if any
        self.layers: dict[str, object] = {}   # per-machine state of other layers (probes, ...)
        self.task: tuple[str, int] = ("swapper/0", 0)   # comm and pid traces show
        # vCPUs (emu/smp.py): the id of the one whose context Unicorn holds now, how many
        # there are, and the per-CPU state that follows a switch (a kprobe's kcb).
        self.cpu = 0
        self.nr_cpus = 1
        self.cpu_listeners: list[Callable[[int], None]] = []
        # The CPUs with a task to run (the scheduler answers): who must sync with a text poke.
        self.busy_cpus: Callable[[], set[int]] = lambda: {self.cpu}
        self.halt_allowed = False   # bare metal: the halt instruction ends the run (else a fault)
        self.user_mode = False      # set by start_thread: the guest runs at CPL3 / EL0
        # time.monotonic() past which the run must stop (run(timeout=...)); blocking host
        # work done for the guest (a read from a pipe) checks it and calls stop_limit.
        self.deadline: float | None = None
        self._stop: RunResult | None = None
        self._mem_fault: tuple[int, int] | None = None
        self._timeout = 0.0
        self._depth = 0                              # nested runs (a handler calling the guest)
        # Layers that may stop a run for a limit of their own (the cycle model's
        # --max-cycles) say so here: fn() -> message or None.
        self.limit_checks: list[Callable[[], str | None]] = []
        self._pc_id = self.arch.regs[self.arch.pc]
        self._sp_id = self.arch.regs[self.arch.sp]
        self.arch.reset_cpu(self)
        self.arch.install_hooks(self)
        self.for_each_uc(self.tlb.attach)
        self._cs = capstone.Cs(self.arch.cs_arch, self.arch.cs_mode)
        self.clock.on_first_read = self._start_work_clock
        from emu.hwrng import GuestRandom
        self.random = GuestRandom()     # RDRAND/RDSEED; seed_random gives it --seed

    def start_thread(self, pc: int, sp: int) -> None:
        """Enter user mode at pc with stack sp in the state Linux's start_thread gives a
        new process (x86 CPL3, arm64 EL0; the arch has the facts)."""
        self.arch.start_thread(self, pc, sp)
        self.user_mode = True
        self.pc, self.sp = pc, sp

    def _start_work_clock(self) -> None:
        """The guest (or a trace) reads the time for the first time: from here on time moves
        with the code the guest runs (emu/cycles/work.py). Blocks translated before get the
        new hook once retranslated (unicorn-notes rule 3; no flush inside a callback)."""
        from emu.cycles.work import WorkClock
        if WorkClock.attach(self) is not None:
            for r in self.memory.regions:
                if r.prot & PROT_EXEC:
                    self.memory.remove_cache(r.start, r.end)

    # --- vCPUs ------------------------------------------------------------------------------
    def set_nr_cpus(self, n: int) -> None:
        """Give the machine `n` vCPUs, each its own Unicorn over the one guest memory (host
        buffers every Uc maps, emu/memory.py, from now on). A CPU's Uc is made when the CPU
        is first used (`uc_of`), so CPUs that never run cost nothing."""
        self.nr_cpus = n
        if n > 1:
            self.memory.share()

    def uc_of(self, cpu: int) -> Uc:
        """vCPU `cpu`'s Unicorn. A new one maps the memory, starts as a copy of CPU 0's
        state and gets every hook installed so far (RawHooks, `for_each_uc`, which is how
        layers that patch hook internals, the probes' native dispatcher, reach it too)."""
        uc = self._cpu_ucs.get(cpu if self.nr_cpus > 1 else 0)
        if uc is None:
            uc = self._cpu_ucs[cpu] = Uc(self.arch.uc_arch, self.arch.uc_mode)
            uc.ctl_set_tcg_buffer_size(TCG_BUFFER_SIZE)
            self.memory.share_with(uc)
            uc.context_restore(self.ucs[0].context_save())
            self.ucs.append(uc)
            self.hooks.add_uc(uc)
            for setup in self._uc_setups:
                setup(uc)
        return uc

    def for_each_uc(self, setup: Callable[[Uc], object]) -> None:
        """Run `setup(uc)` (a binding hook_add, say) on every CPU's Uc, now and on CPUs
        added later, so every CPU runs with the same hooks."""
        self._uc_setups.append(setup)
        for uc in self.ucs:
            setup(uc)

    def use_cpu(self, cpu: int, pc_bias: int = 0) -> None:
        """Make vCPU `cpu`'s Uc the machine's (`uc`, `regs`) for a context switch onto it.
        Inside a run this is a hand-off: the Uc running now stops (a stop requested in a
        block or syscall hook takes effect before any further instruction) and the run
        goes on on this CPU's Uc at its pc + `pc_bias` when inside a syscall instruction's
        hook (whose pc lags by the syscall's length, which the CPU adds after the hook)."""
        uc = self.uc_of(cpu)
        if uc is self.uc:
            return
        self.uc = uc
        self.regs.retarget(uc)
        if self._depth > 0:
            running = self.hooks.uc
            Uc.emu_stop(running)     # not a stop request: layers that wrap emu_stop see none
            self.handoffs += 1
            self._handoff = pc_bias if uc is not running and self._syscall_insn else 0

    def flush_code(self, start: int, end: int, cpu: int | None = None) -> None:
        """Drop translated code of [start, end) on every CPU, or on `cpu` only (its part
        of text_poke_sync: the CPU serialises and runs the text as it is now)."""
        if cpu is None:
            self.memory.remove_cache(start, end)
        else:
            self.uc_of(cpu).ctl_remove_cache(start, end)

    def set_cpu(self, cpu: int) -> None:
        """Unicorn now holds vCPU `cpu`'s context: per-CPU state follows (smp_processor_id)."""
        if cpu != self.cpu:
            self.cpu = cpu
            for listener in self.cpu_listeners:
                listener(cpu)

    def seed_random(self, seed: int) -> None:
        """Seed the guest's hardware random instructions (--seed, as getrandom)."""
        self.random.seed(seed)

    def layer(self, key: str, factory: Callable[["Machine"], object]):
        """The per-machine state of another layer (kprobes, ftrace, ...), made on first use."""
        state = self.layers.get(key)
        if state is None:
            state = self.layers[key] = factory(self)
        return state

    def snapshot(self):
        """The whole machine's state now, between runs (emu/snapshot.py says what is kept)."""
        from emu.snapshot import take
        for cpu in range(self.nr_cpus if self.nr_cpus > 1 else 0):
            self.uc_of(cpu)         # every CPU's Uc, so a restore finds no Uc made since
        return take(self)

    def restore(self, snap) -> None:
        """Put the machine back in the state of `snap`, one of its own snapshots."""
        from emu.snapshot import restore
        restore(self, snap)

    # --- registers --------------------------------------------------------------------------
    def reg(self, name: str) -> int:
        return self.regs.read(self.arch.reg_id(name))

    def set_reg(self, name: str, value: int) -> None:
        self.regs.write(self.arch.reg_id(name), value)

    @property
    def pc(self) -> int:
        return self.regs.read(self._pc_id)

    @pc.setter
    def pc(self, value: int) -> None:
        self.regs.write(self._pc_id, value)

    @property
    def sp(self) -> int:
        return self.regs.read(self._sp_id)

    @sp.setter
    def sp(self, value: int) -> None:
        self.regs.write(self._sp_id, value)

    def arg(self, n: int) -> int:
        """Argument n (0-based) of the C calling convention, register-passed ones only."""
        return self.reg(self.arch.args[n])

    @property
    def return_value(self) -> int:
        return self.reg(self.arch.ret)

    # --- text -------------------------------------------------------------------------------
    def text_poke(self, addr: int, data: bytes, sync: bool = True) -> bytes:
        """Write guest text and invalidate translated code for the range; returns the old
        bytes. The only way any layer modifies code (unicorn-notes: TB cache rules 1-2).
        `sync=False`: only the current CPU drops its translations; the others keep running
        what they translated until the caller syncs them (probes/text_poke.py)."""
        old = self.memory.read(addr, len(data))
        self.uc.mem_write(addr, bytes(data))
        self.flush_code(addr, addr + len(data), None if sync else self.cpu)
        self.patches.append(Patch(addr, old, bytes(data)))
        for listener in self.text_listeners:
            listener(addr, len(data))
        for i, (was, now) in enumerate(zip(old, data)):
            orig = self.live_patches.setdefault(addr + i, was)
            if orig == now:
                del self.live_patches[addr + i]
        return old

    def claim_text(self, addr: int, size: int, owner: RegionOwner, purpose: str = "") -> None:
        """Record [addr, addr+size) as pages `owner` maps for code of its own (slots,
        trampolines): its pokes are not patches of guest text, the guest cannot unmap or
        replace them, and the cycle model books their blocks apart."""
        self.owners.claim(addr, size, owner, purpose)

    @property
    def owned_text(self) -> list[tuple[int, int]]:
        """[start, end) of every range a layer claimed, in address order."""
        return [(r.start, r.end) for r in self.owners.ranges]

    def original_text(self, addr: int, size: int) -> bytes:
        """Guest bytes as they were before any text_poke still in place (what the
        disassembly of a fault or an inspection should show)."""
        data = bytearray(self.memory.read(addr, size))
        for i in range(size):
            orig = self.live_patches.get(addr + i)
            if orig is not None:
                data[i] = orig
        return bytes(data)

    def enable_cycle_model(self, profile=None, **kw):
        """Charge every executed block its modelled cost (emu/cycles); `profile` is a CPU
        profile name or None for the arch's default. Returns the CycleModel."""
        from emu.cycles import enable_cycle_model
        return enable_cycle_model(self, profile, **kw)

    def disasm_one(self, addr: int) -> str:
        if self.memory.read_safe(addr, 1) is None:
            return "<unmapped>"
        size = self.arch.max_insn_size
        while size > 1 and not self.memory.is_mapped(addr, size):
            size -= 1
        code = self.original_text(addr, size)
        for insn in self._cs.disasm(code, addr, 1):
            return f"{insn.mnemonic} {insn.op_str}".strip()
        return f"<undecodable: {code[:4].hex()}>"

    def describe(self, addr: int) -> str:
        """`0x401234 <main+0x14>`, the way faults and reports name an address."""
        s = self.symbols.find(addr)
        return f"{addr:#x} <{s.name}+{addr - s.addr:#x}>" if s else f"{addr:#x}"

    # --- trap dispatch ----------------------------------------------------------------------
    def register_break_handler(self, code: int, handler: BreakHandler) -> None:
        """Handlers for a trap code are asked in turn until one returns True."""
        self.break_handlers.setdefault(code, []).append(handler)

    def unregister_break_handler(self, code: int, handler: BreakHandler) -> None:
        self.break_handlers.get(code, []).remove(handler)

    def register_break_addr(self, addr: int, handler: BreakHandler) -> None:
        """Own the trap at exactly `addr` (a probe, a slot's step trap, a trampoline): the
        dispatcher asks this handler first without decoding the trapping instruction."""
        self.break_addrs[addr] = handler

    def unregister_break_addr(self, addr: int) -> None:
        self.break_addrs.pop(addr, None)

    def add_host_entry(self, addr: int, fn: Callable[[int], None]) -> int:
        """Enter host code when the guest reaches `addr`, an address of a trampoline or
        detour the caller wrote into the guest (never a probed address: probes trap).
        Returns a handle for remove_host_entry."""
        handle = self.hooks.entry(fn, addr)
        self.memory.remove_cache(addr, addr + 1)     # a new hook on cached code (notes rule 3)
        return handle

    def remove_host_entry(self, handle: int) -> None:
        self.hooks.delete(handle)

    def on_break(self, addr: int, code: int | None = None) -> None:
        """A breakpoint no owner of its exact address took: ask the handlers of its code.
        (The arch hooks try `break_addrs` first, on the hot path.)"""
        if code is None:
            code = self.arch.break_code(self, addr)
        for handler in self.break_handlers.get(code, ()):
            if handler(addr):
                return
        self.stop_fault(Fault("breakpoint trap (no handler)", addr, None, SIGTRAP))

    def on_syscall(self, insn_hook: bool = False) -> None:
        """A system call. `insn_hook`: called from the syscall instruction's own hook, after
        which the CPU steps past the instruction itself (a hand-off to another CPU's Uc
        must then add that step for it; an emulated syscall adds it on its own)."""
        self.clock.charge(SYSCALL)
        if self.syscall_handler is None:
            self.stop_fault(Fault("system call with no OS (bare metal)", self.pc, None, SIGILL))
            return
        outer, self._syscall_insn = self._syscall_insn, insn_hook
        try:
            self.syscall_handler()
        finally:
            self._syscall_insn = outer

    def on_undefined(self, addr: int) -> None:
        self.stop_fault(Fault("undefined instruction", addr, None, SIGILL))

    def on_privileged(self, addr: int) -> None:
        """A privileged instruction in user mode (the arch says which signal Linux sends)."""
        self.stop_fault(Fault("privileged instruction", addr, None, self.arch.privileged_signal))

    def on_cpu_exception(self, addr: int, intno: int) -> None:
        self.stop_fault(Fault(self.arch.exception_names.get(intno, f"CPU exception {intno}"),
                              addr, None, SIGSEGV))

    def _on_mem_fault(self, access: int, addr: int) -> None:
        """The TLB's report of a denied access (UC_MEM_* kind, guest address)."""
        self._mem_fault = (access, addr)

    # --- stopping ---------------------------------------------------------------------------
    def request_exit(self, code: int) -> None:
        self._stop = RunResult(StopReason.EXIT, code)
        self.uc.emu_stop()

    def request_halt(self, addr: int | None = None) -> None:
        """The guest's halt instruction: the end of a bare-metal run; in user mode it is
        privileged, a fault."""
        if not self.halt_allowed:
            pc = self.pc if addr is None else addr
            self.stop_fault(Fault("privileged instruction", pc, None, self.arch.privileged_signal))
            return
        self._stop = RunResult(StopReason.HALT, 0, "halted")
        self.uc.emu_stop()

    def stop_limit(self, message: str) -> None:
        """End the run as a limit (exit 124) from inside a hook or a syscall handler."""
        self._stop = RunResult(StopReason.LIMIT, 124, message)
        self.uc.emu_stop()

    def timeout_message(self) -> str:
        return f"wall-clock limit of {self._timeout:g} s reached at pc {self.describe(self.pc)}"

    def past_deadline(self) -> bool:
        """--timeout has run out (blocking work for the guest polls this)."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def stop_fault(self, fault: Fault) -> None:
        for notify in self.fault_notifiers:
            notify(fault)
        self._stop = RunResult(StopReason.FAULT, FAULT_EXIT, self.fault_report(fault), fault)
        self.uc.emu_stop()

    def fault_report(self, f: Fault) -> str:
        where = f" {f.addr:#x}" if f.addr is not None else ""
        return f"guest fault: {f.kind}{where} at pc {self.describe(f.pc)}: {self.disasm_one(f.pc)}"

    def console_write(self, data: bytes) -> None:
        self.stdout.write(data)

    # --- running ----------------------------------------------------------------------------
    def run(self, begin: int | None = None, max_insns: int = 0, timeout: float = 0.0,
            until: int | None = None) -> RunResult:
        """Run from `begin` (default: the current pc) until exit, fault, halt, a limit, or
        reaching `until`. A run started from inside a hook (a handler calling into the
        guest) is nested: it must give `until`, and ignores limits (Unicorn stops the
        outer run when a nested one counts instructions or times out). A fault the OS
        layer turns into a signal handler (`fault_handler` returns True) resumes the run
        with what is left of the limits."""
        t0, retired0 = time.monotonic(), self._retired() if max_insns else 0
        result = self._run_once(begin, max_insns, timeout, until)
        while result.fault is not None and self._depth == 0 and self.fault_handler is not None:
            self._stop = None
            if not self.fault_handler(result.fault):
                self._stop = result
                break
            left = timeout - (time.monotonic() - t0) if timeout else 0.0
            count = max_insns - (self._retired() - retired0) if max_insns else 0
            if (timeout and left <= 0) or (max_insns and count <= 0):
                return RunResult(StopReason.LIMIT, 124, self.timeout_message() if timeout and left <= 0
                                 else f"instruction limit of {max_insns} reached at pc "
                                      f"{self.describe(self.pc)}")
            result = self._run_once(None, count, left, until)
        return result

    def _run_once(self, begin: int | None, max_insns: int, timeout: float,
                  until: int | None) -> RunResult:
        start = self.pc if begin is None else begin
        nested = self._depth > 0
        if nested:
            if until is None:
                raise ValueError("a nested run needs `until`")
            saved, max_insns, timeout = (self._stop, self._mem_fault), 0, 0.0
        self._stop, self._mem_fault = None, None
        t0 = time.monotonic()
        if not nested:
            self.hooks.errors.clear()
            self._timeout = timeout
            self.deadline = t0 + timeout if timeout else None
        self._depth += 1
        self.random.select()
        try:
            self._emulate(start, _NEVER if until is None else until, max_insns, timeout, t0)
        except UcError as e:
            self.uc_error_seen()
            if self.hooks.errors:
                raise self.hooks.errors[0] from None
            if self._stop is None:
                self._stop = self._fault_from_uc(e)
        finally:
            self._depth -= 1
            for listener in self.stop_listeners:
                listener()
        if self.hooks.errors and not nested:
            raise self.hooks.errors[0]
        if self._stop is None:
            if until is not None and self.pc == until:
                self._stop = RunResult(StopReason.HALT, 0, f"reached {self.describe(until)}")
            else:
                self._stop = self._stopped_without_reason(max_insns, timeout, time.monotonic() - t0)
        result = self._stop
        if nested:
            self._stop, self._mem_fault = saved
        return result

    def call_nested(self, begin: int, until: int) -> RunResult | None:
        """Guest code called from inside a hook (a probe layer's per-hit call, on the CPU
        that hit): None when it came back to `until` with nothing stopped. That is the
        per-hit fast path: no RNG stream select and no stop listeners, which cost a nested
        run() ~20 µs of Python. Anything else ends as a nested run() ends, listeners
        included, and returns the stop."""
        saved = self._stop, self._mem_fault
        self._stop = self._mem_fault = None
        err: UcError | None = None
        self._depth += 1
        try:
            self._start_nested(begin, until)
        except UcError as e:
            err = e
            self.uc_error_seen()
        finally:
            self._depth -= 1
        stop, errors = self._stop, self.hooks.errors
        if err is None and stop is None and not errors and self.regs.read(self._pc_id) == until:
            self._stop, self._mem_fault = saved
            return None
        for listener in self.stop_listeners:
            listener()
        if err is not None:
            if errors:
                raise errors[0] from None
            if stop is None:
                stop = self._fault_from_uc(err)
        if stop is None and self.pc != until:
            stop = self._stopped_without_reason(0, 0.0, 0.0)
        self._stop, self._mem_fault = saved
        return stop

    def _start_nested(self, begin: int, until: int) -> None:
        """The nested emu_start of call_nested. --timeout's stop (Unicorn's timer or the
        watchdog: one uc_emu_stop) may land in it, or just before it in the hook, where the
        nested start clears it: either way the outer run would never see it. So past the
        deadline the nested code is run on to `until` (a hit's work is whole, as host work
        is) and the stop is made again for the outer run."""
        uc = self.uc
        emu_start_nested(uc, begin, until)
        if not self.past_deadline():
            return
        pc = self.regs.read(self._pc_id)
        while pc != until and self._stop is None and not self.hooks.errors:
            emu_start_nested(uc, pc, until)
            pc = self.regs.read(self._pc_id)
        uc.emu_stop()

    def _emulate(self, start: int, end: int, max_insns: int, timeout: float, t0: float) -> None:
        """emu_start, resumed after each wait-for-interrupt with what is left of the limits
        (a wait loop must not escape --max-insns or --timeout)."""
        left, count, waits = timeout, max_insns, 0
        retired0 = self._retired() if max_insns else 0
        while True:
            self._emulate_on_cpus(start, end, left, count)
            if not self._resume_after_wait(end):
                return
            if max_insns and not waits:
                self.clock.now()        # starts the work clock if off: it counts the rest
            start, waits = self.pc, waits + 1
            if timeout:
                left = timeout - (time.monotonic() - t0)
                if left <= 0:
                    return
            if max_insns:
                count = max_insns - max(self._retired() - retired0, waits)
                if count <= 0:
                    return

    def _emulate_on_cpus(self, start: int, end: int, timeout: float, count: int) -> None:
        """emu_start on the current CPU's Uc, and on the next one's after each hand-off
        (use_cpu) with what is left of the limits. With several CPUs a watchdog thread
        keeps the timeout: Unicorn's own timer costs a thread per emu_start (~300 µs)."""
        retired0 = self._retired() if count else 0
        outer, self._handoff = self._handoff, None
        watchdog = _Watchdog(self, timeout) if timeout and self.nr_cpus > 1 else None
        uc_timeout = 0 if watchdog else int(timeout * 1e6)
        try:
            while True:
                uc = self.hooks.uc = self.uc
                if watchdog is not None and watchdog.fired:
                    return
                if self._depth > 1:     # from a hook: keep the outer run's count (ucfast)
                    emu_start_nested(uc, start, end)
                else:
                    uc.emu_start(start, end, timeout=uc_timeout, count=count)
                bias, self._handoff = self._handoff, None
                if bias is None or self._stop is not None or self.hooks.errors:
                    return
                start = self.pc + bias
                if count:
                    retired = self._retired()
                    count -= max(retired - retired0, 1)
                    retired0 = retired
                    if count <= 0:
                        return
        finally:
            self._handoff = outer
            self.hooks.uc = self.uc
            if watchdog is not None:
                watchdog.cancel()

    def _retired(self) -> int:
        """Instructions retired so far, as well as the clock knows (the cycle model counts
        them; the work clock counts code bytes, exact on fixed-size ISAs)."""
        c = self.clock.counts()
        return c["insns"] if "insns" in c else c.get("code_bytes", 0) // self.arch.insn_align

    def _resume_after_wait(self, end: int) -> bool:
        """A user process steps over a wait-for-interrupt (Linux emulates a trapped WFI);
        Unicorn's CPU halted on it instead, ending emu_start."""
        if self._stop is not None or self.hooks.errors or not self.user_mode:
            return False
        if self.pc == end or not self.arch.waited(self):
            return False
        return not any(check() for check in self.limit_checks)

    @property
    def stopping(self) -> bool:
        """A stop (exit, fault, halt) was requested; the current block may still finish."""
        return self._stop is not None

    @property
    def nested(self) -> bool:
        """True inside a run started from a hook of another (it must stay on its CPU)."""
        return self._depth > 1

    @property
    def running(self) -> bool:
        """True inside a hook of a run (so a new run would be nested)."""
        return self._depth > 0

    def uc_error_seen(self) -> None:
        """emu_start raised: if an access went to the TLB's fault window, flush (whatever
        else ended the run), so the next access to that page fills afresh."""
        if self._mem_fault is not None:
            self.tlb.after_fault(self.memory.ucs)

    def _fault_from_uc(self, e: UcError) -> RunResult:
        pc = self.pc
        if self._mem_fault is not None:
            access, addr = self._mem_fault
            kind = _MEM_KIND.get(access, f"memory access ({access})")
            if access in (UC.UC_MEM_FETCH_UNMAPPED, UC.UC_MEM_FETCH_PROT):
                pc = addr
            fault = Fault(kind, pc, addr, SIGSEGV)
        elif e.errno == UC.UC_ERR_INSN_INVALID:
            fault = Fault("undefined instruction", pc, None, SIGILL)
        else:
            fault = Fault(f"CPU error: {e}", pc, None, SIGSEGV)
        for notify in self.fault_notifiers:
            notify(fault)               # e.g. a fault in a kprobe slot is reported at the probe
        return RunResult(StopReason.FAULT, FAULT_EXIT, self.fault_report(fault), fault)

    def _stopped_without_reason(self, max_insns: int, timeout: float, elapsed: float) -> RunResult:
        for check in self.limit_checks:
            message = check()
            if message:
                return RunResult(StopReason.LIMIT, 124, message)
        if timeout and elapsed >= timeout * 0.99:
            return RunResult(StopReason.LIMIT, 124, self.timeout_message())
        if self.arch.halted(self):
            if not self.halt_allowed:
                fault = Fault("privileged instruction", self.pc - self.arch.halt_size, None,
                              self.arch.privileged_signal)
                return RunResult(StopReason.FAULT, FAULT_EXIT, self.fault_report(fault), fault)
            return RunResult(StopReason.HALT, 0, "halted")
        if max_insns:
            return RunResult(StopReason.LIMIT, 124, f"instruction limit of {max_insns} reached "
                                                    f"at pc {self.describe(self.pc)}")
        return RunResult(StopReason.HALT, 0, "stopped")


class _Watchdog:
    """--timeout of a run on several CPUs' Ucs: past it, stop whichever Uc runs, again
    every 10 ms (a stop that meets a Uc between two emu_starts is lost) until cancelled."""

    def __init__(self, m: Machine, seconds: float) -> None:
        self.fired = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(m, seconds), daemon=True)
        self._thread.start()

    def _watch(self, m: Machine, seconds: float) -> None:
        if self._done.wait(seconds):
            return
        self.fired = True
        while True:
            m.hooks.uc.emu_stop()
            if self._done.wait(0.01):
                return

    def cancel(self) -> None:
        self._done.set()
        self._thread.join()
