"""llvm-mca as the oracle for block costs: tests compare the model with it, and an optional
cost source (`cost_source="llvm-mca"`) asks it for every block seen in a warm-up run.

All blocks go into one llvm-mca call, one `# LLVM-MCA-BEGIN id` / `# LLVM-MCA-END` region
each (`#` on arm64 too: `//` markers are ignored), and the answer per block is
`TotalCycles / Iterations` of its region. Process start costs ~15 ms, so this is never
called per block on a hot path."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import capstone

from emu.arch import get_arch
from emu.cycles.ops import isa_module


def llvm_mca_path() -> str | None:
    return shutil.which("llvm-mca") or shutil.which("llvm-mca-14")


def llvm_mca_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"LLVM version (\S+)", out)
    return m.group(1) if m else "unknown"


def block_asm(arch: str, code: bytes, addr: int = 0) -> list[str]:
    """The block as assembly llvm-mc reads back (AT&T on x86-64); branch targets become `.`
    (llvm-mca ignores control flow, and absolute targets do not reassemble)."""
    a, isa = get_arch(arch), isa_module(arch)
    md = capstone.Cs(a.cs_arch, a.cs_mode)
    md.detail = True
    if isa.MCA_SYNTAX is not None:
        md.syntax = isa.MCA_SYNTAX
    lines = []
    for insn in md.disasm(code, addr):
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        if insn.group(capstone.CS_GRP_JUMP) or insn.group(capstone.CS_GRP_CALL):
            text = isa.mca_branch(insn, text)
        lines.append(text)
    return lines


def mca_source(arch: str, blocks: list[tuple[str, bytes]]) -> str:
    out = []                                # AT&T: the default syntax of llvm-mc
    for bid, code in blocks:
        out.append(f"# LLVM-MCA-BEGIN {bid}")
        out.extend(block_asm(arch, code))
        out.append("# LLVM-MCA-END")
    return "\n".join(out) + "\n"


def run_mca(arch: str, mcpu: str, blocks: list[tuple[str, bytes]], iterations: int = 100,
            exe: str | None = None) -> dict[str, Fraction]:
    """{block id: TotalCycles / Iterations} for every block, from one llvm-mca run."""
    exe = exe or llvm_mca_path()
    if exe is None:
        raise FileNotFoundError("llvm-mca is not installed")
    src = mca_source(arch, blocks)
    proc = subprocess.run([exe, f"-mtriple={isa_module(arch).LLVM_TRIPLE}", f"-mcpu={mcpu}", "--json",
                           f"-iterations={iterations}", "-"], input=src, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llvm-mca failed: {proc.stderr.strip()[:2000]}")
    data = json.loads(proc.stdout)
    out = {}
    for region in data["CodeRegions"]:
        s = region["SummaryView"]
        out[region["Name"]] = Fraction(s["TotalCycles"], s["Iterations"])
    return out


class McaCostCache:
    """Block costs from llvm-mca, cached on disk keyed by (llvm-mca version, mcpu, bytes)."""

    def __init__(self, arch: str, mcpu: str, cache_dir: Path) -> None:
        self.arch, self.mcpu = arch, mcpu
        self.exe = llvm_mca_path()
        if self.exe is None:
            raise FileNotFoundError("cost source llvm-mca: llvm-mca is not installed")
        self.version = llvm_mca_version(self.exe)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = cache_dir / f"mca-{self.version}-{mcpu}.json"
        self.costs: dict[str, int] = {}
        if self.path.exists():
            self.costs = json.loads(self.path.read_text())

    @staticmethod
    def key(code: bytes) -> str:
        return hashlib.sha256(code).hexdigest()[:24]

    def get(self, code: bytes) -> int | None:
        """The cost in 1/256 cycles, or None if not asked yet."""
        return self.costs.get(self.key(code))

    def fill(self, codes: list[bytes]) -> None:
        todo = {self.key(c): c for c in codes if self.key(c) not in self.costs}
        if not todo:
            return
        res = run_mca(self.arch, self.mcpu, list(todo.items()), exe=self.exe)
        for k, v in res.items():
            self.costs[k] = int(v * 256)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.costs, sort_keys=True))
        os.replace(tmp, self.path)
