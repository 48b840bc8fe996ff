"""``emu bpf``: run, disassemble and verify BPF programs from the shell.

    emu bpf run    (--asm FILE | --hex HEX | --obj FILE.o --prog NAME) [--mem HEX] [--packet HEX]
                   [--bpf-engine interp|python|jit [--arch A] [--cycles [--profile P]]]
    emu bpf disasm (--asm FILE | --hex HEX | --obj FILE.o [--prog NAME]) [--llvm | --jited [--arch A]]
    emu bpf verify (--asm FILE | --hex HEX | --obj FILE.o [--prog NAME]) [--type TYPE]

``--asm`` also takes a conformance ``.data`` file (its program, and its
memory unless ``--mem`` is given). Errors are one line on stderr; ``run``
and ``verify`` exit 1 when the program is refused or faults, bad options
exit 2. Output goes to ``args.stdout`` when the caller (``emu`` main) sets
it, else to ``sys.stdout``.
"""
from __future__ import annotations

import argparse
import sys
from typing import IO, Callable

from emu.cli_checks import bounded_input_file

from .asm import assemble
from .datafile import parse_data_file
from .disasm import disassemble, disassemble_llvm
from .errors import BpfError, VerifierError
from .program import BpfProg
from .prog_types import PACKET_TYPES, BpfProgType

_TYPES = {t.name[len("BPF_PROG_TYPE_"):].lower(): t for t in BpfProgType}


def _source_options(p: argparse.ArgumentParser, prog_required: bool) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--asm", type=bounded_input_file, metavar="FILE",
                     help="assembler text (or a conformance .data file)")
    src.add_argument("--hex", metavar="HEX", help="bytecode as hex (spaces allowed)")
    src.add_argument("--obj", type=bounded_input_file, metavar="FILE.o",
                     help="a clang -target bpf object")
    p.add_argument("--prog", metavar="NAME", required=False,
                   help="program name in --obj" + (" (required)" if prog_required else ""))
    p.add_argument("--type", choices=sorted(_TYPES), default="unspec",
                   help="program type for --asm/--hex (default: unspec, the conformance type)")


class _Input:
    """The programs named on the command line and the memory to run them on."""

    def __init__(self, progs: list[BpfProg], mem: bytes):
        self.progs, self.mem = progs, mem


def _read_input(args: argparse.Namespace, want_one: bool) -> _Input:
    ptype = _TYPES[args.type]
    mem = b""
    if args.obj:
        from .loader import load_object

        obj = load_object(args.obj, verify=False)
        if args.prog:
            if args.prog not in obj.programs:
                raise BpfError(f"{args.obj}: no program {args.prog!r} "
                               f"(has {', '.join(obj.programs)})")
            progs = [obj.programs[args.prog]]
        elif want_one:
            raise BpfError(f"--prog is required with --obj (programs: {', '.join(obj.programs)})")
        else:
            progs = list(obj.programs.values())
        return _Input(progs, mem)
    if args.hex is not None:
        code = bytes.fromhex("".join(args.hex.split()))
    elif args.asm.endswith(".data"):
        df = parse_data_file(args.asm)
        code = assemble(df.asm) if df.asm is not None else (df.raw or b"")
        mem = df.mem
    else:
        try:
            with open(args.asm) as f:
                text = f.read()
        except UnicodeDecodeError:
            raise BpfError(f"{args.asm}: not a text file (assembler expected)") from None
        code = assemble(text)
    return _Input([BpfProg.from_bytes(code, prog_type=ptype, name=args.prog or "")], mem)


def _out(args: argparse.Namespace) -> IO[str]:
    return getattr(args, "stdout", None) or sys.stdout


DEFAULT_CTX_SIZE = 512  # a zeroed context big enough for pt_regs on x86-64 and arm64


def cmd_run(args: argparse.Namespace) -> int:
    inp = _read_input(args, want_one=True)
    prog = inp.progs[0]
    packet = bytes.fromhex("".join(args.packet.split())) if args.packet is not None else None
    if args.mem is not None:
        mem = bytes.fromhex("".join(args.mem.split()))
    elif packet is not None or prog.prog_type in PACKET_TYPES:
        mem, packet = b"", packet or b""  # the machine builds xdp_md / __sk_buff
    elif prog.prog_type != BpfProgType.BPF_PROG_TYPE_UNSPEC and not inp.mem:
        mem = bytes(DEFAULT_CTX_SIZE)
    else:
        mem = inp.mem
    engine = args.bpf_engine or ("python" if args.engine == "jit" else args.engine)
    if engine == "jit":
        from .jit_guest import run_prog

        profile = args.profile or ("default" if args.cycles else None)
        result, jit = run_prog(prog, bytearray(mem), packet=packet, arch=args.arch,
                               cycle_profile=profile)
        print(f"r0 = {result:#x}", file=_out(args))
        if profile is not None:
            print(f"cycles = {jit.cycles} ({args.arch}, {jit.model.profile.name})",  # type: ignore[union-attr]
                  file=_out(args))
        return 0
    if args.cycles:
        raise BpfError("--cycles needs --bpf-engine jit (only JITed code runs on the cycle model)")
    result = prog.run(bytearray(mem), packet=packet,
                      engine="jit" if engine == "python" else engine)
    print(f"r0 = {result:#x}", file=_out(args))
    return 0


def _host_arch() -> str:
    import platform

    return "arm64" if platform.machine() in ("aarch64", "arm64") else "x86_64"


def cmd_disasm(args: argparse.Namespace) -> int:
    out = _out(args)
    for prog in _read_input(args, want_one=False).progs:
        if prog.section:
            print(f"Disassembly of {prog.name} ({prog.section}):", file=out)
        if args.jited:
            from .jit_guest import jited_listing

            print(jited_listing(prog, args.arch), end="", file=out)
            continue
        print(disassemble_llvm(prog.insns) if args.llvm else disassemble(prog.insns), end="",
              file=out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    status, out = 0, _out(args)
    for prog in _read_input(args, want_one=False).progs:
        try:
            print(prog.load(log_level=1 if args.verbose else 0), file=out)
            print(f"{prog.name or 'program'}: accepted", file=out)
        except VerifierError as e:
            print(e.log, file=out)
            print(f"{prog.name or 'program'}: refused: {e.reason}", file=out)
            status = 1
    return status


def add_subcommands(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``bpf run|disasm|verify`` to a parser's subcommands."""
    bpf = subparsers.add_parser("bpf", help="run, disassemble and verify BPF programs")
    sub = bpf.add_subparsers(dest="bpf_command", required=True)
    run = sub.add_parser("run", help="verify and run a program, print r0")
    _source_options(run, prog_required=True)
    run.add_argument("--mem", metavar="HEX",
                     help="the context r1 points to (its length in r2 for the default type); "
                          "kernel types get 512 zero bytes when omitted")
    run.add_argument("--packet", metavar="HEX", help="packet for socket/xdp/tc programs")
    run.add_argument("--engine", choices=("jit", "interp"), default="jit",
                     help="older spelling: jit = the compiled Python path")
    run.add_argument("--bpf-engine", choices=("interp", "python", "jit"), default=None,
                     help="interp: the reference interpreter; python: the compiled Python "
                          "path (default); jit: JITed to --arch code run in a scratch machine")
    run.add_argument("--arch", choices=("arm64", "x86_64"), default=_host_arch(),
                     help="the JIT's target (default: the host's)")
    run.add_argument("--cycles", action="store_true",
                     help="with --bpf-engine jit: print the modelled cycles of the run")
    run.add_argument("--profile", metavar="NAME", default=None,
                     help="CPU profile for --cycles (default: the arch's)")
    run.set_defaults(func=_guarded(cmd_run))
    dis = sub.add_parser("disasm", help="disassemble a program")
    _source_options(dis, prog_required=False)
    dis.add_argument("--llvm", action="store_true", help="llvm-objdump style listing")
    dis.add_argument("--jited", action="store_true",
                     help="the JITed --arch code under each BPF instruction (bpftool prog dump jited)")
    dis.add_argument("--arch", choices=("arm64", "x86_64"), default=_host_arch(),
                     help="the JIT's target for --jited (default: the host's)")
    dis.set_defaults(func=_guarded(cmd_disasm))
    ver = sub.add_parser("verify", help="print the verifier log; exit 1 when refused")
    _source_options(ver, prog_required=False)
    ver.add_argument("-v", "--verbose", action="store_true", help="list every instruction")
    ver.set_defaults(func=_guarded(cmd_verify))


def _guarded(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn errors into one line on stderr and exit status 1. A closed stdout (EPIPE) is
    not the program's error: it goes up to the caller."""
    def run(args: argparse.Namespace) -> int:
        err = getattr(args, "stderr", None) or sys.stderr
        try:
            return cmd(args)
        except BpfError as e:
            print(f"error: {e}", file=err)
            return 1
        except BrokenPipeError:
            raise
        except OSError as e:
            print(f"error: {e.filename or ''}: {e.strerror}", file=err)
            return 1
        except (ValueError, UnicodeDecodeError) as e:  # bad --hex / --mem text, a binary --asm
            print(f"error: {e}", file=err)
            return 1
    run.__name__ = cmd.__name__
    return run


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``main(["bpf", "run", "--hex", "..."])`` (the
    leading "bpf" may be left out)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "bpf":
        argv.insert(0, "bpf")
    parser = _Parser(prog="emu")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return args.func(args)
    except BrokenPipeError:
        print("error: output closed early (broken pipe)", file=sys.stderr)
        return 141


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main())
