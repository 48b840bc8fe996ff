"""`emu bench`: the kernel's kprobe overhead table measured here (probes/bench.py)."""
from __future__ import annotations

import argparse
import json
import sys

from emu.arch import ARCH_NAMES
from emu.cli_checks import output_file, positive
from emu.errors import UsageError
from probes.bench_kinds import ALL_ARCHES, KINDS


def add_subcommands(sub) -> None:
    p = sub.add_parser("bench", help="kprobe overhead per hit: modelled cycles and host time "
                                     "(the kprobes.rst overhead table)")
    p.add_argument("--arch", default=ALL_ARCHES, choices=[*ARCH_NAMES, ALL_ARCHES])
    p.add_argument("--profile", metavar="NAME",
                   help="CPU profile (cortex-a72, cortex-a55, skylake); default per arch")
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
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from probes import bench          # imported when run: every other command would pay for it
    kinds = tuple(args.kind) if args.kind else KINDS
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise UsageError(f"unknown probe kind {bad[0]!r} (one of {' '.join(KINDS)})")
    arches = bench.resolve_arches(args.arch, args.profile)
    rows = bench.run_bench(arches, args.profile, kinds, args.calls, args.repeat)
    if args.plot:
        bench.plot(rows, args.plot)
    # A caller with its own parser (no emu.cli.main) may leave the stream out.
    out = getattr(args, "stdout", None) or sys.stdout
    if args.json:
        json.dump([r.to_json() for r in rows], out, indent=2)
        out.write("\n")
    else:
        bench.format_table(rows, out)
    return 0
