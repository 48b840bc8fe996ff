"""The one probe-location parser (probes/location.py): `SYM[+OFF]|ADDR[%return]` rows with
the expected result, or the fault, the kernel's error_log code and the caret column (`^`
under the text, as the kernel's error_log shows it); then the same locations placing real
probes on both arches."""
from __future__ import annotations

import pytest

from conftest import firmware_elf
from probes.kprobes import Kprobe
from probes.location import LocationError, LocationFault, ProbeLocation, parse_probe_location
from probes.testing import ProbeLab

F = LocationFault
GOOD = [
    ("do_sys_open", False, ProbeLocation("do_sys_open", 0, None)),
    ("do_sys_open+0x10", False, ProbeLocation("do_sys_open", 16, None)),
    ("do_sys_open+16", False, ProbeLocation("do_sys_open", 16, None)),
    ("do_sys_open+010", False, ProbeLocation("do_sys_open", 8, None)),       # kstrtol: octal
    ("0x400000", False, ProbeLocation(None, 0, 0x400000)),
    ("4194304", False, ProbeLocation(None, 0, 0x400000)),
    ("foo.isra.0+4", False, ProbeLocation("foo.isra.0", 4, None)),
    ("fib%return", True, ProbeLocation("fib", 0, None, True)),
    ("fib+0x0%return", True, ProbeLocation("fib", 0, None, True)),
    ("fib%return", False, ProbeLocation("fib%return", 0, None)),            # no suffixes here
    ("middle(int)", False, ProbeLocation("middle(int)", 0, None)),
    ("add<-1>(int)+4", False, ProbeLocation("add<-1>(int)", 4, None)),       # C++: brackets
    ("operator-(V, V)", False, ProbeLocation("operator-(V, V)", 0, None)),
    ("operator+=(V)+0x8", False, ProbeLocation("operator+=(V)", 8, None)),
]

BAD = [   # text, suffix allowed, fault, error_log code, caret line
    ("", False, F.NO_SYMBOL, "BAD_PROBE_ADDR", "^"),
    ("fib+zz", False, F.BAD_OFFSET, "BAD_PROBE_ADDR", "^"),
    ("fib+-1", False, F.NEGATIVE_OFFSET, "BAD_PROBE_ADDR", "^"),
    ("fib-4", False, F.NEGATIVE_OFFSET, "BAD_PROBE_ADDR", "^"),
    ("fib+0x100000000", False, F.BIG_OFFSET, "BAD_PROBE_ADDR", "^"),
    ("fib%retprobe", True, F.BAD_SUFFIX, "BAD_ADDR_SUFFIX", "   ^"),
    ("fib+4%ret", True, F.BAD_SUFFIX, "BAD_ADDR_SUFFIX", "     ^"),
]


@pytest.mark.parametrize("text,suffix,want", GOOD, ids=[r[0] or "empty" for r in GOOD])
def test_parses(text, suffix, want):
    assert parse_probe_location(text, suffix=suffix) == want


@pytest.mark.parametrize("text,suffix,why,code,caret", BAD, ids=[r[0] or "empty" for r in BAD])
def test_refuses_with_code_and_caret(text, suffix, why, code, caret):
    with pytest.raises(LocationError) as e:
        parse_probe_location(text, suffix=suffix)
    assert (e.value.why, e.value.code) == (why, code)
    assert " " * e.value.pos + "^" == caret
    assert str(e.value) == f"{text}: {why.value}"


def test_str_round_trips():
    for text, suffix, loc in GOOD:
        assert parse_probe_location(str(loc), suffix=suffix or loc.is_return) == loc


def test_kprobe_at_places_the_same_probe_both_ways(arch):
    """`Kprobe.at` on a name, a name+offset and the bare address: one aggregated site, three
    probes that each count every hit."""
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    addr = lab.addr_of("hot_call")
    probes = [Kprobe.at("hot_call"), Kprobe.at(f"hot_call+{0:#x}"), Kprobe.at(hex(addr))]
    for p in probes:
        lab.kprobes.register_kprobe(p)
    assert {p.addr for p in probes} == {addr} and lab.kprobes.table[addr].is_aggr
    lab.run()
    assert probes[0].hits > 0 and len({p.hits for p in probes}) == 1
    with pytest.raises(LocationError):
        Kprobe.at("hot_call+junk")
