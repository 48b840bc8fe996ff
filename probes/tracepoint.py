"""Static tracepoints (kernel/tracepoint.c, include/linux/tracepoint-defs.h).

A guest built with firmware/include/kemu_tracepoint.h carries, per tracepoint, a
`struct kemu_tracepoint` in `__tracepoints` (listed by s32 self-relative pointers in
`__tracepoints_ptrs`): name, static key, iterator, argument count, and the stringified
TP_PROTO / TP_printk. Its sites are static branches on the key (probes/jump_label.py);
the key is enabled while any probe function is registered. A taken branch calls
`__traceiter_NAME(args…)`, whose trap (BRK / int3, owned here by address) runs the
registered functions in priority order with the arguments as C values, then returns."""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from emu.clock import HANDLER, TRAP
from emu.machine import Machine
from emu.uaccess import UserFault, get_user, strncpy_from_user
from probes.arch import arch_probes_of
from probes.errors import KprobeError
from probes.jump_label import JumpLabels, StaticKey, image_section, jump_labels_of

TRACEPOINT_DEFAULT_PRIO = 10
TRACEPOINTS_PTRS = "__tracepoints_ptrs"
MAX_TP_ARGS = 6                      # the register-passed arguments of both ABIs
# struct kemu_tracepoint: name, key{enabled, pad, type}, iterator, num_args, proto, print,
# system (TRACE_SYSTEM)
_TP_NAME, _TP_KEY, _TP_ITER, _TP_NARGS, _TP_PROTO, _TP_PRINT, _TP_SYSTEM = 0, 8, 24, 32, 40, 48, 56

TracepointProbe = Callable[[Any, tuple[int, ...]], None]    # func(data, args)


class TracepointError(KprobeError):
    """tracepoint_probe_register and friends: the kernel's errno and a reason."""


@dataclass(frozen=True)
class TpArg:
    """One TP_PROTO parameter: its C type decides size and sign."""
    name: str
    ctype: str
    size: int
    signed: bool

    def value(self, raw: int) -> int:
        v = raw & ((1 << (8 * self.size)) - 1)
        if self.signed and v >> (8 * self.size - 1):
            v -= 1 << (8 * self.size)
        return v


_SIZES = {"char": 1, "short": 2, "int": 4, "long": 8, "u8": 1, "s8": 1, "u16": 2, "s16": 2,
          "u32": 4, "s32": 4, "u64": 8, "s64": 8, "size_t": 8, "ssize_t": 8, "bool": 1}


def parse_proto(proto: str) -> list[TpArg]:
    """`PARAMS(int a, unsigned long b)` (the stringified TP_PROTO) -> its arguments."""
    body = _unwrap(proto)
    out = []
    for part in filter(None, (p.strip() for p in body.split(","))):
        m = re.fullmatch(r"(.*?[\s*])(\w+)", part)
        if m is None:
            raise TracepointError(errno.EINVAL, f"cannot parse tracepoint argument '{part}'")
        ctype, name = " ".join(m.group(1).split()), m.group(2)
        words = ctype.replace("*", " * ").split()
        if "*" in words:
            out.append(TpArg(name, ctype, 8, False))
            continue
        base = [w for w in words if w not in ("const", "volatile", "signed", "unsigned")]
        size = _SIZES.get(base[-1] if base else "int", 8)
        unsigned = "unsigned" in words or (base and base[-1][0] == "u") or base == ["bool"]
        out.append(TpArg(name, ctype, size, not unsigned))
    return out


def _unwrap(text: str) -> str:
    """`WRAP(inner)` -> inner (PARAMS, TP_PROTO, TP_printk); anything else unchanged."""
    m = re.fullmatch(r"\s*\w+\s*\((.*)\)\s*", text, re.S)
    return m.group(1) if m else text


def parse_printk(text: str) -> tuple[str, list[str]]:
    """`TP_printk("a=%d", a)` -> ('a=%d', ['a'])."""
    m = re.fullmatch(r'\s*"((?:[^"\\]|\\.)*)"\s*(?:,(.*))?', _unwrap(text), re.S)
    if m is None:
        return "", []
    args = [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
    return m.group(1), args


@dataclass(frozen=True)
class TracepointFunc:
    func: TracepointProbe
    data: Any
    prio: int


@dataclass(eq=False)
class Tracepoint:
    """struct tracepoint."""
    name: str
    addr: int
    key: StaticKey
    iterator: int
    args: list[TpArg]
    system: str = "kemu"           # TRACE_SYSTEM
    fmt: str = ""
    fmt_args: list[str] = field(default_factory=list)
    regfunc: Callable[[], int] | None = None
    unregfunc: Callable[[], None] | None = None
    funcs: list[TracepointFunc] = field(default_factory=list)
    module: Any = None
    hits: int = 0

    @property
    def num_args(self) -> int:
        return len(self.args)


class Tracepoints:
    """The tracepoints of one machine: the image's and every module's."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.labels: JumpLabels = jump_labels_of(machine)
        self.trap_size = len(arch_probes_of(machine).kprobes.breakpoint)
        self.tps: list[Tracepoint] = []
        self._by_iterator: dict[int, Tracepoint] = {}
        # the hit path reads registers by id (a name lookup per read costs as much again)
        arch = machine.arch
        self._arg_ids = [arch.reg_id(n) for n in arch.args[:MAX_TP_ARGS]]
        self._pc_id = arch.reg_id(arch.pc)
        # --bpf-engine jit: (tp, func, data, args, ret) -> a guest stub running the
        # function's BPF programs, which traps back to bpf_stub_done, or (the last function:
        # `ret`, the iterator's return) goes there itself (probes/bpf/jit_direct.py)
        self.bpf_stub: Callable[[Tracepoint, Any, Any, tuple[int, ...], int | None],
                                int | None] | None = None
        self._in_stub: dict[int, tuple[Tracepoint, list[TracepointFunc], int, tuple[int, ...], int]] = {}
        if machine.image is not None:
            self.add_image(machine.image)

    def add_image(self, image: Any, module: Any = None) -> list[Tracepoint]:
        sec = image_section(self.m, image, TRACEPOINTS_PTRS)
        if sec is None:
            return []
        base, data = sec
        found = []
        for i in range(len(data) // 4):
            rel = int.from_bytes(data[4 * i:4 * i + 4], "little", signed=True)
            found.append(self._read_tracepoint(base + 4 * i + rel, module))
        for tp in found:
            self._by_iterator[tp.iterator] = tp
            self.m.register_break_addr(tp.iterator, self._iterator_trap)
        self.tps = found + self.tps if module is not None else self.tps + found
        return found

    def remove_module(self, module: Any) -> list[Tracepoint]:
        """The module's tracepoints go (their funcs are dropped, keys released)."""
        gone = [tp for tp in self.tps if tp.module is module]
        for tp in gone:
            if tp.funcs:
                tp.funcs.clear()
                self.labels.static_key_disable(tp.key)
            self.m.unregister_break_addr(tp.iterator)
            self._by_iterator.pop(tp.iterator, None)
            self.tps.remove(tp)
        return gone

    def _read_tracepoint(self, addr: int, module: Any) -> Tracepoint:
        mem = self.m.memory
        try:
            name = strncpy_from_user(mem, get_user(mem, addr + _TP_NAME), 256).decode()
            nargs = get_user(mem, addr + _TP_NARGS)
            args = parse_proto(strncpy_from_user(mem, get_user(mem, addr + _TP_PROTO)).decode())
            printk = strncpy_from_user(mem, get_user(mem, addr + _TP_PRINT)).decode()
            iterator = get_user(mem, addr + _TP_ITER)
            system = strncpy_from_user(mem, get_user(mem, addr + _TP_SYSTEM), 256).decode()
        except (UserFault, UnicodeDecodeError) as e:
            raise TracepointError(errno.EFAULT,
                                  f"unreadable tracepoint at {addr:#x}: {e}") from None
        if nargs != len(args) or nargs > MAX_TP_ARGS:
            raise TracepointError(errno.EINVAL, f"tracepoint {name}: {nargs} arguments "
                                                f"(at most {MAX_TP_ARGS}, as TP_PROTO lists)")
        key = self.labels.keys.get(addr + _TP_KEY) or StaticKey(addr + _TP_KEY, False)
        self.labels.keys.setdefault(key.addr, key)
        fmt, fmt_args = parse_printk(printk)
        return Tracepoint(name, addr, key, iterator, args, system, fmt, fmt_args, module=module)

    def lookup(self, name: str) -> Tracepoint | None:
        """for_each_kernel_tracepoint by name: the image first, then modules."""
        return next((tp for tp in self.tps if tp.name == name and tp.module is None),
                    next((tp for tp in self.tps if tp.name == name), None))

    # --- registration (tracepoint_add_func / tracepoint_remove_func) --------------------------
    def tracepoint_probe_register_prio(self, tp: Tracepoint, func: TracepointProbe, data: Any,
                                       prio: int, may_exist: bool = False) -> int:
        """0, or -EEXIST when (func, data) is registered already (may_exist: 0 then too)."""
        if any(f.func == func and f.data is data for f in tp.funcs):
            return 0 if may_exist else -errno.EEXIST
        if not tp.funcs and tp.regfunc is not None:
            ret = tp.regfunc()
            if ret < 0:
                return ret
        new = TracepointFunc(func, data, prio)
        at = next((i for i, f in enumerate(tp.funcs) if f.prio < prio), len(tp.funcs))
        tp.funcs.insert(at, new)
        if len(tp.funcs) == 1:
            self.labels.static_key_enable(tp.key)
        return 0

    def tracepoint_probe_register(self, tp: Tracepoint, func: TracepointProbe,
                                  data: Any = None) -> int:
        return self.tracepoint_probe_register_prio(tp, func, data, TRACEPOINT_DEFAULT_PRIO)

    def tracepoint_probe_unregister(self, tp: Tracepoint, func: TracepointProbe,
                                    data: Any = None) -> int:
        if not tp.funcs:
            return -errno.ENOENT
        tp.funcs = [f for f in tp.funcs if not (f.func == func and f.data is data)]
        if not tp.funcs:
            self.labels.static_key_disable(tp.key)
            if tp.unregfunc is not None:
                tp.unregfunc()
        return 0

    # --- the call ----------------------------------------------------------------------------
    def _iterator_trap(self, addr: int) -> bool:
        tp = self._by_iterator.get(addr)
        if tp is None:
            return False
        m = self.m
        clock, read = m.clock, m.regs.read
        clock.charge(TRAP)
        args = tuple([a.value(read(r)) for a, r in zip(tp.args, self._arg_ids)])
        tp.hits += 1
        self._call_funcs(tp, tp.funcs[:], 0, args, addr)   # the array as the call began
        return True

    def _call_funcs(self, tp: Tracepoint, funcs: list[TracepointFunc], i: int,
                    args: tuple[int, ...], addr: int) -> None:
        """Call funcs[i:], then return from the iterator; a function whose programs run
        from a guest stub sends the guest there, and the stub's trap goes on here."""
        clock, stub, ret = self.m.clock, self.bpf_stub, addr + self.trap_size
        for k in range(i, len(funcs)):
            f = funcs[k]
            clock.charge(HANDLER)
            last = k == len(funcs) - 1
            to = stub(tp, f.func, f.data, args, ret if last else None) if stub is not None else None
            if to is not None:
                if not last:
                    self._in_stub[self.m.cpu] = (tp, funcs, k + 1, args, addr)
                self.m.regs.write(self._pc_id, to)
                return
            f.func(f.data, args)
        self.m.regs.write(self._pc_id, ret)     # the iterator's `ret` follows the trap

    def bpf_stub_done(self) -> bool:
        """The trap at the end of a tracepoint function's BPF stub: the next function."""
        state = self._in_stub.pop(self.m.cpu, None)
        if state is None:
            return False
        self._call_funcs(*state)
        return True


def tracepoints_of(machine: Machine) -> Tracepoints:
    tps: Tracepoints = machine.layer("tracepoints", Tracepoints)
    return tps


# --- snapshots (emu/snapshot.py): the registered funcs and hit counts, with the keys
# (probes/jump_label.py) and the iterator traps (the machine's registries) -----------------
TracepointsState = tuple[list[Tracepoint], dict[int, Tracepoint],
                         dict[int, tuple[list[TracepointFunc], int]], Any]


def _take_tracepoints(tps: Tracepoints) -> TracepointsState:
    return (list(tps.tps), dict(tps._by_iterator),
            {id(tp): (list(tp.funcs), tp.hits) for tp in tps.tps}, tps.bpf_stub)


def _restore_tracepoints(_m: Machine, tps: Tracepoints, state: TracepointsState) -> None:
    """The stub giver too: a BPF layer made since is gone with its stubs (a later JIT
    engine wires its own), and no CPU is inside a stub between runs."""
    found, by_iterator, funcs, tps.bpf_stub = state
    tps.tps, tps._by_iterator = list(found), dict(by_iterator)
    tps._in_stub.clear()
    for tp in found:
        kept, tp.hits = funcs[id(tp)]
        tp.funcs = list(kept)


def _register_snapshot_layer() -> None:
    from emu.snapshot import LayerHooks, register_snapshot_layer
    register_snapshot_layer("tracepoints", LayerHooks(_take_tracepoints, _restore_tracepoints))


_register_snapshot_layer()


def tracepoints_from_image(machine: Machine, image: Any, module: Any = None) -> list[Tracepoint]:
    """MODULE_STATE_COMING for tracepoints: a loaded image's jump-label sites join the
    machine's, its tracepoints become findable (after the core image's), its
    `__bpf_raw_tp_map` entries join the raw tracepoint lookup and, where a Tracefs exists,
    its events appear. `module` is duck-typed (`.name`, `.image`); `image` needs
    `.sections` / `.section_ranges` as emu.elf.ElfImage has them, already in memory."""
    jump_labels_of(machine).add_image(image, module)
    found = tracepoints_of(machine).add_image(image, module)
    if module is not None:
        from probes.trace.bpf_tracepoint import bpf_raw_tracepoints_of
        bpf_raw_tracepoints_of(machine).add_module(module, image)
    events = _tracepoint_events(machine)
    if events is not None:
        events.add_all()
    return found


def tracepoints_release_module(machine: Machine, module: Any) -> list[Tracepoint]:
    """MODULE_STATE_GOING: the module's events, raw tracepoints, probes and sites go."""
    tps = tracepoints_of(machine)
    events = _tracepoint_events(machine)
    gone = [tp for tp in tps.tps if tp.module is module]
    if events is not None:
        for tp in gone:
            events.remove(tp)
    from probes.trace.bpf_tracepoint import bpf_raw_tracepoints_of
    bpf_raw_tracepoints_of(machine).remove_module(module)
    tps.remove_module(module)
    jump_labels_of(machine).remove_module(module)
    return gone


def _tracepoint_events(machine: Machine) -> Any:
    """The Tracefs's tracepoint events if both exist (never made here)."""
    fs = machine.layers.get("tracefs")
    return getattr(fs, "_tracepoint_events", None) if fs is not None else None
