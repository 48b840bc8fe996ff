"""The `emu` command: one small function per subcommand, each calling the public API and
only formatting. `main(argv, stdin=, stdout=, stderr=) -> int` so tests can call it in-process;
each command writes to the streams on its namespace (`args.stdout`, `args.stderr`, text; the
guest gets their binary buffers), never to sys.stdout/sys.stderr. Every error is one line on
stderr and an exit code: KprobeEmuError its own (bad input 2, a limit 124), an unwritable
output 2, a closed stdout 141 (EPIPE), anything else 70 (an ImportError in a layer included:
a bug, never a missing command); `--traceback` shows more.

What the other layers add is listed here, explicitly and in order: SUBCOMMAND_MODULES (their
subcommands) and run_option_providers() (their `emu run` options)."""
from __future__ import annotations

import argparse
import errno
import importlib
import io
import json
import os
import sys
import traceback
from contextlib import contextmanager
from typing import IO, BinaryIO, Iterator

from emu.arch import ARCH_NAMES
from emu.cli_checks import (OutputError, directory, glob_list, input_file, integer, non_negative,
                            output_file, probe_locations, seconds, u64, write_output)
from emu.cli_streams import binary_of
from emu.errors import KprobeEmuError, UsageError
from emu.machine import StopReason
from emu.session import RunOptionProvider

EXIT_EPIPE = 128 + 13           # as if killed by SIGPIPE, the shell's convention
EXIT_INTERNAL = 70              # EX_SOFTWARE: a bug of ours, not the user's input
RUN_GRACE_S = 0.5               # after --timeout, before the backstop alarm interrupts a run


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (UsageError), not usage text plus a message."""

    def error(self, message: str):
        raise UsageError(message)


def run_option_providers() -> list[RunOptionProvider]:
    """The layers' `emu run` options, in the order they act on the loaded guest: the memory
    budget and the cycle model before any probe is armed (arming maps slot pages; probe costs
    go to the model), the probes before the trace events and BPF programs that sit on them."""
    from emu.cycles import cli_options as cycles
    from emu.linux import cli_options as linux
    from probes import cli_options as kprobes
    from probes.trace import bpf_cli
    from probes.trace import cli as trace
    return [
        RunOptionProvider("linux", linux.add_run_options, linux.apply_from_args),
        RunOptionProvider("cycles", cycles.add_run_options, cycles.attach_from_args),
        RunOptionProvider("kprobes", kprobes.add_run_options, kprobes.attach_from_args),
        RunOptionProvider("trace events", trace.add_run_options, trace.attach_from_args),
        RunOptionProvider("bpf", bpf_cli.add_run_options, bpf_cli.attach_from_args),
    ]


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a guest ELF (Linux user mode or --bare firmware)")
    p.add_argument("--arch", default="auto", choices=["auto", *ARCH_NAMES])
    p.add_argument("--bare", action="store_true", help="bare-metal firmware mode (no OS)")
    p.add_argument("--max-insns", type=non_negative, default=0, metavar="N",
                   help="stop after N instructions")
    p.add_argument("--timeout", type=seconds, default=0.0, metavar="S",
                   help="wall-clock limit in seconds, loading included (0: none)")
    p.add_argument("--fs", type=directory, metavar="DIR",
                   help="grant the guest read access to host files under DIR")
    p.add_argument("--fs-write", action="store_true", help="also allow writes under --fs DIR")
    p.add_argument("--strace", action="store_true", help="print each syscall to stderr")
    p.add_argument("--seed", type=u64, default=0, help="seed of getrandom and AT_RANDOM")
    p.add_argument("--stats", type=output_file, metavar="FILE.json",
                   help="write a JSON run summary")
    p.add_argument("file", type=input_file)
    p.add_argument("args", nargs="*", help="guest arguments (after --)")
    p.set_defaults(func=cmd_run)
    for provider in run_option_providers():
        provider.add(p)


def cmd_run(args) -> int:
    from emu.deadline import Deadline
    from emu.session import Session

    deadline = Deadline(args.timeout)           # --timeout counts loading too
    if args.fs_write and args.fs is None:
        raise UsageError("--fs-write needs --fs DIR (the directory to make writable)")
    _check_distinct_files(args.file, [("--stats", args.stats),
                                      ("--trace-out", getattr(args, "trace_out", None))])
    with deadline.interrupting(f"loading {args.file}"):
        session = Session.from_args(args, args.args, *_guest_streams(args),
                                    providers=run_option_providers())
    with _trace_file_errors(args):
        # The machine stops itself at the deadline; the alarm a moment later is for a guest
        # held in a host call (a read of a pipe that never closes) or a hook that never returns.
        with deadline.interrupting(f"running {args.file}", grace=RUN_GRACE_S):
            result = session.run(max_insns=args.max_insns, deadline=deadline)
        args.stdout.flush()
        if result.reason in (StopReason.FAULT, StopReason.LIMIT):
            print(f"emu: {result.message}", file=args.stderr)
        session.report(args.stderr)
    if args.stats:
        write_output("--stats", args.stats, json.dumps(session.stats(result), indent=2) + "\n")
    return result.exit_code


def _check_distinct_files(source: str, outputs: list[tuple[str, str | None]]) -> None:
    """No output may overwrite the guest file or another output (as the same file)."""
    seen = [("the guest file", source)]
    for option, path in outputs:
        if path is None:
            continue
        for what, other in seen:
            if _same_file(path, other):
                raise UsageError(f"{option} {path}: is {what}")
        seen.append((option, path))


def _same_file(a: str, b: str) -> bool:
    """The same path, or (both existing) the same inode through links."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextmanager
def _trace_file_errors(args) -> Iterator[None]:
    """A write error while the guest runs is the trace file's (the guest's own writes get
    their errno, a closed stdout is EPIPE): name it."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        path = getattr(args, "trace_out", None)
        if path is None or e.filename is not None:
            raise
        raise OutputError("--trace-out", path, e) from None


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe an ELF: arch, type, entry, segments, symbols")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from emu.elf import load_elf
    from emu.memory import perms_str

    img = load_elf(args.file, describe=True)
    lines = [f"file:     {img.path}", f"arch:     {img.arch.name}"]
    kind = {"static executable": "", "static-pie executable": "static-pie"}.get(img.kind, img.kind)
    detail = ", ".join(x for x in (kind, f"bias {img.bias:#x}" if img.bias else "") if x)
    lines.append(f"type:     {img.etype}{f' ({detail})' if detail else ''}")
    if img.interp is not None:
        lines.append(f"interp:   {img.interp}")
    if img.soname is not None:
        lines.append(f"soname:   {img.soname}")
    if img.needed:
        lines.append(f"needed:   {', '.join(img.needed)}")
    lines.append(f"entry:    {'none' if img.kind == 'shared library' else f'{img.entry:#x}'}")
    lines.append(f"segments: {len(img.segments)}")
    lines += [f"  {s.vaddr:#014x}-{s.vaddr + s.memsz:#014x} {perms_str(s.prot)} "
              f"filesz {len(s.data):#x} memsz {s.memsz:#x}" for s in img.segments]
    funcs = sum(1 for s in img.symbols if s.kind == "func")
    ifuncs = sum(1 for s in img.symbols if s.kind == "ifunc")
    lines.append(f"symbols:  {len(img.symbols)} ({funcs} functions)" if not img.stripped
                 else "symbols:  none (stripped)")
    if ifuncs:
        lines.append(f"ifuncs:   {ifuncs} (resolved by the guest at start-up; "
                     f"{len(img.irelative)} IRELATIVE slots)")
    args.stdout.write("".join(line + "\n" for line in lines))
    return 0


def _add_disasm(sub) -> None:
    p = sub.add_parser("disasm", help="disassemble a function (capstone)")
    p.add_argument("file", type=input_file)
    p.add_argument("symbol")
    p.set_defaults(func=cmd_disasm)


def cmd_disasm(args) -> int:
    from emu.disasm import disassemble_symbol
    from emu.elf import load_elf

    for line in disassemble_symbol(load_elf(args.file), args.symbol):
        print(line, file=args.stdout)
    return 0


# The other layers' subcommands, in help order: each module's add_subcommands(sub).
SUBCOMMAND_MODULES = (
    "probes.cli",               # inspect, sweep, trace
    "probes.bpf.cli",           # bpf run|disasm|verify
    "probes.bench_cli",         # bench
    "net.cli",                  # filter
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emu", description="kprobe-emu: Linux kprobes and BPF on emulated arm64 "
                    "and x86-64 guests")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_info(sub)
    _add_disasm(sub)
    for module in SUBCOMMAND_MODULES:      # an ImportError here is a bug, not a missing command
        importlib.import_module(module).add_subcommands(sub)
    return parser


# Options declared by other modules' parsers (or left free there), checked once parsed: the
# same checks as the `type=` of ours, so every subcommand refuses the same hostile values.
AFTER_PARSE_CHECKS = {
    "file": input_file,                                 # info, inspect, sweep
    "timeout": seconds,                                 # sweep's per-run limit
    "jobs": integer(1, 64, "a number of jobs"),         # sweep
    "trace_out": output_file,                           # run --trace-out
    "ftrace_filter": glob_list,                         # run --ftrace-filter (repeatable)
    "kprobe": probe_locations,                          # run --kprobe (repeatable)
    "kretprobe": probe_locations,                       # run --kretprobe (repeatable)
    "location": probe_locations,                        # inspect SYM[+OFF]|ADDR...
}


def _check_parsed(args: argparse.Namespace) -> None:
    for dest, check in AFTER_PARSE_CHECKS.items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):
            continue
        try:
            check(value if isinstance(value, (str, list)) else repr(value))
        except argparse.ArgumentTypeError as e:
            name = dest if dest in ("file", "location") else "--" + dest.replace("_", "-")
            raise UsageError(f"argument {name}: {e}") from None


def _takes_guest_args(parser: argparse.ArgumentParser) -> set[str]:
    """The subcommands with a guest argument list (run, sweep): `--` splits their argv."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name for name, p in sub.choices.items() if any(a.dest == "args" for a in p._actions)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    guest_args: list[str] = []
    if command in _takes_guest_args(parser) and "--" in argv:
        # Everything after the first `--` is the guest's (argparse would take `-n` as ours).
        i = argv.index("--")
        argv, guest_args = argv[:i], argv[i + 1:]
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "args"):
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} (guest arguments go after "
                         f"--: emu {args.command} [OPTIONS] FILE -- ARGS...)")
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "args"):
        args.args = list(args.args) + guest_args
    _check_parsed(args)
    return args


class _ClosedFd(io.RawIOBase):
    """What a closed descriptor gives a writer: EBADF."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def _guest_streams(args) -> tuple[BinaryIO, BinaryIO, BinaryIO]:
    stdin = getattr(args.stdin, "buffer", args.stdin)
    return stdin, binary_of(args.stdout), binary_of(args.stderr)


def _say(stderr: IO[str], line: str, keep_lines: bool = False) -> None:
    """One line on stderr (or, for an error_log report, its message/command/caret lines as
    the kernel shows them); if stderr itself is gone there is nobody left to tell."""
    try:
        stderr.write((line if keep_lines else " ".join(line.splitlines())) + "\n")
        stderr.flush()
    except (OSError, ValueError):
        pass


def _detach_if_broken(stream: IO[str]) -> None:
    """After an output error, point the stream's descriptor at /dev/null so that Python's
    final flush at exit does not fail again ("Exception ignored ... BrokenPipeError")."""
    try:
        stream.flush()
        return
    except (OSError, ValueError):
        pass
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None, *, stdin: IO[str] | None = None,
         stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stdin = stdin or sys.stdin or io.TextIOWrapper(io.BytesIO())         # fd 0 closed: EOF
    stdout = stdout or sys.stdout or io.TextIOWrapper(_ClosedFd(), write_through=True)
    stderr = stderr or sys.stderr or open(os.devnull, "w")          # fd 2 closed: nobody to tell
    show_traceback = "--traceback" in argv[: argv.index("--") if "--" in argv else len(argv)]
    try:
        try:
            args = _parse_to(argv, stdout, stderr)
        except SystemExit as e:                 # --help, --version
            return int(e.code or 0)
        args.stdin, args.stdout, args.stderr = stdin, stdout, stderr
        rc = args.func(args)
        stdout.flush()
        return rc
    except BrokenPipeError:
        _detach_if_broken(stdout)
        _say(stderr, "emu: output closed early (broken pipe)")
        return EXIT_EPIPE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if show_traceback:
            traceback.print_exc(file=stderr)
        _detach_if_broken(stdout)
        rc, message = _error_line(e)
        _say(stderr, message, keep_lines=getattr(e, "error_log", False))
        return rc


def _parse_to(argv: list[str], stdout: IO[str], stderr: IO[str]) -> argparse.Namespace:
    """parse_args, with argparse's --help text (it prints to sys.stdout) on our stdout."""
    from contextlib import redirect_stderr, redirect_stdout
    with redirect_stdout(stdout), redirect_stderr(stderr):
        return parse_args(argv)


def _error_line(e: Exception) -> tuple[int, str]:
    """The exit code and the one line for an error that ended a command."""
    if isinstance(e, KprobeEmuError):
        return e.exit_code, f"emu: {e}"
    if isinstance(e, OSError):          # our own output (stdout, a file) could not be written
        where = f"{e.filename}: " if e.filename else "write error: "
        return 2, f"emu: {where}{e.strerror or e}"
    return EXIT_INTERNAL, (f"emu: internal error: {type(e).__name__}: {e} "
                           "(emu --traceback ... shows where)")


if __name__ == "__main__":
    sys.exit(main())
