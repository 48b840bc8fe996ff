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

from typing import Callable

# The wall-clock epoch the guest sees at cycle 0 (2026-01-01T00:00:00Z): a fixed choice.
EPOCH_NS = 1_767_225_600 * 1_000_000_000
FP_SHIFT = 8                      # cycles are counted in 1/256 cycle
FP_MAX = (1 << 64) - 1            # saturation point of the counter (uint64 in native.c)


class Accumulator:
    """The counter (the native block counter's struct has the same `fp` field)."""

    __slots__ = ("fp",)

    def __init__(self, fp: int = 0) -> None:
        self.fp = fp


class Clock:
    """Attributes: freq_hz (cycles -> ns), counter_hz (arm64 cntfrq_el0), the costs in
    cycles of a syscall, a counter read, a trap's entry and return, a single-step round
    trip, a host handler call, a BPF program entry and instruction; `by_reason`: cycles
    charged per reason tag; `profile`: the CPU profile's name once a cycle model is on."""

    def __init__(self, freq_hz: int = 2_000_000_000, counter_hz: int = 25_000_000,
                 syscall_cost: int = 1_000, counter_read_cost: int = 20, exc_entry: int = 100,
                 exc_return: int = 100, single_step: int = 150, handler_cost: int = 200,
                 cycles: int = 0, by_reason: dict[str, int] | None = None,
                 bpf_entry_cost: int = 20, bpf_insn_cost: int = 1, detour_cost: int = 40) -> None:
        self.freq_hz = freq_hz              # modelling choice until a CPU profile says otherwise
        self.counter_hz = counter_hz
        self.syscall_cost = syscall_cost    # a syscall round trip (modelling choice)
        self.counter_read_cost = counter_read_cost   # keeps consecutive reads strictly increasing
        # Costs the probe layer charges (the cycle model's CPU profile replaces these):
        self.exc_entry = exc_entry          # taking a trap (BRK / int3)
        self.exc_return = exc_return        # returning from it
        self.single_step = single_step      # the extra of an out-of-line single-step round trip
        self.handler_cost = handler_cost    # a host (Python) handler, per call: a modelling choice
        # The register save/restore of a detour or trampoline that enters the host without a
        # trap (optprobe detour, x86 rethook trampoline, ftrace caller): a modelling choice.
        self.detour_cost = detour_cost
        self.bpf_entry_cost = bpf_entry_cost  # entering a BPF program (modelling choice)
        self.bpf_insn_cost = bpf_insn_cost  # per executed BPF instruction (modelling choice)
        self.by_reason: dict[str, int] = dict(by_reason or {})
        self.acc = Accumulator(cycles << FP_SHIFT)
        self.profile: str | None = None
        # Set by the cycle model: 1/256 cycles of the current block after the current
        # instruction (already charged at block entry, not yet "executed"); and its counts
        # (code_fp, probe_fp, taken_fp, mispredict_fp, insns, blocks).
        self.pending: Callable[[], int] | None = None
        self.model_counts: Callable[[], dict[str, int]] | None = None
        # Called once, at the first read of the clock (the machine starts its work clock
        # there, so guests that never look at the time pay nothing for it).
        self.on_first_read: Callable[[], None] | None = None

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
        self.advance(self.bpf_entry_cost + insns * self.bpf_insn_cost, "bpf")

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
        self.advance(self.counter_read_cost, "counter")
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
        """Cycles by reason: "code" (guest blocks), "probe-code" (blocks the probe layer
        wrote), "branch" (taken branches), "mispredict", plus every tag charged through
        `advance` (trap, step, handler, syscall, counter, detour, bpf, ...)."""
        c = self.counts()
        out = {"code": (c.get("code_fp", 0) - c.get("probe_fp", 0)) >> FP_SHIFT,
               "probe-code": c.get("probe_fp", 0) >> FP_SHIFT,
               "branch": c.get("taken_fp", 0) >> FP_SHIFT,
               "mispredict": c.get("mispredict_fp", 0) >> FP_SHIFT}
        for k, v in self.by_reason.items():
            out[k] = out.get(k, 0) + v
        return {k: v for k, v in out.items() if v}
