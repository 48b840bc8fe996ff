"""A second image's tracepoints brought in as a module would be (tracepoints_from_image):
its sites flip, its tracepoints and raw tracepoints are found after the core's, and
releasing the module takes them away. The "module" is tpdemo's bare-metal build mapped
beside the Linux one (other addresses, same code), called through ProbeLab.call."""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from conftest import FIRMWARE, firmware_elf
from emu.elf import load_elf
from probes.jump_label import jump_labels_of
from probes.testing import ProbeLab
from probes.trace.bpf_tracepoint import bpf_raw_tracepoints_of
from probes.trace.trace_tracepoint import tracepoint_events_of
from probes.trace.tracefs import tracefs_of
from probes.tracepoint import tracepoints_from_image, tracepoints_of, tracepoints_release_module


@dataclass(eq=False)
class FakeModule:
    name: str
    image: Any


def _with_module(arch: str) -> tuple[ProbeLab, FakeModule]:
    lab = ProbeLab.load(str(firmware_elf(arch, "tpdemo")), argv=["2"])
    image = load_elf(str(FIRMWARE / "bin" / arch / "tpdemo.bare.elf"))
    mem = lab.machine.memory
    for seg in image.segments:
        mem.map(seg.vaddr, seg.memsz, seg.prot, "module:tpmod")
        mem.write(seg.vaddr, seg.data)
    return lab, FakeModule("tpmod", image)


def _sym(image: Any, name: str) -> int:
    return next(s.addr for s in image.symbols if s.name == name)


def test_module_tracepoints_come_and_go(arch):
    lab, mod = _with_module(arch)
    m = lab.machine
    fs = tracefs_of(m)
    tracepoint_events_of(fs)
    found = tracepoints_from_image(m, mod.image, mod)
    assert sorted(t.name for t in found) == ["tp_done", "tp_work"]
    tps = tracepoints_of(m)
    core = tps.lookup("tp_work")
    assert core.module is None                          # the core table is asked first
    mod_work = next(t for t in found if t.name == "tp_work")
    raw = bpf_raw_tracepoints_of(m)
    assert raw.bpf_get_raw_tracepoint("tp_work").tp is core
    assert [b.tp for b in raw.modules[0][1] if b.tp.name == "tp_work"] == [mod_work]
    # the module's site flips and its function reaches the probe
    (site,) = mod_work.key.entries
    before = m.memory.read(site.code, 4)
    got: list[tuple[int, ...]] = []
    assert tps.tracepoint_probe_register(mod_work, lambda d, a: got.append(a)) == 0
    assert m.memory.read(site.code, 4) != before
    # core hits do not reach the module's tracepoint; a call into the module's code does
    assert lab.run().exit_code == 0 and got == []
    assert lab.call(_sym(mod.image, "work_step"), 11) == 26
    assert got == [(11, 26)]
    gone = tracepoints_release_module(m, mod)
    assert sorted(t.name for t in gone) == ["tp_done", "tp_work"]
    assert tps.lookup("tp_work") is core and mod_work not in tps.tps
    assert raw.modules == []
    assert not jump_labels_of(m).jump_label_text_reserved(site.code, site.code)
    assert fs.find_event("tpdemo", "tp_work") is not None   # the core's event stays
    assert tps.tracepoint_probe_unregister(mod_work, got.append) == -errno.ENOENT
