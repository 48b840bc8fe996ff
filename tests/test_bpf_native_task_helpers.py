"""The C twins of the task-state helpers on the helper trampolines (issue 17,
probes/native/bpf_native.c): bpf_get_current_pid_tgid, get_current_uid_gid,
get_current_task and get_current_comm (into the BPF stack) called from a stub's image are
served in C from current's words, which Python writes and keeps at task and CPU switches.
Every hit logs what it saw with the probed call's thread id (work's first argument): each
thread's hits must name that thread's pid and CPU, and the log's records equal the compiled
Python engine's, with several threads on two CPUs and on one (task switches on the same
CPU), on both hit paths (KPROBE_EMU_NATIVE=0: all in Python)."""
from __future__ import annotations

import io
import struct
from collections import Counter

import pytest

from conftest import ARCHES, ROOT
from emu.loader import GuestConfig, load_guest
from probes.bench_kinds import parm_offset
from probes.bpf import BpfProgType, assemble, create_map
from probes.bpf.jit_direct import direct_calls_of
from probes.bpf.jit_guest import install_engine
from probes.bpf.libbpf import KprobePerfEvent
from probes.bpf.maps import BpfMapType
from probes.bpf.program import BpfProg
from probes.kprobes import Kprobe, kprobes_of
from probes.trace.bpf_trace import (EventKind, PerfEvent, PerfType, bpf_trace_of,
                                    perf_event_attach_bpf_prog, prog_stats)

SMP = ROOT / "tests" / "data" / "smp"
LOG = 2048                    # log entries (entry 0's first word: the count)
REC = struct.Struct("<QQQQQq16s")   # pid_tgid, uid_gid, task, cpu, thread id, comm rc, comm


def _asm(lines: list[str]) -> bytes:
    """Assemble with labels ("name:" lines, "+name" jump targets), lddw being two slots."""
    slots, at, n = [], {}, 0
    for ln in lines:
        ln = ln.strip()
        if ln.endswith(":"):
            at[ln[:-1]] = n
        elif ln:
            slots.append((n, ln))
            n += 2 if ln.startswith("lddw") else 1
    out = []
    for pos, ln in slots:
        if "+" in ln and ln.rsplit("+", 1)[1] in at:
            head, label = ln.rsplit("+", 1)
            ln = f"{head}+{at[label] - pos - 1}"
        out.append(ln)
    return assemble("\n".join(out))


def log_prog(arch: str) -> BpfProg:
    """log[++log[0].count] = {pid_tgid, uid_gid, task, cpu, PARM1, comm's r0, comm}: only
    helpers C serves (8, 14, 15, 16, 35) and inlined array lookups."""
    log = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, REC.size, LOG, name="log")
    lookup = ["mov r2, r10", "add r2, -4", "lddw r1, map_fd(3)", "call 1", "jeq r0, 0, +out"]
    text = ["mov r6, r1", "stw [r10-4], 0", *lookup,
            "mov r7, 1", "lock fetch add [r0+0], r7", "add r7, 1", "and r7, 2047",
            "stxw [r10-4], r7", *lookup, "mov r8, r0"]
    for off, fid in ((0, 14), (8, 15), (16, 35), (24, 8)):
        text += [f"call {fid}", f"stxdw [r8+{off}], r0"]
    text += [f"ldxdw r1, [r6+{parm_offset(arch)}]", "stxdw [r8+32], r1",
             "mov r1, r10", "add r1, -24", "mov r2, 16", "call 16", "stxdw [r8+40], r0",
             "ldxdw r1, [r10-24]", "stxdw [r8+48], r1", "ldxdw r1, [r10-16]",
             "stxdw [r8+56], r1", "out:", "mov r0, 0", "exit"]
    return BpfProg.from_bytes(_asm(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="task_log", license="GPL", maps={3: log})


class ThreadLab:
    """percpu.c with 3 threads (work() 300, 400, 500 times) on `cpus` CPUs, a kprobe on
    work running `prog` under `engine`."""

    def __init__(self, exe, engine: str, prog: BpfProg, cpus: int) -> None:
        self.out = io.BytesIO()
        self.m = load_guest(GuestConfig(path=str(exe), argv=["3"], cpus=cpus, seed=3),
                            stdout=self.out).machine
        self.p = Kprobe(symbol_name="work")
        kprobes_of(self.m).register_kprobe(self.p)
        call = KprobePerfEvent(self.m, "work", kp=self.p)
        self.p.pre_handler = call.kprobe_perf_func
        assert perf_event_attach_bpf_prog(
            PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE), prog) == 0
        install_engine(self.m, engine)

    def run(self) -> bytes:
        assert self.m.run().exit_code == 0
        return self.out.getvalue()

    def native(self):
        """The JIT's C helper entries (None on the Python hit path)."""
        jit = bpf_trace_of(self.m).runner._jit
        return jit._native if jit is not None else None


def _records(prog: BpfProg) -> list[tuple]:
    mp = prog.maps[3]
    count = int.from_bytes(bytes(mp.lookup(0))[:8], "little")
    return [REC.unpack(bytes(mp.lookup(i))) for i in range(1, count + 1)]


@pytest.fixture(scope="module")
def percpu(c_prog):
    return lambda arch: c_prog(arch, SMP / "percpu.c", extra=("-pthread",))


def _check(arch: str, exe, cpus: int, hit_path: str) -> None:
    jp, pp = log_prog(arch), log_prog(arch)
    jit, py = ThreadLab(exe, "jit", jp, cpus), ThreadLab(exe, "python", pp, cpus)
    assert jit.run() == py.run()
    got, want = _records(jp), _records(pp)
    assert len(got) == len(want) == prog_stats(jp).run_cnt == 1200
    # hits of different threads interleave where each engine's cycles put the switches:
    # the records themselves, not their order, must be the same
    assert Counter(got) == Counter(want)
    tgid = jit.m.syscall_handler.proc.creds.pid
    seen: dict[int, set] = {}
    for pid_tgid, uid_gid, task, cpu, thread, rc, comm in got:
        assert pid_tgid >> 32 == tgid and (uid_gid, task, rc) == (0, 0, 0)
        assert comm.rstrip(b"\0") == exe.name.encode()[:15]
        seen.setdefault(thread, set()).add((pid_tgid & 0xFFFFFFFF, cpu))
    # each thread saw itself, on one CPU; three threads, three pids
    assert sorted(seen) == [0, 1, 2] and all(len(s) == 1 for s in seen.values())
    assert len({next(iter(s))[0] for s in seen.values()}) == 3
    assert {next(iter(s))[1] for s in seen.values()} == set(range(cpus))
    dc = direct_calls_of(jit.m)
    assert dc is not None and {k[2] for k in dc.copies} == set(range(cpus))
    native = jit.native()
    if hit_path == "native":
        # C served the task helpers; Python only after a same-CPU task switch (or a
        # first call), where current's words were stale
        assert native is not None and native.jit.served > native.jit.deferred > 0
        assert native.jit.served + native.jit.deferred >= 5 * (1200 - cpus)
    else:
        assert not native


@pytest.mark.parametrize("arch", ARCHES)
def test_threads_on_two_cpus_see_themselves(percpu, arch, hit_path) -> None:
    _check(arch, percpu(arch), 2, hit_path)


@pytest.mark.parametrize("arch", ARCHES)
def test_task_switches_on_one_cpu(percpu, arch, hit_path) -> None:
    _check(arch, percpu(arch), 1, hit_path)


def comm_prog() -> BpfProg:
    """get_current_comm into stack buffers of 4 and 24 bytes filled with 0xff first (the
    kernel's strscpy_pad: size - 1 bytes at most, NUL-padded to size), both copied with the
    return codes into vals[0]."""
    vals = create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 48, 1, name="vals")
    text = ["stdw [r10-8], -1", "stdw [r10-16], -1", "stdw [r10-24], -1", "stdw [r10-32], -1",
            "mov r1, r10", "add r1, -32", "mov r2, 4", "call 16", "mov r6, r0",
            "mov r1, r10", "add r1, -24", "mov r2, 24", "call 16", "mov r7, r0",
            "stw [r10-36], 0", "mov r2, r10", "add r2, -36", "lddw r1, map_fd(3)", "call 1",
            "jeq r0, 0, +out"]
    for off in (0, 8, 16, 24):
        text += [f"ldxdw r1, [r10-{32 - off}]", f"stxdw [r0+{off}], r1"]
    text += ["stxdw [r0+32], r6", "stxdw [r0+40], r7", "out:", "mov r0, 0", "exit"]
    return BpfProg.from_bytes(_asm(text), prog_type=BpfProgType.BPF_PROG_TYPE_KPROBE,
                              name="comm", license="GPL", maps={3: vals})


@pytest.mark.parametrize("arch", ARCHES)
def test_comm_sizes_as_strscpy_pad(arch, hit_path) -> None:
    from test_bpf_jit_kprobe_stub import Lab
    got = {}
    for engine in ("jit", "python"):
        prog = comm_prog()
        lab = Lab(arch, prog, engine)
        for n in (2, 5):
            lab.run(n)
        got[engine] = bytes(prog.maps[3].lookup(0))
        if engine == "jit":
            assert lab.p.addr in lab.stubs
            native = bpf_trace_of(lab.m).runner._jit._native
            if hit_path == "native":
                assert native.jit.served == 11       # 2 calls on 6 hits, but the first
    assert got["jit"] == got["python"]
    assert got["jit"][:32] == b"hot\0" + b"\xff" * 4 + b"hotloop.elf".ljust(24, b"\0")
    assert got["jit"][32:] == bytes(16)


def test_task_words_follow_the_environment_whole() -> None:
    """set_task writes what the Python helpers return; a shorter comm leaves none of the
    old one's bytes behind (C copies up to 15 of them)."""
    import ctypes
    from types import SimpleNamespace

    from probes.native.bpf_native import BnJit, NativeHelpers
    helpers = SimpleNamespace(jit=BnJit())
    env = SimpleNamespace(pid=1001, tgid=1000, uid=7, gid=8, task=0x1234, comm=b"hotloop.elf")
    NativeHelpers.set_task(helpers, env)                   # type: ignore[arg-type]
    env.pid, env.comm = 1002, b"ab"
    NativeHelpers.set_task(helpers, env)                   # type: ignore[arg-type]
    j = helpers.jit
    assert (j.pid_tgid, j.uid_gid, j.task, j.task_valid) == ((1000 << 32) | 1002, (8 << 32) | 7,
                                                             0x1234, 1)
    assert ctypes.string_at(ctypes.addressof(j) + BnJit.comm.offset, 16) == b"ab" + bytes(14)
