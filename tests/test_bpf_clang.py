"""C programs from tests/data/bpf compiled by clang -target bpf, loaded and
run on both engines: maps, global data, BPF-to-BPF calls, tail calls, ring
buffer and perf output, guest memory reads, packets, legacy maps."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from probes import bpf

SRC = Path(__file__).resolve().parent / "data" / "bpf"
CLANG = shutil.which("clang")
pytestmark = pytest.mark.skipif(CLANG is None, reason="clang is not installed (apt install clang llvm)")
ENGINES = ["interp", "jit"]
PT_REGS = "r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di orig_ax ip cs flags sp ss".split()


def pt_regs(**regs: int) -> bytearray:
    """An x86-64 struct pt_regs image."""
    buf = bytearray(8 * len(PT_REGS))
    for name, value in regs.items():
        struct.pack_into("<Q", buf, 8 * PT_REGS.index(name), value & (2**64 - 1))
    return buf


@pytest.fixture(scope="session")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bpf-objects")
    built = {}
    for src in sorted(SRC.glob("*.c")):
        for cpu in ("v1", "v3"):
            obj = out / f"{src.stem}-{cpu}.o"
            subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", f"-mcpu={cpu}", "-c", str(src),
                            "-o", str(obj)], check=True, capture_output=True)
            built[f"{src.stem}-{cpu}"] = obj
    return built


@pytest.fixture(params=[(e, c) for e in ENGINES for c in ("v1", "v3")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request: pytest.FixtureRequest, objects: dict[str, Path]):
    engine, cpu = request.param
    return lambda name: bpf.load_object(objects[f"{name}-{cpu}"]), engine


def test_maps(setup) -> None:
    load, engine = setup
    obj = load("maps")
    prog = obj.programs["count_opens"]
    assert (prog.attach_kind, prog.attach_point) == ("kprobe", "do_sys_openat2")
    assert sorted(obj.maps) == ["counts", "percpu", "recent", "totals"]
    for pid, di in [(7, 0xA), (7, 0xB), (9, 0xC)]:
        assert prog.run(pt_regs(di=di, si=5), bpf.BpfRunContext(pid=pid), engine=engine) == 0
    counts = {int.from_bytes(k, "little"): int.from_bytes(v, "little")
              for k, v in obj.maps["counts"].items()}
    assert counts == {7: 2, 9: 1}
    assert obj.maps["totals"].lookup(0) == (15).to_bytes(8, "little")
    assert obj.maps["totals"].lookup(1) == (3).to_bytes(8, "little")
    assert obj.maps["percpu"].lookup(0) == [(30).to_bytes(8, "little")]
    assert [int.from_bytes(k, "little") for k in obj.maps["recent"].keys()] == [0xB, 0xC]


def test_global_data(setup) -> None:
    load, engine = setup
    obj = load("globals")
    assert {".data", ".bss", ".rodata"} <= set(obj.maps)
    prog, env = obj.programs["read_entry"], bpf.BpfRunContext(tgid=42)
    assert obj.license == "Dual BSD/GPL"
    assert prog.run(pt_regs(di=10), env, engine=engine) == 1
    assert prog.run(pt_regs(di=11), env, engine=engine) == 2
    bss = obj.maps[".bss"].lookup(0)
    assert struct.unpack("<QQ", bss) == (2, 33)           # hits, last_arg = 11 * scale
    assert obj.maps[".data"].lookup(0)[4:8] == b"emu!"     # tag[3] written by the program
    assert env.trace_printk == ["pid 42 hit 1", "pid 42 hit 2"]
    obj.maps[".rodata"].update(0, 41)                      # target_pid: another process
    assert prog.run(pt_regs(di=1), env, engine=engine) == 0


def test_bpf_to_bpf_calls(setup) -> None:
    load, engine = setup
    obj = load("calls")
    assert obj.programs["calc"].run(pt_regs(di=5, si=7), engine=engine) == 25 + 49 + 9 + 6
    assert obj.programs["fib_tp"].run(bytes(64), engine=engine) == 6765 + 4
    assert obj.programs["fib_tp"].prog_type == bpf.BpfProgType.BPF_PROG_TYPE_TRACEPOINT
    assert obj.programs["fib_tp"].verifier_log.count("func#") >= 3


def test_tail_calls(setup) -> None:
    load, engine = setup
    obj = load("tailcall")
    table = obj.maps["jump_table"]
    table.update(0, obj.programs["handler_a"])
    table.update(1, obj.programs["handler_b"].fd)   # by fd, as user space would
    run = obj.programs["dispatcher"].run
    assert [run(pt_regs(di=i), engine=engine) for i in (0, 1, 3)] == [1, 1, 100]
    visited = [int.from_bytes(v, "little") for _, v in obj.maps["visited"].items()]
    assert visited == [3, 2, 1, 0]


def test_ringbuf_and_perf_output(setup) -> None:
    load, engine = setup
    obj = load("ringbuf")
    obj.maps["perf_out"].open_all()
    env = bpf.BpfRunContext(pid=5, tgid=6, comm=b"bash", cpu=0)
    prog = obj.programs["emit"]
    assert prog.run(pt_regs(di=0), env, engine=engine) == 2      # reserved, then discarded
    assert prog.run(pt_regs(di=77), env, engine=engine) == 0
    event, marker = obj.maps["events"].consume()
    assert struct.unpack_from("<IIQ", event) == (6, 0, 77)
    assert event[16:21] == b"bash\0"
    assert marker == struct.pack("<Q", 0xFEED)
    assert obj.maps["perf_out"].drain() == [(0, struct.pack("<Q", 0xFEED))]


def test_guest_memory_and_stack_ids(setup) -> None:
    load, engine = setup
    obj = load("probe_read")
    guest = bpf.FlatGuestMemory({0xFFFF888000001000: b"/etc/passwd\0junk"})
    env = bpf.BpfRunContext(memory=guest, stack_trace=lambda user: [0xFFFFFFFF81000010, 0x20],
                            func_ip=0xFFFFFFFF81000000)
    prog = obj.programs["trace_open"]
    assert prog.run(pt_regs(si=0xFFFF888000001000), env, engine=engine) == 12 + 1000
    assert env.override_rc == -13
    ((_, name),) = obj.maps["names"].items()
    assert name.rstrip(b"\0") == b"/etc/passwd"
    ((stack_id, ips),) = obj.maps["stacks"].items()
    assert struct.unpack_from("<QQ", ips) == (0xFFFFFFFF81000010, 0x20)
    assert prog.run(pt_regs(si=0x1234), env, engine=engine) == 0xFFFFFFFF  # -1: unreadable


def test_xdp(setup) -> None:
    load, engine = setup
    obj = load("xdp")
    prog = obj.programs["xdp_filter"]
    dns = bytearray(64)
    dns[12], dns[14], dns[23], dns[37] = 0x08, 0x45, 17, 53
    assert prog.run(packet=dns, engine=engine) == 1             # XDP_DROP
    assert prog.run(packet=dns[:20], engine=engine) == 0        # XDP_ABORTED: too short
    dns[23] = 6
    assert prog.run(packet=dns, engine=engine) == 2             # XDP_PASS: TCP
    assert obj.maps["verdicts"].lookup(1) == (1).to_bytes(8, "little")


def test_tracing_tool_patterns(setup) -> None:
    load, engine = setup
    obj = load("patterns")
    prog = obj.programs["on_write"]
    for comm, size in [(b"bash", 1000), (b"bash", 3), (b"zsh", 50), (b"basil", 1)]:
        prog.run(pt_regs(si=size), bpf.BpfRunContext(comm=comm, tgid=3), engine=engine)
    stats = {k[4:20].rstrip(b"\0"): struct.unpack("<10Q", v) for k, v in obj.maps["stats"].items()}
    assert stats == {b"bash": (2, 1003, 0, 1, 0, 0, 0, 0, 0, 1),   # log2 slots 1 and 7 (clamped)
                     b"basil": (1, 1, 1, 0, 0, 0, 0, 0, 0, 0)}
    assert obj.programs["on_write_ret"].run(pt_regs(ax=-5), engine=engine) == 5
    assert obj.programs["on_write_ret"].attach_kind == "kretprobe"


def test_legacy_maps_section(setup) -> None:
    load, engine = setup
    obj = load("legacy_maps")
    assert obj.kern_version == 0x050A00
    prog = obj.programs["sock_prog"]
    assert prog.prog_type == bpf.BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER
    assert prog.run(packet=b"x" * 20, engine=engine) == 0
    assert prog.run(packet=b"x" * 20, engine=engine) == 42


@pytest.mark.parametrize("name,prog", [("maps", "count_opens"), ("xdp", "xdp_filter"),
                                       ("ringbuf", "emit"), ("globals", "read_entry")])
def test_disassembly_matches_llvm_objdump(objects: dict[str, Path], name: str, prog: str) -> None:
    objdump = shutil.which("llvm-objdump")
    if objdump is None:
        pytest.skip("llvm-objdump is not installed")
    p = bpf.load_object(objects[f"{name}-v3"]).programs[prog]
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", f"--section={p.section}",
                           str(objects[f"{name}-v3"])], check=True, capture_output=True,
                          text=True).stdout
    theirs = [re.sub(r"\s<\w+>$", "", line.split(":", 1)[1].strip())
              for line in text.splitlines() if line.strip()[:1].isdigit() and ":\t" in line]
    ours = [line.split("\t")[-1] for line in bpf.disassemble_llvm(p.insns).splitlines()
            if line.split("\t")[-1]]
    assert len(ours) == len(theirs)
    # lddw immediates differ: the loader has put map fds where clang left zeros
    pairs = [(m, t) for m, t in zip(ours, theirs) if not t.endswith(" ll")]
    assert pairs and all(m == t for m, t in pairs), [(m, t) for m, t in pairs if m != t]


BAD_OBJECTS = [
    ("not-elf", lambda tmp, objs: _write(tmp / "x.o", b"hello"), "malformed ELF"),
    ("missing", lambda tmp, objs: tmp / "nope.o", "No such file"),
    ("truncated", lambda tmp, objs: _write(tmp / "t.o", objs["maps-v1"].read_bytes()[:200]),
     "malformed ELF"),
    ("host-object", lambda tmp, objs: _host_object(tmp), "not a BPF object"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _host_object(tmp: Path) -> Path:
    src = tmp / "host.c"
    src.write_text("int f(void) { return 1; }\n")
    subprocess.run([CLANG, "-c", str(src), "-o", str(tmp / "host.o")], check=True)
    return tmp / "host.o"


@pytest.mark.parametrize("name,make,message", BAD_OBJECTS, ids=[b[0] for b in BAD_OBJECTS])
def test_bad_objects_give_one_clear_line(name, make, message, tmp_path, objects) -> None:
    path = make(tmp_path, objects)
    with pytest.raises(bpf.LoaderError) as exc:
        bpf.load_object(path)
    text = str(exc.value)
    assert message in text and str(path) in text and "\n" not in text


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "odd.c"
    src.write_text('__attribute__((section("weird/thing"), used)) int f(void *c) { return 0; }\n')
    subprocess.run([CLANG, "-O2", "-target", "bpf", "-c", str(src), "-o", str(tmp_path / "odd.o")],
                   check=True)
    with pytest.raises(bpf.LoaderError, match="unknown program type"):
        bpf.load_object(tmp_path / "odd.o")
