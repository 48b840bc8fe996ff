"""arm64 simulation reads operands decoded once, when the probe is prepared: a probe on
every simulated instruction of the `insns` firmware, each with a Python pre handler (so the
Python simulation runs), decodes once per probe however often it is hit, and the guest
prints what it prints with the same probes and no handler (the C simulation where it is
built). Not against an unprobed run: t_adr reads its own first word, a BRK once probed."""
from __future__ import annotations

from conftest import firmware_elf
from probes.arch.arm64 import simulate as sim
from probes.arch.common import StepKind
from probes.errors import KprobeError
from probes.kprobes import Kprobe
from probes.testing import ProbeLab


def _probe_simulated(handler) -> tuple[ProbeLab, list[Kprobe]]:
    lab = ProbeLab.load(str(firmware_elf("arm64", "insns")))
    probes = []
    for s in list(lab.machine.symbols):
        if s.kind != "func" or not s.name.startswith("t_"):
            continue
        for off in range(0, s.size, 4):
            p = Kprobe(symbol_name=s.name, offset=off, pre_handler=handler)
            try:
                lab.kprobes.register_kprobe(p)
            except KprobeError:
                continue
            if p.ainsn.kind is StepKind.SIMULATE:
                probes.append(p)
            else:
                lab.kprobes.unregister_kprobe(p)
    return lab, probes


def test_simulated_probes_decode_once(monkeypatch):
    want, _ = _probe_simulated(None)
    want.run()
    decoded: list[int] = []
    real = sim.decode_operands

    def counting(handler, op, addr):
        decoded.append(addr)
        return real(handler, op, addr)
    monkeypatch.setattr(sim, "decode_operands", counting)
    lab, probes = _probe_simulated(lambda p, regs: 0)
    assert len(probes) >= 8 and len(decoded) == len(probes)
    assert all(isinstance(p.ainsn.operands, sim.SimOperands) for p in probes)
    lab.run()
    assert (lab.stdout, lab.result.exit_code) == (want.stdout, want.result.exit_code)
    assert sum(p.hits for p in probes) > 2 * len(probes)
    assert len(decoded) == len(probes)          # no decode at a hit
