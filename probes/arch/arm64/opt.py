"""arm64 optprobes (beyond upstream Linux; after the LKML series "arm64: kprobe: Enable
OPTPROBE for arm64"): the probed instruction is replaced by `B imm26` to a detour buffer
within ±128 MiB: `[host entry][relocated instruction][B addr+4][literal pool]`.

Unlike the series, which copies the instruction verbatim (reviewers pointed out that
PC-relative instructions then break), PC-relative instructions are rewritten here with
the simulator's semantics: ADR/ADRP and literal loads become loads of precomputed values,
branches become branches from the detour (B.cond/CBZ/TBZ through a taken/not-taken pair),
BL/BLR set x30 to the original return address. Anything else is refused with a reason."""
from __future__ import annotations

import struct

from probes.arch.arm64 import decode as d
from probes.arch.common import callback_at
from probes.arch.arm64.simulate import sign_extend

NOP = 0xD503201F
B_RANGE = 1 << 27                     # ±128 MiB


def b_insn(frm: int, to: int, link: bool = False) -> int:
    off = to - frm
    if not -B_RANGE <= off < B_RANGE:
        raise ValueError("branch target out of ±128 MiB range")
    return (0x94000000 if link else 0x14000000) | ((off >> 2) & 0x03FFFFFF)


def ldr_literal_x(rt: int, frm: int, lit: int) -> int:
    return 0x58000000 | ((((lit - frm) >> 2) & 0x7FFFF) << 5) | rt


class Relocator:
    """Builds the detour's words; literals go in a pool after the code."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.words: list[int] = []
        self.literals: list[tuple[int, int]] = []       # (index of the LDR, value)

    @property
    def here(self) -> int:
        return self.base + 4 * len(self.words)

    def emit(self, word: int) -> None:
        self.words.append(word)

    def load_const(self, rt: int, value: int) -> None:
        self.literals.append((len(self.words), value))
        self.emit(0)                                     # patched in finish()

    def finish(self) -> bytes:
        pool = (self.here + 7) & ~7
        code = [w for w in self.words]
        if pool != self.here:
            code.append(NOP)
        lits = b""
        for i, (idx, value) in enumerate(self.literals):
            lit = pool + 8 * i
            code[idx] = ldr_literal_x(self._rt[idx], self.base + 4 * idx, lit)
            lits += struct.pack("<Q", value & (2**64 - 1))
        return b"".join(struct.pack("<I", w) for w in code) + lits


def relocate(word: int, addr: int, base: int) -> bytes:
    """The detour for the instruction `word` probed at `addr`, placed at `base`:
    [nop: host entry][equivalent of word][B addr+4][literals]."""
    r = Relocator(base)
    r._rt = {}

    def const(rt: int, value: int) -> None:
        r._rt[len(r.words)] = rt
        r.load_const(rt, value)

    r.emit(NOP)                                          # the host entry point
    is_ = d._is
    verdict, _h, why = d.arm_probe_decode_insn(word)
    if verdict is d.Verdict.GOOD:
        r.emit(word)
    elif is_(word, d.ADR) or is_(word, d.ADRP):
        imm = sign_extend((((word >> 5) & 0x7FFFF) << 2) | ((word >> 29) & 3), 21)
        value = (addr & ~0xFFF) + (imm << 12) if word & (1 << 31) else addr + imm
        if word & 0x1F != 31:
            const(word & 0x1F, value)
    elif is_(word, d.LDR_LIT) or is_(word, d.LDRSW_LIT):
        rt = word & 0x1F
        target = addr + sign_extend(((word >> 5) & 0x7FFFF) << 2, 21)
        if rt == 31:
            raise ValueError("literal load into xzr")
        const(rt, target)
        if is_(word, d.LDRSW_LIT):
            r.emit(0xB9800000 | (rt << 5) | rt)          # ldrsw xt, [xt]
        elif word & (1 << 30):
            r.emit(0xF9400000 | (rt << 5) | rt)          # ldr xt, [xt]
        else:
            r.emit(0xB9400000 | (rt << 5) | rt)          # ldr wt, [xt]
    elif is_(word, d.B) or is_(word, d.BL):
        target = addr + sign_extend((word & 0x03FFFFFF) << 2, 28)
        if word & (1 << 31):
            const(30, addr + 4)
        r.emit(b_insn(r.here, target))
    elif is_(word, d.BCOND) or any(is_(word, k) for k in (d.CBZ, d.CBNZ, d.TBZ, d.TBNZ)):
        if is_(word, d.TBZ) or is_(word, d.TBNZ):
            target = addr + sign_extend(((word >> 5) & 0x3FFF) << 2, 16)
            r.emit((word & ~(0x3FFF << 5)) | (2 << 5))   # taken -> +8
        else:
            target = addr + sign_extend(((word >> 5) & 0x7FFFF) << 2, 21)
            r.emit((word & ~(0x7FFFF << 5)) | (2 << 5))
        r.emit(b_insn(r.here, addr + 4))                 # not taken
        r.emit(b_insn(r.here, target))                   # taken
    elif is_(word, d.BR) or is_(word, d.RET):
        r.emit(word)
    elif is_(word, d.BLR):
        rn = (word >> 5) & 0x1F
        if rn == 30:
            raise ValueError("blr x30 needs a scratch register")
        const(30, addr + 4)
        r.emit(0xD61F0000 | (rn << 5))                   # br xn
    else:
        raise ValueError(why or "cannot relocate")
    r.emit(b_insn(r.here, addr + 4))
    return r.finish()


class Arm64OptMixin:
    def can_optimize(self, p, kp) -> tuple[bool, str]:
        word = int.from_bytes(self.m.original_text(p.addr, 4), "little")
        try:
            relocate(word, p.addr, p.addr)              # the rewrite must exist
        except ValueError as e:
            return False, str(e)
        near = self.tramps.pages[0] if self.tramps.pages else None
        if near is not None and not -B_RANGE <= near - p.addr < B_RANGE:
            return False, "detour buffers out of ±128 MiB branch range (-ERANGE)"
        return True, ""

    def prepare_optimized_kprobe(self, p, callback):
        from probes.optprobes import OptInsn
        word = int.from_bytes(self.m.original_text(p.addr, 4), "little")
        detour = self.tramps.get(near=p.addr)
        code = relocate(word, p.addr, detour)
        if len(code) > self.tramps.slot_size:
            raise ValueError("detour too large")
        self.m.text_poke(detour, code)
        oi = OptInsn(detour=detour, resume=detour + 4, size=4, code=code,
                     copied=[self.mnemonic(word, p.addr)])
        oi.handle = self.m.add_host_entry(detour, callback_at(p.addr, callback))
        return oi

    def arch_optimize_kprobe(self, p) -> None:
        self.m.text_poke(p.addr, struct.pack("<I", b_insn(p.addr, p.ainsn.optinsn.detour)))

    def arch_unoptimize_kprobe(self, p) -> None:
        self.m.text_poke(p.addr, self.breakpoint)

    def detour_orig_addr(self, p, pc: int) -> int | None:
        """Every word after the host entry stands for the one probed instruction (the
        branch back cannot fault)."""
        return p.addr if pc >= p.ainsn.optinsn.resume else None

    def free_optimized_kprobe(self, p) -> None:
        oi = p.ainsn.optinsn
        self.m.remove_host_entry(oi.handle)
        self.tramps.put(oi.detour)
