"""The BPF hash maps' storage and the helper trampoline's host entry in C (bpf_native.c,
issue 17), built with the system cc into the per-user cache at first use and loaded with
ctypes, as probes/native builds kprobe_native.c. ``KPROBE_EMU_NATIVE=0`` or no C compiler:
``load()`` is None, hash maps keep their Python storage and every helper call its Python
host entry, with the same results."""
from __future__ import annotations

import ctypes
import errno
import mmap
import random
import weakref
from pathlib import Path
from typing import Any, Callable, ClassVar

from emu.native_lib import cached_library
from probes.bpf.maps import BpfMapType

from . import enabled, on_task_switch

SOURCE = Path(__file__).with_name("bpf_native.c")
PREALLOC_LIMIT = 64 << 20      # bytes: a larger hash map keeps the Python storage (on demand)


class BnHtab(ctypes.Structure):
    """struct bn_htab, field for field."""
    key_size: int
    value_size: int
    vstride: int
    ncpus: int
    max_entries: int
    count: int
    keys: int
    values: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        (n, ctypes.c_uint32) for n in ("key_size", "value_size", "vstride", "ncpus",
                                       "max_entries", "nbuckets", "count", "lru", "head",
                                       "tail", "free_head", "pad")] + [
        (n, ctypes.c_void_p) for n in ("bucket", "chain", "onext", "oprev", "keys", "values")]


class BnMap(ctypes.Structure):
    """struct bn_map: a hash map (``htab``) or an array map's guest window."""
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("handle", ctypes.c_uint64), ("htab", ctypes.c_void_p), ("window", ctypes.c_uint64),
        ("max_entries", ctypes.c_uint32), ("elem_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("cpu", ctypes.c_int32)]


class BnImage(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("maps", ctypes.c_void_p),
        ("nmaps", ctypes.c_uint64), ("rng", ctypes.c_void_p)]


class BnMt(ctypes.Structure):
    """struct bn_mt: MT19937's state as CPython's random keeps it (624 words, the index)."""
    index: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [("mt", ctypes.c_uint32 * 624),
                                                 ("index", ctypes.c_uint32)]


class NativeRandom(random.Random):
    """A run environment's generator (BpfRunContext._rng) whose state C holds, so that
    get_prandom_u32 in C (bn_mt_next) and in Python draw one sequence: the sequence of
    ``random.Random(seed).getrandbits(32)``, from the state it takes over."""

    def __init__(self, lib: ctypes.CDLL, state: tuple[Any, ...]) -> None:
        super().__init__(0)
        self.st = BnMt()
        words = state[1]
        self.st.mt[:] = words[:624]
        self.st.index = words[624]
        self._next = lib.bn_mt_next
        self._ptr = ctypes.addressof(self.st)

    def getrandbits(self, k: int) -> int:
        out, have = 0, 0
        while have < k:               # CPython: 32-bit words, least significant first
            word = self._next(self._ptr)
            take = min(32, k - have)
            out |= (word >> (32 - take)) << have
            have += take
        return out


class BnJit(ctypes.Structure):
    """struct bn_jit: one ScratchJit's C side."""
    helper_cycles: int
    executing: int
    served: int
    deferred: int
    task_valid: int
    pid_tgid: int
    uid_gid: int
    task: int
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("reg_read", ctypes.c_void_p), ("reg_write", ctypes.c_void_p),
        ("mem_read", ctypes.c_void_p), ("mem_write", ctypes.c_void_p),
        ("fp", ctypes.c_void_p), ("handler_fp", ctypes.c_void_p),
        ("helper_cycles", ctypes.c_uint64), ("args", ctypes.c_int32 * 5),
        ("ret_reg", ctypes.c_int32), ("link_reg", ctypes.c_int32), ("sp_reg", ctypes.c_int32),
        ("call_size", ctypes.c_uint32), ("executing", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32), ("pad", ctypes.c_uint32),
        ("stack_lo", ctypes.c_uint64), ("stack_hi", ctypes.c_uint64),
        ("images", ctypes.c_void_p), ("nimages", ctypes.c_uint64),
        ("served", ctypes.c_uint64), ("deferred", ctypes.c_uint64),
        ("task_valid", ctypes.c_uint32), ("pad2", ctypes.c_uint32),
        ("pid_tgid", ctypes.c_uint64), ("uid_gid", ctypes.c_uint64), ("task", ctypes.c_uint64),
        ("comm", ctypes.c_char * 16)]


class BnStub(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("j", ctypes.c_void_p), ("orig", ctypes.c_void_p), ("orig_data", ctypes.c_void_p),
        ("fid", ctypes.c_uint64)]


def _declare(lib: ctypes.CDLL) -> None:
    vp, u8p = ctypes.c_void_p, ctypes.c_char_p
    for name, args, res in (
            ("bn_htab_new", [ctypes.c_uint32] * 5 + [vp, vp], vp),
            ("bn_htab_free", [vp], None),
            ("bn_htab_find", [vp, u8p, ctypes.c_uint32], ctypes.c_int64),
            ("bn_htab_update", [vp, u8p, u8p, ctypes.c_uint64, ctypes.c_int64], ctypes.c_int64),
            ("bn_htab_delete", [vp, u8p], ctypes.c_int64),
            ("bn_htab_next", [vp, u8p], ctypes.c_int64),
            ("bn_mt_next", [vp], ctypes.c_uint32)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


# bpf_native.c, built first if needed; None when disabled (KPROBE_EMU_NATIVE=0) or not buildable
load = cached_library(SOURCE, "bpf-native", _declare, enabled)


def _raw(lib: ctypes.CDLL, name: str) -> Any:
    """A function of ``lib`` returning int64, called without argtypes (a new function
    object: the library's own keeps its argtypes)."""
    fn = lib[name]
    fn.restype = ctypes.c_int64
    return fn


class NativeHtab:
    """A hash map's elements in C (struct bn_htab): preallocated slots, each a key and one
    value per CPU; ``value(slot, cpu)`` is a writable view of the pool (one object per
    slot and CPU, so a program's region for it stays the same while the slot lives).
    Attributes: ``ptr`` (the struct bn_htab *, for the helper entry), ``lib``."""

    def __init__(self, lib: ctypes.CDLL, ptr: int, keys: Any, values: Any) -> None:
        self.lib, self.ptr = lib, ptr
        self.h = BnHtab.from_address(ptr)
        # Python owns the keys and values (C the index): a view of a value that outlives
        # the map (a run's region, a JIT window) keeps its buffer alive
        self._keys = memoryview(keys).cast("B")
        self._values = memoryview(values).cast("B")
        self._views: dict[int, memoryview] = {}
        self.values_mm: mmap.mmap | None = None
        self._ncpus, self._vstride, self._vsize = self.h.ncpus, self.h.vstride, self.h.value_size
        self._ksize = self.h.key_size
        # the per-lookup call without argtypes: ctypes' conversions cost more than the
        # lookup (~0.7 against ~0.4 µs a call); every argument is a pointer or a small int
        self._vp, self._find = ctypes.c_void_p(ptr), _raw(lib, "bn_htab_find")
        self._update, self._delete = _raw(lib, "bn_htab_update"), _raw(lib, "bn_htab_delete")
        self._next = _raw(lib, "bn_htab_next")
        weakref.finalize(self, lib.bn_htab_free, ptr)

    @classmethod
    def new(cls, key_size: int, value_size: int, max_entries: int, ncpus: int,
            lru: bool, percpu: bool = False) -> "NativeHtab | None":
        lib = load()
        vstride = (value_size + 7) & ~7
        size = max_entries * (key_size + ncpus * vstride + 16)
        if lib is None or size > PREALLOC_LIMIT:
            return None
        keys = (ctypes.c_char * max(1, max_entries * key_size))()
        # the values in whole pages of their own (mmap): a traced guest maps them
        # (map_host) so JITed code dereferences a lookup's pointer, as htab values are
        # kernel memory the kernel's JIT reads directly
        nbytes = max(1, max_entries * ncpus * vstride)
        mm = mmap.mmap(-1, (nbytes + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1))
        values = (ctypes.c_char * nbytes).from_buffer(mm)
        kind = (2 if percpu else 1) if lru else 0          # bpf_native.c BN_LRU*
        ptr = lib.bn_htab_new(key_size, value_size, max_entries, ncpus, kind,
                              ctypes.addressof(keys), ctypes.addressof(values))
        if not ptr:
            return None
        out = cls(lib, ptr, keys, values)
        out.values_mm = mm
        return out

    @property
    def values_addr(self) -> int:
        """Host address of the values (page-aligned; ``len(values_mm)`` bytes)."""
        return int(self.h.values)

    def __len__(self) -> int:
        return int(self.h.count)

    # C copies key_size / value_size bytes from what it is given: a short buffer is
    # refused here (-EINVAL, or no element) before C could read past it.
    def find(self, key: bytes, touch: bool) -> int:
        if len(key) != self._ksize:
            return -1
        return self._find(self._vp, key, 1 if touch else 0)

    def view(self, key: bytes, cpu: int, touch: bool) -> memoryview | None:
        """The value of ``key`` on ``cpu`` (a program's lookup), or None: find + value."""
        if len(key) != self._ksize:
            return None
        slot = self._find(self._vp, key, 1 if touch else 0)
        if slot < 0:
            return None
        idx = slot * self._ncpus + cpu
        view = self._views.get(idx)
        if view is None:
            off = idx * self._vstride
            view = self._views[idx] = self._values[off:off + self._vsize]
        return view

    def key(self, slot: int) -> bytes:
        ks = self.h.key_size
        return bytes(self._keys[slot * ks:(slot + 1) * ks])

    def value(self, slot: int, cpu: int) -> memoryview:
        idx = slot * self.h.ncpus + cpu
        view = self._views.get(idx)
        if view is None:
            off = idx * self.h.vstride
            view = self._views[idx] = self._values[off:off + self.h.value_size]
        return view

    def update(self, key: bytes, value: bytes, flags: int, cpu: int | None) -> int:
        """cpu None: every CPU's value; a CPU out of range writes none (as Python's)."""
        if len(key) != self._ksize or len(value) != self._vsize:
            return -errno.EINVAL
        c = -1 if cpu is None else cpu if cpu >= 0 else 1 << 62
        return self._update(self._vp, key, value, ctypes.c_uint64(flags & (2**64 - 1)),
                            ctypes.c_int64(c))

    def delete(self, key: bytes) -> int:
        if len(key) != self._ksize:
            return -errno.EINVAL
        return self._delete(self._vp, key)

    def next(self, key: bytes | None) -> int:
        """The slot of the key after ``key`` (the first: None or absent), or -ENOENT."""
        if key is not None and len(key) != self._ksize:
            return -errno.EINVAL
        return self._next(self._vp, key)


# Helpers the trampoline's C entry serves (bn_helper_hook): the rest stay Python's.
NATIVE_HELPERS = frozenset({1, 2, 3, 7, 8, 14, 15, 16, 35})
# map_lookup_elem (a hash map whose values the guest maps), map_update_elem,
# map_delete_elem, get_prandom_u32, get_smp_processor_id; current's pid_tgid, uid_gid,
# comm (into the BPF stack) and task, from the words ``set_task`` writes
# C serves them on the hash maps (the per-CPU ones on the running CPU) and on
# BPF_MAP_TYPE_ARRAY's guest window
_SERVED = frozenset({BpfMapType.BPF_MAP_TYPE_HASH, BpfMapType.BPF_MAP_TYPE_LRU_HASH})
_PERCPU = frozenset({BpfMapType.BPF_MAP_TYPE_PERCPU_HASH,
                     BpfMapType.BPF_MAP_TYPE_LRU_PERCPU_HASH})


BN_THIS_CPU = -2                        # a row's cpu: the running CPU's value (bn_jit.cpu)


def _served_map(handle: int, mp: Any, window: Callable[[Any], int | None]) -> BnMap | None:
    """The C row of a map C serves, or None. A program's update of a per-CPU hash writes
    the running CPU's value: the one Python's entry writes (jit_guest sets the run's CPU
    to the machine's), which C reads from bn_jit.cpu, kept by a cpu_listener."""
    from probes.bpf.maps import ArrayMap, HashMap

    if isinstance(mp, HashMap) and mp.native is not None:
        # a hash map's `window`: the guest address of its values (0: not mapped, and C
        # leaves its lookups to Python)
        if mp.map_type in _SERVED:
            return BnMap(handle, mp.native.ptr, window(mp) or 0, cpu=-1)
        if mp.map_type in _PERCPU:
            return BnMap(handle, mp.native.ptr, window(mp) or 0, cpu=BN_THIS_CPU)
    if type(mp) is ArrayMap:
        addr = window(mp)
        if addr is not None:
            return BnMap(handle, None, addr, mp.max_entries, mp.elem_size, mp.value_size, -1)
    return None


class _TaskSwitches:
    """Clears the task words of a machine's current NativeHelpers before every task switch:
    one per machine (the wrapper it puts on Unicorn's context_restore outlives snapshot
    restores, so it holds the helpers weakly and never more than one is installed)."""
    _of: "weakref.WeakKeyDictionary[Any, _TaskSwitches]" = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.target: "weakref.ref[NativeHelpers] | None" = None

    @classmethod
    def of(cls, machine: Any) -> "_TaskSwitches":
        got = cls._of.get(machine)
        if got is None:
            got = cls._of[machine] = cls()
            on_task_switch(machine, got.switched)
        return got

    def switched(self) -> None:
        helpers = self.target() if self.target is not None else None
        if helpers is not None:
            helpers.jit.task_valid = 0


class NativeHelpers:
    """The C entries of one ScratchJit's helper trampolines in a traced guest. A trampoline
    of a helper in NATIVE_HELPERS gets bn_helper_hook in place of its Python host entry;
    C serves a call from an image registered here (``register``: the image's range and its
    run's map handles) on a hash map it owns, with its key and value on the live native
    stack, outside a nested run (``executing``); it hands anything else to the Python
    entry. The host-handler charge goes into the clock's counter at once and into
    ``by_reason["bpf helper"]`` when ``fold`` runs (at a run's stop).
    Attributes: ``jit`` (the struct bn_jit: ``served``, ``deferred``)."""

    def __init__(self, lib: ctypes.CDLL, machine: Any, st_fp: int, st_handler_fp: int,
                 arg_ids: list[int], ret_id: int, call_size: int, stack: tuple[int, int]) -> None:
        from emu.ucfast import lib_symbol

        self.lib, self.m = lib, machine
        j = self.jit = BnJit()
        j.reg_read, j.reg_write = lib_symbol("uc_reg_read"), lib_symbol("uc_reg_write")
        j.mem_read, j.mem_write = lib_symbol("uc_mem_read"), lib_symbol("uc_mem_write")
        j.fp, j.handler_fp = st_fp, st_handler_fp
        j.args[:] = arg_ids[:5]
        arch = machine.arch
        j.ret_reg, j.sp_reg = ret_id, arch.reg_id(arch.sp)
        j.link_reg = arch.reg_id(arch.link) if arch.link else -1
        j.call_size = call_size
        j.stack_lo, j.stack_hi = stack
        self._stubs: list[BnStub] = []
        self._images: dict[int, tuple[Any, list[Any]]] = {}   # image addr -> (BnMap array, maps)
        self._table: Any = None
        machine.stop_listeners.append(self.fold)
        j.cpu = machine.cpu                 # get_smp_processor_id, per-CPU hash updates
        machine.cpu_listeners.append(self._cpu_switched)
        # current's words: stale at every task switch; ``task_source`` (set by the JIT:
        # BpfTrace.current_task on the run environment) rewrites them at a CPU switch
        self.task_source: Callable[[], Any] | None = None
        _TaskSwitches.of(machine).target = weakref.ref(self)
        # The swapped hooks point into this object's records: it lives as long as one of
        # them is installed (RawHooks.hold in `serve`; a snapshot restore lets it go).

    @classmethod
    def create(cls, machine: Any, arg_ids: list[int], ret_id: int, call_size: int,
               stack: tuple[int, int]) -> "NativeHelpers | None":
        """For ``machine``'s JIT, or None: no library, or no clock C can charge (the
        kprobe dispatcher's NativeClock keeps the counter where C reaches it)."""
        from emu.ucfast import lib_symbol

        from . import KnState

        lib = load()
        native = getattr(machine.clock, "native", None)
        st = getattr(native, "st", None)
        if lib is None or not isinstance(st, KnState) or None in (
                lib_symbol("uc_reg_read"), lib_symbol("uc_reg_write"), lib_symbol("uc_mem_read"),
                lib_symbol("uc_mem_write")):
            return None
        base = ctypes.addressof(st)
        return cls(lib, machine, base + KnState.fp.offset, base + KnState.handler_fp.offset,
                   arg_ids, ret_id, call_size, stack)

    def serve(self, handle: int, fid: int) -> bool:
        """Swap the Python host entry ``handle`` of helper ``fid``'s trampoline for C's."""
        from . import swap_code_hook

        if fid not in NATIVE_HELPERS:
            return False
        rec = BnStub(j=ctypes.addressof(self.jit), fid=fid)
        if not swap_code_hook(self.m, handle, self.lib.bn_helper_hook, rec):
            return False
        self._stubs.append(rec)
        self.m.hooks.hold(handle, self)
        return True

    def register(self, image: Any, run: Any, window: Callable[[Any], int | None]) -> None:
        """C may serve calls from ``image`` with ``run``'s map handles (its kept run):
        hash maps in C, array maps whose values are at guest address ``window(map)``."""
        if image.addr in self._images:
            return
        rows, maps = [], []
        for handle, mp in sorted(run._maps_at.items()):
            row = _served_map(handle, mp, window)
            if row is not None:
                rows.append(row)
                maps.append(mp)
        arr = (BnMap * max(1, len(rows)))(*rows)
        rng = self._generator(run.env)
        self._images[image.addr] = (arr, [image.addr, image.addr + len(image.code), maps,
                                          rng])
        self._publish()

    def _generator(self, env: Any) -> "NativeRandom | None":
        """The run environment's generator, handed to C (its state carried over)."""
        if not hasattr(env, "_rng") or not hasattr(env, "prandom_seed"):
            return None
        rng: Any = env._rng
        if not isinstance(rng, NativeRandom):
            state = (rng if rng is not None else random.Random(env.prandom_seed)).getstate()
            rng = env._rng = NativeRandom(self.lib, state)
        return rng

    def invalidate(self) -> None:
        """The windows moved (jit_guest.sync_windows): every image registers again."""
        if self._images:
            self._images.clear()
            self._publish()

    def _publish(self) -> None:
        rows = sorted(self._images.items())
        table = (BnImage * max(1, len(rows)))(*[
            BnImage(info[0], info[1], ctypes.addressof(a), len(info[2]),
                    info[3]._ptr if info[3] is not None else None)
            for _a, (a, info) in rows])
        self.jit.images, self.jit.nimages = ctypes.addressof(table), len(rows)
        self._table = table              # the old table is freed only after C points past it

    def _cpu_switched(self, cpu: int) -> None:
        self.jit.cpu = cpu
        self.jit.task_valid = 0
        if self.task_source is not None:     # the scheduler has named the task already
            self.set_task(self.task_source())

    def set_task(self, env: Any) -> None:
        """current's words for C from a run environment BpfTrace.current_task has just
        set: what get_current_pid_tgid, _uid_gid, _comm and _task return from it."""
        j = self.jit
        j.pid_tgid = ((env.tgid & 0xFFFFFFFF) << 32) | (env.pid & 0xFFFFFFFF)
        j.uid_gid = ((env.gid & 0xFFFFFFFF) << 32) | (env.uid & 0xFFFFFFFF)
        j.task = env.task & 0xFFFFFFFFFFFFFFFF
        # all 16 bytes: a c_char field's setter stops at the first NUL, leaving old bytes
        ctypes.memmove(ctypes.addressof(j) + BnJit.comm.offset,
                       bytes(env.comm[:15]).ljust(16, b"\0"), 16)
        j.task_valid = 1

    def set_executing(self, on: bool) -> None:
        self.jit.executing = int(on)

    def fold(self) -> None:
        """The cycles C charged as host handlers, into the clock's reasons."""
        n = self.jit.helper_cycles
        if n:
            self.jit.helper_cycles = 0
            by = self.m.clock.by_reason
            by["bpf helper"] = by.get("bpf helper", 0) + n

