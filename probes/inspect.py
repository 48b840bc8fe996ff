"""What a probe did to guest text: the decode verdict, the bytes before and after arming
with disassembly side by side, and the out-of-line slot. Used by `emu inspect`, the
pytest plugin and error messages."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import capstone

from emu.machine import Machine
from probes.errors import KprobeError
from probes.kprobes import Kprobe, kprobes_of


@dataclass
class Inspection:
    where: str
    addr: int | None
    verdict: str                         # "simulate" | "emulate" | "out-of-line" | "rejected"
    reason: str = ""
    errno: str = ""
    insn: str = ""
    original: bytes = b""
    patched: bytes = b""
    slot: int | None = None
    slot_code: bytes = b""
    listing: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("original", "patched", "slot_code"):
            d[k] = d[k].hex()
        return d

    def format(self) -> str:
        lines = [f"probe:    {self.where}" + (f" ({self.addr:#x})" if self.addr is not None else "")]
        if self.verdict == "rejected":
            lines.append(f"verdict:  rejected (-{self.errno}): {self.reason}")
            return "\n".join(lines)
        lines.append(f"verdict:  {self.verdict}  `{self.insn}`")
        lines.append(side_by_side("original", self.listing["original"], "armed", self.listing["patched"]))
        if self.slot is not None:
            lines.append(f"slot at {self.slot:#x}:")
            lines.extend("  " + line for line in self.listing["slot"])
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


def inspect_kprobe(m: Machine, p: Kprobe) -> Inspection:
    """Register `p` (if it is not yet), and describe the patch; rejection is a verdict."""
    kp = kprobes_of(m)
    where = p.symbol_name or (f"{p.addr:#x}" if p.addr is not None else "?")
    if p.offset:
        where += f"+{p.offset:#x}"
    if kp._top(p) is None:
        try:
            kp.register_kprobe(p)
        except KprobeError as e:
            import errno as _e
            return Inspection(where, None, "rejected", e.reason, _e.errorcode.get(e.errno, str(e.errno)))
    ainsn = p.ainsn
    n = max(ainsn.length, len(m.arch.breakpoint))
    original = m.original_text(p.addr, n)
    patched = m.memory.read(p.addr, n)
    ins = Inspection(where=m.symbols.format(p.addr, with_size=False) if m.symbols.find(p.addr) else where,
                     addr=p.addr, verdict=ainsn.kind, insn=ainsn.mnemonic, original=original,
                     patched=patched, slot=ainsn.slot, slot_code=ainsn.slot_code)
    ins.listing["original"] = listing(m, original, p.addr, 1)
    ins.listing["patched"] = listing(m, patched, p.addr, 1)
    if ainsn.slot is not None:
        ins.listing["slot"] = listing(m, m.memory.read(ainsn.slot, len(ainsn.slot_code)), ainsn.slot)
    return ins
