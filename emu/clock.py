"""The machine's only clock: one integer cycle counter that grows by modelled amounts.

Nothing the guest or a trace can see comes from host time. Until a cycle model is attached
the counter advances by fixed costs per syscall, trap and counter read, so two runs with the
same inputs read identical times; the cycle model adds per-block costs to the same counter."""
from __future__ import annotations

from dataclasses import dataclass, field

# The wall-clock epoch the guest sees at cycle 0 (2026-01-01T00:00:00Z): a fixed choice.
EPOCH_NS = 1_767_225_600 * 1_000_000_000


@dataclass
class Clock:
    freq_hz: int = 2_000_000_000        # modelling choice until a CPU profile says otherwise
    counter_hz: int = 25_000_000        # arm64 generic timer (cntfrq_el0)
    syscall_cost: int = 1_000           # cycles a syscall round trip adds (modelling choice)
    counter_read_cost: int = 20         # keeps consecutive counter reads strictly increasing
    # Costs the probe layer charges (the cycle model's CPU profile replaces these):
    exc_entry: int = 100                # taking a trap (BRK / int3)
    exc_return: int = 100               # returning from it
    single_step: int = 150              # the extra of an out-of-line single-step round trip
    handler_cost: int = 200             # a host (Python) handler, per call: a modelling choice
    cycles: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def advance(self, n: int, reason: str | None = None) -> None:
        self.cycles += n
        if reason is not None:
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n

    def read_cycles(self) -> int:
        """rdtsc / pmccntr_el0."""
        self.advance(self.counter_read_cost, "counter")
        return self.cycles

    def read_counter(self) -> int:
        """cntvct_el0: the cycle counter at the counter frequency."""
        return self.read_cycles() * self.counter_hz // self.freq_hz

    def monotonic_ns(self) -> int:
        return self.cycles * 1_000_000_000 // self.freq_hz

    def realtime_ns(self) -> int:
        return EPOCH_NS + self.monotonic_ns()
