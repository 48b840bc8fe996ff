"""The shared conformance corpus through ``assemble`` + ``run``, on both engines.

* bpf/tests and ubpf/tests (all of it, helpers/ and extensions/ included):
  the expected r0, or a refusal/fault where an error is expected. uBPF's
  error texts are its own wording, so only the fact of the error counts.
* bpf/negative: files a conformance runner must catch. Each must end in a
  parse error or an outcome that does not match its stated expectation,
  except the ``unused-*`` files (non-zero reserved fields, an empty
  ``-- error``), which the verifier must refuse.
* files with both ``-- asm`` and ``-- raw`` check the assembler; every
  program must survive disassemble -> assemble unchanged.

Deliberate exceptions are listed in tests/data/bpf/conformance_exceptions.txt
(and probes/bpf/README.md).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from probes import bpf
from probes.bpf.datafile import DataFile, parse_data_file
from probes.bpf.helpers import BpfArgType, BpfFuncProto
from probes.bpf.runtime import BpfRun, ProgramExit

DATA = Path(__file__).resolve().parent / "data" / "bpf"


def conformance_dir() -> Path:
    """The corpus vendored in tests/data/conformance (bpf_conformance's data files with their
    licences); KPROBE_EMU_SHARED=DIR points at another copy's parent (DIR/conformance)."""
    env = os.environ.get("KPROBE_EMU_SHARED")
    return Path(env) / "conformance" if env else Path(__file__).resolve().parent / "data" / "conformance"


CONFORMANCE = conformance_dir()
assert CONFORMANCE.is_dir(), f"conformance corpus missing at {CONFORMANCE}"


def _exceptions() -> dict[str, str]:
    out = {}
    for line in (DATA / "conformance_exceptions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            out[name] = reason.strip()
    return out


EXCEPTIONS = _exceptions()
POSITIVE = sorted(CONFORMANCE.glob("bpf/tests/*.data")) + sorted(CONFORMANCE.glob("ubpf/tests/**/*.data"))
NEGATIVE = sorted(CONFORMANCE.glob("bpf/negative/*.data"))
ENGINES = ["interp", "jit"]


def _runnable(path: Path) -> bool:
    """Files with a result or an error; the rest only test the assembler."""
    text = path.read_text()
    return "-- result" in text or "-- error" in text


def _rel(path: Path) -> str:
    return str(path.relative_to(CONFORMANCE))


# --- uBPF's test-plugin helpers (0 gather_bytes, 1 memfrob, 2 no_op, 3 sqrti,
#     4 strcmp_ext, 5 unwind), which the ubpf/ files call by those numbers ---

def _gather_bytes(run: BpfRun, a: int, b: int, c: int, d: int, e: int) -> int:
    return ((a & 0xFF) << 32) | ((b & 0xFF) << 24) | ((c & 0xFF) << 16) | ((d & 0xFF) << 8) | (e & 0xFF)


def _memfrob(run: BpfRun, ptr: int, n: int, *_: int) -> int:
    run.write(ptr, bytes(x ^ 42 for x in run.read(ptr, n)))
    return 0


def _strcmp(run: BpfRun, a: int, b: int, *_: int) -> int:
    sa, sb = run.read_str(a, 4096), run.read_str(b, 4096)
    return (sa > sb) - (sa < sb)


def _unwind(run: BpfRun, x: int, *_: int) -> int:
    if x == 0:
        raise ProgramExit(0)  # uBPF's unwind extension: stop the program, r0 = 0
    return x


UBPF_HELPERS = {
    fid: BpfFuncProto(fid, name, impl, (BpfArgType.ARG_ANYTHING,) * nargs)
    for fid, name, impl, nargs in [
        (0, "gather_bytes", _gather_bytes, 5), (1, "memfrob", _memfrob, 2),
        (2, "no_op", lambda run, *a: 0, 0), (3, "sqrti", lambda run, x, *a: math.isqrt(x), 1),
        (4, "strcmp_ext", _strcmp, 2), (5, "unwind", _unwind, 1)]}


def _helpers_for(path: Path) -> dict[int, BpfFuncProto] | None:
    return UBPF_HELPERS if "ubpf" in path.relative_to(CONFORMANCE).parts else None


def outcome(df: DataFile, engine: str) -> tuple[str, object]:
    """What a runner makes of a file: ("parse-error" | "refused" | "fault", message)
    or ("result", r0)."""
    try:
        code = bpf.assemble(df.asm) if df.asm is not None else df.raw
    except bpf.AsmError as e:
        return "parse-error", str(e)
    if not code:
        return "parse-error", "the test file has no instructions"
    try:
        return "result", bpf.run(code, df.mem, helpers=_helpers_for(df.path), engine=engine)
    except bpf.VerifierError as e:
        return "refused", str(e)
    except bpf.BpfRuntimeError as e:
        return "fault", str(e)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", [p for p in POSITIVE if _runnable(p)], ids=_rel)
def test_conformance(path: Path, engine: str) -> None:
    if _rel(path) in EXCEPTIONS:
        pytest.xfail(EXCEPTIONS[_rel(path)])
    df = parse_data_file(path)
    kind, value = outcome(df, engine)
    if df.error is not None:
        assert kind in ("refused", "fault"), f"expected an error ({df.error}), got {kind} {value}"
    else:
        assert (kind, value) == ("result", df.result), f"got {kind}: {value!r}"


@pytest.mark.parametrize("path", [p for p in POSITIVE if "-- raw" in p.read_text()
                                  and "-- asm" in p.read_text()], ids=_rel)
def test_assembler_matches_raw(path: Path) -> None:
    df = parse_data_file(path)
    assert bpf.assemble(df.asm).hex(" ") == df.raw.hex(" ")  # type: ignore[arg-type, union-attr]


@pytest.mark.parametrize("path", [p for p in POSITIVE if "-- asm" in p.read_text()], ids=_rel)
def test_disassembler_round_trip(path: Path) -> None:
    code = bpf.assemble(parse_data_file(path).asm)  # type: ignore[arg-type]
    assert bpf.assemble(bpf.disassemble(code)) == code


def _caught(df: DataFile, kind: str, value: object) -> bool:
    """Would a runner report this file as failing?"""
    if kind == "parse-error":
        return True
    if df.error is not None:
        return kind == "result" or df.error.lower() not in str(value).lower()
    return kind != "result" or value != df.result


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", NEGATIVE, ids=_rel)
def test_negative(path: Path, engine: str) -> None:
    try:
        df = parse_data_file(path)
    except bpf.AsmError:
        return  # an unknown directive: the file itself is refused
    kind, value = outcome(df, engine)
    if df.error == "":
        assert kind == "refused", f"reserved fields must be refused, got {kind} {value}"
        assert "reserved" in str(value)
    else:
        assert _caught(df, kind, value), f"{kind} {value!r} would pass as a conformance result"


def test_corpus_is_complete() -> None:
    """Guard against a silently empty or partial corpus."""
    assert len(list(CONFORMANCE.glob("bpf/tests/*.data"))) == 313
    assert len(NEGATIVE) == 60
    assert len(list(CONFORMANCE.glob("ubpf/tests/**/*.data"))) == 77
