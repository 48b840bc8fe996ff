"""Loader pieces that need no compiler: the section-name table and BTF
decoding of map definitions (a hand-built .BTF, as clang lays it out)."""
from __future__ import annotations

import struct

import pytest

from probes import bpf
from probes.bpf.btf import BtfKind as K, btf_map_defs, parse_btf
from probes.bpf.loader import section_prog_type
from probes.bpf.prog_types import BpfProgType as P

SECTIONS = [
    ("kprobe/do_sys_openat2", (P.BPF_PROG_TYPE_KPROBE, "kprobe", "do_sys_openat2")),
    ("kretprobe/vfs_read", (P.BPF_PROG_TYPE_KPROBE, "kretprobe", "vfs_read")),
    ("uprobe/bash:readline", (P.BPF_PROG_TYPE_KPROBE, "uprobe", "bash:readline")),
    ("tracepoint/sched/sched_switch", (P.BPF_PROG_TYPE_TRACEPOINT, "tracepoint", "sched/sched_switch")),
    ("tp/syscalls/sys_enter_open", (P.BPF_PROG_TYPE_TRACEPOINT, "tracepoint", "syscalls/sys_enter_open")),
    ("raw_tp/sched_wakeup", (P.BPF_PROG_TYPE_RAW_TRACEPOINT, "raw_tp", "sched_wakeup")),
    ("raw_tracepoint/sched_wakeup", (P.BPF_PROG_TYPE_RAW_TRACEPOINT, "raw_tp", "sched_wakeup")),
    ("socket", (P.BPF_PROG_TYPE_SOCKET_FILTER, "socket", "")),
    ("xdp", (P.BPF_PROG_TYPE_XDP, "xdp", "")),
    ("perf_event", (P.BPF_PROG_TYPE_PERF_EVENT, "perf_event", "")),
    ("fentry/do_exit", (P.BPF_PROG_TYPE_TRACING, "fentry", "do_exit")),
    ("license", None),
    ("kprobe", (P.BPF_PROG_TYPE_KPROBE, "kprobe", "")),   # libbpf: no auto-attach target
    ("kprobes_are_fun", None),
    ("xdpfoo", None),
    ("xdp/frags", (P.BPF_PROG_TYPE_XDP, "xdp", "frags")),
]


@pytest.mark.parametrize("name,expected", SECTIONS, ids=[s[0] for s in SECTIONS])
def test_section_names(name: str, expected: object) -> None:
    assert section_prog_type(name) == expected


class BtfBuilder:
    """Lays out a .BTF section: header, type records, string table."""

    def __init__(self) -> None:
        self.types = b""
        self.strings = b"\0"
        self.count = 0

    def name(self, text: str) -> int:
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, kind: K, name: str, size_or_type: int, vlen: int = 0, extra: bytes = b"") -> int:
        info = (int(kind) << 24) | vlen
        self.types += struct.pack("<III", self.name(name) if name else 0, info, size_or_type) + extra
        self.count += 1
        return self.count

    def blob(self, magic: int = 0xEB9F) -> bytes:
        header = struct.pack("<HBBIIIII", magic, 1, 0, 24, 0, len(self.types),
                             len(self.types), len(self.strings))
        return header + self.types + self.strings


def _map_btf() -> BtfBuilder:
    b = BtfBuilder()
    int_t = b.add(K.BTF_KIND_INT, "int", 4, extra=struct.pack("<I", 32))
    u64 = b.add(K.BTF_KIND_INT, "u64", 8, extra=struct.pack("<I", 64))
    arr_t = lambda n: b.add(K.BTF_KIND_ARRAY, "", 0, extra=struct.pack("<III", int_t, int_t, n))  # noqa: E731
    ptr = lambda t: b.add(K.BTF_KIND_PTR, "", t)  # noqa: E731
    type_ptr, max_ptr = ptr(arr_t(1)), ptr(arr_t(1024))
    key_ptr, value_ptr = ptr(int_t), ptr(b.add(K.BTF_KIND_TYPEDEF, "val_t", u64))
    members = b"".join(struct.pack("<III", b.name(n), t, 64 * i) for i, (n, t) in enumerate(
        [("type", type_ptr), ("max_entries", max_ptr), ("key", key_ptr), ("value", value_ptr)]))
    st = b.add(K.BTF_KIND_STRUCT, "", 32, 4, members)
    var = b.add(K.BTF_KIND_VAR, "counts", st, extra=struct.pack("<I", 1))
    b.add(K.BTF_KIND_DATASEC, ".maps", 32, 1, struct.pack("<III", var, 0, 32))
    return b


def test_btf_map_definition() -> None:
    (d,) = btf_map_defs(parse_btf(_map_btf().blob())).values()
    assert (d.name, d.map_type, d.max_entries, d.key_size, d.value_size) == ("counts", 1, 1024, 4, 8)


@pytest.mark.parametrize("mangle,message", [
    (lambda raw: raw[:10], "too short"),
    (lambda raw: struct.pack("<H", 0x1234) + raw[2:], "bad BTF magic"),
    (lambda raw: raw[:-3], "run past the end"),
    (lambda raw: raw[:24 + 4] + struct.pack("<I", 25 << 24) + raw[32:], "unknown kind 25"),
])
def test_btf_errors(mangle, message: str) -> None:
    with pytest.raises(bpf.LoaderError, match=message):
        parse_btf(mangle(_map_btf().blob()))
