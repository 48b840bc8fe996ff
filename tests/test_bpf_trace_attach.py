"""clang-compiled BPF objects attached to kprobes and kretprobes of guests, on both arches,
through the libbpf-like API (probes/bpf/libbpf.py) and `emu run --bpf`: counting per
argument, strings read with bpf_probe_read_user_str, ring-buffer and perf records,
bpf_override_return changing the guest's output, a stack-id map with symbolized frames,
determinism run to run."""
from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from emu.loader import GuestConfig, load_guest
from probes.bpf.libbpf import BpfObject, LibbpfError
from probes.trace.bpf_trace import bpf_trace_of, prog_stats, symbolize_stack

from conftest import ARCHES, firmware_elf, run_emu

SRC = Path(__file__).resolve().parent / "data" / "bpf_trace"
CLANG = shutil.which("clang")
CC = {"x86_64": "gcc", "arm64": "aarch64-linux-gnu-gcc"}
TARGET = {"x86_64": ("-D__TARGET_ARCH_x86", "/usr/include/x86_64-linux-gnu"),
          "arm64": ("-D__TARGET_ARCH_arm64", "/usr/aarch64-linux-gnu/include")}
pytestmark = pytest.mark.skipif(CLANG is None, reason="clang is not installed (apt install clang)")


@pytest.fixture(scope="session")
def bpf_obj(tmp_path_factory):
    out, built = tmp_path_factory.mktemp("bpf-trace-objs"), {}

    def build(name: str, arch: str) -> Path:
        key = (name, arch)
        if key not in built:
            define, inc = TARGET[arch]
            if not Path(inc, "asm", "ptrace.h").exists():
                pytest.skip(f"no {arch} asm/ptrace.h under {inc} "
                            "(libc6-dev / libc6-dev-arm64-cross)")
            obj = out / f"{name}-{arch}.o"
            subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", define, "-I", inc, "-c",
                            str(SRC / f"{name}.bpf.c"), "-o", str(obj)], check=True,
                           capture_output=True)
            built[key] = obj
        return built[key]
    return build


@pytest.fixture(scope="session")
def victim(tmp_path_factory):
    out, built = tmp_path_factory.mktemp("bpf-trace-victim"), {}

    def build(arch: str) -> Path:
        if arch not in built:
            cc = shutil.which(CC[arch])
            if cc is None:
                pytest.skip(f"{CC[arch]} is not installed")
            exe = out / f"victim-{arch}"
            proc = subprocess.run([cc, "-O2", "-static", "-no-pie", "-fno-omit-frame-pointer",
                                   "-o", str(exe), str(SRC / "victim.c")], capture_output=True)
            if proc.returncode:
                pytest.skip(f"{CC[arch]} cannot build a static program: {proc.stderr[:200]!r}")
            built[arch] = exe
        return built[arch]
    return build


def _guest(path: Path):
    out = io.BytesIO()
    return load_guest(GuestConfig(path=str(path)), stdout=out), out


def _counts(m, signed: bool = False) -> dict[int, int]:
    return {int.from_bytes(k, "little", signed=signed): int.from_bytes(v, "little")
            for k, v in m.items()}


DEMO_FLAGS = {0: 10, 1: 2, 66: 1, 193: 1, 65536: 1, 65600: 1}


@pytest.mark.parametrize("arch", ARCHES)
def test_count_per_argument_and_return(arch, bpf_obj) -> None:
    guest, _ = _guest(firmware_elf(arch, "demo"))
    obj = BpfObject.open(bpf_obj("count_open", arch)).load(guest.machine)
    links = obj.attach_all(guest.machine)
    assert [(l.prog.name, l.call.is_return) for l in links] == [("count_flags", False),
                                                                 ("count_ret", True)]
    assert guest.machine.run().exit_code == 0
    assert _counts(obj.maps["by_flags"]) == DEMO_FLAGS       # PT_REGS_PARM3 on each arch
    rets = _counts(obj.maps["by_ret"], signed=True)           # PT_REGS_RC at return
    assert sum(rets.values()) == sum(DEMO_FLAGS.values())
    assert rets[-2] == 2 and rets[-36] == 1 and rets[3] == 1   # -ENOENT, -ENAMETOOLONG, fd 3
    assert prog_stats(links[0].prog).run_cnt == 16
    assert guest.machine.clock.by_reason["bpf"] > 0           # the programs' cycles are charged


@pytest.mark.parametrize("arch", ARCHES)
def test_detach_stops_counting_and_removes_the_probe(arch, bpf_obj) -> None:
    guest, _ = _guest(firmware_elf(arch, "demo"))
    m = guest.machine
    obj = BpfObject.open(bpf_obj("count_open", arch)).load(m)
    link = obj.attach(m, "count_flags")
    addr = link.call.kp.addr
    link.destroy()
    assert link.call.prog_array is None and link.event.prog is None
    from probes.kprobes import kprobes_of
    assert kprobes_of(m).get_kprobe(addr) is None
    m.run()
    assert obj.maps["by_flags"].items() == []


def _events(records: list[bytes]) -> list[tuple]:
    out = []
    for rec in records:
        pid, mode, func_ip, ts, ln, bad = struct.unpack_from("<IIQQqq", rec)
        comm, name = rec[40:56].split(b"\0")[0], rec[56:88].split(b"\0")[0]
        out.append((pid, mode, func_ip, ts, ln, bad, comm, name))
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_strings_ringbuf_perf_printk(arch, bpf_obj, victim) -> None:
    guest, stdout = _guest(victim(arch))
    m = guest.machine
    obj = BpfObject.open(bpf_obj("events", arch)).load(m)
    obj.attach(m, "on_lookup")
    obj.attach(m, "on_lookup_ret")
    records, samples = [], []
    obj.ring_buffer(m, "events", records.append)
    obj.perf_buffer(m, "samples", lambda cpu, data: samples.append((cpu, data)))
    assert m.run().exit_code == 0
    ev = _events(records)
    lookup = m.symbols.lookup("lookup").addr
    assert [(e[1], e[4], e[6], e[7]) for e in ev] == [
        (4, 14, f"victim-{arch}".encode()[:15], b"/etc/hostname"),
        (2, 14, f"victim-{arch}".encode()[:15], b"/proc/version")]
    assert all(e[2] == lookup for e in ev)                    # bpf_get_func_ip = probe addr
    assert all(e[5] == -14 for e in ev)                       # unmapped read: -EFAULT
    assert ev[0][0] == m.task[1] and ev[0][3] < ev[1][3]      # pid; the clock moves forward
    assert samples == [(0, struct.pack("<q", 4729)), (0, struct.pack("<q", 3084))]
    assert bpf_trace_of(m).printk_lines == ["open /etc/hostname mode 4",
                                            "open /proc/version mode 2"]
    assert b"lookup = 4729" in stdout.getvalue()


@pytest.mark.parametrize("arch", ARCHES)
def test_firmware_string_argument(arch, bpf_obj) -> None:
    guest, _ = _guest(firmware_elf(arch, "demo"))
    m = guest.machine
    obj = BpfObject.open(bpf_obj("events", arch)).load(m)
    obj.attach(m, "on_open")
    records: list[bytes] = []
    obj.ring_buffer(m, "events", records.append)
    m.run()
    names = [e[7] for e in _events(records)]
    assert len(names) == 16 and names[0] == b"/etc/passwd"
    assert b"/tmp/new" in names or any(n.startswith(b"/tmp/") for n in names)


@pytest.mark.parametrize("arch", ARCHES)
def test_override_return_changes_guest_output(arch, bpf_obj, victim) -> None:
    plain, out0 = _guest(victim(arch))
    plain.machine.run()
    assert b"check_perm(1000) = -13" in out0.getvalue()
    guest, out = _guest(victim(arch))
    m = guest.machine
    obj = BpfObject.open(bpf_obj("override", arch)).load(m)
    link = obj.attach(m, "force_ok")
    assert link.event.func_entry and link.event.error_injectable
    with pytest.raises(LibbpfError) as e:     # not on the error-injection list
        obj.attach(m, "force_not_listed")
    assert e.value.errno == 22
    assert m.run().exit_code == 0
    text = out.getvalue().decode()
    assert "check_perm(1000) = 0\n" in text and "check_perm(999) = 0\n" in text
    unchanged = text.replace("check_perm(1000) = 0", "check_perm(1000) = -13")
    assert unchanged == out0.getvalue().decode()
    assert link.call.kp.hits == 3


@pytest.mark.parametrize("arch", ARCHES)
def test_override_refused_off_function_entry(arch, bpf_obj, victim) -> None:
    guest, _ = _guest(victim(arch))
    m = guest.machine
    obj = BpfObject.open(bpf_obj("override", arch)).load(m)
    import capstone
    addr = m.symbols.lookup("check_perm").addr
    cs = capstone.Cs(m.arch.cs_arch, m.arch.cs_mode)
    off = next(cs.disasm(m.memory.read(addr, 16), addr)).size   # the second instruction
    with pytest.raises(LibbpfError) as e:
        obj.attach_kprobe(m, "force_ok", "check_perm", off)
    assert e.value.errno == 22


@pytest.mark.parametrize("arch", ARCHES)
def test_stack_id_map(arch, bpf_obj, victim) -> None:
    guest, _ = _guest(victim(arch))
    m = guest.machine
    obj = BpfObject.open(bpf_obj("stacks", arch)).load(m)
    obj.attach_all(m)
    m.run()
    hits = _counts(obj.maps["hits"], signed=True)
    assert len(hits) == 2 and set(hits.values()) == {1} and min(hits) >= 0   # two call sites
    dump = {d["name"]: d for d in obj.dump_maps()}["stacks"]["elements"]
    frames = [[f.split("+")[0] for f in e["frames"]] for e in dump]
    # At leaf's entry x86's unwinder (ORC) finds the return address at sp; arm64's walks
    # frame records from x29 and never reads lr: no frame for middle.
    chain = {"x86_64": ["leaf", "middle", "outer", "main"], "arm64": ["leaf", "outer", "main"]}[arch]
    for f in frames:
        assert f[:len(chain)] == chain
    first = [e["frames"][0] for e in dump]
    assert all(f.startswith("leaf+0x1/" if arch == "x86_64" else "leaf+0x0/") for f in first)
    assert {e["frames"][len(chain) - 1] for e in dump}.__len__() == 2   # main's two call sites


@pytest.mark.parametrize("arch", ARCHES)
def test_get_stack_frames(arch, bpf_obj, victim) -> None:
    guest, _ = _guest(victim(arch))
    m = guest.machine
    obj = BpfObject.open(bpf_obj("stacks", arch)).load(m)
    obj.attach(m, "on_middle")
    recs: list[bytes] = []
    obj.ring_buffer(m, "frames", recs.append)
    m.run()
    assert len(recs) == 2
    for rec in recs:
        n, *ips = struct.unpack("<q6Q", rec)
        # x86: glibc's start code has no frame pointer; arm64: no frame for outer (at
        # middle's entry, and arm64's walk never reads lr)
        want = {"x86_64": ["middle", "outer", "main", "__libc_start_call_main"],
                "arm64": ["middle", "main", "__libc_start_call_main", "__libc_start_main",
                          "_start"]}[arch]
        depth = len(want)
        assert n == 8 * depth and ips[depth:] == [0] * (6 - depth)
        assert [f.split("+")[0] for f in symbolize_stack(m, ips[:depth])] == want


@pytest.mark.parametrize("arch", ARCHES)
def test_ksyscall_resolves_to_the_guest_syscall(arch, bpf_obj, tmp_path) -> None:
    guest, _ = _guest(firmware_elf(arch, "demo"))
    m = guest.machine
    src = tmp_path / "ks.bpf.c"
    src.write_text('#include "common.h"\nint n;\nSEC("ksyscall/open") int on_open(void *ctx)'
                   ' { __sync_fetch_and_add(&n, 1); return 0; }\n')
    define, inc = TARGET[arch]
    obj_path = tmp_path / "ks.o"
    subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", define, "-I", inc, "-I", str(SRC),
                    "-c", str(src), "-o", str(obj_path)], check=True, capture_output=True)
    obj = BpfObject.open(obj_path).load(m)
    link = obj.attach(m, "on_open")
    assert link.call.symbol == "sys_open"
    m.run()
    assert link.call.nhit == prog_stats(link.prog).run_cnt > 0


def test_unknown_symbol_is_a_usage_error(bpf_obj) -> None:
    guest, _ = _guest(firmware_elf("x86_64", "hotloop"))
    obj = BpfObject.open(bpf_obj("count_open", "x86_64")).load(guest.machine)
    with pytest.raises(LibbpfError) as e:
        obj.attach(guest.machine, "count_flags")
    assert e.value.errno == 2 and e.value.exit_code == 2


# --- the CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.slow
def test_cli_bpf_and_dump_maps(arch, bpf_obj, victim, tmp_path) -> None:
    exe = victim(arch)
    argv = ["run", "--bpf", f"{bpf_obj('events', arch)}:on_lookup",
            "--bpf", f"{bpf_obj('override', arch)}:force_ok",
            "--bpf", str(bpf_obj("stacks", arch)), "--dump-maps",
            "--stats", str(tmp_path / "s.json"), str(exe)]
    # A process per run: program ids come from one idr per process (bpf_trace._NEXT_ID).
    r = run_emu(*argv, subprocess=True)
    assert r.rc == 0, r.err
    assert "check_perm(1000) = 0" in r.out
    lines = r.err.splitlines()
    rec = [l for l in lines if l.startswith("bpf ringbuf events: ")]
    assert len(rec) == 2 and len(rec[0].split(": ")[1]) == 2 * 88
    printk = [l for l in lines if "bpf_trace_printk:" in l]
    assert printk[0].endswith("bpf_trace_printk: open /etc/hostname mode 4")
    assert f"victim-{arch}"[:15] in printk[0]
    dump = json.loads(lines[-1])
    assert {d["name"] for d in dump} >= {"events", "hits", "stacks"}
    stats = json.loads((tmp_path / "s.json").read_text())
    progs = {p["name"]: p for p in stats["bpf"]["programs"]}
    assert progs["on_lookup"]["run_cnt"] == 2 and progs["force_ok"]["run_cnt"] == 3
    assert progs["on_leaf"]["run_cnt"] == 2
    again = run_emu(*argv, subprocess=True)     # deterministic run to run
    assert (again.rc, again.out, again.err) == (r.rc, r.out, r.err)
    assert json.loads((tmp_path / "s.json").read_text()) == stats


def test_cli_json_records_and_errors(bpf_obj, victim) -> None:
    exe = victim("x86_64")
    r = run_emu("run", "--bpf", f"{bpf_obj('events', 'x86_64')}:on_lookup",
                "--bpf-format", "json", str(exe))
    recs = [json.loads(l) for l in r.err.splitlines() if l.startswith("{")]
    assert [bytes(x["bytes"])[56:69] for x in recs] == [b"/etc/hostname", b"/proc/version"]
    assert all(x["map"] == "events" and x["kind"] == "ringbuf" for x in recs)
    bad = run_emu("run", "--bpf", f"{bpf_obj('override', 'x86_64')}", str(exe))
    assert bad.rc == 2 and bad.err.strip().splitlines() == [
        "emu: libbpf: program force_not_listed: attach to not_listed+0x0: -EINVAL"]
    missing = run_emu("run", "--bpf", "/nonexistent.o", str(exe))
    assert missing.rc == 2 and "Traceback" not in missing.err
    nop = run_emu("run", "--bpf", f"{bpf_obj('events', 'x86_64')}:nope", str(exe))
    assert nop.rc == 2 and "no program 'nope'" in nop.err
    dump_only = run_emu("run", "--dump-maps", str(exe))
    assert dump_only.rc == 2 and "--dump-maps needs --bpf" in dump_only.err


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.slow
def test_emu_trace_bpf_printk_joins_the_trace(arch, bpf_obj, victim) -> None:
    """`emu trace --bpf`: bpf_trace_printk lines are events in the trace itself, beside
    the kprobe events; records and the map dump go to the trace's stdout."""
    exe = victim(arch)
    argv = ["trace", "--bpf", f"{bpf_obj('events', arch)}:on_lookup", "--dump-maps",
            "--event", "p:t/lookup check_perm", str(exe)]
    r = run_emu(*argv)
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    printk = [l for l in lines if "bpf_trace_printk: open /etc/hostname mode 4" in l]
    assert len(printk) == 1 and "lookup: (check_perm+0x0/" in r.out
    assert [l for l in lines if l.startswith("bpf ringbuf events: ")]
    assert {d["name"] for d in json.loads(lines[-1])} >= {"events"}
    assert run_emu(*argv).out == r.out
