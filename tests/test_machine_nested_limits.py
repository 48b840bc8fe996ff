"""--max-insns and --timeout across nested emu_start calls (a run started from a hook of
another on the same Uc: the BPF JIT's nested run on a first hit and for programs that need
the host). Unicorn keeps a run's count in the Uc, and a count-0 start drops the count hook
and flushes all translated code, so before emu/ucfast.emu_start_nested the outer limit was
gone after the first nested run (the guest ran to its end); a --timeout stop that met the
hook was lost (the CLI's backstop alarm) or failed the BPF program (exit 2). The limit
counts every instruction the CPU retires, JITed BPF code included, as the cycle model's
`instructions` does. The BPF programs: tests/data/machine_limits/leafstack.bpf.c on
firmware hotloop's hot_leaf."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from unicorn import UC_ARCH_ARM64, UC_ARCH_X86, UC_MODE_64, UC_MODE_ARM, Uc
from unicorn.arm64_const import UC_ARM64_REG_PC, UC_ARM64_REG_X0
from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RIP

from emu import ucfast

from conftest import ARCHES, firmware_elf, run_emu

SRC = Path(__file__).resolve().parent / "data" / "machine_limits" / "leafstack.bpf.c"
CLANG = shutil.which("clang")
TARGET = {"x86_64": ("-D__TARGET_ARCH_x86", "/usr/include/x86_64-linux-gnu"),
          "arm64": ("-D__TARGET_ARCH_arm64", "/usr/aarch64-linux-gnu/include")}
LIMIT = 20000           # ~1,400 hits of hot_leaf: the limit comes long before the 5,000 calls
CALLS = "5000"


@pytest.fixture(scope="session")
def leaf_obj(tmp_path_factory):
    out, built = tmp_path_factory.mktemp("nested-limits"), {}

    def build(arch: str) -> Path:
        if CLANG is None:
            pytest.skip("clang is not installed (apt install clang)")
        define, inc = TARGET[arch]
        if not Path(inc, "asm", "ptrace.h").exists():
            pytest.skip(f"no {arch} asm/ptrace.h under {inc} (libc6-dev / libc6-dev-arm64-cross)")
        if arch not in built:
            obj = out / f"leafstack-{arch}.o"
            subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", define, "-I", inc, "-c",
                            str(SRC), "-o", str(obj)], check=True, capture_output=True)
            built[arch] = obj
        return built[arch]
    return build


def _run(arch: str, tmp_path: Path, *opts: str, prog: str | None = None, obj: Path | None = None,
         engine: str = "jit", calls: str = CALLS):
    stats = tmp_path / f"{arch}-{prog}-{engine}.json"
    bpf = ["--bpf", f"{obj}:{prog}", "--bpf-engine", engine] if prog else []
    r = run_emu("run", *opts, "--stats", str(stats), *bpf,
                str(firmware_elf(arch, "hotloop")), "1000", calls)
    last = r.err.strip().splitlines()[-1] if r.err.strip() else ""
    limit = next((l for l in r.err.splitlines() if l.startswith("emu: ")), last)
    return r.rc, limit, json.loads(stats.read_text())


def _bpf(stats: dict) -> tuple[list[int], list[str]]:
    """Runs per program and the counting map's bytes (the ids depend on the process)."""
    progs = sorted(stats["bpf"]["programs"], key=lambda p: p["name"])
    (hits,) = stats["bpf"]["maps"]
    return [p["run_cnt"] for p in progs], hits["elements"][0]["value"]


@pytest.mark.parametrize("arch", ARCHES)
def test_max_insns_with_a_nested_run_per_hit(arch, leaf_obj, tmp_path) -> None:
    """bpf_get_stack needs the host: every hit is a nested run under the JIT. The limit
    stops the guest under both engines, and counts what the CPU retires, as the cycle
    model's `instructions` does: the python engine's BPF is host work, the JIT's is guest
    code, so fewer hits fit. A hit's nested run is never cut: the count may pass the
    limit by at most one program run."""
    obj = leaf_obj(arch)
    lim = ("--max-insns", str(LIMIT), "--cycles")
    assert _run(arch, tmp_path, *lim)[0] == 124
    py = _run(arch, tmp_path, *lim, prog="on_leaf_stack", obj=obj, engine="python")
    jit = _run(arch, tmp_path, *lim, prog="on_leaf_stack", obj=obj)
    assert py[0] == jit[0] == 124
    for _rc, message, stats in (py, jit):
        assert message.startswith(f"emu: instruction limit of {LIMIT} reached at pc ")
        assert stats["stop_reason"] == "limit"
    assert py[2]["instructions"] == LIMIT
    assert LIMIT <= jit[2]["instructions"] < LIMIT + 200
    (py_runs, py_hits), (jit_runs, jit_hits) = _bpf(py[2]), _bpf(jit[2])
    assert py_runs[0] == jit_runs[0] == 0
    assert 1 < jit_runs[1] < py_runs[1] < int(CALLS)
    assert int.from_bytes(bytes(int(b, 16) for b in jit_hits), "little") == jit_runs[1]
    again = _run(arch, tmp_path, *lim, prog="on_leaf_stack", obj=obj)
    assert again[:2] == jit[:2] and _bpf(again[2]) == _bpf(jit[2])    # deterministic
    assert again[2]["instructions"] == jit[2]["instructions"]


@pytest.mark.parametrize("arch", ARCHES)
def test_max_insns_after_a_first_hit_nested_run(arch, leaf_obj, tmp_path) -> None:
    """The counting program runs nested only on its first hit, then from the guest stub:
    the limit survives that first nested run, and stub and nested code count alike."""
    obj = leaf_obj(arch)
    lim = ("--max-insns", str(LIMIT))
    py = _run(arch, tmp_path, *lim, prog="on_leaf_count", obj=obj, engine="python")
    jit = _run(arch, tmp_path, *lim, prog="on_leaf_count", obj=obj)
    assert py[0] == jit[0] == 124
    assert jit[1].startswith(f"emu: instruction limit of {LIMIT} reached at pc ")
    ((jit_runs, _), _), ((py_runs, _), _) = _bpf(jit[2]), _bpf(py[2])
    assert 1 < jit_runs < py_runs < int(CALLS)
    assert _run(arch, tmp_path, *lim, prog="on_leaf_count", obj=obj)[:2] == jit[:2]


@pytest.mark.parametrize("arch", ARCHES)
def test_timeout_meets_nested_runs(arch, leaf_obj, tmp_path) -> None:
    """Nearly all the time goes to hooks and nested runs: the --timeout stop lands there
    and must end the run as a limit (124, the machine's own message at a pc), neither
    failing the BPF program nor left to the CLI's backstop alarm."""
    obj = leaf_obj(arch)
    rc, message, stats = _run(arch, tmp_path, "--timeout", "0.5", prog="on_leaf_stack",
                              obj=obj, calls="100000000")
    assert rc == 124, message
    assert message.startswith("emu: wall-clock limit of 0.5 s reached at pc "), message
    assert stats["stop_reason"] == "limit"
    runs, _ = _bpf(stats)
    assert runs[1] > 0


# --- emu_start_nested on a bare Uc ---------------------------------------------------------

BARE = {  # arch: (Uc args, loop `x += 1; b loop`, nop, pc reg, x reg)
    "x86_64": ((UC_ARCH_X86, UC_MODE_64), b"\x48\xff\xc0\xeb\xfb", b"\x90",
               UC_X86_REG_RIP, UC_X86_REG_RAX),
    "arm64": ((UC_ARCH_ARM64, UC_MODE_ARM), bytes.fromhex("00040091ffffff17"),
              bytes.fromhex("1f2003d5"), UC_ARM64_REG_PC, UC_ARM64_REG_X0),
}
CODE, NESTED = 0x10000, 0x20000


def _bare_run(arch: str, nested: bool, count: int) -> tuple[int, int, int]:
    """A counted loop whose hook, on its 10th pass, runs 50 nops nested (or not): (x, pc,
    hook passes that acted). A plain nested start would drop the count hook and flush the
    translated code from inside the callback (which crashes Unicorn 2.1.4)."""
    args, loop, nop, pc_reg, x_reg = BARE[arch]
    uc = Uc(*args)
    uc.mem_map(CODE, 0x1000)
    uc.mem_map(NESTED, 0x1000)
    uc.mem_write(CODE, loop)
    uc.mem_write(NESTED, nop * 50)
    done = []

    def hook(uc_, _addr, _size, _ud):
        if not done and uc_.reg_read(x_reg) == 10:
            pc = uc_.reg_read(pc_reg)
            if nested:
                ucfast.emu_start_nested(uc_, NESTED, NESTED + 50 * len(nop))
            done.append(uc_.reg_read(pc_reg))
            uc_.reg_write(pc_reg, pc)       # (both runs: a PC write re-runs the insn)
    uc.hook_add(1 << 2, hook, begin=CODE, end=CODE)        # UC_HOOK_CODE on the loop head
    uc.emu_start(CODE, CODE + 0x1000, timeout=5_000_000, count=count)
    return uc.reg_read(x_reg), uc.reg_read(pc_reg), len(done)


def test_count_fields_found() -> None:
    """The pinned Unicorn's uc_struct offsets are found (else the fix falls back)."""
    assert ucfast._count_fields() is not None


@pytest.mark.parametrize("arch", ARCHES)
def test_bare_nested_start_keeps_the_count(arch) -> None:
    args, loop, nop, _pc, _x = BARE[arch]
    ref = _bare_run(arch, nested=False, count=1001)
    got = _bare_run(arch, nested=True, count=1001)
    assert ref[2] == got[2] == 1
    assert ref[0] in (500, 501)
    assert got[1] == ref[1]
    assert got[0] == ref[0] - 25        # the 50 nested nops counted: 25 passes fewer
