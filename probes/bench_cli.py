"""`emu bench`: the kernel's kprobe overhead table measured here (probes/bench.py), as a
matrix of arch × profile × probe kind × BPF engine on the sweep's backends
(probes/sweep_matrix.py): `--jobs`, `--backend ray`, progress, `--resume`."""
from __future__ import annotations

import argparse
import json
import sys

from emu.arch import ARCH_NAMES
from emu.cli_checks import output_file, positive
from emu.errors import UsageError
from probes.bench_kinds import ALL_ARCHES, KINDS
from probes.sweep_matrix import Cell, Matrix

ALL_PROFILES = "all"            # `--profile all`: every profile of each arch's ISA
BPF_ENGINES = ("python", "jit")     # the bpf rows of each kind, in report order


def add_subcommands(sub) -> None:
    from probes.sweep_cli import add_backend_options
    p = sub.add_parser("bench", help="kprobe overhead per hit: modelled cycles and host time "
                                     "(the kprobes.rst overhead table)")
    p.add_argument("--arch", default=ALL_ARCHES, choices=[*ARCH_NAMES, ALL_ARCHES])
    p.add_argument("--profile", metavar="NAME",
                   help="CPU profile (cortex-a72, cortex-a55, skylake, or all: every profile "
                        "of each arch); default per arch")
    p.add_argument("--kind", action="append", metavar="KIND",
                   help=f"only these probe kinds ({' '.join(KINDS)}; repeatable)")
    p.add_argument("--calls", type=positive, metavar="N",
                   help="argument of the called guest function (default per kind: 2000 hot_leaf "
                        "calls, fib(15))")
    p.add_argument("--repeat", type=positive, default=5, metavar="N",
                   help="timed calls per row (best)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--plot", type=output_file, metavar="FILE.png",
                   help="draw the table as bars (needs matplotlib)")
    add_backend_options(p, "rows", "bench")
    p.set_defaults(func=cmd_bench)


def bench_matrix(arches: list[str], profile: str | None, kinds: tuple[str, ...],
                 arg: int | None, repeat: int) -> Matrix:
    """The cells of run_bench's table in its order: per arch and profile, per kind, the
    plain row and then a row per BPF engine (dropped when the kind takes no program)."""
    from emu.cycles import profile_for, profile_names
    from probes.bench import _profile_isa
    cells: list[Cell] = []
    for arch in arches:
        if profile == ALL_PROFILES:
            profiles: list[str | None] = list(profile_names(arch))
        else:
            profiles = [profile if profile and _profile_isa(profile) == arch else None]
        for prof in profiles:
            for kind in kinds:
                for engine in ("-", *BPF_ENGINES):
                    key = (arch, profile_for(arch, prof).name, kind, engine)
                    cells.append(Cell(len(cells), key, (arch, prof, kind, engine)))
    return Matrix("bench", (arg, repeat), cells, measure_cell)


def measure_cell(inputs: tuple[int | None, int], cell: Cell) -> dict:
    """One row of the table (a pool or Ray worker runs it)."""
    from probes import bench
    arg, repeat = inputs
    arch, prof, kind, engine = cell.spec
    if engine == "-":
        return bench.measure(arch, kind, prof, False, arg, repeat).to_json()
    return bench.measure(arch, kind, prof, True, arg, repeat, engine).to_json()


def merged_rows(m: Matrix, results: list[dict]) -> list:
    """The serial table's rows: a BPF row only where the kind took the program."""
    from probes.bench import BenchRow
    return [BenchRow(**r) for c, r in zip(m.cells, results)
            if c.spec[3] == "-" or r["cycles_per_hit"] is not None]


def cmd_bench(args: argparse.Namespace) -> int:
    from probes import bench          # imported when run: every other command would pay for it
    from probes.sweep_cli import backend_from_args, check_backend_args, make_progress
    from probes.sweep_matrix import MatrixResults, run_matrix
    kinds = tuple(args.kind) if args.kind else KINDS
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise UsageError(f"unknown probe kind {bad[0]!r} (one of {' '.join(KINDS)})")
    check_backend_args(args)
    every = args.profile == ALL_PROFILES
    arches = bench.resolve_arches(args.arch, None if every else args.profile)
    m = bench_matrix(arches, args.profile, kinds, args.calls, args.repeat)
    path = args.resume or args.results
    journal = MatrixResults(path, resume=args.resume is not None) if path else None
    err = getattr(args, "stderr", None) or sys.stderr
    backend = backend_from_args(args)
    results = run_matrix(m, backend, journal, make_progress(args.progress, err, "bench", "rows"))
    rows = merged_rows(m, results)
    if args.plot:
        bench.plot(rows, args.plot)
    # A caller with its own parser (no emu.cli.main) may leave the stream out.
    out = getattr(args, "stdout", None) or sys.stdout
    if args.json:
        json.dump([r.to_json() for r in rows], out, indent=2)
        out.write("\n")
    else:
        bench.format_table(rows, out)
        jobs = getattr(backend, "jobs", 1)
        out.write(f"\ncycles are modelled (the same on every run and backend); host µs and "
                  f"hook µs are host CPU time ({args.backend}, {jobs} job{'s' * (jobs > 1)})\n")
    return 0
