"""The uBPF / bpf_conformance ``.data`` test file format.

Sections start with a line containing ``--``: ``-- asm`` (program text),
``-- raw`` (instructions as 64-bit numbers, one per slot, or rows of eight
hex bytes), ``-- mem`` (hex bytes), ``-- result`` (expected r0),
``-- error`` / ``-- error pattern`` (an expected refusal or fault), and
sections a runner ignores (``-- c``, ``-- no jit``, ``-- description``...).
``-- asm @ FILE`` and ``-- mem @ FILE`` read the section from a side file.
``#`` starts a comment everywhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AsmError

_KNOWN = {"asm", "raw", "mem", "result", "error", "error pattern", "c", "no register offset",
          "no jit", "description", "reload", "unload"}
# sections of this project's own case tables (tests/data/bpf/*.cases)
_EXTENSIONS = {"type", "maps", "license"}


@dataclass
class DataFile:
    """One parsed test. ``sections`` maps a section name to its lines
    (comments stripped); ``flags`` lists sections that carry no text
    (``reload``, ``unload``)."""

    path: Path
    sections: dict[str, list[str]] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)

    @property
    def asm(self) -> str | None:
        return "\n".join(self.sections["asm"]) if "asm" in self.sections else None

    @property
    def raw(self) -> bytes | None:
        if "raw" not in self.sections:
            return None
        return parse_raw(self.sections["raw"])

    @property
    def mem(self) -> bytes:
        text = " ".join(self.sections.get("mem", []))
        if re.search(r"0x[0-9a-fA-F]{4}:", text):  # tcpdump -x style: "0x0000:  0026 622f ..."
            text = re.sub(r"0x[0-9a-fA-F]+:", " ", text)
            return bytes.fromhex("".join(text.split()))
        return bytes(int(tok, 16) for tok in text.split())

    @property
    def result(self) -> int | None:
        lines = [ln for ln in self.sections.get("result", []) if ln]
        if not lines:
            return None
        return int(lines[0], 16) if lines[0].lower().startswith("0x") else int(lines[0])

    @property
    def error(self) -> str | None:
        for name in ("error", "error pattern"):
            if name in self.sections:
                return " ".join(self.sections[name]).strip()
        return None


def parse_raw(lines: list[str]) -> bytes:
    out = bytearray()
    for line in lines:
        toks = line.split()
        if len(toks) == 8 and all(re.fullmatch(r"[0-9a-fA-F]{2}", t) for t in toks):
            out += bytes(int(t, 16) for t in toks)  # one slot written as its 8 bytes
            continue
        for tok in toks:
            value = int(tok, 16) if tok.lower().startswith("0x") else int(tok)
            out += (value & (2**64 - 1)).to_bytes(8, "little")
    return bytes(out)


def parse_data_file(path: str | Path, extensions: bool = False) -> DataFile:
    """Parse one ``.data`` file; raise AsmError for an unknown directive."""
    path = Path(path)
    return parse_data_text(path.read_text(), path, extensions)


def parse_data_text(text: str, path: Path, extensions: bool = False,
                    first_line: int = 1) -> DataFile:
    df = DataFile(path)
    known = _KNOWN | _EXTENSIONS if extensions else _KNOWN
    current: list[str] | None = None
    for lineno, raw in enumerate(text.splitlines(), first_line):
        line = raw.split("#", 1)[0].rstrip()
        if line.lstrip().startswith("--"):
            name, _, side = line.strip()[2:].strip().partition("@")
            name = name.strip()
            if name not in known:
                raise AsmError(f"unknown directive {line.strip()!r}", lineno)
            if name in ("reload", "unload"):
                df.flags.add(name)
            current = df.sections.setdefault(name, [])
            if side.strip():
                current.extend(ln.split("#", 1)[0].rstrip()
                               for ln in (path.parent / side.strip()).read_text().splitlines())
            continue
        if current is not None and line.strip():
            current.append(line.strip())
    return df


def parse_case_table(path: str | Path) -> list[tuple[str, DataFile]]:
    """A table of cases in one file: each starts with ``=== name`` and holds
    ``.data`` sections plus ``-- type`` (program type), ``-- license`` and
    ``-- maps`` (lines ``fd type key_size value_size max_entries [flags]``)."""
    path = Path(path)
    cases: list[tuple[str, DataFile]] = []
    name, start, lines = None, 0, []
    for lineno, line in enumerate(path.read_text().splitlines() + ["=== "], 1):
        if line.startswith("=== "):
            if name is not None:
                cases.append((name, parse_data_text("\n".join(lines), path, True, start)))
            name, start, lines = line[4:].strip(), lineno + 1, []
        elif name is not None:
            lines.append(line)
    return cases
