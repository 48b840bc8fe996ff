"""`emu run` options of live text patching: `--text-poke protocol|naive` (how text other
CPUs may be running is rewritten, probes/text_poke.py) and `--flip-static-key KEY@FUNC`
(each time the guest enters FUNC, static key KEY is toggled and its jump-label sites
rewritten, as a module flipping a key from a kprobe would). With `--cpus 2` or more the
rewrites happen while other CPUs run the sites: the kernel's protocol keeps every CPU on
either the old or the new instruction, the naive byte-by-byte write tears it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import IO, Any

from emu.errors import UsageError
from emu.session import Session
from probes.jump_label import JumpLabelError, StaticKey, jump_labels_of
from probes.kprobes import Kprobe, kprobes_of
from probes.errors import KprobeError
from probes.text_poke import PokeMode, TextPoker, text_poker_of


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-poke", choices=[m.value for m in PokeMode], default="protocol",
                   help="how live text is patched while other CPUs run: the kernel's "
                        "protocol (text_poke_bp / patch_text) or naive byte writes (tears "
                        "instructions; a demonstration)")
    p.add_argument("--flip-static-key", action="append", default=[], metavar="KEY@FUNC",
                   help="toggle the static key KEY (a symbol) each time the guest enters "
                        "FUNC, rewriting its jump-label sites mid-run (repeatable)")


@dataclass
class KeyFlipper:
    """One --flip-static-key: the key, the kprobe on FUNC, the flips made."""
    spec: str
    key: StaticKey
    probe: Kprobe
    poker: TextPoker
    flips: int = 0

    def report(self, out: IO[str]) -> None:
        print(f"emu: {self.spec}: {self.flips} flips, {self.poker.pokes} pokes while other "
              f"CPUs ran, {self.poker.emulated} int3 hits emulated ({self.poker.mode})", file=out)

    def stats(self) -> dict[str, Any]:
        return {"text_poke": {"mode": str(self.poker.mode), "flips": self.flips,
                              "live_pokes": self.poker.pokes,
                              "int3_emulated": self.poker.emulated}}


def attach_from_args(session: Session, args: argparse.Namespace) -> None:
    m = session.machine
    poker = text_poker_of(m)
    poker.mode = PokeMode(getattr(args, "text_poke", "protocol"))
    for spec in getattr(args, "flip_static_key", None) or []:
        key_name, at, func = spec.partition("@")
        if not at or not key_name or not func:
            raise UsageError(f"--flip-static-key {spec!r}: give KEY@FUNC")
        sym = m.symbols.lookup(key_name)
        if sym is None:
            raise UsageError(f"--flip-static-key {spec}: no symbol {key_name!r}")
        try:
            key = jump_labels_of(m).static_key(sym.addr)
        except KprobeError as e:
            raise UsageError(f"--flip-static-key {spec}: {e.reason}") from None
        session.attach(_flipper(m, spec, key, func, poker))


def _flipper(m, spec: str, key: StaticKey, func: str, poker: TextPoker) -> KeyFlipper:
    labels = jump_labels_of(m)

    def pre(_p, _regs) -> int:
        flip = labels.static_key_disable if labels.static_key_enabled(key) else \
            labels.static_key_enable
        try:
            flip(key)
        except JumpLabelError as e:          # a site torn by the naive writes: say so
            m.stop_limit(f"--flip-static-key {spec}: {e.reason}")
        flipper.flips += 1
        return 0

    probe = Kprobe(symbol_name=func, pre_handler=pre)
    flipper = KeyFlipper(spec, key, probe, poker)
    try:
        kprobes_of(m).register_kprobe(probe)
    except KprobeError as e:
        raise UsageError(f"--flip-static-key {spec}: cannot probe {func}: {e.reason}") from None
    return flipper
