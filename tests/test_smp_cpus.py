"""Several vCPUs (`--cpus N`, issue 19): static pthread programs give the native / qemu-user
output on 2 and 4 CPUs; threads are placed on CPUs round robin and sched_getcpu,
sched_getaffinity, traces, kprobe handlers, the kprobe control block, per-CPU BPF maps and
bpf_get_smp_processor_id all see the real CPU; one seed gives byte-identical runs, and the
seed changes the interleaving."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import ARCHES, ROOT, run_emu, run_reference
from emu.loader import GuestConfig, load_guest
from probes.kprobes import Kprobe, kprobes_of

SMP = ROOT / "tests" / "data" / "smp"
THREADS = ROOT / "tests" / "data" / "threads"
CALLS = [300 + 100 * i for i in range(8)]       # percpu.c: thread i calls work() so often


@pytest.fixture(scope="module")
def prog(c_prog):
    """prog(arch, path, cc=None) -> a static -pthread build of the C file at `path`."""
    return lambda arch, path, cc=None: c_prog(arch, path, extra=("-pthread",), cc=cc)


def _expected_cpus(nthreads: int, cpus: int) -> list[int]:
    """Round robin: main is on CPU 0, the k-th thread created (k from 1) on CPU k % cpus."""
    return [(i + 1) % cpus for i in range(nthreads)]


# --- programs give their reference output ------------------------------------------------
@pytest.mark.parametrize("arch", ARCHES)
def test_pthreads_on_two_cpus_match_reference(prog, arch):
    exe = prog(arch, THREADS / "pthreads.c")
    ref = run_reference(arch, [str(exe), "4"])
    r = run_emu("run", "--cpus", "2", "--timeout", "120", str(exe), "--", "4")
    assert (r.rc, r.out, r.err) == (ref.rc, ref.out, "")
    assert "threads=4 counter=8000 atomic=8000" in r.out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("cpus", ["2", "4"])
@pytest.mark.parametrize("name,args", [("pthreads", "2"), ("pthreads", "8"), ("spin", "3"),
                                       ("timedwait", None)])
def test_thread_programs_match_reference(prog, arch, cpus, name, args):
    exe = prog(arch, THREADS / f"{name}.c")
    argv = [str(exe)] + ([args] if args else [])
    ref = run_reference(arch, argv)
    if name == "timedwait":              # host time under load can fool the reference once
        first = run_emu("run", *argv[:1])
        if (ref.rc, ref.out) != (first.rc, first.out):
            ref = run_reference(arch, argv)
    r = run_emu("run", "--cpus", cpus, "--seed", "3", "--timeout", "120", *argv[:1], "--",
                *argv[1:])
    assert (r.rc, r.out, r.err) == (ref.rc, ref.out, "")


@pytest.mark.slow
def test_musl_threads_on_four_cpus_match_native(prog):
    exe = prog("x86_64", THREADS / "pthreads.c", cc="musl-gcc")
    ref = run_reference("x86_64", [str(exe), "8"])
    r = run_emu("run", "--cpus", "4", str(exe), "--", "8")
    assert (r.rc, r.out, r.err) == (ref.rc, ref.out, "")


# --- placement and what the guest sees -----------------------------------------------------
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_threads_run_on_their_cpu_and_affinity_counts_them(prog, arch, cpus):
    exe = prog(arch, SMP / "percpu.c")
    r = run_emu("run", "--cpus", str(cpus), str(exe), "--", "5")
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == f"affinity={cpus} main_cpu=0 total={sum(CALLS[:5])}"
    want = [f"thread {i} cpu {c} {c} calls {CALLS[i]}"
            for i, c in enumerate(_expected_cpus(5, cpus))]
    assert lines[1:] == want


def test_bad_cpu_counts_are_refused(prog):
    exe = prog("x86_64", SMP / "percpu.c")
    for bad in ("0", "65", "two"):
        r = run_emu("run", "--cpus", bad, str(exe))
        assert r.rc == 2 and len(r.err.splitlines()) == 1 and "--cpus" in r.err, r.err
    fw = ROOT / "firmware" / "bin" / "x86_64" / "demo.elf"
    r = run_emu("run", "--bare", "--cpus", "2", str(fw))
    assert r.rc == 2 and r.err.strip() == \
        "emu: --cpus 2: bare-metal firmware runs on one CPU", r.err


# --- per-CPU probe state ---------------------------------------------------------------------
def _percpu_guest(exe: Path, cpus: int, nthreads: int, seed: int = 0):
    out = io.BytesIO()
    guest = load_guest(GuestConfig(path=str(exe), argv=[str(nthreads)], cpus=cpus, seed=seed),
                       stdout=out)
    return guest.machine, out


@pytest.mark.parametrize("arch", ARCHES)
def test_kprobe_hits_count_exactly_per_cpu_and_task(prog, arch):
    m, out = _percpu_guest(prog(arch, SMP / "percpu.c"), cpus=4, nthreads=5)
    kps = kprobes_of(m)
    seen: Counter[tuple[int, int]] = Counter()
    kcbs_seen: dict[int, int] = {}

    def pre(p, regs):
        seen[m.cpu, m.task[1]] += 1
        assert kps.kcb.current is p                    # this CPU's current_kprobe
        kcbs_seen.setdefault(m.cpu, id(kps.kcb))
        return 0

    p = Kprobe(symbol_name="work", pre_handler=pre)
    kps.register_kprobe(p)
    assert m.run().exit_code == 0
    tids = sorted({tid for _cpu, tid in seen})
    assert len(tids) == 5
    want = {(cpu, tid): CALLS[i] for i, (cpu, tid) in
            enumerate(zip(_expected_cpus(5, 4), tids))}
    assert dict(seen) == want
    assert (p.hits, p.nmissed) == (sum(CALLS[:5]), 0)
    assert len(set(kcbs_seen.values())) == 4           # one control block per CPU
    assert all(kps.kcbs[c].current is None for c in range(4))


@pytest.mark.parametrize("arch", ARCHES)
def test_trace_shows_the_real_cpu_and_task(prog, arch):
    exe = prog(arch, SMP / "percpu.c")
    r = run_emu("trace", "--cpus", "2", "--event", "p:smp/work work", str(exe), "--", "3")
    assert r.rc == 0, r.err
    rows = Counter(re.match(r"\s*\S+-(\d+)\s+\[(\d{3})\]", line).groups()
                   for line in r.out.splitlines())
    got = sorted((int(cpu), n) for (_tid, cpu), n in rows.items())
    assert got == sorted(zip(_expected_cpus(3, 2), CALLS[:3]))
    assert len({tid for tid, _cpu in rows}) == 3


CLANG = shutil.which("clang")
BPF_TARGET = {"x86_64": ("-D__TARGET_ARCH_x86", "/usr/include/x86_64-linux-gnu"),
              "arm64": ("-D__TARGET_ARCH_arm64", "/usr/aarch64-linux-gnu/include")}


@pytest.mark.skipif(CLANG is None, reason="clang is not installed (apt install clang)")
@pytest.mark.parametrize("arch", ARCHES)
def test_percpu_map_and_smp_processor_id(prog, arch, tmp_path):
    from probes.bpf.libbpf import BpfObject
    define, inc = BPF_TARGET[arch]
    if not Path(inc, "asm", "ptrace.h").exists():
        pytest.skip(f"no {arch} asm/ptrace.h under {inc}")
    obj_path = tmp_path / "percpu.o"
    subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", define, "-I", inc, "-c",
                    str(SMP / "percpu.bpf.c"), "-o", str(obj_path)], check=True)
    m, _out = _percpu_guest(prog(arch, SMP / "percpu.c"), cpus=4, nthreads=5)
    obj = BpfObject.open(obj_path, nr_cpus=m.nr_cpus).load(m)
    obj.attach_all(m)
    assert m.run().exit_code == 0
    per_cpu = [0] * 4
    for cpu, calls in zip(_expected_cpus(5, 4), CALLS):
        per_cpu[cpu] += calls
    assert [int.from_bytes(v, "little") for v in obj.maps["hits"].lookup(0)] == per_cpu
    assert [int.from_bytes(obj.maps["by_cpu"].lookup(c), "little") for c in range(8)] == \
        per_cpu + [0] * 4
    tgids = {int.from_bytes(k, "little"): int.from_bytes(v, "little")
             for k, v in obj.maps["tgid_of"].items()}
    assert len(tgids) == 5                             # five threads ran work()
    assert set(tgids.values()) == {m.syscall_handler.proc.creds.pid}


# --- determinism --------------------------------------------------------------------------
def _trace(exe: Path, seed: int, cpus: str = "2") -> str:
    r = run_emu("trace", "--cpus", cpus, "--seed", str(seed), "--event", "p:smp/work work",
                str(exe), "--", "3")
    assert r.rc == 0, r.err
    return r.out + r.err


@pytest.mark.parametrize("arch", ARCHES)
def test_same_seed_same_bytes_other_seed_other_interleaving(prog, arch, tmp_path):
    exe = prog(arch, SMP / "percpu.c")
    first = _trace(exe, 5)
    assert _trace(exe, 5) == first                      # trace, timestamps, guest output
    order = [line.split()[0] for line in first.splitlines() if "work:" in line]
    others = [_trace(exe, s) for s in (6, 7)]
    orders = [[line.split()[0] for line in o.splitlines() if "work:" in line]
              for o in others]
    assert any(o != order for o in orders)              # the seed moves the turns
    assert all(sorted(o) == sorted(order) for o in orders)   # never the counts
    stats = [tmp_path / f"s{i}.json" for i in range(2)]
    for s in stats:
        r = run_emu("run", "--cpus", "4", "--cycles", "--seed", "9", "--stats", str(s),
                    "--kprobe", "work", str(exe), "--", "5")
        assert r.rc == 0, r.err
    a, b = (json.loads(s.read_text()) for s in stats)
    assert a == b and a["probes"][0]["hits"] == sum(CALLS[:5])


def test_rdtscp_names_the_cpu(prog):
    """x86-64's rdtscp: IA32_TSC_AUX is the CPU, as Linux sets it (node 0)."""
    r = run_emu("run", "--cpus", "2", str(prog("x86_64", SMP / "tscaux.c")))
    assert r.rc == 0, r.err
    assert r.out.splitlines() == [f"thread {i} tsc_aux {c} cpu {c}"
                                  for i, c in enumerate(_expected_cpus(3, 2))]
