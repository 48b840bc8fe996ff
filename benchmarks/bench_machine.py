"""Machine speed: guest MIPS of firmware hotloop's `hot_loop(n)` run through the Machine
(loader API, no probes) against a bare Unicorn running the same code in the same process,
and the start-up time of `emu run` for a tiny program. Prints a table, asserts nothing.

    .venv/bin/python benchmarks/bench_machine.py [--arch all|arm64|x86_64] [--n N]
        [--repeat R] [--startup-runs K] [--json]

MIPS are exact: the instruction count of hot_loop(n) comes from separate counting runs (a
Unicorn code hook) at three small n, which must fit count = a*n + b exactly; the timed runs
then use a large n with no hook.

`--interp` times a real workload instead: bench_real_programs.py's tree-walking interpreter
(static glibc, built here) computing a recursive fib through `run_fib(n)`, on the Machine
(as `emu run` configures it: its virtual TLB with the C fill, emu/vtlb.py), on the Machine
with the Python fill and with Unicorn's CPU TLB (`KPROBE_EMU_VTLB=off`, the machine before
the virtual TLB), on bare Unicorn, and on bare Unicorn with a virtual TLB whose data pages
are mapped without execute permission, against qemu-user running the whole program; CPU
seconds, interleaved, best of R. What it shows (README, "Real-program speed"): with
Unicorn's CPU TLB about half the time goes to Unicorn 2.1.4's store slow path (every TLB
entry carries execute permission when the guest has no MMU, so each store takes
`notdirty_write`), which the virtual TLB avoids. The Machine run is `Machine.run()` from
hot_loop's entry with the argument register set and the return address pointing at a
two-instruction exit_group stub, so it pays whatever the Machine installs by default (trap,
syscall and counter hooks, the TLB fill and its fault window). The bare run maps the same segments into a fresh
Uc and calls `emu_start(hot_loop, until=return address)`."""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keystone  # noqa: E402
from unicorn import UC_HOOK_CODE, UC_PROT_ALL, Uc  # noqa: E402

from emu.arch import get_arch  # noqa: E402
from emu.loader import GuestConfig, load_guest  # noqa: E402
from emu.machine import StopReason  # noqa: E402
from emu.memory import PROT_EXEC, PROT_READ, page_down, page_up  # noqa: E402

ARCHES = ("arm64", "x86_64")
STUB = 0x1000_0000                  # exit stub (Machine) / `until` address (bare Unicorn)
BARE_STACK = 0x7000_0000
EXIT_STUB = {"arm64": "mov x8, #94; svc #0",                    # exit_group(x0): x0 kept
             "x86_64": "mov rdi, rax; mov eax, 231; syscall"}   # result moved to rdi
RESULT_REG = {"arm64": "x0", "x86_64": "rdi"}


def hotloop_elf(arch: str) -> Path:
    return ROOT / "firmware" / "bin" / arch / "hotloop.elf"


def assemble(arch: str, src: str, addr: int) -> bytes:
    a = get_arch(arch)
    enc, _ = keystone.Ks(a.ks_arch, a.ks_mode).asm(src, addr)
    return bytes(enc)


# --- the Machine ----------------------------------------------------------------------------
class MachineRunner:
    def __init__(self, arch: str, elf: Path | None = None, func: str = "hot_loop",
                 tlb: str | None = None) -> None:
        """`tlb`: the machine's TLB mode (emu/vtlb.py: native, python, off), else the default."""
        self.arch = get_arch(arch)
        saved = os.environ.get("KPROBE_EMU_VTLB")
        if tlb is not None:
            os.environ["KPROBE_EMU_VTLB"] = tlb
        try:
            guest = load_guest(GuestConfig(str(elf or hotloop_elf(arch))), stdin=io.BytesIO(),
                               stdout=io.BytesIO(), stderr=io.BytesIO())
        finally:
            if saved is None:
                os.environ.pop("KPROBE_EMU_VTLB", None)
            else:
                os.environ["KPROBE_EMU_VTLB"] = saved
        self.m = m = guest.machine
        self.func = m.symbols.lookup(func).addr
        m.memory.map(STUB, 0x1000, PROT_READ | PROT_EXEC, "bench-exit-stub")
        m.memory.write(STUB, assemble(arch, EXIT_STUB[arch], STUB))
        self.sp0 = m.sp

    def call(self, n: int) -> tuple[int, float]:
        m, a = self.m, self.arch
        m.set_reg(a.args[0], n)
        if a.link:
            m.set_reg(a.link, STUB)
            m.sp = self.sp0
        else:                               # x86-64: the return address on the stack
            m.sp = self.sp0 - 8
            m.memory.write_u64(m.sp, STUB)
        t0 = time.perf_counter()
        result = m.run(begin=self.func)
        elapsed = time.perf_counter() - t0
        assert result.reason is StopReason.EXIT, result
        return m.reg(RESULT_REG[a.name]), elapsed


# --- bare Unicorn ---------------------------------------------------------------------------
class BareRunner:
    def __init__(self, arch: str, count: bool = False, elf: Path | None = None,
                 func: str = "hot_loop") -> None:
        from emu.elf import load_elf
        self.arch = a = get_arch(arch)
        img = load_elf(str(elf or hotloop_elf(arch)))
        self.uc = uc = Uc(a.uc_arch, a.uc_mode)
        spans: list[list[int]] = []
        for s in sorted(img.segments, key=lambda s: s.vaddr):
            lo, hi = page_down(s.vaddr), page_up(s.vaddr + s.memsz)
            if spans and lo <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], hi)
            else:
                spans.append([lo, hi])
        for lo, hi in spans:
            uc.mem_map(lo, hi - lo, UC_PROT_ALL)
        for s in img.segments:
            uc.mem_write(s.vaddr, s.data)
        uc.mem_map(BARE_STACK - 0x10_0000, 0x10_0000, UC_PROT_ALL)
        self.func = next(s.addr for s in img.symbols if s.name == func)
        self.ids = {name: a.reg_id(name) for name in (a.args[0], a.sp, a.ret)}
        if a.link:
            self.ids[a.link] = a.reg_id(a.link)
        self.insns = 0
        if count:
            def on_code(_uc, _addr, _size, _ud):
                self.insns += 1
            uc.hook_add(UC_HOOK_CODE, on_code)

    def call(self, n: int) -> tuple[int, float]:
        a, uc, ids = self.arch, self.uc, self.ids
        uc.reg_write(ids[a.args[0]], n)
        if a.link:
            uc.reg_write(ids[a.link], STUB)
            uc.reg_write(ids[a.sp], BARE_STACK)
        else:
            uc.reg_write(ids[a.sp], BARE_STACK - 8)
            uc.mem_write(BARE_STACK - 8, STUB.to_bytes(8, "little"))
        t0 = time.perf_counter()
        uc.emu_start(self.func, STUB)
        elapsed = time.perf_counter() - t0
        return uc.reg_read(ids[a.ret]), elapsed


def count_insns(arch: str, n: int) -> tuple[int, int, int]:
    """Exact instruction count of hot_loop(n) (a, b of a*n + b), from hooked runs."""
    samples = []
    for k in (1000, 2000, 5000):
        r = BareRunner(arch, count=True)
        r.call(k)
        samples.append((k, r.insns))
    (k1, c1), (k2, c2), (k3, c3) = samples
    per = (c2 - c1) // (k2 - k1)
    base = c1 - per * k1
    assert per * k2 + base == c2 and per * k3 + base == c3, f"not linear: {samples}"
    return per * n + base, per, base


# --- a real workload: the interpreter ---------------------------------------------------------
def interp_elf(arch: str, cache: Path) -> Path | None:
    import bench_real_programs as brp
    w = next(w for w in brp.WORKLOADS if w.name == "interp")
    return brp.build(cache, w, arch)


def virtual_tlb(runner: BareRunner, elf: Path) -> None:
    """Bare Unicorn with a virtual TLB: writable data (segments without execute, the stack)
    filled read-write only, so stores to it leave the slow path after their first write."""
    from unicorn import UC_HOOK_TLB_FILL, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, UC_TLB_VIRTUAL
    from emu.elf import load_elf
    data = [(page_down(s.vaddr), s.vaddr + s.memsz) for s in load_elf(str(elf)).segments
            if not s.prot & 1] + [(BARE_STACK - 0x10_0000, BARE_STACK)]

    def fill(_uc, vaddr, _access, entry, _ud):
        entry.paddr = vaddr
        rw = any(lo <= vaddr < hi for lo, hi in data)
        entry.perms = UC_PROT_READ | (UC_PROT_WRITE if rw else UC_PROT_EXEC | UC_PROT_WRITE)
        return True
    runner.uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    runner.uc.hook_add(UC_HOOK_TLB_FILL, fill)
    runner.fill = fill                          # keep the callback alive


def bench_interp(arch: str, n: int, repeat: int, cache: Path) -> dict | None:
    elf = interp_elf(arch, cache)
    qemu = {"arm64": "qemu-aarch64", "x86_64": "qemu-x86_64"}[arch]
    if elf is None:
        return None
    runners = {"machine": MachineRunner(arch, elf, "run_fib"),
               "machine_pyfill": MachineRunner(arch, elf, "run_fib", tlb="python"),
               "machine_cputlb": MachineRunner(arch, elf, "run_fib", tlb="off"),
               "bare": BareRunner(arch, elf=elf, func="run_fib"),
               "bare_vtlb": BareRunner(arch, elf=elf, func="run_fib")}
    virtual_tlb(runners["bare_vtlb"], elf)
    want = {name: r.call(15)[0] for name, r in runners.items()}
    assert len(set(want.values())) == 1, want
    best = dict.fromkeys([*runners, "qemu"], float("inf"))
    import resource
    for _ in range(repeat):                          # interleaved: host noise hits all
        for name, r in runners.items():
            t = time.process_time()
            r.call(n)
            best[name] = min(best[name], time.process_time() - t)
        if subprocess.run(["which", qemu], capture_output=True).returncode == 0:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([qemu, str(elf), str(n)], capture_output=True, check=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            best["qemu"] = min(best["qemu"], after.ru_utime - before.ru_utime
                               + after.ru_stime - before.ru_stime)
    q = best["qemu"] if best["qemu"] != float("inf") else None
    return {"arch": arch, "n": n, **{f"{k}_s": v for k, v in best.items() if k != "qemu"},
            "qemu_s": q, "machine_over_bare": best["machine"] / best["bare"],
            "machine_over_vtlb": best["machine"] / best["bare_vtlb"],
            "machine_over_qemu": best["machine"] / q if q else None,
            "bare_over_qemu": best["bare"] / q if q else None,
            "vtlb_over_qemu": best["bare_vtlb"] / q if q else None}


def print_interp(rows: list[dict]) -> None:
    print("interpreter run_fib(n), CPU seconds, best of runs (qemu-user: the whole program)")
    print(f"{'arch':8} {'n':>3} {'Machine':>8} {'M. Py fill':>10} {'M. CPU TLB':>10} {'bare Uc':>8} "
          f"{'bare Uc vTLB':>12} {'qemu-user':>9} {'Machine/bare vTLB':>17} {'Machine/qemu':>12} "
          f"{'vTLB/qemu':>9}")
    for r in rows:
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"
        print(f"{r['arch']:8} {r['n']:>3} {r['machine_s']:>8.2f} {r['machine_pyfill_s']:>10.2f} "
              f"{r['machine_cputlb_s']:>10.2f} {r['bare_s']:>8.2f} "
              f"{r['bare_vtlb_s']:>12.2f} {fmt(r['qemu_s']):>9} {r['machine_over_vtlb']:>17.2f} "
              f"{fmt(r['machine_over_qemu']):>12} {fmt(r['vtlb_over_qemu']):>9}")


def bench_mips(arch: str, n: int, repeat: int) -> dict:
    insns, per, base = count_insns(arch, n)
    machine, bare = MachineRunner(arch), BareRunner(arch)
    want, _ = bare.call(1000)
    got, _ = machine.call(1000)                      # warm both translation caches
    assert got == want, f"hot_loop(1000): machine {got:#x} != bare {want:#x}"
    t_machine, t_bare = [], []
    for _ in range(repeat):                          # interleaved: host noise hits both
        rb, tb = bare.call(n)
        rm, tm = machine.call(n)
        assert rm == rb
        t_bare.append(tb)
        t_machine.append(tm)
    mips = lambda ts: insns / statistics.median(ts) / 1e6
    best = lambda ts: insns / min(ts) / 1e6
    return {"arch": arch, "n": n, "insns": insns, "insns_per_iter": per, "insns_fixed": base,
            "machine_mips": mips(t_machine), "bare_mips": mips(t_bare),
            "ratio": mips(t_machine) / mips(t_bare),
            "machine_mips_best": best(t_machine), "bare_mips_best": best(t_bare),
            "ratio_best": best(t_machine) / best(t_bare)}


# --- start-up -------------------------------------------------------------------------------
def bench_startup(arch: str, runs: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import LINUX_EXIT, tiny_elf
    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(tmp) / f"tiny-{arch}.elf"
        tiny.write_bytes(tiny_elf(arch, [("_start", LINUX_EXIT[arch].format(code=0))]))

        def timed(argv: list[str]) -> float:
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                proc = subprocess.run(argv, cwd=ROOT, capture_output=True)
                times.append(time.perf_counter() - t0)
                assert proc.returncode == 0, proc.stderr
            return statistics.median(times)

        py = sys.executable
        return {"arch": arch, "emu_run_s": timed([py, "-m", "emu.cli", "run", str(tiny)]),
                "python_import_cli_s": timed([py, "-c", "import emu.cli; emu.cli.build_parser()"]),
                "python_bare_s": timed([py, "-c", "pass"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="all", choices=["all", *ARCHES])
    ap.add_argument("--n", type=int, default=200_000_000, help="hot_loop iterations per timed run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--startup-runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--interp", type=int, metavar="N", default=0,
                    help="time the interpreter's run_fib(N) instead (see above)")
    ap.add_argument("--cache", default=os.environ.get("KPROBE_EMU_BENCH_CACHE", "/tmp/kprobe-emu-bench"))
    args = ap.parse_args()
    arches = ARCHES if args.arch == "all" else (args.arch,)
    if args.interp:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        rows = [r for a in arches if (r := bench_interp(a, args.interp, args.repeat, Path(args.cache)))]
        if args.json:
            json.dump(rows, sys.stdout, indent=2)
            print()
        else:
            print_interp(rows)
        return
    mips = [bench_mips(a, args.n, args.repeat) for a in arches]
    startup = [bench_startup(a, args.startup_runs) for a in arches]
    if args.json:
        json.dump({"mips": mips, "startup": startup}, sys.stdout, indent=2)
        print()
        return
    print(f"hot_loop(n={args.n:,}) guest MIPS, median of {args.repeat} (best in brackets); "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{'arch':8} {'insns':>13} {'insn/iter':>9} {'Machine MIPS':>20} {'bare Unicorn MIPS':>20} "
          f"{'ratio':>13}")
    for r in mips:
        print(f"{r['arch']:8} {r['insns']:>13,} {r['insns_per_iter']:>9} "
              f"{r['machine_mips']:>10.0f} ({r['machine_mips_best']:>6.0f}) "
              f"{r['bare_mips']:>11.0f} ({r['bare_mips_best']:>6.0f}) "
              f"{r['ratio']:>6.3f} ({r['ratio_best']:.3f})")
    print()
    print(f"start-up, median of {args.startup_runs} runs (seconds)")
    print(f"{'arch':8} {'emu run tiny':>13} {'import emu.cli':>15} {'python -c pass':>15}")
    for r in startup:
        print(f"{r['arch']:8} {r['emu_run_s']:>13.3f} {r['python_import_cli_s']:>15.3f} "
              f"{r['python_bare_s']:>15.3f}")


if __name__ == "__main__":
    main()
