"""What both arches share: the arch structs of a probe (struct arch_specific_insn, struct
arch_optimized_insn), the typed states they carry, and the breakpoint half of
arch_prepare/arm/disarm/remove_kprobe — a breakpoint written over the first bytes of the
probed instruction, an out-of-line slot `[copied insn][step trap]` from the insn-slot
pages, resumption at the next instruction after the step. The arch supplies the decoder."""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Callable

from emu.machine import Machine
from probes.errors import KprobeError
from probes.text_poke import text_poke_live

if TYPE_CHECKING:
    from emu.symbols import Symbol
    from probes.insn_slots import ProbePages
    from probes.kprobes import Kprobe
    from probes.regs import PtRegs


InsnHandler = Callable[["Kprobe", "PtRegs"], None]   # simulate_*/kprobe_emulate_*


class Verdict(StrEnum):
    """The decode verdict (arm64 decode-insn.h enum probes_insn), shared by both decoders;
    the values are the words `emu inspect` prints."""
    REJECTED = "rejected"
    GOOD_NO_SLOT = "simulate"      # the handler computes the effect, no slot
    GOOD = "out-of-line"           # stepped in the slot


class StepKind(StrEnum):
    """How a hit runs the probed instruction (`ainsn.kind`, the `step` of --stats)."""
    SIMULATE = "simulate"          # arm64 GOOD_NO_SLOT: simulate_*() on pt_regs
    EMULATE = "emulate"            # x86 emulate_op: the same idea, the kernel's word
    OUT_OF_LINE = "out-of-line"    # GOOD: stepped in the slot
    FTRACE = "ftrace"              # on an ftrace site: the nop is skipped, nothing stepped



class RpCheck(IntEnum):
    """enum rp_check (include/linux/uprobes.h): when a return instance's frame is tested."""
    CALL = 0            # a new instance is pushed at a function entry
    CHAIN_CALL = 1      # ... whose return address already is the trampoline (tail call)
    RET = 2             # the trampoline was reached


@dataclass
class ArchOptimizedInsn:
    """struct arch_optimized_insn: the detour and what it replaced."""
    detour: int                 # host entry point (start of the buffer)
    resume: int                 # the relocated copies (TMPL_END), where a queued hit resumes
    size: int                   # bytes of original text replaced by the jump
    code: bytes = b""
    copied: list[str] = field(default_factory=list)
    handle: int | None = None   # the host entry hook


@dataclass
class ArchSpecificInsn:
    """struct arch_specific_insn: the decode verdict and what it needs at a hit."""
    kind: StepKind
    length: int
    mnemonic: str
    handler: InsnHandler | None = None
    operands: object = None          # the handler's operands, decoded at prepare (arch data)
    slot: int | None = None
    slot_code: bytes = b""
    armed: bool = False
    boostable: bool = False
    boosted: bool = False
    optimized: bool = False          # the jump to the detour is in place
    optinsn: ArchOptimizedInsn | None = None    # once a detour was prepared
    opt_reason: str = ""             # why can_optimize said no
    ftrace: bool = False             # served by the ftrace site, no breakpoint

    @property
    def ss_trap(self) -> int | None:
        return None if self.slot is None else self.slot + self.length


class BreakpointKprobes(ABC):
    """The arch-independent half of arch_prepare/arm/disarm/remove_kprobe; a subclass is
    the arch's ArchKprobes and supplies `decode` and the class attributes below."""

    slot_size = 16                 # bytes of one out-of-line slot
    handler_ip_offset = 0          # x86 handlers see ip = addr + 1
    boost_supported = False        # may a slot jump back by itself (x86)?
    ss_break: bytes = b""          # the trap that ends a slot

    def __init__(self, machine: Machine, pages: "ProbePages") -> None:
        self.m = machine
        self.breakpoint = machine.arch.breakpoint
        self.pages = pages
        self.slots = pages.slots

    @abstractmethod
    def decode(self, addr: int, sym: "Symbol | None") -> ArchSpecificInsn:
        """The verdict for the instruction at `addr`; raises KprobeError if rejected."""

    def copy_to_slot(self, insn: ArchSpecificInsn, addr: int, slot: int) -> bytes:
        """The instruction bytes as they must stand in `slot` (x86 fixes RIP-relative)."""
        return self.m.original_text(addr, insn.length)

    def adjust_kprobe_addr(self, addr: int, sym: "Symbol") -> tuple[int, bool]:
        return addr, addr == sym.addr

    def prepare(self, p: "Kprobe") -> None:
        assert p.addr is not None
        sym = self.m.symbols.find(p.addr)
        insn = self.decode(p.addr, sym)
        p.opcode = self.m.original_text(p.addr, len(self.breakpoint))
        if insn.kind is StepKind.OUT_OF_LINE:
            slot = self.slots.get(near=p.addr)
            try:
                code = self.copy_to_slot(insn, p.addr, slot)
            except KprobeError:
                self.slots.put(slot)
                raise
            insn.slot, insn.slot_code = slot, code + self.ss_break
            self.m.text_poke(slot, insn.slot_code)
        p.ainsn = insn

    def arm(self, p: "Kprobe") -> None:
        assert p.addr is not None
        text_poke_live(self.m, p.addr, self.breakpoint)
        p.ainsn.armed = True

    def disarm(self, p: "Kprobe") -> None:
        assert p.addr is not None
        text_poke_live(self.m, p.addr, p.opcode)
        p.ainsn.armed = False

    def remove(self, p: "Kprobe") -> None:
        insn = p.ainsn
        if insn is not None and insn.slot is not None:
            self.slots.put(insn.slot)
            insn.slot = None

    def handler_ip(self, p: "Kprobe") -> int:
        assert p.addr is not None
        return p.addr + self.handler_ip_offset

    def in_slot(self, p: "Kprobe", addr: int) -> bool:
        slot = p.ainsn.slot
        return slot is not None and slot <= addr < slot + self.slot_size

    def owns(self, addr: int) -> bool:
        return self.pages.owns(addr)

    def boost(self, p: "Kprobe") -> bool:
        """Let later hits skip the step trap, where the arch can (x86); False if not."""
        return False

    def unboost(self, p: "Kprobe") -> None:
        """Undo `boost` (a post handler needs the step trap again)."""


def callback_at(addr: int, callback: Callable[[int, int], None]) -> Callable[[int], None]:
    """A host entry that calls `callback(addr, pc)` for the probe at `addr` (the detour's
    address is where the guest is; the probe's is what the callback needs). A partial,
    not a lambda: one Python frame less on every hit."""
    return functools.partial(callback, addr)


def reject(err: int, reason: str, addr: int) -> KprobeError:
    return KprobeError(err, reason, f"{addr:#x}")
