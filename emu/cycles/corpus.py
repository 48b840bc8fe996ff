"""Basic blocks cut from guest ELF text: the corpus the block-cost model is checked against
llvm-mca with (tests/data/cycles/<arch>.blocks).

A block starts at a function entry, a branch target inside the function or after a branch,
and ends after a branch. Blocks holding an instruction llvm-mca does not model as ordinary
code (calls, traps, system registers, barriers, syscalls, counter reads, string loops) are
left out, as are duplicates (same bytes).

    python -m emu.cycles.corpus            # rewrite tests/data/cycles/*.blocks
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import capstone

from emu.arch import ARCH_NAMES, get_arch
from emu.cycles.ops import isa_module
from emu.elf import load_elf

ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIR = ROOT / "tests" / "data" / "cycles"
# The freestanding programs (kernel-like code, all their blocks), then an even sample of
# glibc's for variety (FP/SIMD, string routines).
SOURCES = ("demo", "callpath", "flowdissect", "recurse", "hotloop", "insns", "counters")
SAMPLED = "libc-hello"
SAMPLE = 250
MAX_INSNS = 40

_BRANCH_GROUPS = (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_RET,
                  capstone.CS_GRP_IRET)


@dataclass(frozen=True)
class CorpusBlock:
    id: str
    source: str          # "demo.elf:parse_packet+0x24"
    addr: int
    code: bytes


def _branch_target(insn) -> int | None:
    for op in insn.operands:
        if op.type == capstone.CS_OP_IMM and any(insn.group(g) for g in (capstone.CS_GRP_JUMP,
                                                                           capstone.CS_GRP_CALL)):
            return op.imm
    return None


def function_blocks(md: capstone.Cs, code: bytes, addr: int) -> list[tuple[int, list]]:
    """Split one function's code into basic blocks: [(start, [insn, ...]), ...]."""
    insns = list(md.disasm(code, addr))
    end = addr + len(code)
    leaders = {addr}
    for i in insns:
        if any(i.group(g) for g in _BRANCH_GROUPS):
            leaders.add(i.address + i.size)
            t = _branch_target(i)
            if t is not None and addr <= t < end:
                leaders.add(t)
    blocks: list[tuple[int, list]] = []
    cur: list = []
    for i in insns:
        if i.address in leaders and cur:
            blocks.append((cur[0].address, cur))
            cur = []
        cur.append(i)
    if cur:
        blocks.append((cur[0].address, cur))
    return blocks


def _modelled(arch: str, insns: list) -> bool:
    isa = isa_module(arch)
    for i in insns:
        m = i.mnemonic
        if m in isa.UNMODELLED or m.split(".")[0] in isa.UNMODELLED \
                or i.group(capstone.CS_GRP_INT) or i.group(capstone.CS_GRP_CALL):
            return False
        if isa.unmodelled_form(i):
            return False
    return True


def extract(arch: str) -> list[CorpusBlock]:
    seen: set[bytes] = set()
    blocks = _blocks(arch, SOURCES, seen)
    sampled = _blocks(arch, (SAMPLED,), seen)
    stride = max(1, len(sampled) // SAMPLE)
    blocks += sampled[::stride][:SAMPLE]
    return [CorpusBlock(f"{arch}-{i:04d}", b.source, b.addr, b.code) for i, b in enumerate(blocks)]


def _blocks(arch: str, names, seen: set[bytes]) -> list[CorpusBlock]:
    a = get_arch(arch)
    md = capstone.Cs(a.cs_arch, a.cs_mode)
    md.detail = True
    out: list[CorpusBlock] = []
    for name in names:
        path = ROOT / "firmware" / "bin" / arch / f"{name}.elf"
        img = load_elf(str(path))
        text = {s.vaddr: s.data for s in img.segments if s.prot & 4}
        for sym in sorted((s for s in img.symbols if s.kind == "func" and s.size), key=lambda s: s.addr):
            code = _read(text, sym.addr, sym.size)
            if code is None:
                continue
            for start, insns in function_blocks(md, code, sym.addr):
                if not 1 <= len(insns) <= MAX_INSNS or not _modelled(arch, insns):
                    continue
                blob = b"".join(bytes(i.bytes) for i in insns)
                if blob in seen:
                    continue
                seen.add(blob)
                out.append(CorpusBlock("", f"{name}.elf:{sym.name}+{start - sym.addr:#x}", start, blob))
    return out


def _read(text: dict[int, bytes], addr: int, size: int) -> bytes | None:
    for base, data in text.items():
        if base <= addr and addr + size <= base + len(data):
            return data[addr - base:addr - base + size]
    return None


def write_corpus(arch: str, blocks: list[CorpusBlock], path: Path) -> None:
    lines = [f"# {arch} basic blocks for the llvm-mca comparison: id source addr bytes",
             "# regenerate: python -m emu.cycles.corpus"]
    lines += [f"{b.id} {b.source} {b.addr:#x} {b.code.hex()}" for b in blocks]
    path.write_text("\n".join(lines) + "\n")


def read_corpus(path: Path) -> list[CorpusBlock]:
    out = []
    for line in Path(path).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        bid, source, addr, code = line.split()
        out.append(CorpusBlock(bid, source, int(addr, 16), bytes.fromhex(code)))
    return out


def corpus_path(arch: str) -> Path:
    return CORPUS_DIR / f"{arch}.blocks"


def main(argv: list[str] | None = None) -> int:
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    for arch in ARCH_NAMES:
        blocks = extract(arch)
        write_corpus(arch, blocks, corpus_path(arch))
        print(f"{arch}: {len(blocks)} blocks -> {corpus_path(arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
