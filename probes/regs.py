"""pt_regs: the register view handlers receive.

Registers are read from the CPU on first use and written back only if changed, so a hit
whose handler touches nothing costs no register traffic. Names are the arch's (x0..x30,
sp, pc, pstate / rax.., rip, rflags); `ip`, `sp`, `return_value` and `arg(n)` are the
arch-neutral accessors (regs_get_kernel_argument, regs_return_value, instruction_pointer)."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from emu.uaccess import UserFault, get_user
from probes.arch import arch_ptrace

if TYPE_CHECKING:
    from emu.arch import Arch
    from emu.machine import Machine


@dataclass(frozen=True)
class RegsFacts:
    """What the view must know of an arch beyond emu/arch's register table; the arch's
    ptrace module (probes/arch/<name>/ptrace.py) states them."""
    zero_regs: frozenset[str]       # read as 0, writes dropped (arm64 xzr)
    stack_args: bool                # $argN beyond the argument registers is on the stack


_FACTS: dict[str, RegsFacts] = {}


def regs_facts(arch: "Arch") -> RegsFacts:
    facts = _FACTS.get(arch.name)
    if facts is None:
        pt = arch_ptrace(arch.name)
        facts = _FACTS[arch.name] = RegsFacts(pt.ZERO_REGS, pt.STACK_ARGS)
    return facts


class PtRegs:
    __slots__ = ("_m", "_arch", "_cache", "_dirty")

    def __init__(self, machine: "Machine", ip: int | None = None, sp: int | None = None) -> None:
        # Built on every probe hit: keep it to a few stores.
        self._m = machine
        self._arch = arch = machine.arch
        self._cache: dict[str, int] = {} if ip is None else {arch.pc: ip}   # ip: kernel convention
        self._dirty: set[str] = set()
        if sp is not None:                         # sp as saved by a trampoline's frame
            self._cache[arch.sp] = sp

    def _name(self, name: str) -> str:
        return self._arch.aliases.get(name, name)

    def __getitem__(self, name: str) -> int:
        name = self._name(name)
        v = self._cache.get(name)
        if v is None:               # a zero register is never cached: only misses ask
            if name in regs_facts(self._arch).zero_regs:
                return 0
            v = self._cache[name] = self._m.regs.read(self._arch.regs[name])
        return v

    def __setitem__(self, name: str, value: int) -> None:
        name = self._name(name)
        if name in regs_facts(self._arch).zero_regs:
            return
        if name not in self._arch.regs:
            raise KeyError(name)
        self._cache[name] = value & 0xFFFFFFFFFFFFFFFF
        self._dirty.add(name)

    def get(self, name: str, default: int | None = None) -> int | None:
        try:
            return self[name]
        except KeyError:
            return default

    # arch-neutral accessors
    @property
    def ip(self) -> int:
        return self[self._arch.pc]

    @ip.setter
    def ip(self, value: int) -> None:
        self[self._arch.pc] = value

    @property
    def sp(self) -> int:
        return self[self._arch.sp]

    @sp.setter
    def sp(self, value: int) -> None:
        self[self._arch.sp] = value

    @property
    def return_value(self) -> int:
        return self[self._arch.ret]

    @return_value.setter
    def return_value(self, value: int) -> None:
        self[self._arch.ret] = value

    @property
    def flags(self) -> int:
        return self[self._arch.flags_reg]

    @flags.setter
    def flags(self, value: int) -> None:
        self[self._arch.flags_reg] = value

    def arg(self, n: int) -> int:
        """Argument n (1-based, as $argN): registers, then the stack (x86: after the
        return address)."""
        regs = self._arch.args
        if n <= len(regs):
            return self[regs[n - 1]]
        if not regs_facts(self._arch).stack_args:     # arm64: 0 beyond x7 (kernel)
            return 0
        try:                                 # stack[0] = return addr
            return get_user(self._m.memory, self.sp + 8 * (n - len(regs)))
        except UserFault:                    # regs_get_kernel_stack_nth: 0 off the stack
            return 0

    @property
    def machine(self) -> "Machine":
        return self._m

    def ip_changed(self) -> bool:
        return self._arch.pc in self._dirty

    def present(self, name: str, value: int) -> None:
        """Show handlers `value` for a register without writing it to the CPU (the
        kernel's view of pt_regs: ip after a breakpoint, sp of a trampoline's frame)."""
        name = self._name(name)
        self._cache[name] = value
        self._dirty.discard(name)

    def forget(self, name: str) -> None:
        """Drop a handler's pending change of a register (those a path ignores)."""
        self._dirty.discard(self._name(name))

    def flush(self) -> None:
        """Write changed registers back to the CPU."""
        write, ids = self._m.regs.write, self._arch.regs
        for name in self._dirty:
            write(ids[name], self._cache[name])
        self._dirty.clear()

    def reset(self, ip: int) -> "PtRegs":
        """Reuse this view for a new hit (hot paths keep one per probe, as the kernel's
        pt_regs frame lives only for the call): forget everything, present `ip`."""
        self._cache = {self._arch.pc: ip}
        self._dirty.clear()
        return self

    def reset_at_site(self, shown: dict[str, int], hit_sp: int) -> dict[str, int]:
        """Reuse this view for a hit at an ftrace site: the registers ftrace_regs presents
        there (`shown`, sp as an offset from the hit's) with the hit's sp added. Returns
        the new cache (the hot path's handle on it)."""
        cache = dict(shown)
        sp = self._arch.sp
        if sp in cache:
            cache[sp] += hit_sp
        self._cache = cache
        self._dirty.clear()
        return cache

    def refresh(self) -> None:
        """Forget cached values (after something else wrote the CPU's registers)."""
        self.flush()
        self._cache.clear()

    def shown(self) -> dict[str, int]:
        """What the view holds by canonical name (read, presented or changed), i.e. what a
        copy of the CPU's registers must take over (a pt_regs image for BPF). Read-only."""
        return self._cache

    def snapshot(self, names: tuple[str, ...] | None = None) -> dict[str, int]:
        return {n: self[n] for n in (names or tuple(self._arch.regs))}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:#x}" for k, v in sorted(self._cache.items()))
        return f"PtRegs({shown})"


Slots = Iterable[tuple[int, str]]          # (offset in struct pt_regs, register name)


def pack_pt_regs_image(regs: "PtRegs", slots: Slots, template: bytes,
                       narrow: dict[str, int]) -> bytearray:
    """A `struct pt_regs` image: `template` with each (offset, register) slot filled from
    the view, narrow registers masked to the bytes the CPU defines. The arch's ptrace
    module gives the layout."""
    image = bytearray(template)
    for off, name in slots:
        struct.pack_into("<Q", image, off, regs[name] & narrow.get(name, 0xFFFFFFFFFFFFFFFF))
    return image


def unpack_pt_regs_image(regs: "PtRegs", image: bytes | bytearray, slots: Slots) -> None:
    """Write the registers whose value in `image` differs from the view back to it."""
    for off, name in slots:
        value = struct.unpack_from("<Q", image, off)[0]
        if regs[name] != value:
            regs[name] = value
