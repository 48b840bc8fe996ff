"""The optprobe thunk's pt_regs frame and register restore (issue 17, jit_direct.py).

The thunk writes only the frame slots its programs can read (the verifier's record of
context loads) and saves only the registers the thunk and the images can change. These
tests hold it to the kernel's contract from both sides: every slot a program reads has
the value the host path's pt_regs gives (the frame read whole, and in part), and every
general register of the probed code comes back, whatever the programs touch."""
from __future__ import annotations

import keystone
import pytest

from conftest import ARCHES
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.jit_guest import install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.bpf.prog_types import KPROBE_CTX_SIZE
from probes.kprobes import Kprobe
from probes.optprobes import enable_optprobes
from probes.testing import ProbeLab
from probes.trace.bpf_trace import EventKind, PerfEvent, PerfType, perf_event_attach_bpf_prog

# Every general register gets a value of its own (from the argument), the probe sits on the
# first instruction that folds them into the result, so a register the thunk fails to put
# back changes what the function returns.
_X86_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rbp", "r8", "r9", "r10", "r11", "r12",
             "r13", "r14", "r15")
_X86_SAVED = ("rbx", "rbp", "r12", "r13", "r14", "r15")
_A64_REGS = tuple(f"x{i}" for i in range(1, 31))
PRELUDE = {
    "x86_64": "".join(f"push {r}\n" for r in _X86_SAVED)
    + "".join(f"lea {r}, [rdi + {i + 1}]\n" for i, r in enumerate(_X86_REGS)),
    "arm64": "stp x29, x30, [sp, #-16]!\n"
    + "".join(f"stp x{i}, x{i + 1}, [sp, #-16]!\n" for i in range(19, 29, 2))
    + "".join(f"add {r}, x0, #{i + 1}\n" for i, r in enumerate(_A64_REGS)),
}
FOLD = {
    "x86_64": "".join(f"imul rdi, rdi, 31\nadd rdi, {r}\n" for r in _X86_REGS)
    + "mov rax, rdi\n" + "".join(f"pop {r}\n" for r in reversed(_X86_SAVED)) + "ret",
    "arm64": "".join(f"eor x0, {r}, x0, lsl #1\n" for r in _A64_REGS)
    + "".join(f"ldp x{i}, x{i + 1}, [sp], #16\n" for i in range(27, 18, -2))
    + "ldp x29, x30, [sp], #16\nret",
}


def _probe_offset(arch: str) -> int:
    lab_arch = {"x86_64": (keystone.KS_ARCH_X86, keystone.KS_MODE_64),
                "arm64": (keystone.KS_ARCH_ARM64, keystone.KS_MODE_LITTLE_ENDIAN)}[arch]
    enc, _ = keystone.Ks(*lab_arch).asm(PRELUDE[arch], 0)
    return len(enc)


def frame_prog(arch: str, offsets: list[int]) -> BpfProg:
    """frame[i] = *(u64 *)(ctx + offsets[i]) into one array value (the lookup inlined)."""
    out = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 8 * len(offsets), 1, name="frame")
    text = ["mov r6, r1", "stw [r10-4], 0", "mov r2, r10", "add r2, -4", "lddw r1, map_fd(3)",
            "call 1", "jeq r0, 0, +{skip}"]
    body = [f"ldxdw r3, [r6+{off}]\nstxdw [r0+{8 * i}], r3" for i, off in enumerate(offsets)]
    text[-1] = text[-1].format(skip=2 * len(offsets))
    src = "\n".join(text + body + ["mov r0, 0", "exit"])
    return BpfProg.from_bytes(assemble(src), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="frame", license="GPL", maps={3: out},
                              ctx_size=KPROBE_CTX_SIZE[arch])


def _lab(arch: str, prog: BpfProg, engine: str) -> tuple[ProbeLab, Kprobe]:
    lab = ProbeLab.from_asm(arch, {"regsfn": PRELUDE[arch] + FOLD[arch]})
    opt = enable_optprobes(lab.kprobes)
    p = Kprobe(symbol_name="regsfn", offset=_probe_offset(arch))
    lab.kprobes.register_kprobe(p)
    opt.kick_kprobe_optimizer()
    assert p.ainsn.optimized, p.ainsn.opt_reason
    call = KprobePerfEvent(lab.machine, "regsfn", offset=_probe_offset(arch), kp=p)
    p.pre_handler = call.kprobe_perf_func
    assert perf_event_attach_bpf_prog(PerfEvent(call, PerfType.PERF_TYPE_KPROBE,
                                                EventKind.KPROBE), prog) == 0
    install_engine(lab.machine, engine)
    return lab, p


def _frames(arch: str, offsets: list[int], engine: str) -> tuple[list[int], list[int]]:
    """(the function's results, the last hit's frame words) over a few calls."""
    prog = frame_prog(arch, offsets)
    lab, p = _lab(arch, prog, engine)
    got = [lab.call("regsfn", x) for x in (3, 1000, 0x123456789)]
    if engine == "jit":
        assert p.addr in direct_calls_of(lab.machine).thunks
    raw = prog.maps[3].lookup(0)
    return got, [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]


def _plain(arch: str) -> list[int]:
    lab = ProbeLab.from_asm(arch, {"regsfn": PRELUDE[arch] + FOLD[arch]})
    return [lab.call("regsfn", x) for x in (3, 1000, 0x123456789)]


@pytest.mark.parametrize("arch", ARCHES)
def test_the_whole_frame_matches_the_host_path(arch) -> None:
    offsets = list(range(0, KPROBE_CTX_SIZE[arch], 8))
    jit_got, jit_frame = _frames(arch, offsets, "jit")
    py_got, py_frame = _frames(arch, offsets, "python")
    assert jit_got == py_got == _plain(arch)
    assert jit_frame == py_frame
    assert any(jit_frame)


# a few scattered slots: an argument, the stack pointer and the ip, flags / pstate
SOME = {"x86_64": [112, 152, 128, 144, 0], "arm64": [0, 248, 256, 264, 8 * 29]}


@pytest.mark.parametrize("arch", ARCHES)
def test_the_slots_a_program_reads_match_the_host_path(arch) -> None:
    jit_got, jit_frame = _frames(arch, SOME[arch], "jit")
    py_got, py_frame = _frames(arch, SOME[arch], "python")
    assert jit_got == py_got == _plain(arch)
    assert jit_frame == py_frame


@pytest.mark.parametrize("arch", ARCHES)
def test_every_register_comes_back_with_helpers_in_the_program(arch) -> None:
    """A program that uses every BPF register and calls trampoline helpers (which write
    the return register from the host) between the probed code's instructions."""
    counts = create_map(BpfMapType.BPF_MAP_TYPE_HASH, 4, 8, 8, name="counts")
    text = """
        mov r6, 6
        mov r7, 7
        mov r8, 8
        mov r9, 9
        call 5
        add r6, r0
        call 7
        add r7, r0
        call 8
        stxw [r10-4], r8
        stxdw [r10-16], r6
        mov r2, r10
        add r2, -4
        mov r3, r10
        add r3, -16
        mov r4, 0
        lddw r1, map_fd(3)
        call 2
        mov r5, r9
        mul r5, r7
        mov r0, 0
        exit
    """
    prog = BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="regs", license="GPL", maps={3: counts})
    lab, p = _lab(arch, prog, "jit")
    got = [lab.call("regsfn", x) for x in (3, 1000, 0x123456789)]
    assert p.addr in direct_calls_of(lab.machine).thunks
    assert got == _plain(arch)
    assert counts.lookup(8) is not None


# --- what the verifier records (BpfProg.ctx_reads), which sizes the thunk's frame ---

def _ctx_reads(text: str) -> set[int] | None:
    prog = BpfProg.from_bytes(assemble(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="reads", license="GPL", ctx_size=KPROBE_CTX_SIZE["x86_64"])
    prog.ensure_loaded()
    return prog.ctx_reads


def test_constant_context_loads_are_recorded_by_slot() -> None:
    assert _ctx_reads("ldxdw r2, [r1+112]\nldxw r3, [r1+4]\nmov r0, 0\nexit") == {112, 0}
    assert _ctx_reads("mov r6, r1\nadd r6, 16\nldxdw r2, [r6+8]\nmov r0, 0\nexit") == {24}
    assert _ctx_reads("mov r0, 0\nexit") == set()


def test_a_context_pointer_given_to_a_helper_means_any_slot() -> None:
    text = "mov r3, r1\nmov r1, r10\nadd r1, -8\nmov r2, 8\ncall 113\nmov r0, 0\nexit"
    assert _ctx_reads(text) is None


def test_a_load_through_a_pointer_of_unknown_kind_means_any_slot() -> None:
    text = """
        stdw [r10-8], 0
        ldxdw r2, [r1+0]
        mov r3, r10
        add r3, -8
        jeq r2, 0, +1
        mov r3, r1
        ldxdw r4, [r3+0]
        mov r0, 0
        exit
    """
    assert _ctx_reads(text) is None
