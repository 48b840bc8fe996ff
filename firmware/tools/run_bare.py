#!/usr/bin/env python3
"""Minimal reference runner for the bare-metal firmware images (*.bare.elf).

This is NOT the kprobe-emu emulator: it is a ~100-line Unicorn harness that
implements exactly the bare-metal machine described in firmware/README.md, so
the images can be validated on their own:

  arm64   RAM 0x40000000-0x47ffffff, sp = 0x48000000, EL1
          PL011 data register 0x09000000 (32-bit store = one character)
          exit device 0x09100000 (32-bit store of v = halt, exit code v)
  x86-64  64-bit mode, RAM 0x1000-0x7ffffff (page 0 unmapped), sp = 0x8000000
          out to port 0x3f8 = one character; out (32-bit) to port 0xf4 =
          halt with exit code = value; hlt = halt with exit code 0

Usage: run_bare.py IMAGE.bare.elf   (prints the console output on stdout and
exits with the guest's exit code; 125 if the guest faulted/ran away).
Needs: unicorn (2.x) and pyelftools, e.g. the project's .venv.
"""
import sys

from elftools.elf.elffile import ELFFile
from unicorn import (UC_ARCH_ARM64, UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_MEM_WRITE,
                     UC_MODE_64, UC_MODE_ARM, UC_PROT_ALL, Uc, UcError)
from unicorn.arm64_const import UC_ARM64_REG_PC, UC_ARM64_REG_SP
from unicorn.x86_const import (UC_X86_INS_OUT, UC_X86_REG_RIP, UC_X86_REG_RSP)

MAX_INSNS = 2_000_000_000
TIMEOUT_US = 120 * 1_000_000


def main(path):
    with open(path, "rb") as f:
        elf = ELFFile(f)
        machine = elf["e_machine"]
        entry = elf["e_entry"]
        segs = [(s["p_vaddr"], s.data(), s["p_memsz"]) for s in elf.iter_segments()
                if s["p_type"] == "PT_LOAD"]

    out = bytearray()
    state = {"code": None}

    if machine == "EM_AARCH64":
        uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
        uc.mem_map(0x40000000, 0x08000000, UC_PROT_ALL)
        uc.mem_map(0x09000000, 0x1000, UC_PROT_ALL)
        uc.mem_map(0x09100000, 0x1000, UC_PROT_ALL)

        def on_write(uc, access, addr, size, value, _):
            if addr == 0x09000000:
                out.append(value & 0xFF)
            elif addr == 0x09100000:
                state["code"] = value & 0xFFFFFFFF
                uc.emu_stop()

        uc.hook_add(UC_HOOK_MEM_WRITE, on_write, begin=0x09000000, end=0x09100fff)
        uc.reg_write(UC_ARM64_REG_SP, 0x48000000)
        pc_reg = UC_ARM64_REG_PC
    elif machine == "EM_X86_64":
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0x1000, 0x08000000 - 0x1000, UC_PROT_ALL)

        def on_out(uc, port, size, value, _):
            if port == 0x3F8 and size == 1:
                out.append(value & 0xFF)
            elif port == 0xF4 and size == 4:
                state["code"] = value & 0xFFFFFFFF
                uc.emu_stop()

        uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, UC_X86_INS_OUT)
        uc.reg_write(UC_X86_REG_RSP, 0x8000000)
        pc_reg = UC_X86_REG_RIP
    else:
        sys.exit("unsupported machine %s" % machine)

    for vaddr, data, memsz in segs:
        uc.mem_write(vaddr, data + bytes(memsz - len(data)))

    err = None
    try:
        uc.emu_start(entry, 0xFFFFFFFFFFFFFFFF, timeout=TIMEOUT_US, count=MAX_INSNS)
    except UcError as e:
        err = e
    sys.stdout.buffer.write(bytes(out))
    sys.stdout.flush()
    if state["code"] is None:
        pc = uc.reg_read(pc_reg)
        if err is None and machine == "EM_X86_64":
            # Unicorn stops on hlt: exit code 0 by convention
            insn = uc.mem_read(pc - 1, 1)
            if insn == b"\xf4":
                return 0
        sys.stderr.write("run_bare: no exit (pc=%#x, error=%s)\n" % (pc, err))
        return 125
    return state["code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
