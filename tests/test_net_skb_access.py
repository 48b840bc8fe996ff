"""The context rules of socket filters (sk_filter_is_valid_access): what a
SEC("socket") program may read and write of struct __sk_buff; no direct
packet access. Converted classic programs read the kernel's sk_buff and are
held to their own rule (tests/test_net_tcpdump.py verifies them)."""
from __future__ import annotations

import pytest

from net.filter import socket_prog_run
from net.pktgen import mixed_frames
from net.skbuff import skb_from_ethernet
from probes import bpf
from probes.bpf.prog_types import BpfProgType


@pytest.mark.parametrize("asm,refusal", [
    ("ldxw r0, [r1+8]", None),                                 # mark
    ("ldxb r0, [r1+9]", None),                                 # a narrow read
    ("ldxh r0, [r1+16]", None),                                # protocol
    ("stw [r1+48], 7\nmov r0, 0", None),                       # cb[0] is writable
    ("ldxdw r0, [r1+168]", None),                              # sk
    ("ldxw r0, [r1+76]", "off=76 size=4"),                     # data: no direct packet access
    ("ldxw r0, [r1+80]", "off=80 size=4"),                     # data_end
    ("ldxw r0, [r1+140]", "off=140 size=4"),                   # data_meta
    ("ldxw r0, [r1+72]", "off=72 size=4"),                     # tc_classid
    ("ldxw r0, [r1+92]", "off=92 size=4"),                     # remote_ip4
    ("ldxdw r0, [r1+152]", "off=152 size=8"),                  # tstamp
    ("ldxdw r0, [r1+8]", "off=8 size=8"),                      # wider than the field
    ("ldxw r0, [r1+2]", "off=2 size=4"),                       # misaligned
    ("ldxw r0, [r1+192]", "off=192 size=4"),                   # past __sk_buff
    ("stw [r1+8], 1\nmov r0, 0", "off=8 size=4"),              # mark is read-only
    ("ldxb r0, [r1+180]", "off=180 size=1"),                   # tstamp_type
])
def test_socket_filter_context_rules(asm: str, refusal: str | None) -> None:
    """sk_filter_is_valid_access: what a SEC("socket") program may touch."""
    prog = bpf.BpfProg(bpf.assemble_insns(asm + "\nexit"),
                       BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER)
    if refusal is None:
        prog.load()
        socket_prog_run(prog, skb_from_ethernet(mixed_frames()[0]))
    else:
        with pytest.raises(bpf.VerifierError, match=f"invalid bpf_context access {refusal}"):
            prog.load()
