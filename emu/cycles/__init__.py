"""The cycle model: CPU profiles as data, block costs computed once per translated block,
and run-time accounting into the machine's one cycle counter (emu/clock.py).

    from emu.cycles import enable_cycle_model
    model = enable_cycle_model(machine, "cortex-a72")     # or None: the arch's default

See shared/reference/cycle-model.md for the design."""
from emu.cycles.profile import DEFAULT_PROFILE, Profile, ProfileError, load_profile, profile_for, profile_names

__all__ = ["DEFAULT_PROFILE", "Profile", "ProfileError", "load_profile", "profile_for",
           "profile_names", "enable_cycle_model"]


def enable_cycle_model(machine, profile=None, **kw):
    """Attach the cycle model to `machine` (see emu.cycles.account.CycleModel)."""
    from emu.cycles.account import CycleModel
    return CycleModel.attach(machine, profile, **kw)
