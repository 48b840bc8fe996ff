"""`emu sweep`: the probe-everywhere sweep from the command line (probes/sweep.py does the
work, probes/sweep_backends.py says where it runs)."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from emu.arch import ARCH_NAMES
from emu.errors import KprobeEmuError, UsageError


def default_jobs() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def add_subcommand(sub) -> None:
    s = sub.add_parser("sweep", help="probe every instruction of functions; compare with the unprobed run")
    s.add_argument("--arch", default="auto", choices=["auto", *ARCH_NAMES])
    s.add_argument("--bare", action="store_true")
    s.add_argument("--func", dest="funcs", action="append", default=[], metavar="NAME")
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
    from emu.linux.cli_options import add_cpus_option
    add_cpus_option(s)
    add_backend_options(s, "offsets", "sweep")
    s.add_argument("--no-snapshots", dest="snapshots", action="store_false",
                   help="run every offset from _start (the sweep before snapshots)")
    s.add_argument("file")
    s.add_argument("args", nargs="*", help="guest arguments (after --)")
    s.set_defaults(func=cmd_sweep)


def add_backend_options(p, unit: str, what: str) -> None:
    """Where the work runs, its progress and its resumable results file: the options `emu
    sweep` and the matrices (`emu bench`) share."""
    from emu.cli_checks import output_file
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes (default: every core)")
    p.add_argument("--results", metavar="FILE", type=output_file,
                   help=f"stream every result to FILE (JSON lines, one per {unit[:-1]})")
    p.add_argument("--resume", metavar="FILE", type=output_file,
                   help=f"continue the {what} whose results FILE holds (and append to it)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local process pool, or a Ray cluster (pip install 'kprobe-emu[ray]')")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join (`ray start --head` prints it); default: a local one")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "plain", "none"],
                   help="progress on stderr: a bar on a terminal, plain lines otherwise")


def check_backend_args(args) -> None:
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be at least 1")
    if args.results and args.resume:
        raise UsageError("--results and --resume: give one file (--resume appends to it)")
    if args.address and args.backend != "ray":
        raise UsageError("--address needs --backend ray")


def backend_from_args(args):
    """The backend of --backend/--address/--jobs (jobs default: every core)."""
    from probes.sweep_backends import LocalPool, RayBackend
    jobs = args.jobs if args.jobs is not None else default_jobs()
    return RayBackend(args.address, jobs) if args.backend == "ray" else LocalPool(jobs)


def cmd_sweep(args) -> int:
    from probes.sweep import SweepConfig, format_table, sweep
    from probes.sweep_backends import ResultsFile

    _check_run_inputs(args)
    jobs = args.jobs if args.jobs is not None else default_jobs()
    cfg = SweepConfig(path=args.file, arch=args.arch, bare=args.bare, argv=args.args,
                      funcs=args.funcs, jobs=jobs, timeout=args.timeout,
                      mode=args.mode, max_insns=args.max_insns, fs_root=args.fs,
                      fs_writable=args.fs_write, seed=args.seed, snapshots=args.snapshots,
                      cpus=args.cpus,
                      stdin=_read_stdin(args.stdin, args.timeout))
    backend = backend_from_args(args)
    path = args.resume or args.results
    journal = ResultsFile(path, resume=args.resume is not None) if path else None
    result = sweep(cfg, backend, journal, make_progress(args.progress, args.stderr))
    for name in result.not_executed:
        print(f"emu: sweep: warning: the unprobed run never executes {name}; not swept",
              file=args.stderr)
    if args.json:
        print(json.dumps(result.to_json(), indent=2), file=args.stdout)
    else:
        print(format_table(result), file=args.stdout)
    return 1 if result.mismatches else 0


# --- progress -------------------------------------------------------------------------------
def make_progress(kind: str, stream, label: str = "sweep", unit: str = "offsets"):
    """A rich bar on a terminal, plain lines elsewhere (a log, CI), or nothing; `label`
    names the work (the command) and `unit` what is counted."""
    if kind == "auto":
        kind = "bar" if _isatty(stream) else "plain"
    if kind == "bar":
        return BarProgress(stream, label, unit)
    if kind == "plain":
        return PlainProgress(stream, label=label, unit=unit)
    return None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class PlainProgress:
    """One line at most every `every` seconds and one at the end: done/total, rate, ETA."""

    def __init__(self, stream, every: float = 10.0, label: str = "sweep", unit: str = "offsets") -> None:
        self.stream, self.every, self.label, self.unit = stream, every, label, unit
        self.total = self.done = self.start_done = 0
        self.t0 = self.last = 0.0

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.t0 = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def finish(self) -> None:
        if self.total:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        left = self.total - self.done
        eta = f"{left / rate:.0f} s" if rate > 0 and left else "0 s" if not left else "?"
        print(f"emu: {self.label}: {self.done}/{self.total} {self.unit}, {rate:.1f}/s, ETA {eta}",
              file=self.stream, flush=True)


class BarProgress:
    """rich's progress bar: done/total, rate, ETA."""

    def __init__(self, stream, label: str = "sweep", unit: str = "offsets") -> None:
        self.stream, self.label, self.unit = stream, label, unit
        self._bar: Any = None
        self._task: Any = None

    def start(self, total: int, done: int) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                                   TextColumn, TimeRemainingColumn)

        unit = self.unit

        class Rate(TextColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return super().render(task) if speed is None else f"{speed:.1f} {unit}/s"
        self._bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                             TaskProgressColumn(), Rate(""), TimeRemainingColumn(),
                             console=Console(file=self.stream), transient=False)
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=total, completed=done)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# --- inputs -----------------------------------------------------------------------------------
class StdinTimeout(KprobeEmuError):
    """A limit: stdin did not reach its end within --timeout."""

    exit_code = 124


# Everything on stdin is handed to every run, so it is read once and held: cap it.
STDIN_LIMIT = 64 << 20


def _check_run_inputs(args) -> None:
    """The `emu run` input rules, for the sweep's own copies of those options."""
    if args.max_insns < 0:
        raise UsageError(f"--max-insns {args.max_insns}: must be 0 (no limit) or positive")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be a positive number of seconds")
    if args.fs_write and args.fs is None:
        raise UsageError("--fs-write needs --fs DIR")
    if args.fs is not None and (not args.fs or not os.path.isdir(args.fs)):
        raise UsageError(f"--fs {args.fs!r}: not a directory")
    check_backend_args(args)


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
