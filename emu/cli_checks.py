"""Checks of command-line values, as argparse `type=` callables: a bad value is refused while
parsing, before a guest is loaded or run, with one line that names it (exit 2).

Output files are checked up front too (the directory exists and is writable), so a long run
is not wasted on a `--stats` path that cannot be written; what only writing can reveal (a full
disk, /dev/full) is reported when it happens, by `write_output`."""
from __future__ import annotations

import argparse
import math
import os
import stat

from emu.errors import UsageError
from probes.location import LocationError, LocationFault, parse_probe_location

U63_MAX = (1 << 63) - 1
MAX_SECONDS = 1e9               # ~31 years; beyond it Unicorn's microsecond count overflows
MAX_INPUT_BYTES = 256 << 20     # a text or object input (BPF --asm/--obj) read whole
MAX_ELF_BYTES = 1 << 30         # a guest ELF, read whole by the loader


def integer(lo: int = 0, hi: int = U63_MAX, what: str = "an integer"):
    """An int in [lo, hi]; base prefixes (0x) allowed."""
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not lo <= value <= hi:
            bounds = f">= {lo}" if hi == U63_MAX else f"{lo}..{hi}"
            raise argparse.ArgumentTypeError(f"{text} is out of range ({what}: {bounds})")
        return value
    parse.__name__ = "integer"          # argparse names the type in its messages
    return parse


non_negative = integer(0, U63_MAX, "a count")
positive = integer(1, U63_MAX, "a count")
u64 = integer(0, (1 << 64) - 1, "a 64-bit unsigned integer")


def seconds(text: str) -> float:
    """A finite, non-negative number of seconds (0: no limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds between 0 and "
                                         f"{MAX_SECONDS:g} (0: no limit)")
    return value


def glob_list(values: list[str]) -> list[str]:
    """Each of a repeatable comma-separated option names at least one pattern (an empty one
    from an unset variable would otherwise trace nothing, silently)."""
    for value in values:
        if not any(value.split(",")):
            raise argparse.ArgumentTypeError(f"{value!r}: no pattern")
    return values


def probe_location(text: str) -> str:
    """SYM, SYM+OFF or ADDR as kprobe_events takes them: a name, an offset >= 0, an address
    that fits in 64 bits. (What the name means is the probe layer's to say.)"""
    try:
        addr = int(text, 0)
    except ValueError:
        addr = None
    if addr is not None:
        if not 0 <= addr < 1 << 64:
            raise argparse.ArgumentTypeError(f"{text}: not a 64-bit address")
        return text
    try:
        parse_probe_location(text)
    except LocationError as e:
        shown = repr(text) if e.why is LocationFault.NO_SYMBOL else text
        raise argparse.ArgumentTypeError(f"{shown}: {e.why.value}") from None
    return text


def probe_locations(values: list[str]) -> list[str]:
    for value in values:
        probe_location(value)
    return values


def directory(text: str) -> str:
    """An existing directory, given explicitly (`realpath("")` would be the cwd)."""
    if not text:
        raise argparse.ArgumentTypeError("empty path (give a directory, e.g. --fs .)")
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return text


def output_file(text: str) -> str:
    """A file we will be able to create or overwrite (checked now, written later)."""
    if not text:
        raise argparse.ArgumentTypeError("empty file name")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory")
    if os.path.exists(text):
        if not os.access(text, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: permission denied")
        return text
    parent = os.path.dirname(text) or "."
    if not os.path.isdir(parent):
        what = "not a directory" if os.path.exists(parent) else "no such directory"
        raise argparse.ArgumentTypeError(f"{text}: {parent}: {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {parent}: permission denied")
    return text


def input_file(text: str, limit: int = MAX_ELF_BYTES) -> str:
    """A file that can be read whole: missing files and directories are left to the reader
    (its messages), but a FIFO, a device or /dev/zero would block or never end, and a file
    over `limit` bytes would take that much host memory."""
    if not text:
        raise argparse.ArgumentTypeError("empty file name")
    try:
        st = os.stat(text)
    except OSError:
        return text
    if stat.S_ISDIR(st.st_mode):
        return text
    if not stat.S_ISREG(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text}: not a regular file")
    if st.st_size > limit:
        raise argparse.ArgumentTypeError(f"{text}: too large ({st.st_size} bytes, at most "
                                         f"{limit})")
    return text


def bounded_input_file(text: str) -> str:
    """`input_file` for text and objects (BPF --asm/--obj), at most MAX_INPUT_BYTES."""
    return input_file(text, MAX_INPUT_BYTES)


class OutputError(UsageError):
    """Writing an output file failed. Attributes: `option` (e.g. --stats), `path`, `errno`."""

    def __init__(self, option: str, path: str, cause: OSError) -> None:
        self.option, self.path, self.errno = option, path, cause.errno
        super().__init__(f"{option} {path}: {cause.strerror or cause}")


def write_output(option: str, path: str, text: str) -> None:
    """Write `text` to `path`; an OSError (ENOSPC, EIO, ...) becomes an OutputError."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise OutputError(option, path, e) from None
