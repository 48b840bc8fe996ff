"""``emu filter``: run a socket filter over the packets of a capture.

    emu filter (--cbpf FILE | --ebpf OBJ[:PROG] | --expr 'EXPRESSION') PCAP
               [--json] [--dissect] [--engine jit|interp]

``--cbpf`` reads ``tcpdump -ddd`` or ``-dd`` text, ``--ebpf`` a clang object
with a ``SEC("socket")`` program, ``--expr`` compiles a tcpdump expression
with ``tcpdump -ddd -r PCAP`` (for the capture's link type). Each packet gets
the filter's verdict and the bytes a socket would keep; ``--json`` prints
``{"packets": N, "accepted": [1-based numbers], "snaplen": {"number": bytes}}``
(plus ``"dissect"`` with ``--dissect``). Bad input is one line on stderr and
exit 2; a program fault exits 139.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import subprocess
import sys
from typing import IO, Any, Callable

from emu.cli_checks import bounded_input_file, input_file
from emu.errors import GuestFault, KprobeEmuError, UsageError

MAX_PCAP_BYTES = 1 << 40      # read frame by frame: no need to bound the file
TCPDUMP_TIMEOUT = 30


class FilterLimit(KprobeEmuError):
    """A filter ran past the BPF machine's instruction budget on one packet.
    Attributes: ``packet`` (1-based)."""

    exit_code = 124

    def __init__(self, packet: int, reason: str):
        self.packet = packet
        super().__init__(f"filter stopped on packet {packet}: {reason}")


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser("filter", help="run a socket filter (classic or eBPF) over a pcap file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cbpf", type=bounded_input_file, metavar="FILE",
                     help="classic program as tcpdump -ddd or -dd prints it")
    src.add_argument("--ebpf", metavar="OBJ[:PROG]", help='a clang object\'s SEC("socket") program')
    src.add_argument("--expr", metavar="EXPRESSION", help="a tcpdump filter expression")
    p.add_argument("pcap", type=lambda t: input_file(t, MAX_PCAP_BYTES), metavar="PCAP")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--dissect", action="store_true", help="show the flow dissector's keys")
    p.add_argument("--engine", choices=("jit", "interp"), default="jit",
                   help="BPF engine (default: jit, the compiled path)")
    p.set_defaults(func=cmd_filter)


def tcpdump_compile(expr: str, pcap: str) -> str:
    """``tcpdump -ddd`` output for ``expr`` on the link type of ``pcap``."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise UsageError("--expr needs tcpdump to compile the expression, and it is not "
                         "installed (apt-get install tcpdump), or use --cbpf")
    try:
        done = subprocess.run([tcpdump, "-ddd", "-r", pcap, "--", expr], capture_output=True,
                              text=True, timeout=TCPDUMP_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError(f"tcpdump took more than {TCPDUMP_TIMEOUT} s to compile") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()
                 and not ln.startswith("reading from")]
        raise UsageError(f"tcpdump could not compile {expr!r}: "
                         f"{lines[-1] if lines else 'exit status ' + str(done.returncode)}")
    return done.stdout


def _load_socket_prog(spec: str) -> Any:
    from probes.bpf import BpfError, load_object
    from probes.bpf.prog_types import BpfProgType

    path, _, name = spec.partition(":")
    try:
        obj = load_object(bounded_input_file(path))
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--ebpf: {e}") from None
    except (BpfError, OSError) as e:
        raise UsageError(f"--ebpf {path}: {e}") from None
    socket = {n: p for n, p in obj.programs.items()
              if p.prog_type == BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER}
    if name:
        if name not in obj.programs:
            raise UsageError(f"--ebpf {path}: no program {name!r} (has {sorted(obj.programs)})")
        if name not in socket:
            raise UsageError(f"--ebpf {path}: {name!r} is not a SEC(\"socket\") program")
        return obj.programs[name]
    if len(socket) != 1:
        raise UsageError(f"--ebpf {path}: name the program (OBJ:PROG); socket programs: "
                         f"{sorted(socket) or 'none'}")
    return next(iter(socket.values()))


def _runner(args: argparse.Namespace) -> Callable[..., int]:
    """A function skb -> u32 for the program the options name."""
    from net.filter import parse_filter, sk_attach_filter, socket_prog_run
    from net.filter_helpers import SkbRunContext

    env = SkbRunContext()                 # one run environment for the whole capture
    if args.ebpf:
        prog = _load_socket_prog(args.ebpf)
        return lambda skb: socket_prog_run(prog, skb, env, engine=args.engine)
    if args.expr is not None:
        text = tcpdump_compile(args.expr, args.pcap)
    else:
        try:
            with open(args.cbpf, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--cbpf {args.cbpf}: {getattr(e, 'strerror', None) or e}") from None
    sk = sk_attach_filter(parse_filter(text))
    return lambda skb: sk.run(skb, env, engine=args.engine)


def _addr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw)) if len(raw) in (4, 16) else "-"


def dissect_record(number: int, skb: Any) -> dict[str, Any]:
    from net.flow_dissector import __skb_get_poff, skb_flow_dissect_flow_keys

    ok, keys = skb_flow_dissect_flow_keys(skb)
    return {"packet": number, "dissected": ok, "n_proto": keys.n_proto,
            "ip_proto": keys.ip_proto, "thoff": keys.thoff, "flags": int(keys.flags),
            "src": _addr(keys.src), "dst": _addr(keys.dst), "sport": keys.ports[0],
            "dport": keys.ports[1], "vlan_id": keys.vlan_id,
            "poff": __skb_get_poff(skb, keys) if ok else 0}


def _run_one(run: Callable[..., int], skb: Any, number: int) -> int:
    from probes.bpf import BpfRuntimeError, VerifierError

    try:
        return run(skb)
    except VerifierError as e:
        raise UsageError(f"the verifier refused the program: {e}") from None
    except BpfRuntimeError as e:
        if "budget" in e.reason:
            raise FilterLimit(number, e.reason) from None
        raise GuestFault(f"filter fault on packet {number}: {e}") from None


def filter_pcap(args: argparse.Namespace) -> dict[str, Any]:
    """Run the filter over every frame; the JSON document of the result."""
    from net.filter import sk_filter_trim_cap
    from net.pcap import frame_to_skb, linktype, read_frames

    link = linktype(args.pcap)
    run = _runner(args)
    result: dict[str, Any] = {"packets": 0, "accepted": [], "snaplen": {}}
    returned: dict[int, int] = {}
    dissect = []
    for frame in read_frames(args.pcap):
        skb = frame_to_skb(frame.data, link)
        ret = _run_one(run, skb, frame.number)
        result["packets"] = frame.number
        kept = sk_filter_trim_cap(ret, skb)
        if kept:
            result["accepted"].append(frame.number)
            result["snaplen"][str(frame.number)] = kept
            returned[frame.number] = ret
        if args.dissect:
            dissect.append(dissect_record(frame.number, skb))
    if args.dissect:
        result["dissect"] = dissect
    result["_returned"] = returned
    return result


def _print_text(result: dict[str, Any], out: IO[str]) -> None:
    accepted = set(result["accepted"])
    dissect = {d["packet"]: d for d in result.get("dissect", [])}
    for n in range(1, result["packets"] + 1):
        if n in accepted:
            line = f"{n:6d}  accept  keep {result['snaplen'][str(n)]} " \
                   f"(filter returned {result['_returned'][n]})"
        else:
            line = f"{n:6d}  drop"
        out.write(line + "\n")
        if n in dissect:
            d = dissect[n]
            out.write(f"        {'ok' if d['dissected'] else 'cannot dissect'}: "
                      f"n_proto {d['n_proto']:#06x} ip_proto {d['ip_proto']} thoff {d['thoff']} "
                      f"poff {d['poff']} {d['src']}:{d['sport']} > {d['dst']}:{d['dport']}\n")
    out.write(f"{len(accepted)} of {result['packets']} packets accepted\n")


def cmd_filter(args: argparse.Namespace) -> int:
    out = getattr(args, "stdout", None) or sys.stdout
    result = filter_pcap(args)
    if args.json:
        result.pop("_returned")
        out.write(json.dumps(result, sort_keys=False) + "\n")
    else:
        _print_text(result, out)
    return 0
