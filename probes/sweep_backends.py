"""Where the sweep's tasks run: in this process, on a local pool over the cores, or on a
Ray cluster. Every backend yields (task, results) as tasks finish, in any order; the sweep
merges them in task order, so all backends give the same report. The work function is the
sweep's `check_task` unless the caller names another module-level function of (shared
input, task) (the bench and cycle matrices, probes/sweep_matrix.py): one pool for all."""
from __future__ import annotations

import logging
import multiprocessing
from typing import Any, Callable, Iterator, Protocol

from probes.sweep import OffsetResult, Plan, check_task, result_key


# (shared input, task) -> the task's result; module-level, so Ray ships it by reference.
Work = Callable[[Any, Any], Any]


class Backend(Protocol):
    def map(self, plan: Any, tasks: list[Any], work: Work = check_task) -> Iterator[tuple[Any, Any]]: ...


_PLAN: list[Any] = []           # the (plan, work) of a pool worker (inherited through fork)


def _init(plan: Any, work: Work) -> None:
    _PLAN[:] = [plan, work]


def _work(task: Any) -> tuple[Any, Any]:
    plan, work = _PLAN
    return task, work(plan, task)


class LocalPool:
    """`jobs` worker processes (fork), each keeping its own snapshots; 1: in this process."""

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = max(1, jobs)

    def map(self, plan: Any, tasks: list[Any], work: Work = check_task) -> Iterator[tuple[Any, Any]]:
        if self.jobs == 1 or len(tasks) <= 1:
            for t in tasks:
                yield t, work(plan, t)
            return
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(self.jobs, len(tasks)), _init, (plan, work)) as pool:
            # imap hands tasks out in dispatch order, so each worker's snapshots move forward
            yield from pool.imap_unordered(_work, tasks, chunksize=1)


# --- Ray --------------------------------------------------------------------------------------
def start_local_ray(cpus: int) -> None:
    """A Ray instance for this process alone: head and workers here, on loopback, with
    this checkout on the workers' path."""
    import os
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": path}})


def _ray_call(work: Work, plan: Any, task: Any) -> Any:
    return work(plan, task)


class RayBackend:
    """Tasks on a Ray cluster (`address`, e.g. "10.0.0.5:6379" after `ray start --head`
    there), or on a Ray instance started for this sweep when `address` is None (`jobs`
    CPUs, loopback only). The plan (the parsed binary with its bytes, the inputs, the
    unprobed outcome) goes through the object store once; each worker process keeps its
    own snapshots across the tasks it runs. A task whose worker dies is retried
    (`retries` times); at most `window` tasks are in flight, handed out in dispatch order."""

    def __init__(self, address: str | None = None, jobs: int = 2, retries: int = 3,
                 window: int | None = None) -> None:
        self.address, self.jobs, self.retries = address, max(1, jobs), retries
        self.window = window or 4 * self.jobs

    def _init(self):
        try:
            import ray
        except ImportError:
            from emu.errors import UsageError
            raise UsageError("--backend ray needs Ray: pip install 'kprobe-emu[ray]'") from None
        if ray.is_initialized():
            return ray, False
        if self.address:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            start_local_ray(self.jobs)
        return ray, True

    def map(self, plan: Any, tasks: list[Any], work: Work = check_task) -> Iterator[tuple[Any, Any]]:
        if not tasks:
            return
        ray, started = self._init()
        try:
            remote = ray.remote(max_retries=self.retries, num_cpus=1)(_ray_call)
            plan_ref = ray.put(plan)
            todo, pending = list(reversed(tasks)), dict[Any, Any]()
            while todo or pending:
                while todo and len(pending) < self.window:
                    t = todo.pop()
                    pending[remote.remote(work, plan_ref, t)] = t
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    yield pending.pop(ref), ray.get(ref)
        finally:
            if started:
                ray.shutdown()


# --- the results file -------------------------------------------------------------------------
class JsonLines:
    """Rows streamed as JSON lines, each tagged with `plan` (a digest of what produced it),
    so an interrupted run resumes where it stopped. A torn last line (the process killed
    mid-write) is dropped; a row of another plan makes resuming refuse."""

    def __init__(self, path: str, resume: bool = False) -> None:
        self.path, self.resume = path, resume
        self._f: Any = None

    def open_rows(self, plan_key: str, what: str) -> list[dict]:
        """The whole rows of an earlier run of this plan (none unless resuming); the file
        is then open to append after them."""
        import json
        import os
        from emu.errors import UsageError
        rows: list[dict] = []
        good = 0
        if self.resume and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        row = json.loads(line) if line.endswith(b"\n") else None
                    except ValueError:
                        row = None
                    if not isinstance(row, dict):
                        break                   # torn tail: resume from the last whole line
                    if row.get("plan") != plan_key:
                        raise UsageError(f"{self.path}: results of another {what}; not resuming from it")
                    rows.append(row)
                    good += len(line)
        self._f = open(self.path, "r+b" if self.resume and os.path.exists(self.path) else "wb")
        self._f.truncate(good)
        self._f.seek(good)
        return rows

    def write_rows(self, rows: list[dict]) -> None:
        import json
        assert self._f is not None
        for row in rows:
            self._f.write(json.dumps(row, sort_keys=True).encode() + b"\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ResultsFile(JsonLines):
    """The sweep's results, one line per offset, keyed by (binary sha256, mode, function,
    offset) and tagged with the sweep's plan key (the binary and every input)."""

    def open(self, plan: Plan) -> dict[tuple, OffsetResult]:
        done: dict[tuple, OffsetResult] = {}
        for row in self.open_rows(plan.key, "sweep (a different binary, mode or inputs)"):
            r = OffsetResult(**row["result"])
            done[(row["sha256"], row["mode"], r.function, r.offset)] = r
        return done

    def write(self, plan: Plan, results: list[OffsetResult]) -> None:
        import dataclasses
        rows = []
        for r in results:
            sha, mode, func, off = result_key(plan, r)
            rows.append({"sha256": sha, "mode": mode, "function": func, "offset": off,
                         "plan": plan.key, "result": dataclasses.asdict(r)})
        self.write_rows(rows)
