"""What the machine needs to know about an architecture, as data plus a few verbs.

An arch is a frozen object of class attributes in the archinfo manner: register ids,
calling convention, syscall ABI and numbers, the breakpoint encoding, and the hooks that
turn the CPU's traps into the machine's arch-neutral events."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emu.machine import Machine


@dataclass(frozen=True)
class Arch:
    name: str                      # "arm64" | "x86_64"
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
    aliases: dict[str, str] = field(default_factory=dict)
    exception_names: dict[int, str] = field(default_factory=dict)   # CPU exception number -> kind
    # The signal Linux sends a process that runs a privileged instruction: SIGSEGV for the
    # #GP of x86, SIGILL for arm64's undefined-at-EL0.
    privileged_signal: int = 11
    # TASK_SIZE: the end of the user address space mmap and friends may reach. arm64 keeps
    # the 47-bit space the project has always given it (Linux with VA_BITS 48 allows 2^48).
    task_size: int = 1 << 47

    def install_hooks(self, machine: "Machine") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_tls(self, machine: "Machine", value: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def install_bare_devices(self, machine: "Machine") -> None:  # pragma: no cover
        raise NotImplementedError

    def reset_cpu(self, machine: "Machine") -> None:  # pragma: no cover
        """The state of a new CPU, before any mode is chosen: the privileged (bare-metal)
        mode, with the floating-point unit as software finds it after its reset."""
        raise NotImplementedError

    def start_thread(self, machine: "Machine", pc: int, sp: int) -> None:  # pragma: no cover
        """Linux's start_thread: enter user mode (x86 CPL3 / arm64 EL0) at pc with stack sp,
        in the register state a new process gets from exec."""
        raise NotImplementedError

    def cpu_state(self, machine: "Machine") -> dict[str, int]:  # pragma: no cover
        """The control state tests and reports compare: privilege level and FP control."""
        raise NotImplementedError

    def halted(self, machine: "Machine") -> bool:  # pragma: no cover
        """Did the last emu_start end on the arch's halt instruction?"""
        raise NotImplementedError

    def waited(self, machine: "Machine") -> bool:  # pragma: no cover
        """Did the last emu_start end on a wait-for-interrupt a user process steps over
        (arm64 WFI, which halts Unicorn's CPU)?"""
        raise NotImplementedError

    def pack_stat(self, st: dict) -> bytes:  # pragma: no cover
        """The arch's Linux `struct stat` from a dict of fields."""
        raise NotImplementedError

    def break_code(self, machine: "Machine", addr: int) -> int:  # pragma: no cover
        """The trap code of the breakpoint at addr (arm64: the BRK immediate)."""
        raise NotImplementedError

    def reg_id(self, name: str) -> int:
        name = self.aliases.get(name, name)
        return self.regs[name]

    @property
    def syscall_names(self) -> dict[int, str]:
        return {nr: name for name, nr in self.syscalls.items()}


