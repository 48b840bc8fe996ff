"""Classic BPF: the input forms, bpf_check_classic's refusals (table in
tests/data/net/refused.txt), and the semantics of every instruction kind and
ancillary load, each run on the direct classic interpreter and on the
converted eBPF with both engines (the conversion also passes the verifier)."""
from __future__ import annotations

import errno
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from net.classic import run_classic
from probes.bpf import VerifierError
from net.filter import (
    SKF_AD_OFF, SKF_LL_OFF_K, SKF_NET_OFF_K, FilterError, SockFilter, bpf_check_classic,
    parse_dd, parse_ddd, parse_filter, sk_attach_filter, sock_filters,
)
from net.filter_helpers import SkbRunContext
from net.pktgen import ether, ipv4, tcp, udp
from net.skbuff import NetDevice, SkBuff, skb_from_ethernet

DATA = Path(__file__).parent / "data" / "net"
FRAME = ether(0x0800, ipv4(6, tcp(1234, 80, 0x12, b"payload")))


def ad(n: int) -> int:
    return (SKF_AD_OFF + n) & 0xFFFFFFFF


def run3(rows: list[tuple[int, int, int, int]], skb: SkBuff, verify: bool = True,
         **env: Any) -> int:
    """The result on all three engines, which must agree."""
    sk = sk_attach_filter(rows)
    if verify:
        sk.verify()
    got = {"jit": sk.run(skb, SkbRunContext(**env), engine="jit"),
           "interp": sk.run(skb, SkbRunContext(**env), engine="interp"),
           "classic": run_classic(sk.insns, skb, cpu=env.get("cpu", 0),
                                  random_u32=SkbRunContext(**env).prandom_u32)}
    assert len(set(got.values())) == 1, got
    return got["jit"]


# --- input forms ------------------------------------------------------------------------------

DDD = "4\n40 0 0 12\n21 0 1 2048\n6 0 0 262144\n6 0 0 0\n"
DD = """{ 0x28, 0, 0, 0x0000000c },
{ 0x15, 0, 1, 0x00000800 },
{ 0x6, 0, 0, 0x00040000 },
{ 0x6, 0, 0, 0x00000000 },
"""


def test_input_forms_agree() -> None:
    rows = [(0x28, 0, 0, 12), (0x15, 0, 1, 0x800), (0x06, 0, 0, 0x40000), (0x06, 0, 0, 0)]
    assert parse_ddd(DDD) == parse_dd(DD) == sock_filters(rows) == parse_filter(DD)
    assert parse_filter(DDD)[1] == SockFilter(0x15, 0, 1, 2048)
    assert sock_filters([(0x06, 0, 0, -1)])[0].k == 0xFFFFFFFF


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_tcpdump_dd_and_ddd_agree() -> None:
    def out(flag: str) -> str:
        return subprocess.run(["tcpdump", flag, "-y", "EN10MB", "tcp port 80 or vlan 5"],
                              capture_output=True, text=True, check=True).stdout
    assert parse_filter(out("-dd")) == parse_filter(out("-ddd"))


@pytest.mark.parametrize("text,line,reason", [
    ("3\n6 0 0 1\n", 1, "the count line says 3"),
    ("1\n6 0 0\n", 2, "expected 'code jt jf k'"),
    ("1\n6 0 zero 1\n", 2, "not a number"),
    ("1\n6 0 300 1\n", 0, "field out of range"),
    ("{ 0x6, 0, 0, 1 },\nhello\n", 2, "not a sock_filter row"),
    ("", 0, "empty program text"),
])
def test_bad_text(text: str, line: int, reason: str) -> None:
    with pytest.raises(FilterError) as e:
        parse_filter(text)
    assert reason in e.value.reason and e.value.line == line


# --- bpf_check_classic ------------------------------------------------------------------------

def _refused_cases() -> list[Any]:
    cases = []
    for line in (DATA / "refused.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, insns, pc, reason = (f.strip() for f in line.split("|"))
        rows = [tuple(int(v, 0) for v in i.split()) for i in insns.split(";") if i.strip()]
        cases.append(pytest.param(rows, None if pc == "-" else int(pc), reason, id=name))
    return cases


@pytest.mark.parametrize("rows,pc,reason", _refused_cases())
def test_refused(rows: list[tuple[int, ...]], pc: int | None, reason: str) -> None:
    with pytest.raises(FilterError) as e:
        sk_attach_filter(rows)
    assert (e.value.errno, e.value.pc) == (errno.EINVAL, pc)
    assert reason in e.value.reason


def test_too_long() -> None:
    with pytest.raises(FilterError, match="1 to 4096"):
        bpf_check_classic(sock_filters([(0x06, 0, 0, 0)] * 4097))
    bpf_check_classic(sock_filters([(0x06, 0, 0, 0)] * 4096))


def test_accepted_edge_cases() -> None:
    bpf_check_classic(sock_filters([
        (0x30, 0, 0, ad(52)),           # an ancillary load of any size (ldb poff)
        (0x20, 0, 0, SKF_NET_OFF_K),    # negative bases are not ancillary
        (0x05, 0, 0, 0),                # ja +0
        (0x15, 0, 0, 0),                # jeq with jt = jf = 0
        (0x64, 0, 0, 31), (0x16, 0, 0, 0)]))


# --- semantics --------------------------------------------------------------------------------

def test_packet_loads() -> None:
    skb = skb_from_ethernet(FRAME)
    assert run3([(0x28, 0, 0, 12), (0x16, 0, 0, 0)], skb) == 0x0800          # ldh [12]
    assert run3([(0x20, 0, 0, 26), (0x16, 0, 0, 0)], skb) == 0x0A000001      # ld [26]
    assert run3([(0x30, 0, 0, 23), (0x16, 0, 0, 0)], skb) == 6               # ldb [23]
    assert run3([(0x01, 0, 0, 14), (0x50, 0, 0, 9), (0x16, 0, 0, 0)], skb) == 6  # ldb [x+9]
    assert run3([(0xB1, 0, 0, 14), (0x87, 0, 0, 0), (0x16, 0, 0, 0)], skb) == 20  # ldxb msh
    assert run3([(0x80, 0, 0, 0), (0x16, 0, 0, 0)], skb) == len(FRAME)       # ld len
    assert run3([(0x81, 0, 0, 0), (0x87, 0, 0, 0), (0x16, 0, 0, 0)], skb) == len(FRAME)


def test_negative_bases() -> None:
    skb = skb_from_ethernet(FRAME)
    assert run3([(0x30, 0, 0, SKF_NET_OFF_K + 9), (0x16, 0, 0, 0)], skb) == 6
    assert run3([(0x28, 0, 0, SKF_LL_OFF_K + 12), (0x16, 0, 0, 0)], skb) == 0x0800
    assert run3([(0x01, 0, 0, 9), (0x50, 0, 0, SKF_NET_OFF_K), (0x16, 0, 0, 0)], skb) == 6
    no_mac = skb_from_ethernet(FRAME, mac_header=None)
    assert run3([(0x00, 0, 0, 5), (0x28, 0, 0, SKF_LL_OFF_K + 12), (0x16, 0, 0, 0)], no_mac) == 0
    below = (SKF_LL_OFF_K - 1) & 0xFFFFFFFF
    assert run3([(0x00, 0, 0, 5), (0x30, 0, 0, below), (0x16, 0, 0, 0)], skb) == 0


def test_failed_load_returns_zero() -> None:
    skb = skb_from_ethernet(FRAME)
    for rows in ([(0x20, 0, 0, len(FRAME) - 3)], [(0x30, 0, 0, 0x7FFFFFFF)],
                 [(0x01, 0, 0, 0x7FFFFFF0), (0x50, 0, 0, 0x20)], [(0xB1, 0, 0, len(FRAME))]):
        assert run3(rows + [(0x06, 0, 0, 99)], skb) == 0
    assert run3([(0x30, 0, 0, len(FRAME) - 1), (0x06, 0, 0, 99)], skb) == 99
    # X + k wraps in the helper's int offset: 0xffffffff + 2 is offset 1
    assert run3([(0x01, 0, 0, 0xFFFFFFFF), (0x50, 0, 0, 2), (0x16, 0, 0, 0)], skb) == 0
    assert run3([(0x01, 0, 0, 0xFFFFFFFF), (0x50, 0, 0, 7), (0x16, 0, 0, 0)], skb) == 2


def test_far_absolute_offset() -> None:
    """k above S16_MAX takes the kernel's mov/add/ldx path."""
    skb = SkBuff(b"\x00" * 40000 + b"\xab\xcd" + b"\x00" * 8, network_header=0)
    assert run3([(0x28, 0, 0, 40000), (0x16, 0, 0, 0)], skb) == 0xABCD


def test_alu_and_division_by_zero() -> None:
    skb = skb_from_ethernet(FRAME)
    assert run3([(0x00, 0, 0, 7), (0x24, 0, 0, 6), (0x04, 0, 0, 0xFFFFFFFF),
                 (0x16, 0, 0, 0)], skb) == 41                    # 7*6 - 1, 32-bit wrap
    assert run3([(0x00, 0, 0, 10), (0x01, 0, 0, 0), (0x3C, 0, 0, 0), (0x06, 0, 0, 5)], skb) == 0
    assert run3([(0x00, 0, 0, 10), (0x01, 0, 0, 0), (0x9C, 0, 0, 0), (0x06, 0, 0, 5)], skb) == 0
    assert run3([(0x00, 0, 0, 100), (0x01, 0, 0, 7), (0x9C, 0, 0, 0), (0x16, 0, 0, 0)], skb) == 2
    assert run3([(0x00, 0, 0, 1), (0x01, 0, 0, 33), (0x6C, 0, 0, 0), (0x16, 0, 0, 0)], skb) == 2
    assert run3([(0x00, 0, 0, 5), (0x84, 0, 0, 0), (0x16, 0, 0, 0)], skb) == 0xFFFFFFFB
    assert run3([(0x00, 0, 0, 0xF0), (0xA4, 0, 0, 0xFF), (0x54, 0, 0, 0x3C),
                 (0x74, 0, 0, 2), (0x16, 0, 0, 0)], skb) == 3


def test_jumps_and_scratch_memory() -> None:
    skb = skb_from_ethernet(FRAME)
    big = [(0x00, 0, 0, 0x90000000), (0x25, 0, 1, 0x80000000), (0x06, 0, 0, 1), (0x06, 0, 0, 2)]
    assert run3(big, skb) == 1                                   # unsigned compare
    assert run3([(0x00, 0, 0, 6), (0x45, 1, 0, 4), (0x06, 0, 0, 1), (0x06, 0, 0, 2)], skb) == 2
    assert run3([(0x00, 0, 0, 6), (0x01, 0, 0, 6), (0x1D, 0, 1, 0), (0x06, 0, 0, 1),
                 (0x06, 0, 0, 2)], skb) == 1
    assert run3([(0x00, 0, 0, 3), (0x35, 1, 0, 3), (0x06, 0, 0, 1), (0x06, 0, 0, 2)], skb) == 2
    # Classic allows unreachable instructions; the kernel runs the conversion
    # unverified, this machine's verifier refuses it, the filter still runs.
    skip = [(0x05, 0, 0, 1), (0x06, 0, 0, 1), (0x06, 0, 0, 2)]
    assert run3(skip, skb, verify=False) == 2
    with pytest.raises(VerifierError, match="unreachable insn"):
        sk_attach_filter(skip).verify()
    rows = [(0x00, 0, 0, 11), (0x02, 0, 0, 15), (0x01, 0, 0, 22), (0x03, 0, 0, 0),
            (0x00, 0, 0, 0), (0x61, 0, 0, 15), (0x60, 0, 0, 0), (0x0C, 0, 0, 0), (0x16, 0, 0, 0)]
    assert run3(rows, skb) == 33                                  # M[15] + M[0] via X
    assert run3([(0x06, 0, 0, 0xFFFFFFFF)], skb) == 0xFFFFFFFF


ANC_SKB = dict(mark=0xDEADBEEF, queue_mapping=3, hash=0x12345678, vlan_tci=0x2005,
               vlan_proto=0x88A8, pkt_type=3, dev=NetDevice(ifindex=7, type=772))


@pytest.mark.parametrize("n,expected", [
    (0, 0x0800), (4, 3), (8, 7), (20, 0xDEADBEEF), (24, 3), (28, 772), (32, 0x12345678),
    (36, 1), (44, 0x2005), (48, 1), (52, 54), (60, 0x88A8)],
    ids=["protocol", "pkttype", "ifindex", "mark", "queue", "hatype", "rxhash", "cpu",
         "vlan_tag", "vlan_tag_present", "pay_offset", "vlan_tpid"])
def test_ancillary(n: int, expected: int) -> None:
    skb = skb_from_ethernet(FRAME, **ANC_SKB)
    for code in (0x20, 0x28, 0x30):                   # any load size names the same value
        assert run3([(code, 0, 0, ad(n)), (0x16, 0, 0, 0)], skb, cpu=1) == expected


def test_ancillary_random_and_xor() -> None:
    skb = skb_from_ethernet(FRAME)
    rnd = run3([(0x20, 0, 0, ad(56)), (0x16, 0, 0, 0)], skb, prandom_seed=5)
    assert rnd == SkbRunContext(prandom_seed=5).prandom_u32()
    assert run3([(0x00, 0, 0, 0xF0), (0x01, 0, 0, 0xFF), (0x20, 0, 0, ad(40)),
                 (0x16, 0, 0, 0)], skb) == 0x0F


def test_no_vlan_tag_and_no_device() -> None:
    skb = skb_from_ethernet(FRAME, dev=None)
    assert run3([(0x00, 0, 0, 9), (0x20, 0, 0, ad(48)), (0x16, 0, 0, 0)], skb) == 0
    # skb->dev NULL: ifindex / hatype end the program with A as it was
    assert run3([(0x00, 0, 0, 42), (0x20, 0, 0, ad(8)), (0x06, 0, 0, 0)], skb) == 42
    assert run3([(0x00, 0, 0, 43), (0x28, 0, 0, ad(28)), (0x06, 0, 0, 0)], skb) == 43


def _nla(type_: int, payload: bytes) -> bytes:
    raw = struct.pack("<HH", 4 + len(payload), type_) + payload
    return raw + b"\x00" * (-len(raw) % 4)


def test_netlink_attributes() -> None:
    nested = _nla(1, b"a") + _nla(2, b"bbbb")
    data = b"\x00" * 16 + _nla(3, b"xy") + _nla(0x8000 | 5, nested) + _nla(6, b"z")
    skb = SkBuff(data, protocol=0x0010, network_header=0)
    nla = [(0x00, 0, 0, 16), (0x01, 0, 0, 0), (0x20, 0, 0, ad(12)), (0x16, 0, 0, 0)]
    for attr, at in [(3, 16), (5, 24), (6, 24 + 4 + len(nested))]:
        nla[1] = (0x01, 0, 0, attr)
        assert run3(nla, skb) == at
    nla[1] = (0x01, 0, 0, 9)
    assert run3(nla, skb) == 0
    nest = [(0x00, 0, 0, 24), (0x01, 0, 0, 2), (0x20, 0, 0, ad(16)), (0x16, 0, 0, 0)]
    assert run3(nest, skb) == 24 + 4 + 8
    nest[0] = (0x00, 0, 0, len(data) - 2)                       # past the last attribute
    assert run3(nest, skb) == 0
