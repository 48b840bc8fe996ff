"""What the caller hands a program run: guest memory and the run environment.

bpf knows nothing of probes or the emulator. A caller that runs a program on
a probe hit passes the context bytes (a pt_regs image...), a
``GuestMemory`` accessor for probe_read-style helpers, and a
``BpfRunContext`` with the task, CPU and clock facts helpers report. The
defaults make a standalone run work and are deterministic.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable


@runtime_checkable
class GuestMemory(Protocol):
    """Read access to the memory of the traced machine.

    ``read`` returns exactly ``size`` bytes or raises any exception on a
    fault (helpers turn it into -EFAULT). An accessor may also offer
    ``write(addr, data)`` (bpf_probe_write_user uses it when present).
    """

    def read(self, addr: int, size: int) -> bytes: ...


@dataclass
class FlatGuestMemory:
    """A GuestMemory over a few byte ranges: {start address: bytes}.
    Handy for tests and for running programs outside the emulator."""

    ranges: dict[int, bytes | bytearray] = field(default_factory=dict)

    def read(self, addr: int, size: int) -> bytes:
        for base, data in self.ranges.items():
            if base <= addr and addr + size <= base + len(data):
                return bytes(data[addr - base:addr - base + size])
        raise LookupError(f"guest fault reading {size} bytes at {addr:#x}")

    def write(self, addr: int, data: bytes) -> None:
        for base, buf in self.ranges.items():
            if base <= addr and addr + len(data) <= base + len(buf) and isinstance(buf, bytearray):
                buf[addr - base:addr - base + len(data)] = data
                return
        raise LookupError(f"guest fault writing {len(data)} bytes at {addr:#x}")


def _step_clock(start: int = 1_000_000_000, step: int = 1_000) -> Callable[[], int]:
    """A deterministic stand-in clock: each reading advances it by ``step`` ns."""
    now = [start - step]

    def ktime_ns() -> int:
        now[0] += step
        return now[0]
    return ktime_ns


@dataclass
class BpfRunContext:
    """The environment of one or more program runs (what ``current`` and the
    CPU would say in the kernel).

    Inputs: ``ktime_ns`` (the machine's deterministic clock), ``pid``,
    ``tgid``, ``uid``, ``gid``, ``comm``, ``cpu``, ``task`` (address
    bpf_get_current_task returns), ``func_ip``, ``attach_cookie``,
    ``memory`` (GuestMemory or None), ``stack_trace`` (callable(user: bool)
    -> list of instruction pointers, innermost first), ``packet`` (bytes
    skb_load_bytes and LD_ABS read when the context is not a packet),
    ``prandom_seed``, ``hz`` (for jiffies64), ``insn_budget``.
    Outputs: ``trace_printk`` (formatted messages, in order),
    ``override_rc`` (set by bpf_override_return; the trace layer applies
    it), ``insn_count`` (instructions the last run executed).
    """

    ktime_ns: Callable[[], int] = field(default_factory=_step_clock)
    pid: int = 1
    tgid: int = 1
    uid: int = 0
    gid: int = 0
    comm: bytes = b"emu"
    cpu: int = 0
    task: int = 0
    func_ip: int = 0
    attach_cookie: int = 0
    memory: GuestMemory | None = None
    stack_trace: Callable[[bool], list[int]] | None = None
    packet: bytes | None = None
    prandom_seed: int = 0
    hz: int = 250
    insn_budget: int = 1_000_000
    trace_printk: list[str] = field(default_factory=list)
    override_rc: int | None = None
    insn_count: int = 0
    _rng: random.Random | None = field(default=None, repr=False)

    def prandom_u32(self) -> int:
        if self._rng is None:
            self._rng = random.Random(self.prandom_seed)
        return self._rng.getrandbits(32)


# --- context images for program types whose context the VM builds ------------

XDP_MD = struct.Struct("<6I")          # data, data_end, data_meta, ifindex, rxq, egress
SK_BUFF_SIZE = 192                     # sizeof(struct __sk_buff) on 6.x
SK_BUFF_LEN_OFF = 0
SK_BUFF_PROTOCOL_OFF = 16
SK_BUFF_DATA_OFF = 76
SK_BUFF_DATA_END_OFF = 80


def xdp_md(packet_addr: int, packet_len: int, ifindex: int = 1) -> bytearray:
    """struct xdp_md whose data/data_end point at the packet region."""
    return bytearray(XDP_MD.pack(packet_addr, packet_addr + packet_len, packet_addr,
                                 ifindex, 0, 0))


def sk_buff(packet_addr: int, packet: bytes, protocol: int = 0x0008) -> bytearray:
    """struct __sk_buff with len, protocol (network order) and data pointers."""
    buf = bytearray(SK_BUFF_SIZE)
    struct.pack_into("<I", buf, SK_BUFF_LEN_OFF, len(packet))
    struct.pack_into("<I", buf, SK_BUFF_PROTOCOL_OFF, protocol)
    struct.pack_into("<I", buf, SK_BUFF_DATA_OFF, packet_addr)
    struct.pack_into("<I", buf, SK_BUFF_DATA_END_OFF, packet_addr + len(packet))
    return buf
