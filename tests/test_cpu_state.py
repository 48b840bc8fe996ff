"""The CPU a guest starts on is Linux's (issue 10) and runs unprivileged (issue 11).

Programs under tests/data/cpu/ are compiled here (glibc static on both arches, musl on x86-64
when musl-gcc exists) and compared with native (x86-64) or qemu-user (arm64) runs."""
from __future__ import annotations

import io
import shutil
import subprocess

import pytest

from conftest import CROSS_CC, ROOT, firmware_elf, run_emu, run_reference
from emu.cycles import native
from emu.loader import GuestConfig, load_guest
from emu.machine import SIGILL, SIGSEGV, StopReason

CPU_DATA = ROOT / "tests" / "data" / "cpu"
COMPILERS = {("x86_64", "glibc"): CROSS_CC["x86_64"], ("arm64", "glibc"): CROSS_CC["arm64"],
             ("x86_64", "musl"): "musl-gcc"}


@pytest.fixture(scope="module")
def cpu_prog(tmp_path_factory):
    """cpu_prog(arch, name, libc="glibc") -> a static binary of tests/data/cpu/<name>.c."""
    out_dir = tmp_path_factory.mktemp("cpu-progs")
    built = {}

    def build(arch: str, name: str, libc: str = "glibc"):
        key = (arch, name, libc)
        if key not in built:
            cc = shutil.which(COMPILERS[(arch, libc)])
            if cc is None:
                pytest.skip(f"{COMPILERS[(arch, libc)]} not installed")
            out = out_dir / f"{name}-{libc}.{arch}"
            proc = subprocess.run([cc, "-O2", "-static", "-o", str(out), str(CPU_DATA / f"{name}.c"),
                                   "-lm"], capture_output=True, text=True)
            if proc.returncode:
                pytest.skip(f"{cc} cannot build a static program: {proc.stderr.strip()[:200]}")
            built[key] = out
        return built[key]

    return build


def run_guest(path, *argv: str):
    out, err = io.BytesIO(), io.BytesIO()
    guest = load_guest(GuestConfig(path=str(path), argv=list(argv)), io.BytesIO(), out, err)
    return guest.machine, guest.machine.run(timeout=60), out.getvalue()


# --- item 1: the floating-point environment ---------------------------------------------------
def _without_flags(text: str) -> str:
    """Unicorn's x87/SSE (QEMU 5) does not accumulate exception flags in FSW/MXCSR: the
    program prints them on `flags:` lines, compared only on arm64."""
    return "".join(line for line in text.splitlines(True) if not line.startswith("flags:"))


@pytest.mark.parametrize("libc", ["glibc", "musl"])
def test_fenv_matches_reference(arch, libc, cpu_prog):
    if libc == "musl" and arch != "x86_64":
        pytest.skip("musl-gcc targets the host (x86-64) only")
    prog = cpu_prog(arch, "fenv", libc)
    ref = run_reference(arch, [str(prog)])
    assert ref.rc == 0, ref.err
    r = run_emu("run", str(prog))
    assert r.rc == 0, r.err
    if arch == "x86_64":
        assert "fcw=0x37f mxcsr-control=0x1f80 rflags&system=0x200 cpl=3" in r.out
        assert "1/3L=0.333333333333333333342" in r.out          # 64-bit x87 precision
        assert _without_flags(r.out) == _without_flags(ref.out)
    else:
        assert r.out.startswith("fpcr=0 fpsr=0\n")
        assert r.out == ref.out


def test_initial_registers(arch, cpu_prog):
    """Linux mode: CPL3 / EL0 with the FNINIT x87 state and MXCSR default, or FPCR/FPSR 0;
    bare metal keeps CPL0 / EL1 (same FP control)."""
    guest = load_guest(GuestConfig(path=str(cpu_prog(arch, "fenv"))), io.BytesIO(),
                       io.BytesIO(), io.BytesIO())
    state = guest.machine.arch.cpu_state(guest.machine)
    bare = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo.bare")), bare=True),
                      io.BytesIO(), io.BytesIO(), io.BytesIO()).machine
    bare_state = bare.arch.cpu_state(bare)
    if arch == "x86_64":
        expect = {"cpl": 3, "cs": 0x33, "ss": 0x2B, "rflags": 0x202, "fpcw": 0x37F, "fpsw": 0,
                  "fptag": 0xFFFF, "mxcsr": 0x1F80}
        assert state == expect
        assert bare_state["cpl"] == 0 and bare_state["fpcw"] == 0x37F and bare_state["mxcsr"] == 0x1F80
    else:
        assert state["el"] == 0 and state["pstate"] == 0 and state["fpcr"] == state["fpsr"] == 0
        assert state["cpacr_el1"] >> 20 & 3 == 3
        assert bare_state["el"] == 1 and bare_state["fpcr"] == 0
    assert guest.machine.user_mode and not bare.user_mode


# --- item 2: unprivileged user mode -----------------------------------------------------------
PRIVILEGED = {
    "x86_64": ["cli", "sti", "hlt", "in", "out", "out_dx", "rdmsr", "wrmsr", "read_cr0",
               "write_cr3", "invlpg", "lgdt", "wbinvd", "swapgs", "mov_dr7"],
    "arm64": ["daifset", "read_sctlr", "write_vbar", "tlbi", "eret", "hvc", "smc", "ic_iallu",
              "at_s1e1r", "read_esr", "hlt"],
}
ALLOWED = {
    "x86_64": ["ok_rdtsc", "ok_pause", "ok_tls_read", "ok_popf_if"],
    "arm64": ["ok_wfi", "ok_wfe", "ok_yield", "ok_cntvct", "ok_cntfrq", "ok_tpidr", "ok_ctr",
              "ok_dc_zva", "ok_fp"],
}
SIGNAL = {"x86_64": SIGSEGV, "arm64": SIGILL}         # #GP -> SIGSEGV; EL0 undefined -> SIGILL
KIND = {"x86_64": "general protection", "arm64": "privileged instruction"}


@pytest.mark.slow
def test_privileged_instructions_fault(arch, cpu_prog):
    prog = cpu_prog(arch, "privileged")
    listed = run_reference(arch, [str(prog)]).out.split()
    assert sorted(listed) == sorted(PRIVILEGED[arch] + ALLOWED[arch])
    for case in PRIVILEGED[arch]:
        ref = run_reference(arch, [str(prog), case])
        assert ref.rc == 128 + SIGNAL[arch], (case, ref)
        m, result, out = run_guest(prog, case)
        assert result.reason is StopReason.FAULT and result.exit_code == 139, (case, result)
        kind = "privileged instruction" if case == "hlt" else KIND[arch]   # the halt path
        assert result.fault.signal == SIGNAL[arch] and result.fault.kind == kind, case
        sym = m.symbols.find(result.fault.pc)
        assert sym is not None and sym.name.startswith(case.split("_")[0][:3]), (case, result.message)
        assert out == b""


@pytest.mark.slow
def test_unprivileged_instructions_continue(arch, cpu_prog):
    """Counters, TLS, FP, cache and wait hints work at CPL3/EL0; arm64 WFI/WFE continue as
    under Linux and qemu-user instead of ending the run."""
    prog = cpu_prog(arch, "privileged")
    for case in ALLOWED[arch]:
        ref = run_reference(arch, [str(prog), case])
        _, result, out = run_guest(prog, case)
        assert (result.reason, result.exit_code) == (StopReason.EXIT, 0), (case, result)
        assert out == ref.stdout == f"survived {case}\n".encode()


def test_fault_report_cli(arch, cpu_prog):
    case = {"x86_64": "rdmsr", "arm64": "read_sctlr"}[arch]
    r = run_emu("run", str(cpu_prog(arch, "privileged")), "--", case)
    assert r.rc == 139 and len(r.err.splitlines()) == 1
    insn = {"x86_64": ": rdmsr", "arm64": ": mrs x0, sctlr_el1"}[arch]
    assert r.err.startswith(f"emu: guest fault: {KIND[arch]} at pc 0x") and r.err.rstrip().endswith(insn)


# --- item 3: wait instructions in user mode ---------------------------------------------------
WAIT_LOOP = {"arm64": "movz x0, #{n}; l: wfi; wfe; yield; subs x0, x0, #1; b.ne l; "
                      "mov x0, #7; mov x8, #94; svc #0",
             "x86_64": "mov ecx, {n}; l: pause; dec ecx; jnz l; mov edi, 7; mov eax, 231; syscall"}
SPIN = {"arm64": "l: wfi; b l", "x86_64": "l: pause; jmp l"}


def test_wait_instructions_continue(arch, make_tiny):
    r = run_emu("run", str(make_tiny(arch, [("_start", WAIT_LOOP[arch].format(n=500))])))
    assert (r.rc, r.err) == (7, "")


@pytest.mark.slow
def test_wait_loop_obeys_limits(arch, make_tiny):
    """A guest spinning on WFI (each one ends Unicorn's emu_start) still meets --max-insns
    and --timeout."""
    path = str(make_tiny(arch, [("_start", SPIN[arch])]))
    r = run_emu("run", "--max-insns", "5000", path, timeout=60)
    assert r.rc == 124 and r.err.startswith("emu: instruction limit of 5000 reached"), r.err
    r = run_emu("run", "--timeout", "1", path, timeout=60)
    assert r.rc == 124 and r.err.startswith("emu: wall-clock limit of 1 s reached"), r.err
    guest = load_guest(GuestConfig(path=path), io.BytesIO(), io.BytesIO(), io.BytesIO())
    result = guest.machine.run(max_insns=5000)
    assert result.reason is StopReason.LIMIT
    if arch == "arm64" and native.load() is not None:
        # the first wait started the work clock; with 4-byte instructions its count is exact
        bytes_run = guest.machine.clock.counts()["code_bytes"]
        assert 5000 - 8 <= bytes_run // 4 <= 5000 + 4


def test_probes_work_unprivileged(arch, cpu_prog, tmp_path):
    """The probe layer's own traps (BRK/int3, the slots' step traps, the kretprobe
    trampoline) work with the guest at CPL3 / EL0."""
    import json
    prog = str(cpu_prog(arch, "privileged"))
    case = ALLOWED[arch][0]
    stats = tmp_path / "stats.json"
    r = run_emu("run", "--stats", str(stats), "--kprobe", "main", "--kprobe", "fflush",
                "--kretprobe", "main", prog, "--", case)
    assert (r.rc, r.out) == (0, f"survived {case}\n"), r.err
    hits = {(p["symbol"], p["kind"]): p["hits"] for p in json.loads(stats.read_text())["probes"]}
    entry = {sym: h for (sym, kind), h in hits.items() if kind != "kretprobe"}   # kprobe/boosted
    assert hits[("main", "kretprobe")] == 1 and entry["main"] == 1 and entry["fflush"] >= 1
