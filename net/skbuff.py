"""The socket buffer a filter runs on (include/linux/skbuff.h, net/ethernet/eth.c).

A linear ``SkBuff`` built from one captured frame as a packet socket sees it:
``data`` starts at the MAC header, ``protocol`` and ``pkt_type`` are what
``eth_type_trans`` sets, the network header follows the link header. Left
out: paged data (``data_len`` is always 0 here, so headlen == len), headroom,
the socket, checksums and GSO state.

``ctx_image`` lays the skb out for a BPF program: the uapi ``struct
__sk_buff`` (the view the verifier checks; ``data``/``data_end`` hold the
packet's machine address) followed by a model-only tail for what converted
classic programs read from the kernel's ``struct sk_buff`` and ``struct
net_device`` that ``__sk_buff`` lacks (``data_len``, whether there is a device,
``dev->type``).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Packet types (uapi linux/if_packet.h)
PACKET_HOST = 0
PACKET_BROADCAST = 1
PACKET_MULTICAST = 2
PACKET_OTHERHOST = 3
PACKET_OUTGOING = 4

# Ethertypes (uapi linux/if_ether.h), host order
ETH_P_802_3 = 0x0001
ETH_P_802_2 = 0x0004
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_IPV6 = 0x86DD
ETH_P_PPP_SES = 0x8864
ETH_P_MPLS_UC = 0x8847
ETH_P_MPLS_MC = 0x8848
ETH_P_8021AD = 0x88A8
ETH_P_TEB = 0x6558
ETH_P_802_3_MIN = 0x0600
ETH_HLEN = 14

ARPHRD_ETHER = 1
ARPHRD_NONE = 0xFFFE

# Negative offsets of classic loads (uapi linux/filter.h)
SKF_NET_OFF = -0x100000
SKF_LL_OFF = -0x200000

# struct __sk_buff (uapi linux/bpf.h) offsets the machine fills in
SKB_LEN_OFF = 0
SKB_PKT_TYPE_OFF = 4
SKB_MARK_OFF = 8
SKB_QUEUE_MAPPING_OFF = 12
SKB_PROTOCOL_OFF = 16
SKB_VLAN_PRESENT_OFF = 20
SKB_VLAN_TCI_OFF = 24
SKB_VLAN_PROTO_OFF = 28
SKB_IFINDEX_OFF = 40
SKB_HASH_OFF = 68
SKB_DATA_OFF = 76
SKB_DATA_END_OFF = 80
SK_BUFF_UAPI_SIZE = 192
# The model-only tail (kernel struct sk_buff / net_device fields)
SKB_DATA_LEN_OFF = 192      # u32 skb->data_len
SKB_DEV_OFF = 196           # u32: non-zero when skb->dev is set (the kernel tests the pointer)
SKB_DEV_TYPE_OFF = 200      # u16 dev->type (ARPHRD_*)
SKB_CTX_SIZE = 208


@dataclass
class NetDevice:
    """struct net_device, reduced: ``ifindex`` and ``type`` (ARPHRD_*)."""

    ifindex: int = 1
    type: int = ARPHRD_ETHER


@dataclass
class SkBuff:
    """struct sk_buff, reduced to what filters and the flow dissector read.

    ``data`` is the linear buffer starting at skb->data; ``protocol`` is
    host order (the kernel keeps it big-endian); ``mac_header`` and
    ``network_header`` are offsets from data (``mac_header`` None = not set);
    ``vlan_proto``/``vlan_tci`` are the hardware-accelerated tag (``vlan_all``
    zero = none); ``dev`` None means no device.
    """

    data: bytes
    protocol: int = ETH_P_IP
    pkt_type: int = PACKET_HOST
    mark: int = 0
    queue_mapping: int = 0
    hash: int = 0
    vlan_proto: int = 0
    vlan_tci: int = 0
    mac_header: int | None = 0
    network_header: int = ETH_HLEN
    dev: NetDevice | None = field(default_factory=NetDevice)

    @property
    def len(self) -> int:
        return len(self.data)

    @property
    def data_len(self) -> int:
        return 0

    @property
    def headlen(self) -> int:
        return self.len - self.data_len

    @property
    def vlan_all(self) -> int:
        return (self.vlan_proto << 16) | self.vlan_tci

    def vlan_tag_present(self) -> bool:
        return self.vlan_all != 0

    def header_pointer(self, offset: int, size: int) -> bytes | None:
        """skb_header_pointer: ``size`` bytes at ``offset``, or None if outside."""
        if offset < 0 or offset + size > self.len:
            return None
        return self.data[offset:offset + size]

    def ctx_image(self, packet_addr: int) -> bytearray:
        """The context a BPF program gets: __sk_buff plus the model tail."""
        buf = bytearray(SKB_CTX_SIZE)
        put = struct.pack_into
        put("<I", buf, SKB_LEN_OFF, self.len)
        put("<I", buf, SKB_PKT_TYPE_OFF, self.pkt_type)
        put("<I", buf, SKB_MARK_OFF, self.mark & 0xFFFFFFFF)
        put("<I", buf, SKB_QUEUE_MAPPING_OFF, self.queue_mapping & 0xFFFF)
        # protocol and vlan_proto are __be16 in the kernel: the u16 in memory is big-endian
        put(">H", buf, SKB_PROTOCOL_OFF, self.protocol & 0xFFFF)
        put("<I", buf, SKB_VLAN_PRESENT_OFF, int(self.vlan_tag_present()))
        put("<I", buf, SKB_VLAN_TCI_OFF, self.vlan_tci & 0xFFFF)
        put(">H", buf, SKB_VLAN_PROTO_OFF, self.vlan_proto & 0xFFFF)
        put("<I", buf, SKB_IFINDEX_OFF, self.dev.ifindex if self.dev else 0)
        put("<I", buf, SKB_HASH_OFF, self.hash & 0xFFFFFFFF)
        put("<I", buf, SKB_DATA_OFF, packet_addr)
        put("<I", buf, SKB_DATA_END_OFF, packet_addr + self.len)
        put("<I", buf, SKB_DATA_LEN_OFF, self.data_len)
        put("<I", buf, SKB_DEV_OFF, 1 if self.dev else 0)
        put("<H", buf, SKB_DEV_TYPE_OFF, self.dev.type if self.dev else 0)
        return buf


def eth_type_trans(frame: bytes) -> tuple[int, int]:
    """(protocol, pkt_type) for an Ethernet frame, as net/ethernet/eth.c
    decides them (a receiver whose own address is not known: unicast is HOST)."""
    if len(frame) < ETH_HLEN:
        return ETH_P_802_2, PACKET_HOST
    dest = frame[:6]
    pkt_type = PACKET_HOST
    if dest[0] & 1:
        pkt_type = PACKET_BROADCAST if dest == b"\xff" * 6 else PACKET_MULTICAST
    proto = int.from_bytes(frame[12:14], "big")
    if proto >= ETH_P_802_3_MIN:
        return proto, pkt_type
    # 802.3 frames: raw IPX ("\xff\xff") or 802.2 LLC
    if frame[14:16] == b"\xff\xff":
        return ETH_P_802_3, pkt_type
    return ETH_P_802_2, pkt_type


def skb_from_ethernet(frame: bytes, **fields: object) -> SkBuff:
    """The skb an AF_PACKET socket filter sees for a received Ethernet frame."""
    protocol, pkt_type = eth_type_trans(frame)
    kw: dict[str, object] = {"protocol": protocol, "pkt_type": pkt_type, "mac_header": 0,
                             "network_header": ETH_HLEN}
    kw.update(fields)
    return SkBuff(bytes(frame), **kw)  # type: ignore[arg-type]


def skb_from_raw_ip(packet: bytes, **fields: object) -> SkBuff:
    """An skb for a link without a header (DLT_RAW, tun): the version nibble
    gives the protocol; the MAC header is at the network header."""
    version = packet[0] >> 4 if packet else 0
    protocol = {4: ETH_P_IP, 6: ETH_P_IPV6}.get(version, 0)
    kw: dict[str, object] = {"protocol": protocol, "dev": NetDevice(type=ARPHRD_NONE),
                             "mac_header": 0, "network_header": 0}
    kw.update(fields)
    return SkBuff(bytes(packet), **kw)  # type: ignore[arg-type]


def load_offset(skb: SkBuff, offset: int) -> int | None:
    """bpf_skb_load_helper_convert_offset: a classic load offset (an int)
    relative to skb->data, or None (INT_MIN in the kernel) when it is below
    SKF_LL_OFF or the MAC header is unset."""
    if offset >= 0:
        return offset
    if offset >= SKF_NET_OFF:
        return offset - SKF_NET_OFF + skb.network_header
    if offset >= SKF_LL_OFF and skb.mac_header is not None:
        return offset - SKF_LL_OFF + skb.mac_header
    return None


def skb_load(skb: SkBuff, offset: int, size: int) -> int | None:
    """bpf_skb_load_helper_{8,16,32}: a big-endian load, None for -EFAULT."""
    off = load_offset(skb, offset)
    if off is None:
        return None
    raw = skb.header_pointer(off, size)
    return None if raw is None else int.from_bytes(raw, "big")
