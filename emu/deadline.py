"""The wall-clock limit of one command (`emu run --timeout`): a deadline that starts when the
command does, so loading and set-up count, and can interrupt Python work that overruns it.

The machine stops a run at the time left (Unicorn's own timeout); `Deadline.interrupting`
covers what that cannot: loading a huge input, and a guest held in a host call."""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from emu.errors import KprobeEmuError


class WallClockLimit(KprobeEmuError):
    """`--timeout` ran out where the machine's own limit could not stop it (loading, probe
    set-up, a host call that blocks). Attributes: `seconds` (the limit), `during` (what was
    being done)."""

    exit_code = 124

    def __init__(self, seconds: float, during: str) -> None:
        self.seconds, self.during = seconds, during
        super().__init__(f"wall-clock limit of {seconds:g} s reached while {during}")


class _Expired(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` on the way (the ELF
    parser turns those into "malformed") swallows it."""


@dataclass
class Deadline:
    """A wall-clock limit that runs from its creation (`seconds` 0: none), so `--timeout`
    counts loading and set-up as well as the run."""
    seconds: float = 0.0
    start: float = field(default_factory=time.monotonic)

    @property
    def at(self) -> float | None:
        """The time.monotonic() value it expires at, or None."""
        return self.start + self.seconds if self.seconds else None

    def remaining(self) -> float:
        return math.inf if self.at is None else max(0.0, self.at - time.monotonic())

    @contextmanager
    def interrupting(self, during: str, grace: float = 0.0) -> Iterator[None]:
        """Raise WallClockLimit if the body outlives the deadline (plus `grace`). Python code
        is interrupted by SIGALRM, also inside a blocking host call or a Unicorn hook (the hook
        layer stops the run and re-raises); main thread only, elsewhere the limit is checked
        when the body ends. With a grace period the body is expected to stop itself at the
        deadline (the machine's own timeout) and the alarm is only the backstop."""
        if self.at is None:
            yield
            return
        armed = [threading.current_thread() is threading.main_thread()]

        def expire(_sig, _frame) -> None:
            if armed[0]:
                raise _Expired

        old = signal.signal(signal.SIGALRM, expire) if armed[0] else None
        try:
            if armed[0]:
                signal.setitimer(signal.ITIMER_REAL, max(self.remaining() + grace, 1e-6))
            yield
        except _Expired:
            raise WallClockLimit(self.seconds, during) from None
        finally:
            if armed[0]:
                armed[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
        if not grace and self.remaining() <= 0:
            raise WallClockLimit(self.seconds, during)
