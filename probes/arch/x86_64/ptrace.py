"""x86-64 `struct pt_regs` as BPF kprobe programs see it (arch/x86/include/asm/ptrace.h).

The context of a BPF_PROG_TYPE_KPROBE program is the kernel's pt_regs: 21 longs, 168
bytes. `PT_REGS_SLOTS` maps each CPU register to its offset; `pack_pt_regs` builds the
image from the probe layer's PtRegs view (its ip, so a pre handler's image shows probe
address + 1, as after an int3); `unpack_pt_regs` writes back what changed. The
frame-pointer and error-injection facts the BPF trace layer needs live here too
(asm/stacktrace.h, kprobes/core.c override_function_with_return)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from emu.uaccess import get_user, put_user
from probes.arch import arch_probes_of
from probes.regs import pack_pt_regs_image, unpack_pt_regs_image

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.regs import PtRegs

# Kernel field order; orig_ax is no CPU register.
PT_REGS_FIELDS: tuple[str, ...] = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
    "rdx", "rsi", "rdi", "orig_ax", "rip", "cs", "rflags", "rsp", "ss")
PT_REGS_SIZE = 8 * len(PT_REGS_FIELDS)        # sizeof(struct pt_regs) = 168
USER_PT_REGS_SIZE = PT_REGS_SIZE              # bpf_user_pt_regs_t is pt_regs itself
ORIG_AX_OFF = 8 * PT_REGS_FIELDS.index("orig_ax")
PT_REGS_SLOTS: tuple[tuple[int, str], ...] = tuple(
    (8 * i, n) for i, n in enumerate(PT_REGS_FIELDS) if n != "orig_ax")
# int3 enters with orig_ax = -1 (no syscall); every other non-register byte is 0.
PT_REGS_TEMPLATE = bytes(ORIG_AX_OFF) + b"\xff" * 8 + bytes(PT_REGS_SIZE - ORIG_AX_OFF - 8)

# regs_query_register_offset (arch/x86/kernel/ptrace.c regoffset_table, x86-64): the names
# kprobe_events accepts as %REG, each to its pt_regs field. orig_ax is no CPU register.
REGS_OFFSET_NAMES: dict[str, str] = {
    **{f"r{i}": f"r{i}" for i in range(15, 7, -1)},
    "bx": "rbx", "cx": "rcx", "dx": "rdx", "si": "rsi", "di": "rdi", "bp": "rbp", "ax": "rax",
    "orig_ax": "orig_ax", "ip": "rip", "cs": "cs", "flags": "rflags", "sp": "rsp", "ss": "ss"}
# pt_regs fields that are no CPU register, with their value at a breakpoint (int3: -1)
PT_REGS_CONST: dict[str, int] = {"orig_ax": 0xFFFFFFFFFFFFFFFF}

FRAME_POINTER = "rbp"         # the frame pointer the kernel's FP unwinder follows
# get_perf_callchain(regs) (bpf_get_stack/get_stackid): the ORC unwinder (x86-64's
# default) finds the return address at sp at a function's first instruction, so the
# caller is in the chain.
CALLCHAIN_ENTRY_RETURN = True
SYSCALL_PREFIX = "__x64_sys_"  # SYSCALL_DEFINE wrappers, as libbpf's ksyscall resolves them

# The register view's facts (probes/regs.py): no zero register; arguments beyond the six
# registers are on the stack, after the return address (regs_get_kernel_argument).
ZERO_REGS: frozenset[str] = frozenset()
STACK_ARGS = True


# Registers narrower than their 8-byte slot (Unicorn fills only these bytes; the rest is 0)
NARROW = {"cs": 0xFFFF, "ss": 0xFFFF}


def pack_pt_regs(regs: "PtRegs") -> bytearray:
    """The 168-byte pt_regs image of `regs`."""
    return pack_pt_regs_image(regs, PT_REGS_SLOTS, PT_REGS_TEMPLATE, NARROW)


def unpack_pt_regs(regs: "PtRegs", image: bytes | bytearray) -> None:
    """Write the registers whose value in `image` differs from `regs` back to the view."""
    unpack_pt_regs_image(regs, image, PT_REGS_SLOTS)


def entry_return_address(regs: "PtRegs") -> int:
    """At a function's first instruction the return address is the word at sp."""
    return get_user(regs.machine.memory, regs.sp)


def set_call_return(m: "Machine", ret: int) -> None:
    """Make the next instruction a callee that returns to `ret` (call's pushed word)."""
    put_user(m.memory, m.sp - 8, ret)     # raises UserFault before sp moves
    m.sp = m.sp - 8


def just_return_func(machine: "Machine") -> int:
    """The kernel's just_return_func: a lone `ret` in the probe layer's trampoline pages
    (made once per machine)."""
    def make(m: "Machine") -> int:
        addr = arch_probes_of(m).pages.tramps.get(near=m.pc)
        m.text_poke(addr, b"\xc3")
        return addr
    addr: int = machine.layer("just_return_func", make)
    return addr


def override_function_with_return(regs: "PtRegs") -> None:
    """arch/x86/kernel/kprobes/core.c: ip = just_return_func, whose `ret` pops the return
    address the probed function's caller pushed (sp is untouched, so this also holds on
    ftrace-based probes, which ignore a changed sp)."""
    regs.ip = just_return_func(regs.machine)
