"""The differential test against tcpdump: for every expression in
tests/data/net/tcpdump_expressions.txt, compiled by ``tcpdump -ddd``, the
packets of a generated capture (IPv4/IPv6, TCP/UDP/ICMP/ICMPv6, VLAN,
fragments, IP/TCP options, extension headers, GRE, ARP, truncated frames)
that the classic interpreter and the converted eBPF program (interpreter and
compiled engines) accept are exactly those ``tcpdump -r FILE -n EXPR`` prints.
The converted programs also pass the verifier."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from net.classic import run_classic
from net.filter import parse_filter, sk_attach_filter
from net.pcap import frame_to_skb, read_frames
from net.pktgen import mixed_frames, write_pcap

TCPDUMP = shutil.which("tcpdump")
pytestmark = pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed (apt install tcpdump)")
EXPRESSIONS = [line.strip() for line in
               (Path(__file__).parent / "data" / "net" / "tcpdump_expressions.txt").read_text()
               .splitlines() if line.strip() and not line.startswith("#")]
TS0 = 1_700_000_000


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("net") / "mixed.pcap"
    write_pcap(str(path), mixed_frames())
    return path


def tcpdump_accepts(pcap: Path, expr: str) -> list[int]:
    """Packet numbers tcpdump prints (its -tt timestamps are TS0 + number - 1)."""
    out = subprocess.run([TCPDUMP, "-r", str(pcap), "-n", "-tt", "--", expr], check=True,
                         capture_output=True, text=True).stdout
    stamps = [line.split()[0] for line in out.splitlines() if line[:1].isdigit()]
    return [int(float(s)) - TS0 + 1 for s in stamps]


def test_enough_expressions() -> None:
    assert len(EXPRESSIONS) >= 25


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_same_packets_as_tcpdump(capture: Path, expr: str) -> None:
    text = subprocess.run([TCPDUMP, "-ddd", "-r", str(capture), "--", expr], check=True,
                          capture_output=True, text=True).stdout
    sk = sk_attach_filter(parse_filter(text))
    sk.verify()
    expected = tcpdump_accepts(capture, expr)
    results: dict[str, list[int]] = {"classic": [], "jit": [], "interp": []}
    for frame in read_frames(str(capture)):
        skb = frame_to_skb(frame.data, 1)
        for engine in ("jit", "interp"):
            if sk.run(skb, engine=engine):
                results[engine].append(frame.number)
        if run_classic(sk.insns, skb):
            results["classic"].append(frame.number)
    assert results == {"classic": expected, "jit": expected, "interp": expected}


def test_protochain_is_refused_like_the_kernel(capture: Path) -> None:
    """libpcap's protochain loops with a backward `ja`: tcpdump filters with it in
    user space, but bpf_check_classic refuses it (jumps are unsigned, forward only)."""
    from net.filter import FilterError

    text = subprocess.run([TCPDUMP, "-ddd", "-r", str(capture), "--", "ip6 protochain 17"],
                          check=True, capture_output=True, text=True).stdout
    prog = parse_filter(text)
    with pytest.raises(FilterError) as e:
        sk_attach_filter(prog)
    assert e.value.errno == 22 and "jumps past the end" in e.value.reason
    assert prog[e.value.pc].code == 0x05 and prog[e.value.pc].k > 0x7FFFFFFF
