"""The machine on tiny hand-assembled guests: fault reports, limits, deterministic counters,
no per-instruction hook by default, bare-metal devices, memory bookkeeping, text_poke."""
from __future__ import annotations

import io
import re
import time

import pytest
from unicorn import UC_HOOK_BLOCK

from conftest import LINUX_EXIT, run_emu, tiny_elf
from emu.loader import GuestConfig, load_guest
from emu.machine import StopReason
from emu.memory import Memory, PROT_EXEC, PROT_READ, PROT_WRITE
from emu.symbols import SymbolTable


def load(path, *, bare=False, stdin=b""):
    out, err = io.BytesIO(), io.BytesIO()
    guest = load_guest(GuestConfig(str(path), bare=bare), stdin=io.BytesIO(stdin), stdout=out,
                       stderr=err)
    return guest.machine, out, err


# --- faults ----------------------------------------------------------------------------------
# name -> per arch: (code of the function `name`, fault kind, fault address or None,
#                    offset of the faulting insn in `name` or None for a fetch fault, insn text)
FAULTS = {
    "read_unmapped": {
        "arm64": ("nop; movz x0, #0xbeef, lsl #16; ldr x1, [x0]",
                  "read of unmapped address", 0xBEEF0000, 8, "ldr x1, [x0]"),
        "x86_64": ("nop; mov eax, 0xbeef0000; mov rbx, [rax]",
                   "read of unmapped address", 0xBEEF0000, 6, "mov rbx, qword ptr [rax]"),
    },
    "write_text": {
        "arm64": ("nop; adr x0, .; str x0, [x0]",
                  "write to protected address", 0x401008, 8, "str x0, [x0]"),
        "x86_64": ("nop; lea rax, [rip]; mov [rax], rax",
                   "write to protected address", 0x401009, 8, "mov qword ptr [rax], rax"),
    },
    "write_rodata": {
        "arm64": ("movz x0, #0x50, lsl #16; add x0, x0, #8; str x1, [x0]",
                  "write to protected address", 0x500008, 8, "str x1, [x0]"),
        "x86_64": ("mov eax, 0x500008; mov [rax], rbx",
                   "write to protected address", 0x500008, 5, "mov qword ptr [rax], rbx"),
    },
    "undefined": {
        "arm64": ("nop; nop; .word 0x00000000", "undefined instruction", None, 8, "udf #0"),
        "x86_64": ("nop; nop; ud2", "undefined instruction", None, 2, "ud2"),
    },
    "jump_unmapped": {
        "arm64": ("movz x0, #0x1234, lsl #16; br x0",
                  "fetch from unmapped address", 0x12340000, None, None),
        "x86_64": ("mov eax, 0x12340000; jmp rax",
                   "fetch from unmapped address", 0x12340000, None, None),
    },
    "exec_data": {
        "arm64": ("movz x0, #0x50, lsl #16; br x0",
                  "fetch from non-executable address", 0x500000, None, None),
        "x86_64": ("mov eax, 0x500000; jmp rax",
                   "fetch from non-executable address", 0x500000, None, None),
    },
}


def fault_elf(make_tiny, arch: str, name: str):
    code = FAULTS[name][arch][0]
    rodata = name == "write_rodata"
    return make_tiny(arch, [("_start", "nop"), (name, code)], name=name,
                     data=bytes(range(16)), data_prot=4 if rodata else 6)


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_fault_report(arch, make_tiny, name):
    _code, kind, addr, off, insn = FAULTS[name][arch]
    m, out, _ = load(fault_elf(make_tiny, arch, name))
    result = m.run(max_insns=10_000)
    assert result.reason is StopReason.FAULT
    assert result.fault.kind == kind
    assert result.fault.addr == addr
    sym = m.symbols.lookup(name)
    if off is not None:
        assert result.fault.pc == sym.addr + off
        expected = (f"guest fault: {kind}{f' {addr:#x}' if addr is not None else ''} "
                    f"at pc {sym.addr + off:#x} <{name}+{off:#x}>: {insn}")
        assert result.message == expected
    else:                                    # a fetch fault happens at the target
        assert result.fault.pc == addr
        assert result.message.startswith(f"guest fault: {kind} {addr:#x} at pc {addr:#x}")
    assert "\n" not in result.message
    assert out.getvalue() == b""


@pytest.mark.parametrize("name", ["read_unmapped", "write_text", "jump_unmapped"])
def test_fault_cli_exits_139_with_one_line(arch, make_tiny, name):
    r = run_emu("run", str(fault_elf(make_tiny, arch, name)))
    assert r.rc == 139, r.err
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("emu: guest fault: "), r.err
    assert " at pc 0x" in lines[0]


def test_undefined_instruction_cli(arch, make_tiny):
    """The issue: a guest fault (undefined instruction included) exits 139 after the report."""
    r = run_emu("run", str(fault_elf(make_tiny, arch, "undefined")))
    lines = r.err.splitlines()
    assert len(lines) == 1 and "undefined instruction at pc 0x" in lines[0]
    assert "<undefined+0x" in lines[0] and lines[0].endswith(FAULTS["undefined"][arch][4])
    assert r.rc == 139, f"undefined instruction exited {r.rc}"


def test_fault_after_output_keeps_output(arch, make_tiny):
    hello = {"arm64": "adr x1, msg; mov x0, #1; mov x2, #3; mov x8, #64; svc #0; b crash; "
                      "msg: .ascii \"ok\\n\"; .balign 4; crash: mov x0, #0; ldr x0, [x0]",
             "x86_64": "mov edi, 1; lea rsi, [rip + msg]; mov edx, 3; mov eax, 1; syscall; "
                       "mov rax, [0]; msg: .ascii \"ok\\n\""}[arch]
    r = run_emu("run", str(make_tiny(arch, [("_start", hello)])))
    assert (r.rc, r.stdout) == (139, b"ok\n")
    assert "read of unmapped address 0x0 at pc" in r.err


def test_breakpoint_without_handler(arch, make_tiny):
    code = {"arm64": "nop; brk #0x10", "x86_64": "nop; int3"}[arch]
    m, _, _ = load(make_tiny(arch, [("_start", code)]))
    result = m.run(max_insns=100)
    assert result.reason is StopReason.FAULT
    sym = m.symbols.lookup("_start")
    step = 4 if arch == "arm64" else 1
    assert result.fault.pc == sym.addr + step
    assert result.message.endswith(f"<_start+{step:#x}>: {'brk #0x10' if arch == 'arm64' else 'int3'}")


# --- limits ----------------------------------------------------------------------------------
LOOP = {"arm64": "nop; b .", "x86_64": "nop; jmp ."}


def test_max_insns_limit(arch, make_tiny):
    path = make_tiny(arch, [("_start", "nop"), ("spin", LOOP[arch])])
    r = run_emu("run", "--max-insns", "1000", str(path))
    assert r.rc == 124
    assert re.fullmatch(r"emu: instruction limit of 1000 reached at pc 0x[0-9a-f]+ <spin\+0x[0-9a-f]+>\n",
                        r.err), r.err


def test_max_insns_counts_exactly(arch, make_tiny):
    """--max-insns N stops after exactly N instructions (a straight line of nops)."""
    nops = "; ".join(["nop"] * 50)
    m, _, _ = load(make_tiny(arch, [("_start", nops + "; " + LOOP[arch])]))
    entry = m.pc
    result = m.run(max_insns=20)
    assert result.reason is StopReason.LIMIT and result.exit_code == 124
    assert m.pc == entry + 20 * (4 if arch == "arm64" else 1)


def test_timeout_limit(arch, make_tiny):
    path = make_tiny(arch, [("_start", LOOP[arch])])
    t0 = time.monotonic()
    r = run_emu("run", "--timeout", "0.5", str(path), timeout=60)
    elapsed = time.monotonic() - t0
    assert r.rc == 124
    assert r.err.startswith("emu: wall-clock limit of 0.5 s reached at pc 0x"), r.err
    assert len(r.err.splitlines()) == 1
    assert elapsed < 20


def test_default_run_has_no_per_instruction_hook(arch, make_tiny):
    """A CODE hook on every instruction runs at ~3.5 MIPS (unicorn-notes): the default mode
    installs none, nor a Python BLOCK hook (the work clock is one native BLOCK hook,
    emu/cycles/work.py); the cycle model adds exactly one BLOCK hook. (Speed itself is
    measured in benchmarks/bench_machine.py, not asserted.)"""
    loop = {"arm64": "movz x0, #0x98, lsl #16; l: subs x0, x0, #1; b.ne l; " + LINUX_EXIT[arch].format(code=0),
            "x86_64": "mov ecx, 0x980000; l: dec ecx; jnz l; " + LINUX_EXIT[arch].format(code=0)}[arch]
    m, _, _ = load(make_tiny(arch, [("_start", loop)]))
    assert m.hooks.per_instruction() == []
    result = m.run()
    assert result.reason is StopReason.EXIT and result.exit_code == 0
    from emu.cycles import enable_cycle_model
    m2, _, _ = load(make_tiny(arch, [("_start", loop)]))
    enable_cycle_model(m2, None, use_native=False)
    assert [h[0] for h in m2.hooks.per_instruction()] == [UC_HOOK_BLOCK]


# --- deterministic counters --------------------------------------------------------------------
COUNTER = {
    # read the counter twice around a syscall (getpid), store both in the data page, exit
    "arm64": "movz x9, #0x50, lsl #16; isb; mrs x1, cntvct_el0; mov x8, #172; svc #0; "
             "mrs x2, cntvct_el0; mrs x3, cntfrq_el0; stp x1, x2, [x9]; str x3, [x9, #16]; "
             + LINUX_EXIT["arm64"].format(code=0),
    "x86_64": "mov r9d, 0x500000; rdtsc; shl rdx, 32; or rax, rdx; mov [r9], rax; "
              "mov eax, 39; syscall; rdtsc; shl rdx, 32; or rax, rdx; mov [r9 + 8], rax; "
              + LINUX_EXIT["x86_64"].format(code=0),
}


def _counter_values(path) -> list[int]:
    m, _, _ = load(path)
    assert m.run(max_insns=1000).reason is StopReason.EXIT
    raw = m.memory.read(0x500000, 24)
    return [int.from_bytes(raw[i:i + 8], "little") for i in (0, 8, 16)]


def test_counters_are_deterministic(arch, make_tiny):
    path = make_tiny(arch, [("_start", COUNTER[arch])], data=bytes(32))
    first = _counter_values(path)
    time.sleep(0.05)
    second = _counter_values(path)
    assert first == second
    c1, c2, freq = first
    assert 0 <= c1 < c2 < 1_000_000              # model time, not the host's (hours of uptime)
    if arch == "arm64":
        assert freq == 25_000_000                # cntfrq_el0 is the model's, not the host's


# --- bare metal --------------------------------------------------------------------------------
BARE_BASE = {"arm64": 0x4000_0000, "x86_64": 0x10_0000}
BARE_PUTS = {
    "arm64": "movz x1, #0x900, lsl #16; adr x2, msg; l: ldrb w0, [x2], #1; cbz w0, done; "
             "strb w0, [x1]; b l; done: movz x1, #0x910, lsl #16; mov w0, #{code}; str w0, [x1]; "
             "b .; msg: .asciz \"bare {arch}\\n\"",
    "x86_64": "lea rsi, [rip + msg]; mov dx, 0x3f8; l: lodsb; test al, al; jz done; out dx, al; "
              "jmp l; done: mov al, {code}; out 0xf4, al; jmp .; msg: .asciz \"bare {arch}\\n\"",
}


def test_bare_console_and_exit_device(arch, make_tiny):
    src = BARE_PUTS[arch].format(code=42, arch=arch)
    path = make_tiny(arch, [("_start", src)], base=BARE_BASE[arch], name="bare")
    r = run_emu("run", "--bare", str(path))
    assert (r.rc, r.out, r.err) == (42, f"bare {arch}\n", "")


def test_bare_halt_exits_0(arch, make_tiny):
    code = {"arm64": "nop; hlt #0", "x86_64": "nop; hlt"}[arch]
    r = run_emu("run", "--bare", str(make_tiny(arch, [("_start", code)], base=BARE_BASE[arch])))
    assert (r.rc, r.err) == (0, "")


def test_bare_syscall_is_a_fault(arch, make_tiny):
    code = {"arm64": "nop; svc #0", "x86_64": "nop; syscall"}[arch]
    m, _, _ = load(make_tiny(arch, [("_start", code)], base=BARE_BASE[arch]), bare=True)
    result = m.run(max_insns=100)
    assert result.reason is StopReason.FAULT
    assert "system call with no OS" in result.message


def test_bare_stack_and_ram(arch, make_tiny):
    """sp at entry is the documented stack top, and RAM below it is writable."""
    code = {"arm64": "mov x0, sp; str x0, [sp, #-16]!; ldr x1, [sp]; mov x2, #0x10; "
                     "movz x3, #0x910, lsl #16; cmp x0, x1; csel w2, wzr, w2, eq; str w2, [x3]",
            "x86_64": "mov rax, rsp; push rax; pop rbx; cmp rax, rbx; setne al; out 0xf4, al"}[arch]
    m, _, _ = load(make_tiny(arch, [("_start", code)], base=BARE_BASE[arch]), bare=True)
    assert m.sp == m.arch.bare_stack_top
    result = m.run(max_insns=100)
    assert (result.reason, result.exit_code) == (StopReason.EXIT, 0)


def test_bare_image_outside_ram_is_refused(arch, make_tiny):
    r = run_emu("run", "--bare", str(make_tiny(arch, [("_start", "nop")], base=0x7000_0000_0000)))
    assert r.rc == 2 and len(r.err.splitlines()) == 1 and "bare-metal RAM" in r.err


# --- text_poke ---------------------------------------------------------------------------------
def test_text_poke_is_seen_by_translated_code(arch, make_tiny):
    """Code that already ran (and is cached) runs the new bytes after text_poke."""
    ret = {"arm64": ("mov x0, #1; mov x8, #94; svc #0", "mov x0, #2"),
           "x86_64": ("mov edi, 1; mov eax, 231; syscall", "mov edi, 2")}[arch]
    m, _, _ = load(make_tiny(arch, [("_start", ret[0])]))
    entry = m.pc
    assert m.run().exit_code == 1
    from conftest import assemble
    new = assemble(arch, ret[1], entry)
    old = m.text_poke(entry, new)
    assert m.run(begin=entry).exit_code == 2
    assert m.patches[-1].old == old and m.patches[-1].new == new


# --- memory and symbols (units) ----------------------------------------------------------------
def test_memory_regions_split_and_merge_bookkeeping():
    from unicorn import Uc, UC_ARCH_ARM64, UC_MODE_ARM
    mem = Memory(Uc(UC_ARCH_ARM64, UC_MODE_ARM))
    mem.map(0x10000, 0x4000, PROT_READ | PROT_WRITE, "heap")
    mem.protect(0x11000, 0x1000, PROT_READ)
    assert [(r.start, r.end, r.prot) for r in mem.regions] == [
        (0x10000, 0x11000, 3), (0x11000, 0x12000, 1), (0x12000, 0x14000, 3)]
    mem.unmap(0x12000, 0x1000)
    assert not mem.is_mapped(0x12000) and mem.is_mapped(0x13000)
    assert not mem.is_mapped(0x11000, 0x2000)
    assert mem.find(0x11800).prot == PROT_READ
    assert mem.find_free(0x1000, 0x10000, 0x20000) == 0x12000
    assert mem.find_free(0x2000, 0x10000, 0x20000) == 0x14000
    assert mem.find_free(0x2000, 0x10000, 0x15000) is None
    mem.write(0x10ff0, b"abc\0")
    assert mem.read_cstr(0x10ff0) == b"abc"
    assert mem.read_safe(0x12000, 4) is None
    mem.map(0x20000, 0x1000, PROT_READ | PROT_EXEC, "text")
    assert [r.name for r in mem.regions][-1] == "text"


def test_symbol_table_lookup_and_format():
    syms = SymbolTable()
    syms.add("data_obj", 0x1000, 0x40, "object")
    syms.add("func_alias", 0x1000, 0x40, "func")
    syms.add("inner", 0x2000, 0x10, "func")
    syms.add("outer", 0x1ff0, 0x100, "func")
    syms.add("label", 0x3000, 0, "notype")
    assert syms.lookup("func_alias").addr == 0x1000
    assert syms.find(0x1010).name == "func_alias"          # functions win over data
    assert syms.format(0x1010) == "func_alias+0x10/0x40"
    assert syms.format(0x1010, with_size=False) == "func_alias+0x10"
    assert syms.find(0x2008).name == "inner"
    assert syms.find(0x20e0).name == "outer"
    assert syms.find(0x1040) is None and syms.format(0x1040) == "0x1040"
    assert syms.lookup("nope") is None
    assert [s.name for s in syms.functions()] == ["func_alias", "outer", "inner"]


def test_bare_fault_outside_ram(arch, make_tiny):
    """Page 0 (x86-64) and anything outside RAM/devices (arm64) is unmapped in bare metal."""
    code = {"arm64": "movz x0, #0x2000, lsl #16; ldr x1, [x0]",       # 0x20000000: no RAM
            "x86_64": "mov eax, 0x10; mov rbx, [rax]"}[arch]           # the zero page
    r = run_emu("run", "--bare", str(make_tiny(arch, [("_start", "nop"), ("peek", code)],
                                               base=BARE_BASE[arch])))
    addr = {"arm64": "0x20000000", "x86_64": "0x10"}[arch]
    assert r.rc == 139 and r.out == ""
    assert re.fullmatch(rf"emu: guest fault: read of unmapped address {addr} at pc 0x[0-9a-f]+ "
                        r"<peek\+0x[0-9a-f]+>: \S.*\n", r.err), r.err


def test_hlt_in_linux_user_mode_is_a_fault(arch, make_tiny):
    code = {"arm64": "nop; hlt #0", "x86_64": "nop; hlt"}[arch]
    r = run_emu("run", str(make_tiny(arch, [("_start", code)])))
    assert r.rc == 139 and "guest fault" in r.err
