"""Instruction tables (tests/data/insn/<arch>.toml): one row per probed instruction.

Each row assembles a tiny guest (ProbeLab via the `probe_lab` fixture), checks the decode
verdict (or the refusal's errno and reason), then runs the guest twice from the same
initial state — unprobed, and with a kprobe on the instruction — and checks:
  * the state right after the instruction (post handler / the unprobed CPU arriving at the
    resume address) is identical in both runs and matches the row's `after`, `after_flags`
    and `after_mem`;
  * both runs end identically (every register, the data and stack pages);
  * the handlers ran with the kernel's ip convention: pre sees the probe address (arm64) or
    the byte after the int3 (x86), post sees where execution resumes.

Row keys: name, asm (function `f`), funcs (more functions), data (hex, at `data`), mem
(initial, addr-expr -> hex), probe (addr-expr, default "f"), entry (default "f"), verdict,
errno/reason (rejected), regs, flags (names set), resume, after, after_flags, after_mem,
hits. Memory values are hex bytes or `@addr-expr` (its 8-byte little-endian value). An addr-expr is `sym`, `data`, `sp0` (sp at entry of f) or an int, joined with +/-.
Sources may name functions and `data` in braces, e.g. `bl {g}`, `.quad {data}`."""
from __future__ import annotations

import errno
import re
import tomllib
from pathlib import Path

import pytest

from emu.arch import ARCH_NAMES
from probes.errors import KprobeError
from probes.testing import ASM_DATA, ASM_STACK_TOP

DATA_DIR = Path(__file__).parent / "data" / "insn"
ARCHES = ARCH_NAMES

FLAG_BITS = {
    "arm64": {"N": 1 << 31, "Z": 1 << 30, "C": 1 << 29, "V": 1 << 28},
    "x86_64": {"CF": 1 << 0, "PF": 1 << 2, "AF": 1 << 4, "ZF": 1 << 6, "SF": 1 << 7,
               "IF": 1 << 9, "DF": 1 << 10, "OF": 1 << 11},
}
FLAGS_REG = {"arm64": "nzcv", "x86_64": "rflags"}
FLAGS_BASE = {"arm64": 0, "x86_64": 0x2}          # x86 bit 1 always reads as 1
IP_OFFSET = {"arm64": 0, "x86_64": 1}            # pre handler ip: addr (BRK) / addr + 1 (int3)
SS_BREAK = {"arm64": (0xD42000C0).to_bytes(4, "little"), "x86_64": b"\xcc"}
STACK_LO = ASM_STACK_TOP - 0x10000


def _load(arch: str) -> list[dict]:
    with open(DATA_DIR / f"{arch}.toml", "rb") as f:
        rows = tomllib.load(f)["case"]
    for row in rows:
        row["arch"] = arch
    return rows


CASES = [row for arch in ARCHES for row in _load(arch)]


# --- building and addressing -----------------------------------------------------------------
def _subst(source: str, addrs: dict[str, int]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        return hex(ASM_DATA) if name == "data" else hex(addrs.get(name, 0x400000))
    return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", repl, source)


def build(probe_lab, row: dict):
    """Assemble until the function addresses are stable (sources may name each other)."""
    funcs = {"f": row["asm"], **row.get("funcs", {})}
    data = bytes.fromhex(row.get("data", ""))
    addrs: dict[str, int] = {}
    for _ in range(4):
        lab = probe_lab.asm(row["arch"], {n: _subst(s, addrs) for n, s in funcs.items()}, data)
        new = {n: lab.machine.symbols.lookup(n).addr for n in funcs}
        if new == addrs:
            lab.sp0 = lab.machine.sp - (8 if lab.machine.arch.link is None else 0)
            return lab
        addrs = new
    raise AssertionError(f"{row['name']}: function addresses do not settle: {addrs}")


def resolve(lab, expr, sp_at_entry: int) -> int:
    if isinstance(expr, int):
        return expr & (1 << 64) - 1
    total, sign = 0, 1
    for tok in re.split(r"\s*([+-])\s*", expr.strip()):
        if tok in "+-":
            sign = 1 if tok == "+" else -1
            continue
        if tok == "data":
            v = ASM_DATA
        elif tok == "sp0":
            v = sp_at_entry
        elif tok[0].isdigit():
            v = int(tok, 0)
        else:
            sym = lab.machine.symbols.lookup(tok)
            assert sym is not None, f"unknown symbol {tok!r} in {expr!r}"
            v = sym.addr
        total += sign * v
    return total & (1 << 64) - 1


def flags_value(arch: str, names: list[str]) -> int:
    bits = FLAG_BITS[arch]
    return FLAGS_BASE[arch] | sum(bits[n] for n in names)


def flags_names(arch: str, value: int) -> list[str]:
    return sorted(n for n, b in FLAG_BITS[arch].items() if value & b)


# --- one run ---------------------------------------------------------------------------------
class Snapshot:
    """Registers and the writable pages (data, stack) at one moment."""

    def __init__(self, regs: dict[str, int], mem: bytes) -> None:
        self.regs, self.mem = regs, mem

    @classmethod
    def take(cls, m, regs: dict[str, int] | None = None) -> "Snapshot":
        if regs is None:
            regs = {n: m.reg(n) for n in m.arch.regs}
        return cls(regs, m.memory.read(ASM_DATA, 0x10000) + m.memory.read(STACK_LO, 0x10000))

    def read(self, addr: int, size: int) -> bytes:
        if ASM_DATA <= addr < ASM_DATA + 0x10000:
            off = addr - ASM_DATA
        else:
            assert STACK_LO <= addr < ASM_STACK_TOP, f"{addr:#x} is neither data nor stack"
            off = 0x10000 + addr - STACK_LO
        return self.mem[off:off + size]

    def diff(self, other: "Snapshot") -> str | None:
        for name, value in self.regs.items():
            if other.regs.get(name) != value:
                return f"register {name}: {value:#x} != {other.regs.get(name, 0):#x}"
        if self.mem != other.mem:
            i = next(i for i, (a, b) in enumerate(zip(self.mem, other.mem)) if a != b)
            where = ASM_DATA + i if i < 0x10000 else STACK_LO + i - 0x10000
            return f"memory at {where:#x}: {self.mem[i]:#04x} != {other.mem[i]:#04x}"
        return None


def mem_bytes(lab, value: str, at_entry: int) -> bytes:
    """Hex bytes, or `@expr`: the 8-byte little-endian value of an addr-expr."""
    if value.startswith("@"):
        return resolve(lab, value[1:], at_entry).to_bytes(8, "little")
    return bytes.fromhex(value)


def prepare_state(lab, row: dict) -> dict[str, int]:
    """Write the row's initial memory; return the registers to start f with."""
    at_entry = lab.sp0
    for where, value in row.get("mem", {}).items():
        lab.machine.memory.write(resolve(lab, where, at_entry), mem_bytes(lab, value, at_entry))
    regs = {name: resolve(lab, v, at_entry) for name, v in row.get("regs", {}).items()}
    regs[FLAGS_REG[row["arch"]]] = flags_value(row["arch"], row.get("flags", []))
    return regs


def run_unprobed(probe_lab, row: dict):
    """The reference: the CPU alone; 'after' is taken when it first reaches the resume
    address after executing the probed instruction."""
    lab = build(probe_lab, row)
    at_entry = lab.sp0
    addr, resume = resolve(lab, row.get("probe", "f"), at_entry), resolve(lab, row["resume"], at_entry)
    assert addr != resume, "a row's resume address must differ from the probe address"
    m, seen, after = lab.machine, [], []
    m.hooks.code(lambda a, s: seen.append(a), addr, addr)
    m.hooks.code(lambda a, s: after.append(Snapshot.take(m)) if seen and not after else None,
                 resume, resume)
    regs = prepare_state(lab, row)
    lab.call(row.get("entry", "f"), regs=regs)
    assert after, f"unprobed run never reached the resume address {resume:#x} ({lab.result})"
    return lab, after[0], Snapshot.take(m)


def run_probed(probe_lab, row: dict):
    lab = build(probe_lab, row)
    m, after = lab.machine, []

    def post(kp, regs, flags):
        if not after:
            after.append(Snapshot.take(m, regs.snapshot()))

    regs = prepare_state(lab, row)
    addr = resolve(lab, row.get("probe", "f"), lab.sp0)
    lab.text_before = lab.text(addr, 16)
    p = lab.kprobe(row.get("probe", "f"), post=post)
    lab.call(row.get("entry", "f"), regs=regs)
    assert after, f"the post handler never ran ({lab.result})"
    return lab, p, after[0], Snapshot.take(m)


# --- checks ----------------------------------------------------------------------------------
def check_slot(lab, p, arch: str) -> None:
    """An out-of-line slot holds the instruction (x86: RIP-relative disp re-aimed at the same
    target) followed by the step trap."""
    import capstone
    code = lab.slot(p)
    n = p.ainsn.length
    assert code[n:] == SS_BREAK[arch], f"slot does not end with the step trap: {code.hex()}"
    orig = lab.original(p.addr, n)
    if code[:n] == orig:
        return
    assert arch == "x86_64", f"arm64 slot must hold the instruction verbatim: {code.hex()}"
    md = capstone.Cs(lab.machine.arch.cs_arch, lab.machine.arch.cs_mode)
    md.detail = True
    a = next(md.disasm(orig, p.addr))
    b = next(md.disasm(code[:n], p.ainsn.slot))
    target = lambda i: i.address + i.size + i.disp                     # noqa: E731
    assert (a.mnemonic, a.size) == (b.mnemonic, b.size) and target(a) == target(b), \
        f"slot {b.mnemonic} {b.op_str} @ {b.address:#x} != {a.mnemonic} {a.op_str} @ {a.address:#x}"


def check_expected(lab, row: dict, snap: Snapshot, at_entry: int, what: str) -> None:
    arch = row["arch"]
    for name, want in row.get("after", {}).items():
        got, exp = snap.regs[lab.machine.arch.aliases.get(name, name)], resolve(lab, want, at_entry)
        assert got == exp, f"{what}: {name} = {got:#x}, expected {exp:#x} ({want})"
    if "after_flags" in row:
        got = flags_names(arch, snap.regs[FLAGS_REG[arch]])
        assert got == sorted(row["after_flags"]), f"{what}: flags {got}, expected {row['after_flags']}"
    for where, value in row.get("after_mem", {}).items():
        exp = mem_bytes(lab, value, at_entry)
        got = snap.read(resolve(lab, where, at_entry), len(exp))
        assert got == exp, f"{what}: memory at {where} = {got.hex()}, expected {exp.hex()}"


def check_rejected(probe_lab, row: dict) -> None:
    lab = build(probe_lab, row)
    addr = resolve(lab, row.get("probe", "f"), lab.sp0)
    before = lab.text(addr & ~3 if row["arch"] == "arm64" else addr, 4)
    with pytest.raises(KprobeError) as exc:
        lab.kprobe(row.get("probe", "f"))
    e = exc.value
    assert e.errno == getattr(errno, row["errno"]), f"-{errno.errorcode[e.errno]}: {e.reason}"
    assert row["reason"] in e.reason, e.reason
    assert lab.kprobes.get_kprobe(addr) is None and not lab.kprobes.probes()
    assert lab.text(addr & ~3 if row["arch"] == "arm64" else addr, 4) == before, "refused probe patched text"
    assert lab.inspect(row.get("probe", "f")).verdict == "rejected"


@pytest.mark.parametrize("row", CASES, ids=[f"{r['arch']}/{r['name']}" for r in CASES])
def test_insn(row: dict, probe_lab, kprobe_asserts) -> None:
    arch = row["arch"]
    if row["verdict"] == "rejected":
        check_rejected(probe_lab, row)
        return
    plain, plain_after, plain_end = run_unprobed(probe_lab, row)
    lab, p, after, end = run_probed(probe_lab, row)
    at_entry = lab.sp0
    addr, resume = resolve(lab, row.get("probe", "f"), at_entry), resolve(lab, row["resume"], at_entry)
    assert p.addr == addr
    assert p.ainsn.kind == row["verdict"], f"verdict {p.ainsn.kind} ({p.ainsn.mnemonic})"
    if p.ainsn.kind == "out-of-line":
        check_slot(lab, p, arch)
    else:
        assert p.ainsn.slot is None
    # the handlers, with the kernel's ip convention
    kprobe_asserts.hits(p, row.get("hits", 1))
    assert [(e.handler, e.ip) for e in p.events[:2]] == [("pre", addr + IP_OFFSET[arch]), ("post", resume)], \
        [(e.handler, hex(e.ip)) for e in p.events]
    # the instruction's effect: probed == unprobed == the row
    diff = after.diff(plain_after)
    assert diff is None, f"after the probed instruction, probed vs unprobed: {diff}"
    check_expected(lab, row, after, at_entry, "after the instruction")
    # the whole run
    assert (lab.result.reason, lab.result.exit_code) == (plain.result.reason, plain.result.exit_code), \
        f"{lab.result} vs {plain.result}"
    diff = end.diff(plain_end)
    assert diff is None, f"at the end, probed vs unprobed: {diff}"
    kprobe_asserts.armed(lab, p)
    assert lab.original(addr, 16) == lab.text_before
    lab.kprobes.unregister_kprobe(p)
    kprobe_asserts.disarmed(lab, addr, lab.text_before)
