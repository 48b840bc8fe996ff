"""x86-64 optprobes (arch/x86/kernel/kprobes/opt.c): `jmp rel32` over the first ≥5 bytes
of whole instructions, to a detour buffer `[host entry][relocated copies][jmp back]`.

The kernel's template saves pt_regs on the stack and calls optimized_callback; here the
detour's first byte is a host entry (the registers are the CPU's own), charged as the
modelled cost of that save/restore."""
from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Callable

from emu.machine import Machine
from emu.symbols import Symbol
from probes.arch.common import ArchOptimizedInsn, callback_at
from probes.arch.x86_64.decode import X86Decoder, X86Insn, can_boost, modrm_reg
from probes.errors import OptimizeRefused
from probes.reserved_text import ReservedText, TextUse
from probes.text_poke import text_poke_live

if TYPE_CHECKING:
    from probes.insn_slots import ProbePages
    from probes.kprobes import Kprobe

JMP32_INSN_SIZE = 5
MAX_OPTIMIZED_LENGTH = 19            # MAX_INSN_SIZE + DISP32_SIZE
JUMP_OPCODES = set(range(0x70, 0x80)) | {0xE0, 0xE1, 0xE2, 0xE3, 0xE9, 0xEB}


def _refuse(reason: str, err: int = errno.EINVAL) -> OptimizeRefused:
    return OptimizeRefused(err, reason)


def jump_target(insn: X86Insn) -> int | None:
    """The target of a relative jump (insn_jump_into_range's view), else None."""
    op, raw, n = insn.op1, insn.raw, insn.length
    if op in JUMP_OPCODES:
        size = 4 if op == 0xE9 else 1
        rel: int = struct.unpack("<i" if size == 4 else "<b", raw[n - size:])[0]
        return insn.addr + n + rel
    if op == 0x0F and len(insn.opcode) > 1 and insn.opcode[1] & 0xF0 == 0x80:
        rel32: int = struct.unpack("<i", raw[n - 4:])[0]
        return insn.addr + n + rel32
    return None


def indirect_jump(insn: X86Insn) -> bool:
    if insn.op1 == 0xEA:
        return True
    return insn.op1 == 0xFF and insn.modrm is not None and modrm_reg(insn.modrm) in (4, 5)


class X86Optprobes:
    """ArchOptprobes for x86-64: `jmp rel32` over whole instructions to a detour."""

    def __init__(self, machine: Machine, pages: "ProbePages", decoder: X86Decoder) -> None:
        self.m = machine
        self.tramps = pages.tramps
        self.decoder = decoder
        self.breakpoint = machine.arch.breakpoint

    def bpf_thunk(self, p: "Kprobe | None", at: int, ip: int, entries: list[int], active: int,
                  counters: int, stack: int, slots: frozenset[int] | None = None,
                  resume: int | None = None, ip_word: int | None = None,
                  ctx: int | None = None, this_cpu: int | None = None,
                  budget: int | None = None, tcc: int | None = None) -> bytes:
        """`resume`: where the thunk ends (default: the detour's relocated copies);
        `ip_word`: where the frame's ip is read from (a return's address), not `ip`;
        `ctx`: the programs' context (a tracepoint's record), not the frame; `this_cpu`:
        the running CPU's guard address and stack top are the two u64 there, not `active`
        and `stack`; `budget`, `tcc`: see bpf_thunk."""
        if resume is None:
            assert p is not None and p.ainsn.optinsn is not None
            resume = p.ainsn.optinsn.resume
        return bpf_thunk(at, ip, entries, active, counters, resume,
                         self.m.reg("cs"), self.m.reg("ss"), stack, slots, ip_word, ctx,
                         this_cpu, budget, tcc)

    def _function_insns(self, sym: Symbol) -> list[X86Insn] | None:
        code = self.m.original_text(sym.addr, sym.size)
        out, off = [], 0
        while off < len(code):
            insn = self.decoder.decode(code[off:off + 16], sym.addr + off)
            if insn is None:
                return None
            out.append(insn)
            off += insn.length
        return out

    def _replaced(self, insns: list[X86Insn], addr: int) -> list[X86Insn]:
        """The whole instructions from `addr` that the 5-byte jump covers."""
        size, copied = 0, []
        for i in insns:
            if i.addr < addr:
                continue
            if size >= JMP32_INSN_SIZE:
                break
            copied.append(i)
            size += i.length
        return copied

    def _function_of(self, p: "Kprobe") -> tuple[Symbol, list[X86Insn]]:
        assert p.addr is not None
        sym = self.m.symbols.find(p.addr)
        if sym is None or not sym.size:
            raise _refuse("not inside a known function")
        insns = self._function_insns(sym)
        if insns is None:
            raise _refuse("the function does not decode")
        return sym, insns

    def can_optimize(self, p: "Kprobe", reserved: ReservedText) -> None:
        """can_optimize() + the copy rules + arch_check_optimized_kprobe()."""
        assert p.addr is not None
        _sym, insns = self._function_of(p)
        if any(indirect_jump(i) for i in insns):
            raise _refuse("the function contains an indirect jump")
        for i in insns:
            t = jump_target(i)
            if t is not None and p.addr + 1 <= t <= p.addr + JMP32_INSN_SIZE:
                raise _refuse(f"a jump at {i.addr:#x} lands inside the replaced bytes")
        copied = self._replaced(insns, p.addr)
        for i in copied:
            if not can_boost(i):
                raise _refuse(f"`{i.text}` at {i.addr:#x} cannot be relocated to the detour")
        size = sum(i.length for i in copied)
        if size < JMP32_INSN_SIZE:
            raise _refuse("fewer than 5 bytes of instructions before the function end")
        if size > MAX_OPTIMIZED_LENGTH:
            raise _refuse("the replaced instructions are too long", errno.E2BIG)
        for r in reserved.overlapping(p.addr + 1, p.addr + size, TextUse.KPROBE):
            if r.owner is not p.ainsn:
                raise _refuse("another kprobe is armed inside the replaced bytes (-EEXIST)",
                              errno.EEXIST)

    def prepare_optimized_kprobe(self, p: "Kprobe",
                                 callback: Callable[[int, int], None]) -> ArchOptimizedInsn:
        assert p.addr is not None
        _sym, insns = self._function_of(p)
        detour = self.tramps.get(near=p.addr)
        copies, size, texts = bytearray(), 0, []
        for i in self._replaced(insns, p.addr):
            copy = bytearray(i.raw)
            if i.rip_disp_offset is not None:
                new_at = detour + 1 + size
                disp = struct.unpack_from("<i", copy, i.rip_disp_offset)[0] + i.addr - new_at
                struct.pack_into("<i", copy, i.rip_disp_offset, disp)
            copies += copy
            size += i.length
            texts.append(i.text)
        back_at = detour + 1 + size
        jmp = b"\xe9" + struct.pack("<i", p.addr + size - (back_at + JMP32_INSN_SIZE))
        code = b"\x90" + bytes(copies) + jmp
        self.m.text_poke(detour, code)
        oi = ArchOptimizedInsn(detour=detour, resume=detour + 1, size=size, code=code, copied=texts)
        oi.handle = self.m.add_host_entry(detour, callback_at(p.addr, callback))
        return oi

    def arch_optimize_kprobe(self, p: "Kprobe", target: int | None = None) -> None:
        """The jump to the detour (or to `target`: a thunk that ends in the detour's copies)."""
        assert p.addr is not None
        oi = p.ainsn.optinsn
        rel = (oi.detour if target is None else target) - (p.addr + JMP32_INSN_SIZE)
        text_poke_live(self.m, p.addr, b"\xe9" + struct.pack("<i", rel))

    def arch_unoptimize_kprobe(self, p: "Kprobe") -> None:
        assert p.addr is not None
        # int3 and the bytes the jump covered: text_poke_bp writes the int3 first
        text_poke_live(self.m, p.addr, self.breakpoint +
                       self.m.original_text(p.addr + 1, JMP32_INSN_SIZE - 1))

    def detour_orig_addr(self, p: "Kprobe", pc: int) -> int | None:
        """The original instruction a detour address runs a copy of (copies keep their
        lengths); None outside the copies."""
        assert p.addr is not None
        oi = p.ainsn.optinsn
        off = pc - oi.resume
        return p.addr + off if 0 <= off < oi.size else None

    def free_optimized_kprobe(self, p: "Kprobe") -> None:
        oi = p.ainsn.optinsn
        self.m.remove_host_entry(oi.handle)
        self.tramps.put(oi.detour)


# --- the BPF optprobe thunk ----------------------------------------------------------------

RED_ZONE = 128                       # the SysV user stack below rsp a leaf may use


# What a thunk and the images it calls may change: the JIT's BPF r0-r5 (rax, rdi, rsi, rdx,
# rcx, r8), AX and scratch (r10, r11, r9) and the thunk's rbx (the frame). The images keep
# rbp, rbx and r12-r15 themselves (their prologue), as the SysV ABI asks.
THUNK_CLOBBERS = frozenset({"rax", "rdi", "rsi", "rdx", "rcx", "r8", "r9", "r10", "r11", "rbx"})
BUDGET_REG = "r12"  # the JIT's budget register (jit_x86_64 budget_reg): images change it


def bpf_thunk(at: int, ip: int, entries: list[int], active: int, counters: int,
              resume: int, cs: int, ss: int, stack: int,
              slots: frozenset[int] | None = None, ip_word: int | None = None,
              ctx: int | None = None, this_cpu: int | None = None,
              budget: int | None = None, tcc: int | None = None) -> bytes:
    """The optprobe template with trace_call_bpf inlined, at `at`: past the red zone a
    pt_regs frame (kernel field order, ip = `ip`, orig_ax = -1) on the guest stack; if the
    bpf_prog_active word at `active` is 0 it is taken, the hit counted in the u64 at
    `counters`, and each JITed image in `entries` called on the BPF layer's stack (top
    `stack`, as the kernel runs programs on its own stack, not the probed code's) with
    rdi = the frame (rbx, callee-saved in the JIT, keeps it); else a miss is counted at
    `counters + 8`. The registers the thunk and the images may change and the flags come
    back from the frame, then `jmp resume` (the detour's relocated copies). With `ip_word`
    the frame's ip is the u64 there (a kretprobe stub's return address), not `ip`. With
    `ctx` the images get rdi = `ctx` (a tracepoint's record or raw arguments), not the frame.
    With `this_cpu` the guard's address and the stack top are loaded from the two u64 there
    (the running CPU's, as the kernel reaches per-CPU data through this_cpu_off).
    With `budget` (programs with backward branches) each image is entered with the run's
    budget in r12 (BUDGET_REG, where the JIT counts backward branches down, as the nested
    run's entry sets it); r12 is the guest's (callee-saved), so it is kept in the frame
    and comes back. With `tcc` (programs with tail calls) the u32 tail-call count there is
    zeroed before each image, as the kernel's prologue starts each program's count.

    `slots`: the frame offsets the programs can read (BpfProg.ctx_reads; None: all). Only
    those and the registers to restore are written (a slot no program reads cannot be
    observed): stores were most of a hit's cost before the machine's virtual TLB made
    stores to data pages fast (emu/vtlb.py), and fewer still cost less. pushfq and popfq
    move the flags straight to and from their slot."""
    from probes.arch.x86_64.ptrace import PT_REGS_FIELDS, PT_REGS_SIZE
    from probes.bpf.jit_x86_64 import _KS

    off = {n: 8 * i for i, n in enumerate(PT_REGS_FIELDS)}

    def wanted(name: str) -> bool:
        return slots is None or any(off[name] <= s < off[name] + 8 for s in slots)

    frame, fl = RED_ZONE + PT_REGS_SIZE, off["rflags"]
    gprs = [n for n in PT_REGS_FIELDS if n not in ("orig_ax", "rip", "cs", "rflags", "rsp", "ss")
            and (n in THUNK_CLOBBERS or wanted(n) or (n == BUDGET_REG and budget is not None))]
    save = "".join(f"mov [rsp + {off[r]}], {r}; " for r in gprs)
    arg = "mov rdi, rbx; " if ctx is None else f"movabs rdi, {ctx:#x}; "
    entry = ((f"movabs rax, {tcc:#x}; mov dword ptr [rax], 0; " if tcc is not None else "")
             + (f"movabs {BUDGET_REG}, {budget:#x}; " if budget is not None else ""))
    calls = "".join(f"{arg}{entry}movabs rax, {e:#x}; call rax; " for e in entries)
    special = ((f"mov qword ptr [rsp + {off['orig_ax']}], -1; " if wanted("orig_ax") else "")
               + ((f"movabs rax, {ip:#x}; " if ip_word is None
                   else f"movabs rax, {ip_word:#x}; mov rax, [rax]; ")
                  + f"mov [rsp + {off['rip']}], rax; " if wanted("rip") else "")
               + (f"mov qword ptr [rsp + {off['cs']}], {cs:#x}; " if wanted("cs") else "")
               + (f"mov qword ptr [rsp + {off['ss']}], {ss:#x}; " if wanted("ss") else "")
               + (f"lea rax, [rsp + {frame}]; mov [rsp + {off['rsp']}], rax; "
                  if wanted("rsp") else ""))
    guard = (f"movabs rax, {active:#x}; " if this_cpu is None
             else f"movabs rax, {this_cpu:#x}; mov rax, [rax]; ")
    top = (f"movabs rsp, {stack:#x}; " if this_cpu is None
           else f"movabs rsp, {this_cpu:#x}; mov rsp, [rsp + 8]; ")
    text = (f"lea rsp, [rsp - {frame - fl - 8}]; pushfq; lea rsp, [rsp - {fl}]; {save}{special}"
            f"{guard}movabs rcx, {counters:#x}; "
            "cmp dword ptr [rax], 0; jne miss; mov dword ptr [rax], 1; inc qword ptr [rcx]; "
            f"mov rbx, rsp; {top}{calls}mov rsp, rbx; "
            f"{guard}mov dword ptr [rax], 0; jmp restore; "
            "miss: inc qword ptr [rcx + 8]; "
            + "restore: " + "".join(f"mov {r}, [rsp + {off[r]}]; " for r in gprs)
            + f"lea rsp, [rsp + {fl}]; popfq; lea rsp, [rsp + {frame - fl - 8}]; jmp {resume:#x}")
    enc, _ = _KS.asm(text, at)
    return bytes(enc or b"")
