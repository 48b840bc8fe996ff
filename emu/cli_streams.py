"""The streams of one `emu` command: commands get text streams (`args.stdout`, `args.stderr`)
and hand the guest their binary side. A caller's text stream without a binary buffer (an
in-process StringIO) gets a sink that decodes the guest's bytes as a terminal would."""
from __future__ import annotations

import io
from typing import IO, Any, BinaryIO


class TextSink(io.RawIOBase):
    """Guest bytes into a text stream that has no binary buffer."""

    def __init__(self, text: IO[str]) -> None:
        self.text = text

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.text.write(bytes(data).decode(errors="replace"))
        return len(data)


def binary_of(stream: IO[str]) -> BinaryIO:
    """The binary side of a text stream: its buffer, else a TextSink over it."""
    buffer = getattr(stream, "buffer", None)
    return buffer if buffer is not None else TextSink(stream)   # type: ignore[return-value]
