"""The Ray backend (probes/sweep_backends.py): a local Ray instance (head and 2 worker CPUs
on loopback) runs a small sweep and gives the local pool's report and results file; a task
whose worker dies is retried. Needs the `ray` extra (pip install 'kprobe-emu[ray]')."""
from __future__ import annotations

import os
import sys

import pytest

from conftest import ARCHES, firmware_elf
from probes.sweep import Plan, SweepConfig, sweep
from probes.sweep_backends import LocalPool, RayBackend, ResultsFile

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    from probes.sweep_backends import start_local_ray
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])     # CrashOncePlan below
    start_local_ray(2)
    yield
    ray.shutdown()


def cfg(arch: str) -> SweepConfig:
    return SweepConfig(path=str(firmware_elf(arch, "demo")), funcs=["do_sys_open", "main"])


@pytest.mark.parametrize("arch", ARCHES)
def test_ray_gives_the_local_pools_report(local_ray, arch, tmp_path):
    files = {name: tmp_path / f"{name}.jsonl" for name in ("ray", "pool")}
    res_ray = sweep(cfg(arch), RayBackend(jobs=2), ResultsFile(str(files["ray"])))
    res_pool = sweep(cfg(arch), LocalPool(2), ResultsFile(str(files["pool"])))
    assert res_ray.to_json() == res_pool.to_json()
    assert res_ray.mismatches == 0 and res_ray.checked > 50
    lines = {k: sorted(f.read_text().splitlines()) for k, f in files.items()}
    assert lines["ray"] == lines["pool"] and len(lines["ray"]) == len(res_ray.results)
    assert ray.is_initialized()                 # a running instance is used, not stopped


class CrashOncePlan(Plan):
    """A plan whose first use in any worker kills that worker (once in all)."""
    marker = ""

    @property
    def resumable(self) -> bool:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().resumable


def test_a_dead_worker_is_retried(local_ray, tmp_path, monkeypatch):
    from probes import sweep as sweep_mod
    marker = tmp_path / "crashed"
    real = sweep_mod.prepare

    def prepare(c):
        prepared = real(c)
        prepared.plan.__class__ = CrashOncePlan
        prepared.plan.marker = str(marker)
        prepared.plan.key += "-crash"          # workers make a new runner, asking `resumable`
        return prepared
    monkeypatch.setattr(sweep_mod, "prepare", prepare)
    res = sweep(cfg("x86_64"), RayBackend(jobs=2))
    monkeypatch.setattr(sweep_mod, "prepare", real)
    assert marker.exists()                      # a worker did die
    assert res.to_json() == sweep(cfg("x86_64"), LocalPool(1)).to_json()


def test_cli_backend_ray(local_ray, tmp_path):
    import io
    from emu.cli import main
    outs = []
    for extra in (["--backend", "ray"], ["--jobs", "1"]):
        out, err = io.StringIO(), io.StringIO()
        rc = main(["sweep", "--json", "--progress", "none", "--func", "do_sys_open", *extra,
                   str(firmware_elf("arm64", "demo"))], stdout=out, stderr=err)
        assert rc == 0, err.getvalue()
        outs.append(out.getvalue())
    assert outs[0] == outs[1]
