"""Exceptions of the BPF virtual machine.

One root, ``BpfError``; each subclass carries the data a caller needs (the
instruction index, the kernel errno) rather than only a message, in the way
the kernel's verifier log names ``insn_idx`` and the syscall returns -errno.
"""
from __future__ import annotations

import errno as _errno

from emu.errors import KprobeEmuError


class BpfError(KprobeEmuError):
    """Root of every error raised by probes.bpf (under the product's root).

    Attributes: ``errno`` - the kernel errno this error would be reported
    with by bpf(2) (EINVAL unless a subclass says otherwise).
    """

    errno: int = _errno.EINVAL
    exit_code = 2                  # a program or object refused: bad input to the CLI


class AsmError(BpfError):
    """The assembler could not parse a line.

    Attributes: ``line`` (1-based source line, 0 if unknown), ``reason``.
    """

    def __init__(self, reason: str, line: int = 0):
        self.reason = reason
        self.line = line
        super().__init__(f"line {line}: {reason}" if line else reason)


class VerifierError(BpfError):
    """The verifier refused a program (bpf(2) BPF_PROG_LOAD would fail).

    Attributes: ``insn_idx`` (None when the error is not about one
    instruction, e.g. an empty program), ``reason`` (kernel-like wording),
    ``log`` (the verifier log up to the refusal).
    """

    errno = _errno.EACCES

    def __init__(self, reason: str, insn_idx: int | None = None, log: str = "",
                 errno: int | None = None):
        self.reason = reason
        self.insn_idx = insn_idx
        self.log = log
        if errno is not None:
            self.errno = errno
        where = f"insn {insn_idx}: " if insn_idx is not None else ""
        super().__init__(f"verifier: {where}{reason}")


class BpfRuntimeError(BpfError):
    """A verified program faulted while running.

    Attributes: ``pc`` (instruction index in its program), ``insn_text``
    (disassembly of that instruction), ``reason``, ``prog_name``.
    """

    errno = _errno.EFAULT

    def __init__(self, reason: str, pc: int | None = None, insn_text: str = "",
                 prog_name: str = ""):
        self.reason = reason
        self.pc = pc
        self.insn_text = insn_text
        self.prog_name = prog_name
        where = ""
        if pc is not None:
            where = f"insn {pc}"
            if insn_text:
                where += f" ({insn_text})"
            if prog_name:
                where += f" of {prog_name}"
            where += ": "
        super().__init__(f"runtime: {where}{reason}")


class MapError(BpfError):
    """A user-space map operation failed; ``errno`` is the kernel's code
    (ENOENT for a missing key, EEXIST for BPF_NOEXIST on a present key,
    E2BIG when full, EINVAL for bad flags or sizes...)."""

    def __init__(self, err: int, reason: str = ""):
        self.errno = err
        self.reason = reason or _errno.errorcode.get(err, str(err))
        super().__init__(f"map: {self.reason} ({_errno.errorcode.get(err, err)})")


class LoaderError(BpfError):
    """An ELF object could not be loaded. Attributes: ``path``, ``reason``."""

    def __init__(self, reason: str, path: str = ""):
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)
