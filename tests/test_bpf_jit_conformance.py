"""The guest JIT against the reference interpreter on the whole conformance corpus, on
both arches: every file that runs gives the same r0 and the same memory, and every file
that must fail fails (refused by the verifier, or a fault in the JITed code)."""
from __future__ import annotations

from pathlib import Path

import pytest

from probes import bpf
from probes.bpf.datafile import parse_data_file
from probes.bpf.program import BpfProg
from test_bpf_conformance import CONFORMANCE, EXCEPTIONS, POSITIVE, _helpers_for, _rel, _runnable

ARCHES = ["arm64", "x86_64"]


def outcome(path: Path, engine: str, arch: str | None) -> tuple[str, object, bytes]:
    """(kind, r0 or message, memory after the run)."""
    from probes.bpf.jit_guest import run_prog

    df = parse_data_file(path)
    try:
        code = bpf.assemble(df.asm) if df.asm is not None else df.raw
    except bpf.AsmError as e:
        return "parse-error", str(e), b""
    helpers = _helpers_for(path)
    prog = BpfProg.from_bytes(code, **({"helpers": helpers} if helpers else {}))
    mem = bytearray(df.mem or b"")
    try:
        if arch is None:
            return "result", prog.run(mem, engine=engine), bytes(mem)
        return "result", run_prog(prog, mem, arch=arch)[0], bytes(mem)
    except bpf.VerifierError as e:
        return "refused", str(e), b""
    except bpf.BpfRuntimeError as e:
        return "fault", str(e), b""


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("path", [p for p in POSITIVE if _runnable(p)], ids=_rel)
def test_jit_matches_interpreter(path: Path, arch: str) -> None:
    if _rel(path) in EXCEPTIONS:
        pytest.xfail(EXCEPTIONS[_rel(path)])
    want = outcome(path, "interp", None)
    got = outcome(path, "jit", arch)
    df = parse_data_file(path)
    if df.error is not None:
        assert got[0] in ("refused", "fault"), f"expected an error ({df.error}), got {got}"
    else:
        assert (got[0], got[1]) == ("result", df.result), f"got {got[0]}: {got[1]!r}"
    if want[0] == "result":
        assert got == want
    else:
        assert got[0] == want[0], (want, got)


def test_corpus_present() -> None:
    assert len(list(CONFORMANCE.glob("bpf/tests/*.data"))) == 313
