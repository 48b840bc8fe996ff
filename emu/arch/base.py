"""What the machine needs to know about an architecture, as data plus a few verbs.

An arch is a frozen object of class attributes in the archinfo manner: register ids,
calling convention, syscall ABI and numbers, the breakpoint and halt encodings, and the
hooks that turn the CPU's traps into the machine's arch-neutral events.

emu/arch imports nothing above it: the verbs take the machine as a `CpuHost`, the narrow
protocol below (registers, raw hooks, memory, the counter clock and the trap events), which
`emu.machine.Machine` satisfies."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

# The Python 3 binding by its module: type checkers read `unicorn.Uc` as the Python 2 one.
from unicorn.unicorn_py3.unicorn import Uc

# Linux's page size and PROT_* bits (the arch maps a page of its own on x86: the GDT).
PAGE = 0x1000
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4

BreakHandler = Callable[[int], bool]    # (trap address) -> handled?


class RegFile(Protocol):
    def read(self, reg_id: int) -> int: ...
    def write(self, reg_id: int, value: int) -> None: ...


class HookTable(Protocol):
    """Raw Unicorn hooks whose exceptions the machine re-raises (emu/ucfast.py RawHooks)."""
    def intr(self, fn: Callable[[int], None]) -> int: ...
    def insn_syscall(self, fn: Callable[[], None], insn_id: int) -> int: ...
    def insn_counter(self, fn: Callable[[], int], insn_id: int) -> int: ...


class MappedMemory(Protocol):
    def read_safe(self, addr: int, size: int) -> bytes | None: ...
    def write(self, addr: int, data: bytes) -> None: ...
    def map(self, start: int, size: int, prot: int, name: str) -> None: ...
    def protect(self, start: int, size: int, prot: int) -> None: ...
    def note_region(self, start: int, size: int, name: str) -> None: ...


class CounterClock(Protocol):
    """The clock as the CPU's counter registers read it (rdtsc, cntvct_el0, pmccntr_el0)."""
    @property
    def counter_hz(self) -> int: ...
    def read_cycles(self) -> int: ...
    def read_counter(self) -> int: ...


class CpuHost(Protocol):
    """The machine as an arch sees it: the CPU, its raw hooks, memory, the clock, the
    trap owners' fast table, and the arch-neutral events the arch hooks report."""
    @property
    def uc(self) -> Uc: ...
    @property
    def regs(self) -> RegFile: ...
    @property
    def hooks(self) -> HookTable: ...
    @property
    def memory(self) -> MappedMemory: ...
    @property
    def clock(self) -> CounterClock: ...
    @property
    def break_addrs(self) -> dict[int, BreakHandler]: ...
    @property
    def user_mode(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def pc(self) -> int: ...
    @property
    def cpu(self) -> int: ...           # the vCPU running (rdtscp's TSC_AUX)
    def on_break(self, addr: int, code: int | None = None) -> None: ...
    def on_syscall(self, insn_hook: bool = False) -> None: ...
    def for_each_uc(self, setup: Callable[[Uc], object]) -> None: ...
    def on_undefined(self, addr: int) -> None: ...
    def on_privileged(self, addr: int) -> None: ...
    def on_cpu_exception(self, addr: int, intno: int) -> None: ...
    def request_halt(self, addr: int | None = None) -> None: ...
    def request_exit(self, code: int) -> None: ...
    def console_write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class Arch(ABC):
    name: str                      # one of emu.arch.ARCH_NAMES
    uc_arch: int
    uc_mode: int
    cs_arch: int
    cs_mode: int
    ks_arch: int
    ks_mode: int
    elf_machine: str               # pyelftools e_machine name
    regs: dict[str, int]           # register name -> Unicorn id
    pc: str
    sp: str
    ret: str                       # return-value register
    args: tuple[str, ...]          # argument registers of the C calling convention
    link: str | None               # link register, if the arch has one
    syscall_nr: str
    syscall_args: tuple[str, ...]
    syscall_ret: str
    syscalls: dict[str, int]       # syscall name -> number
    breakpoint: bytes              # the kprobe breakpoint (BRK #4 / int3)
    insn_align: int                # alignment of instruction addresses
    max_insn_size: int
    platform: str                  # AT_PLATFORM string
    hwcap: int
    hwcap2: int
    bare_base: int                 # documented bare-metal RAM base/size and stack top
    bare_ram_size: int
    bare_stack_top: int
    flags_reg: str
    halt_size: int                 # bytes of the halt instruction (x86 reports pc after it)
    halt_insn: bytes               # the halt instruction (`hlt #0` / `hlt`): ends a bare run
    halt_asm: str                  # the same, as the assembler spells it
    cpu_profile: str               # the cycle model's default CPU profile (emu/cycles/profiles)
    aliases: dict[str, str] = field(default_factory=dict)
    exception_names: dict[int, str] = field(default_factory=dict)   # CPU exception number -> kind
    # The signal Linux sends a process that runs a privileged instruction: SIGSEGV for the
    # #GP of x86, SIGILL for arm64's undefined-at-EL0.
    privileged_signal: int = 11
    # TASK_SIZE: the end of the user address space mmap and friends may reach. arm64 keeps
    # the 47-bit space the project has always given it (Linux with VA_BITS 48 allows 2^48).
    task_size: int = 1 << 47
    # How far Unicorn moves the pc after a syscall hook returns: x86's hook runs with the pc
    # on the 2-byte `syscall` and adds its length afterwards; arm64's runs past the `svc`.
    syscall_pc_step: int = 0
    # The length of the syscall instruction (`svc #0`; x86 `syscall` is 2): a restarted
    # call resumes this far back.
    syscall_insn_size: int = 4
    # clone's argument order after newsp, as indices into (ptid, arg3, arg4) of (tls, ctid):
    # x86-64 (ptid, ctid, tls); arm64, CONFIG_CLONE_BACKWARDS (ptid, tls, ctid).
    clone_tls_ctid: tuple[int, int] = (1, 2)

    @abstractmethod
    def install_hooks(self, m: CpuHost) -> None:
        """Turn the CPU's traps (breakpoints, syscalls, undefined and privileged
        instructions, counter reads) into the host's events."""

    @abstractmethod
    def set_tls(self, m: CpuHost, value: int) -> None:
        """The thread pointer register (arm64 tpidr_el0, x86 fs_base)."""

    @abstractmethod
    def install_bare_devices(self, m: CpuHost) -> None:
        """The bare-metal console and exit device (README's memory map)."""

    @abstractmethod
    def reset_cpu(self, m: CpuHost) -> None:
        """The state of a new CPU, before any mode is chosen: the privileged (bare-metal)
        mode, with the floating-point unit as software finds it after its reset."""

    @abstractmethod
    def start_thread(self, m: CpuHost, pc: int, sp: int) -> None:
        """Linux's start_thread: enter user mode (x86 CPL3 / arm64 EL0) at pc with stack sp,
        in the register state a new process gets from exec."""

    @abstractmethod
    def cpu_state(self, m: CpuHost) -> dict[str, int]:
        """The control state tests and reports compare: privilege level and FP control."""

    @abstractmethod
    def halted(self, m: CpuHost) -> bool:
        """Did the last emu_start end on the arch's halt instruction?"""

    @abstractmethod
    def waited(self, m: CpuHost) -> bool:
        """Did the last emu_start end on a wait-for-interrupt a user process steps over
        (arm64 WFI, which halts Unicorn's CPU)?"""

    @abstractmethod
    def pack_stat(self, st: dict[str, Any]) -> bytes:
        """The arch's Linux `struct stat` from a dict of fields."""

    @abstractmethod
    def break_code(self, m: CpuHost, addr: int) -> int:
        """The trap code of the breakpoint at addr (arm64: the BRK immediate)."""

    def reg_id(self, name: str) -> int:
        name = self.aliases.get(name, name)
        return self.regs[name]

    @property
    def syscall_names(self) -> dict[int, str]:
        return {nr: name for name, nr in self.syscalls.items()}
