"""One decoded instruction as the cycle model sees it: its classes and register dataflow.

The per-ISA decoders (isa_arm64.py, isa_x86_64.py) turn a capstone instruction (detail
on) into an `Op`; the profile then gives each class its ports, latency and occupancy.
Classes a profile does not define fall back along `CLASS_FALLBACK` (e.g. a profile
without a `push` class charges push as a `store`)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import capstone

# The class that stands for "this op's own class" in an edge's latency path.
PRIMARY = "*"

CLASS_FALLBACK = {
    "alu_shift": "alu", "shift": "alu", "shift_cl": "shift", "cmov": "alu", "lea": "alu",
    "lea3": "lea", "bitscan": "mul", "mul_wide": "mul", "push": "store", "pop": "load",
    "idiom": "nop", "vec": "fp", "vec_load": "load", "vec_store": "store", "fp": "alu",
    "string": "load", "system": "alu", "nop": "alu", "load_pair": "load",
    "store_pair": "store", "load_ext": "load", "store_ext": "store", "xchg": "alu",
    "call": "branch", "ret": "branch", "div64": "div", "idiv64": "div64",
    "div_w": "div",
}


@dataclass(frozen=True)
class Op:
    """mnemonic; cls: its own class (latency of the result, overrides apply to it); uses:
    the classes whose ports it occupies (PRIMARY = cls); slots: issue slots it takes;
    edges: (dst, src, path) register dependencies, latency = sum of the path's class
    latencies; reads: all registers read (in-order issue waits for them); branch/cond:
    a branch, a conditional one."""
    mnemonic: str
    cls: str
    uses: tuple[str, ...]
    slots: int
    edges: tuple[tuple[str, str, tuple[str, ...]], ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    branch: bool = False
    cond: bool = False
    size: int = 0


def make_op(mnemonic: str, cls: str, uses, dsts, srcs, addr_srcs=(), addr_path=(PRIMARY,),
            extra_edges=(), slots: int = 1, branch: bool = False, cond: bool = False,
            size: int = 0) -> Op:
    """The usual shape: every dst depends on every src through `cls` and on every address
    register through `addr_path` (a load's latency, or load then cls)."""
    edges: list[tuple[str, str, tuple[str, ...]]] = []
    for d in dsts:
        edges.extend((d, s, (PRIMARY,)) for s in srcs)
        edges.extend((d, a, tuple(addr_path)) for a in addr_srcs)
    edges.extend(extra_edges)
    reads = tuple(dict.fromkeys([*srcs, *addr_srcs, *(e[1] for e in extra_edges)]))
    writes = tuple(dict.fromkeys([*dsts, *(e[0] for e in extra_edges)]))
    return Op(mnemonic, cls, tuple(uses), slots, tuple(edges), reads, writes, branch, cond, size)


def isa_module(isa: str):
    """The cycle model's answers for one ISA (emu/cycles/isa_<isa>.py): `decode`, the
    llvm-mca dialect and what llvm-mca does not model."""
    from emu.arch import ARCH_NAMES
    if isa not in ARCH_NAMES:
        raise ValueError(f"no cycle-model decoder for {isa!r}")
    return importlib.import_module(f"emu.cycles.isa_{isa}")


def decoder_for(isa: str):
    """The ISA's `decode(capstone insn) -> Op`."""
    return isa_module(isa).decode


def disassembler(isa: str) -> capstone.Cs:
    from emu.arch import get_arch
    a = get_arch(isa)
    md = capstone.Cs(a.cs_arch, a.cs_mode)
    md.detail = True
    return md


def decode_block(isa: str, code: bytes, addr: int = 0, md: capstone.Cs | None = None) -> list[Op]:
    """Decode straight-line code; stops at the first undecodable byte."""
    md = md or disassembler(isa)
    decode = decoder_for(isa)
    return [decode(insn) for insn in md.disasm(code, addr)]
