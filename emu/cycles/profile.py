"""CPU profiles: the numbers of the cycle model, as data (emu/cycles/profiles/<name>.json).

Every number in a profile file is written `[value, basis]`, where basis names an entry of
the file's `basis` table ("choice" = a modelling choice, not a measurement), so a reader
sees which numbers come from a vendor guide or LLVM's scheduling models and which were
picked. `load_profile(name)` validates that and returns a frozen `Profile`.

A profile has:
  params      scalar facts: frequencies, issue width, branch, trap, syscall, counter costs
  ports       execution port groups: name -> the ports (units) that can serve it
  classes     instruction class -> the port groups it occupies, result latency, occupancy
  forwarding  [{from, to, cycles}]: a consumer of class `to` reads a result of class
              `from` that many cycles early (bypass; LLVM's ReadAdvance)
  overrides   mnemonic -> a different class, latency or occupancy for outliers"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from emu.arch import ARCH_NAMES, get_arch
from emu.clock import Reason
from emu.errors import UsageError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
# Each arch names its default profile (emu/arch: `cpu_profile`).
DEFAULT_PROFILE = {name: get_arch(name).cpu_profile for name in ARCH_NAMES}

_PARAMS = ("freq_hz", "counter_hz", "in_order", "inorder_writeback", "width", "branch_taken", "branch_mispredict",
           "mispredict_rate", "exc_entry", "exc_return", "single_step", "syscall_entry_exit",
           "mitigation_extra", "mitigations", "counter_read", "handler", "detour", "bpf_insn",
           "bpf_entry", "loop_back", "loop_buffer")


class ProfileError(UsageError):
    pass


@dataclass(frozen=True)
class ClassCost:
    """One instruction class: the port groups one instruction of it occupies (each for
    `occupancy` cycles), the latency of its result, and how many issue slots it takes."""
    name: str
    ports: tuple[str, ...]
    lat: int
    occupancy: int = 1
    slots: int = 1
    retire_ooo: bool = False        # in-order writeback does not apply (stores)


@dataclass(frozen=True)
class Override:
    cls: str | None = None
    lat: int | None = None
    occupancy: int | None = None


@dataclass(frozen=True)
class Profile:
    """A CPU profile (see module docstring). Costs are integer cycles."""
    name: str
    isa: str
    description: str
    llvm_mcpu: str
    freq_hz: int
    counter_hz: int
    in_order: bool
    inorder_writeback: bool         # in-order: results are written back in program order
    width: int
    branch_taken: int
    branch_mispredict: int
    mispredict_rate: int            # 0: no mispredicts; 1: a 1-bit predictor per branch site
    exc_entry: int
    exc_return: int
    single_step: int
    syscall_entry_exit: int
    mitigation_extra: int
    mitigations: bool
    counter_read: int
    handler: int
    detour: int                     # register save/restore of a trapless entry to the host
    bpf_insn: int
    bpf_entry: int
    ports: dict[str, tuple[str, ...]]
    classes: dict[str, ClassCost]
    forwarding: dict[tuple[str, str], int]
    overrides: dict[str, Override]
    # A taken branch back to the start of the block just run (a one-block loop) of at most
    # `loop_buffer` instructions costs `loop_back` instead of `branch_taken`: the loop
    # stream detector / loop buffer / uop cache hides the redirect (profile basis notes).
    loop_back: int = 0
    loop_buffer: int = 0
    basis: dict[str, str] = field(default_factory=dict)      # "params.width" -> basis name
    path: str = ""

    @property
    def syscall_cost(self) -> int:
        return self.syscall_entry_exit + (self.mitigation_extra if self.mitigations else 0)

    def reason_costs(self) -> dict[Reason, int]:
        """The cycles each `Reason` the layers charge costs on this CPU (emu/clock.py)."""
        trap = self.exc_entry + self.exc_return
        return {Reason.TRAP: trap, Reason.STEP: trap + self.single_step,
                Reason.HANDLER: self.handler, Reason.DETOUR: self.detour,
                Reason.BPF: self.bpf_entry, Reason.BPF_INSN: self.bpf_insn,
                Reason.SYSCALL: self.syscall_cost, Reason.COUNTER: self.counter_read,
                Reason.SLEEP: 0}

    def trap_parts(self) -> dict[str, int]:
        return {"exc_entry": self.exc_entry, "exc_return": self.exc_return,
                "single_step": self.single_step}

    def cls(self, name: str) -> ClassCost:
        try:
            return self.classes[name]
        except KeyError:
            raise ProfileError(f"profile {self.name}: no instruction class {name!r}") from None


def _num(entry, where: str, bases: dict, basis_out: dict):
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
        raise ProfileError(f"{where}: expected [value, basis], got {entry!r}")
    value, basis = entry
    if basis not in bases:
        raise ProfileError(f"{where}: unknown basis {basis!r} (not in the file's basis table)")
    basis_out[where] = basis
    return value


def parse_profile(data: dict, path: str = "") -> Profile:
    bases = data.get("basis", {})
    if "choice" not in bases:
        raise ProfileError(f"{path}: the basis table must define 'choice'")
    basis: dict[str, str] = {}
    params = {}
    for key in _PARAMS:
        if key not in data.get("params", {}):
            raise ProfileError(f"{path}: params.{key} missing")
        params[key] = _num(data["params"][key], f"params.{key}", bases, basis)
    extra = set(data.get("params", {})) - set(_PARAMS)
    if extra:
        raise ProfileError(f"{path}: unknown params {sorted(extra)}")
    ports = {name: tuple(_num(v, f"ports.{name}", bases, basis)) for name, v in data["ports"].items()}
    classes = {}
    for name, c in data["classes"].items():
        for g in c["ports"]:
            if g not in ports:
                raise ProfileError(f"{path}: class {name} uses unknown port group {g!r}")
        classes[name] = ClassCost(
            name, tuple(c["ports"]), int(_num(c["lat"], f"classes.{name}.lat", bases, basis)),
            int(_num(c.get("occupancy", [1, "choice"]), f"classes.{name}.occupancy", bases, basis)),
            int(_num(c.get("slots", [1, "choice"]), f"classes.{name}.slots", bases, basis)),
            bool(_num(c.get("retire_ooo", [False, "choice"]), f"classes.{name}.retire_ooo", bases, basis)))
    forwarding = {}
    for i, f in enumerate(data.get("forwarding", [])):
        cycles = int(_num(f["cycles"], f"forwarding[{i}].cycles", bases, basis))
        for a in f["from"]:
            for b in f["to"]:
                forwarding[(a, b)] = cycles
    overrides = {}
    for mnem, o in data.get("overrides", {}).items():
        if o.get("class") is not None and o["class"] not in classes:
            raise ProfileError(f"{path}: override {mnem} names unknown class {o['class']!r}")
        overrides[mnem] = Override(
            o.get("class"),
            int(_num(o["lat"], f"overrides.{mnem}.lat", bases, basis)) if "lat" in o else None,
            int(_num(o["occupancy"], f"overrides.{mnem}.occupancy", bases, basis)) if "occupancy" in o else None)
    return Profile(
        name=data["name"], isa=data["isa"], description=data.get("description", ""),
        llvm_mcpu=data.get("llvm_mcpu", data["name"]),
        freq_hz=int(params["freq_hz"]), counter_hz=int(params["counter_hz"]),
        in_order=bool(params["in_order"]), inorder_writeback=bool(params["inorder_writeback"]),
        width=int(params["width"]),
        branch_taken=int(params["branch_taken"]), branch_mispredict=int(params["branch_mispredict"]),
        mispredict_rate=int(params["mispredict_rate"]), exc_entry=int(params["exc_entry"]),
        exc_return=int(params["exc_return"]), single_step=int(params["single_step"]),
        syscall_entry_exit=int(params["syscall_entry_exit"]),
        mitigation_extra=int(params["mitigation_extra"]), mitigations=bool(params["mitigations"]),
        counter_read=int(params["counter_read"]), handler=int(params["handler"]),
        detour=int(params["detour"]),
        bpf_insn=int(params["bpf_insn"]), bpf_entry=int(params["bpf_entry"]),
        loop_back=int(params["loop_back"]), loop_buffer=int(params["loop_buffer"]),
        ports=ports, classes=classes, forwarding=forwarding, overrides=overrides,
        basis=basis, path=path)


def profile_names(isa: str | None = None) -> list[str]:
    names = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
    if isa is None:
        return names
    return [n for n in names if load_profile(n).isa == isa]


@lru_cache(maxsize=None)
def load_profile(name: str) -> Profile:
    path = PROFILE_DIR / f"{name}.json"
    if not path.is_file():
        raise ProfileError(f"unknown CPU profile {name!r} (one of {', '.join(profile_names())})")
    return parse_profile(json.loads(path.read_text()), str(path))


def profile_for(isa: str, name: str | None = None) -> Profile:
    """The named profile (checked against the ISA) or the ISA's default."""
    p = load_profile(name or DEFAULT_PROFILE[isa])
    if p.isa != isa:
        raise ProfileError(f"CPU profile {p.name} is for {p.isa}, the guest is {isa} "
                           f"(profiles for {isa}: {', '.join(profile_names(isa))})")
    return p
