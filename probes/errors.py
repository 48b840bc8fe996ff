"""Probe-layer errors carry the kernel's errno and a reason, like UcError/CsError."""
from __future__ import annotations

import errno as _errno

from emu.errors import KprobeEmuError


class KprobeError(KprobeEmuError):
    """A refused registration: `errno` is the kernel's (EINVAL, ENOENT, EILSEQ, ...)."""

    exit_code = 2

    def __init__(self, err: int, reason: str, where: str = "") -> None:
        self.errno = err
        self.reason = reason
        self.where = where
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{where + ': ' if where else ''}-{name}: {reason}")
