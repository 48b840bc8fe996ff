"""The state of one program run, shared by the interpreter, the compiled
path and the helpers: the address space, map handles, the run environment,
tail-call and ring-buffer bookkeeping, the instruction budget.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .context import BpfRunContext
from .errors import BpfRuntimeError
from .isa import MAX_BPF_STACK, MAX_CALL_FRAMES
from .maps import ArrayMap, BpfMap, BpfMapType, PercpuArrayMap, RingbufRecord
from .memory import (
    CTX_ADDR, FUNC_PTR_BASE, MAP_PTR_BASE, PACKET_ADDR, STACK_BASE, VM_BASE,
    MemoryFault, Region, VmMemory,
)

if TYPE_CHECKING:
    from .program import BpfProg


_ZERO_STACK = bytes(MAX_BPF_STACK)


class GuestFault(Exception):
    """A guest-memory read failed (helpers report -EFAULT)."""


class ProgramExit(Exception):
    """Internal: stop the whole program with this r0 (a failed LD_ABS)."""

    def __init__(self, r0: int):
        self.r0 = r0


class BpfRun:
    """One execution of a program. Attributes: ``mem`` (VmMemory), ``env``
    (BpfRunContext), ``prog`` (the program now running; tail calls change
    it), ``ctx_addr``, ``insn_count``/``budget``, ``tail_calls``."""

    def __init__(self, prog: "BpfProg", ctx: bytearray, env: BpfRunContext,
                 packet: bytes | bytearray | None = None):
        self.prog = prog
        self.env = env
        self.mem = VmMemory()
        self.ctx_addr = CTX_ADDR
        self.mem.add(Region(CTX_ADDR, ctx, prog.type_info.ctx_writable, "ctx"))
        self.packet: bytearray | None = None
        if packet is not None:
            self.packet = packet if isinstance(packet, bytearray) else bytearray(packet)
            self.mem.add(Region(PACKET_ADDR, self.packet, True, "packet"))
        self.insn_count = 0
        self.budget = env.insn_budget
        self.tail_calls = 0
        self.pending_tail_call: BpfProg | None = None
        self.depth = 0
        self._map_addr: dict[int, int] = {}
        self._maps_at: dict[int, BpfMap] = {}
        self._reservations: dict[int, tuple[Any, RingbufRecord, Region]] = {}
        self.bind_maps(prog)
        self._static: tuple[dict[int, Region], dict[int, Region], int] | None = None

    # -- reuse across runs (a program attached to a probe runs on every hit) --
    def prepare_reuse(self) -> "BpfRun":
        """Keep this run state for every later run of the same program with the same
        environment: the regions made so far (context, global data, the first stack frame)
        stay; what a run adds (map values it looked up, records, deeper frames) is dropped
        by `reset`, so each run sees the addresses a fresh BpfRun would give."""
        self.new_stack()
        mem = self.mem
        self._root = self.prog
        self._ctx_region = mem.regions[CTX_ADDR >> 32]
        self._static = (dict(mem.regions), dict(mem._by_buffer), mem._next_key)
        return self

    def reset(self, ctx: bytearray) -> "BpfRun":
        """Start the next run over `ctx` (prepare_reuse first); after `finish`."""
        assert self._static is not None, "prepare_reuse() first"
        for m, rec, _region in self._reservations.values():   # left by a run that failed
            m.commit(rec, True)
        self._reservations.clear()
        mem = self.mem
        regions, by_buffer, next_key = self._static
        if mem._next_key != next_key or len(mem.regions) != len(regions):
            mem.regions.clear()        # the same dict: compiled loads/stores hold it
            mem.regions.update(regions)
            mem._by_buffer.clear()
            mem._by_buffer.update(by_buffer)
            mem._next_key = next_key
        self._ctx_region.data = ctx
        self.prog = self._root
        self.insn_count = self.tail_calls = self.depth = 0
        self.budget = self.env.insn_budget
        self.pending_tail_call = None
        return self

    # -- maps --
    def bind_maps(self, prog: "BpfProg") -> None:
        """Give the program's maps their handles and global-data regions in fd
        order, so addresses do not depend on which engine runs the code."""
        for fd in sorted(prog.maps):
            m = prog.maps[fd]
            self.map_ptr(m)
            if type(m) is ArrayMap:
                self.mem.map_buffer(m.values, m.prog_writable, m.name)

    def map_ptr(self, m: BpfMap) -> int:
        addr = self._map_addr.get(id(m))
        if addr is None:
            addr = MAP_PTR_BASE + (len(self._map_addr) + 1) * 0x1000
            self._map_addr[id(m)] = addr
            self._maps_at[addr] = m
        return addr

    def map_at(self, addr: int) -> BpfMap | None:
        return self._maps_at.get(addr)

    def map_value_ptr(self, m: BpfMap, key: bytes) -> int:
        """Address of key's value for the current CPU, or 0 (NULL)."""
        if isinstance(m, PercpuArrayMap) or m.map_type in (
                BpfMapType.BPF_MAP_TYPE_PERCPU_HASH, BpfMapType.BPF_MAP_TYPE_LRU_PERCPU_HASH):
            if not 0 <= self.env.cpu < m.nr_cpus:
                return 0
        slot = m.value_slot(key, self.env.cpu)
        if slot is None:
            return 0
        buf, off = slot
        return self.mem.map_buffer(buf, m.prog_writable, m.name).base + off

    def global_data_ptr(self, m: BpfMap, off: int) -> int:
        """lddw PSEUDO_MAP_VALUE: the address ``off`` bytes into element 0."""
        if not isinstance(m, ArrayMap):
            raise BpfRuntimeError(f"map {m.name!r} has no direct value access")
        return self.mem.map_buffer(m.values, m.prog_writable, m.name).base + off

    # -- memory for helpers --
    def read(self, addr: int, size: int) -> bytes:
        """Bytes at addr: from the machine's regions, else guest memory."""
        if size == 0:
            return b""
        if self.mem.contains(addr):
            return self.mem.read(addr, size)
        if addr >> 62 == VM_BASE >> 62:  # the machine's range, but no region there
            raise MemoryFault(addr, size, "read")
        guest = self.env.memory
        if guest is None:
            raise GuestFault(f"no guest memory to read {size} bytes at {addr:#x}")
        try:
            data = guest.read(addr, size)
        except Exception as e:  # any accessor failure is a fault, as in the kernel
            raise GuestFault(str(e)) from None
        if len(data) != size:
            raise GuestFault(f"short guest read at {addr:#x}")
        return bytes(data)

    def read_str(self, addr: int, limit: int) -> bytes:
        """Up to ``limit`` bytes at addr, stopping before a NUL. A fault before
        the NUL raises (strncpy_from_kernel_nofault gives -EFAULT)."""
        out = bytearray()
        while len(out) < limit:
            pos, n = addr + len(out), min(64, limit - len(out))
            try:
                data = self.read(pos, n)
            except (MemoryFault, GuestFault):
                data = bytearray()
                for i in range(n):  # retry bytewise: the NUL may come before the fault
                    data += self.read(pos + i, 1)
                    if data[-1] == 0:
                        break
            nul = data.find(b"\0")
            if nul >= 0:
                return bytes(out + data[:nul])
            out += data
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        self.mem.write(addr, data)

    def check_write(self, addr: int, size: int) -> None:
        """Raise MemoryFault unless [addr, addr+size) is writable machine memory."""
        if size == 0:
            return
        hit = self.mem.find(addr, size)
        if hit is None:
            raise MemoryFault(addr, size, "write")
        if not hit[0].writable:
            raise MemoryFault(addr, size, "write+ro")

    # -- stacks --
    def new_stack(self) -> int:
        """A fresh zeroed 512-byte stack for the current depth; returns r10."""
        if self.depth >= MAX_CALL_FRAMES:
            raise BpfRuntimeError(f"the call stack of {self.depth + 1} frames is too deep")
        base = STACK_BASE + (self.depth << 32)
        region = self.mem.regions.get(base >> 32)
        if region is None:
            self.mem.add(Region(base, bytearray(MAX_BPF_STACK), True, f"stack{self.depth}"))
        else:
            region.data[:] = _ZERO_STACK  # a new frame starts zeroed, as on first use
        return base + MAX_BPF_STACK

    # -- ring buffer reservations --
    def reserve(self, m: Any, size: int) -> int:
        rec = m.reserve(size)
        if rec is None:
            return 0
        region = self.mem.map_buffer(rec.data, True, m.name)
        self._reservations[region.base] = (m, rec, region)
        return region.base

    def release(self, addr: int, discard: bool) -> None:
        entry = self._reservations.pop(addr, None)
        if entry is None:
            raise BpfRuntimeError(f"{addr:#x} is not a reserved ring buffer record")
        m, rec, region = entry
        m.commit(rec, discard)
        self.mem.remove(region)  # the record may no longer be touched

    def finish(self) -> None:
        """After exit: a reservation never submitted is a bug the kernel's
        verifier would have refused (unreleased reference); discard it."""
        leaked = list(self._reservations)
        for addr in leaked:
            self.release(addr, True)
        self.env.insn_count = self.insn_count
        if leaked:
            raise BpfRuntimeError(f"ring buffer record {leaked[0]:#x} was neither "
                                  "submitted nor discarded")

    @staticmethod
    def func_ptr(insn_idx: int) -> int:
        return FUNC_PTR_BASE + insn_idx * 8
