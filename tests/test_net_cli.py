"""`emu filter`: the JSON document's exact keys, the text report, --dissect,
--cbpf in both tcpdump forms, --expr, --ebpf, pcapng and raw-IP captures, and
bad input as one line on stderr with exit 2."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from emu.cli import main
from net.pktgen import ether, ipv4, ipv6, mixed_frames, tcp, udp, write_pcap

TCPDUMP = shutil.which("tcpdump")
TCP80 = "6\n40 0 0 12\n21 0 3 2048\n48 0 0 23\n21 0 1 6\n6 0 0 60\n6 0 0 0\n"   # ip and tcp
FRAMES = [ether(0x0800, ipv4(6, tcp(1, 80, payload=b"x" * 40))),
          ether(0x0800, ipv4(17, udp(1, 53))),
          ether(0x86DD, ipv6(6, tcp(1, 80))),
          ether(0x0800, ipv4(6, tcp(2, 22)))]


def emu(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    write_pcap(str(tmp_path / "small.pcap"), FRAMES)
    (tmp_path / "tcp.ddd").write_text(TCP80)
    dd = "".join("{ %#x, %s, %s, %#010x },\n" % tuple(int(v) for v in line.split())
                 for line in TCP80.splitlines()[1:])
    (tmp_path / "tcp.dd").write_text(dd)
    return {name: str(tmp_path / name) for name in ("small.pcap", "tcp.ddd", "tcp.dd")} | {
        "dir": str(tmp_path)}


def test_json(files: dict[str, str]) -> None:
    for prog in (files["tcp.ddd"], files["tcp.dd"]):
        rc, out, err = emu("filter", "--cbpf", prog, files["small.pcap"], "--json")
        assert (rc, err) == (0, "")
        doc = json.loads(out)
        assert list(doc) == ["packets", "accepted", "snaplen"]
        assert doc == {"packets": 4, "accepted": [1, 4], "snaplen": {"1": 60, "4": 54}}


def test_text_and_dissect(files: dict[str, str]) -> None:
    rc, out, _ = emu("filter", "--cbpf", files["tcp.ddd"], files["small.pcap"], "--dissect",
                     "--engine", "interp")
    lines = out.splitlines()
    assert rc == 0 and lines[-1] == "2 of 4 packets accepted"
    assert lines[0].split() == ["1", "accept", "keep", "60", "(filter", "returned", "60)"]
    assert "ip_proto 6 thoff 34 poff 54 10.0.0.1:1 > 10.0.0.2:80" in lines[1]
    assert lines[2].split() == ["2", "drop"]
    rc, out, _ = emu("filter", "--cbpf", files["tcp.ddd"], files["small.pcap"], "--dissect",
                     "--json")
    d = json.loads(out)["dissect"]
    assert [r["poff"] for r in d] == [54, 42, 74, 54]
    assert d[2]["src"] == "2001:db8::1" and d[1]["dport"] == 53


@pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed")
def test_expr(files: dict[str, str]) -> None:
    rc, out, _ = emu("filter", "--expr", "tcp port 80", files["small.pcap"], "--json")
    assert rc == 0 and json.loads(out)["accepted"] == [1, 3]
    rc, out, err = emu("filter", "--expr", "tcp port", files["small.pcap"])
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("emu: tcpdump could not compile 'tcp port':")


def test_expr_without_tcpdump(files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", files["dir"])
    rc, _, err = emu("filter", "--expr", "tcp", files["small.pcap"])
    assert rc == 2 and "needs tcpdump" in err and err.count("\n") == 1


def test_pcapng_and_raw_ip(files: dict[str, str], tmp_path: Path) -> None:
    import dpkt

    with open(tmp_path / "x.pcapng", "wb") as f:
        w = dpkt.pcapng.Writer(f)
        for i, frame in enumerate(FRAMES):
            w.writepkt(frame, ts=1000 + i)
    rc, out, _ = emu("filter", "--cbpf", files["tcp.ddd"], str(tmp_path / "x.pcapng"), "--json")
    assert rc == 0 and json.loads(out)["accepted"] == [1, 4]
    write_pcap(str(tmp_path / "raw.pcap"), [f[14:] for f in FRAMES], linktype=101)
    (tmp_path / "poff.ddd").write_text("2\n32 0 0 4294963252\n22 0 0 0\n")   # ld poff; ret a
    rc, out, _ = emu("filter", "--cbpf", str(tmp_path / "poff.ddd"), str(tmp_path / "raw.pcap"),
                     "--json")
    assert rc == 0 and json.loads(out)["snaplen"] == {"1": 40, "2": 28, "3": 60, "4": 40}


@pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed")
def test_expr_on_mixed_capture_matches_tcpdump(tmp_path: Path) -> None:
    pcap = str(tmp_path / "m.pcap")
    write_pcap(pcap, mixed_frames())
    rc, out, _ = emu("filter", "--expr", "vlan and udp", pcap, "--json")
    lines = subprocess.run([TCPDUMP, "-r", pcap, "-n", "-tt", "vlan and udp"], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    assert rc == 0 and json.loads(out)["accepted"] == [int(float(ln.split()[0])) - 1_700_000_000
                                                        + 1 for ln in lines]


@pytest.mark.parametrize("make,needle", [
    (lambda d: ("--cbpf", f"{d}/nope.ddd", f"{d}/small.pcap"), "nope.ddd"),
    (lambda d: ("--cbpf", f"{d}/bad.ddd", f"{d}/small.pcap"), "classic BPF: insn 0: division"),
    (lambda d: ("--cbpf", f"{d}/tcp.ddd", f"{d}/tcp.ddd"), "not a pcap or pcapng file"),
    (lambda d: ("--cbpf", f"{d}/tcp.ddd", f"{d}/cut.pcap"), "cut.pcap"),
    (lambda d: ("--cbpf", f"{d}/tcp.ddd", f"{d}/missing.pcap"), "missing.pcap"),
    (lambda d: ("--cbpf", f"{d}/tcp.ddd", "/dev/zero"), "not a regular file"),
    (lambda d: ("--ebpf", f"{d}/tcp.ddd", f"{d}/small.pcap"), "--ebpf"),
    (lambda d: (f"{d}/small.pcap",), "one of the arguments"),
])
def test_bad_input(files: dict[str, str], make, needle: str) -> None:
    d = files["dir"]
    Path(d, "bad.ddd").write_text("2\n52 0 0 0\n22 0 0 0\n")
    Path(d, "cut.pcap").write_bytes(Path(files["small.pcap"]).read_bytes()[:70])
    rc, out, err = emu("filter", *make(d))
    assert rc == 2 and out == "" and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err
