"""The kernel's kprobe overhead table (Documentation/trace/kprobes.rst, "Probe Overhead")
measured on the emulator: `emu bench`.

For each arch and probe kind (probes/bench_kinds.py) one guest function is called with
and without the probe(s); the difference per probe hit is reported

  * in modelled cycles (the cycle model, deterministic), broken down by reason
    (trap, handler, step, probe-code, code, detour, bpf, ...),
  * in host microseconds, beside the same run's baseline: one bare Unicorn code-hook
    callback on the same address (what any Unicorn-based tracer pays at least).

Kinds not implemented yet are reported as n/a. A row per kind with an attached BPF
program joins when `setup_kind` accepts `bpf=True` and does not raise NotImplementedError."""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from unicorn import UC_HOOK_CODE

from emu.arch import ARCH_NAMES
from emu.cycles import profile_for
from emu.errors import UsageError
from probes import bench_kinds
from probes.bench_kinds import ALL_ARCHES
from probes.testing import ProbeLab

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE_BIN = ROOT / "firmware" / "bin"
REASONS = ("trap", "handler", "step", "probe-code", "detour", "bpf", "code", "branch")


@dataclass
class BenchRow:
    """One line of the table. cycles_per_hit etc. are None for an n/a row."""
    arch: str
    kind: str
    bpf: bool
    profile: str
    cycles_per_hit: float | None = None
    breakdown: dict[str, float] = field(default_factory=dict)
    host_us_per_hit: float | None = None
    baseline_us_per_hit: float | None = None
    ratio: float | None = None
    hits: int = 0
    note: str = ""
    engine: str = ""             # bpf rows: how the program ran ("python", or "jit": the guest JIT)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def guest_path(arch: str, elf: str) -> Path:
    return FIRMWARE_BIN / arch / f"{elf}.elf"


def _lab(arch: str, elf: str, profile: str) -> ProbeLab:
    lab = ProbeLab.load(str(guest_path(arch, elf)))
    lab.machine.enable_cycle_model(profile)
    return lab


def _timed(labs: dict[str, ProbeLab], call: str, arg: int, repeat: int) -> dict[str, tuple]:
    """Per lab: the best host seconds of `repeat` calls (CPU time of this thread, the labs
    interleaved, so other load on the host disturbs little), and the modelled cycles and
    breakdown of the last call."""
    best = dict.fromkeys(labs, float("inf"))
    model: dict[str, tuple[int, dict[str, int]]] = {}
    for _ in range(repeat):
        for name, lab in labs.items():
            clock = lab.machine.clock
            c0, r0 = clock.cycles, clock.breakdown()
            t = time.thread_time()
            lab.call(call, arg, timeout=600)
            best[name] = min(best[name], time.thread_time() - t)
            r1 = clock.breakdown()
            model[name] = (clock.cycles - c0, {k: r1.get(k, 0) - r0.get(k, 0) for k in set(r0) | set(r1)})
    return {name: (best[name], *model[name]) for name in labs}


def _count_calls(arch: str, elf: str, func: str, call: str, arg: int) -> int:
    lab = ProbeLab.load(str(guest_path(arch, elf)))
    addr = lab.addr_of(func)
    n = [0]

    def count(*_a) -> None:
        n[0] += 1

    lab.machine.uc.hook_add(UC_HOOK_CODE, count, None, addr, addr)
    lab.call(call, arg, timeout=600)
    return n[0]


def _setup(kind: str, lab: ProbeLab, func: str, bpf: bool) -> list:
    if not bpf:
        return bench_kinds.setup_kind(kind, lab, func)
    if "bpf" not in inspect.signature(bench_kinds.setup_kind).parameters:
        raise NotImplementedError("setup_kind takes no bpf argument yet")
    return bench_kinds.setup_kind(kind, lab, func, bpf=True)


def measure(arch: str, kind: str, profile: str | None = None, bpf: bool = False,
            arg: int | None = None, repeat: int = 5, engine: str = "python") -> BenchRow:
    """One row: `kind` on its KIND_GUESTS function, against the unprobed run."""
    prof = profile_for(arch, profile).name
    elf, func, call, default_arg = bench_kinds.KIND_GUESTS[kind]
    arg = default_arg if arg is None else arg
    row = BenchRow(arch, kind, bpf, prof, engine=engine if bpf else "")
    probed = _lab(arch, elf, prof)
    try:
        _setup(kind, probed, func, bpf)
    except NotImplementedError as e:
        row.note = str(e) or "not implemented"
        return row
    if bpf:
        from probes.bpf.jit_guest import install_engine
        install_engine(probed.machine, engine)
    hits = _count_calls(arch, elf, func, call, arg)
    plain = _lab(arch, elf, prof)
    hooked = _lab(arch, elf, prof)
    addr = hooked.addr_of(func)
    hooked.machine.uc.hook_add(UC_HOOK_CODE, lambda *a: None, None, addr, addr)
    for lab in (plain, hooked, probed):          # warm up: translation, boosting, optimizing
        lab.call(call, arg, timeout=600)
    runs = _timed({"plain": plain, "hook": hooked, "probe": probed}, call, arg, repeat)
    (t_plain, c_plain, r_plain), (t_hook, _, _), (t_probe, c_probe, r_probe) = \
        runs["plain"], runs["hook"], runs["probe"]
    row.hits = hits
    row.cycles_per_hit = round((c_probe - c_plain) / hits, 2)
    row.breakdown = {k: round((r_probe.get(k, 0) - r_plain.get(k, 0)) / hits, 2)
                     for k in sorted(set(r_probe) | set(r_plain))
                     if r_probe.get(k, 0) != r_plain.get(k, 0)}
    row.host_us_per_hit = round((t_probe - t_plain) / hits * 1e6, 3)
    row.baseline_us_per_hit = round((t_hook - t_plain) / hits * 1e6, 3)
    if row.baseline_us_per_hit > 0:
        row.ratio = round(row.host_us_per_hit / row.baseline_us_per_hit, 2)
    return row


def run_bench(arches: list[str], profile: str | None = None, kinds=bench_kinds.KINDS,
              arg: int | None = None, repeat: int = 5) -> list[BenchRow]:
    rows = []
    for arch in arches:
        prof = profile if profile and _profile_isa(profile) == arch else None
        for kind in kinds:
            rows.append(measure(arch, kind, prof, False, arg, repeat))
            for engine in ("python", "jit"):
                bpf_row = measure(arch, kind, prof, True, arg, repeat, engine)
                if bpf_row.cycles_per_hit is not None:
                    rows.append(bpf_row)
    return rows


def _profile_isa(name: str) -> str:
    from emu.cycles import load_profile
    return load_profile(name).isa


def resolve_arches(arch: str, profile: str | None) -> list[str]:
    """The arches of `--arch` (an arch name or ALL_ARCHES), checked against `--profile`."""
    arches = {ALL_ARCHES: list(ARCH_NAMES)}.get(arch, [arch])
    if profile is not None:
        isa = _profile_isa(profile)
        if isa not in arches:
            raise UsageError(f"CPU profile {profile} is for {isa}; --arch is {arch}")
    return arches


# --- output -----------------------------------------------------------------------------------
def _fmt(x: float | None, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def format_table(rows: list[BenchRow], out: IO[str]) -> None:
    out.write("kprobe overhead per hit: modelled cycles (deterministic), host time against one\n"
              "bare Unicorn code-hook callback on the same address (same run), cycles by reason\n\n")
    out.write(f"{'arch':<7} {'profile':<11} {'kind':<4} {'bpf':<6} {'cycles/hit':>10} "
              f"{'host µs/hit':>11} {'hook µs':>8} {'ratio':>6}  breakdown (cycles/hit)\n")
    for r in rows:
        if r.cycles_per_hit is None:
            detail = r.note
        else:
            detail = ", ".join(f"{k} {v:g}" for k, v in sorted(r.breakdown.items(), key=_reason_order)
                               if abs(v) >= 0.5)
        out.write(f"{r.arch:<7} {r.profile:<11} {r.kind:<4} {(r.engine or 'yes') if r.bpf else '-':<6} "
                  f"{_fmt(r.cycles_per_hit):>10} {_fmt(r.host_us_per_hit, 2):>11} "
                  f"{_fmt(r.baseline_us_per_hit, 2):>8} {_fmt(r.ratio, 1):>6}  {detail}\n")


def _reason_order(item) -> tuple[int, str]:
    k = item[0]
    return (REASONS.index(k) if k in REASONS else len(REASONS), k)


def plot(rows: list[BenchRow], path: str) -> None:
    """Stacked bars of modelled cycles per hit by reason, one group per arch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install 'kprobe-emu[plot]')") from None
    done = [r for r in rows if r.cycles_per_hit is not None]
    if not done:
        raise UsageError("--plot: no row was measured")
    labels = [f"{r.arch}\n{r.kind}{'+' + (r.engine or 'bpf') if r.bpf else ''}" for r in done]
    reasons = sorted({k for r in done for k in r.breakdown}, key=lambda k: _reason_order((k, 0)))
    fig, ax = plt.subplots(figsize=(max(6, len(done) * 0.7), 4.5))
    bottom = [0.0] * len(done)
    for reason in reasons:
        vals = [max(0.0, r.breakdown.get(reason, 0.0)) for r in done]
        ax.bar(labels, vals, bottom=bottom, label=reason)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("modelled cycles per hit")
    ax.set_title("kprobe overhead per hit (emu bench)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
