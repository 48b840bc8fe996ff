"""What both arches share: a breakpoint written over the first bytes of the probed
instruction, an out-of-line slot `[copied insn][step trap]` from the insn-slot pages, and
resumption at the next instruction after the step. The arch supplies the decoder."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Callable

from emu.machine import Machine
from probes.errors import KprobeError
from probes.insn_slots import InsnSlots

if TYPE_CHECKING:
    from emu.symbols import Symbol
    from probes.kprobes import Kprobe
    from probes.regs import PtRegs

KIND_SIMULATE = "simulate"     # arm64 GOOD_NO_SLOT: the handler computes the effect
KIND_EMULATE = "emulate"       # x86 emulate_op: the same idea, the kernel's word
KIND_SLOT = "out-of-line"      # GOOD: stepped in the slot


class RpCheck(IntEnum):
    """enum rp_check (include/linux/uprobes.h): when a return instance's frame is tested."""
    CALL = 0            # a new instance is pushed at a function entry
    CHAIN_CALL = 1      # ... whose return address already is the trampoline (tail call)
    RET = 2             # the trampoline was reached


@dataclass
class ArchSpecificInsn:
    """struct arch_specific_insn: the decode verdict and what it needs at a hit."""
    kind: str
    length: int
    mnemonic: str
    handler: Callable[["Kprobe", "PtRegs"], None] | None = None
    slot: int | None = None
    slot_code: bytes = b""
    armed: bool = False
    boostable: bool = False
    boosted: bool = False
    optimized: bool = False          # the jump to the detour is in place
    optinsn: object = None           # OptInsn once a detour was prepared
    opt_reason: str = ""             # why can_optimize said no
    ftrace: bool = False             # served by the ftrace site, no breakpoint

    @property
    def ss_trap(self) -> int | None:
        return None if self.slot is None else self.slot + self.length



class BreakpointKprobes:
    """The arch-independent half of arch_prepare/arm/disarm/remove_kprobe."""

    slot_size = 16
    handler_ip_offset = 0          # x86 handlers see ip = addr + 1

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.breakpoint = machine.arch.breakpoint
        self.slots = InsnSlots(machine, self.slot_size)
        # Trampolines and detour buffers: return trampoline, optprobe detours, ftrace.
        self.tramps = InsnSlots(machine, 64, name="[kprobe trampolines]")

    # --- supplied by the arch ---------------------------------------------------------------
    ss_break: bytes = b""

    def decode(self, addr: int, sym: "Symbol | None") -> ArchSpecificInsn:  # pragma: no cover
        raise NotImplementedError

    def copy_to_slot(self, insn: ArchSpecificInsn, addr: int, slot: int) -> bytes:
        """The instruction bytes as they must stand in `slot` (x86 fixes RIP-relative)."""
        return self.m.original_text(addr, insn.length)

    def adjust_kprobe_addr(self, addr: int, sym: "Symbol") -> tuple[int, bool]:
        return addr, addr == sym.addr

    # --- shared -----------------------------------------------------------------------------
    def prepare(self, p: "Kprobe") -> None:
        sym = self.m.symbols.find(p.addr)
        insn = self.decode(p.addr, sym)
        p.opcode = self.m.original_text(p.addr, len(self.breakpoint))
        if insn.kind == KIND_SLOT:
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
        self.m.text_poke(p.addr, self.breakpoint)
        p.ainsn.armed = True

    def disarm(self, p: "Kprobe") -> None:
        self.m.text_poke(p.addr, p.opcode)
        p.ainsn.armed = False

    def remove(self, p: "Kprobe") -> None:
        insn = p.ainsn
        if insn is not None and insn.slot is not None:
            self.slots.put(insn.slot)
            insn.slot = None

    def handler_ip(self, p: "Kprobe") -> int:
        return p.addr + self.handler_ip_offset

    def in_slot(self, p: "Kprobe", addr: int) -> bool:
        slot = p.ainsn.slot
        return slot is not None and slot <= addr < slot + self.slot_size

    def owns(self, addr: int) -> bool:
        return self.slots.owns(addr) or self.tramps.owns(addr)

    boost_supported = False

    def boost(self, p: "Kprobe") -> bool:
        """Let later hits skip the step trap, where the arch can (x86); False if not."""
        return False

    def unboost(self, p: "Kprobe") -> None:
        pass

    # --- optprobe support (arch/*/opt.py) ------------------------------------------------
    def can_optimize(self, p: "Kprobe", kp) -> tuple[bool, str]:
        return False, "no jump optimization on this arch"

    # --- kretprobe support ------------------------------------------------------------------
    kretprobe_trampoline_code: bytes = b""

    def map_kretprobe_trampoline(self, handler: Callable[[int], bool]) -> int:
        """Write the return trampoline into a probe-layer page; returns its address."""
        addr = self.tramps.get(near=self.m.entry or self.m.pc)
        self.m.text_poke(addr, self.kretprobe_trampoline_code)
        self.enter_trampoline(addr, handler)
        return addr

    def enter_trampoline(self, addr: int, handler: Callable[[int], bool]) -> None:  # pragma: no cover
        raise NotImplementedError

    def arch_prepare_kretprobe(self, ri, regs: "PtRegs", trampoline: int) -> bool:  # pragma: no cover
        """Save the real return address in `ri` (ret_addr, fp, stack = sp at entry) and
        put `trampoline` in its place; False if the guest's stack cannot be read or
        written (arch_uretprobe_hijack_return_addr: no hijack, the guest runs on)."""
        raise NotImplementedError

    def kretprobe_is_alive(self, ri, ctx: RpCheck, sp: int) -> bool:  # pragma: no cover
        """arch_uretprobe_is_alive: is the frame `ri` hijacked still on the stack at `sp`?"""
        raise NotImplementedError

    def kretprobe_hijack_intact(self, ri, trampoline: int) -> bool:
        """Does the hijacked return address still hold the trampoline, where the arch can
        tell (x86: the stack slot)? A stale instance's slot is often overwritten."""
        return True

    def kretprobe_fixup_return(self, regs: "PtRegs", ret_addr: int) -> None:
        """Registers as the trampoline leaves them besides ip (arm64: lr = ret_addr)."""

    def kretprobe_frame(self, m: Machine) -> int:  # pragma: no cover
        raise NotImplementedError

    def charge_kretprobe_return(self, m: Machine) -> None:  # pragma: no cover
        raise NotImplementedError


def callback_at(addr: int, callback: Callable[[int, int], None]) -> Callable[[int], None]:
    """A host entry that calls `callback(addr, pc)` for the probe at `addr` (the detour's
    address is where the guest is; the probe's is what the callback needs). A partial,
    not a lambda: one Python frame less on every hit."""
    return functools.partial(callback, addr)


def reject(err: int, reason: str, addr: int) -> KprobeError:
    return KprobeError(err, reason, f"{addr:#x}")


