"""What a probe did to guest text: the decode verdict, the bytes before and after arming
with disassembly side by side, and the out-of-line slot. Used by `emu inspect`, the
pytest plugin and error messages."""
from __future__ import annotations

import errno
from dataclasses import asdict, dataclass, field
from typing import Any

import capstone

from emu.machine import Machine
from probes.arch.common import Verdict
from probes.errors import KprobeError
from probes.kprobes import Kprobe, kprobes_of, probe_kind


PENDING = "pending"          # an IFUNC probe waiting for the guest's resolver


@dataclass
class Inspection:
    where: str
    addr: int | None
    verdict: str                         # a StepKind, Verdict.REJECTED or PENDING
    kind: str = ""                       # kprobe | boosted | optimized | ftrace | kretprobe
    hits: int = 0
    opt_reason: str = ""                 # why jump optimization was refused, if it was
    detour: int | None = None
    detour_code: bytes = b""
    reason: str = ""
    errno: str = ""
    insn: str = ""
    original: bytes = b""
    patched: bytes = b""
    slot: int | None = None
    slot_code: bytes = b""
    replaced_tail: bytes = b""           # optimized: text after the jump, replaced but left as it was
    listing: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("original", "patched", "slot_code", "detour_code", "replaced_tail"):
            d[k] = d[k].hex()
        return d

    def format(self) -> str:
        lines = [f"probe:    {self.where}" + (f" ({self.addr:#x})" if self.addr is not None else "")]
        if self.verdict == Verdict.REJECTED:
            lines.append(f"verdict:  rejected (-{self.errno}): {self.reason}")
            return "\n".join(lines)
        if self.verdict == PENDING:
            return "\n".join([*lines, f"verdict:  pending: {self.reason}"])
        lines.append(f"verdict:  {self.verdict}  `{self.insn}`")
        lines.append(f"kind:     {self.kind}  (hits {self.hits})"
                     + (f"  [not optimized: {self.opt_reason}]" if self.opt_reason else ""))
        lines.append(side_by_side("original", self.listing["original"], "in guest memory",
                                  self.listing["patched"]))
        if self.slot is not None:
            lines.append(f"slot at {self.slot:#x}:")
            lines.extend("  " + line for line in self.listing["slot"])
        if self.detour is not None:
            lines.append(f"detour at {self.detour:#x} (host entry at its first instruction):")
            lines.extend("  " + line for line in self.listing["detour"])
        return "\n".join(lines)


def side_by_side(left_title: str, left: list[str], right_title: str, right: list[str]) -> str:
    width = max([len(left_title)] + [len(x) for x in left]) + 4
    rows = [f"  {left_title:<{width}}{right_title}"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        rows.append(f"  {a:<{width}}{b}")
    return "\n".join(rows)


def listing(m: Machine, code: bytes, addr: int, count: int | None = None) -> list[str]:
    md = capstone.Cs(m.arch.cs_arch, m.arch.cs_mode)
    out = []
    for insn in md.disasm(code, addr):
        out.append(f"{insn.address:#x}: {insn.bytes.hex(' '):<14} {insn.mnemonic} {insn.op_str}".rstrip())
        if count is not None and len(out) >= count:
            break
    return out or [f"{addr:#x}: {code.hex(' ')} (undecodable)"]


def _where(m: Machine, p: Kprobe) -> tuple[str, int | None]:
    """`sym+off` (or the bare address / the name as given) and the address, if known."""
    addr = p.addr
    if addr is None and p.symbol_name:
        sym = m.symbols.lookup(p.symbol_name)
        addr = sym.addr + p.offset if sym is not None else None
    if addr is not None and m.symbols.find(addr) is not None:
        return m.symbols.format(addr, with_size=False), addr
    if addr is not None:
        return f"{addr:#x}", addr
    return f"{p.symbol_name}" + (f"+{p.offset:#x}" if p.offset else ""), None


def _show_replaced_tail(m: Machine, ins: Inspection, addr: int, size: int) -> None:
    """Only an optimized probe's jump is live code; the bytes after it, up to `size`, belong
    to the replaced instructions and never run: list them as data, not decoded."""
    md = capstone.Cs(m.arch.cs_arch, m.arch.cs_mode)
    jump = next(md.disasm(ins.patched, addr, 1), None)
    jump_len = jump.size if jump is not None else size
    ins.replaced_tail = ins.patched[jump_len:size]
    if ins.replaced_tail:
        ins.listing["patched"] = (listing(m, ins.patched[:jump_len], addr, 1)
                                  + [f"{addr + jump_len:#x}: {ins.replaced_tail.hex(' '):<14} "
                                     "(replaced tail)"])


def inspect_kprobe(m: Machine, p: Kprobe) -> Inspection:
    """Register `p` (if it is not yet), and describe the patch; rejection is a verdict."""
    kprobes = kprobes_of(m)
    if not kprobes.is_registered(p):
        try:
            kprobes.register_kprobe(p)
        except KprobeError as e:
            where, addr = _where(m, p)
            return Inspection(where=where, addr=addr, verdict=Verdict.REJECTED, reason=e.reason,
                              errno=errno.errorcode.get(e.errno, str(e.errno)))
    if p.addr is None:          # an IFUNC waiting for the guest's resolver (emu.symbols)
        return Inspection(where=_where(m, p)[0], addr=None, verdict=PENDING,
                          reason="an IFUNC: armed where the guest's resolver points (use --run)")
    top = kprobes.table[p.addr]
    ainsn = top.ainsn
    oi = ainsn.optinsn
    n = max(ainsn.length, len(m.arch.breakpoint), oi.size if oi is not None and ainsn.optimized else 0)
    original = m.original_text(p.addr, n)
    patched = m.memory.read(p.addr, n)
    slot_code = m.memory.read(ainsn.slot, len(ainsn.slot_code)) if ainsn.slot is not None else b""
    ins = Inspection(where=_where(m, p)[0], addr=p.addr, verdict=ainsn.kind, kind=probe_kind(p),
                     hits=p.hits, opt_reason=ainsn.opt_reason, insn=ainsn.mnemonic, original=original,
                     patched=patched, slot=ainsn.slot, slot_code=slot_code)
    count = len(listing(m, original, p.addr))
    ins.listing["original"] = listing(m, original, p.addr, count)
    ins.listing["patched"] = listing(m, patched, p.addr, count)
    if ainsn.optimized and oi is not None:
        _show_replaced_tail(m, ins, p.addr, oi.size)
    if ainsn.slot is not None:
        ins.listing["slot"] = listing(m, slot_code, ainsn.slot, 3 if ainsn.boosted else 2)
    if oi is not None:
        ins.detour, ins.detour_code = oi.detour, oi.code
        ins.listing["detour"] = listing(m, m.memory.read(oi.detour, len(oi.code)), oi.detour)
    return ins
