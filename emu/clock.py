"""The machine's only clock: one integer cycle counter that grows by modelled amounts.

Nothing the guest or a trace can see comes from host time. Until a cycle model is attached
the counter advances by fixed costs per syscall, trap and counter read, so two runs with the
same inputs read identical times; the cycle model (emu/cycles) adds per-block costs to the
same counter and sets the costs below from its CPU profile.

The count is kept in 1/256-cycle fixed point (`acc.fp`) so fractional block costs add up
exactly; `cycles` is its integer part. With the native block counter attached, `acc` is
the counter's C struct, so block costs and the events charged here land in one integer.

The counter saturates at FP_MAX (2^64 - 1, the C counter's width: 2^56 cycles, about 416
days at 2 GHz) and never wraps: a guest that sleeps past it sees time stop there, never go
backwards, and a cycle limit below it still fires."""
from __future__ import annotations

from enum import StrEnum
from typing import Callable, Mapping

# The wall-clock epoch the guest sees at cycle 0 (2026-01-01T00:00:00Z): a fixed choice.
EPOCH_NS = 1_767_225_600 * 1_000_000_000
FP_SHIFT = 8                      # cycles are counted in 1/256 cycle
FP_MAX = (1 << 64) - 1            # saturation point of the counter (uint64 in native.c)


class Reason(StrEnum):
    """Why the clock moved, besides the code the guest ran: the key of a cost (cycles per
    event, from the CPU profile) and of the breakdown. Each layer charges its own."""
    TRAP = "trap"              # taking a trap (BRK / int3) and returning from it
    STEP = "step"              # a trap round trip around an out-of-line single-step
    HANDLER = "handler"        # one call of a host (Python) handler
    DETOUR = "detour"          # register save/restore of a trapless entry to the host
    BPF = "bpf"                # entering a BPF program
    BPF_INSN = "bpf-insn"      # one executed BPF instruction (booked under BPF)
    SYSCALL = "syscall"        # a syscall round trip
    COUNTER = "counter"        # one read of the cycle counter
    SLEEP = "sleep"            # time the guest slept (no cost of its own)


# The members as module constants, as `re` exports its flags: on Python 3.11 reading
# `Reason.TRAP` costs ~0.1 µs (EnumType's __getattr__ takes the slow attribute path), which
# a probe hit should not pay per charge.
TRAP, STEP, HANDLER, DETOUR = Reason.TRAP, Reason.STEP, Reason.HANDLER, Reason.DETOUR
BPF, BPF_INSN, SYSCALL, COUNTER, SLEEP = (Reason.BPF, Reason.BPF_INSN, Reason.SYSCALL,
                                          Reason.COUNTER, Reason.SLEEP)


# Before a CPU profile is attached: modelling choices, not measurements. A counter read
# costs something so consecutive reads are strictly increasing.
DEFAULT_COSTS: dict[Reason, int] = {
    Reason.TRAP: 200, Reason.STEP: 350, Reason.HANDLER: 200, Reason.DETOUR: 40,
    Reason.BPF: 20, Reason.BPF_INSN: 1, Reason.SYSCALL: 1_000, Reason.COUNTER: 20,
    Reason.SLEEP: 0,
}
# The parts of a trap the profile gives separately (entry, return, single-step extra).
DEFAULT_TRAP_PARTS = {"exc_entry": 100, "exc_return": 100, "single_step": 150}


class Accumulator:
    """The counter (the native block counter's struct has the same `fp` field)."""

    __slots__ = ("fp",)

    def __init__(self, fp: int = 0) -> None:
        self.fp = fp


class Clock:
    """Attributes: freq_hz (cycles -> ns), counter_hz (arm64 cntfrq_el0), `costs`: the
    cycles each `Reason` costs per event; `by_reason`: cycles charged per reason tag;
    `profile`: the CPU profile's name once a cycle model is on."""

    def __init__(self, freq_hz: int = 2_000_000_000, counter_hz: int = 25_000_000,
                 cycles: int = 0, by_reason: dict[str, int] | None = None,
                 costs: Mapping[Reason, int] | None = None) -> None:
        self.freq_hz = freq_hz              # modelling choice until a CPU profile says otherwise
        self.counter_hz = counter_hz
        self.costs: dict[Reason, int] = {}
        self.trap_parts: dict[str, int] = dict(DEFAULT_TRAP_PARTS)
        self.set_costs(costs or DEFAULT_COSTS)
        self.by_reason: dict[str, int] = dict(by_reason or {})
        self.acc: Accumulator = Accumulator(cycles << FP_SHIFT)
        self.profile: str | None = None
        # Set by the cycle model: 1/256 cycles of the current block after the current
        # instruction (already charged at block entry, not yet "executed"); and its counts
        # (code_fp, layer_fp, taken_fp, mispredict_fp, insns, blocks).
        self.pending: Callable[[], int] | None = None
        self.model_counts: Callable[[], dict[str, int]] | None = None
        # Called once, at the first read of the clock (the machine starts its work clock
        # there, so guests that never look at the time pay nothing for it).
        self.on_first_read: Callable[[], None] | None = None
        # The owner whose code the cycle model books apart (`layer_fp`), as "<owner>-code".
        self.layer_code_tag = "layer-code"

    def set_costs(self, costs: Mapping[Reason, int], trap_parts: Mapping[str, int] | None = None) -> None:
        """Take the cost of every reason (a CPU profile's, emu/cycles/profile.py)."""
        missing = set(Reason) - set(costs)
        if missing:
            raise ValueError(f"costs for {sorted(missing)} missing")
        self.costs = {Reason(r): int(v) for r, v in costs.items()}
        if trap_parts is not None:
            self.trap_parts = dict(trap_parts)

    def cost(self, reason: Reason) -> int:
        return self.costs[reason]

    def charge(self, reason: Reason, times: int = 1) -> None:
        """`times` events of `reason`, at the reason's cost (advance, inlined: hit path)."""
        n = self.costs[reason] * times
        fp = self.acc.fp + (n << FP_SHIFT)
        self.acc.fp = fp if fp < FP_MAX else FP_MAX
        by = self.by_reason
        by[reason] = by.get(reason, 0) + n

    def charge2(self, reason1: Reason, reason2: Reason) -> None:
        """One event of each reason at once (hot paths: a trap and its handler)."""
        costs, by = self.costs, self.by_reason
        n1, n2 = costs[reason1], costs[reason2]
        fp = self.acc.fp + ((n1 + n2) << FP_SHIFT)
        self.acc.fp = fp if fp < FP_MAX else FP_MAX
        by[reason1] = by.get(reason1, 0) + n1
        by[reason2] = by.get(reason2, 0) + n2

    # The profile's numbers under their old names (read-only; the costs are the truth).
    @property
    def exc_entry(self) -> int:
        return self.trap_parts["exc_entry"]

    @property
    def exc_return(self) -> int:
        return self.trap_parts["exc_return"]

    @property
    def single_step(self) -> int:
        return self.trap_parts["single_step"]

    @property
    def handler_cost(self) -> int:
        return self.costs[HANDLER]

    @property
    def detour_cost(self) -> int:
        return self.costs[DETOUR]

    @property
    def syscall_cost(self) -> int:
        return self.costs[SYSCALL]

    @property
    def counter_read_cost(self) -> int:
        return self.costs[COUNTER]

    def __repr__(self) -> str:
        return (f"Clock(cycles={self.cycles}, freq_hz={self.freq_hz}, profile={self.profile!r}, "
                f"by_reason={self.by_reason})")

    @property
    def cycles(self) -> int:
        """Cycles charged so far (whole blocks included)."""
        return self.acc.fp >> FP_SHIFT

    @cycles.setter
    def cycles(self, value: int) -> None:
        self.acc.fp = min(max(value, 0) << FP_SHIFT, FP_MAX)

    @property
    def saturated(self) -> bool:
        return self.acc.fp >= FP_MAX

    def advance(self, n: int, reason: str | None = None) -> None:
        fp = self.acc.fp + (n << FP_SHIFT)
        self.acc.fp = fp if fp < FP_MAX else FP_MAX
        if reason is not None:
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n

    def advance2(self, n1: int, reason1: str, n2: int, reason2: str) -> None:
        """Two charges at once (hot paths: a detour and its handler)."""
        fp = self.acc.fp + ((n1 + n2) << FP_SHIFT)
        self.acc.fp = fp if fp < FP_MAX else FP_MAX
        by = self.by_reason
        by[reason1] = by.get(reason1, 0) + n1
        by[reason2] = by.get(reason2, 0) + n2

    def charge_bpf(self, insns: int) -> None:
        """A BPF program ran `insns` instructions."""
        costs = self.costs
        self.advance(costs[BPF] + insns * costs[BPF_INSN], BPF)

    def now(self) -> int:
        """Cycles at the current instruction: the running block's prefix, not all of it."""
        if self.on_first_read is not None:
            first, self.on_first_read = self.on_first_read, None
            first()
        fp = self.acc.fp
        if self.pending is not None and fp < FP_MAX:   # saturated: the rest of a block is moot
            fp -= self.pending()
        return fp >> FP_SHIFT

    def read_cycles(self) -> int:
        """rdtsc / pmccntr_el0."""
        self.advance(self.costs[COUNTER], COUNTER)
        return self.now()

    def read_counter(self) -> int:
        """cntvct_el0: the cycle counter at the counter frequency."""
        return self.read_cycles() * self.counter_hz // self.freq_hz

    def monotonic_ns(self) -> int:
        return self.now() * 1_000_000_000 // self.freq_hz

    def realtime_ns(self) -> int:
        return EPOCH_NS + self.monotonic_ns()

    def counts(self) -> dict[str, int]:
        return self.model_counts() if self.model_counts is not None else {}

    @property
    def instructions(self) -> int:
        """Guest instructions counted by the cycle model (0 without one)."""
        return self.counts().get("insns", 0)

    def breakdown(self) -> dict[str, int]:
        """Cycles by reason: "code" (guest blocks), "<owner>-code" (blocks in pages a layer
        owns, emu/owners.py), "branch" (taken branches), "mispredict", plus every `Reason`
        charged (trap, step, handler, syscall, counter, detour, bpf, ...)."""
        c = self.counts()
        out = {"code": (c.get("code_fp", 0) - c.get("layer_fp", 0)) >> FP_SHIFT,
               self.layer_code_tag: c.get("layer_fp", 0) >> FP_SHIFT,
               "branch": c.get("taken_fp", 0) >> FP_SHIFT,
               "mispredict": c.get("mispredict_fp", 0) >> FP_SHIFT}
        for k, v in self.by_reason.items():
            out[k] = out.get(k, 0) + v
        return {k: v for k, v in out.items() if v}
