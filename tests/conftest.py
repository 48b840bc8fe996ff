"""Shared fixtures: paths, the firmware catalogue, and running the CLI in-process."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
ARCHES = ("arm64", "x86_64")


def firmware_elf(arch: str, name: str) -> Path:
    return FIRMWARE / "bin" / arch / f"{name}.elf"


@dataclass
class CliResult:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


def run_emu(*argv: str, stdin: bytes = b"", timeout: float = 120, subprocess: bool = False,
            cwd: Path = ROOT) -> CliResult:
    """Run the `emu` CLI in `cwd` (default: the checkout): in this process by default
    (`emu.cli.main` with its own streams), or with `subprocess=True` as a real process (real
    stdio, exit status, signals; `timeout` bounds only that one: in-process runs are bounded
    by their own --timeout/--max-insns)."""
    if subprocess:
        return run_emu_subprocess(*argv, stdin=stdin, timeout=timeout, cwd=cwd)
    return run_emu_inprocess(*argv, stdin=stdin, cwd=cwd)


def run_emu_inprocess(*argv: str, stdin: bytes = b"", cwd: Path = ROOT) -> CliResult:
    """`emu ARGV` in this process: text streams over bytes, so the guest's output (written to
    `.buffer`) and ours interleave as on a terminal. Relative paths resolve against `cwd`,
    as for the subprocess."""
    from emu.cli import main
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="replace",
                                 write_through=True) for _ in range(2))
    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = main(list(argv), stdin=io.TextIOWrapper(io.BytesIO(stdin)), stdout=out, stderr=err)
    finally:
        os.chdir(old)
    out.flush()
    err.flush()
    return CliResult(rc, out.buffer.getvalue(), err.buffer.getvalue())


def run_emu_subprocess(*argv: str, stdin: bytes = b"", timeout: float = 120,
                       cwd: Path = ROOT) -> CliResult:
    """Run the `emu` CLI in a subprocess (real stdio, real exit code), this checkout's
    modules first on its path whatever `cwd` is."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "emu.cli", *argv], input=stdin,
                          capture_output=True, timeout=timeout, cwd=cwd, env=env)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(params=ARCHES)
def arch(request) -> str:
    return request.param


# The slow tier (`-m slow`; `make test-fast` leaves it out). Whole tests carry
# @pytest.mark.slow; these are single cases of otherwise quick parametrized tests, chosen
# by `pytest --durations=60` on a full run.
SLOW_CASES = {
    "tests/test_kprobes_firmware.py::test_program_hit_counts[arm64-hotloop-bare]",
    "tests/test_kprobes_firmware.py::test_program_hit_counts[x86_64-hotloop-bare]",
    "tests/test_firmware_run.py::test_linux_case[arm64-libc-malloc_sort]",
    "tests/test_firmware_run.py::test_linux_case[x86_64-libc-malloc_sort]",
    "tests/test_kprobes_firmware.py::test_libc_program_entry_probe[arm64-libc-malloc_sort]",
    "tests/test_kprobes_firmware.py::test_libc_program_entry_probe[x86_64-libc-malloc_sort]",
    # Chosen from a --durations=0 run in session 5 (each > 2 s under load); a cheaper
    # case of the same test stays in the fast tier where one exists.
    "tests/test_bpf_jit_conformance.py::test_jit_matches_interpreter[ubpf/tests/errors/err-too-many-instructions.data-x86_64]",
    "tests/test_bpf_jit_fuzz.py::test_valid_random_programs[0-arm64]",
    "tests/test_bpf_conformance.py::test_conformance[ubpf/tests/errors/err-too-many-instructions.data-jit]",
    "tests/test_bpf_jit_conformance.py::test_jit_matches_interpreter[ubpf/tests/errors/err-too-many-instructions.data-arm64]",
    "tests/test_bpf_jit_fuzz.py::test_valid_random_programs[1-x86_64]",
    "tests/test_bpf_jit_fuzz.py::test_valid_random_programs[2-arm64]",
    "tests/test_bpf_jit_fuzz.py::test_valid_random_programs[2-x86_64]",
    "tests/test_bpf_jit_fuzz.py::test_valid_random_programs[3-arm64]",
    "tests/test_bpf_jit_fuzz.py::test_valid_random_programs[3-x86_64]",
    "tests/test_cli_timeout.py::test_timeout_of_a_spinning_guest[arm64]",
    "tests/test_cli_timeout.py::test_timeout_of_a_spinning_guest[x86_64]",
    "tests/test_native_kprobes.py::test_native_path_gives_the_python_results[arm64-recurse--counters]",
    "tests/test_native_kprobes.py::test_native_path_gives_the_python_results[arm64-recurse--pre-handlers]",
    "tests/test_native_kprobes.py::test_native_path_gives_the_python_results[x86_64-recurse--counters]",
    "tests/test_native_kprobes.py::test_native_path_gives_the_python_results[x86_64-recurse--pre-handlers]",
    "tests/test_sandbox_ulimit.py::test_many_machines_in_one_process_fit_in_4_gib",
    "tests/test_sandbox_ulimit.py::test_representative_tests_pass_under_the_limit",
    "tests/test_signals_delivery.py::test_handlers_masks_altstack_threads_timers[arm64]",
    "tests/test_sweep_cli.py::test_jobs_give_the_single_process_report[arm64]",
    "tests/test_sweep_cli.py::test_jobs_give_the_single_process_report[x86_64]",
    "tests/test_sweep_cli.py::test_progress_on_stderr[auto]",
    "tests/test_sweep_cli.py::test_progress_on_stderr[bar]",
    "tests/test_sweep_cli.py::test_resume_after_the_process_is_killed",
    "tests/test_sweep_cli.py::test_resume_finishes_an_interrupted_sweep[arm64]",
    "tests/test_sweep_cli.py::test_resume_refuses_another_sweeps_file",
    "tests/test_sweep_snapshots.py::test_bare_metal_ram_loads_afresh[arm64]",
    "tests/test_sweep_snapshots.py::test_bare_metal_ram_loads_afresh[x86_64]",
    "tests/test_sweep_snapshots.py::test_fs_write_and_max_insns_run_from_start",
    "tests/test_sweep_snapshots.py::test_same_verdicts_as_runs_from_start[arm64-kprobe]",
    "tests/test_sweep_snapshots.py::test_same_verdicts_as_runs_from_start[arm64-optprobe]",
    "tests/test_sweep_snapshots.py::test_same_verdicts_as_runs_from_start[x86_64-kprobe]",
    "tests/test_sweep_snapshots.py::test_same_verdicts_as_runs_from_start[x86_64-optprobe]",
    "tests/test_sweep_snapshots.py::test_same_verdicts_on_firmware[arm64-demo-funcs1]",
    "tests/test_sweep_snapshots.py::test_same_verdicts_on_firmware[arm64-insns-funcs0]",
    "tests/test_sweep_snapshots.py::test_same_verdicts_on_firmware[x86_64-demo-funcs1]",
    "tests/test_sweep_snapshots.py::test_same_verdicts_on_firmware[x86_64-insns-funcs0]",
    "tests/test_threads_pthreads.py::test_mutex_condvar_atomics_match_reference[8-arm64]",
    # Session 6 (the fast tier had reached 2 min): the other arch's case stays fast.
    "tests/test_bpf_jit_fuzz.py::test_tail_calls_in_random_programs[arm64]",
    "tests/test_bpf_jit_fuzz.py::test_hostile_random_programs[1-arm64]",
    "tests/test_bpf_jit_fuzz.py::test_hostile_random_programs[1-x86_64]",
    "tests/test_signals_delivery.py::test_signal_runs_are_deterministic[arm64]",
    "tests/test_bench_matrix.py::test_bench_on_two_jobs_gives_the_serial_cycles[arm64]",
    "tests/test_smp_snapshot_threads.py::test_restore_rearming_preemption_keeps_the_turn[x86_64]",
    # Session 7: the python hit path's and the other arch's cases of the new JIT tests.
    "tests/test_smp_cpus.py::test_same_seed_same_bytes_other_seed_other_interleaving[x86_64]",
    "tests/test_cli_output.py::test_closed_stdout_is_ebadf[x86_64]",
    "tests/test_smp_signals.py::test_sa_restart_runs_an_untimed_futex_wait_again[x86_64]",
    "tests/test_structure_cli_paths.py::test_run_output_and_stats_are_the_same_wherever_the_program_lives[x86_64]",
    "tests/test_bpf_jit_fuzz.py::test_hostile_random_programs[0-x86_64]",
    "tests/test_linux_hostile.py::test_mmap_of_sparse_file_copies_only_its_data[x86_64]",
    "tests/test_cli_output.py::test_trace_out_full_device_real_process[x86_64]",
    "tests/test_smp_signals.py::test_sa_restart_runs_an_interrupted_pipe_read_again[2-x86_64]",
    "tests/test_native_kprobes.py::test_native_path_gives_the_python_results[x86_64-insns-t_-counters]",
    "tests/test_smp_signals.py::test_sa_restart_runs_an_interrupted_pipe_read_again[1-x86_64]",
    "tests/test_threads_pthreads.py::test_spinning_threads_need_preemption[x86_64]",
    "tests/test_cli.py::test_exit_code_and_stdout_are_the_guests[x86_64]",
    "tests/test_trace_glibc.py::test_kprobe_and_kretprobe_lines_exactly[x86_64]",
    "tests/test_native_kprobes.py::test_native_path_gives_the_python_results[x86_64-insns-t_-pre-handlers]",
    "tests/test_cli_output.py::test_closed_stderr_is_not_a_crash[x86_64]",
    "tests/test_cli.py::test_bad_input_run[x86_64-dynamic]",
    "tests/test_tracepoint_events.py::test_a_jump_table_naming_data_is_refused[x86_64]",
    "tests/test_bpf_jit_hash_lookup.py::test_two_cpus_count_into_one_mapped_hash[python-x86_64-percpu]",
    "tests/test_bpf_jit_hash_lookup.py::test_two_cpus_count_into_one_mapped_hash[python-arm64-percpu]",
    "tests/test_bpf_jit_hash_lookup.py::test_two_cpus_count_into_one_mapped_hash[python-x86_64-hash]",
    "tests/test_bpf_jit_hash_lookup.py::test_two_cpus_count_into_one_mapped_hash[python-arm64-hash]",
    "tests/test_bpf_jit_hash_lookup.py::test_counting_lookups_run_in_the_guest_as_the_other_engines[python-arm64-kprobe]",
    "tests/test_bpf_jit_hash_lookup.py::test_counting_lookups_run_in_the_guest_as_the_other_engines[python-x86_64-kprobe]",
    "tests/test_bpf_jit_hash_lookup.py::test_counting_lookups_run_in_the_guest_as_the_other_engines[python-arm64-optprobe]",
    "tests/test_bpf_jit_hash_lookup.py::test_counting_lookups_run_in_the_guest_as_the_other_engines[python-x86_64-optprobe]",
    "tests/test_bpf_native_hash_cpus.py::test_percpu_hash_updates_on_the_running_cpu[kprobe-lru_percpu_hash-x86_64]",
    "tests/test_bpf_native_hash_cpus.py::test_percpu_hash_updates_on_the_running_cpu[optprobe-lru_percpu_hash-arm64]",
    "tests/test_bpf_jit_stub_cpus.py::test_modelled_cycles_repeat_run_to_run[x86_64]",
    # Session 8: the slowest fast-tier cases whose other variants stay fast.
    "tests/test_bpf_jit_fuzz.py::test_valid_random_programs[1-arm64]",
    "tests/test_signals_delivery.py::test_musl_signals_match_native[signals-raise: sig=10 code=SI_TKILL fp_kept=1\\nblocked: got=0 pending=1\\nunblocked: got=10 code=SI_USER\\naltstack: sig=12 on_alt=1\\npthread_kill: got=10 in_main_thread=0\\nalarm+pause: ticks=1\\nsetitimer: ticks>=6=1\\ntimer_create: got=10 code=SI_TIMER\\n]",
    "tests/test_bpf_conformance.py::test_conformance[ubpf/tests/errors/err-too-many-instructions.data-interp]",
    "tests/test_bpf_clang.py::test_maps[interp-v1]",
}


# Files whose tests' python-hit-path runs are in the slow tier only (the fast tier keeps
# their C hit path; `make test` runs both): session 8's direct-path suites.
SLOW_PYTHON_HIT_PATH = {
    "tests/test_bpf_jit_direct_helpers.py", "tests/test_bpf_jit_percpu.py",
    "tests/test_bpf_get_stack_engines.py", "tests/test_bpf_native_task_helpers.py",
    "tests/test_bpf_jit_direct_loops.py", "tests/test_bpf_jit_kprobe_stub.py",
    "tests/test_bpf_jit_hash_lookup.py", "tests/test_bpf_jit_stub_cpus.py",
}


def _slow(item) -> bool:
    if item.nodeid in SLOW_CASES:
        return True
    file = item.nodeid.split("::")[0]
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("hit_path") == "python" and file in SLOW_PYTHON_HIT_PATH


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if _slow(item):
            item.add_marker(pytest.mark.slow)
    # On a whole-suite collection a renamed test would silently move back into the fast
    # tier: name the stale entries instead.
    files = {item.nodeid.split("::")[0] for item in items}
    if files >= {f"tests/{p.name}" for p in Path(__file__).parent.glob("test_*.py")}:
        stale = SLOW_CASES - {item.nodeid for item in items}
        if stale:
            raise pytest.UsageError(f"SLOW_CASES names tests that do not exist: {sorted(stale)}")


@pytest.fixture
def emu_cli():
    return run_emu


# --- tiny hand-made guests (machine-foundation tests) -----------------------------------------
import struct as _struct

_EM = {"arm64": 183, "x86_64": 62}
_KS_CACHE: dict = {}


def assemble(arch: str, source: str, addr: int) -> bytes:
    """Keystone, one Ks per arch reused (unicorn-notes: reuse + retry avoids a keystone quirk)."""
    import keystone
    from emu.arch import get_arch

    a = get_arch(arch)
    ks = _KS_CACHE.get(arch) or _KS_CACHE.setdefault(arch, keystone.Ks(a.ks_arch, a.ks_mode))
    for attempt in range(3):
        try:
            enc, _ = ks.asm(source, addr)
            return bytes(enc or b"")
        except keystone.KsError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def tiny_elf(arch: str, functions: list[tuple[str, str]], *, base: int = 0x400000,
             data: bytes = b"", data_prot: int = 6, etype: int = 2, bss: int = 0) -> bytes:
    """A static ELF64 built from assembly, one named function after another (the first is the
    entry). Text is one R-X PT_LOAD at `base` (headers included), `data` one PT_LOAD at
    base+0x100000 with `data_prot` (PF_X=1, PF_W=2, PF_R=4) and `bss` extra zero bytes. A
    .symtab names every function (size = its code) plus `data_start` for the data segment.
    Functions see `{data}` (the data address) and `{sym:NAME}` (a function's address,
    resolved in a second pass) in their source."""
    text_vaddr = base + 0x1000
    data_vaddr = base + 0x100000
    addrs = {name: 0 for name, _ in functions}
    for _pass in range(2):
        code, syms, addr = b"", [], text_vaddr
        for name, src in functions:
            src = src.replace("{data}", hex(data_vaddr))
            for other, a in addrs.items():
                src = src.replace("{sym:%s}" % other, hex(a or text_vaddr))
            blob = assemble(arch, src, addr)
            syms.append((name, addr, len(blob)))
            addrs[name] = addr
            code += blob
            addr += len(blob)
    segs = [(1, 0, base, 0x1000 + len(code), 0x1000 + len(code), 5)]     # PT_LOAD R-X
    data_off = 0x1000 + ((len(code) + 0xFFF) & ~0xFFF)
    if data or bss:
        segs.append((1, data_off, data_vaddr, len(data), len(data) + bss, data_prot))
    shstr = b"\0.text\0.data\0.symtab\0.strtab\0.shstrtab\0"
    strtab, symtab = b"\0", bytes(24)
    all_syms = [(n, a, s, 2, 1) for n, a, s in syms] + ([("data_start", data_vaddr, len(data) + bss,
                                                         1, 2)] if data or bss else [])
    for name, a, size, kind, shndx in all_syms:
        symtab += _struct.pack("<IBBHQQ", len(strtab), (1 << 4) | kind, 0, shndx, a, size)
        strtab += name.encode() + b"\0"
    body = bytearray(data_off)
    body[0x1000:0x1000 + len(code)] = code
    body += data
    sym_off = len(body)
    body += symtab
    str_off = len(body)
    body += strtab
    shstr_off = len(body)
    body += shstr
    while len(body) % 8:
        body.append(0)
    sh_off = len(body)
    sections = [bytes(64),
                _struct.pack("<IIQQQQIIQQ", 1, 1, 6, text_vaddr, 0x1000, len(code), 0, 0, 16, 0),
                _struct.pack("<IIQQQQIIQQ", 7, 1, 3, data_vaddr, data_off, len(data), 0, 0, 16, 0),
                _struct.pack("<IIQQQQIIQQ", 13, 2, 0, 0, sym_off, len(symtab), 4, 1, 8, 24),
                _struct.pack("<IIQQQQIIQQ", 21, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0),
                _struct.pack("<IIQQQQIIQQ", 29, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)]
    for s in sections:
        body += s
    phoff = 64
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += _struct.pack("<HHIQQQIHHHHHH", etype, _EM[arch], 1, text_vaddr, phoff, sh_off, 0,
                         64, 56, len(segs), 64, len(sections), 5)
    phdrs = b"".join(_struct.pack("<IIQQQQQQ", t, flags, off, va, va, fs, ms, 0x1000)
                     for t, off, va, fs, ms, flags in segs)
    body[0:64 + len(phdrs)] = ehdr + phdrs
    return bytes(body)


# Linux exit_group(code) / write(1, buf, len) snippets for tiny guests.
LINUX_EXIT = {"arm64": "mov x0, #{code}; mov x8, #94; svc #0",
              "x86_64": "mov edi, {code}; mov eax, 231; syscall"}


@pytest.fixture
def make_tiny(tmp_path):
    """make_tiny(arch, functions, name=..., **kw) -> Path of a tiny_elf written to tmp_path."""
    def make(arch: str, functions, name: str = "tiny", **kw) -> Path:
        path = tmp_path / f"{name}-{arch}.elf"
        path.write_bytes(tiny_elf(arch, functions, **kw))
        path.chmod(0o755)
        return path
    return make


# --- glibc programs and reference runs (machine-foundation tests) -----------------------------
import platform as _platform
import shutil as _shutil

MACHINE_DATA = ROOT / "tests" / "data" / "machine"
CROSS_CC = {"x86_64": "gcc", "arm64": "aarch64-linux-gnu-gcc"}
_HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
    _platform.machine().lower())
_QEMU = {"x86_64": "qemu-x86_64", "arm64": "qemu-aarch64"}


def reference_prefix(arch: str) -> list[str]:
    """How to run a guest for reference: natively on its own host arch, else under qemu-user
    (qemu-aarch64 is the documented arm64 reference). Skips the test if neither is possible."""
    if arch == _HOST_ARCH:
        return []
    qemu = _shutil.which(_QEMU[arch])
    if qemu is None:
        pytest.skip(f"{_QEMU[arch]} not installed: no {arch} reference")
    return [qemu]


def run_reference(arch: str, argv: list[str], stdin: bytes = b"", timeout: float = 60) -> CliResult:
    proc = subprocess.run([*reference_prefix(arch), *argv], input=stdin, capture_output=True,
                          timeout=timeout)
    rc = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode   # killed: shell style
    return CliResult(rc, proc.stdout, proc.stderr)


def _compile_c(cc_name: str, source: Path, out: Path, flags: list[str]) -> Path:
    """Compile one C file; skip if the compiler or its static libc is missing."""
    cc = _shutil.which(cc_name)
    if cc is None:
        pytest.skip(f"{cc_name} not installed")
    proc = subprocess.run([cc, "-O2", *flags, "-o", str(out), str(source)], capture_output=True, text=True)
    if proc.returncode:
        if "cannot find -l" in proc.stderr or "crt1.o" in proc.stderr:
            pytest.skip(f"no static C library for {cc_name}: {proc.stderr.strip()[:200]}")
        raise AssertionError(f"{cc} failed:\n{proc.stderr}")
    return out


LINK_FLAGS = {"static": ["-static"], "static-pie": ["-static-pie"], "dynamic": [], "object": ["-c"]}


@pytest.fixture(scope="session")
def c_prog(tmp_path_factory):
    """c_prog(arch, source, link="static"|"static-pie"|"dynamic"|"object", extra=(), cc=None)
    -> Path of the C file `source` compiled for arch with `extra` flags after -O2 (cached for
    the session; skips if the compiler, CROSS_CC[arch] unless `cc` names another, or its libc
    is missing)."""
    cache = tmp_path_factory.mktemp("c-progs")
    built: dict[tuple, Path] = {}

    def build(arch: str, source: Path, link: str = "static", extra: tuple[str, ...] = (),
              cc: str | None = None) -> Path:
        key = (arch, Path(source), link, tuple(extra), cc)
        if key not in built:
            suffix = ".o" if link == "object" else ""
            where = cache / str(len(built))            # the file keeps its own name: a
            where.mkdir()                              # module's name is its file's stem
            out = where / f"{Path(source).stem}.{arch}{suffix}"
            built[key] = _compile_c(cc or CROSS_CC[arch], Path(source), out,
                                    [*LINK_FLAGS[link], *extra])
        return built[key]

    return build


@pytest.fixture(scope="session")
def glibc_prog(c_prog):
    """glibc_prog(arch, name, link) -> tests/data/machine/<name>.c compiled (see c_prog)."""
    def build(arch: str, name: str, link: str = "static") -> Path:
        return c_prog(arch, MACHINE_DATA / f"{name}.c", link)

    return build


# --- the probes' two hit paths (probes/native, issue 14) ----------------------------------------
def _native_off() -> bool:
    from probes.native import load
    return os.environ.get("KPROBE_EMU_NATIVE") == "0" or load() is None


needs_native = pytest.mark.skipif(
    _native_off(), reason="the C hit path is off (KPROBE_EMU_NATIVE=0) or no C compiler to build it")


@pytest.fixture(params=["native", "python"])
def hit_path(request, monkeypatch) -> str:
    """Runs a test once on each hit path."""
    if request.param == "native" and _native_off():
        pytest.skip("the C hit path is off or cannot be built")
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if request.param == "native" else "0")
    return request.param
