"""x86-64 `struct pt_regs` as BPF kprobe programs see it (arch/x86/include/asm/ptrace.h).

The context of a BPF_PROG_TYPE_KPROBE program is the kernel's pt_regs: 21 longs, 168
bytes. `pack_pt_regs` builds that image from the probe layer's PtRegs view (the ip is the
view's, so a pre handler's image shows probe address + 1, as after an int3);
`unpack_pt_regs` writes back what changed. The frame-pointer and error-injection facts
the BPF trace layer needs live here too (asm/stacktrace.h, asm/error-injection.h)."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from emu.uaccess import get_user

if TYPE_CHECKING:
    from probes.regs import PtRegs

# Kernel field order (uapi names in the comment); None = not a CPU register here.
PT_REGS_FIELDS: tuple[str, ...] = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
    "rdx", "rsi", "rdi", "orig_ax", "rip", "cs", "rflags", "rsp", "ss")
PT_REGS_SIZE = 8 * len(PT_REGS_FIELDS)        # sizeof(struct pt_regs) = 168
USER_PT_REGS_SIZE = PT_REGS_SIZE              # bpf_user_pt_regs_t is pt_regs itself
_PACK = struct.Struct(f"<{len(PT_REGS_FIELDS)}Q")
_ORIG_AX_TRAP = (1 << 64) - 1                 # int3 enters with orig_ax = -1 (no syscall)
_CPU_FIELDS = tuple(n for n in PT_REGS_FIELDS if n != "orig_ax")

FRAME_POINTER = "rbp"         # the frame pointer the kernel's FP unwinder follows
SYSCALL_PREFIX = "__x64_sys_"  # SYSCALL_DEFINE wrappers, as libbpf's ksyscall resolves them


def pack_pt_regs(regs: "PtRegs") -> bytearray:
    """The 168-byte pt_regs image of `regs`."""
    return bytearray(_PACK.pack(*[_ORIG_AX_TRAP if n == "orig_ax" else regs[n]
                                  for n in PT_REGS_FIELDS]))


def unpack_pt_regs(regs: "PtRegs", image: bytes | bytearray) -> None:
    """Write the registers whose value in `image` differs from `regs` back to the view."""
    for name, value in zip(PT_REGS_FIELDS, _PACK.unpack_from(image)):
        if name in _CPU_FIELDS and regs[name] != value:
            regs[name] = value


def entry_return_address(regs: "PtRegs") -> int:
    """At a function's first instruction the return address is the word at sp."""
    return get_user(regs.machine.memory, regs.sp)


def override_function_with_return(regs: "PtRegs") -> None:
    """arch/x86/kernel/kprobes/core.c: ip = just_return_func, a lone `ret`. Here the `ret`
    is applied to the view directly: ip = the return address at sp, sp += 8."""
    regs.ip = entry_return_address(regs)
    regs.sp = regs.sp + 8
