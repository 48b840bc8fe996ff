"""Probe-layer states a guest can drive end as guest faults (exit 139, one line), never as
"bad input" (exit 2) or a traceback (issue 11): calling the kretprobe trampoline with no
pending instance, re-entering a probe through a corrupt slot, jumping into a slot, writing
one. The probe layer's pages are not the guest's (as kernel kprobe memory is not in a
process's address space): mprotect and mmap MAP_FIXED over them fail with ENOMEM, munmap
leaves them in place."""
from __future__ import annotations

import io
import struct

import pytest

from conftest import ARCHES, LINUX_EXIT, run_emu, tiny_elf
from emu.loader import GuestConfig, load_guest
from emu.machine import StopReason
from probes.kprobes import Kprobe, kprobes_of

EXIT0 = {a: LINUX_EXIT[a].format(code=0) for a in ARCHES}

# The victim saves its own return address (x86 the word at rsp, arm64 x30) and returns;
# the caller then jumps to the saved address once more. Unprobed that lands after the call
# again and exits 0; under a kretprobe the saved address is the trampoline, now with no
# pending instance (Linux sends SIGILL: "handle uretprobe, sending SIGILL").
TRAMPOLINE_AGAIN = {
    "x86_64": [("_start", "xor ebx, ebx; call {sym:victim}; test ebx, ebx; jnz {sym:done}; "
                          "inc ebx; jmp r12"),
               ("victim", "mov r12, [rsp]; ret"), ("done", EXIT0["x86_64"])],
    "arm64": [("_start", "mov x20, #0; bl {sym:victim}; cbnz x20, {sym:done}; mov x20, #1; br x19"),
              ("victim", "mov x19, x30; ret"), ("done", EXIT0["arm64"])],
}


@pytest.mark.parametrize("arch", ARCHES)
def test_trampoline_without_instance_is_a_guest_fault(tmp_path, arch):
    path = tmp_path / "tramp.elf"
    path.write_bytes(tiny_elf(arch, TRAMPOLINE_AGAIN[arch]))
    assert run_emu("run", str(path)).rc == 0
    r = run_emu("run", "--kretprobe", "victim", str(path))
    assert r.rc == 139, r.err
    first = r.err.splitlines()[0]
    assert first.startswith("emu: guest fault: kretprobe trampoline reached with no pending "
                            "instance at pc 0x"), r.err
    assert "Traceback" not in r.err
    assert "victim+0x0" in r.err and "kretprobe" in r.err         # the probe table follows


# The guest tries to take the slot page over: mprotect it RWX (-ENOMEM: not the guest's),
# mmap MAP_FIXED over it (-ENOMEM), munmap a range around it (0, the page stays), then
# calls the probed function, which still works. The results are left in registers.
SLOT_GRAB = {
    "x86_64": [("_start", "mov rdi, rbx; mov esi, 4096; mov edx, 7; mov eax, 10; syscall; mov r13, rax; "
                          "mov rdi, rbx; mov esi, 4096; mov edx, 7; mov r10d, 0x32; mov r8, -1; xor r9d, r9d; "
                          "mov eax, 9; syscall; mov r14, rax; "
                          "lea rdi, [rbx - 0x10000]; mov esi, 0x11000; mov eax, 11; syscall; mov r15, rax; "
                          "mov eax, 41; call {sym:victim}; mov edi, eax; mov eax, 231; syscall"),
               ("victim", "add eax, 1; ret")],
    "arm64": [("_start", "mov x0, x19; mov x1, #4096; mov x2, #7; mov x8, #226; svc #0; mov x21, x0; "
                         "mov x0, x19; mov x1, #4096; mov x2, #7; mov x3, #0x32; mov x4, #-1; mov x5, #0; "
                         "mov x8, #222; svc #0; mov x22, x0; "
                         "sub x0, x19, #0x10, lsl #12; mov x1, #0x10000; add x1, x1, #0x1000; mov x8, #215; svc #0; mov x23, x0; "
                         "mov x0, #41; bl {sym:victim}; mov x8, #94; svc #0"),
              ("victim", "add x0, x0, #1; ret")],
}
GRAB_REGS = {"x86_64": ("rbx", "r13", "r14", "r15"), "arm64": ("x19", "x21", "x22", "x23")}
ENOMEM = 12


@pytest.mark.parametrize("arch", ARCHES)
def test_guest_cannot_take_over_probe_pages(tmp_path, arch):
    m, p = _guest_with_probe(tmp_path, arch, SLOT_GRAB[arch])
    page, mprotect_rc, mmap_rc, munmap_rc = GRAB_REGS[arch]
    m.set_reg(page, p.ainsn.slot & ~0xFFF)
    before = m.memory.read(p.ainsn.slot & ~0xFFF, 0x1000)
    result = m.run(timeout=10)
    assert (result.reason, result.exit_code) == (StopReason.EXIT, 42), result.message
    rc = {n: m.reg(n) - (1 << 64) if m.reg(n) >> 63 else m.reg(n) for n in (mprotect_rc, mmap_rc, munmap_rc)}
    assert (rc[mprotect_rc], rc[mmap_rc], rc[munmap_rc]) == (-ENOMEM, -ENOMEM, 0)
    assert m.memory.read(p.ainsn.slot & ~0xFFF, 0x1000) == before
    assert p.hits == 1


# A slot that no longer returns to its probe (here corrupted by the host, as a guest could
# only have done through a hole in the page claim): probe -> slot -> probe (reentry,
# nmissed) -> slot -> probe: the kernel's "Unrecoverable kprobe detected", a guest fault.
REENTER = {
    "x86_64": [("_start", "call {sym:victim}; " + EXIT0["x86_64"]), ("victim", "add eax, 1; ret")],
    "arm64": [("_start", "bl {sym:victim}; " + EXIT0["arm64"]), ("victim", "add x0, x0, #1; ret")],
}


def _guest_with_probe(tmp_path, arch: str, funcs) -> tuple:
    path = tmp_path / "g.elf"
    path.write_bytes(tiny_elf(arch, funcs))
    g = load_guest(GuestConfig(path=str(path)), io.BytesIO(), io.BytesIO(), io.BytesIO())
    p = Kprobe(symbol_name="victim", pre_handler=lambda kp, regs: 0,
               post_handler=lambda kp, regs, flags: None)      # keeps the step trap (no boost)
    kprobes_of(g.machine).register_kprobe(p)
    assert p.ainsn.slot is not None
    return g.machine, p


def _jump(arch: str, frm: int, to: int) -> bytes:
    if arch == "x86_64":
        return b"\xe9" + struct.pack("<i", to - (frm + 5))
    return struct.pack("<I", 0x14000000 | (((to - frm) >> 2) & 0x03FFFFFF))


@pytest.mark.parametrize("arch", ARCHES)
def test_reentry_through_a_corrupt_slot_is_a_guest_fault(tmp_path, arch):
    m, p = _guest_with_probe(tmp_path, arch, REENTER[arch])
    m.text_poke(p.ainsn.slot, _jump(arch, p.ainsn.slot, p.addr))
    result = m.run(timeout=10)
    assert (result.reason, result.exit_code) == (StopReason.FAULT, 139), result.message
    assert result.message.startswith(f"guest fault: unrecoverable kprobe reentry at pc {p.addr:#x} "
                                     "<victim+0x0>")
    assert (p.hits, p.nmissed) == (1, 1)
    kp = kprobes_of(m)
    assert kp.kcb.current is None and not kp.kcb.prev


SLOT_REGS = {"x86_64": ("rbx", "r12", "r13"), "arm64": ("x19", "x20", "x21")}
SLOT_WRITE = {
    "x86_64": [("_start", "mov [r12], r13; call {sym:victim}; " + EXIT0["x86_64"]),
               ("victim", "add eax, 1; ret")],
    "arm64": [("_start", "str w21, [x20]; bl {sym:victim}; " + EXIT0["arm64"]),
              ("victim", "add x0, x0, #1; ret")],
}


@pytest.mark.parametrize("arch", ARCHES)
def test_writing_a_slot_without_mprotect_faults(tmp_path, arch):
    """Probe-layer pages are read-only and executable to the guest: a store faults as on
    any read-only text, and the slot stays intact."""
    m, p = _guest_with_probe(tmp_path, arch, SLOT_WRITE[arch])
    page, slot, word = SLOT_REGS[arch]
    m.set_reg(page, 0)
    m.set_reg(slot, p.ainsn.slot)
    m.set_reg(word, 0x4141414141414141)
    before = m.memory.read(p.ainsn.slot, len(p.ainsn.slot_code))
    result = m.run(timeout=10)
    assert result.exit_code == 139
    assert result.message.startswith(f"guest fault: write to protected address {p.ainsn.slot:#x}")
    assert m.memory.read(p.ainsn.slot, len(before)) == before == p.ainsn.slot_code


JUMP_INTO_SLOT = {
    "x86_64": [("_start", "mov eax, 5; jmp r12"), ("victim", "add eax, 1; ret")],
    "arm64": [("_start", "mov x0, #5; br x20"), ("victim", "add x0, x0, #1; ret")],
}


@pytest.mark.parametrize("arch", ARCHES)
def test_jump_into_a_slot_ends_on_its_trap(tmp_path, arch):
    """A guest that jumps into a slot runs the copy and meets the step trap with no probe
    being stepped: a breakpoint trap no one owns (SIGTRAP), a guest fault."""
    m, p = _guest_with_probe(tmp_path, arch, JUMP_INTO_SLOT[arch])
    m.set_reg(SLOT_REGS[arch][1], p.ainsn.slot)
    result = m.run(timeout=10)
    assert result.exit_code == 139
    assert result.message.startswith(f"guest fault: breakpoint trap (no handler) at pc "
                                     f"{p.ainsn.ss_trap:#x}")
    assert p.hits == 0 and m.reg(m.arch.ret) == 6          # the copy ran once
