"""The `emu` command: one small function per subcommand, each calling the public API and
only formatting. `main(argv) -> int` so tests can call it; every KprobeEmuError becomes one
line on stderr and its exit code (`--traceback` shows more)."""
from __future__ import annotations

import argparse
import json
import sys
import traceback

from emu.errors import KprobeEmuError
from emu.machine import StopReason


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a guest ELF (Linux user mode or --bare firmware)")
    p.add_argument("--arch", default="auto", choices=["auto", "arm64", "x86_64"])
    p.add_argument("--bare", action="store_true", help="bare-metal firmware mode (no OS)")
    p.add_argument("--max-insns", type=int, default=0, metavar="N", help="stop after N instructions")
    p.add_argument("--timeout", type=float, default=0.0, metavar="S", help="wall-clock limit in seconds")
    p.add_argument("--fs", metavar="DIR", help="grant the guest read access to host files under DIR")
    p.add_argument("--fs-write", action="store_true", help="also allow writes under --fs DIR")
    p.add_argument("--strace", action="store_true", help="print each syscall to stderr")
    p.add_argument("--seed", type=int, default=0, help="seed of getrandom and AT_RANDOM")
    p.add_argument("--stats", metavar="FILE.json", help="write a JSON run summary")
    p.add_argument("file")
    p.add_argument("args", nargs="*", help="guest arguments (after --)")
    p.set_defaults(func=cmd_run)
    from emu.cycles.cli_options import add_run_options as add_cycle_options
    add_cycle_options(p)
    from emu.linux.cli_options import add_run_options as add_linux_options
    add_linux_options(p)
    try:
        from probes.cli_options import add_run_options
    except ImportError:      # the probe layer is optional for the machine
        return
    add_run_options(p)


def cmd_run(args) -> int:
    from emu.session import Session

    session = Session.from_args(args, args.args)
    result = session.run(max_insns=args.max_insns, timeout=args.timeout)
    sys.stdout.flush()
    if result.reason is StopReason.FAULT:
        print(f"emu: {result.message}", file=sys.stderr)
    elif result.reason is StopReason.LIMIT:
        print(f"emu: {result.message}", file=sys.stderr)
    session.report(sys.stderr)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(session.stats(result), f, indent=2)
            f.write("\n")
    return result.exit_code


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
    p.add_argument("file")
    p.add_argument("symbol")
    p.set_defaults(func=cmd_disasm)


def cmd_disasm(args) -> int:
    from emu.disasm import disassemble_symbol
    from emu.elf import load_elf

    for line in disassemble_symbol(load_elf(args.file), args.symbol):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emu", description="kprobe-emu: Linux kprobes and BPF "
                                     "on emulated arm64 and x86-64 guests")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_info(sub)
    _add_disasm(sub)
    for module in ("probes.cli", "probes.bpf.cli", "emu.bench_cli"):
        try:
            mod = __import__(module, fromlist=["add_subcommands"])
        except ImportError:
            continue
        mod.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` belongs to the guest (argparse would take `-n` as ours).
    guest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, guest_args = argv[:i], argv[i + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "args"):
        args.args = list(args.args) + guest_args
    try:
        return args.func(args)
    except KprobeEmuError as e:
        if args.traceback:
            traceback.print_exc()
        print(f"emu: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141


if __name__ == "__main__":
    sys.exit(main())
