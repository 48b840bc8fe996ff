"""`emu disasm` labels branch targets, `emu inspect ADDR` names the address as sym+off,
optimized probes show the bytes after their jump as the replaced tail, and the probe table's
STEP column says `optimized` for them: on both arches, on firmware and on a program the
tests compile."""
from __future__ import annotations

import json
import re

from conftest import firmware_elf, run_emu
from emu.elf import load_elf
from emu.symbols import SymbolTable
from test_tools_sweep import tools_prog  # noqa: F401  (fixture)

CALL = {"x86_64": "call", "arm64": "bl"}


def listing(path, spec: str) -> list[str]:
    r = run_emu("disasm", str(path), spec)
    assert r.rc == 0, r.err
    return r.out.splitlines()


def test_disasm_labels_call_targets(arch, tools_prog):
    lines = listing(tools_prog(arch, "sweep_io"), "main")
    calls = [ln for ln in lines if f" {CALL[arch]} " in ln]
    assert any(ln.endswith("<mix+0x0>") for ln in calls), calls
    assert all(re.search(r"<[\w.]+\+0x[0-9a-f]+>$", ln) for ln in calls), calls


def test_disasm_labels_jump_targets(arch):
    lines = listing(firmware_elf(arch, "recurse"), "fib")
    syms = SymbolTable(load_elf(str(firmware_elf(arch, "recurse"))).symbols)
    fib = syms.lookup("fib")
    recursive = [ln for ln in lines if f" {CALL[arch]} " in ln]
    assert recursive and all(ln.endswith("<fib+0x0>") for ln in recursive)
    jumps = [ln for ln in lines if re.search(r"\s(j[a-z]+|b\.[a-z]+|cbn?z|tbn?z)\s", ln)]
    assert jumps
    for ln in jumps:                 # the label names the target the operand gives
        target = int(re.search(r"#?(0x[0-9a-f]+) <[^<]*$", ln).group(1), 16)
        assert ln.endswith(f"<fib+{target - fib.addr:#x}>"), ln
    plain = [ln for ln in lines if not re.search(rf"\s({CALL[arch]}|j[a-z]+|b\.[a-z]+|cbn?z|tbn?z)\s", ln)]
    assert all(ln.count("<") == 1 for ln in plain)     # only the address label


def insn_offsets(path, func: str) -> list[int]:
    base = None
    offs = []
    for ln in listing(path, func):
        addr = int(ln.split()[0], 16)
        base = addr if base is None else base
        offs.append(addr - base)
    return offs


def test_inspect_bare_address_shows_sym_off(arch, tools_prog):
    path = tools_prog(arch, "sweep_io")
    mix = SymbolTable(load_elf(str(path)).symbols).lookup("mix").addr
    second = insn_offsets(path, "mix")[1]
    bad = 2 if arch == "arm64" else 1            # misaligned / inside the first instruction
    r = run_emu("inspect", str(path), hex(mix + second), hex(mix + bad))
    assert r.rc == 0, r.err
    ok, rejected = r.out.split("\n\n")
    assert ok.splitlines()[0] == f"probe:    mix+{second:#x} ({mix + second:#x})"
    assert rejected.splitlines()[0] == f"probe:    mix+{bad:#x} ({mix + bad:#x})"
    assert "rejected" in rejected
    data = json.loads(run_emu("inspect", "--json", str(path), hex(mix + bad)).out)
    assert (data[0]["where"], data[0]["addr"]) == (f"mix+{bad:#x}", mix + bad)


def test_inspect_optimized_shows_replaced_tail(arch):
    path = str(firmware_elf(arch, "recurse"))
    r = run_emu("inspect", "--optimize", "--json", path, "fib")
    (k,) = json.loads(r.out)
    assert k["kind"] == "optimized"
    jump_len = {"x86_64": 5, "arm64": 4}[arch]
    original, patched = bytes.fromhex(k["original"]), bytes.fromhex(k["patched"])
    tail = bytes.fromhex(k["replaced_tail"])
    assert patched[jump_len:].startswith(tail) and tail == original[jump_len:jump_len + len(tail)]
    text = run_emu("inspect", "--optimize", path, "fib").out
    if arch == "x86_64":
        # fib's jump replaces push rbp; mov eax, edi; push rbx; mov ebx, edi (6 bytes):
        # one byte after the jmp, which decoded alone would read as `sti`
        assert tail == original[5:6] and len(original) >= 6
        assert "(replaced tail)" in text and "sti" not in text
        assert k["listing"]["patched"] == [k["listing"]["patched"][0],
                                           f"{k['addr'] + 5:#x}: {tail.hex():<14} (replaced tail)"]
    else:
        assert tail == b"" and "(replaced tail)" not in text     # one b replaces one insn
        assert len(k["listing"]["patched"]) == 1


def test_probe_table_step_optimized(arch, tmp_path, tools_prog):
    for path, sym in ((firmware_elf(arch, "recurse"), "fib"), (tools_prog(arch, "sweep_io"), "mix")):
        stats = tmp_path / "stats.json"
        r = run_emu("run", "--optimize", "--kprobe", sym, "--stats", str(stats), str(path), stdin=b"abc")
        rows = json.loads(stats.read_text())["probes"]
        assert rows[0]["kind"] == "optimized" and rows[0]["step"] == "optimized", rows
        lines = r.err.splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.startswith("PROBE "))
        header, row = lines[at:at + 2]
        cols = row.split()
        assert header.split()[3] == "STEP" and cols[2:4] == ["optimized", "optimized"], r.err
