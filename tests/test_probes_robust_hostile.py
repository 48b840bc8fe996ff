"""Hostile guests against the probe layer (issue 11): every access the probe layer makes to
guest memory on the guest's behalf goes through emu/uaccess, so an emulated or simulated
instruction, a kretprobe hijack or an optprobe detour hit with a bad stack or literal
address ends in the same one-line fault report (exit 139) the unprobed instruction gives,
at the probed instruction — never a Python traceback, never a write into read-only text.

Each row is a tiny guest assembled with keystone (`tiny_elf`): the unprobed run and the
probed run must print the same `emu: guest fault: ...` line, and that line must be the
one the row expects (so the row really exercises the fault)."""
from __future__ import annotations

import pytest

from conftest import run_emu, tiny_elf

NOSTACK = 0x10000              # unmapped in every tiny guest
RO_STACK = 0x400800            # inside the R-X headers page of the text segment


def lit(op: int, rt: int, frm: int, to: int) -> str:
    """A PC-relative literal load (LDR Xt / LDR Wt / LDRSW) from `frm` to `to`, as a word."""
    return f".long {op | (((to - frm) >> 2) & 0x7FFFF) << 5 | rt:#x}"


LDR_X, LDR_W, LDRSW = 0x58000000, 0x18000000, 0x98000000
TEXT = 0x401000                # the first function (the entry) of a tiny guest
DATA = 0x500000

def x86_start(sp: int) -> str:
    return f"mov rsp, {sp:#x}; mov rax, {{sym:other}}; jmp {{sym:victim}}"


X86_OTHER = ("other", "mov edi, 3; mov eax, 231; syscall")

# name, arch, functions, probe options, the fault line the unprobed run gives (after "at pc")
CASES = [
    ("x86-ret-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                   ("victim", "ret"), X86_OTHER],
     ["--kprobe", "victim"], "read of unmapped address 0x10000 at pc 0x401010 <victim+0x0>: ret"),
    ("x86-ret-imm-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                       ("victim", "ret 8"), X86_OTHER],
     ["--kprobe", "victim"], "read of unmapped address 0x10000 at pc 0x401010 <victim+0x0>: ret 8"),
    ("x86-call-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                    ("victim", "call {sym:other}"), X86_OTHER],
     ["--kprobe", "victim"], "write to unmapped address 0xfff8 at pc 0x401010 <victim+0x0>: call 0x401015"),
    ("x86-call-rotext", "x86_64", [("_start", x86_start(RO_STACK)),
                                   ("victim", "call {sym:other}"), X86_OTHER],
     ["--kprobe", "victim"], "write to protected address 0x4007f8 at pc 0x401010 <victim+0x0>: call 0x401015"),
    ("x86-callreg-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                       ("victim", "call rax"), X86_OTHER],
     ["--kprobe", "victim"], "write to unmapped address 0xfff8 at pc 0x401010 <victim+0x0>: call rax"),
    ("x86-pushf-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                     ("victim", "pushfq"), X86_OTHER],
     ["--kprobe", "victim"], "write to unmapped address 0xfff8 at pc 0x401010 <victim+0x0>: pushfq"),
    ("x86-pushf-rotext", "x86_64", [("_start", x86_start(RO_STACK)),
                                    ("victim", "pushfq"), X86_OTHER],
     ["--kprobe", "victim"], "write to protected address 0x4007f8 at pc 0x401010 <victim+0x0>: pushfq"),
    ("x86-pushf16-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                       ("victim", ".byte 0x66, 0x9c"), X86_OTHER],
     ["--kprobe", "victim"], "write to unmapped address 0xfffe at pc 0x401010 <victim+0x0>: pushf"),
    ("x86-popf-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                    ("victim", "popfq"), X86_OTHER],
     ["--kprobe", "victim"], "read of unmapped address 0x10000 at pc 0x401010 <victim+0x0>: popfq"),
    ("x86-popf16-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                      ("victim", ".byte 0x66, 0x9d"), X86_OTHER],
     ["--kprobe", "victim"], "read of unmapped address 0x10000 at pc 0x401010 <victim+0x0>: popf"),
    # kretprobe entered with a bad sp: no hijack (as uretprobes); the guest's own `ret` faults.
    ("x86-kretprobe-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                         ("victim", "mov eax, 1; ret"), X86_OTHER],
     ["--kretprobe", "victim"], "read of unmapped address 0x10000 at pc 0x401015 <victim+0x5>: ret"),
    ("x86-kretprobe-rotext", "x86_64", [("_start", x86_start(RO_STACK)),
                                        ("victim", "mov eax, 1; ret"), X86_OTHER],
     ["--kretprobe", "victim"], "fetch from unmapped address 0x0 at pc 0x0: <unmapped>"),
    # optprobe: the first hit of a queued probe resumes in the detour's copy of `push rbp`.
    ("x86-optprobe-nostack", "x86_64", [("_start", x86_start(NOSTACK)),
                                        ("victim", "push rbp; mov rbp, rsp; pop rbp; ret"), X86_OTHER],
     ["--kprobe", "victim", "--optimize"],
     "write to unmapped address 0xfff8 at pc 0x401010 <victim+0x0>: push rbp"),
    ("x86-optprobe-rotext", "x86_64", [("_start", x86_start(RO_STACK)),
                                       ("victim", "push rbp; mov rbp, rsp; pop rbp; ret"), X86_OTHER],
     ["--kprobe", "victim", "--optimize"],
     "write to protected address 0x4007f8 at pc 0x401010 <victim+0x0>: push rbp"),
    # a boosted slot (no kprobe current when its copy runs): the second hit faults there.
    ("x86-boosted-rotext", "x86_64", [("_start", f"call {{sym:victim}}; mov rsp, {RO_STACK:#x}; "
                                                 "jmp {sym:victim}"),
                                      ("victim", "push rbp; pop rbp; ret")],
     ["--kprobe", "victim"], "write to protected address 0x4007f8 at pc 0x40100e <victim+0x0>: push rbp"),
    # arm64 literal loads (simulated) from an unmapped page and from a PROT_NONE page.
    ("arm64-ldr-x-unmapped", "arm64", [("victim", lit(LDR_X, 0, TEXT, TEXT + 0x10000))],
     ["--kprobe", "victim"], "read of unmapped address 0x411000 at pc 0x401000 <victim+0x0>: ldr x0, #0x411000"),
    ("arm64-ldr-w-unmapped", "arm64", [("victim", lit(LDR_W, 1, TEXT, TEXT + 0x10000))],
     ["--kprobe", "victim"], "read of unmapped address 0x411000 at pc 0x401000 <victim+0x0>: ldr w1, #0x411000"),
    ("arm64-ldrsw-unmapped", "arm64", [("victim", lit(LDRSW, 2, TEXT, TEXT + 0x10000))],
     ["--kprobe", "victim"], "read of unmapped address 0x411000 at pc 0x401000 <victim+0x0>: ldrsw x2, #0x411000"),
    ("arm64-ldr-protnone", "arm64", [("victim", lit(LDR_X, 0, TEXT, DATA))],
     ["--kprobe", "victim"], "read of protected address 0x500000 at pc 0x401000 <victim+0x0>: ldr x0, #0x500000"),
    ("arm64-ldr-optprobe", "arm64", [("victim", lit(LDR_X, 0, TEXT, TEXT + 0x10000))],
     ["--kprobe", "victim", "--optimize"],
     "read of unmapped address 0x411000 at pc 0x401000 <victim+0x0>: ldr x0, #0x411000"),
    # arm64 stack stores: stepped in the slot, and in an optprobe detour.
    ("arm64-str-nostack-kprobe", "arm64", [("_start", f"mov x9, #{NOSTACK:#x}; mov sp, x9; b {{sym:victim}}"),
                                           ("victim", "str x0, [sp, #-16]!")],
     ["--kprobe", "victim"], "write to unmapped address 0xfff0 at pc 0x40100c <victim+0x0>: str x0, [sp, #-0x10]!"),
    ("arm64-str-nostack-opt", "arm64", [("_start", f"mov x9, #{NOSTACK:#x}; mov sp, x9; b {{sym:victim}}"),
                                        ("victim", "str x0, [sp, #-16]!")],
     ["--kprobe", "victim", "--optimize"],
     "write to unmapped address 0xfff0 at pc 0x40100c <victim+0x0>: str x0, [sp, #-0x10]!"),
    ("arm64-kretprobe-nostack", "arm64", [("_start", f"mov x9, #{NOSTACK:#x}; mov sp, x9; bl {{sym:victim}}"),
                                          ("victim", "mov x1, #1; str x0, [sp, #-16]!; ret")],
     ["--kretprobe", "victim"], "write to unmapped address 0xfff0 at pc 0x401010 <victim+0x4>: str x0, [sp, #-0x10]!"),
]


@pytest.mark.parametrize("name,arch,funcs,probe,fault", CASES, ids=[c[0] for c in CASES])
def test_hostile_guest_probed_faults_like_unprobed(tmp_path, name, arch, funcs, probe, fault):
    kw = {"data": bytes(16), "data_prot": 0} if "protnone" in name else {}
    path = tmp_path / f"{name}.elf"
    path.write_bytes(tiny_elf(arch, funcs, **kw))
    plain = run_emu("run", str(path))
    probed = run_emu("run", *probe, str(path))
    line = f"emu: guest fault: {fault}"
    assert (plain.rc, plain.err.splitlines()[0]) == (139, line), plain.err
    assert probed.rc == 139, probed.err
    assert probed.err.splitlines()[0] == line, probed.err
    assert "Traceback" not in probed.err


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_fault_in_detour_copy_reported_at_its_instruction(tmp_path, arch):
    """A jump-optimized probe whose detour runs copies of two instructions: a fault in the
    second copy is reported at the second original instruction (the guest's own address),
    with the unprobed run's fault line."""
    from emu.loader import GuestConfig, load_guest
    from probes.kprobes import Kprobe, kprobes_of
    from probes.optprobes import enable_optprobes

    if arch == "x86_64":
        funcs = [("_start", x86_start(RO_STACK)), ("victim", "nop; push rbp; mov rbp, rsp; pop rbp; ret"),
                 X86_OTHER]
    else:
        funcs = [("_start", f"mov x9, #{NOSTACK:#x}; mov sp, x9; b {{sym:victim}}"),
                 ("victim", "str x0, [sp, #-16]!; ret")]
    path = tmp_path / "victim.elf"
    path.write_bytes(tiny_elf(arch, funcs))
    import io
    plain = load_guest(GuestConfig(path=str(path)), io.BytesIO(), io.BytesIO(), io.BytesIO())
    want = plain.machine.run(timeout=10)
    g = load_guest(GuestConfig(path=str(path)), io.BytesIO(), io.BytesIO(), io.BytesIO())
    kp = kprobes_of(g.machine)
    opt = enable_optprobes(kp)
    p = Kprobe(symbol_name="victim")
    kp.register_kprobe(p)
    assert opt.kick_kprobe_optimizer() == 1 and p.ainsn.optimized
    got = g.machine.run(timeout=10)
    assert (got.exit_code, got.message) == (want.exit_code, want.message) and got.exit_code == 139
    assert "victim+0x" + ("1" if arch == "x86_64" else "0") in got.message
    assert p.hits == 1


FTRACE_FLAGS = {"x86_64": ["-fno-pie", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount"],
                "arm64": ["-fpatchable-function-entry=2"]}
# x86: the trampoline's own stack read (the call's return address) faults at the
# trampoline; arm64: the per-site stub reads no memory, the function's prologue faults.
FTRACE_FAULT = {"x86_64": r"read of unmapped address 0x10000 at pc 0x[0-9a-f]+: ",
                "arm64": r"write to unmapped address 0x[0-9a-f]+ at pc 0x[0-9a-f]+ <traced\+0x8>: stp x29, x30"}


@pytest.fixture(scope="module")
def ftrace_jump(tmp_path_factory):
    import shutil
    import subprocess

    from conftest import CROSS_CC, ROOT
    built = {}

    def build(arch: str):
        if arch not in built:
            cc = shutil.which(CROSS_CC[arch])
            if cc is None:
                pytest.skip(f"{CROSS_CC[arch]} not installed")
            out = tmp_path_factory.mktemp("fj") / f"ftrace_jump.{arch}"
            src = ROOT / "tests" / "data" / "probes_robust" / "ftrace_jump.c"
            proc = subprocess.run([cc, "-O2", "-static", *FTRACE_FLAGS[arch], "-o", str(out), str(src)],
                                  capture_output=True, text=True)
            if proc.returncode:
                pytest.skip(f"cannot build an ftrace guest: {proc.stderr.strip()[:200]}")
            built[arch] = out
        return built[arch]
    return build


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
@pytest.mark.parametrize("probe", [["--ftrace-filter", "traced"], ["--kprobe", "traced"]],
                         ids=["function-tracer", "kprobe-on-site"])
def test_ftrace_trampoline_reached_with_bad_sp(ftrace_jump, arch, probe):
    """The guest finds its patched ftrace site, computes the trampoline and jumps there
    with sp on an unmapped page: a one-line guest fault, no traceback."""
    import re
    path = ftrace_jump(arch)
    plain = run_emu("run", str(path))
    assert plain.rc == 3 and b"site not patched: 2" in plain.stdout     # nop sites: no jump
    r = run_emu("run", *probe, str(path))
    assert r.rc == 139, r.err
    assert "Traceback" not in r.err
    fault = [ln for ln in r.err.splitlines() if ln.startswith("emu: guest fault: ")]
    assert len(fault) == 1 and re.match("emu: guest fault: " + FTRACE_FAULT[arch], fault[0]), r.err


# A probe hit that moves pc from Unicorn's interrupt hook leaves Unicorn's
# skip_sync_pc_on_exit set until the next emu_start, so Unicorn's memory hooks skip the
# state restore that gives a later fault's exact pc. The machine's virtual TLB
# (emu/vtlb.py) sends every faulting access through a TLB fill, which restores it first.
LATER_FAULT = {
    "x86_64": [("_start", "mov rsp, 0x400800; jmp {sym:victim}"), ("victim", "nop; jmp {sym:other}"),
               ("other", "mov eax, 1; add eax, 2; nop; push rbp; ret")],
    "arm64": [("_start", "mov x9, #0x10000; b {sym:victim}"), ("victim", "nop; b {sym:other}"),
              ("other", "mov x0, #1; add x0, x0, #2; mov sp, x9; str x0, [sp, #-16]!; ret")],
}


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_fault_after_a_probe_hit_is_reported_at_its_instruction(tmp_path, arch):
    path = tmp_path / "later.elf"
    path.write_bytes(tiny_elf(arch, LATER_FAULT[arch]))
    plain = run_emu("run", str(path))
    probed = run_emu("run", "--kprobe", "victim", str(path))
    assert plain.rc == probed.rc == 139
    assert "<other+0x0>" not in plain.err.splitlines()[0]
    assert probed.err.splitlines()[0] == plain.err.splitlines()[0]
