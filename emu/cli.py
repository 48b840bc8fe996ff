"""The `emu` command: one small function per subcommand, each calling the public API and
only formatting. `main(argv, stdin=, stdout=, stderr=) -> int` so tests can call it in-process;
each command writes to the streams on its namespace (`args.stdout`, `args.stderr`, text; the
guest gets their binary buffers). Every error is one line on stderr and an exit code:
KprobeEmuError its own (bad input 2, a limit 124), an unwritable output 2, a closed stdout 141
(EPIPE), anything else 70; `--traceback` shows more."""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import sys
import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import IO, Any, BinaryIO, Iterator

from emu.cli_checks import (OutputError, directory, glob_list, input_file, integer, non_negative,
                            output_file, probe_locations, seconds, u64, write_output)
from emu.errors import KprobeEmuError, UsageError
from emu.machine import StopReason

EXIT_EPIPE = 128 + 13           # as if killed by SIGPIPE, the shell's convention
EXIT_INTERNAL = 70              # EX_SOFTWARE: a bug of ours, not the user's input
RUN_GRACE_S = 0.5               # after --timeout, before the backstop alarm interrupts a run


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (UsageError), not usage text plus a message."""

    def error(self, message: str):
        raise UsageError(message)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a guest ELF (Linux user mode or --bare firmware)")
    p.add_argument("--arch", default="auto", choices=["auto", "arm64", "x86_64"])
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
    from emu.cycles.cli_options import add_run_options as add_cycle_options
    add_cycle_options(p)
    from emu.linux.cli_options import add_run_options as add_linux_options
    add_linux_options(p)
    from probes.cli_options import add_run_options
    add_run_options(p)


def cmd_run(args) -> int:
    from emu.deadline import Deadline
    from emu.session import Session

    deadline = Deadline(args.timeout)           # --timeout counts loading too
    if args.fs_write and args.fs is None:
        raise UsageError("--fs-write needs --fs DIR (the directory to make writable)")
    _check_distinct_files(args.file, [("--stats", args.stats),
                                      ("--trace-out", getattr(args, "trace_out", None))])
    with deadline.interrupting(f"loading {args.file}"):
        session = Session.from_args(args, args.args, *_guest_streams(args))
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
    print(f"file:     {img.path}")
    print(f"arch:     {img.arch.name}")
    kind = {"static executable": "", "static-pie executable": "static-pie"}.get(img.kind, img.kind)
    detail = ", ".join(x for x in (kind, f"bias {img.bias:#x}" if img.bias else "") if x)
    print(f"type:     {img.etype}{f' ({detail})' if detail else ''}")
    if img.interp is not None:
        print(f"interp:   {img.interp}")
    if img.soname is not None:
        print(f"soname:   {img.soname}")
    if img.needed:
        print(f"needed:   {', '.join(img.needed)}")
    print(f"entry:    {'none' if img.kind == 'shared library' else f'{img.entry:#x}'}")
    print(f"segments: {len(img.segments)}")
    for s in img.segments:
        print(f"  {s.vaddr:#014x}-{s.vaddr + s.memsz:#014x} {perms_str(s.prot)} "
              f"filesz {len(s.data):#x} memsz {s.memsz:#x}")
    funcs = sum(1 for s in img.symbols if s.kind == "func")
    ifuncs = sum(1 for s in img.symbols if s.kind == "ifunc")
    print(f"symbols:  {len(img.symbols)} ({funcs} functions)" if not img.stripped
          else "symbols:  none (stripped)")
    if ifuncs:
        print(f"ifuncs:   {ifuncs} (resolved by the guest at start-up; "
              f"{len(img.irelative)} IRELATIVE slots)")
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


SUBCOMMAND_MODULES = ("probes.cli", "probes.bpf.cli", "emu.bench_cli", "net.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emu", description="kprobe-emu: Linux kprobes and BPF on emulated arm64 "
                    "and x86-64 guests")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_info(sub)
    _add_disasm(sub)
    for module in SUBCOMMAND_MODULES:      # an ImportError here is a bug, not a missing command
        __import__(module, fromlist=["add_subcommands"]).add_subcommands(sub)
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


class _TextSink(io.RawIOBase):
    """Guest bytes into a text stream without a binary buffer (an in-process caller's
    StringIO): decoded as the terminal would show them."""

    def __init__(self, text: IO[str]) -> None:
        self.text = text

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.text.write(bytes(data).decode(errors="replace"))
        return len(data)


class _ClosedFd(io.RawIOBase):
    """What a closed descriptor gives a writer: EBADF."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def _binary(stream: Any) -> Any:
    return getattr(stream, "buffer", None) or _TextSink(stream)


def _guest_streams(args) -> tuple[BinaryIO, BinaryIO, BinaryIO]:
    stdin = getattr(args.stdin, "buffer", args.stdin)
    return stdin, _binary(args.stdout), _binary(args.stderr)


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
        # Commands of other modules print(): the redirection gives them the same streams.
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                args = parse_args(argv)
            except SystemExit as e:             # --help
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
