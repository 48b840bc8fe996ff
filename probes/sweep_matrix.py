"""Matrices of independent cells on the sweep's backends: `emu bench` (arch × profile × probe
kind × BPF engine) and the cycle model's bench (benchmarks/bench_cycles.py: profiles and
workloads). The same local pool or Ray cluster (probes/sweep_backends.py), progress on
stderr and a resumable JSON-lines file as `emu sweep`; the cells come back in any order and
the report is merged in cell order, so every backend gives the serial report. Modelled
figures (cycles, instructions) are then identical; host-time figures are measured where
the cell ran and differ from run to run."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

from probes.sweep import Progress
from probes.sweep_backends import Backend, JsonLines, LocalPool, Work


@dataclass(frozen=True)
class Cell:
    """One row of a matrix. `key` names it in the results file (e.g. ("arm64", "cortex-a72",
    "k", "python")); `spec` is what the work function needs (picklable)."""
    index: int
    key: tuple[str, ...]
    spec: Any


@dataclass
class Matrix:
    """`work(inputs, cell)` -> a JSON-able dict, for every cell. `name` and `inputs` (what
    every cell shares: call counts, repeats) tag the results file, so a file of another
    matrix or other inputs is not resumed from."""
    name: str
    inputs: Any
    cells: list[Cell]
    work: Work

    @property
    def key(self) -> str:
        return hashlib.sha256(repr([self.name, self.inputs]).encode()).hexdigest()[:16]


class MatrixJournal(Protocol):
    def open(self, m: Matrix) -> dict[tuple[str, ...], dict]: ...
    def write(self, m: Matrix, cell: Cell, result: dict) -> None: ...
    def close(self) -> None: ...


class MatrixResults(JsonLines):
    """One line per cell: {"matrix", "plan", "cell": key, "result"}."""

    def open(self, m: Matrix) -> dict[tuple[str, ...], dict]:
        rows = self.open_rows(m.key, f"{m.name} matrix (other cells' inputs)")
        return {tuple(row["cell"]): row["result"] for row in rows}

    def write(self, m: Matrix, cell: Cell, result: dict) -> None:
        self.write_rows([{"matrix": m.name, "plan": m.key, "cell": list(cell.key), "result": result}])


def _plain(result: dict) -> dict:
    """The result as the results file gives it back (lists, not tuples), so a resumed cell
    and a fresh one compare equal."""
    return json.loads(json.dumps(result))


def run_matrix(m: Matrix, backend: Backend | None = None, journal: MatrixJournal | None = None,
               progress: Progress | None = None) -> list[dict]:
    """Every cell's result, in cell order. Cells found in `journal` (an interrupted run)
    are not run again."""
    done = journal.open(m) if journal is not None else {}
    results: dict[int, dict] = {c.index: done[c.key] for c in m.cells if c.key in done}
    todo = [c for c in m.cells if c.index not in results]
    if progress is not None:
        progress.start(len(m.cells), len(results))
    backend = backend if backend is not None else LocalPool(1)
    try:
        for cell, res in backend.map(m.inputs, todo, m.work):
            results[cell.index] = _plain(res)
            if journal is not None:
                journal.write(m, cell, results[cell.index])
            if progress is not None:
                progress.advance(1)
    finally:
        if journal is not None:
            journal.close()
        if progress is not None:
            progress.finish()
    return [results[c.index] for c in m.cells]
