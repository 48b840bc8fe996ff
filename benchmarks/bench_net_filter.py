"""Socket filter speed: packets per second of a tcpdump-compiled filter over
the generated mixed capture, on the classic interpreter and on the converted
eBPF (compiled path and interpreter). Run: python benchmarks/bench_net_filter.py"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from net.classic import run_classic  # noqa: E402
from net.filter import parse_filter, sk_attach_filter  # noqa: E402
from net.filter_helpers import SkbRunContext  # noqa: E402
from net.pktgen import mixed_frames  # noqa: E402
from net.skbuff import skb_from_ethernet  # noqa: E402

EXPRS = ["tcp port 80", "vlan and udp", "ip6 and tcp[tcpflags] & tcp-syn != 0 or icmp"]
ROUNDS = 40


def best_of(fn, n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    if shutil.which("tcpdump") is None:
        sys.exit("tcpdump is needed to compile the expressions")
    skbs = [skb_from_ethernet(f) for f in mixed_frames()] * ROUNDS
    print(f"{'expression':45} {'insns':>5} {'ebpf':>5} {'classic pkt/s':>14} "
          f"{'jit pkt/s':>10} {'interp pkt/s':>13}")
    for expr in EXPRS:
        text = subprocess.run(["tcpdump", "-ddd", "-y", "EN10MB", expr], capture_output=True,
                              text=True, check=True).stdout
        sk = sk_attach_filter(parse_filter(text))
        sk.run(skbs[0])                                # compile once
        rates = [len(skbs) / best_of(lambda: [run_classic(sk.insns, s) for s in skbs])]
        env = SkbRunContext()                          # one environment, as emu filter uses
        for engine in ("jit", "interp"):
            rates.append(len(skbs) / best_of(lambda: [sk.run(s, env, engine=engine)
                                                      for s in skbs]))
        print(f"{expr:45} {len(sk.insns):5} {len(sk.prog.insns):5} {rates[0]:14,.0f} "
              f"{rates[1]:10,.0f} {rates[2]:13,.0f}")


if __name__ == "__main__":
    main()
