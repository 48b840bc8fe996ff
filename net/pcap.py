"""Capture files: pcap and pcapng read with dpkt, turned into skbs.

``read_frames`` yields the frames of a file in order, one at a time (a
large capture costs no more host memory than its largest frame);
``frame_to_skb`` builds what an AF_PACKET socket filter sees for a frame of
the file's link type. Link types: Ethernet (DLT_EN10MB) and raw IP
(DLT_RAW, LINKTYPE_IPV4/IPV6). A frame longer than ``MAX_FRAME`` (tcpdump's
largest snapshot length) is refused rather than read.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from emu.errors import UsageError

from .skbuff import SkBuff, skb_from_ethernet, skb_from_raw_ip

MAX_FRAME = 262144
DLT_EN10MB = 1
DLT_RAW = {12, 14, 101}           # DLT_RAW on the BSDs, OpenBSD, LINKTYPE_RAW
LINKTYPE_IPV4, LINKTYPE_IPV6 = 228, 229
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"}


class PcapError(UsageError):
    """The capture cannot be read. Attributes: ``path``, ``reason``, ``frame``
    (1-based frame number, 0 when the file header is at fault)."""

    def __init__(self, path: str, reason: str, frame: int = 0):
        self.path, self.reason, self.frame = path, reason, frame
        where = f" (frame {frame})" if frame else ""
        super().__init__(f"{path}: {reason}{where}")


@dataclass(frozen=True)
class Frame:
    """One captured frame: ``number`` (1-based), ``ts`` (seconds), ``data``."""

    number: int
    ts: float
    data: bytes


class _ShortReads:
    """The capture file, noting a read that returned less than asked: dpkt's
    pcap reader hands out a cut record as if it were whole."""

    def __init__(self, f: BinaryIO):
        self.f, self.short = f, False

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.short = 0 <= len(data) < n
        return data

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def _reader(path: str, f: BinaryIO):
    import dpkt

    magic = f.read(4)
    f.seek(0)
    try:
        if magic == PCAPNG_MAGIC:
            return dpkt.pcapng.Reader(f)
        if magic in PCAP_MAGICS:
            return dpkt.pcap.Reader(f)
    except (ValueError, struct.error, dpkt.Error) as e:
        raise PcapError(path, f"bad capture header: {e}") from None
    raise PcapError(path, "not a pcap or pcapng file")


def linktype(path: str) -> int:
    with _open(path) as f:
        return _reader(path, f).datalink()


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise PcapError(path, e.strerror or str(e)) from None


def read_frames(path: str) -> Iterator[Frame]:
    """The frames of a pcap/pcapng file, in file order."""
    import dpkt

    with _open(path) as raw:
        f = _ShortReads(raw)
        reader = _reader(path, f)  # type: ignore[arg-type]
        it = iter(reader)
        number = 0
        while True:
            try:
                ts, buf = next(it)
            except StopIteration:
                return
            except (ValueError, struct.error, dpkt.Error) as e:
                raise PcapError(path, f"truncated or corrupt record: {e}", number + 1) from None
            number += 1
            if f.short:
                raise PcapError(path, "truncated record", number)
            if len(buf) > MAX_FRAME:
                raise PcapError(path, f"a frame of {len(buf)} bytes (at most {MAX_FRAME})",
                                number)
            yield Frame(number, float(ts), bytes(buf))


def frame_to_skb(frame: bytes, link: int) -> SkBuff:
    """The skb for one frame of a file with link type ``link``."""
    if link == DLT_EN10MB:
        return skb_from_ethernet(frame)
    if link in DLT_RAW or link in (LINKTYPE_IPV4, LINKTYPE_IPV6):
        return skb_from_raw_ip(frame)
    raise UsageError(f"link type {link} is not supported (Ethernet and raw IP are)")
