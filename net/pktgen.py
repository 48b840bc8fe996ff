"""Deterministic packet builders for tests and demos, and a pcap writer (dpkt).

Headers are packed by hand so a test knows every offset; checksums are left
zero (neither filters nor the flow dissector read them). ``mixed_frames``
is the corpus the differential tests run tcpdump and our engines over.
"""
from __future__ import annotations

import struct

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
BROADCAST = b"\xff" * 6
MCAST6 = bytes.fromhex("333300000001")


def ip4(text: str) -> bytes:
    return bytes(int(p) for p in text.split("."))


def ip6(last: int, prefix: str = "2001:db8::") -> bytes:
    import ipaddress
    return (int(ipaddress.IPv6Address(prefix)) + last).to_bytes(16, "big")


def ether(ethertype: int, payload: bytes, dst: bytes = MAC_B, src: bytes = MAC_A) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


def vlan(vid: int, ethertype: int, payload: bytes, tpid: int = 0x8100, prio: int = 0) -> bytes:
    """An 802.1Q/802.1ad tag body: TCI, inner ethertype, payload (the outer
    ethertype, ``tpid``, is the caller's)."""
    return struct.pack(">HH", (prio << 13) | vid, ethertype) + payload


def ipv4(proto: int, payload: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2",
         options: bytes = b"", frag: int = 0, mf: bool = False, df: bool = False,
         ttl: int = 64, ihl: int | None = None) -> bytes:
    options += b"\x00" * (-len(options) % 4)
    hl = ihl if ihl is not None else 5 + len(options) // 4
    flags = (0x2000 if mf else 0) | (0x4000 if df else 0) | (frag & 0x1FFF)
    total = 20 + len(options) + len(payload)
    return struct.pack(">BBHHHBBH4s4s", 0x40 | hl, 0, total, 0x1234, flags, ttl, proto, 0,
                       ip4(src), ip4(dst)) + options + payload


def ipv6(nexthdr: int, payload: bytes, src: int = 1, dst: int = 2, hlim: int = 64) -> bytes:
    return struct.pack(">IHBB16s16s", 0x60000000, len(payload), nexthdr, hlim, ip6(src),
                       ip6(dst)) + payload


def ext6(nexthdr: int, payload: bytes, units: int = 0) -> bytes:
    """A hop-by-hop/routing/destination header of (units+1)*8 bytes."""
    return struct.pack(">BB", nexthdr, units) + b"\x01\x04" + b"\x00" * (4 + 8 * units) + payload


def frag6(nexthdr: int, payload: bytes, offset: int = 0, more: bool = False) -> bytes:
    return struct.pack(">BBHI", nexthdr, 0, (offset << 3) | int(more), 0xABCD) + payload


def tcp(sport: int, dport: int, flags: int = 0x02, payload: bytes = b"",
        options: bytes = b"") -> bytes:
    options += b"\x01" * (-len(options) % 4)
    doff = 5 + len(options) // 4
    return struct.pack(">HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, 8192, 0, 0) \
        + options + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(type_: int, code: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">BBHHH", type_, code, 0, 1, 1) + payload


def gre(proto: int, payload: bytes, flags: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack(">HH", flags, proto) + extra + payload


FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def _v4(proto: int, l4: bytes, **kw: object) -> bytes:
    return ether(0x0800, ipv4(proto, l4, **kw))  # type: ignore[arg-type]


def _v6(nexthdr: int, l4: bytes, **kw: int) -> bytes:
    return ether(0x86DD, ipv6(nexthdr, l4, **kw))


def _ipv4_frames() -> list[bytes]:
    """TCP with every flag and options, UDP, ICMP, fragments, IP options."""
    f = [_v4(6, tcp(40000 + i, port, flags, b"x" * size), src=src, dst=dst)
         for i, (port, flags, size, src, dst) in enumerate([
             (80, SYN, 0, "10.0.0.1", "10.0.0.2"), (80, SYN | ACK, 0, "10.0.0.2", "10.0.0.1"),
             (443, ACK | PSH, 100, "192.168.1.5", "10.0.0.2"), (22, ACK, 10, "10.0.0.1", "8.8.8.8"),
             (8080, FIN | ACK, 0, "172.16.3.4", "192.168.1.9"), (25, RST, 0, "10.0.1.1", "10.0.0.2"),
             (1023, URG | ACK, 1400, "192.168.1.5", "192.168.2.5")])]
    f.append(_v4(6, tcp(1234, 80, ACK, b"opt", options=b"\x02\x04\x05\xb4\x01\x03\x03\x07")))
    f.append(_v4(6, tcp(5555, 21, SYN), options=b"\x94\x04\x00\x00"))         # router alert
    f += [_v4(17, udp(5353, port, b"y" * size), src=src, dst=dst) for port, size, src, dst in [
        (53, 30, "10.0.0.1", "8.8.8.8"), (123, 48, "192.168.1.5", "10.0.0.2"),
        (5000, 0, "10.0.0.3", "10.0.0.255"), (5004, 500, "172.16.3.4", "10.0.0.1")]]
    f += [_v4(1, icmp(t)) for t in (8, 0, 3, 11)]
    f.append(_v4(17, udp(7000, 7001, b"z" * 24), mf=True))                    # first fragment
    f.append(_v4(17, b"z" * 24, frag=3, mf=True))                             # middle fragment
    f.append(_v4(17, b"z" * 16, frag=6))                                      # last fragment
    f.append(_v4(6, tcp(80, 9999, ACK, b"df"), df=True))
    return f


def _vlan_and_ipv6_frames() -> list[bytes]:
    f = [ether(0x8100, vlan(10, 0x0800, ipv4(6, tcp(3333, 80, SYN)))),
         ether(0x8100, vlan(20, 0x0800, ipv4(17, udp(53, 53, b"q" * 12), src="10.9.9.9"))),
         ether(0x8100, vlan(30, 0x86DD, ipv6(17, udp(546, 547)))),
         ether(0x88A8, vlan(100, 0x8100, vlan(10, 0x0800, ipv4(6, tcp(1, 80, ACK)))))]
    f += [_v6(6, tcp(50000, port, flags, b"w" * size)) for port, flags, size in [
        (80, SYN, 0), (443, ACK | PSH, 64), (22, FIN | ACK, 0)]]
    f.append(_v6(17, udp(5353, 5353, b"m" * 20), dst=0xFB))
    f += [_v6(58, icmp(t)) for t in (128, 129, 135, 1)]
    f.append(_v6(0, ext6(17, udp(1111, 53, b"h" * 4))))                       # hop-by-hop
    f.append(_v6(43, ext6(6, tcp(2222, 80, SYN), units=2)))                    # routing header
    f.append(_v6(60, ext6(58, icmp(128))))                                    # destination opts
    f.append(_v6(44, frag6(17, udp(3333, 53, b"f" * 16), more=True)))          # first fragment
    f.append(_v6(44, frag6(17, b"f" * 16, offset=3)))                         # later fragment
    return f


def _other_frames() -> list[bytes]:
    """Tunnels, ARP, truncated and unknown frames, multicast."""
    return [
        _v4(47, gre(0x0800, ipv4(6, tcp(4444, 80, SYN), src="10.5.5.5"))),
        _v4(47, gre(0x6558, ether(0x0800, ipv4(17, udp(1, 2))))),               # GRE TEB
        _v4(4, ipv4(17, udp(9, 9, b"i" * 3), src="10.7.7.7")),                  # IP in IP
        ether(0x0806, bytes.fromhex("0001080006040001") + MAC_A + ip4("10.0.0.1")
              + b"\x00" * 6 + ip4("10.0.0.2"), dst=BROADCAST),
        ether(0x0800, ipv4(6, tcp(80, 81))[:30]),                                # truncated TCP
        ether(0x0800, ipv4(17, udp(1, 2))[:12]),                                 # short IPv4
        ether(0x88B5, b"\x00" * 40),                                             # unknown type
        ether(0x0800, ipv4(17, udp(5353, 5353), dst="224.0.0.251"),
              dst=bytes.fromhex("01005e0000fb")),
    ]


def mixed_frames() -> list[bytes]:
    """Ethernet frames of many kinds: IPv4/IPv6, TCP/UDP/ICMP/ICMPv6, VLAN,
    fragments, IP and TCP options, extension headers, GRE, ARP, truncated."""
    return _ipv4_frames() + _vlan_and_ipv6_frames() + _other_frames()


def write_pcap(path: str, frames: list[bytes], snaplen: int = 65535, linktype: int = 1) -> None:
    """A classic pcap with one-second timestamps (deterministic)."""
    import dpkt

    with open(path, "wb") as out:
        w = dpkt.pcap.Writer(out, snaplen=snaplen, linktype=linktype)
        for i, frame in enumerate(frames):
            w.writepkt(frame, ts=1_700_000_000 + i)
