"""--max-cycles: a guest is stopped once the modelled clock reaches the limit (exit 124),
with the native block counter and with its Python twin alike."""
import io

import pytest

from conftest import firmware_elf, run_emu
from emu.cycles import enable_cycle_model
from emu.loader import GuestConfig, load_guest
from emu.machine import StopReason


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_cycle_limit_stops_run(arch, native):
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "hotloop"))), io.BytesIO(), io.BytesIO(),
                   io.BytesIO())
    model = enable_cycle_model(g.machine, None, use_native=native)
    model.set_cycle_limit(50_000)
    res = g.machine.run()
    assert res.reason is StopReason.LIMIT and res.exit_code == 124
    assert "cycle limit of 50000" in res.message
    assert 50_000 - 64 <= g.machine.clock.now() <= 50_000 + 200     # within the last block


def test_max_cycles_cli(arch):
    r = run_emu("run", "--max-cycles", "100000", str(firmware_elf(arch, "hotloop")))
    assert r.rc == 124
    assert "cycle limit of 100000 modelled cycles reached at pc 0x" in r.err
    r = run_emu("run", "--max-cycles", "10000000", str(firmware_elf(arch, "hotloop")), "--", "100")
    assert r.rc == 0 and "hot_call" in r.out
