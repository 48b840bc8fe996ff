"""Reserved text: which layer has patched, or may patch, which bytes of guest text (the
kernel spreads this over kprobe_table, ftrace_text_reserved, jump_label_text_reserved and
the optprobe checks; here it is one record per machine).

Every patcher records what it owns and consults the record before it writes: a kprobe's
breakpoint (while armed), an optimized probe's jump and the bytes it replaced (while the
jump is in place), an ftrace patch site (from discovery), and later `__jump_table` sites.
A write that would overlap someone else's bytes is refused with `TextBusy` (-EBUSY) or
left to the caller to avoid (`overlapping`)."""
from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass, field
from enum import StrEnum

from emu.machine import Machine
from probes.errors import KprobeError
from probes.text_poke import text_poke_live


class TextUse(StrEnum):
    KPROBE = "kprobe"              # a breakpoint (or a kprobe served by an ftrace site)
    OPTPROBE = "optprobe"          # an optimized probe's jump and the bytes it replaced
    FTRACE = "ftrace"              # an mcount / patchable-function-entry site
    JUMP_LABEL = "jump_label"      # a static-key site (probes/jump_label.py)


class TextBusy(KprobeError):
    """A patch would overwrite text another user reserved (-EBUSY); registering a kprobe
    there is refused with it."""


@dataclass(frozen=True, eq=False)
class Reservation:
    start: int
    end: int                       # exclusive
    use: TextUse
    owner: object

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end


@dataclass
class ReservedText:
    """The record; reservations are kept sorted by start address."""
    _starts: list[int] = field(default_factory=list)
    _items: list[Reservation] = field(default_factory=list)
    _longest: int = 0              # longest reservation: how far back a lookup must look

    def reserve(self, start: int, size: int, use: TextUse, owner: object) -> Reservation:
        res = Reservation(start, start + size, use, owner)
        i = bisect.bisect_right(self._starts, start)
        self._starts.insert(i, start)
        self._items.insert(i, res)
        self._longest = max(self._longest, size)
        return res

    def release(self, res: Reservation) -> None:
        i = bisect.bisect_left(self._starts, res.start)
        while i < len(self._items) and self._starts[i] == res.start:
            if self._items[i] is res:
                del self._starts[i], self._items[i]
                return
            i += 1

    def release_owner(self, owner: object, use: TextUse) -> None:
        for res in [r for r in self._items if r.owner is owner and r.use is use]:
            self.release(res)

    def overlapping(self, start: int, end: int, use: TextUse | None = None) -> list[Reservation]:
        """Reservations that share a byte with [start, end), by start address."""
        lo = bisect.bisect_left(self._starts, start - self._longest)
        hi = bisect.bisect_left(self._starts, end)
        return [r for r in self._items[lo:hi]
                if r.overlaps(start, end) and (use is None or r.use is use)]

    def text_poke(self, m: Machine, addr: int, data: bytes, owner: object) -> None:
        """Write `data` at `addr` for `owner`, keeping the bytes other owners reserved as
        they stand (an ftrace site rewritten around a kprobe on its second nop)."""
        buf = bytearray(data)
        for r in self.overlapping(addr, addr + len(data)):
            if r.owner is not owner:
                lo, hi = max(r.start, addr), min(r.end, addr + len(data))
                buf[lo - addr:hi - addr] = m.memory.read(lo, hi - lo)
        text_poke_live(m, addr, bytes(buf))

    def check(self, start: int, size: int, owner: object, what: str = "patch") -> None:
        """Refuse a write of [start, start+size) that touches text reserved by another."""
        for r in self.overlapping(start, start + size):
            if r.owner is not owner:
                # check_kprobe_address_safe: a jump-label site is -EINVAL, the rest -EBUSY
                code = errno.EINVAL if r.use is TextUse.JUMP_LABEL else errno.EBUSY
                raise TextBusy(code, f"{what} at {start:#x} overlaps the {r.use} "
                                            f"text at {r.start:#x}..{r.end:#x}")


def reserved_text_of(machine: Machine) -> ReservedText:
    reserved: ReservedText = machine.layer("reserved_text", lambda _m: ReservedText())
    return reserved
