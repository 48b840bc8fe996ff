"""`emu run --cycles [--profile NAME]`: attach the cycle model, print the modelled cycles
and instructions at exit (stderr) and add them to the --stats JSON."""
from __future__ import annotations

import argparse
from typing import IO, Any

from emu.cli_checks import non_negative
from emu.session import Session


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cycles", action="store_true",
                   help="model CPU cycles (deterministic): print cycles and instructions at exit")
    p.add_argument("--profile", metavar="NAME",
                   help="CPU profile of the cycle model, implies --cycles: cortex-a72 (arm64 "
                        "default), cortex-a55 (arm64), skylake (x86_64 default)")
    p.add_argument("--max-cycles", type=non_negative, default=0, metavar="N",
                   help="stop after N modelled cycles (exit 124); implies --cycles")


def attach_from_args(session: Session, args: argparse.Namespace) -> None:
    max_cycles = getattr(args, "max_cycles", 0) or 0
    if not (getattr(args, "cycles", False) or getattr(args, "profile", None) or max_cycles):
        return
    from emu.cycles import enable_cycle_model
    model = enable_cycle_model(session.machine, args.profile)
    if max_cycles:
        model.set_cycle_limit(max_cycles)
    session.attach(CycleReport(model))


class CycleReport:
    """The exit line and the --stats keys: cycles, instructions, profile, cycles_by_reason."""

    def __init__(self, model) -> None:
        self.model = model

    def report(self, out: IO[str]) -> None:
        self.model.report(out)

    def stats(self) -> dict[str, Any]:
        return self.model.stats()
