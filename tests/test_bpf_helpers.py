"""Helpers by kernel id, run from small programs on both engines."""
from __future__ import annotations

import errno
import struct

import pytest

from probes import bpf
from probes.bpf.maps import BpfMapType
from probes.bpf.prog_types import BpfProgType

ENGINES = ["interp", "jit"]
GUEST = 0xFFFF888000010000


def _run(src: str, engine: str, mem: bytes = b"", env: bpf.BpfRunContext | None = None,
         maps: dict | None = None, ptype: BpfProgType = BpfProgType.BPF_PROG_TYPE_UNSPEC) -> int:
    prog = bpf.BpfProg(bpf.assemble_insns(src), ptype, maps=maps or {}, license="GPL")
    return prog.run(bytearray(mem), env, engine=engine)


def _s64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


# (format, r3, r4, r5, expected output or -errno)
PRINTK = [
    (b"hello\n", 0, 0, 0, "hello\n"),
    (b"%d", -5 & 0xFFFFFFFF, 0, 0, "-5"),
    (b"%u", -1, 0, 0, "4294967295"),
    (b"%llu", -1, 0, 0, "18446744073709551615"),
    (b"%lld %lld", -1, 7, 0, "-1 7"),
    (b"%x/%lx/%X", 0xABCDEF0123, 0xABCDEF0123, 255, "cdef0123/abcdef0123/FF"),
    (b"[%5d][%-4d][%08llx]", 42, 7, 0xBEEF, "[   42][7   ][0000beef]"),
    (b"%c%c", ord("o"), ord("k"), 0, "ok"),
    (b"100%%", 0, 0, 0, "100%"),
    (b"%px", 0xFFFF8880, 0, 0, "ffff8880"),
    (b"%d %d %d %d", 1, 2, 3, -errno.EINVAL),   # at most three arguments
    (b"%q", 1, 0, 0, -errno.EINVAL),            # unsupported conversion
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt,a,b,c,expected", PRINTK, ids=[p[0].decode() for p in PRINTK])
def test_trace_printk(fmt: bytes, a: int, b: int, c: int, expected: object, engine: str) -> None:
    env = bpf.BpfRunContext()
    mem = fmt + b"\0"
    r0 = _run(f"""
        mov r2, {len(mem)}
        lddw r3, {a & (2**64 - 1):#x}
        lddw r4, {b:#x}
        lddw r5, {c:#x}
        call 6
        exit""", engine, mem, env)
    if isinstance(expected, str):
        assert env.trace_printk == [expected] and r0 == len(expected)
    else:
        assert env.trace_printk == [] and _s64(r0) == expected


@pytest.mark.parametrize("engine", ENGINES)
def test_trace_printk_string_argument(engine: str) -> None:
    env = bpf.BpfRunContext(memory=bpf.FlatGuestMemory({GUEST: b"guest\0"}))
    mem = b"<%s|%s>\0in-vm\0"
    r0 = _run(f"""
        mov r3, r1
        add r3, 8
        lddw r4, {GUEST:#x}
        mov r2, 8
        call 6
        exit""", engine, mem, env)
    assert env.trace_printk == ["<in-vm|guest>"] and r0 == 13


@pytest.mark.parametrize("engine", ENGINES)
def test_trace_printk_needs_nul(engine: str) -> None:
    assert _s64(_run("mov r2, 2\ncall 6\nexit", engine, b"hi")) == -errno.EINVAL


READ_PROG = """
    mov r6, r1
    mov r1, r10
    add r1, -16
    mov r2, {size}
    lddw r3, {src:#x}
    call {helper}
    stxdw [r6], r0
    ldxdw r1, [r10-16]
    stxdw [r6+8], r1
    ldxdw r1, [r10-8]
    stxdw [r6+16], r1
    mov r0, 0
    exit"""


def _read(engine: str, helper: int, src: int, size: int = 16) -> tuple[int, bytes]:
    env = bpf.BpfRunContext(memory=bpf.FlatGuestMemory({GUEST: b"/etc/passwd\0tail-bytes"}))
    out = bytearray(24)
    prog = bpf.BpfProg(bpf.assemble_insns(READ_PROG.format(size=size, src=src, helper=helper)))
    prog.run(out, env, engine=engine)
    return _s64(struct.unpack_from("<Q", out)[0]), bytes(out[8:24])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("helper", [4, 112, 113])
def test_probe_read(helper: int, engine: str) -> None:
    assert _read(engine, helper, GUEST) == (0, b"/etc/passwd\0tail")
    assert _read(engine, helper, 0xDEAD0000) == (-errno.EFAULT, bytes(16))  # zeroed on fault


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("helper", [45, 114, 115])
def test_probe_read_str(helper: int, engine: str) -> None:
    assert _read(engine, helper, GUEST) == (12, b"/etc/passwd\0" + bytes(4))
    assert _read(engine, helper, GUEST, size=5) == (5, b"/etc\0" + bytes(11))  # truncated
    assert _read(engine, helper, GUEST + 20) == (-errno.EFAULT, bytes(16))  # no NUL before the end


@pytest.mark.parametrize("engine", ENGINES)
def test_probe_read_of_machine_memory(engine: str) -> None:
    # a pointer into the program's own stack reads the machine, not the guest
    r0 = _run("""
        stdw [r10-8], 0x1234
        mov r1, r10
        add r1, -16
        mov r2, 8
        mov r3, r10
        add r3, -8
        call 113
        ldxdw r0, [r10-16]
        exit""", engine)
    assert r0 == 0x1234


TASK = bpf.BpfRunContext(pid=100, tgid=200, uid=1000, gid=50, comm=b"a-very-long-command-name",
                         cpu=1, func_ip=0xFFFFFFFF81234560, attach_cookie=77)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("helper,expected", [
    (14, (200 << 32) | 100), (15, (50 << 32) | 1000), (8, 1), (173, 0xFFFFFFFF81234560),
    (174, 77), (42, 0)])
def test_task_and_cpu_helpers(helper: int, expected: int, engine: str) -> None:
    assert _run(f"call {helper}\nexit", engine, env=TASK) == expected


@pytest.mark.parametrize("engine", ENGINES)
def test_get_current_comm_truncates_and_pads(engine: str) -> None:
    out = bytearray(16)
    prog = bpf.BpfProg(bpf.assemble_insns("mov r2, 16\ncall 16\nexit"))
    assert prog.run(out, TASK, engine=engine) == 0
    assert out == b"a-very-long-com\0"


@pytest.mark.parametrize("engine", ENGINES)
def test_clock_helpers_use_the_environment(engine: str) -> None:
    ticks = iter([5_000_000_000, 6_000_000_000])
    env = bpf.BpfRunContext(ktime_ns=lambda: next(ticks), hz=100)
    assert _run("call 5\nexit", engine, env=env) == 5_000_000_000
    assert _run("call 118\nexit", engine, env=env) == 600  # jiffies64 at HZ=100


def test_prandom_is_seeded() -> None:
    def draws(seed: int, engine: str) -> list[int]:
        env = bpf.BpfRunContext(prandom_seed=seed)
        return [_run("call 7\nexit", engine, env=env) for _ in range(3)]
    assert draws(1, "interp") == draws(1, "jit")
    assert draws(1, "jit") != draws(2, "jit")
    assert all(v < 2**32 for v in draws(3, "jit"))


@pytest.mark.parametrize("engine", ENGINES)
def test_get_stack_skips_and_zero_fills(engine: str) -> None:
    env = bpf.BpfRunContext(stack_trace=lambda user: [0x10, 0x20, 0x30] if not user else [0x99])
    out = bytearray(32 + 8)
    prog = bpf.BpfProg(bpf.assemble_insns("""
        mov r6, r1
        mov r2, r1
        add r2, 8
        mov r3, 32
        mov r4, 1
        call 67
        stxdw [r6], r0
        mov r0, 0
        exit"""), BpfProgType.BPF_PROG_TYPE_UNSPEC)
    prog.run(out, env, engine=engine)
    assert struct.unpack("<5Q", out) == (16, 0x20, 0x30, 0, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_override_return_is_recorded(engine: str) -> None:
    env = bpf.BpfRunContext()
    src = "mov r2, -13\ncall 58\nmov r0, 0\nexit"
    assert _run(src, engine, bytes(168), env, ptype=BpfProgType.BPF_PROG_TYPE_KPROBE) == 0
    assert env.override_rc == -13


@pytest.mark.parametrize("engine", ENGINES)
def test_skb_load_bytes(engine: str) -> None:
    prog = bpf.BpfProg(bpf.assemble_insns("""
        mov r2, 2
        mov r3, r10
        add r3, -4
        mov r4, 4
        call 26
        jne r0, 0, +2
        ldxw r0, [r10-4]
        exit
        mov r0, 0
        exit"""), BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER)
    assert prog.run(packet=b"\x00\x00\x01\x02\x03\x04", engine=engine) == 0x04030201
    assert prog.run(packet=b"\x00\x00\x01", engine=engine) == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_unreleased_ringbuf_record_is_an_error(engine: str) -> None:
    rb = bpf.create_map(BpfMapType.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    with pytest.raises(bpf.BpfRuntimeError, match="neither submitted nor discarded"):
        _run("lddw r1, map_fd(3)\nmov r2, 8\nmov r3, 0\ncall 131\nmov r0, 0\nexit",
             engine, maps={3: rb})
    assert rb.consume() == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", ENGINES)
def test_submitted_record_cannot_be_touched(engine: str) -> None:
    rb = bpf.create_map(BpfMapType.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
    src = """
        lddw r1, map_fd(3)
        mov r2, 8
        mov r3, 0
        call 131
        jeq r0, 0, +6
        mov r6, r0
        stdw [r6], 5
        mov r1, r6
        mov r2, 0
        call 132
        stdw [r6], 6
        mov r0, 0
        exit"""
    with pytest.raises(bpf.BpfRuntimeError, match="insn 11"):
        _run(src, engine, maps={3: rb})
    assert rb.consume() == [(5).to_bytes(8, "little")]  # type: ignore[attr-defined]


def test_custom_helper_table() -> None:
    double = bpf.BpfFuncProto(1000, "double", lambda run, x, *_: 2 * x,
                              (bpf.BpfArgType.ARG_ANYTHING,))
    code = bpf.assemble("mov r1, 21\ncall 1000\nexit")
    for engine in ENGINES:
        assert bpf.run(code, helpers={1000: double}, engine=engine) == 42
    with pytest.raises(bpf.VerifierError, match="unknown#1000"):
        bpf.run(code)
