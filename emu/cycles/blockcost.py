"""The static cost of a basic block, in 1/256-cycle fixed point (cycle-model.md).

Out-of-order profiles: the steady-state cost of the block run as a loop,

    max( issue slots / width,
         port pressure: max over unions U of port groups, (Σ occupancy of uses on U) / |U|,
         recurrence: the longest loop-carried register dependency chain, per iteration )

(the recurrence is the maximum cycle mean of the graph "register at entry -> register at
exit" weighted with latencies; forwarding shortens an edge). In-order profiles: a small
scoreboard issues the block in order several times over (≤ width slots a cycle, sources
ready, a free port) and takes the steady-state cycles of one pass.

All arithmetic is exact (integers and Fractions), so a cost is the same on every host."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from itertools import combinations

from emu.cycles.ops import CLASS_FALLBACK, PRIMARY, Op
from emu.cycles.profile import Profile, ProfileError

FP = 256                    # fixed point: 1/256 cycle
INORDER_PASSES = 4          # steady state measured over passes 1..4 of 0..5


@dataclass(frozen=True)
class ROp:
    """An Op resolved against a profile: numbers instead of class names."""
    cls: str
    slots: int
    uses: tuple[tuple[frozenset, int], ...]          # (port set, occupancy)
    edges: tuple[tuple[str, str, int, str], ...]     # (dst, src, latency, reader class)
    reads: tuple[tuple[str, str], ...]               # (register, reader class)
    writes: tuple[tuple[str, int], ...]              # (register, latency until ready)
    lat: int                                         # latency of the op itself
    retire_ooo: bool = False

@dataclass(frozen=True)
class BlockCost:
    """cost: 1/256 cycles per execution; prefix[i]: the cost up to and including insn i
    (prefix[-1] == cost); n: instructions; cond: ends in a conditional branch."""
    cost: int
    prefix: tuple[int, ...]
    n: int
    cond: bool = False
    branch: bool = False

    @property
    def cycles(self) -> Fraction:
        return Fraction(self.cost, FP)


def resolve_class(profile: Profile, cls: str) -> str:
    c = cls
    while c not in profile.classes:
        if c not in CLASS_FALLBACK:
            raise ProfileError(f"profile {profile.name}: no class for {cls!r}")
        c = CLASS_FALLBACK[c]
    return c


def resolve(profile: Profile, op: Op) -> ROp:
    o = profile.overrides.get(op.mnemonic)
    primary = resolve_class(profile, o.cls if o is not None and o.cls else op.cls)
    pc = profile.classes[primary]
    plat = o.lat if o is not None and o.lat is not None else pc.lat
    pocc = o.occupancy if o is not None and o.occupancy is not None else pc.occupancy

    def cls_of(c: str) -> str:
        return primary if c == PRIMARY else resolve_class(profile, c)

    def lat_of(c: str) -> int:
        return plat if c == PRIMARY else profile.classes[resolve_class(profile, c)].lat

    uses: list[tuple[frozenset[str], int]] = []
    for u in op.uses:
        cc = profile.classes[cls_of(u)]
        occ = pocc if u == PRIMARY else cc.occupancy
        uses.extend((frozenset(profile.ports[g]), occ) for g in cc.ports)
    edges = tuple((d, s, sum(lat_of(c) for c in path), cls_of(path[0])) for d, s, path in op.edges)
    reader = {s: rc for _d, s, _l, rc in edges}
    reads = tuple((r, reader.get(r, primary)) for r in op.reads)
    wlat: dict[str, int] = {}
    for d, _s, lat, _rc in edges:
        wlat[d] = max(wlat.get(d, 0), lat)
    writes = tuple((w, wlat.get(w, plat)) for w in op.writes)
    return ROp(primary, op.slots, tuple(uses), edges, reads, writes, plat, pc.retire_ooo)


# --- out-of-order ---------------------------------------------------------------------------
def issue_bound(profile: Profile, rops: list[ROp]) -> Fraction:
    return Fraction(sum(r.slots for r in rops), profile.width)


@lru_cache(maxsize=None)
def _unions(port_sets: tuple[frozenset, ...]) -> tuple[frozenset, ...]:
    out: set[frozenset] = set()
    for k in range(1, len(port_sets) + 1):
        for combo in combinations(port_sets, k):
            out.add(frozenset().union(*combo))
    return tuple(sorted(out, key=lambda s: (len(s), sorted(s))))


def port_bound(rops: list[ROp]) -> Fraction:
    demand: dict[frozenset, int] = {}
    for r in rops:
        for ports, occ in r.uses:
            demand[ports] = demand.get(ports, 0) + occ
    if not demand:
        return Fraction(0)
    sets = tuple(sorted(demand, key=lambda s: sorted(s)))
    best = Fraction(0)
    unions = _unions(sets) if len(sets) <= 10 else tuple(sets) + (frozenset().union(*sets),)
    for u in unions:
        d = sum(v for s, v in demand.items() if s <= u)
        best = max(best, Fraction(d, len(u)))
    return best


def recurrence(profile: Profile, rops: list[ROp]) -> Fraction:
    """Maximum cycle mean of the loop-carried dependency graph (Karp)."""
    fwd = profile.forwarding
    last_writer: dict[str, str] = {}
    for r in rops:
        for w, _ in r.writes:
            last_writer[w] = r.cls
    dist: dict[str, dict[str, int]] = {}
    producer: dict[str, str] = {}
    for r in rops:
        new: dict[str, dict[str, int]] = {}
        for d, s, lat, reader in r.edges:
            src = dist[s] if s in dist else {s: 0}
            made_by = producer[s] if s in producer else last_writer.get(s, "")
            f = fwd.get((made_by, reader), 0)
            nd = new.setdefault(d, {})
            for e, v in src.items():
                x = v + lat - f
                if x > nd.get(e, -10**9):
                    nd[e] = x
        for w, _ in r.writes:
            dist[w] = new.get(w, {})
            producer[w] = r.cls
    nodes = sorted(r for r in dist if any(e in dist for e in dist[r]))
    if not nodes:
        return Fraction(0)
    index = {v: i for i, v in enumerate(nodes)}
    edges = [(index[e], index[v], w) for v in nodes for e, w in dist[v].items() if e in index]
    return _max_cycle_mean(len(nodes), edges)


def _max_cycle_mean(n: int, edges: list[tuple[int, int, int]]) -> Fraction:
    # D[k][v]: the heaviest walk of exactly k edges ending at v (None: no such walk)
    start: list[int | None] = [0] * n
    D = [start] + [[None] * n for _ in range(n)]
    for k in range(1, n + 1):
        prev, cur = D[k - 1], D[k]
        for u, v, w in edges:
            pu, cv = prev[u], cur[v]
            if pu is not None and (cv is None or pu + w > cv):
                cur[v] = pu + w
    best: Fraction | None = None
    for v in range(n):
        dn = D[n][v]
        if dn is None:
            continue
        worst: Fraction | None = None
        for k in range(n):
            dk = D[k][v]
            if dk is None:
                continue
            m = Fraction(dn - dk, n - k)
            if worst is None or m < worst:
                worst = m
        if worst is not None and (best is None or worst > best):
            best = worst
    return max(best or Fraction(0), Fraction(0))


def ooo_cost(profile: Profile, rops: list[ROp]) -> Fraction:
    return max(issue_bound(profile, rops), port_bound(rops), recurrence(profile, rops))


# --- in-order -------------------------------------------------------------------------------
def inorder_times(profile: Profile, rops: list[ROp], passes: int = INORDER_PASSES + 2) -> list[list[int]]:
    """Issue cycle of every op in each of `passes` back-to-back passes over the block."""
    fwd, width, in_order_wb = profile.forwarding, profile.width, profile.inorder_writeback
    t, used, last_wb = 0, 0, 0
    ready: dict[str, tuple[int, str]] = {}
    free: dict[str, int] = {}
    out = []
    for _ in range(passes):
        times = []
        for r in rops:
            at = t
            for reg, reader in r.reads:
                rd = ready.get(reg)
                if rd is not None:
                    at = max(at, rd[0] - fwd.get((rd[1], reader), 0))
            picks = []
            for ports, occ in r.uses:
                p = min(sorted(ports), key=lambda q: free.get(q, 0))
                picks.append((p, occ))
                at = max(at, free.get(p, 0))
            done = max((lat for _w, lat in r.writes), default=r.lat)
            if in_order_wb and not r.retire_ooo:
                at = max(at, last_wb - done)
            if at == t and used + r.slots > width:
                at = t + 1
            if at > t:
                t, used = at, 0
            used += r.slots
            for p, occ in picks:
                free[p] = t + occ
            for w, lat in r.writes:
                ready[w] = (t + lat, r.cls)
            if not r.retire_ooo:
                last_wb = max(last_wb, t + done)
            times.append(t)
        out.append(times)
    return out


def inorder_cost(profile: Profile, rops: list[ROp]) -> tuple[Fraction, list[int]]:
    times = inorder_times(profile, rops)
    k = INORDER_PASSES
    cost = Fraction(times[k][0] - times[1][0], k - 1)
    steady = times[k] + [times[k + 1][0]]
    return cost, [steady[i + 1] - steady[0] for i in range(len(rops))]


# --- the block ------------------------------------------------------------------------------
def block_cost(profile: Profile, ops: list[Op]) -> BlockCost:
    if not ops:
        return BlockCost(0, (), 0)
    rops = [resolve(profile, op) for op in ops]
    n = len(rops)
    if profile.in_order:
        cost, ends = inorder_cost(profile, rops)
        fp = max(1, int(cost * FP))
        span = ends[-1]
        prefix = tuple(fp * e // span if span else fp * (i + 1) // n for i, e in enumerate(ends))
    else:
        fp = max(1, int(ooo_cost(profile, rops) * FP))
        total = sum(r.slots for r in rops)
        acc = 0
        prefix_l: list[int] = []
        for r in rops:
            acc += r.slots
            prefix_l.append(fp * acc // total if total else fp * (len(prefix_l) + 1) // n)
        prefix = tuple(prefix_l)
    prefix = prefix[:-1] + (fp,)
    last = ops[-1]
    return BlockCost(fp, prefix, n, cond=last.cond, branch=last.branch)
