"""x86-64 kprobes (arch/x86/kernel/kprobes/core.c): int3 at the probe, emulation of
control flow, or a slot `[copied insn with RIP-relative disp fixed][int3]`."""
from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from emu.machine import Machine
from emu.symbols import Symbol
from probes.arch.common import (ArchSpecificInsn, BreakpointKprobes, InsnHandler, StepKind,
                                Verdict, reject)
from probes.errors import KprobeError
from probes.arch.x86_64 import emulate as em
from probes.arch.x86_64.decode import (
    X86Decoder,
    X86Insn,
    can_boost,
    copy_refusal,
    exception_insn,
    modrm_mod,
    modrm_reg,
    modrm_rm,
)

if TYPE_CHECKING:
    from probes.insn_slots import ProbePages
    from probes.kprobes import Kprobe

MAX_INSN_SIZE, JMP32_INSN_SIZE = 15, 5
SLOT_SIZE = 16

ENDBR64, ENDBR32, ENDBR_POISON = b"\xf3\x0f\x1e\xfa", b"\xf3\x0f\x1e\xfb", b"\x66\x0f\x1f\x00"


class X86Kprobes(BreakpointKprobes):
    """ArchKprobes for x86-64: emulation, or a slot that is boosted after its first step."""

    slot_size = SLOT_SIZE           # MAX_INSN_SIZE + the trailing int3, 16-byte aligned
    handler_ip_offset = 1           # handlers see ip = addr + 1, as after int3
    boost_supported = True
    trap_intno = 3                  # #BP: the exception int3 raises (the C hit path)
    trap_pc_adjust = -1             # ... reported with rip after the int3
    ss_break = b"\xcc"

    def __init__(self, machine: Machine, pages: "ProbePages") -> None:
        super().__init__(machine, pages)
        self.decoder = X86Decoder()

    def adjust_kprobe_addr(self, addr: int, sym: Symbol) -> tuple[int, bool]:
        """IBT: offsets 0 and 4 of a function starting with ENDBR both mean its entry."""
        offset = addr - sym.addr
        if self.m.original_text(sym.addr, 4) in (ENDBR64, ENDBR32, ENDBR_POISON) and offset in (0, 4):
            return sym.addr + 4, True
        return addr, offset == 0

    def decode_at(self, addr: int) -> X86Insn | None:
        return self.decoder.decode(self.m.original_text(addr, 16), addr)

    def _on_boundary(self, addr: int, sym: Symbol | None) -> bool:
        """can_probe(): decode from the function start; the probe must land on a boundary."""
        if sym is None or addr == sym.addr:
            return True
        code = self.m.original_text(sym.addr, addr - sym.addr + 16)
        for a, _n in self.decoder.lengths(code, sym.addr):
            if a == addr:
                return True
            if a > addr:
                return False
        return False

    def decode(self, addr: int, sym: Symbol | None) -> ArchSpecificInsn:
        if not self._on_boundary(addr, sym):
            raise reject(errno.EILSEQ, "address is not on an instruction boundary", addr)
        insn = self.decode_at(addr)
        if insn is None:
            raise reject(errno.EILSEQ, "cannot decode the instruction", addr)
        if exception_insn(insn):
            raise reject(errno.EILSEQ, f"cannot probe `{insn.text}`: trap or undefined instruction", addr)
        why = copy_refusal(insn)
        if why:
            raise reject(errno.EINVAL, f"cannot probe `{insn.text}`: {why}", addr)
        handler = self.prepare_emulation(insn)
        verdict = Verdict.GOOD if handler is None else Verdict.GOOD_NO_SLOT
        kind = StepKind.OUT_OF_LINE if verdict is Verdict.GOOD else StepKind.EMULATE
        boostable = verdict is Verdict.GOOD and can_boost(insn) \
            and insn.length + JMP32_INSN_SIZE <= MAX_INSN_SIZE
        return ArchSpecificInsn(kind=kind, length=insn.length, mnemonic=insn.text, handler=handler,
                                boostable=boostable)

    def boost(self, p: "Kprobe") -> bool:
        """After a successful single-step: put `jmp addr+len` behind the copy in the slot, so
        later hits need no second trap (the kernel's boosting)."""
        ainsn = p.ainsn
        if not ainsn.boostable or ainsn.boosted or ainsn.slot is None:
            return False
        jmp_at = ainsn.slot + ainsn.length
        assert p.addr is not None
        rel = p.addr + ainsn.length - (jmp_at + JMP32_INSN_SIZE)
        jmp = b"\xe9" + struct.pack("<i", rel)
        self.m.text_poke(jmp_at, jmp)
        ainsn.slot_code = ainsn.slot_code[:ainsn.length] + jmp
        ainsn.boosted = True
        return True

    def unboost(self, p: "Kprobe") -> None:
        ainsn = p.ainsn
        if ainsn.boosted:
            self.m.text_poke(ainsn.slot + ainsn.length, self.ss_break + bytes(JMP32_INSN_SIZE - 1))
            ainsn.slot_code = ainsn.slot_code[:ainsn.length] + self.ss_break
            ainsn.boosted = False

    def prepare_emulation(self, insn: X86Insn) -> InsnHandler | None:
        """prepare_emulation(): the emulate_op for control flow and IF modifiers, or None to
        single-step; raises -EOPNOTSUPP for what the kernel will not handle."""
        op, raw, n, addr = insn.op1, insn.raw, insn.length, insn.addr

        def refuse(what: str) -> KprobeError:
            return reject(errno.EOPNOTSUPP, f"cannot probe `{insn.text}`: {what}", addr)

        def rel(size: int) -> int:
            value: int = struct.unpack("<b" if size == 1 else "<i", raw[n - size:])[0]
            return value

        if op in (0xFA, 0xFB, 0x9C, 0x9D):
            return em.make_ifmodifier(op, 2 if 0x66 in insn.prefixes else 8)
        if 0x66 in insn.prefixes and _near_branch(insn):
            raise refuse("operand-size prefixed near branch (16-bit ip) is not emulated")
        if op == 0xC3:
            return em.make_ret(0)
        if op == 0xC2:
            return em.make_ret(struct.unpack("<H", raw[n - 2:])[0])
        if op in (0xCA, 0xCB):
            raise refuse("far return")
        if op in (0x9A, 0xEA):
            raise refuse("far call/jmp is not emulated")
        if op in (0xCC, 0xCD, 0xCE, 0xCF):
            raise refuse("interrupt-related instruction")
        if op == 0xE8:
            return em.make_call(rel(4))
        if op in (0xE9, 0xEB):
            return em.make_jmp(rel(4 if op == 0xE9 else 1))
        if 0x70 <= op <= 0x7F:
            return em.make_jcc(op & 0xF, rel(1))
        if op == 0x0F and len(insn.opcode) > 1:
            op2 = insn.opcode[1]
            if op2 & 0xF0 == 0x80:
                return em.make_jcc(op2 & 0xF, rel(4))
            if op2 == 0x05:
                return em.make_syscall()
            if op2 == 0x01 and insn.modrm is not None and modrm_reg(insn.modrm) == 0 \
                    and modrm_mod(insn.modrm) == 3:
                raise refuse("VM extension instruction")
            return None
        if 0xE0 <= op <= 0xE3:
            return em.make_loop(op, rel(1), 32 if insn.addr_bytes == 4 else 64)
        if op == 0xFF and insn.modrm is not None:
            reg = modrm_reg(insn.modrm)
            if reg in (3, 5):
                raise refuse("far indirect call/jmp")
            if reg not in (2, 4):
                return None
            if insn.addr_bytes != 8 or modrm_mod(insn.modrm) != 3:
                raise refuse("indirect call/jmp through memory is not emulated")
            return em.make_indirect(modrm_rm(insn.modrm) + (8 if insn.rex & 1 else 0), call=reg == 2)
        return None

    def copy_to_slot(self, ainsn: ArchSpecificInsn, addr: int, slot: int) -> bytes:
        """__copy_instruction(): copy, fixing a RIP-relative displacement for the slot."""
        insn = self.decode_at(addr)
        assert insn is not None                 # decode() accepted it
        code = bytearray(insn.raw)
        off = insn.rip_disp_offset
        if off is not None:
            disp = struct.unpack_from("<i", code, off)[0]
            new = disp + addr - slot
            if not -(1 << 31) <= new < (1 << 31):
                raise reject(errno.ERANGE, "RIP-relative target out of reach of the slot", addr)
            struct.pack_into("<i", code, off, new)
        return bytes(code)


def _near_branch(insn: X86Insn) -> bool:
    """ret/call/jmp/Jcc near forms whose 66 prefix the CPU honours (ip truncated to 16 bits,
    rel16): the kernel's decoder and ours would emulate them as 64-bit."""
    op = insn.op1
    if op in (0xC2, 0xC3, 0xE8, 0xE9, 0xEB) or 0x70 <= op <= 0x7F:
        return True
    if op == 0x0F and len(insn.opcode) > 1 and insn.opcode[1] & 0xF0 == 0x80:
        return True
    return op == 0xFF and insn.modrm is not None and modrm_reg(insn.modrm) in (2, 4)
