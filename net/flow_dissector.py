"""The flow dissector behind skb_get_poff (net/core/flow_dissector.c, 6.12).

``skb_flow_dissect_flow_keys`` walks the headers from the network offset
with the kernel's rules and the keys of ``flow_keys_dissector`` (control,
basic, addresses, ports, VLAN, flow label); ``skb_get_poff`` is what
SKF_AD_PAY_OFFSET / bpf_skb_get_pay_offset returns. Left out: the BPF flow
dissector hook, DSA tags, TIPC, FCoE, batman-adv, hsr, ARP keys (ARP stops
with thoff at the ARP header), the MPLS entropy key and the hash.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from .skbuff import (
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_MC,
    ETH_P_MPLS_UC, ETH_P_PPP_SES, ETH_P_TEB, SkBuff,
)

MAX_FLOW_DISSECT_HDRS = 15
ETH_P_RARP = 0x8035
GRE_PROTO_PPP = 0x880B
PPP_IP, PPP_IPV6, PPP_MPLS_UC, PPP_MPLS_MC = 0x21, 0x57, 0x281, 0x283
PPPOE_SES_HLEN = 8

IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_IGMP, IPPROTO_IPIP, IPPROTO_TCP = 0, 1, 2, 4, 6
IPPROTO_UDP, IPPROTO_IPV6, IPPROTO_ROUTING, IPPROTO_FRAGMENT = 17, 41, 43, 44
IPPROTO_DCCP, IPPROTO_GRE, IPPROTO_ICMPV6, IPPROTO_DSTOPTS = 33, 47, 58, 60
IPPROTO_SCTP, IPPROTO_UDPLITE, IPPROTO_MPLS = 132, 136, 137
IP_MF, IP_OFFSET = 0x2000, 0x1FFF
IP6_OFFSET = 0xFFF8
GRE_CSUM, GRE_ROUTING, GRE_KEY, GRE_SEQ, GRE_ACK, GRE_VERSION = (
    0x8000, 0x4000, 0x2000, 0x1000, 0x0080, 0x0007)
MPLS_LS_S_MASK = 0x100

# __skb_get_poff: transport header sizes past thoff (TCP is read from doff)
L4_HEADER_SIZE = {IPPROTO_UDP: 8, IPPROTO_UDPLITE: 8, IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 8,
                  IPPROTO_IGMP: 8, IPPROTO_DCCP: 12, IPPROTO_SCTP: 12}
# proto_ports_offset: where the port pair sits in the transport header
_PORTS_AT = {IPPROTO_TCP: 0, IPPROTO_UDP: 0, IPPROTO_DCCP: 0, IPPROTO_SCTP: 0,
             IPPROTO_UDPLITE: 0, 51: 4}


class FlowDissectRet(IntEnum):
    """enum flow_dissect_ret."""

    OUT_GOOD = 0
    OUT_BAD = 1
    PROTO_AGAIN = 2
    IPPROTO_AGAIN = 3
    CONTINUE = 4


class FlowDis(IntFlag):
    """FLOW_DIS_* control flags."""

    IS_FRAGMENT = 1 << 0
    FIRST_FRAG = 1 << 1
    ENCAPSULATION = 1 << 2


@dataclass
class FlowKeys:
    """struct flow_keys, reduced. ``src``/``dst`` are the raw address bytes
    (4 or 16), ``ports`` (sport, dport) host order, ``vlan_id`` None without
    a tag. ``thoff`` is the transport header offset from skb->data."""

    thoff: int = 0
    flags: FlowDis = FlowDis(0)
    n_proto: int = 0
    ip_proto: int = 0
    src: bytes = b""
    dst: bytes = b""
    ports: tuple[int, int] = (0, 0)
    vlan_id: int | None = None
    flow_label: int = 0


@dataclass
class _Walk:
    """The dissector's running state: ``proto`` (host order), ``nhoff``."""

    skb: SkBuff
    keys: FlowKeys
    proto: int
    nhoff: int
    ip_proto: int = 0
    vlans: int = 0
    num_hdrs: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def get(self, off: int, size: int) -> bytes | None:
        return self.skb.header_pointer(off, size)

    def allowed(self) -> bool:
        """skb_flow_dissect_allowed: at most 15 headers re-dissected."""
        self.num_hdrs += 1
        return self.num_hdrs <= MAX_FLOW_DISSECT_HDRS


# --- the ethertype layer ------------------------------------------------------------------

def _ipv4(w: _Walk) -> FlowDissectRet:
    iph = w.get(w.nhoff, 20)
    if iph is None or iph[0] & 0x0F < 5:
        return FlowDissectRet.OUT_BAD
    w.nhoff += (iph[0] & 0x0F) * 4
    w.ip_proto = iph[9]
    w.keys.src, w.keys.dst = iph[12:16], iph[16:20]
    frag_off = int.from_bytes(iph[6:8], "big")
    if frag_off & (IP_MF | IP_OFFSET):
        w.keys.flags |= FlowDis.IS_FRAGMENT
        if not frag_off & IP_OFFSET:
            w.keys.flags |= FlowDis.FIRST_FRAG
        return FlowDissectRet.OUT_GOOD   # no FLOW_DISSECTOR_F_PARSE_1ST_FRAG
    return FlowDissectRet.CONTINUE


def _ipv6(w: _Walk) -> FlowDissectRet:
    iph = w.get(w.nhoff, 40)
    if iph is None:
        return FlowDissectRet.OUT_BAD
    w.ip_proto = iph[6]
    w.nhoff += 40
    w.keys.src, w.keys.dst = iph[8:24], iph[24:40]
    w.keys.flow_label = int.from_bytes(iph[0:4], "big") & 0xFFFFF
    return FlowDissectRet.CONTINUE


def _vlan(w: _Walk) -> FlowDissectRet:
    if w.vlans == 0 and w.skb.vlan_tag_present():
        w.proto = w.skb.protocol          # the hardware tag: nothing to skip in the data
        w.keys.vlan_id = w.skb.vlan_tci & 0xFFF
    else:
        vlan = w.get(w.nhoff, 4)
        if vlan is None:
            return FlowDissectRet.OUT_BAD
        w.proto = int.from_bytes(vlan[2:4], "big")
        w.nhoff += 4
        if w.vlans == 0:
            w.keys.vlan_id = int.from_bytes(vlan[0:2], "big") & 0xFFF
    w.vlans += 1
    return FlowDissectRet.PROTO_AGAIN


def _pppoe(w: _Walk) -> FlowDissectRet:
    """PPPoE session: version 1, type 1, code 0; IP, IPv6 and MPLS continue,
    another valid PPP protocol stops there, anything else cannot be dissected.
    A compressed (one-byte) protocol field is read as 6.12 reads it (the PFC
    handling later stable kernels dropped)."""
    hdr = w.get(w.nhoff, PPPOE_SES_HLEN)
    if hdr is None or hdr[0] != 0x11 or hdr[1] != 0:
        return FlowDissectRet.OUT_BAD
    ppp_proto = int.from_bytes(hdr[6:8], "big")
    if ppp_proto & 0x0100:
        ppp_proto >>= 8
        w.nhoff += PPPOE_SES_HLEN - 1
    else:
        w.nhoff += PPPOE_SES_HLEN
    inner = {PPP_IP: ETH_P_IP, PPP_IPV6: ETH_P_IPV6, PPP_MPLS_UC: ETH_P_MPLS_UC,
             PPP_MPLS_MC: ETH_P_MPLS_MC}.get(ppp_proto)
    if inner is not None:
        w.proto = inner
        return FlowDissectRet.PROTO_AGAIN
    if ppp_proto & 0x0101 == 0x0001:                     # ppp_proto_is_valid
        return FlowDissectRet.OUT_GOOD
    return FlowDissectRet.OUT_BAD


def _mpls(w: _Walk) -> FlowDissectRet:
    hdr = w.get(w.nhoff, 4)
    if hdr is None:
        return FlowDissectRet.OUT_BAD
    w.nhoff += 4
    if int.from_bytes(hdr, "big") & MPLS_LS_S_MASK:
        return FlowDissectRet.OUT_GOOD   # bottom of the label stack
    return FlowDissectRet.PROTO_AGAIN


def _arp(w: _Walk) -> FlowDissectRet:
    return FlowDissectRet.OUT_GOOD       # no ARP key in flow_keys_dissector


_BY_PROTO = {ETH_P_IP: _ipv4, ETH_P_IPV6: _ipv6, ETH_P_8021Q: _vlan, ETH_P_8021AD: _vlan,
             ETH_P_PPP_SES: _pppoe, ETH_P_MPLS_UC: _mpls, ETH_P_MPLS_MC: _mpls,
             ETH_P_ARP: _arp, ETH_P_RARP: _arp}


# --- the IP protocol layer ----------------------------------------------------------------

def _gre(w: _Walk) -> FlowDissectRet:
    """__skb_flow_dissect_gre: versions 0 and 1 (PPTP) without routing."""
    hdr = w.get(w.nhoff, 4)
    if hdr is None:
        return FlowDissectRet.OUT_BAD
    flags, proto = int.from_bytes(hdr[0:2], "big"), int.from_bytes(hdr[2:4], "big")
    version = flags & GRE_VERSION
    if flags & GRE_ROUTING or version > 1:
        return FlowDissectRet.OUT_GOOD
    if version == 1 and not (proto == GRE_PROTO_PPP and flags & GRE_KEY):
        return FlowDissectRet.OUT_GOOD
    offset = 4
    if flags & GRE_CSUM:
        offset += 4
    if flags & GRE_KEY:
        if w.get(w.nhoff + offset, 4) is None:
            return FlowDissectRet.OUT_BAD
        offset += 4
    if flags & GRE_SEQ:
        offset += 4
    if version == 0:
        if proto == ETH_P_TEB:
            eth = w.get(w.nhoff + offset, 14)
            if eth is None:
                return FlowDissectRet.OUT_BAD
            proto = int.from_bytes(eth[12:14], "big")
            offset += 14
    else:
        if flags & GRE_ACK:
            offset += 4
        ppp = w.get(w.nhoff + offset, 4)
        if ppp is None:
            return FlowDissectRet.OUT_BAD
        proto = {PPP_IP: ETH_P_IP, PPP_IPV6: ETH_P_IPV6}.get(
            int.from_bytes(ppp[2:4], "big"), proto)
        offset += 4
    w.proto = proto
    w.nhoff += offset
    w.keys.flags |= FlowDis.ENCAPSULATION
    return FlowDissectRet.PROTO_AGAIN


def _ipv6_opthdr(w: _Walk) -> FlowDissectRet:
    if w.proto != ETH_P_IPV6:
        return FlowDissectRet.CONTINUE
    opt = w.get(w.nhoff, 2)
    if opt is None:
        return FlowDissectRet.OUT_BAD
    w.ip_proto = opt[0]
    w.nhoff += (opt[1] + 1) << 3
    return FlowDissectRet.IPPROTO_AGAIN


def _ipv6_frag(w: _Walk) -> FlowDissectRet:
    if w.proto != ETH_P_IPV6:
        return FlowDissectRet.CONTINUE
    fh = w.get(w.nhoff, 8)
    if fh is None:
        return FlowDissectRet.OUT_BAD
    w.keys.flags |= FlowDis.IS_FRAGMENT
    w.nhoff += 8
    w.ip_proto = fh[0]
    if not int.from_bytes(fh[2:4], "big") & IP6_OFFSET:
        w.keys.flags |= FlowDis.FIRST_FRAG
    return FlowDissectRet.OUT_GOOD


def _encap(proto: int):
    def again(w: _Walk) -> FlowDissectRet:
        w.proto = proto
        w.keys.flags |= FlowDis.ENCAPSULATION
        return FlowDissectRet.PROTO_AGAIN
    return again


_BY_IP_PROTO = {IPPROTO_GRE: _gre, IPPROTO_HOPOPTS: _ipv6_opthdr, IPPROTO_ROUTING: _ipv6_opthdr,
                IPPROTO_DSTOPTS: _ipv6_opthdr, IPPROTO_FRAGMENT: _ipv6_frag,
                IPPROTO_IPIP: _encap(ETH_P_IP), IPPROTO_IPV6: _encap(ETH_P_IPV6),
                IPPROTO_MPLS: _encap(ETH_P_MPLS_UC)}


def _ports(w: _Walk) -> None:
    at = _PORTS_AT.get(w.ip_proto)
    if at is None or w.keys.flags & FlowDis.IS_FRAGMENT:
        return
    raw = w.get(w.nhoff + at, 4)
    if raw is not None:
        w.keys.ports = (int.from_bytes(raw[0:2], "big"), int.from_bytes(raw[2:4], "big"))


# --- the walk -----------------------------------------------------------------------------

def _dissect(w: _Walk) -> bool:
    """The proto_again / ip_proto_again loop; True for out_good."""
    while True:                                          # proto_again
        step = _BY_PROTO.get(w.proto)
        ret = step(w) if step else FlowDissectRet.OUT_BAD
        if ret == FlowDissectRet.OUT_GOOD:
            return True
        if ret == FlowDissectRet.OUT_BAD:
            return False
        if ret == FlowDissectRet.PROTO_AGAIN:
            if w.allowed():
                continue
            return True
        while True:                                      # ip_proto_again
            step = _BY_IP_PROTO.get(w.ip_proto)
            ret = step(w) if step else FlowDissectRet.CONTINUE
            _ports(w)
            if ret == FlowDissectRet.IPPROTO_AGAIN and w.allowed():
                continue
            break
        if ret == FlowDissectRet.PROTO_AGAIN and w.allowed():
            continue
        return ret != FlowDissectRet.OUT_BAD


def skb_flow_dissect_flow_keys(skb: SkBuff, flags: int = 0) -> tuple[bool, FlowKeys]:
    """__skb_flow_dissect with flow_keys_dissector: (dissected, keys)."""
    del flags  # only the flags-0 path (skb_get_poff's) is modelled
    keys = FlowKeys()
    proto = skb.vlan_proto if skb.vlan_tag_present() else skb.protocol
    w = _Walk(skb, keys, proto, skb.network_header)
    ok = _dissect(w)
    if w.nhoff > 0xFFFF:                                 # thoff is a u16
        ok = False
    keys.thoff = min(w.nhoff, skb.len) & 0xFFFF
    keys.n_proto, keys.ip_proto = w.proto, w.ip_proto
    return ok, keys


def __skb_get_poff(skb: SkBuff, keys: FlowKeys) -> int:
    """The payload offset past the transport header the keys point at."""
    poff = keys.thoff
    if keys.flags & FlowDis.IS_FRAGMENT and not keys.flags & FlowDis.FIRST_FRAG:
        return poff                       # later fragments carry no L4 header
    if keys.ip_proto == IPPROTO_TCP:
        doff = skb.header_pointer(poff + 12, 1)
        if doff is None:
            return poff
        return poff + max(20, (doff[0] & 0xF0) >> 2)
    return poff + L4_HEADER_SIZE.get(keys.ip_proto, 0)


def skb_get_poff(skb: SkBuff) -> int:
    """skb_get_poff: 0 when the packet cannot be dissected."""
    ok, keys = skb_flow_dissect_flow_keys(skb)
    if not ok:
        return 0
    return __skb_get_poff(skb, keys) & 0xFFFFFFFF
