"""Testing probe patching: a `ProbeLab` loads a guest (an ELF, or functions assembled with
keystone), places probes that record what they saw, runs, and exposes the bytes before and
after arming, the slot, the decode verdict. The assertion helpers fail with disassembly side
by side. The pytest plugin (probes/pytest_plugin.py) hands these out as fixtures."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

from emu.arch import get_arch
from emu.loader import Guest, GuestConfig, load_guest
from emu.machine import Machine, RunResult
from emu.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from probes.arch import arch_ptrace
from probes.insn_slots import place_near
from probes.inspect import Inspection, inspect_kprobe, listing, side_by_side
from probes.kprobes import FaultHandler, Kprobe, Kprobes, PostHandler, PreHandler, kprobes_of
from probes.location import parse_probe_location
from probes.kretprobes import Kretprobe, KretprobeInstance, kretprobes_of
from probes.regs import PtRegs

RetHandler = Callable[[KretprobeInstance, PtRegs], int]

ASM_BASE = 0x40_0000
ASM_DATA = 0x60_0000
ASM_STACK_TOP = 0x80_0000


@dataclass
class Hit:
    """One handler call: which handler ("pre", "post", "fault"; "entry", "return" for a
    kretprobe), the ip it saw and the registers asked for. A return also carries the
    return value and the address the function returned to."""
    handler: str
    ip: int
    regs: dict[str, int] = field(default_factory=dict)
    retval: int | None = None
    ret_addr: int | None = None


@dataclass(eq=False)
class LabKprobe(Kprobe):
    """A Kprobe the lab placed: `events` records every handler call, `where` names it."""
    events: list[Hit] = field(default_factory=list)
    where: str = ""


@dataclass(eq=False)
class LabKretprobe(Kretprobe):
    """A Kretprobe the lab placed: `events` records entries and returns."""
    events: list[Hit] = field(default_factory=list)


def _lookup(m: Machine, name: str) -> int:
    sym = m.symbols.lookup(name)
    if sym is None:
        raise KeyError(f"no symbol {name!r}")
    return sym.addr


class ProbeLab:
    def __init__(self, machine: Machine, stdout: io.BytesIO | None = None,
                 stderr: io.BytesIO | None = None) -> None:
        self.machine = machine
        self._stdout, self._stderr = stdout, stderr
        self.halt_addr: int | None = None
        self.result: RunResult | None = None

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, *, argv: list[str] | tuple[str, ...] = (), bare: bool = False,
             arch: str = "auto",
             stdin: bytes = b"", fs: str | None = None) -> "ProbeLab":
        out, err = io.BytesIO(), io.BytesIO()
        guest: Guest = load_guest(GuestConfig(path=str(path), arch=arch, bare=bare, argv=list(argv),
                                              fs_root=fs), io.BytesIO(stdin), out, err)
        return cls(guest.machine, out, err)

    @classmethod
    def from_asm(cls, arch: str, functions: dict[str, str], data: bytes = b"") -> "ProbeLab":
        """Assemble each function (keystone syntax) one after another at ASM_BASE and name
        it; `data` is mapped read-write at ASM_DATA. Calls return into a halt stub."""
        import keystone
        a = get_arch(arch)
        ks = keystone.Ks(a.ks_arch, a.ks_mode)
        m = Machine(a, stdout=io.BytesIO(), stderr=io.BytesIO())
        m.memory.map(ASM_BASE, 0x10000, PROT_READ | PROT_EXEC, "asm:text")
        m.memory.map(ASM_DATA, 0x10000, PROT_READ | PROT_WRITE, "asm:data")
        m.memory.map(ASM_STACK_TOP - 0x10000, 0x10000, PROT_READ | PROT_WRITE, "[stack]")
        addr = ASM_BASE
        for name, source in [*functions.items(), ("__lab_halt", None)]:
            code = a.halt_insn if source is None else bytes(ks.asm(source, addr)[0] or b"")
            m.memory.write(addr, code)
            m.symbols.add(name, addr, len(code), "func")
            addr = (addr + len(code) + 15) & ~15
        if data:
            m.memory.write(ASM_DATA, data)
        m.symbols.add("__lab_data", ASM_DATA, max(len(data), 1), "object")
        lab = cls(m)
        m.halt_allowed = True                # calls end on the lab's own halt stub
        lab.halt_addr = _lookup(m, "__lab_halt")
        m.sp = ASM_STACK_TOP - 0x100
        return lab

    # --- probes -----------------------------------------------------------------------------
    @property
    def kprobes(self) -> Kprobes:
        return kprobes_of(self.machine)

    def kprobe(self, where: str | int, *, pre: PreHandler | None = None,
               post: PostHandler | None = None, fault: FaultHandler | None = None,
               record: tuple[str, ...] = (), register: bool = True,
               post_events: bool = True) -> LabKprobe:
        """A kprobe at SYM, SYM+OFF or an address that records each handler call in
        `p.events` (with the registers named in `record`), then calls pre/post/fault.
        `post_events=False` (and no `post`) installs no post handler, so the probe may be
        boosted or jump-optimized like a pre-only kernel probe."""
        p = LabKprobe.at(where)

        def pre_handler(kp: Kprobe, regs: PtRegs) -> int | None:
            p.events.append(Hit("pre", regs.ip, {r: regs[r] for r in record}))
            return pre(kp, regs) if pre else 0

        def post_handler(kp: Kprobe, regs: PtRegs, flags: int) -> None:
            p.events.append(Hit("post", regs.ip, {r: regs[r] for r in record}))
            if post:
                post(kp, regs, flags)

        def fault_handler(kp: Kprobe, regs: PtRegs, trapnr: int) -> int | None:
            p.events.append(Hit("fault", regs.ip))
            return fault(kp, regs, trapnr) if fault else 0

        p.pre_handler, p.fault_handler = pre_handler, fault_handler
        p.post_handler = post_handler if (post is not None or post_events) else None
        if register:
            self.kprobes.register_kprobe(p)
            if p.addr is not None:                          # (an IFUNC may be pending)
                p.where = describe(self.machine, p.addr)    # for assertion messages
        return p

    def kretprobe(self, where: str | int, *, entry: RetHandler | None = None,
                  handler: RetHandler | None = None, record: tuple[str, ...] = (),
                  maxactive: int = 0, register: bool = True) -> LabKretprobe:
        """A return probe on the function at SYM or an address that records each call in
        `rp.events`: an "entry" Hit (ip = the function, registers named in `record`) and a
        "return" Hit (ip = where it returns, `retval`, `ret_addr`), then calls
        entry/handler. Misses (no free instance) count in `rp.nmissed`."""
        kp = LabKprobe.at(where)
        rp = LabKretprobe(kp=kp, maxactive=maxactive)

        def entry_handler(ri: KretprobeInstance, regs: PtRegs) -> int:
            rp.events.append(Hit("entry", regs.ip, {r: regs[r] for r in record}))
            return entry(ri, regs) if entry else 0

        def return_handler(ri: KretprobeInstance, regs: PtRegs) -> int:
            rp.events.append(Hit("return", regs.ip, {r: regs[r] for r in record},
                                 retval=regs.return_value, ret_addr=ri.ret_addr))
            return handler(ri, regs) if handler else 0

        rp.entry_handler, rp.handler = entry_handler, return_handler
        if register:
            kretprobes_of(self.machine).register_kretprobe(rp)
            if kp.addr is not None:
                kp.where = describe(self.machine, kp.addr)
        return rp

    # --- running ----------------------------------------------------------------------------
    def run(self, max_insns: int = 0, timeout: float = 30.0) -> RunResult:
        self.result = self.machine.run(max_insns=max_insns, timeout=timeout)
        return self.result

    def call(self, func: str | int, *args: int, regs: dict[str, int] | None = None,
             timeout: float = 10.0) -> int:
        """Call a guest function with integer arguments; returns its return value. From
        inside a handler (the machine is running) the call is nested: it runs to the
        return address and every register is restored afterwards."""
        m = self.machine
        saved = m.uc.context_save() if m.running else None
        addr = func if isinstance(func, int) else _lookup(m, func)
        for name, value in zip(m.arch.args, args):
            m.set_reg(name, value)
        for name, value in (regs or {}).items():
            m.set_reg(name, value)
        if self.halt_addr is None:
            self.halt_addr = self._map_halt_stub()
        ret = self.halt_addr
        arch_ptrace(m.arch.name).set_call_return(m, ret)
        # Top level: run into the halt stub (its halt stops the run, hooks on it fire);
        # nested: stop at it without emu_stop, which would also end the outer run.
        result = m.run(begin=addr, timeout=timeout, until=ret if saved is not None else None)
        value = m.return_value
        if saved is not None:
            m.uc.context_restore(saved)
        else:
            self.result = result
        return value

    def _map_halt_stub(self) -> int:
        """A page holding the arch's halt instruction, for calls into a loaded ELF."""
        m = self.machine
        page = place_near(m, m.entry or m.pc, 0x1000)
        m.memory.map(page, 0x1000, PROT_READ | PROT_EXEC, "[lab halt stub]")
        m.memory.write(page, m.arch.halt_insn)
        m.halt_allowed = True                # calls end on this stub's halt
        return page

    @property
    def stdout(self) -> bytes:
        return _captured(self._stdout or self.machine.stdout)

    @property
    def stderr(self) -> bytes:
        return _captured(self._stderr or self.machine.stderr)

    # --- looking at the patch ---------------------------------------------------------------
    def addr_of(self, where: str | int) -> int:
        if isinstance(where, int):
            return where
        loc = parse_probe_location(where)
        if loc.addr is not None:
            return loc.addr
        assert loc.symbol is not None
        sym = self.machine.symbols.lookup(loc.symbol)
        if sym is None:
            raise KeyError(f"no symbol {loc.symbol!r}")
        return sym.addr + loc.offset

    def text(self, where: str | int, size: int) -> bytes:
        """Guest bytes now (what the guest itself would read)."""
        return self.machine.memory.read(self.addr_of(where), size)

    def original(self, where: str | int, size: int) -> bytes:
        return self.machine.original_text(self.addr_of(where), size)

    def slot(self, p: Kprobe) -> bytes:
        return self.machine.memory.read(p.ainsn.slot, len(p.ainsn.slot_code)) if p.ainsn.slot else b""

    def inspect(self, p: Kprobe | str | int) -> Inspection:
        return inspect_kprobe(self.machine, p if isinstance(p, Kprobe) else _kprobe_at(p))

    def disasm(self, where: str | int, size: int, original: bool = False) -> list[str]:
        addr = self.addr_of(where)
        code = self.original(addr, size) if original else self.text(addr, size)
        return listing(self.machine, code, addr)


def _captured(stream: object) -> bytes:
    """What a lab's in-memory stream holds (labs always write guest output to BytesIO)."""
    assert isinstance(stream, io.BytesIO)
    return stream.getvalue()


def _kprobe_at(where: str | int) -> Kprobe:
    return Kprobe.at(where)


# --- assertions with disassembly in the failure message ----------------------------------------
def describe(m: Machine, addr: int) -> str:
    """`sym+0xoff (0xaddr)`, or the bare address outside every symbol: how every assertion
    message names an address."""
    sym = m.symbols.find(addr)
    return f"{sym.name}+{addr - sym.addr:#x} ({addr:#x})" if sym is not None else f"{addr:#x}"


def _labelled(m: Machine, code: bytes, addr: int, count: int) -> list[str]:
    """`listing` with each address that lies in a symbol named `<sym+off>`."""
    out = []
    for line in listing(m, code, addr, count):
        head, sep, rest = line.partition(": ")
        sym = m.symbols.find(int(head, 16)) if sep else None
        out.append(f"{head} <{sym.name}+{int(head, 16) - sym.addr:#x}>: {rest}" if sym else line)
    return out


def _probe_name(p: Kprobe, lab: "ProbeLab | None") -> str:
    if lab is not None and p.addr is not None:
        return describe(lab.machine, p.addr)
    where = getattr(p, "where", "")
    if where:
        return str(where)
    if p.symbol_name and p.addr is not None:
        return f"{p.symbol_name}+{p.offset:#x} ({p.addr:#x})"
    return f"{p.addr:#x}" if p.addr is not None else "(unregistered)"


def _compare(lab: ProbeLab, addr: int, want: bytes, title: str) -> None:
    m = lab.machine
    got = m.memory.read(addr, len(want))
    if got != want:
        raise AssertionError(f"{title} at {describe(m, addr)}: bytes {got.hex(' ')} "
                             f"!= expected {want.hex(' ')}\n"
                             + side_by_side("expected", _labelled(m, want, addr, 2),
                                            "in guest memory", _labelled(m, got, addr, 2)))


def _registered_addr(p: Kprobe) -> int:
    if p.addr is None:
        raise AssertionError(f"probe {_probe_name(p, None)} is not registered")
    return p.addr


def assert_armed(lab: ProbeLab, p: Kprobe) -> None:
    """The arch breakpoint stands at the probe address."""
    _compare(lab, _registered_addr(p), lab.machine.arch.breakpoint, "probe not armed")


def assert_disarmed(lab: ProbeLab, addr: int, original: bytes) -> None:
    """The original bytes are back."""
    _compare(lab, addr, original, "text not restored")


def assert_slot_holds(lab: ProbeLab, p: Kprobe, insn: bytes) -> None:
    """The out-of-line slot starts with `insn` (as copied, fixed for the slot)."""
    where = describe(lab.machine, _registered_addr(p))
    if p.ainsn.slot is None:
        raise AssertionError(f"probe at {where} has no slot (verdict {p.ainsn.kind})")
    _compare(lab, p.ainsn.slot, insn, f"slot of the probe at {where}")


def assert_hits(p: Kprobe | Kretprobe, hits: int, nmissed: int = 0, *, lab: ProbeLab | None = None) -> None:
    """The probe's handlers ran `hits` times and missed `nmissed`; for a kretprobe, its
    entries and the instances it found no room for (rp.nmissed)."""
    missed_of = p.nmissed
    if isinstance(p, Kretprobe):
        p, missed_of = p.kp, p.nmissed
    if (p.hits, missed_of) != (hits, nmissed):
        raise AssertionError(f"probe at {_probe_name(p, lab)} ({p.ainsn.mnemonic if p.ainsn else '?'}): "
                             f"hits={p.hits} nmissed={missed_of}, expected hits={hits} nmissed={nmissed}")


def assert_same_run(probed: ProbeLab, plain: ProbeLab) -> None:
    """A probe must not change what the guest did: exit, stdout, stderr."""
    a, b = probed.result, plain.result
    if a is None or b is None:
        raise AssertionError("run both labs first")
    if (a.reason, a.exit_code) != (b.reason, b.exit_code):
        raise AssertionError(f"probed run stopped with {a.reason.value}/{a.exit_code} ({a.message}), "
                             f"unprobed with {b.reason.value}/{b.exit_code} ({b.message})")
    if probed.stdout != plain.stdout:
        raise AssertionError(f"stdout differs:\n--- probed\n{probed.stdout[-400:]!r}\n"
                             f"--- unprobed\n{plain.stdout[-400:]!r}")
    if probed.stderr != plain.stderr:
        raise AssertionError("stderr differs")
