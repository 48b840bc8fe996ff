"""The guest JIT, feature by feature, on both arches: the kernel's edge rules (division,
modulo, 32-bit zero extension), tail calls and MAX_TAIL_CALL_CNT, bpf-to-bpf calls, maps
through helper trampolines, packets and LD_ABS, images in read-only text, and modelled
cycles that repeat exactly. Each result is checked against the interpreter's."""
from __future__ import annotations

import pytest

from probes import bpf
from probes.bpf.jit_guest import run_prog
from probes.bpf.maps import BpfMapType
from probes.bpf.prog_types import BpfProgType
from test_bpf_runtime import _tail_call_setup as tail_call_chain

ARCHES = ["arm64", "x86_64"]

EDGES = [
    # the kernel's rules for division and modulo by zero, and signed overflow
    ("mov r0, 7\nmov r1, 0\ndiv r0, r1\nexit", 0),
    ("lddw r0, 0x1234567800000009\nmov r1, 0\nmod r0, r1\nexit", 0x1234567800000009),
    ("lddw r0, 0x1234567800000009\nmov r1, 0\nmod32 r0, r1\nexit", 9),
    ("lddw r0, 0x1234567800000009\nmov32 r1, 0\ndiv32 r0, r1\nexit", 0),
    ("lddw r0, 0x8000000000000000\nmov r1, -1\nsdiv r0, r1\nexit", 0x8000000000000000),
    ("lddw r0, 0x8000000000000000\nmov r1, -1\nsmod r0, r1\nexit", 0),
    ("mov32 r0, 0x80000000\nmov r1, -1\nsdiv32 r0, r1\nexit", 0x80000000),
    ("mov32 r0, 0x80000000\nsmod32 r0, -1\nexit", 0),
    ("mov r0, -7\nsdiv r0, 2\nexit", (-3) & (2**64 - 1)),
    ("mov r0, -7\nsmod r0, 2\nexit", (-1) & (2**64 - 1)),
    ("mov r0, -7\nmod r0, 0\nexit", (-7) & (2**64 - 1)),
    ("mov r0, -7\ndiv32 r0, 0\nexit", 0),
    # 32-bit sub-registers zero-extend; shifts mask their count
    ("mov r0, -1\nadd32 r0, 1\nexit", 0),
    ("mov r0, -1\nmov r1, 65\nlsh r0, r1\nexit", (2**64 - 2)),
    ("mov r0, -1\nmov r4, 33\nrsh32 r0, r4\nexit", 0x7FFFFFFF),
    ("mov r4, -1\nmov r1, 4\narsh32 r4, r1\nmov r0, r4\nexit", 0xFFFFFFFF),
    ("mov r0, 1\nlsh32 r0, 0\nexit", 1),
    # byte swaps, movsx, sign-extending loads
    ("lddw r0, 0x0102030405060708\nbe16 r0\nexit", 0x0807),
    ("lddw r0, 0x0102030405060708\nbswap32 r0\nexit", 0x08070605),
    ("lddw r0, 0x0102030405060708\nle32 r0\nexit", 0x05060708),
    ("mov r1, 0x80\nmovsx864 r0, r1\nexit", 2**64 - 0x80),
    ("mov r1, 0x8000\nmovsx1632 r0, r1\nexit", 0xFFFF8000),
    ("stw [r10-4], -2\nldxsw r0, [r10-4]\nexit", 2**64 - 2),
    ("stb [r10-1], 0x80\nldxsb r0, [r10-1]\nexit", 2**64 - 0x80),
    # atomics on the stack, fetch forms and cmpxchg (32-bit: r0 zero-extended)
    ("stdw [r10-8], 5\nmov r1, 3\nlock fetch add [r10-8], r1\nldxdw r0, [r10-8]\nlsh r0, 8\n"
     "or r0, r1\nexit", (8 << 8) | 5),
    ("stdw [r10-8], 0xc\nmov r1, 0xa\nlock fetch xor [r10-8], r1\nldxdw r0, [r10-8]\nlsh r0, 8\n"
     "or r0, r1\nexit", (6 << 8) | 0xC),
    ("stw [r10-4], 7\nlddw r0, 0x100000007\nmov r1, 9\nlock cmpxchg32 [r10-4], r1\n"
     "ldxw r1, [r10-4]\nlsh r1, 32\nor r0, r1\nexit", (9 << 32) | 7),
    ("stdw [r10-8], 7\nmov r0, 8\nmov r1, 9\nlock cmpxchg [r10-8], r1\nldxdw r1, [r10-8]\n"
     "lsh r1, 8\nor r0, r1\nexit", (7 << 8) | 7),
    ("stdw [r10-8], 1\nmov r0, 2\nlock xchg [r10-8], r0\nldxdw r1, [r10-8]\nlsh r1, 8\n"
     "or r0, r1\nexit", (2 << 8) | 1),
    ("stdw [r10-8], 6\nmov r0, 3\nlock fetch or [r10-8], r0\nldxdw r1, [r10-8]\nlsh r1, 8\n"
     "or r0, r1\nexit", (7 << 8) | 6),
    # bpf-to-bpf calls: r6-r9 survive, each frame has its own stack
    ("mov r6, 40\nstdw [r10-8], 1\nmov r1, 2\ncall local +4\nldxdw r1, [r10-8]\nadd r0, r1\n"
     "add r0, r6\nexit\nstdw [r10-8], 100\nmov r6, 5\nmov r0, r1\nmul r0, 10\nexit", 61),
]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("src,want", EDGES, ids=[e[0].split("\n")[-2][:30] for e in EDGES])
def test_edge_rules(arch: str, src: str, want: int) -> None:
    code = bpf.assemble(src)
    assert bpf.run(code, engine="interp") == want
    assert bpf.run(code, engine="jit", arch=arch) == want


@pytest.mark.parametrize("arch", ARCHES)
def test_tail_calls_stop_at_max_tail_call_cnt(arch: str) -> None:
    prog, counter = tail_call_chain()
    jt = prog.maps[3]
    assert run_prog(prog, bytes(168), arch=arch)[0] == 7
    assert int.from_bytes(counter.lookup(0), "little") == 34     # first run + 33 tail calls
    jt.delete(0)                                                  # an empty slot: go on
    assert run_prog(prog, bytes(168), arch=arch)[0] == 7
    assert int.from_bytes(counter.lookup(0), "little") == 35


@pytest.mark.parametrize("arch", ARCHES)
def test_maps_through_helpers(arch: str) -> None:
    """Hash map update + lookup + an atomic add into the value, and a global (.data)
    array read through lddw map_value: the maps end equal to the interpreter's."""
    src = """
        stw [r10-4], 3
        stdw [r10-16], 40
        lddw r1, map_fd(1)
        mov r2, r10
        add r2, -4
        mov r3, r10
        add r3, -16
        mov r4, 0
        call 2
        lddw r1, map_fd(1)
        mov r2, r10
        add r2, -4
        call 1
        jeq r0, 0, +7
        mov r1, 2
        lock add [r0], r1
        ldxdw r6, [r0]
        lddw r2, map_value(2, 8)
        ldxdw r0, [r2]
        add r0, r6
        exit"""
    results = []
    for engine in ("interp", arch):
        h = bpf.create_map(BpfMapType.BPF_MAP_TYPE_HASH, 4, 8, 4)
        data = bpf.create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 16, 1)
        data.update(0, (5).to_bytes(8, "little") + (1000).to_bytes(8, "little"))
        prog = bpf.BpfProg(bpf.assemble_insns(src), maps={1: h, 2: data})
        r0 = prog.run(b"", engine="interp") if engine == "interp" else run_prog(prog, b"", arch=arch)[0]
        results.append((r0, h.items(), data.items()))
    assert results[0] == results[1]
    assert results[0][0] == 1042


@pytest.mark.parametrize("arch", ARCHES)
def test_packets_and_ld_abs(arch: str) -> None:
    xdp = bpf.BpfProg(bpf.assemble_insns("""
        ldxw r2, [r1+0]
        ldxw r3, [r1+4]
        mov r0, 1
        mov r4, r2
        add r4, 2
        jgt r4, r3, +1
        ldxh r0, [r2]
        exit"""), BpfProgType.BPF_PROG_TYPE_XDP)
    assert run_prog(xdp, b"", arch=arch, packet=b"\x34\x12rest")[0] == 0x1234
    assert run_prog(xdp, b"", arch=arch, packet=b"\x34")[0] == 1
    past_end = bpf.BpfProg(bpf.assemble_insns("ldxw r2, [r1+0]\nldxw r0, [r2+8]\nexit"),
                           BpfProgType.BPF_PROG_TYPE_XDP)
    with pytest.raises(bpf.BpfRuntimeError) as e:
        run_prog(past_end, b"", arch=arch, packet=b"abcd")
    assert e.value.pc == 1                       # the fault names the BPF instruction
    sock = bpf.BpfProg(bpf.assemble_insns("mov r6, r1\nldabsb 2\nexit"),
                       BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER)
    assert run_prog(sock, b"", arch=arch, packet=b"\x01\x02\x03")[0] == 3
    assert run_prog(sock, b"", arch=arch, packet=b"\x01")[0] == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_ringbuf_and_printk(arch: str) -> None:
    src = """
        lddw r1, map_fd(1)
        mov r2, 8
        mov r3, 0
        call 131
        jeq r0, 0, +6
        lddw r1, 0x1122334455667788
        stxdw [r0], r1
        mov r1, r0
        mov r2, 0
        call 132
        stdw [r10-8], 0x0a6425
        mov r1, r10
        add r1, -8
        mov r2, 4
        mov r3, 42
        call 6
        exit"""
    out = []
    for engine in ("interp", arch):
        rb = bpf.create_map(BpfMapType.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
        env = bpf.BpfRunContext()
        prog = bpf.BpfProg(bpf.assemble_insns(src), maps={1: rb}, license="GPL")
        r0 = prog.run(b"", env, engine="interp") if engine == "interp" else run_prog(prog, b"", env, arch=arch)[0]
        out.append((r0, rb.consume(), env.trace_printk))
    assert out[0] == out[1]
    assert out[1][1] == [(0x1122334455667788).to_bytes(8, "little")]


@pytest.mark.parametrize("arch", ARCHES)
def test_helper_fault_names_the_call(arch: str) -> None:
    """A helper refusing its arguments stops the program with the call's index, as the
    interpreter does."""
    src = "lddw r1, map_fd(1)\nmov r2, 0\ncall 1\nexit"
    h = bpf.create_map(BpfMapType.BPF_MAP_TYPE_HASH, 4, 8, 4)
    prog = bpf.BpfProg(bpf.assemble_insns(src), BpfProgType.BPF_PROG_TYPE_UNSPEC, maps={1: h})
    with pytest.raises(bpf.BpfError) as want:
        prog.run(b"", engine="interp")
    with pytest.raises(bpf.BpfError) as got:
        run_prog(prog, b"", arch=arch)
    assert type(got.value) is type(want.value)
    assert getattr(got.value, "pc", None) == getattr(want.value, "pc", None)


@pytest.mark.parametrize("arch", ARCHES)
def test_images_are_read_only_text(arch: str) -> None:
    from emu.memory import PROT_EXEC, PROT_READ

    prog = bpf.BpfProg(bpf.assemble_insns("mov r0, 1\nexit"))
    _, jit = run_prog(prog, b"", arch=arch)
    image = jit.images[id(prog)]
    m = jit.machine
    region = m.memory.find(image.addr)
    assert region is not None and region.prot == PROT_READ | PROT_EXEC
    assert any(s <= image.addr < e for s, e in m.owned_text)
    assert m.symbols.find(image.addr).name.startswith("bpf_prog_")
    assert m.memory.read(image.addr, len(image.code)) == image.code


@pytest.mark.parametrize("arch", ARCHES)
def test_modelled_cycles_repeat_exactly(arch: str) -> None:
    code = bpf.assemble("mov r0, 0\nmov r1, 100\nadd r0, r1\nsub r1, 1\njne r1, 0, -3\n"
                        "stdw [r10-8], 1\nlock add [r10-8], r0\ncall 5\nexit")
    cycles = set()
    for _ in range(2):
        prog = bpf.BpfProg.from_bytes(code)
        r0, jit = run_prog(prog, b"", arch=arch, cycle_profile="default")
        cycles.add((r0, jit.cycles))
    assert len(cycles) == 1
    (r0, n), = cycles
    assert n > 100          # 100 loop iterations of modelled guest code, at least a cycle each


PROBE_SRC = "mov r0, 5\nldxdw r0, [r1+0x100]\nadd r0, 7\nldxb r2, [r1+0x7000]\nadd r0, r2\nexit"


@pytest.mark.parametrize("arch", ARCHES)
def test_probe_mem_loads_are_fixed_up_through_the_exception_table(arch: str) -> None:
    """Loads the kernel's verifier marks BPF_PROBE_MEM: a fault zeroes the destination
    and the program goes on (ex_handler_bpf); without the mark the same load faults."""
    prog = bpf.BpfProg(bpf.assemble_insns(PROBE_SRC))
    r0, jit = run_prog(prog, bytearray(16), arch=arch, probe_mem=frozenset({1, 3}))
    assert r0 == 7                       # both loads faulted and gave 0
    image = jit.images[id(prog)]
    assert len(image.extable) == 2
    assert {image.insn_at(pc) for pc in image.extable} == {1, 3}
    with pytest.raises(bpf.BpfRuntimeError) as e:
        run_prog(bpf.BpfProg(bpf.assemble_insns(PROBE_SRC)), bytearray(16), arch=arch)
    assert e.value.pc == 1 and "in JITed code" in e.value.reason
    ok = bpf.BpfProg(bpf.assemble_insns("ldxdw r0, [r1+8]\nexit"))
    assert run_prog(ok, bytearray(range(16)), arch=arch, probe_mem=frozenset({0}))[0] == \
        int.from_bytes(bytes(range(8, 16)), "little")       # a load that works is untouched


@pytest.mark.parametrize("arch", ARCHES)
def test_jit_images_are_refused_as_kprobe_targets(arch: str) -> None:
    import errno

    from probes.errors import KprobeError
    from probes.kprobes import Kprobe, kprobes_of

    prog = bpf.BpfProg(bpf.assemble_insns("mov r0, 1\nexit"))
    _, jit = run_prog(prog, b"", arch=arch)
    image = jit.images[id(prog)]
    with pytest.raises(KprobeError) as e:
        kprobes_of(jit.machine).register_kprobe(Kprobe(addr=image.insn_addr[1]))
    assert e.value.errno == errno.EINVAL
    assert "own code" in str(e.value)


@pytest.mark.parametrize("arch", ARCHES)
def test_budget_ends_a_loop_that_never_exits(arch: str) -> None:
    """The JIT charges the run's budget at every backward branch (the kernel needs no
    budget: its verifier proves termination; this one leaves bounded loops to run time)."""
    forever = bpf.BpfProg(bpf.assemble_insns("mov r0, 0\nadd r0, 1\njne r0, 0, -2\nexit"))
    with pytest.raises(bpf.BpfRuntimeError) as e:
        run_prog(forever, b"", bpf.BpfRunContext(insn_budget=5000), arch=arch)
    assert "budget of 5000 exhausted" in e.value.reason
    bounded = bpf.BpfProg(bpf.assemble_insns("mov r0, 0\nadd r0, 1\njlt r0, 4000, -2\nexit"))
    assert run_prog(bounded, b"", bpf.BpfRunContext(insn_budget=5000), arch=arch)[0] == 4000


ARRAY_LOOKUP = """
    stw [r10-4], {key}
    lddw r1, map_fd(1)
    mov r2, r10
    add r2, -4
    call 1
    jeq r0, 0, +4
    ldxdw r1, [r0]
    add r1, 5
    stxdw [r0], r1
    ldxw r0, [r0+8]
    exit"""


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("key", [0, 2, 3, 100])
def test_array_lookups_are_inlined(arch: str, key: int) -> None:
    """map_lookup_elem on an array map becomes array_map_gen_lookup in the image (no call
    to a trampoline), and gives what the helper gives, NULL past the end included."""
    results = []
    for engine in ("interp", "jit"):
        arr = bpf.create_map(BpfMapType.BPF_MAP_TYPE_ARRAY, 4, 12, 3)   # elem_size 16
        for k in range(3):
            arr.update(k, (k * 7).to_bytes(8, "little") + (k + 100).to_bytes(4, "little"))
        prog = bpf.BpfProg(bpf.assemble_insns(ARRAY_LOOKUP.format(key=key)), maps={1: arr})
        if engine == "interp":
            r0 = prog.run(b"", engine="interp")
        else:
            r0, jit = run_prog(prog, b"", arch=arch)
            assert ("helper", 1) not in jit.stubs      # no trampoline: the lookup is inline
        results.append((r0, arr.items()))
    assert results[0] == results[1]
    assert results[1][0] == ((key + 100) if key < 3 else 0)
