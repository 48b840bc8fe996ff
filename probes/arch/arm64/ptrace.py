"""arm64 `struct pt_regs` as BPF kprobe programs see it (arch/arm64/include/asm/ptrace.h).

A BPF_PROG_TYPE_KPROBE program's context is `bpf_user_pt_regs_t` = `struct
user_pt_regs` (regs[31], sp, pc, pstate: 272 bytes) at the start of the kernel's
pt_regs (336 bytes: orig_x0, syscallno, ... after it); the verifier bounds reads by the
kernel struct, so 272..335 are readable too. `PT_REGS_SLOTS` maps each CPU register to
its offset; `pack_pt_regs` builds the whole image from the probe layer's PtRegs view,
`unpack_pt_regs` writes back what changed."""
from __future__ import annotations

from typing import TYPE_CHECKING

from probes.regs import pack_pt_regs_image, unpack_pt_regs_image

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.regs import PtRegs

PT_REGS_FIELDS: tuple[str, ...] = tuple(f"x{i}" for i in range(31)) + ("sp", "pc", "pstate")
USER_PT_REGS_SIZE = 8 * len(PT_REGS_FIELDS)   # 272
PT_REGS_SIZE = 336                            # kernel struct pt_regs
ORIG_X0_OFF = 272
SYSCALLNO_OFF = 280                           # s32; kernel_entry stores NO_SYSCALL (-1)
PT_REGS_SLOTS: tuple[tuple[int, str], ...] = tuple((8 * i, n) for i, n in enumerate(PT_REGS_FIELDS))
PT_REGS_TEMPLATE = (bytes(SYSCALLNO_OFF) + b"\xff\xff\xff\xff"
                    + bytes(PT_REGS_SIZE - SYSCALLNO_OFF - 4))

# regs_query_register_offset (arch/arm64/kernel/ptrace.c regoffset_table): the names
# kprobe_events accepts as %REG, each to its pt_regs field.
REGS_OFFSET_NAMES: dict[str, str] = {
    **{f"x{i}": f"x{i}" for i in range(31)}, "lr": "x30", "sp": "sp", "pc": "pc",
    "pstate": "pstate"}
PT_REGS_CONST: dict[str, int] = {}

FRAME_POINTER = "x29"           # frame records: [x29] = caller's x29, [x29 + 8] = lr
# get_perf_callchain(regs) (bpf_get_stack/get_stackid): the frame-record unwinder starts
# from pc and x29 (kunwind_init_from_regs) and never reads lr, so at a function's first
# instruction its caller is not in the chain.
CALLCHAIN_ENTRY_RETURN = False
SYSCALL_PREFIX = "__arm64_sys_"

# The register view's facts (probes/regs.py): XZR reads as 0 and drops writes; an argument
# beyond x7 reads as 0 (regs_get_kernel_argument has no stack arguments on arm64).
ZERO_REGS = frozenset({"x31", "xzr"})
STACK_ARGS = False


# Registers narrower than their 8-byte slot (Unicorn fills only these bytes; the rest is 0)
NARROW = {"pstate": 0xFFFFFFFF}


def pack_pt_regs(regs: "PtRegs") -> bytearray:
    """The 336-byte pt_regs image of `regs` (user_pt_regs, then the kernel's tail)."""
    return pack_pt_regs_image(regs, PT_REGS_SLOTS, PT_REGS_TEMPLATE, NARROW)


def unpack_pt_regs(regs: "PtRegs", image: bytes | bytearray) -> None:
    """Write the registers whose value in `image` differs from `regs` back to the view."""
    unpack_pt_regs_image(regs, image, PT_REGS_SLOTS)


def entry_return_address(regs: "PtRegs") -> int:
    """At a function's first instruction the return address is still in lr."""
    return regs["x30"]


def override_function_with_return(regs: "PtRegs") -> None:
    """arch/arm64/kernel/probes/kprobes.c: pc = lr."""
    regs.ip = regs["x30"]


def set_call_return(m: "Machine", ret: int) -> None:
    """Make the next instruction a callee that returns to `ret` (bl's lr)."""
    m.set_reg("x30", ret)
