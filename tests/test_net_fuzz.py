"""Random classic programs never crash anything: bpf_check_classic refuses
them with a FilterError, or the classic interpreter and the converted program
on both engines give the same answer on every test packet (and the
conversion passes the verifier unless classic dead code makes it refuse
with "unreachable insn", which the kernel never checks). Seeded: the same
programs every run."""
from __future__ import annotations

import random

import pytest

from net.classic import run_classic
from net.filter import (
    CODES_ALLOWED, SKF_AD_OFF, SKF_LL_OFF_K, SKF_NET_OFF_K, FilterError, sk_attach_filter,
)
from net.filter_helpers import SkbRunContext
from net.pktgen import mixed_frames
from net.skbuff import NetDevice, skb_from_ethernet
from probes.bpf import VerifierError

CODES = sorted(CODES_ALLOWED)
FRAMES = mixed_frames()
SKBS = [skb_from_ethernet(FRAMES[i], mark=i * 77, hash=i * 0x1001, queue_mapping=i,
                          vlan_tci=i if i % 3 == 0 else 0, vlan_proto=0x8100 if i % 3 == 0 else 0,
                          dev=NetDevice(ifindex=i) if i % 4 else None)
        for i in (0, 5, 13, 16, 21, 26, 33, 36, 40, 43)]


def _k(rng: random.Random) -> int:
    pick = rng.randrange(8)
    if pick == 0:
        return (SKF_AD_OFF + 4 * rng.randrange(17)) & 0xFFFFFFFF
    if pick == 1:
        return SKF_NET_OFF_K + rng.randrange(48)
    if pick == 2:
        return SKF_LL_OFF_K + rng.randrange(48)
    if pick == 3:
        return rng.getrandbits(32)
    return rng.randrange(64)


def random_program(rng: random.Random) -> list[tuple[int, int, int, int]]:
    """Mostly well-formed programs (jumps within range, returns at the end),
    with a few faults of every kind the checker looks for."""
    n = rng.randrange(1, 24)
    rows = []
    for pc in range(n):
        code = rng.choice(CODES) if rng.random() < 0.97 else rng.getrandbits(16)
        k = _k(rng)
        if code in (0x02, 0x03, 0x60, 0x61):
            k = rng.randrange(17)                      # scratch memory (16 is refused)
        left = n - pc                                   # the return appended below included
        jt, jf = rng.randrange(left), rng.randrange(left)
        if code == 0x05:
            k = rng.randrange(left)
        if rng.random() < 0.03:
            jt, jf = rng.randrange(256), rng.randrange(256)
        rows.append((code, jt, jf, k))
    if rng.random() < 0.95:
        rows.append((rng.choice((0x06, 0x16)), 0, 0, rng.choice((0, 1, 0xFFFF, 0x40000))))
    return rows


@pytest.mark.parametrize("seed", range(8))
def test_random_programs(seed: int) -> None:
    rng = random.Random(seed)
    accepted = refused = 0
    for _ in range(80):
        rows = random_program(rng)
        try:
            sk = sk_attach_filter(rows)
        except FilterError as e:
            assert e.errno == 22 and e.reason
            refused += 1
            continue
        accepted += 1
        try:
            sk.verify()
        except VerifierError as e:
            assert "unreachable insn" in e.reason, (rows, e.reason)
        for i, skb in enumerate(SKBS):
            env = dict(cpu=i % 2, prandom_seed=i)
            want = run_classic(sk.insns, skb, cpu=i % 2,
                               random_u32=SkbRunContext(prandom_seed=i).prandom_u32)
            for engine in ("jit", "interp"):
                assert sk.run(skb, SkbRunContext(**env), engine=engine) == want, (rows, i, engine)
    assert accepted > 8 and refused > 5
