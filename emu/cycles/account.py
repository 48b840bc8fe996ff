"""Run-time accounting: a BLOCK hook adds each executed block's static cost to the clock.

A block's cost is computed the first time it runs (decode with capstone, then
blockcost) and kept in a process-wide cache keyed by (profile, address, bytes), so a block
re-translated after a text_poke with the same bytes is not recomputed. The hook itself is
native (native.c) when gcc is available: one hash lookup and a few adds per block. Taken
branches (next block ≠ previous fall-through) add `branch_taken`, or `loop_back` when the
branch goes back to the start of the same block of at most `loop_buffer` instructions (a
small loop the loop buffer / uop cache streams); with
`mispredict_rate` 1, a 1-bit predictor per block-ending conditional branch adds
`branch_mispredict` on each change of direction.

Counter reads inside a block see only the block's prefix up to the reading instruction
(`Clock.pending`), so `rdtsc; ...; rdtsc` measures what lies between."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any

from emu.clock import FP_MAX, FP_SHIFT
from emu.cycles import native
from emu.cycles.blockcost import BlockCost, block_cost
from emu.cycles.ops import decoder_for, disassembler
from emu.cycles.profile import Profile, profile_for
from emu.native_lib import address_of, cache_dir
from emu.owners import RegionOwner
from emu.ucfast import uc_emu_stop_address

if TYPE_CHECKING:
    from emu.cycles.mca import McaCostCache

# Block flags (native.c): ends in a conditional branch; lies in pages a layer owns.
CM_COND, CM_LAYER = 1, 8
# The owner whose code is booked apart from the guest's (the native counter has one such
# bucket); it shows in the breakdown as "<owner>-code".
BOOKED_APART = RegionOwner.PROBES


@dataclass(frozen=True)
class Block:
    cost: BlockCost
    offsets: tuple[int, ...]         # byte offset of each instruction
    flags: int


_CACHE: dict[tuple[str, int, bytes], Block] = {}


@dataclass(frozen=True)
class CycleState:
    """The model's run-time state at a snapshot (emu/snapshot.py): the costed blocks, and
    either the native counter (its struct and table byte for byte: clock, execution counts,
    taken/loop/mispredict counts, predictor bits, the current block) or the Python twin's
    fields. Costs are kept with the blocks, so a restore needs no recosting."""
    blocks: dict[tuple[int, int], Block]
    unrun: dict[str, int]
    native: tuple[bytes, bytes, int] | None         # CmState bytes, table bytes, index of cur
    py: tuple[Any, ...] | None


class CycleModel:
    """The cycle model attached to one machine. Get it with `CycleModel.attach(m, profile)`
    (or emu.cycles.enable_cycle_model); `machine.layers["cycles"]` holds it."""

    def __init__(self, machine, profile: Profile, use_native: bool | None = None,
                 cost_source: str = "model") -> None:
        self.m = machine
        self.profile = profile
        self.cost_source = cost_source
        self._md = disassembler(profile.isa)
        self._decode = decoder_for(profile.isa)
        self._mca: McaCostCache | None = None
        if cost_source == "llvm-mca":
            from emu.cycles.mca import McaCostCache
            self._mca = McaCostCache(profile.isa, profile.llvm_mcpu, cache_dir())
        elif cost_source != "model":
            raise ValueError(f"unknown cost source {cost_source!r} (model or llvm-mca)")
        self.blocks: dict[tuple[int, int], Block] = {}
        # Everything a block cost depends on (a modified copy of a profile keeps its name).
        self._cost_key = repr((profile.name, cost_source, profile.width, profile.in_order,
                               profile.inorder_writeback, sorted(profile.ports.items()),
                               sorted(profile.classes.items()), sorted(profile.forwarding.items()),
                               sorted(profile.overrides.items())))
        self.lib = native.load() if use_native is not False else None
        if use_native and self.lib is None:
            raise RuntimeError("native block counter unavailable (no C compiler?)")
        self.native = self.lib is not None
        self.state: native.CmState | None = None
        self._py_prev_end = 1
        self._py_cur: tuple[int, int] = (0, 0)
        self._py_prev: Block | None = None
        self._py_dir: dict[tuple[int, int], bool] = {}     # 1-bit predictor: last direction
        self._py = dict.fromkeys(("code_fp", "layer_fp", "taken_fp", "mispredict_fp", "insns",
                                  "blocks"), 0)
        self.max_cycles = 0                   # --max-cycles: stop the run there (0: none)
        self._py_limit_hit = False
        # The parts of blocks charged at entry but not run (execution stopped inside them).
        self._unrun = dict.fromkeys(("code_fp", "layer_fp", "insns"), 0)
        self._hook: int | None = None

    # --- attaching --------------------------------------------------------------------------
    @classmethod
    def attach(cls, machine, profile: Profile | str | None = None, use_native: bool | None = None,
               cost_source: str = "model") -> "CycleModel":
        existing = machine.layers.get("cycles")
        if existing is not None:
            wanted = profile.name if isinstance(profile, Profile) else profile
            if wanted is not None and wanted != existing.profile.name:
                from emu.cycles.profile import ProfileError
                raise ProfileError(f"the cycle model is already on with profile "
                                   f"{existing.profile.name}, not {wanted}")
            return existing
        if not isinstance(profile, Profile):
            profile = profile_for(machine.arch.name, profile)
        elif profile.isa != machine.arch.name:
            profile = profile_for(machine.arch.name, profile.name)      # raises the mismatch
        model = cls(machine, profile, use_native, cost_source)
        model._install()
        machine.layers["cycles"] = model
        return model

    def _install(self) -> None:
        m, p, clock = self.m, self.profile, self.m.clock
        clock.freq_hz, clock.counter_hz = p.freq_hz, p.counter_hz
        clock.set_costs(p.reason_costs(), p.trap_parts())
        clock.layer_code_tag = f"{BOOKED_APART}-code"
        clock.profile = p.name
        clock.on_first_read = None      # no work clock: the model charges code
        work = m.layers.pop("work-clock", None)
        if work is not None:
            work.detach()               # the model charges code from now on
        old, lib = clock.acc, self.lib
        if lib is not None:
            st = self.state = native.CmState()
            st.taken_cost = p.branch_taken << FP_SHIFT
            st.loop_cost, st.loop_max = p.loop_back << FP_SHIFT, p.loop_buffer
            st.mispredict_cost = (p.branch_mispredict << FP_SHIFT) if p.mispredict_rate else 0
            self._miss_cb = native.MISS_CB(self._on_miss)
            st.miss = self._miss_cb
            if lib.cm_init(ctypes.byref(st), 1024):
                raise MemoryError("cycle model: table allocation failed")
            st.fp = old.fp
            st.prev_end = 1          # entering the first block counts as a taken branch
            clock.acc = st
            self._hook = self._add_native_hook(lib, st)
        else:
            self._hook = m.hooks.block(self._py_block)
        clock.pending = self.pending_fp
        clock.model_counts = self.counts
        m.text_listeners.append(self.invalidate)
        m.stop_listeners.append(self.settle)
        for cpu_uc in m.ucs:         # hooks are not called for already-translated blocks
            cpu_uc.ctl_flush_tb()

    def _add_native_hook(self, lib: ctypes.CDLL, st: native.CmState) -> int:
        hook = lib.cm_on_block_bp if self.profile.mispredict_rate else lib.cm_on_block
        return self.m.hooks.native_block(address_of(hook), ctypes.addressof(st))

    def _native(self) -> tuple[ctypes.CDLL, native.CmState] | None:
        """The library and the counter's state: native mode, once installed."""
        if self.lib is None or self.state is None:
            return None
        return self.lib, self.state

    def __del__(self) -> None:
        lib, st = getattr(self, "lib", None), getattr(self, "state", None)
        if lib is not None and st is not None and st.table:
            lib.cm_free(ctypes.byref(st))

    # --- block costs ------------------------------------------------------------------------
    def block(self, addr: int, size: int) -> Block:
        key = (addr, size)
        b = self.blocks.get(key)
        if b is None:
            code = bytes(self.m.uc.mem_read(addr, size))
            ckey = (self._cost_key, addr, code)
            b = _CACHE.get(ckey)
            if b is None:
                b = _CACHE[ckey] = self._compute(addr, code)
            # Who owns the page is this machine's fact, not the bytes': never cached.
            if self.m.owners.owner_of(addr) is BOOKED_APART:
                b = replace(b, flags=b.flags | CM_LAYER)
            self.blocks[key] = b
        return b

    def _compute(self, addr: int, code: bytes) -> Block:
        insns = list(self._md.disasm(code, addr))
        ops = [self._decode(i) for i in insns]
        cost = block_cost(self.profile, ops)
        if self._mca is not None:
            cost = self._mca_cost(self._mca, code, cost)
        return Block(cost, tuple(i.address - addr for i in insns), CM_COND if cost.cond else 0)

    @staticmethod
    def _mca_cost(mca: McaCostCache, code: bytes, cost: BlockCost) -> BlockCost:
        """llvm-mca's cost in place of the model's (prefixes scaled to it)."""
        fp = mca.get(code)
        if fp is None:
            return cost
        fp = max(1, fp)
        prefix = tuple(p * fp // cost.cost for p in cost.prefix[:-1]) + (fp,)
        return BlockCost(fp, prefix, cost.n, cost.cond, cost.branch)

    def _on_miss(self, _uc, addr: int, size: int, _ud) -> None:
        try:
            b = self.block(addr, size)
            nat = self._native()
            if nat is not None:
                nat[0].cm_insert(ctypes.byref(nat[1]), addr, size, b.cost.cost, b.cost.n, b.flags)
        except BaseException as exc:   # noqa: BLE001 - re-raised after emu_start
            self.m.hooks.fail(exc)

    def _py_block(self, addr: int, size: int) -> None:
        """The Python twin of cm_on_block (no compiler available)."""
        b = self.blocks.get((addr, size)) or self.block(addr, size)
        acc, p, c = self.m.clock.acc, self.profile, self._py
        prev_end = self._py_prev_end
        if p.mispredict_rate and self._py_prev is not None and self._py_prev.flags & CM_COND:
            taken = prev_end != addr
            last = self._py_dir.get(self._py_cur)
            self._py_dir[self._py_cur] = taken
            if last is None or last != taken:
                acc.fp += p.branch_mispredict << FP_SHIFT
                c["mispredict_fp"] += p.branch_mispredict << FP_SHIFT
        if prev_end and prev_end != addr:
            loop = self._py_prev is b and b.cost.n <= p.loop_buffer
            cost = (p.loop_back if loop else p.branch_taken) << FP_SHIFT
            acc.fp += cost
            c["taken_fp"] += cost
        cost = b.cost.cost
        acc.fp = min(acc.fp + cost, FP_MAX)
        c["code_fp"] += cost
        if b.flags & CM_LAYER:
            c["layer_fp"] += cost
        c["insns"] += b.cost.n
        c["blocks"] += 1
        self._py_prev_end = addr + size
        self._py_cur = (addr, size)
        self._py_prev = b
        if self.max_cycles and acc.fp >= min(self.max_cycles << FP_SHIFT, FP_MAX) \
                and not self._py_limit_hit:
            self._py_limit_hit = True
            self.m.uc.emu_stop()

    def set_cycle_limit(self, max_cycles: int) -> None:
        """Stop the run once the clock reaches `max_cycles` (checked per block)."""
        self.max_cycles = max_cycles
        if self.state is not None:
            self.state.limit_fp = min(max_cycles << FP_SHIFT, FP_MAX)
            self.state.stop = uc_emu_stop_address()
        self.m.limit_checks.append(self._limit_reached)

    def _limit_reached(self) -> str | None:
        hit = self.state.limit_hit if self.state is not None else self._py_limit_hit
        if hit:
            return f"cycle limit of {self.max_cycles} modelled cycles reached at pc {self.m.describe(self.m.pc)}"
        return None

    def counts(self) -> dict[str, int]:
        """code_fp, layer_fp, taken_fp, mispredict_fp (1/256 cycles), insns, blocks."""
        nat = self._native()
        if nat is not None:
            lib, st = nat
            out = (ctypes.c_uint64 * 4)()
            lib.cm_totals(ctypes.byref(st), out)
            c = {"code_fp": out[0], "layer_fp": out[1], "insns": out[2], "blocks": out[3],
                 "taken_fp": st.taken * st.taken_cost + st.loops * st.loop_cost,
                 "mispredict_fp": st.mispredicts * st.mispredict_cost}
        else:
            c = dict(self._py)
        for k, v in self._unrun.items():
            c[k] -= v
        return c

    def invalidate(self, addr: int, size: int) -> None:
        """Text at [addr, addr+size) changed: forget the costs of blocks overlapping it."""
        lo, hi = addr, addr + size
        for key in [k for k in self.blocks if k[0] < hi and k[0] + k[1] > lo]:
            del self.blocks[key]
        nat = self._native()
        if nat is not None:
            nat[0].cm_invalidate(ctypes.byref(nat[1]), lo, hi)

    def warm_up_mca(self) -> None:
        """Cost source llvm-mca: ask llvm-mca once for every block seen so far."""
        mca = self._mca
        if mca is None:
            return
        mca.fill([bytes(self.m.uc.mem_read(a, s)) for a, s in self.blocks])
        for k in [k for k in _CACHE if k[0] == self._cost_key]:
            del _CACHE[k]
        self.blocks.clear()
        nat = self._native()
        if nat is not None:
            nat[0].cm_invalidate(ctypes.byref(nat[1]), 0, 2**64 - 1)

    # --- snapshots --------------------------------------------------------------------------
    def save_state(self) -> CycleState:
        """Everything a later restore_state needs for the clock to go on exactly as from here."""
        nat = self._native()
        native_state = None
        if nat is not None and nat[1].table:
            st, table = nat[1], int(nat[1].table)
            size = (st.mask + 1) * ctypes.sizeof(native.CmEntry)
            cur = -1
            if st.cur:
                cur = (ctypes.addressof(st.cur.contents) - table) // ctypes.sizeof(native.CmEntry)
            native_state = (ctypes.string_at(ctypes.addressof(st), ctypes.sizeof(st)),
                            ctypes.string_at(table, size), cur)
        py = (dict(self._py), self._py_prev_end, self._py_cur, self._py_prev, dict(self._py_dir),
              self._py_limit_hit)
        return CycleState(dict(self.blocks), dict(self._unrun), native_state,
                          None if nat is not None else py)

    def restore_state(self, cs: CycleState) -> None:
        """Put the model back as save_state found it (between runs)."""
        self.blocks = dict(cs.blocks)
        self._unrun = dict(cs.unrun)
        nat = self._native()
        if nat is not None and cs.native is not None:
            raw, table, cur = cs.native
            self._restore_native(nat[0], nat[1], raw, table, cur)
        elif cs.py is not None:
            py, self._py_prev_end, self._py_cur, self._py_prev, py_dir, self._py_limit_hit = cs.py
            self._py, self._py_dir = dict(py), dict(py_dir)

    def _restore_native(self, lib: ctypes.CDLL, st: native.CmState, raw: bytes, table: bytes,
                        cur: int) -> None:
        entry = ctypes.sizeof(native.CmEntry)
        if (st.mask + 1) * entry != len(table):           # the table grew since: reallocate
            lib.cm_free(ctypes.byref(st))
            if lib.cm_init(ctypes.byref(st), len(table) // entry):
                raise MemoryError("cycle model: table allocation failed")
        base = st.table
        assert base is not None                             # cm_init allocated it
        ctypes.memmove(base, table, len(table))
        ctypes.memmove(ctypes.addressof(st), raw, len(raw))
        st.table = base                                    # the pointers are this table's
        st.cur = ctypes.cast(base + cur * entry, ctypes.POINTER(native.CmEntry)) if cur >= 0 \
            else ctypes.POINTER(native.CmEntry)()
        st.miss = self._miss_cb

    # --- where are we -----------------------------------------------------------------------
    def current_block(self) -> tuple[int, int]:
        if self.state is not None:
            cur = self.state.cur
            return (cur.contents.addr, cur.contents.size) if cur else (0, 0)
        return self._py_cur

    def cur_address(self) -> int | None:
        """Where C code finds the running block (cm_state.cur) of the native counter; None
        with the Python twin."""
        return None if self.state is None else ctypes.addressof(self.state) + native.CmState.cur.offset

    def pending_fp(self) -> int:
        """1/256 cycles of the running block after the instruction at pc (charged at block
        entry, not yet reached)."""
        addr, size = self.current_block()
        if not size:
            return 0
        pc = self.m.pc
        if not addr <= pc < addr + size:
            return 0
        b = self.blocks.get((addr, size))
        if b is None:
            return 0
        idx = self._index(b, addr, pc)
        return b.cost.cost - b.cost.prefix[idx] if idx < len(b.cost.prefix) else 0

    def _index(self, b: Block, addr: int, pc: int) -> int:
        off, idx = pc - addr, 0
        for i, o in enumerate(b.offsets):
            if o <= off:
                idx = i
        return idx

    def settle(self) -> None:
        """Emulation stopped (machine stop listener): if it stopped inside a block, take back
        the cost and instructions of the part not run, from the instruction at pc on; the run
        that resumes there starts a new block without a taken branch."""
        addr, size = self.current_block()
        if not size:
            return
        pc = self.m.pc
        b = self.blocks.get((addr, size))
        if b is None or not addr <= pc < addr + size:
            return
        idx = self._index(b, addr, pc)
        back = b.cost.cost - (b.cost.prefix[idx - 1] if idx else 0)
        if self.m.clock.saturated:
            back = 0                    # the block's cost was never all added: keep time still
        self.m.clock.acc.fp -= back
        self._unrun["code_fp"] += back
        if b.flags & CM_LAYER:
            self._unrun["layer_fp"] += back
        self._unrun["insns"] += b.cost.n - idx
        if self.state is not None:
            self.state.prev_end = pc
            self.state.cur = ctypes.POINTER(native.CmEntry)()
        else:
            self._py_prev_end, self._py_cur, self._py_prev = pc, (0, 0), None

    # --- results ----------------------------------------------------------------------------
    @property
    def instructions(self) -> int:
        return self.counts()["insns"]

    def stats(self) -> dict[str, Any]:
        clock, counts = self.m.clock, self.counts()
        return {"cycles": clock.cycles, "instructions": counts["insns"],
                "profile": self.profile.name, "freq_hz": clock.freq_hz,
                "cycles_by_reason": dict(sorted(clock.breakdown().items())),
                "blocks_executed": counts["blocks"], "blocks_costed": len(self.blocks),
                "cycle_counter": "native" if self.native else "python"}

    def report(self, out: IO[str]) -> None:
        clock = self.m.clock
        out.write(f"cycles: {clock.cycles} instructions: {clock.instructions} "
                  f"profile: {self.profile.name}\n")


def cycle_model_of(machine) -> CycleModel | None:
    return machine.layers.get("cycles")
