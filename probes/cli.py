"""Probe-layer subcommands of `emu`: inspect and sweep."""
from __future__ import annotations

import json

from emu.loader import GuestConfig, load_guest


def add_subcommands(sub) -> None:
    p = sub.add_parser("inspect", help="show how a kprobe at SYM[+OFF]|ADDR patches the guest")
    p.add_argument("--arch", default="auto", choices=["auto", "arm64", "x86_64"])
    p.add_argument("--bare", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--optimize", action="store_true", help="jump-optimize eligible probes at once")
    p.add_argument("--run", action="store_true",
                   help="run the guest first (its output is discarded) and show the state after")
    p.add_argument("file")
    p.add_argument("location", nargs="+", metavar="SYM[+OFF]|ADDR")
    p.set_defaults(func=cmd_inspect, args=[])

    s = sub.add_parser("sweep", help="probe every instruction of functions; compare with the unprobed run")
    s.add_argument("--arch", default="auto", choices=["auto", "arm64", "x86_64"])
    s.add_argument("--bare", action="store_true")
    s.add_argument("--func", dest="funcs", action="append", default=[], metavar="NAME")
    s.add_argument("--jobs", type=int, default=1, metavar="N")
    s.add_argument("--json", action="store_true")
    s.add_argument("--mode", default="kprobe", choices=["kprobe", "optprobe", "kretprobe"],
                   help="probe each instruction (kprobe, optprobe) or each function (kretprobe)")
    s.add_argument("--timeout", type=float, default=20.0, help="per-run wall-clock limit (s)")
    s.add_argument("file")
    s.add_argument("args", nargs="*", help="guest arguments (after --)")
    s.set_defaults(func=cmd_sweep)

    from probes.trace.cli import add_subcommand as add_trace
    add_trace(sub)


def cmd_inspect(args) -> int:
    from probes.cli_options import kprobe_from_spec
    from probes.inspect import inspect_kprobe

    import io
    guest = load_guest(GuestConfig(path=args.file, arch=args.arch, bare=args.bare, argv=args.args),
                       stdin=io.BytesIO(), stdout=io.BytesIO(), stderr=io.BytesIO())
    m = guest.machine
    probes = [kprobe_from_spec(loc) for loc in args.location]
    results = [inspect_kprobe(m, p) for p in probes]        # registers them
    if args.optimize:
        from probes.kprobes import kprobes_of
        from probes.optprobes import enable_optprobes
        enable_optprobes(kprobes_of(m)).kick_kprobe_optimizer()
    if args.run:
        m.run(timeout=60)
    if args.optimize or args.run:
        results = [inspect_kprobe(m, p) if r.verdict != "rejected" else r for p, r in zip(probes, results)]
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print("\n\n".join(r.format() for r in results))
    return 0


def cmd_sweep(args) -> int:
    from probes.sweep import SweepConfig, format_table, sweep

    cfg = SweepConfig(path=args.file, arch=args.arch, bare=args.bare, argv=args.args,
                      funcs=args.funcs, jobs=max(1, args.jobs), timeout=args.timeout,
                      mode=args.mode)
    result = sweep(cfg)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_table(result))
    return 1 if result.mismatches else 0
