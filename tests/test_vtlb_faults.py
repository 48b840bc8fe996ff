"""Faults under the machine's virtual TLB (emu/vtlb.py): every kind of memory fault gives the
report Unicorn's own checks gave (kind, exact address, pc, instruction), with the C fill,
the Python fill and the old CPU TLB (`KPROBE_EMU_VTLB=off`) alike, on both arches."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import LINUX_EXIT, assemble, run_emu
from emu.vtlb import load

MODES = ["native", "python", "off"]
PAGE_ADDR = 0x1000_0000             # the page the guests mmap (MAP_FIXED)

# mmap(PAGE_ADDR, 0x2000, prot, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED, -1, 0)
MMAP = {"arm64": "mov x0, #0x10000000; mov x1, #{size}; mov x2, #{prot}; mov x3, #0x32; "
                 "mov x4, #-1; mov x5, #0; mov x8, #222; svc #0; ",
        "x86_64": "mov edi, 0x10000000; mov esi, {size}; mov edx, {prot}; mov r10d, 0x32; "
                  "mov r8, -1; xor r9d, r9d; mov eax, 9; syscall; "}
# The base register holds PAGE_ADDR after MMAP.
BASE = {"arm64": "mov x9, #0x10000000; ", "x86_64": "mov rbx, 0x10000000; "}

# name -> arch -> (body after the set-up, expected report after "guest fault: ")
CASES = {
    "read-unmapped": {
        "arm64": ("mov x1, #0x1230; ldr x0, [x1]", "read of unmapped address 0x1230 at pc {pc}: ldr x0, [x1]"),
        "x86_64": ("mov rcx, 0x1230; mov rax, [rcx]",
                   "read of unmapped address 0x1230 at pc {pc}: mov rax, qword ptr [rcx]")},
    "write-unmapped": {
        "arm64": ("mov x1, #0x1238; str x0, [x1]", "write to unmapped address 0x1238 at pc {pc}: str x0, [x1]"),
        "x86_64": ("mov rcx, 0x1238; mov [rcx], rax",
                   "write to unmapped address 0x1238 at pc {pc}: mov qword ptr [rcx], rax")},
    "fetch-unmapped": {
        "arm64": ("mov x1, #0x50000000; br x1",
                  "fetch from unmapped address 0x50000000 at pc 0x50000000: <unmapped>"),
        "x86_64": ("mov rcx, 0x50000000; jmp rcx",
                   "fetch from unmapped address 0x50000000 at pc 0x50000000: <unmapped>")},
    "write-text": {
        "arm64": ("movz x1, #0x40, lsl #16; movk x1, #0x1008; str x0, [x1]",
                  "write to protected address 0x401008 at pc {pc}: str x0, [x1]"),
        "x86_64": ("mov rcx, 0x401008; mov [rcx], rax",
                   "write to protected address 0x401008 at pc {pc}: mov qword ptr [rcx], rax")},
    "fetch-nx": {
        "arm64": ("add x1, x9, #0x10; br x1",
                  "fetch from non-executable address 0x10000010 at pc 0x10000010: udf #0"),
        "x86_64": ("lea rcx, [rbx + 0x10]; jmp rcx",
                   "fetch from non-executable address 0x10000010 at pc 0x10000010: add byte ptr [rax], al")},
    "read-prot": {
        "arm64": ("ldr x0, [x9, #0x1010]", "read of protected address 0x10001010 at pc {pc}: ldr x0, [x9, #0x1010]"),
        "x86_64": ("mov rax, [rbx + 0x1010]",
                   "read of protected address 0x10001010 at pc {pc}: mov rax, qword ptr [rbx + 0x1010]")},
    "write-readonly": {
        "arm64": ("str x0, [x9, #0x1ff8]", "write to protected address 0x10001ff8 at pc {pc}: str x0, [x9, #0x1ff8]"),
        "x86_64": ("mov [rbx + 0x1ff8], rax",
                   "write to protected address 0x10001ff8 at pc {pc}: mov qword ptr [rbx + 0x1ff8], rax")},
    "write-across-page-end": {      # the last page is unmapped: Unicorn names a byte in it
        "arm64": ("mov x1, #0x2ffc; add x1, x9, x1; str x0, [x1]",
                  "write to unmapped address 0x10003003 at pc {pc}: str x0, [x1]"),
        "x86_64": ("mov [rbx + 0x2ffc], rax",
                   "write to unmapped address 0x10003003 at pc {pc}: mov qword ptr [rbx + 0x2ffc], rax")},
}
# Page PAGE_ADDR is rw (written once first, so its TLB entry is dirty), the next one is
# PROT_NONE for read-prot and read-only for write-readonly, the third is rw and the
# fourth unmapped (a store across the end of the third).
SECOND_PROT = {"read-prot": 0, "write-readonly": 1}


def _program(arch: str, case: str) -> list[tuple[str, str]]:
    body, _ = CASES[case][arch]
    second = SECOND_PROT.get(case, 3)
    setup = MMAP[arch].format(size=0x3000, prot=3) + BASE[arch]
    protect = {"arm64": "str x9, [x9, #8]; mov x0, x9; mov x1, #0x1000; add x0, x0, x1; "
                        f"mov x2, #{second}; mov x8, #226; svc #0; b {{sym:victim}}",
               "x86_64": "mov [rbx + 8], rbx; lea rdi, [rbx + 0x1000]; mov esi, 0x1000; "
                         f"mov edx, {second}; mov eax, 10; syscall; jmp {{sym:victim}}"}[arch]
    return [("_start", setup + protect),
            ("victim", BASE[arch] + body + "; " + LINUX_EXIT[arch].format(code=0))]


def _at(arch: str, case: str) -> int:
    """Offset in `victim` of the faulting instruction (each case's last)."""
    body = BASE[arch] + CASES[case][arch][0].rsplit(";", 1)[0] if ";" in CASES[case][arch][0] \
        else BASE[arch]
    return len(assemble(arch, body, 0))


def _mode(monkeypatch, mode: str) -> None:
    if mode == "native" and load() is None:
        pytest.skip("no C compiler to build emu/vtlb.c")
    monkeypatch.setenv("KPROBE_EMU_VTLB", mode)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_each_fault_kind_is_reported_exactly(make_tiny, monkeypatch, arch, case):
    from emu.elf import load_elf
    path = make_tiny(arch, _program(arch, case), name=case)
    victim = next(s.addr for s in load_elf(str(path)).symbols if s.name == "victim")
    pc = victim + _at(arch, case)
    want = "emu: guest fault: " + CASES[case][arch][1].format(pc=f"{pc:#x} <victim+{pc - victim:#x}>")
    errs = {}
    for mode in MODES:
        _mode(monkeypatch, mode)
        r = run_emu("run", str(path))
        assert r.rc == 139, (mode, r.err)
        errs[mode] = r.err.strip()
    assert errs["native"] == errs["python"] == errs["off"], errs
    assert errs["native"] == want


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_sigsegv_handlers_see_the_exact_address(c_prog, monkeypatch, arch):
    """A guest's handlers read si_addr and si_code of each fault (tests/data/threads/
    faults.c, the signal tests' program): the same output with either fill."""
    path = c_prog(arch, Path(__file__).parent / "data" / "threads" / "faults.c")
    outs = set()
    for mode in ("native", "python"):
        _mode(monkeypatch, mode)
        r = run_emu("run", str(path))
        assert r.rc == 0, r.err
        outs.add(r.out)
    assert len(outs) == 1
    out = outs.pop()
    assert "read_unmapped: sig=11 addr=0x1230 code=1" in out
    assert "write_rodata: sig=11 addr_ok=1 code=2" in out
