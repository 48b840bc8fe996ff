"""A libbpf-like API over a machine (tools/lib/bpf/libbpf.c: bpf_object__open/load,
bpf_program__attach, ring_buffer__new, bpf_map dumps).

    obj = BpfObject.open("count.bpf.o")
    obj.load(machine)                    # verifies for the machine's pt_regs size
    links = obj.attach_all(machine)      # each program by its SEC name
    obj.ring_buffer(machine, "events", on_record)
    machine.run()
    obj.maps["counts"].items(); obj.dump_maps()
    for link in links: link.destroy()

Attaching does what perf_event_open on the kprobe PMU does: it creates a local kprobe
event (create_local_trace_kprobe) through the probe core, no tracefs involved, and sets
the program on it (PERF_EVENT_IOC_SET_BPF). Sections: `kprobe/SYM[+OFF]`,
`kretprobe/SYM`, `ksyscall/NAME` and `kretsyscall/NAME` (the arch's syscall wrapper
`__x64_sys_NAME` / `__arm64_sys_NAME`, else the guest's `sys_NAME`).

This is the user-space side, so unlike the rest of probes/bpf it knows the probe core.
Errors are LibbpfError (a UsageError: one line and exit 2 in the CLI) with libbpf's errno.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from emu.errors import UsageError
from probes.bpf.errors import BpfError
from probes.bpf.loader import BpfObject as LoadedObject, load_object
from probes.bpf.maps import BpfMap, BpfMapType, PerfEventArrayMap, RingbufMap, StackTraceMap
from probes.bpf.program import BpfProg
from probes.errors import KprobeError
from probes.kprobes import Kprobe, kprobes_of
from probes.location import LocationError, parse_probe_location
from probes.trace.bpf_trace import (
    BpfProgArray, EventKind, PerfEvent, PerfType, arch_ptrace, bpf_trace_of,
    perf_event_attach_bpf_prog, perf_event_detach_bpf_prog, symbolize_stack, trace_call_bpf,
)
from probes.trace.error_inject import error_injection_list

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.kretprobes import Kretprobe, KretprobeInstance
    from probes.regs import PtRegs


class LibbpfError(UsageError):
    """Opening, loading or attaching failed: `errno` as libbpf would return it."""

    def __init__(self, err: int, reason: str) -> None:
        self.errno = err
        super().__init__(f"libbpf: {reason}: -{errno.errorcode.get(err, err)}")


# --- the local kprobe event a kprobe-PMU perf event creates --------------------------------

@dataclass(eq=False)
class KprobePerfEvent:
    """A trace_kprobe made by perf_event_open (not in tracefs): its probe's dispatcher is
    kprobe_perf_func / kretprobe_perf_func. `prog_array` is what trace_call_bpf runs."""
    machine: "Machine"
    symbol: str
    offset: int = 0
    is_return: bool = False
    prog_array: BpfProgArray | None = None
    nhit: int = 0
    kp: Kprobe | None = None
    rp: "Kretprobe | None" = None

    func_ip: int = 0            # bpf_get_func_ip: the probed function's entry
    at_entry: bool = False      # a kprobe on a function's first instruction

    def __post_init__(self) -> None:
        if self.kp is not None or self.rp is not None:
            self._resolve()

    def _resolve(self) -> None:
        """After registration (the addresses are known; a hit must not look them up)."""
        self.func_ip = (self.rp.kp if self.rp is not None else self.kp).addr  # type: ignore
        sym = self.machine.symbols.find(self.func_ip)
        self.at_entry = not self.is_return and sym is not None and sym.addr == self.func_ip

    def register(self) -> None:
        if self.is_return:
            from probes.kretprobes import Kretprobe, kretprobes_of
            self.rp = Kretprobe(kp=Kprobe(symbol_name=self.symbol),
                                handler=self.kretprobe_perf_func)
            kretprobes_of(self.machine).register_kretprobe(self.rp)
        else:
            self.kp = Kprobe(symbol_name=self.symbol, offset=self.offset,
                             pre_handler=self.kprobe_perf_func)
            kprobes_of(self.machine).register_kprobe(self.kp)
        self._resolve()

    def unregister(self) -> None:
        if self.rp is not None:
            from probes.kretprobes import kretprobes_of
            kretprobes_of(self.machine).unregister_kretprobe(self.rp)
        elif self.kp is not None:
            kprobes_of(self.machine).unregister_kprobe(self.kp)

    def kprobe_perf_func(self, p: Kprobe, regs: "PtRegs") -> int:
        """A changed ip (bpf_override_return) skips the single-step: return 1."""
        self.nhit += 1
        if not self.prog_array:
            return 0
        orig_ip = regs.ip
        trace_call_bpf(self, regs)
        return 1 if regs.ip != orig_ip else 0

    def kretprobe_perf_func(self, ri: "KretprobeInstance", regs: "PtRegs") -> int:
        """On return, ip (and the sp an override pops) are not honoured."""
        self.nhit += 1
        if self.prog_array:
            trace_call_bpf(self, regs)
            arch = self.machine.arch
            regs.forget(arch.pc)
            regs.forget(arch.sp)
        return 0


@dataclass(eq=False)
class BpfLink:
    """struct bpf_link of a perf-event attachment; `destroy` detaches and removes the probe."""
    prog: BpfProg
    event: PerfEvent
    call: KprobePerfEvent

    def destroy(self) -> None:
        perf_event_detach_bpf_prog(self.event)
        self.call.unregister()


# --- the object ----------------------------------------------------------------------------

def _ksyscall_symbol(machine: "Machine", name: str) -> str:
    wrapper = arch_ptrace(machine).SYSCALL_PREFIX + name
    for cand in (wrapper, f"sys_{name}"):
        if machine.symbols.lookup(cand) is not None:
            return cand
    return wrapper


def _split_offset(point: str) -> tuple[str, int]:
    try:
        loc = parse_probe_location(point)
    except LocationError:
        raise LibbpfError(errno.EINVAL, f"bad kprobe target {point!r}") from None
    return loc.symbol or point, loc.offset


@dataclass(eq=False)
class BpfObject:
    """struct bpf_object: `programs` and `maps` by name, `links` made by attach."""
    obj: LoadedObject
    links: list[BpfLink] = field(default_factory=list)
    machine: "Machine | None" = None

    @classmethod
    def open(cls, path: str | Path, nr_cpus: int = 1) -> "BpfObject":
        """bpf_object__open: parse and relocate, verify nothing yet (per-CPU maps get a
        value for each of `nr_cpus` CPUs: the machine's)."""
        try:
            return cls(load_object(path, verify=False, nr_cpus=nr_cpus))
        except BpfError as e:
            raise LibbpfError(e.errno, str(e)) from None

    @property
    def programs(self) -> dict[str, BpfProg]:
        return self.obj.programs

    @property
    def maps(self) -> dict[str, BpfMap]:
        return self.obj.maps

    def load(self, machine: "Machine") -> "BpfObject":
        """bpf_object__load for the machine's arch: a kprobe program's context is that
        arch's pt_regs, so the verifier bounds context reads by its size."""
        size = arch_ptrace(machine).PT_REGS_SIZE
        self.machine = machine
        for prog in self.programs.values():
            if prog.attach_kind in ("kprobe", "kretprobe", "ksyscall", "kretsyscall"):
                prog.ctx_size = size
            try:
                prog.load()
            except BpfError as e:
                raise LibbpfError(e.errno, f"{self.obj.path}: program {prog.name}: {e}") from None
        return self

    def program(self, name: str) -> BpfProg:
        prog = self.programs.get(name)
        if prog is None:
            raise LibbpfError(errno.ENOENT, f"{self.obj.path}: no program {name!r} "
                              f"(has {', '.join(sorted(self.programs))})")
        return prog

    def attach(self, machine: "Machine", name: str, cookie: int = 0) -> BpfLink:
        """bpf_program__attach: by the program's SEC name."""
        prog = self.program(name)
        kind, point = prog.attach_kind, prog.attach_point
        if kind in ("raw_tp", "tracepoint"):      # guest tracepoints (probes/tracepoint.py)
            from probes.trace.bpf_tracepoint import attach_tracepoint_link
            link = attach_tracepoint_link(machine, prog, kind, point, cookie)
            self.links.append(link)
            return link
        if kind in ("ksyscall", "kretsyscall"):
            sym, off = _ksyscall_symbol(machine, point), 0
        elif kind in ("kprobe", "kretprobe"):
            sym, off = _split_offset(point)
        else:
            raise LibbpfError(errno.EOPNOTSUPP, f"program {name}: section {prog.section!r} "
                              "cannot be attached to a probe")
        if not sym:
            raise LibbpfError(errno.EINVAL, f"program {name}: section {prog.section!r} names "
                              "no function")
        return self.attach_kprobe(machine, name, sym, off, kind.startswith("kret"), cookie)

    def attach_kprobe(self, machine: "Machine", name: str, symbol: str, offset: int = 0,
                      retprobe: bool = False, cookie: int = 0) -> BpfLink:
        """bpf_program__attach_kprobe: a kprobe-PMU event on symbol+offset, then SET_BPF."""
        prog = self.program(name)
        call = KprobePerfEvent(machine, symbol, offset, retprobe)
        try:
            call.register()
        except KprobeError as e:
            raise LibbpfError(e.errno,
                              f"program {name}: {symbol}+{offset:#x}: {e.reason}") from None
        eil = error_injection_list(machine)
        event = PerfEvent(call, PerfType.PERF_TYPE_KPROBE, EventKind.KPROBE,
                          func_entry=offset == 0,
                          error_injectable=eil.within_error_injection_list(call.func_ip))
        err = perf_event_attach_bpf_prog(event, prog, cookie)
        if err:
            call.unregister()
            raise LibbpfError(-err, f"program {name}: attach to {symbol}+{offset:#x}")
        link = BpfLink(prog, event, call)
        self.links.append(link)
        return link

    def attach_all(self, machine: "Machine", only: str | None = None) -> list[BpfLink]:
        """Attach every program (or just `only`) by its SEC name."""
        names = [only] if only else sorted(self.programs)
        return [self.attach(machine, n) for n in names]

    def detach_all(self) -> None:
        while self.links:
            self.links.pop().destroy()

    # -- user-space consumers --
    def ring_buffer(self, machine: "Machine", map_name: str,
                    callback: Callable[[bytes], None]) -> None:
        m = self.maps.get(map_name)
        if not isinstance(m, RingbufMap):
            raise LibbpfError(errno.EINVAL, f"map {map_name!r} is not a ring buffer")
        bpf_trace_of(machine).ring_buffer(m, callback)

    def perf_buffer(self, machine: "Machine", map_name: str,
                    callback: Callable[[int, bytes], None]) -> None:
        m = self.maps.get(map_name)
        if not isinstance(m, PerfEventArrayMap):
            raise LibbpfError(errno.EINVAL, f"map {map_name!r} is not a perf event array")
        bpf_trace_of(machine).perf_buffer(m, callback)

    # -- maps --
    def dump_maps(self) -> list[dict[str, Any]]:
        """Every map: name, type and its elements in `bpftool map dump -j` layout."""
        return [{"name": name, "type": m.map_type.name.removeprefix("BPF_MAP_TYPE_").lower(),
                 "elements": map_dump(m, self.machine)}
                for name, m in sorted(self.maps.items())]


def _hexes(data: bytes) -> list[str]:
    return [f"0x{b:02x}" for b in data]


_NO_ELEMENTS = (BpfMapType.BPF_MAP_TYPE_RINGBUF, BpfMapType.BPF_MAP_TYPE_PERF_EVENT_ARRAY,
                BpfMapType.BPF_MAP_TYPE_PROG_ARRAY)


def map_dump(m: BpfMap, machine: "Machine | None" = None) -> list[dict[str, Any]]:
    """bpftool map dump -j: {"key": [...], "value": [...]} per element as "0x%02x" bytes;
    per-CPU maps list {"cpu", "value"} under "values"; a stack map's element also
    carries its symbolized frames (as bpftrace prints kstack)."""
    if m.map_type in _NO_ELEMENTS:
        return []
    out = []
    for key, value in m.items():
        elem: dict[str, Any] = {"key": _hexes(key)}
        if isinstance(value, list):
            elem["values"] = [{"cpu": cpu, "value": _hexes(v)} for cpu, v in enumerate(value)]
        else:
            elem["value"] = _hexes(value)
        if isinstance(m, StackTraceMap) and machine is not None:
            ips = [int.from_bytes(value[i:i + 8], "little") for i in range(0, len(value), 8)]
            elem["frames"] = symbolize_stack(machine, [ip for ip in ips if ip])
        out.append(elem)
    return out
