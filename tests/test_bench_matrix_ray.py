"""The bench and cycle matrices on a local Ray instance (head and 2 worker CPUs on loopback)
give the serial report's modelled figures. Needs the `ray` extra."""
from __future__ import annotations

import pytest

from conftest import ARCHES
from probes.sweep_backends import LocalPool, RayBackend
from probes.sweep_matrix import run_matrix
from test_bench_matrix import bench, modelled, small_cycles_matrix

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    from probes.sweep_backends import start_local_ray
    start_local_ray(2)
    yield
    ray.shutdown()


@pytest.mark.parametrize("arch", ARCHES)
def test_bench_on_ray_gives_the_serial_cycles(local_ray, arch):
    rc1, serial, err1 = bench("--arch", arch, "--jobs", "1", "--json")
    rc2, on_ray, err2 = bench("--arch", arch, "--backend", "ray", "--json")
    assert rc1 == rc2 == 0, err1 + err2
    assert isinstance(serial, list) and isinstance(on_ray, list) and len(serial) == 6
    assert modelled(on_ray) == modelled(serial)
    assert "emu: bench: 6/6 rows" in err2
    assert ray.is_initialized()                 # a running instance is used, not stopped


def test_cycles_matrix_on_ray_gives_the_serial_figures(local_ray):
    from emu.cycles.matrix import modelled as cycles_modelled
    m = small_cycles_matrix(("speed",))
    serial = run_matrix(m, LocalPool(1))
    on_ray = run_matrix(m, RayBackend(jobs=2))
    assert [cycles_modelled(r) for r in on_ray] == [cycles_modelled(r) for r in serial]
    assert {r["arch"] for r in on_ray} == set(ARCHES)
