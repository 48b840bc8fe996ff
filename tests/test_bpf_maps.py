"""Maps through their user-space API: each scenario is a list of steps
(operation, arguments, expected value or kernel errno), as bpf(2) would
answer them."""
from __future__ import annotations

import errno

import pytest

from probes import bpf
from probes.bpf.maps import (
    BPF_ANY, BPF_EXIST, BPF_F_REUSE_STACKID, BPF_NOEXIST, ENOTSUPP, BpfMapType as T,
)

U32 = lambda v: v.to_bytes(4, "little")  # noqa: E731
U64 = lambda v: v.to_bytes(8, "little")  # noqa: E731

# (name, create args, steps); a step is (op, args, expected). An int expected
# with op != "value" is an errno the call must fail with.
SCENARIOS = [
    ("array", (T.BPF_MAP_TYPE_ARRAY, 4, 8, 3), [
        ("lookup", (1,), U64(0)),                     # preallocated, zeroed
        ("update", (1, 5, BPF_ANY), None),
        ("lookup", (1,), U64(5)),
        ("update", (1, 6, BPF_EXIST), None),
        ("update", (1, 6, BPF_NOEXIST), errno.EEXIST),  # every element exists
        ("update", (3, 1, BPF_ANY), errno.E2BIG),       # index past max_entries
        ("update", (0, 1, 7), errno.EINVAL),            # unknown flags
        ("update", (0, 1, 4), errno.EINVAL),            # BPF_F_LOCK: no bpf_spin_lock
        ("lookup", (3,), errno.ENOENT),
        ("delete", (0,), errno.EINVAL),
        ("next", (None,), U32(0)),
        ("next", (0,), U32(1)),
        ("next", (2,), errno.ENOENT),
        ("next", (99,), U32(0)),
        ("lookup", (b"\x01\x00",), errno.EINVAL),        # wrong key size
    ]),
    ("hash", (T.BPF_MAP_TYPE_HASH, 4, 4, 2), [
        ("lookup", (1,), errno.ENOENT),
        ("update", (1, 10, BPF_EXIST), errno.ENOENT),
        ("update", (1, 10, BPF_NOEXIST), None),
        ("update", (1, 11, BPF_NOEXIST), errno.EEXIST),
        ("update", (1, 12, BPF_EXIST), None),
        ("lookup", (1,), U32(12)),
        ("update", (2, 20, BPF_ANY), None),
        ("update", (3, 30, BPF_ANY), errno.E2BIG),     # full
        ("update", (2, 21, BPF_ANY), None),            # replacing is fine when full
        ("next", (None,), U32(1)),
        ("next", (1,), U32(2)),
        ("next", (2,), errno.ENOENT),
        ("next", (7,), U32(1)),                        # missing key: start over
        ("delete", (1,), None),
        ("delete", (1,), errno.ENOENT),
        ("update", (3, 30, BPF_ANY), None),
        ("keys", (), [U32(2), U32(3)]),
    ]),
    ("lru_hash", (T.BPF_MAP_TYPE_LRU_HASH, 4, 4, 2), [
        ("update", (1, 1, BPF_ANY), None),
        ("update", (2, 2, BPF_ANY), None),
        ("lookup", (1,), U32(1)),                      # bpf(2)'s lookup: no LRU use
        ("update", (3, 3, BPF_ANY), None),             # evicts 1, not E2BIG
        ("lookup", (1,), errno.ENOENT),
        ("keys", (), [U32(2), U32(3)]),
        ("update", (3, 9, BPF_EXIST), None),           # full: takes a free element first,
        ("keys", (), [U32(3)]),                        # which evicts 2 (prealloc_lru_pop)
        ("update", (3, 9, BPF_NOEXIST), errno.EEXIST),  # room now: nothing evicted
        ("lookup", (3,), U32(9)),
    ]),
    ("percpu_array", (T.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 4, 2), [
        ("lookup", (0,), [U32(0)] * 3),
        ("update", (0, 7, BPF_ANY), None),
        ("lookup", (0,), [U32(7)] * 3),
        ("update", (1, [1, 2, 3], BPF_ANY), None),
        ("lookup", (1,), [U32(1), U32(2), U32(3)]),
        ("update", (1, [1, 2], BPF_ANY), errno.EINVAL),
        ("update", (0, 1, BPF_NOEXIST), errno.EEXIST),
    ]),
    ("percpu_hash", (T.BPF_MAP_TYPE_PERCPU_HASH, 4, 4, 4), [
        ("update", (5, [1, 2, 3], BPF_NOEXIST), None),
        ("lookup", (5,), [U32(1), U32(2), U32(3)]),
        ("update", (5, 4, BPF_NOEXIST), errno.EEXIST),
        ("delete", (5,), None),
        ("lookup", (5,), errno.ENOENT),
    ]),
    ("ringbuf", (T.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096), [
        ("lookup", (b"",), ENOTSUPP),
        ("consume", (), []),
    ]),
    ("stack_trace", (T.BPF_MAP_TYPE_STACK_TRACE, 4, 16, 8), [
        ("lookup", (0,), errno.ENOENT),
        ("update", (0, bytes(16), BPF_ANY), errno.EINVAL),
        ("next", (None,), errno.ENOENT),
    ]),
    ("prog_array", (T.BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 2), [
        ("lookup", (0,), errno.ENOENT),
        ("update", (0, 99, BPF_ANY), errno.EBADF),      # fd of no program
        ("update", (5, 99, BPF_ANY), errno.E2BIG),
        ("update", (0, 99, BPF_EXIST), errno.EINVAL),   # an fd array takes BPF_ANY only
        ("update", (0, 99, BPF_NOEXIST), errno.EINVAL),
        ("delete", (0,), errno.ENOENT),
    ]),
]


def _do(m: bpf.BpfMap, op: str, args: tuple) -> object:
    if op == "lookup":
        return m.lookup(*args)
    if op == "update":
        return m.update(*args)
    if op == "delete":
        return m.delete(*args)
    if op == "next":
        return m.get_next_key(*args)
    if op == "keys":
        return m.keys()
    if op == "consume":
        return m.consume()  # type: ignore[attr-defined]
    raise AssertionError(op)


@pytest.mark.parametrize("name,create,steps", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_map_scenario(name: str, create: tuple, steps: list) -> None:
    m = bpf.create_map(*create, nr_cpus=3)
    for i, (op, args, expected) in enumerate(steps):
        if isinstance(expected, int):
            with pytest.raises(bpf.MapError) as exc:
                _do(m, op, args)
            assert exc.value.errno == expected, f"step {i}: {op}{args}"
        else:
            assert _do(m, op, args) == expected, f"step {i}: {op}{args}"


@pytest.mark.parametrize("args", [
    (T.BPF_MAP_TYPE_ARRAY, 8, 8, 4), (T.BPF_MAP_TYPE_HASH, 4, 8, 0),
    (T.BPF_MAP_TYPE_HASH, 0, 8, 4), (T.BPF_MAP_TYPE_RINGBUF, 0, 0, 1000),
    (T.BPF_MAP_TYPE_RINGBUF, 4, 4, 4096), (T.BPF_MAP_TYPE_PROG_ARRAY, 4, 8, 4),
    (T.BPF_MAP_TYPE_STACK_TRACE, 4, 12, 4), (99, 4, 4, 4)])
def test_bad_map_attributes(args: tuple) -> None:
    with pytest.raises(bpf.MapError) as exc:
        bpf.create_map(*args)
    assert exc.value.errno == errno.EINVAL


def test_ringbuf_space_accounting() -> None:
    rb = bpf.create_map(T.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    assert rb.output(bytes(4000)) == 0          # type: ignore[attr-defined]
    assert rb.output(bytes(100)) == -errno.EAGAIN  # 4008 + 108 > 4096
    assert rb.avail_data() == 4008              # type: ignore[attr-defined]
    assert rb.consume() == [bytes(4000)]        # type: ignore[attr-defined]
    assert rb.output(bytes(100)) == 0           # type: ignore[attr-defined]


def test_ringbuf_consumer_stops_at_reserved_record() -> None:
    rb = bpf.create_map(T.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    first = rb.reserve(8)                       # type: ignore[attr-defined]
    rb.output(b"second")                        # type: ignore[attr-defined]
    assert rb.consume() == []                   # type: ignore[attr-defined]
    first.data[:] = b"first!!!"
    rb.commit(first, discard=False)             # type: ignore[attr-defined]
    assert rb.consume() == [b"first!!!", b"second"]  # type: ignore[attr-defined]


def test_stack_ids_collide_unless_reused() -> None:
    st = bpf.create_map(T.BPF_MAP_TYPE_STACK_TRACE, 4, 16, 1)
    a = st.get_stackid([1, 2], 0)               # type: ignore[attr-defined]
    assert a == 0 and st.get_stackid([1, 2], 0) == 0  # type: ignore[attr-defined]
    assert st.get_stackid([3], 0) == -errno.EEXIST  # type: ignore[attr-defined]
    assert st.get_stackid([3], BPF_F_REUSE_STACKID) == 0  # type: ignore[attr-defined]
    assert st.lookup(0) == U64(3) + U64(0)
    assert st.get_stackid([], 0) == -errno.EFAULT  # type: ignore[attr-defined]


def test_perf_event_array_needs_an_open_slot() -> None:
    pe = bpf.create_map(T.BPF_MAP_TYPE_PERF_EVENT_ARRAY, 4, 4, 0, nr_cpus=2)
    assert pe.max_entries == 2
    assert pe.output(0, b"x") == -errno.ENOENT  # type: ignore[attr-defined]
    pe.update(1, 5)
    assert pe.output(1, b"y") == 0              # type: ignore[attr-defined]
    assert pe.drain() == [(1, b"y")]            # type: ignore[attr-defined]
