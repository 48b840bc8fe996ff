"""`emu run` options of Linux user mode: `--max-memory SIZE`, the guest's address-space
budget (RLIMIT_AS-like; every mapping counts, the probe layer's pages too), and the
--timeout deadline blocking host reads honour."""
from __future__ import annotations

import argparse
import re
import time

from emu.memory import DEFAULT_MAX_MEMORY
from emu.session import Session

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`512M`, `4G`, `65536`, `1.5G` (binary units, an optional trailing B/iB) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M or 4G)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if not 1 << 20 <= size <= 1 << 47:
        raise argparse.ArgumentTypeError(f"--max-memory {text}: must lie between 1M and 128T")
    return size


def cpu_count(text: str) -> int:
    """--cpus N: 1 to MAX_CPUS vCPUs."""
    from emu.smp import MAX_CPUS
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU count: {text!r}") from None
    if not 1 <= n <= MAX_CPUS:
        raise argparse.ArgumentTypeError(f"--cpus {text}: must lie between 1 and {MAX_CPUS}")
    return n


def add_cpus_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=cpu_count, default=1, metavar="N",
                   help="vCPUs over the one guest memory, threads placed round robin; "
                        "their interleaving is a function of --seed (default 1)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    add_cpus_option(p)
    p.add_argument("--max-memory", type=parse_size, default=DEFAULT_MAX_MEMORY, metavar="SIZE",
                   help="the guest's memory budget: mappings past it fail with ENOMEM "
                        f"(default {DEFAULT_MAX_MEMORY >> 30}G)")


def apply_from_args(session: Session, args) -> None:
    session.machine.memory.max_memory = getattr(args, "max_memory", DEFAULT_MAX_MEMORY)
    proc = session.guest.process
    timeout = getattr(args, "timeout", 0) or 0
    if proc is not None and timeout > 0:
        proc.deadline = time.monotonic() + timeout
