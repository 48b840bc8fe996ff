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
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from emu.cli_checks import bounded_input_file, input_file
from emu.errors import EmuError, GuestFault, UsageError

MAX_PCAP_BYTES = 1 << 40      # read frame by frame: no need to bound the file
TCPDUMP_TIMEOUT = 30


class FilterLimit(EmuError):
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
    import ipaddress

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


@dataclass(frozen=True)
class Verdict:
    """One packet's outcome: ``returned`` (the program's u32), ``kept`` (bytes
    the socket keeps, 0 = dropped), ``dissect`` (keys, with --dissect)."""

    number: int
    returned: int
    kept: int
    dissect: dict[str, Any] | None = None


def filter_pcap(args: argparse.Namespace) -> Iterator[Verdict]:
    """Run the filter over every frame of the capture, in order."""
    from net.filter import sk_filter_trim_cap
    from net.pcap import frame_to_skb, linktype, read_frames

    link = linktype(args.pcap)
    run = _runner(args)
    for frame in read_frames(args.pcap):
        skb = frame_to_skb(frame.data, link)
        ret = _run_one(run, skb, frame.number)
        yield Verdict(frame.number, ret, sk_filter_trim_cap(ret, skb),
                      dissect_record(frame.number, skb) if args.dissect else None)


def _text_line(v: Verdict) -> str:
    line = (f"{v.number:6d}  accept  keep {v.kept} (filter returned {v.returned})" if v.kept
            else f"{v.number:6d}  drop")
    d = v.dissect
    if d is not None:
        line += (f"\n        {'ok' if d['dissected'] else 'cannot dissect'}: "
                 f"n_proto {d['n_proto']:#06x} ip_proto {d['ip_proto']} thoff {d['thoff']} "
                 f"poff {d['poff']} {d['src']}:{d['sport']} > {d['dst']}:{d['dport']}")
    return line + "\n"


def cmd_filter(args: argparse.Namespace) -> int:
    """Text is printed packet by packet; JSON keeps only the accepted packets
    (and the dissection when asked for)."""
    out = getattr(args, "stdout", None) or sys.stdout
    doc: dict[str, Any] = {"packets": 0, "accepted": [], "snaplen": {}}
    dissect = []
    for v in filter_pcap(args):
        doc["packets"] = v.number
        if v.kept:
            doc["accepted"].append(v.number)
            doc["snaplen"][str(v.number)] = v.kept
        if args.json:
            if v.dissect is not None:
                dissect.append(v.dissect)
        else:
            out.write(_text_line(v))
    if args.json:
        if args.dissect:
            doc["dissect"] = dissect
        out.write(json.dumps(doc) + "\n")
    else:
        out.write(f"{len(doc['accepted'])} of {doc['packets']} packets accepted\n")
    return 0
