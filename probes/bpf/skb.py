"""Context access rules of socket filters over ``struct __sk_buff`` (net/core/filter.c).

``sk_filter_is_valid_access`` is the kernel's check for
BPF_PROG_TYPE_SOCKET_FILTER (with ``bpf_skb_is_valid_access`` under it): no
direct packet access (``data``, ``data_end``, ``data_meta``), none of the
socket-address, timestamp and classid fields, writes only to ``cb[0..4]``, reads
aligned to their size and no wider than the field. The verifier asks it for every
context access of a program of that type (``ProgTypeInfo.ctx_access``); it
returns None when the access is allowed, else the verifier's reason.
"""
from __future__ import annotations

SK_BUFF_SIZE = 192                 # sizeof(struct __sk_buff), uapi linux/bpf.h (6.x)
_CB = range(48, 68)                # cb[0..4]
_U32_ONLY = [range(76, 80), range(80, 84), range(140, 144),        # data, data_end, data_meta
             range(92, 96), range(96, 100), range(100, 132)]      # remote/local ip4/ip6
_FLOW_KEYS = range(144, 152)
_TSTAMP, _HWTSTAMP, _SK = range(152, 160), range(184, 192), 168
_TSTAMP_TYPE_AND_PAD = range(180, 184)
# sk_filter_is_valid_access: fields a socket filter may not touch at all
_SK_FILTER_DENIED = [range(72, 76), range(76, 80), range(140, 144), range(80, 84),
                     range(88, 140), _TSTAMP, range(160, 164), _HWTSTAMP]


def _within(off: int, ranges: list[range]) -> bool:
    return any(off in r for r in ranges)


def bpf_skb_is_valid_access(off: int, size: int, write: bool) -> bool:
    """The generic __sk_buff rule every skb program type starts from."""
    if off < 0 or off >= SK_BUFF_SIZE or off % size:
        return False
    if off in _CB:
        return off + size <= _CB.stop
    if _within(off, _U32_ONLY):
        return size == 4
    if off in _FLOW_KEYS or off in _TSTAMP_TYPE_AND_PAD:
        return False
    if off in _HWTSTAMP or off == _SK:
        return not write and size == 8
    if off in _TSTAMP:
        return size == 8
    if write:
        return size == 4
    return size <= 4               # narrow reads of a u32 field


def sk_filter_is_valid_access(off: int, size: int, write: bool) -> str | None:
    """None if a socket filter may access [off, off+size) of its context."""
    ok = (not _within(off, _SK_FILTER_DENIED) and (not write or off in _CB)
          and bpf_skb_is_valid_access(off, size, write))
    return None if ok else f"invalid bpf_context access off={off} size={size}"
