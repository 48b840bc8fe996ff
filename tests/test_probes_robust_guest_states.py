"""Probe-layer states a guest can drive end as guest faults (exit 139, one line), never as
"bad input" (exit 2) or a traceback (issue 11): calling the kretprobe trampoline with no
pending instance, re-entering a probe through a slot the guest rewrote, jumping into a slot,
and unmapping or writing the probe layer's pages."""
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


# The guest makes the slot page writable, rewrites the slot to jump back to the probed
# instruction and calls the probed function: probe -> slot -> probe (reentry, nmissed)
# -> slot -> probe: the kernel's "Unrecoverable kprobe detected".
SLOT_HIJACK = {
    "x86_64": [("_start", "mov rdi, rbx; mov esi, 4096; mov edx, 7; mov eax, 10; syscall; "
                          "mov [r12], r13; call {sym:victim}; " + EXIT0["x86_64"]),
               ("victim", "add eax, 1; ret")],
    "arm64": [("_start", "mov x0, x19; mov x1, #4096; mov x2, #7; mov x8, #226; svc #0; "
                         "str w21, [x20]; bl {sym:victim}; " + EXIT0["arm64"]),
              ("victim", "add x0, x0, #1; ret")],
}
SLOT_REGS = {"x86_64": ("rbx", "r12", "r13"), "arm64": ("x19", "x20", "x21")}


def _guest_with_probe(tmp_path, arch: str, funcs) -> tuple:
    path = tmp_path / "g.elf"
    path.write_bytes(tiny_elf(arch, funcs))
    g = load_guest(GuestConfig(path=str(path)), io.BytesIO(), io.BytesIO(), io.BytesIO())
    p = Kprobe(symbol_name="victim", pre_handler=lambda kp, regs: 0,
               post_handler=lambda kp, regs, flags: None)      # keeps the step trap (no boost)
    kprobes_of(g.machine).register_kprobe(p)
    assert p.ainsn.slot is not None
    return g.machine, p


def _jump_word(arch: str, frm: int, to: int) -> int:
    if arch == "x86_64":
        return int.from_bytes(b"\xe9" + struct.pack("<i", to - (frm + 5)) + b"\x90" * 3, "little")
    return 0x14000000 | (((to - frm) >> 2) & 0x03FFFFFF)


@pytest.mark.parametrize("arch", ARCHES)
def test_reentry_through_rewritten_slot_is_a_guest_fault(tmp_path, arch):
    m, p = _guest_with_probe(tmp_path, arch, SLOT_HIJACK[arch])
    page, slot, word = SLOT_REGS[arch]
    m.set_reg(page, p.ainsn.slot & ~0xFFF)
    m.set_reg(slot, p.ainsn.slot)
    m.set_reg(word, _jump_word(arch, p.ainsn.slot, p.addr))
    result = m.run(timeout=10)
    assert (result.reason, result.exit_code) == (StopReason.FAULT, 139), result.message
    assert result.message.startswith(f"guest fault: unrecoverable kprobe reentry at pc {p.addr:#x} "
                                     "<victim+0x0>")
    assert (p.hits, p.nmissed) == (1, 1)
    kp = kprobes_of(m)
    assert kp.kcb.current is None and not kp.kcb.prev


@pytest.mark.parametrize("arch", ARCHES)
def test_writing_a_slot_without_mprotect_faults(tmp_path, arch):
    """Probe-layer pages are read-only and executable to the guest: a store faults as on
    any read-only text, and the slot stays intact."""
    funcs = [(n, s.replace("syscall; ", "").replace("svc #0; ", "")) for n, s in SLOT_HIJACK[arch]]
    m, p = _guest_with_probe(tmp_path, arch, funcs)
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


MUNMAP_SLOT = {
    "x86_64": [("_start", "mov rdi, rbx; mov esi, 4096; mov eax, 11; syscall; mov r14, rax; "
                          "call {sym:victim}; " + EXIT0["x86_64"]),
               ("victim", "add eax, 1; ret")],
    "arm64": [("_start", "mov x0, x19; mov x1, #4096; mov x8, #215; svc #0; mov x22, x0; "
                         "bl {sym:victim}; " + EXIT0["arm64"]),
              ("victim", "add x0, x0, #1; ret")],
}


@pytest.mark.parametrize("arch", ARCHES)
def test_unmapped_slot_page_faults_at_the_probe(tmp_path, arch):
    """A guest that unmaps the probe layer's slot page: the next hit cannot step, a fetch
    fault reported at the probed instruction (as a fault in the slot is)."""
    m, p = _guest_with_probe(tmp_path, arch, MUNMAP_SLOT[arch])
    m.set_reg(SLOT_REGS[arch][0], p.ainsn.slot & ~0xFFF)
    result = m.run(timeout=10)
    assert result.exit_code == 139, result.message
    assert result.message.startswith(f"guest fault: fetch from unmapped address {p.ainsn.slot:#x} "
                                     f"at pc {p.addr:#x} <victim+0x0>")
