"""The symbol table service: name -> address, address -> `name+0xoff/0xsize` (kallsyms
style), and function extents for the probe layer.

Names are looked up as linked (`_Z6middlei`), demangled (`middle(int)`) or by the plain
name when one address has it (`middle`); tables, traces and fault reports show demangled
names. IFUNC symbols (`memcpy` in static glibc) name a resolver, not code the guest runs:
`when_ifunc_resolved` waits for the guest's own start-up to store the resolver's choice into
the IRELATIVE GOT slot, and from then on the name means that implementation."""
from __future__ import annotations

import bisect
import difflib
from dataclasses import dataclass
from typing import Callable

from emu.elf import ElfSymbol

_demangled: dict[str, str] = {}


def demangle(name: str) -> str:
    """The C++ name of an Itanium-mangled symbol (libstdc++'s demangler via cxxfilt); any
    other name, or one it cannot demangle, unchanged."""
    if not name.startswith("_Z"):
        return name
    got = _demangled.get(name)
    if got is None:
        try:
            import cxxfilt
            got = cxxfilt.demangle(name)
        except Exception:  # noqa: BLE001 - no libstdc++, or not a valid mangled name
            got = name
        _demangled[name] = got
    return got


def plain_name(demangled: str) -> str:
    """`ns::middle` of `ns::middle(int) const`: the name before the top-level parameters."""
    depth = 0
    for i, c in enumerate(demangled):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0 and i:
            return demangled[:i]
    return demangled


@dataclass(frozen=True)
class Symbol:
    linkage_name: str   # as in the ELF symbol table (mangled for C++)
    addr: int
    size: int
    kind: str           # "func" | "object" | "notype" | "ifunc"

    @property
    def name(self) -> str:
        """The name to show: demangled for C++."""
        n = self.linkage_name
        return n if n[:2] != "_Z" else demangle(n)

    @property
    def end(self) -> int:
        return self.addr + self.size


class SymbolTable:
    def __init__(self, symbols: list[ElfSymbol] | None = None) -> None:
        self._by_name: dict[str, list[Symbol]] = {}
        self._ifunc_slot: dict[str, int | None] = {}     # IFUNC name -> its IRELATIVE slot
        self._resolved: dict[int, int] = {}              # slot -> implementation the guest chose
        self._cxx: dict[str, list[Symbol]] | None = None  # demangled and plain names, on demand
        self._modules: dict[str, dict[str, Symbol]] = {}  # module name -> its symbols (MOD:SYM)
        syms = []
        for s in symbols or ():
            sym = Symbol(s.name, s.addr, s.size, s.kind)
            syms.append(sym)
            self._by_name.setdefault(s.name, []).append(sym)
            if s.kind == "ifunc":
                self._ifunc_slot[s.name] = s.slot
        syms.sort(key=lambda s: s.addr)         # stable: aliases keep the file's order
        self._sorted = syms
        self._starts = [s.addr for s in syms]

    def add(self, name: str, addr: int, size: int, kind: str = "func") -> Symbol:
        sym = Symbol(name, addr, size, kind)
        self._by_name.setdefault(name, []).append(sym)
        i = bisect.bisect_right(self._starts, addr)
        self._sorted.insert(i, sym)
        self._starts.insert(i, addr)
        self._cxx = None
        return sym

    def remove(self, sym: Symbol) -> None:
        """Forget one symbol added with `add` (a module's, at unload)."""
        same = self._by_name.get(sym.linkage_name, [])
        if sym in same:
            same.remove(sym)
            if not same:
                del self._by_name[sym.linkage_name]
        i = bisect.bisect_left(self._starts, sym.addr)
        while i < len(self._sorted) and self._starts[i] == sym.addr:
            if self._sorted[i] is sym:
                del self._sorted[i], self._starts[i]
                break
            i += 1
        self._cxx = None

    def add_namespace(self, module: str, symbols: dict[str, Symbol]) -> None:
        """A module's symbols, found as `MODULE:NAME` (kallsyms' module lookup)."""
        self._modules[module] = symbols

    def drop_namespace(self, module: str) -> None:
        self._modules.pop(module, None)

    def _qualified(self, name: str) -> list[Symbol] | None:
        """`MOD:SYM` searches that module only; None when `name` is not qualified."""
        mod, sep, sym = name.partition(":")
        if not sep or not mod or not sym:
            return None
        found = self._modules.get(mod, {}).get(sym)
        return [found] if found is not None else []

    def __len__(self) -> int:
        return len(self._sorted)

    def __iter__(self):
        return iter(self._sorted)

    def lookup_all(self, name: str) -> list[Symbol]:
        qualified = self._qualified(name) if self._modules else None
        return list(self._by_name.get(name, ())) if qualified is None else qualified

    def lookup(self, name: str) -> Symbol | None:
        """The symbol called `name` (kallsyms_lookup_name); functions win over data. A C++
        name may be given mangled, demangled, or plain when it names one address; an IFUNC
        name means the implementation once the guest has resolved it."""
        qualified = self._qualified(name) if self._modules else None
        if qualified is not None:
            return qualified[0] if qualified else None
        cands = [s for s in self._by_name.get(name, ()) if s.kind != "ifunc"]
        if not cands:
            if name in self._ifunc_slot:
                return self._ifunc_target(name)
            cands = self._cxx_names().get(name, [])
            if len({s.addr for s in cands}) != 1:
                return None                     # unknown, or an ambiguous plain name
        return sorted(cands, key=lambda s: (s.kind != "func", s.size == 0))[0]

    def _cxx_names(self) -> dict[str, list[Symbol]]:
        if self._cxx is None:
            self._cxx = {}
            for s in self._sorted:
                if s.linkage_name[:2] == "_Z" and s.kind != "ifunc":
                    full = s.name
                    self._cxx.setdefault(full, []).append(s)
                    if plain_name(full) != full:
                        self._cxx.setdefault(plain_name(full), []).append(s)
        return self._cxx

    def find(self, addr: int) -> Symbol | None:
        """The symbol whose extent contains `addr` (sized symbols; else nearest preceding)."""
        i = bisect.bisect_right(self._starts, addr)
        best = None
        j = i - 1
        while j >= 0 and j >= i - 64:
            s = self._sorted[j]
            if s.addr <= addr < s.end:
                if best is None or (best.kind != "func" and s.kind == "func"):
                    best = s
                if best.kind == "func":
                    break
            j -= 1
        return best

    def functions(self) -> list[Symbol]:
        seen, out = set(), []
        for s in self._sorted:
            if s.kind == "func" and s.size and s.addr not in seen:
                seen.add(s.addr)
                out.append(s)
        return out

    def format(self, addr: int, with_size: bool = True) -> str:
        """kallsyms `%pS` style: `name+0xoff/0xsize`, or the bare hex address."""
        s = self.find(addr)
        if s is None:
            return f"{addr:#x}"
        if with_size:
            return f"{s.name}+{addr - s.addr:#x}/{s.size:#x}"
        return f"{s.name}+{addr - s.addr:#x}"

    # --- unknown names --------------------------------------------------------------------
    def hint(self, name: str) -> str:
        """Why `name` is not found and what is close, for the one-line error: "" or
        "; did you mean 'mian', 'main'?"."""
        if name in self._ifunc_slot:
            if self._ifunc_slot[name] is None:
                return "; it is an IFUNC the program never calls through an IRELATIVE slot"
            return "; it is an IFUNC the guest has not resolved yet"
        plain = {s.addr: s.name for s in self._cxx_names().get(name, ())}
        if len(plain) > 1:
            return "; ambiguous: " + ", ".join(repr(n) for n in sorted(plain.values())[:6])
        names = {s.linkage_name for s in self._sorted
                 if s.kind != "object" and s.linkage_name[:2] != "_Z"}
        names |= {n for n in self._cxx_names()}
        close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
        return "; did you mean " + ", ".join(repr(n) for n in close) + "?" if close else ""

    # --- IFUNC ------------------------------------------------------------------------------
    def is_ifunc(self, name: str) -> bool:
        return name in self._ifunc_slot

    def ifunc_slot(self, name: str) -> int | None:
        """The GOT slot the IRELATIVE relocation of IFUNC `name` fills, if it has one."""
        return self._ifunc_slot.get(name)

    def ifunc_resolved(self, name: str) -> int | None:
        """The implementation the guest's resolver chose for `name`, once it is known."""
        slot = self._ifunc_slot.get(name)
        return None if slot is None else self._resolved.get(slot)

    def resolve_ifunc(self, slot: int, impl: int) -> None:
        """The guest stored `impl` into `slot`: every IFUNC name of that slot now means it."""
        self._resolved[slot] = impl

    def _ifunc_target(self, name: str) -> Symbol | None:
        impl = self.ifunc_resolved(name)
        if impl is None:
            return None
        sym = self.find(impl)
        return sym if sym is not None and sym.addr == impl else Symbol(name, impl, 0, "func")


class IfuncWatch:
    """One-shot write watches on IRELATIVE GOT slots (a memory-write hook on 8 bytes, never a
    code hook on the probed address): the guest's start-up (glibc's apply_irel or
    _dl_relocate_static_pie) calls each resolver and stores its choice there.

    Text cannot be patched from inside a memory hook (invalidating translated code there
    crashes Unicorn), so the callbacks run at the start of the next block translated after
    the store: a one-shot block hook, gone once it has fired. The implementation has not run
    through the slot before that block; if that block is the implementation itself, the pc
    is rewritten so its patched text is translated afresh."""

    def __init__(self, m) -> None:
        self.m = m
        # slot -> (hook, [(key, callback)]); `key` lets the owner cancel its wait
        self.waiting: dict[int, tuple[int, list[tuple[object, Callable[[], None]]]]] = {}
        self.ready: list[tuple[object, Callable[[], None]]] = []
        self._block_hook: int | None = None

    def add(self, slot: int, callback: Callable[[], None], key: object = None) -> None:
        if slot not in self.waiting:
            from unicorn import UC_HOOK_MEM_WRITE
            # The whole page (to the slot's end): Unicorn marks a page dirty after a store
            # no hook covers, and code then stores to the page inline, hook or not
            # (emu/vtlb.py); _on_write picks the slot's own. A dirty entry made before the
            # hook would skip it too: refill.
            page = slot & ~0xFFF
            hook = self.m.uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write, begin=page,
                                      end=max(page + 0x1000, slot + 8) - 1)
            self.m.tlb.flush(self.m.memory.ucs)
            self.waiting[slot] = (hook, [])
        self.waiting[slot][1].append((key, callback))

    def cancel(self, key: object) -> None:
        """Forget the callbacks registered with `key` (the slot watch stays: cheap, one-shot)."""
        for _hook, callbacks in self.waiting.values():
            callbacks[:] = [(k, cb) for k, cb in callbacks if k is not key]
        self.ready = [(k, cb) for k, cb in self.ready if k is not key]

    def _guarded(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by Machine.run
            self.m.hooks.fail(exc)

    def _on_write(self, uc, _access, addr, size, value, _data) -> None:
        if addr in self.waiting and size == 8:
            self._guarded(lambda: self._resolved(uc, addr, value & (1 << 64) - 1))

    def _resolved(self, uc, slot: int, impl: int) -> None:
        hook, callbacks = self.waiting.pop(slot)
        _hook_del(uc, hook)
        self.m.symbols.resolve_ifunc(slot, impl)
        self.ready += callbacks
        if self._block_hook is None:
            from unicorn import UC_HOOK_BLOCK
            self._block_hook = uc.hook_add(UC_HOOK_BLOCK, self._on_block)

    def _on_block(self, uc, addr, size, _data) -> None:
        self._guarded(lambda: self._arm_ready(uc, addr, size))

    def _arm_ready(self, uc, addr: int, size: int) -> None:
        if self._block_hook is not None:
            _hook_del(uc, self._block_hook)
            self._block_hook = None
        ready, self.ready = self.ready, []
        patches = len(self.m.patches)
        for _key, cb in ready:
            cb()
        if any(addr < p.addr + len(p.new) and p.addr < addr + size for p in self.m.patches[patches:]):
            self.m.pc = addr                    # leave this stale block, translate it afresh


def _hook_del(uc, hook: int) -> None:
    """The raw delete: the binding's hook_del would free the ctypes thunk a callback may be
    running in (a crash on return); Unicorn itself defers the unlink."""
    from emu.ucfast import uclib
    uclib.uc_hook_del(uc._uch, hook)


def when_ifunc_resolved(m, name: str, callback: Callable[[], None], key: object = None) -> bool:
    """Pending resolution of IFUNC `name` on machine `m`: True if `callback()` will run once
    the guest stores the implementation into its slot (then `m.symbols.lookup(name)` is that
    implementation); False if `name` is no IFUNC, has no slot, or is resolved already."""
    syms = m.symbols
    slot = syms.ifunc_slot(name)
    if slot is None or syms.ifunc_resolved(name) is not None:
        return False
    now = m.memory.read_safe(slot, 8)
    initial = m.image.initial_bytes(slot, 8) if m.image is not None else b""
    if now is not None and initial and now != initial:        # resolved before we watched
        syms.resolve_ifunc(slot, int.from_bytes(now, "little"))
        return False
    m.layer("ifunc", IfuncWatch).add(slot, callback, key)
    return True


def cancel_ifunc_wait(m, key: object) -> None:
    """Drop the pending resolutions registered with `key` (a probe unregistered while pending)."""
    watch = m.layers.get("ifunc")
    if watch is not None:
        watch.cancel(key)
