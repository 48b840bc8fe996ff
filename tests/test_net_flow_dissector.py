"""SKF_AD_PAY_OFFSET / bpf_skb_get_pay_offset over the flow dissector: every
protocol case of the kernel's rules against a hand-computed offset (frames
start at the Ethernet header, so the network header is at 14), through
skb_get_poff directly, the classic interpreter and the converted program on
both engines."""
from __future__ import annotations

import pytest

from net.classic import run_classic
from net.filter import BPF_A, BPF_ABS, BPF_LD, BPF_RET, BPF_W, SKF_AD_OFF, SKF_AD_PAY_OFFSET
from net.filter import sk_attach_filter
from net.flow_dissector import FlowDis, skb_flow_dissect_flow_keys, skb_get_poff
from net.pktgen import (
    ether, ext6, frag6, gre, icmp, ipv4, ipv6, tcp, udp, vlan,
)
from net.skbuff import SkBuff, skb_from_ethernet, skb_from_raw_ip

v4 = lambda proto, l4, **kw: ether(0x0800, ipv4(proto, l4, **kw))  # noqa: E731
v6 = lambda nh, l4: ether(0x86DD, ipv6(nh, l4))  # noqa: E731
UDP_IP = ipv4(17, udp(1, 2, b"pp"))
GRE_KEY, GRE_CSUM, GRE_SEQ, GRE_ROUTING, GRE_ACK = 0x2000, 0x8000, 0x1000, 0x4000, 0x0080


def _vlans(n: int) -> bytes:
    body = ipv4(6, tcp(1, 2))
    inner = 0x0800
    for _ in range(n):
        body, inner = vlan(5, inner, body), 0x8100
    return ether(0x8100, body)


# (case, frame, expected payload offset)
CASES = [
    ("ipv4 tcp", v4(6, tcp(1, 80)), 14 + 20 + 20),
    ("ipv4 options tcp", v4(6, tcp(1, 80), options=b"\x94\x04\x00\x00"), 14 + 24 + 20),
    ("tcp options (doff 7)", v4(6, tcp(1, 80, options=b"\x02\x04\x05\xb4" * 2)), 14 + 20 + 28),
    ("tcp doff 2 counts as 20", v4(6, tcp(1, 80)[:12] + b"\x20" + tcp(1, 80)[13:]), 14 + 20 + 20),
    ("tcp doff unreadable", v4(6, tcp(1, 80)[:10]), 14 + 20),
    ("tcp doff readable, header cut", v4(6, tcp(1, 80)[:13]), 14 + 20 + 20),
    ("udp", v4(17, udp(1, 2)), 14 + 20 + 8),
    ("udp-lite", v4(136, udp(1, 2)), 14 + 20 + 8),
    ("icmp", v4(1, icmp(8)), 14 + 20 + 8),
    ("igmp", v4(2, b"\x11" * 8), 14 + 20 + 8),
    ("dccp", v4(33, b"\x00" * 16), 14 + 20 + 12),
    ("sctp", v4(132, b"\x00" * 16), 14 + 20 + 12),
    ("unknown l4 (esp)", v4(50, b"\x00" * 16), 14 + 20),
    ("ipv4 first fragment", v4(17, udp(1, 2), mf=True), 14 + 20 + 8),
    ("ipv4 later fragment", v4(17, b"\x00" * 16, frag=2), 14 + 20),
    ("ipv4 last fragment", v4(6, b"\x00" * 16, frag=2, mf=False), 14 + 20),
    ("ipv4 ihl 4: cannot dissect", v4(6, tcp(1, 2), ihl=4), 0),
    ("ipv4 header cut: cannot dissect", ether(0x0800, ipv4(6, tcp(1, 2))[:19]), 0),
    ("ipv4 ihl past the end: thoff = len", v4(17, udp(1, 2), ihl=15), 14 + 28 + 8),
    ("802.1q", ether(0x8100, vlan(10, 0x0800, ipv4(6, tcp(1, 2)))), 14 + 4 + 20 + 20),
    ("802.1ad + 802.1q", ether(0x88A8, vlan(7, 0x8100, vlan(10, 0x0800, UDP_IP))),
     14 + 4 + 4 + 20 + 8),
    ("vlan tag cut: cannot dissect", ether(0x8100, b"\x00\x0a"), 0),
    ("16 tags: stops after 15 re-dissections", _vlans(16), 14 + 16 * 4),
    ("ipv6 tcp", v6(6, tcp(1, 2)), 14 + 40 + 20),
    ("ipv6 header cut: cannot dissect", ether(0x86DD, ipv6(6, tcp(1, 2))[:39]), 0),
    ("ipv6 hop-by-hop udp", v6(0, ext6(17, udp(1, 2))), 14 + 40 + 8 + 8),
    ("ipv6 routing (24 bytes) tcp", v6(43, ext6(6, tcp(1, 2), units=2)), 14 + 40 + 24 + 20),
    ("ipv6 dest opts icmpv6", v6(60, ext6(58, icmp(128))), 14 + 40 + 8 + 8),
    ("ipv6 hop-by-hop + dest opts tcp", v6(0, ext6(60, ext6(6, tcp(1, 2)))),
     14 + 40 + 8 + 8 + 20),
    ("ipv6 ext header cut: cannot dissect", ether(0x86DD, ipv6(0, b"\x11")), 0),
    ("ipv6 first fragment", v6(44, frag6(17, udp(1, 2), more=True)), 14 + 40 + 8 + 8),
    ("ipv6 later fragment", v6(44, frag6(17, b"\x00" * 8, offset=4)), 14 + 40 + 8),
    ("icmpv6", v6(58, icmp(128)), 14 + 40 + 8),
    ("gre v0 ip", v4(47, gre(0x0800, ipv4(6, tcp(1, 2)))), 14 + 20 + 4 + 20 + 20),
    ("gre csum key seq", v4(47, gre(0x0800, UDP_IP, GRE_CSUM | GRE_KEY | GRE_SEQ, b"\0" * 12)),
     14 + 20 + 16 + 20 + 8),
    ("gre teb", v4(47, gre(0x6558, ether(0x0800, UDP_IP))), 14 + 20 + 4 + 14 + 20 + 8),
    ("gre routing: stop at gre", v4(47, gre(0x0800, UDP_IP, GRE_ROUTING)), 14 + 20),
    ("gre version 2: stop at gre", v4(47, gre(0x0800, UDP_IP, 2)), 14 + 20),
    ("gre v1 pptp ppp ip", v4(47, gre(0x880B, b"\xff\x03\x00\x21" + UDP_IP,
                                      GRE_KEY | GRE_SEQ | GRE_ACK | 1, b"\0" * 12)),
     14 + 20 + 20 + 20 + 8),
    ("gre v1 without key: stop at gre", v4(47, gre(0x880B, UDP_IP, 1)), 14 + 20),
    ("gre key cut: cannot dissect", v4(47, gre(0x0800, b"", GRE_KEY)), 0),
    ("ipip", v4(4, UDP_IP), 14 + 20 + 20 + 8),
    ("ipv6 in ipv4", v4(41, ipv6(17, udp(1, 2))), 14 + 20 + 40 + 8),
    ("mpls bottom of stack", ether(0x8847, b"\x00\x01\x01\x40" + UDP_IP), 14 + 4),
    ("mpls two labels", ether(0x8847, b"\x00\x01\x00\x40\x00\x02\x01\x40" + UDP_IP), 14 + 8),
    ("pppoe ipv4 udp", ether(0x8864, b"\x11\x00\x00\x01\x00\x2a\x00\x21" + UDP_IP),
     14 + 8 + 20 + 8),
    ("pppoe lcp: valid ppp, stops there", ether(0x8864, b"\x11\x00\x00\x01\x00\x2a\xc0\x21"),
     14 + 8),
    ("pppoe bad version: cannot dissect", ether(0x8864, b"\x21\x00\x00\x01\x00\x2a\x00\x21"
                                                        + UDP_IP), 0),
    ("pppoe invalid ppp protocol", ether(0x8864, b"\x11\x00\x00\x01\x00\x2a\x00\x20"), 0),
    ("arp: thoff at the arp header", ether(0x0806, b"\x00" * 28), 14),
    ("unknown ethertype: cannot dissect", ether(0x88B5, b"\x00" * 40), 0),
    ("802.3 llc: cannot dissect", ether(0x0030, b"\xaa\xaa\x03" + b"\x00" * 45), 0),
]


def _poff_filter():
    return sk_attach_filter([(BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PAY_OFFSET)
                              & 0xFFFFFFFF), (BPF_RET | BPF_A, 0, 0, 0)])


@pytest.mark.parametrize("frame,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pay_offset(frame: bytes, expected: int) -> None:
    skb = skb_from_ethernet(frame)
    assert skb_get_poff(skb) == expected
    sk = _poff_filter()
    assert run_classic(sk.insns, skb) == expected
    assert sk.run(skb, engine="jit") == sk.run(skb, engine="interp") == expected


def test_hardware_vlan_tag_is_not_in_the_data() -> None:
    """A tag the NIC stripped (vlan_all set): proto = vlan_proto, no bytes skipped."""
    skb = skb_from_ethernet(v4(6, tcp(1, 2)), vlan_proto=0x8100, vlan_tci=10)
    ok, keys = skb_flow_dissect_flow_keys(skb)
    assert ok and keys.vlan_id == 10 and keys.thoff == 34
    assert skb_get_poff(skb) == 54


def test_raw_ip_link() -> None:
    skb = skb_from_raw_ip(ipv4(6, tcp(1, 2)))
    assert skb_get_poff(skb) == 40


def test_keys() -> None:
    ok, keys = skb_flow_dissect_flow_keys(skb_from_ethernet(v4(17, udp(53, 5353),
                                                              src="10.1.2.3")))
    assert ok and (keys.n_proto, keys.ip_proto, keys.thoff) == (0x0800, 17, 34)
    assert keys.src == bytes([10, 1, 2, 3]) and keys.ports == (53, 5353)
    ok, keys = skb_flow_dissect_flow_keys(skb_from_ethernet(v4(17, b"\0" * 8, frag=1)))
    assert ok and keys.flags == FlowDis.IS_FRAGMENT and keys.ports == (0, 0)
    ok, keys = skb_flow_dissect_flow_keys(skb_from_ethernet(v4(47, gre(0x0800, UDP_IP))))
    assert ok and keys.flags & FlowDis.ENCAPSULATION and keys.n_proto == 0x0800
    ok, keys = skb_flow_dissect_flow_keys(SkBuff(b"", protocol=0x0800, network_header=0))
    assert not ok and keys.thoff == 0
