"""Probe-layer subcommands of `emu`: inspect, sweep (probes/sweep_cli.py) and trace
(probes/trace/cli.py). Each command writes to the streams on its namespace (`args.stdout`,
`args.stderr`, `args.stdin`)."""
from __future__ import annotations

import json

from emu.arch import ARCH_NAMES
from emu.loader import GuestConfig, load_guest


def add_subcommands(sub) -> None:
    p = sub.add_parser("inspect", help="show how a kprobe at SYM[+OFF]|ADDR patches the guest")
    p.add_argument("--arch", default="auto", choices=["auto", *ARCH_NAMES])
    p.add_argument("--bare", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--optimize", action="store_true", help="jump-optimize eligible probes at once")
    p.add_argument("--run", action="store_true",
                   help="run the guest first (its output is discarded) and show the state after")
    from probes.trace.bpf_cli import add_inspect_options
    add_inspect_options(p)
    p.add_argument("file")
    p.add_argument("location", nargs="+", metavar="SYM[+OFF]|ADDR")
    p.set_defaults(func=cmd_inspect, args=[])

    from probes.sweep_cli import add_subcommand as add_sweep
    add_sweep(sub)

    from probes.trace.cli import add_subcommand as add_trace
    add_trace(sub)


def cmd_inspect(args) -> int:
    import io
    from typing import BinaryIO, cast

    from probes.cli_options import kprobe_from_spec
    from probes.inspect import inspect_kprobe
    from probes.sweep import OutputDigest

    # --run discards the guest's output: digest it, never hold it (a guest may write GBs).
    # A digest is a write-only sink, all the machine asks of its output streams.
    guest = load_guest(GuestConfig(path=args.file, arch=args.arch, bare=args.bare, argv=args.args),
                       stdin=io.BytesIO(), stdout=cast(BinaryIO, OutputDigest()),
                       stderr=cast(BinaryIO, OutputDigest()))
    m = guest.machine
    probes = [kprobe_from_spec(loc) for loc in args.location]
    results = [inspect_kprobe(m, p) for p in probes]        # registers them
    from probes.trace.bpf_cli import format_programs, inspect_attach, inspect_programs
    bpf = inspect_attach(m, args)
    if args.optimize:
        from probes.kprobes import kprobes_of
        from probes.optprobes import enable_optprobes
        enable_optprobes(kprobes_of(m)).kick_kprobe_optimizer()
    if args.run:
        m.run(timeout=60)
    if args.optimize or args.run:
        results = [inspect_kprobe(m, p) if r.verdict != "rejected" else r for p, r in zip(probes, results)]
    if args.json:
        print(json.dumps([r.to_json() | ({"bpf": progs} if (progs := inspect_programs(bpf, r.addr)) else {})
                          for r in results], indent=2), file=args.stdout)
    else:
        print("\n\n".join("\n".join([r.format(), *format_programs(inspect_programs(bpf, r.addr))])
                           for r in results), file=args.stdout)
    return 0
