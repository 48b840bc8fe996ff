"""eBPF socket filters from clang objects (SEC("socket"), tests/data/net/
socket_filter.c) on the same skbs as classic programs: __sk_buff fields,
bpf_skb_load_bytes (its -EFAULT past the end), legacy LD_ABS; both engines."""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from net.filter import socket_prog_run
from net.pktgen import mixed_frames
from net.skbuff import skb_from_ethernet
from probes import bpf
from probes.bpf.prog_types import BpfProgType

SRC = Path(__file__).parent / "data" / "net" / "socket_filter.c"
CLANG = shutil.which("clang")
pytestmark = pytest.mark.skipif(CLANG is None, reason="clang is not installed (apt install clang)")


@pytest.fixture(scope="module")
def obj(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("net-bpf") / "socket_filter.o"
    subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", "-c", str(SRC), "-o", str(out)],
                   check=True, capture_output=True)
    return bpf.load_object(str(out))


def expected_udp_or_http(frame: bytes) -> int:
    if len(frame) < 24 or frame[12:14] != b"\x08\x00":
        return 0
    if frame[23] == 17:
        return len(frame)
    if frame[23] != 6:
        return 0
    at = 14 + (frame[14] & 0xF) * 4 + 2
    if at + 2 > len(frame):
        return 0
    return 64 if struct.unpack_from(">H", frame, at)[0] == 80 else 0


@pytest.mark.parametrize("engine", ["jit", "interp"])
def test_socket_programs(obj, engine: str) -> None:
    progs = {n: p for n, p in obj.programs.items() if n != "spin"}
    assert {p.prog_type for p in progs.values()} == {BpfProgType.BPF_PROG_TYPE_SOCKET_FILTER}
    kept = 0
    for frame in mixed_frames():
        skb = skb_from_ethernet(frame)
        got = socket_prog_run(progs["udp_or_http"], skb, engine=engine)
        assert got == expected_udp_or_http(frame)
        kept += bool(got)
        assert socket_prog_run(progs["ipv6_only"], skb, engine=engine) == (
            0xFFFF if frame[12:14] == b"\x86\xdd" else 0)
        assert socket_prog_run(progs["tail_bytes"], skb, engine=engine) == 1
    assert kept > 5


def test_cli_budget_is_a_limit(obj, tmp_path: Path) -> None:
    """A program that runs past the instruction budget: one line, exit 124."""
    import io

    from emu.cli import main
    from net.pktgen import write_pcap

    pcap = tmp_path / "one.pcap"
    write_pcap(str(pcap), mixed_frames()[:2])
    objfile = tmp_path / "sf.o"
    subprocess.run([CLANG, "-O2", "-g", "-target", "bpf", "-c", str(SRC), "-o", str(objfile)],
                   check=True, capture_output=True)
    out, err = io.StringIO(), io.StringIO()
    rc = main(["filter", "--ebpf", f"{objfile}:spin", str(pcap)], stdout=out, stderr=err)
    assert rc == 124 and err.getvalue().count("\n") == 1
    assert "filter stopped on packet 1" in err.getvalue() and "budget" in err.getvalue()
    rc = main(["filter", "--ebpf", f"{objfile}:udp_or_http", str(pcap), "--json"],
              stdout=out, stderr=err)
    assert rc == 0

