"""Probe-layer subcommands of `emu`: inspect, sweep and (probes/trace/cli.py) trace. Each
command writes to the streams on its namespace (`args.stdout`, `args.stderr`, `args.stdin`)."""
from __future__ import annotations

import json

from emu.arch import ARCH_NAMES
from emu.errors import KprobeEmuError
from emu.loader import GuestConfig, load_guest


def add_subcommands(sub) -> None:
    p = sub.add_parser("inspect", help="show how a kprobe at SYM[+OFF]|ADDR patches the guest")
    p.add_argument("--arch", default="auto", choices=["auto", *ARCH_NAMES])
    p.add_argument("--bare", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--optimize", action="store_true", help="jump-optimize eligible probes at once")
    p.add_argument("--run", action="store_true",
                   help="run the guest first (its output is discarded) and show the state after")
    p.add_argument("file")
    p.add_argument("location", nargs="+", metavar="SYM[+OFF]|ADDR")
    p.set_defaults(func=cmd_inspect, args=[])

    s = sub.add_parser("sweep", help="probe every instruction of functions; compare with the unprobed run")
    s.add_argument("--arch", default="auto", choices=["auto", *ARCH_NAMES])
    s.add_argument("--bare", action="store_true")
    s.add_argument("--func", dest="funcs", action="append", default=[], metavar="NAME")
    s.add_argument("--jobs", type=int, default=1, metavar="N")
    s.add_argument("--json", action="store_true")
    s.add_argument("--mode", default="kprobe", choices=["kprobe", "optprobe", "kretprobe"],
                   help="probe each instruction (kprobe, optprobe) or each function (kretprobe)")
    s.add_argument("--timeout", type=float, default=20.0, metavar="S", help="per-run wall-clock limit (s)")
    s.add_argument("--max-insns", type=int, default=0, metavar="N",
                   help="stop each run after N instructions")
    s.add_argument("--fs", metavar="DIR", help="grant every run read access to host files under DIR")
    s.add_argument("--fs-write", action="store_true",
                   help="also allow writes, each run into its own scratch copy of DIR")
    s.add_argument("--seed", type=int, default=0, metavar="N", help="seed of getrandom and AT_RANDOM")
    s.add_argument("file")
    s.add_argument("args", nargs="*", help="guest arguments (after --)")
    s.set_defaults(func=cmd_sweep)

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
    if args.optimize:
        from probes.kprobes import kprobes_of
        from probes.optprobes import enable_optprobes
        enable_optprobes(kprobes_of(m)).kick_kprobe_optimizer()
    if args.run:
        m.run(timeout=60)
    if args.optimize or args.run:
        results = [inspect_kprobe(m, p) if r.verdict != "rejected" else r for p, r in zip(probes, results)]
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2), file=args.stdout)
    else:
        print("\n\n".join(r.format() for r in results), file=args.stdout)
    return 0


def cmd_sweep(args) -> int:
    from probes.sweep import SweepConfig, format_table, sweep

    _check_run_inputs(args)
    cfg = SweepConfig(path=args.file, arch=args.arch, bare=args.bare, argv=args.args,
                      funcs=args.funcs, jobs=max(1, args.jobs), timeout=args.timeout,
                      mode=args.mode, max_insns=args.max_insns, fs_root=args.fs,
                      fs_writable=args.fs_write, seed=args.seed,
                      stdin=_read_stdin(args.stdin, args.timeout))
    result = sweep(cfg)
    for name in result.not_executed:
        print(f"emu: sweep: warning: the unprobed run never executes {name}; not swept",
              file=args.stderr)
    if args.json:
        print(json.dumps(result.to_json(), indent=2), file=args.stdout)
    else:
        print(format_table(result), file=args.stdout)
    return 1 if result.mismatches else 0


class StdinTimeout(KprobeEmuError):
    """A limit: stdin did not reach its end within --timeout."""

    exit_code = 124


# Everything on stdin is handed to every run, so it is read once and held: cap it.
STDIN_LIMIT = 64 << 20


def _check_run_inputs(args) -> None:
    """The `emu run` input rules, for the sweep's own copies of those options."""
    import math
    import os

    from emu.errors import UsageError
    if args.max_insns < 0:
        raise UsageError(f"--max-insns {args.max_insns}: must be 0 (no limit) or positive")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be a positive number of seconds")
    if args.fs_write and args.fs is None:
        raise UsageError("--fs-write needs --fs DIR")
    if args.fs is not None and (not args.fs or not os.path.isdir(args.fs)):
        raise UsageError(f"--fs {args.fs!r}: not a directory")


def _read_stdin(stream, timeout: float) -> bytes:
    """All of stdin (empty when it is a terminal), within `timeout` seconds and STDIN_LIMIT
    bytes: every run of the sweep reads the same bytes."""
    import os
    import select
    import time

    from emu.errors import UsageError
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return _read_in_memory(stream)
    if os.isatty(fd):
        return b""
    data, deadline = bytearray(), time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise StdinTimeout(f"stdin still open after --timeout {timeout:g} s "
                               "(the sweep hands all of stdin to every run)")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > STDIN_LIMIT:
            raise UsageError(f"stdin is larger than {STDIN_LIMIT >> 20} MiB")


def _read_in_memory(stream) -> bytes:
    """stdin without a descriptor (an in-process caller's stream): read it whole, within
    STDIN_LIMIT; one that cannot be read at all is empty, as a closed stdin."""
    from emu.errors import UsageError
    try:
        data = getattr(stream, "buffer", stream).read(STDIN_LIMIT + 1)
    except (AttributeError, OSError, ValueError):
        return b""
    data = data.encode() if isinstance(data, str) else bytes(data)
    if len(data) > STDIN_LIMIT:
        raise UsageError(f"stdin is larger than {STDIN_LIMIT >> 20} MiB")
    return data
