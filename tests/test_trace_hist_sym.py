"""hist keys with .sym and .sym-offset (hist_trigger_print_key: `[addr] sym` padded to 45,
`[addr] sym+off/size` padded to 55), on a kretprobe event's function and return site,
both arches: one entry per caller of do_sys_open, counted as the plain trace counts."""
from __future__ import annotations

from collections import Counter

from conftest import firmware_elf
from probes.testing import ProbeLab
from probes.trace.tracefs import tracefs_of

RET = "r:g/openr do_sys_open"


def _lab(arch: str):
    lab = ProbeLab.load(str(firmware_elf(arch, "demo")))
    fs = tracefs_of(lab.machine)
    assert fs.write("kprobe_events", RET) == 0
    return lab, fs


def test_hist_keys_sym_and_sym_offset(arch):
    lab, fs = _lab(arch)
    fs.write("events/g/openr/enable", "1")
    assert lab.run().exit_code == 0
    # `openr: (sys_openat+0x../0x.. <- do_sys_open)`: the return sites, as the trace names them
    sites = Counter(ln.split("(", 1)[1].split(" <- ")[0] for ln in fs.read("trace").splitlines()
                    if not ln.startswith("#"))
    assert len(sites) >= 2
    lab, fs = _lab(arch)
    path = "events/g/openr/trigger"
    assert fs.write(path, "hist:keys=__probe_ret_ip.sym-offset:sort=__probe_ret_ip", append=True) == 0
    assert fs.write(path, "hist:keys=__probe_func.sym", append=True) == 0
    assert lab.run().exit_code == 0
    syms = lab.machine.symbols
    func = syms.lookup("do_sys_open").addr
    total = sum(sites.values())
    by_site = sorted((syms.lookup(s.split("+")[0]).addr + int(s.split("+")[1].split("/")[0], 16),
                      s, n) for s, n in sites.items())
    want_func = (f"{{ __probe_func: [{func:x}] {'do_sys_open':<45} }} hitcount: {total:>10}\n")
    want_sites = "".join(f"{{ __probe_ret_ip: [{a:x}] {s:<55} }} hitcount: {n:>10}\n"
                         for a, s, n in by_site)
    hist = fs.read("events/g/openr/hist").split("\n\n# event histogram")
    assert len(hist) == 2
    assert "# trigger info: hist:keys=__probe_func.sym:vals=hitcount:sort=hitcount:size=2048" \
        in hist[0] and want_func in hist[0] and "Entries: 1\n" in hist[0]
    assert ("# trigger info: hist:keys=__probe_ret_ip.sym-offset:vals=hitcount:"
            "sort=__probe_ret_ip.sym-offset:size=2048") in hist[1]
    assert want_sites in hist[1] and f"Entries: {len(sites)}\n" in hist[1]
    assert f"Hits: {total}\n" in hist[1]
