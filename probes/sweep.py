"""The probe-everywhere sweep: for every instruction boundary of the chosen functions, run
the program once with a kprobe there (counting pre and post handlers) and compare what the
guest did — stdout, stderr, exit code, final registers and written memory — with the
unprobed run. A probe must never change guest behaviour; this checks it exhaustively.

Verdicts per offset: ok (with hit counts), rejected (the kernel's errno and reason), or
MISMATCH (the first difference, or a probe that was not hit where the function ran).

Every run gets the same inputs as `emu run` would (stdin bytes, a --fs tree, --seed,
--max-insns, --timeout). A --fs-write tree is copied to a scratch directory per run, so no
run sees another's writes. Guest output is never held whole: each stream is reduced to a
hash, a length and a bounded prefix (OutputDigest), so a guest writing gigabytes costs no
host memory; live memory is kept by chunk with untouched (all-zero) chunks left out, so a
guest mapping gigabytes it never writes costs none either."""
from __future__ import annotations

import bisect
import errno
import functools
import hashlib
import io
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Protocol, cast

from emu.elf import ElfImage, load_elf
from emu.linux.tasks import TurnUnit
from emu.loader import GuestConfig, load_guest
from emu.machine import Machine, RunResult, StopReason
from emu.symbols import Symbol, SymbolTable
from probes.errors import KprobeError
from probes.kprobes import Kprobe, kprobes_of, probe_kind


@dataclass
class SweepConfig:
    path: str
    arch: str = "auto"
    bare: bool = False
    argv: list[str] = field(default_factory=list)
    stdin: bytes = b""
    funcs: list[str] = field(default_factory=list)     # empty: every function
    jobs: int = 1
    timeout: float = 20.0
    max_insns: int = 0
    fs_root: str | None = None
    fs_writable: bool = False       # each run writes into its own scratch copy of fs_root
    seed: int = 0
    cpus: int = 1                   # --cpus: vCPUs of every run
    # How each run is probed: "kprobe" (every instruction), "optprobe" (every instruction,
    # jump-optimized where can_optimize allows) or "kretprobe" (each function entry).
    mode: str = "kprobe"
    # Start each run from a snapshot at the probed function's first execution, and do not
    # run offsets the unprobed run never executed nor read (False: every run from _start).
    snapshots: bool = True


class OutputDigest(io.RawIOBase):
    """A write-only guest stream kept as (sha256, length, first PREFIX bytes): two runs are
    compared by hash and length, and the prefix is there to show."""

    PREFIX = 4096

    def __init__(self) -> None:
        super().__init__()
        self._hash = hashlib.sha256()
        self.length = 0
        self.prefix = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self._hash.update(data)
        self.length += len(data)
        if len(self.prefix) < self.PREFIX:
            self.prefix += data[:self.PREFIX - len(self.prefix)]
        return len(data)

    def snapshot_state(self) -> tuple:
        """For machine snapshots (emu/snapshot.py): the digest so far."""
        return self._hash.copy(), self.length, bytes(self.prefix)

    def restore_state(self, state: tuple) -> None:
        h, self.length, prefix = state
        self._hash, self.prefix = h.copy(), bytearray(prefix)

    def summary(self) -> "StreamSummary":
        return StreamSummary(self._hash.hexdigest(), self.length, bytes(self.prefix))


@dataclass(frozen=True)
class StreamSummary:
    sha256: str
    length: int
    prefix: bytes

    def first_difference(self, ref: "StreamSummary") -> int | None:
        """The first differing byte offset, None if equal; past the prefixes, the shorter
        length, or the prefix end when only the hashes tell them apart."""
        if (self.sha256, self.length) == (ref.sha256, ref.length):
            return None
        i = _first_diff(self.prefix, ref.prefix)
        if i < min(len(self.prefix), len(ref.prefix)):
            return i
        return min(self.length, ref.length) if self.length != ref.length else len(self.prefix)


@dataclass
class Outcome:
    """What a run did, reduced to what the guest could observe."""
    exit_code: int
    reason: str
    stdout: StreamSummary
    stderr: StreamSummary
    regs: dict[str, int]
    memory: dict[int, "MemorySnapshot"]     # start -> live writable bytes
    stale_word: bytes | None = None  # a word only a kretprobe hijack writes (its trampoline)
    pc_name: str = "pc"

    def first_difference(self, ref: "Outcome") -> str | None:
        if self.reason != ref.reason or self.exit_code != ref.exit_code:
            return f"exit {self.reason}/{self.exit_code} != {ref.reason}/{ref.exit_code}"
        for name in ("stdout", "stderr"):
            at = getattr(self, name).first_difference(getattr(ref, name))
            if at is not None:
                return f"{name} differs at byte {at}"
        for name, value in ref.regs.items():
            if name == self.pc_name and self.reason == "exit":
                # The guest is gone: its pc is not observable, and Unicorn reports the
                # translation block's start when a device write stopped the run.
                continue
            if self.regs.get(name) != value:
                return f"register {name} = {self.regs.get(name, 0):#x}, expected {value:#x}"
        return self._memory_difference(ref)

    def _memory_difference(self, ref: "Outcome") -> str | None:
        if self.memory.keys() != ref.memory.keys():
            return "live memory layout differs"
        for start, snap in self.memory.items():
            want = ref.memory[start]
            if snap.size != want.size:
                return f"live memory at {start:#x} differs in size"
            for i, (got, exp) in enumerate(zip(snap.chunks, want.chunks)):
                if got == exp:
                    continue
                base = start + i * MemorySnapshot.CHUNK
                a, b = got or bytes(len(exp or b"")), exp or bytes(len(got or b""))
                for off in range(0, len(a), 8):
                    x, y = a[off:off + 8], b[off:off + 8]
                    if x != y and not _stale(x, y, self.stale_word):
                        return f"written memory differs at {base + off:#x}"
        return None


@dataclass
class MemorySnapshot:
    """A writable region's bytes by CHUNK; None stands for an all-zero chunk, so memory the
    guest mapped but never wrote costs no host memory (only the time to look at it)."""
    size: int
    chunks: list[bytes | None]

    CHUNK = 1 << 16

    @classmethod
    def take(cls, read: Callable[[int, int], bytes], start: int, size: int,
             fix: Callable[[bytes], bytes] | None = None) -> "MemorySnapshot":
        chunks: list[bytes | None] = []
        for off in range(0, size, cls.CHUNK):
            data = read(start + off, min(cls.CHUNK, size - off))
            if fix is not None:
                data = fix(data)
            zero = data == _ZERO_CHUNK if len(data) == cls.CHUNK else data.count(0) == len(data)
            chunks.append(None if zero else data)
        return cls(size, chunks)


_ZERO_CHUNK = bytes(MemorySnapshot.CHUNK)


@dataclass
class OffsetResult:
    function: str
    offset: int
    addr: int
    verdict: str                # "ok" | "rejected" | "text-read" | "MISMATCH"
    insn: str = ""
    step: str = ""
    hits: int = 0
    post_hits: int = 0
    nmissed: int = 0
    detail: str = ""


@dataclass
class SweepResult:
    path: str
    arch: str
    results: list[OffsetResult]
    baseline: Outcome | None = None
    not_executed: list[str] = field(default_factory=list)   # chosen functions the baseline never ran

    @property
    def checked(self) -> int:
        return sum(r.verdict == "ok" for r in self.results)

    @property
    def rejected(self) -> int:
        return sum(r.verdict == "rejected" for r in self.results)

    @property
    def mismatches(self) -> int:
        return sum(r.verdict == "MISMATCH" for r in self.results)

    @property
    def text_reads(self) -> int:
        return sum(r.verdict == "text-read" for r in self.results)

    def to_json(self) -> dict:
        funcs: dict[str, list[dict]] = {}
        for r in self.results:
            funcs.setdefault(r.function, []).append(asdict(r))
        data = {"file": self.path, "arch": self.arch, "checked": self.checked,
                "rejected": self.rejected, "mismatches": self.mismatches,
                "text_reads": self.text_reads, "offsets": len(self.results),
                "not_executed": self.not_executed, "functions": funcs}
        if self.baseline is not None:
            data["baseline"] = baseline_json(self.baseline)
        return data


def baseline_json(b: Outcome) -> dict:
    return {"exit_code": b.exit_code, "stop_reason": b.reason, "stdout_bytes": b.stdout.length,
            "stderr_bytes": b.stderr.length, "stdout_sha256": b.stdout.sha256}


def _stale(got: bytes, want: bytes, stale: bytes | None) -> bool:
    """A hijack word a longjmp left in the stack (its frame is gone, so no return undoes
    it), whole or with one 4-byte half since overwritten by the guest."""
    if stale is None:
        return False
    return got == stale or (got[:4], got[4:]) in ((stale[:4], want[4:]), (want[:4], stale[4:]))


def _first_diff(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# --- one run ---------------------------------------------------------------------------------
def _run(cfg: SweepConfig, image: ElfImage, setup: Callable[[Machine], None] | None,
         observe: bool = True) -> tuple[Outcome | None, Machine]:
    out, err = OutputDigest(), OutputDigest()
    with _fs_for_run(cfg) as root:
        m = _load(cfg, root, out, err, image)
        if setup is not None:
            setup(m)
        result = m.run(max_insns=cfg.max_insns, timeout=cfg.timeout)
    return (_outcome(m, result, out.summary(), err.summary()) if observe else None), m


def _load(cfg: SweepConfig, fs_root: str | None, out: "OutputDigest", err: "OutputDigest",
          image: ElfImage) -> Machine:
    """A run's machine, `fs_root` its --fs tree (a scratch copy when runs write it)."""
    gcfg = GuestConfig(path=cfg.path, arch=cfg.arch, bare=cfg.bare, argv=cfg.argv,
                       fs_root=fs_root, fs_writable=cfg.fs_writable, seed=cfg.seed,
                       cpus=cfg.cpus)
    guest = load_guest(gcfg, stdin=io.BytesIO(cfg.stdin), stdout=_stream(out), stderr=_stream(err),
                       image=image)
    if guest.process is not None:    # probed and unprobed runs share one CPU schedule
        guest.process.sched.turn_unit = TurnUnit.CODE
    return guest.machine


@contextmanager
def _fs_for_run(cfg: SweepConfig) -> Iterator[str | None]:
    """The --fs root of one run: the granted tree itself when read-only, else a scratch copy
    that goes away after the run (the guest sees the same paths either way)."""
    if cfg.fs_root is None or not cfg.fs_writable:
        yield cfg.fs_root
        return
    scratch = tempfile.mkdtemp(prefix="emu-sweep-")
    try:
        root = os.path.join(scratch, "fs")
        shutil.copytree(cfg.fs_root, root, symlinks=True)
        yield root
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _stream(digest: OutputDigest) -> BinaryIO:
    """The digest as the guest's stream: the guest only ever writes to it."""
    return cast(BinaryIO, digest)


def _outcome(m: Machine, result: RunResult, stdout: StreamSummary, stderr: StreamSummary) -> Outcome:
    """The state the guest can still observe: registers and writable memory, without the
    dead stack below sp, with pending kretprobe hijacks undone as an unwinder would."""
    regs = {n: m.reg(n) for n in m.arch.regs}
    sp = m.sp & ~7
    unwind = _kretprobe_unwinder(m)
    memory: dict[int, MemorySnapshot] = {}
    for r in m.memory.regions:
        if not r.prot & 2 or r.name.startswith(("uart", "exit")):      # writable guest memory
            continue
        start = sp if r.start <= sp <= r.end else r.start      # sp == end: an empty stack
        fix = unwind.stack if unwind is not None and start == sp else None
        memory[start] = MemorySnapshot.take(m.memory.read, start, r.end - start, fix)
    stale = None
    if unwind is not None:
        regs = unwind.regs(regs)
        stale = unwind.tramp.to_bytes(8, "little")
    return Outcome(result.exit_code, result.reason.value, stdout, stderr, regs, memory, stale,
                   m.arch.pc)


class _Unwinder:
    """Replaces trampoline addresses by the real return addresses, innermost first
    (kretprobe_find_ret_addr), in the live stack and in registers."""

    def __init__(self, trampoline: int, pending: list[int]) -> None:
        self.tramp, self.pending = trampoline, pending
        self.used = 0

    def stack(self, data: bytes) -> bytes:
        """The next piece of the stack, upwards from sp (pieces of a multiple of 8 bytes)."""
        out, want = bytearray(data), self.tramp.to_bytes(8, "little")
        for off in range(0, len(out) - 7, 8):
            if out[off:off + 8] == want and self.used < len(self.pending):
                out[off:off + 8] = self.pending[self.used].to_bytes(8, "little")
                self.used += 1
        return bytes(out)

    def regs(self, regs: dict[str, int]) -> dict[str, int]:
        return {n: (self.pending[0] if v == self.tramp and self.pending else v) for n, v in regs.items()}


def _kretprobe_unwinder(m: Machine) -> _Unwinder | None:
    state = m.layers.get("kretprobes")
    if state is None:
        return None
    from probes.kretprobes import Kretprobes
    assert isinstance(state, Kretprobes)
    return _Unwinder(state.trampoline, state.pending_ret_addrs())


@dataclass(eq=False)
class CountingKprobe(Kprobe):
    """A kprobe that counts its post-handler calls too (the single-step happened)."""
    post_hits: int = 0


def counting_kprobe(m: Machine, addr: int) -> list:
    p = CountingKprobe(addr=addr, pre_handler=_count_pre, post_handler=_count_post)
    kprobes_of(m).register_kprobe(p)
    return [p]


def optimized_kprobe(m: Machine, addr: int) -> list:
    """A pre-only kprobe with jump optimization, optimized at once where allowed."""
    from probes.optprobes import enable_optprobes
    kp = kprobes_of(m)
    opt = enable_optprobes(kp)
    p = Kprobe(addr=addr, pre_handler=_count_pre)
    kp.register_kprobe(p)
    opt.kick_kprobe_optimizer()
    return [p]


def counting_kretprobe(m: Machine, addr: int) -> list:
    from probes.kretprobes import Kretprobe, kretprobes_of
    rp = Kretprobe(kp=CountingKprobe(addr=addr), handler=lambda ri, regs: 0)
    kretprobes_of(m).register_kretprobe(rp)
    return [rp.kp]


MODES = {"kprobe": counting_kprobe, "optprobe": optimized_kprobe, "kretprobe": counting_kretprobe}


def _count_pre(p, regs) -> int:
    return 0


def _count_post(p, regs, flags) -> None:
    p.post_hits += 1


# --- what the unprobed run did ----------------------------------------------------------------
@dataclass(frozen=True)
class Trace:
    """The unprobed run in the chosen functions: every instruction it executed (address ->
    size), the text bytes it loaded as data, and, per function, the first address it
    executed there with that moment's rank in time (where a sweep run starts from)."""
    executed: dict[int, int]
    read: frozenset[int]
    first: dict[int, int]               # function start -> first address executed in it
    rank: dict[int, int]                # function start -> order of that first execution
    ranges: tuple[tuple[int, int], ...]     # the traced address ranges, merged

    def untouched(self, addrs) -> bool:
        """None of these bytes was executed or read by the unprobed run (so a patch there
        cannot change what the guest does)."""
        covered = self._covered
        for a in addrs:
            if a in self.read or a in covered or not self._traced(a):
                return False
        return True

    @functools.cached_property
    def _covered(self) -> frozenset[int]:
        return frozenset(a + i for a, n in self.executed.items() for i in range(n))

    def _traced(self, addr: int) -> bool:
        i = bisect.bisect_right(self.ranges, (addr, float("inf"))) - 1
        return i >= 0 and self.ranges[i][0] <= addr < self.ranges[i][1]


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def trace_baseline(cfg: SweepConfig, image: ElfImage, funcs: list[Symbol]) -> Trace:
    """One unprobed run with code and data-read hooks on the chosen functions (the baseline
    is never probed, so hooks here are not on any probed run)."""
    from unicorn import UC_HOOK_MEM_READ
    ranges = _merge([(f.addr, f.end) for f in funcs])
    seen: dict[int, int] = {}
    read: set[int] = set()

    def setup(m: Machine) -> None:
        def saw(addr: int, size: int) -> None:
            if not m.stopping:          # Unicorn ends the block after an exit request
                seen.setdefault(addr, size)

        def loaded(_uc, _access, addr, size, _value, _ud) -> None:
            read.update(range(addr, addr + size))
        def watch_loads(lo: int, hi: int) -> Callable[[Any], object]:
            return lambda uc: uc.hook_add(UC_HOOK_MEM_READ, loaded, None, lo, hi - 1)
        for lo, hi in ranges:
            m.hooks.code(saw, lo, hi - 1)
            m.for_each_uc(watch_loads(lo, hi))
    _run(cfg, image, setup, observe=False)
    order = {a: i for i, a in enumerate(seen)}
    addrs = sorted(seen)
    first: dict[int, int] = {}
    rank: dict[int, int] = {}
    for f in funcs:
        inside = addrs[bisect.bisect_left(addrs, f.addr):bisect.bisect_left(addrs, f.end)]
        if inside:
            a = min(inside, key=order.__getitem__)
            first[f.addr], rank[f.addr] = a, order[a]
    return Trace(seen, frozenset(read), first, rank, ranges)


# --- the sweep -------------------------------------------------------------------------------
def instruction_boundaries(image: ElfImage, sym: Symbol) -> list[tuple[int, str]]:
    """(address, text) of each instruction of a function, decoded linearly from its start."""
    import capstone
    from emu.disasm import image_bytes
    md = capstone.Cs(image.arch.cs_arch, image.arch.cs_mode)
    code = image_bytes(image, sym.addr, sym.size)
    out, off = [], 0
    while off < len(code):
        insn = next(md.disasm(code[off:off + 16], sym.addr + off, 1), None)
        size = insn.size if insn else image.arch.insn_align if image.arch.insn_align > 1 else 1
        out.append((sym.addr + off, f"{insn.mnemonic} {insn.op_str}".strip() if insn else "(bad)"))
        off += size
    return out


@dataclass(frozen=True)
class Task:
    """Offsets of one function, checked together (they share the function's snapshot)."""
    index: int
    function: str
    sym_addr: int
    offsets: tuple[tuple[int, str], ...]       # (address, instruction text)


@dataclass
class Plan:
    """Everything a worker needs: the inputs, the parsed binary, the unprobed outcome and
    trace. `key` names the sweep (the binary's sha256 and every input) for result files."""
    cfg: SweepConfig
    image: ElfImage
    ref: Outcome
    trace: Trace
    sha256: str
    key: str

    @property
    def resumable(self) -> bool:
        """Runs may start from snapshots: not with --fs-write (host files are not rolled
        back; each run gets a scratch tree) nor --max-insns (a budget counts from _start).
        Threaded guests and --cpus N may: a snapshot keeps the tasks and their scheduler
        (emu/linux/task_snapshot.py)."""
        c = self.cfg
        return c.snapshots and not c.fs_writable and not c.max_insns


class FreshRunner:
    """Each run loads the guest and starts at its entry."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def run(self, sym_addr: int, setup: Callable[[Machine], None],
            skip: Callable[[Machine], bool] | None) -> Outcome | None:
        cfg = self.plan.cfg
        if skip is None:
            return _run(cfg, self.plan.image, setup)[0]
        with _fs_for_run(cfg) as root:
            out, err = OutputDigest(), OutputDigest()
            m = _load(cfg, root, out, err, self.plan.image)
            setup(m)
            if skip(m):
                return None
            result = m.run(max_insns=cfg.max_insns, timeout=cfg.timeout)
        return _outcome(m, result, out.summary(), err.summary())


class SnapshotRunner:
    """Runs start from a snapshot of the unprobed run taken where it first executed the
    probed function (reached with emu_start's `until`, no hook on the probed address).
    Functions are visited in the order the guest first ran them, so each snapshot is made
    from the previous one by running on; going back means loading the guest again."""

    # A restore compares every mapped chunk: past this much memory (a bare-metal image's
    # 128 MiB of RAM) loading the guest afresh is cheaper, so runs start at the entry
    # (offsets never reached are still not run).
    RESTORE_LIMIT = 64 << 20

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.m: Machine | None = None
        self.snap = None
        self.rank = -1
        self.out = self.err = OutputDigest()
        self.fresh = False

    def _load(self) -> Machine:
        cfg = self.plan.cfg            # (snapshots only where the tree is not written)
        self.out, self.err = OutputDigest(), OutputDigest()
        return _load(cfg, cfg.fs_root, self.out, self.err, self.plan.image)

    def _reach(self, sym_addr: int) -> bool:
        """Hold a snapshot at the first execution of the function at sym_addr."""
        trace = self.plan.trace
        first, rank = trace.first.get(sym_addr), trace.rank.get(sym_addr, -1)
        if first is None:
            return False
        if self.snap is not None and rank == self.rank:
            return True
        if self.m is None or self.snap is None or rank < self.rank:
            m = self.m = self._load()
        else:
            m = self.m
            m.restore(self.snap)
        self.snap, self.rank = None, -1
        m.flush_code(first, first + 1)               # a cached block must not run past it
        r = m.run(until=first, timeout=self.plan.cfg.timeout)
        if r.reason is not StopReason.HALT or m.pc != first:
            self.m = None
            return False
        snap = self.snap = m.snapshot()
        self.rank = rank
        self.fresh = snap.restore_bytes > self.RESTORE_LIMIT
        return True

    def _any(self) -> None:
        """Some snapshot to register probes on: the current one, or the guest at its entry."""
        if self.m is None or self.snap is None:
            self.m = self._load()
            snap = self.snap = self.m.snapshot()
            self.rank = -1
            self.fresh = snap.restore_bytes > self.RESTORE_LIMIT

    def run(self, sym_addr: int, setup: Callable[[Machine], None],
            skip: Callable[[Machine], bool] | None) -> Outcome | None:
        if self.fresh:
            return FreshRunner(self.plan).run(sym_addr, setup, skip)
        if not self._reach(sym_addr):
            # Never executed here: a probe is only worth a run (from _start) if the guest
            # reads the patched bytes as data.
            if skip is not None:
                self._any()
                assert self.m is not None
                self.m.restore(self.snap)
                setup(self.m)
                if skip(self.m):
                    return None
            return FreshRunner(self.plan).run(sym_addr, setup, None)
        m = self.m
        assert m is not None
        m.restore(self.snap)
        setup(m)
        if skip is not None and skip(m):
            return None
        result = m.run(timeout=self.plan.cfg.timeout)
        return _outcome(m, result, self.out.summary(), self.err.summary())


def check_offset(plan: Plan, runner, func: str, sym_addr: int, addr: int, insn: str) -> OffsetResult:
    cfg, trace = plan.cfg, plan.trace
    res = OffsetResult(func, addr - sym_addr, addr, "ok", insn)
    probes: list = []
    factory = MODES[cfg.mode]
    text_reads: list[int] = []

    def setup(m: Machine) -> None:
        probes[:], text_reads[:] = factory(m, addr), []
        _watch_patched_text(m, addr, text_reads, trace)

    def skip(m: Machine) -> bool:
        owned = m.owned_text                    # slots and trampolines: the probe's own code
        return trace.untouched(a for a in m.live_patches
                               if not any(lo <= a < hi for lo, hi in owned))
    try:
        outcome = runner.run(sym_addr, setup, skip if cfg.snapshots else None)
    except KprobeError as e:
        res.verdict, res.detail = "rejected", f"-{errno.errorcode.get(e.errno, e.errno)}: {e.reason}"
        return res
    res.step = _step(probes[0]) if probes else ""
    if outcome is None:
        return res          # never executed nor read: the run would be the baseline's
    res.hits = sum(p.hits for p in probes)
    res.post_hits = sum(getattr(p, "post_hits", 0) for p in probes)
    res.nmissed = sum(p.nmissed + (p.kretprobe.nmissed if p.kretprobe is not None else 0)
                      for p in probes)                   # as kprobe_profile counts misses
    res.step = _step(probes[0]) if probes else ""
    diff = outcome.first_difference(plan.ref)
    if diff is not None and text_reads:
        # The guest loaded the patched bytes as data and saw the breakpoint/jump, as it
        # would under the kernel: a faithful difference, not a probe bug.
        res.verdict, res.detail = "text-read", f"guest read its patched text at {text_reads[0]:#x}; {diff}"
        return res
    executed = addr in trace.executed
    if diff is None and executed != (res.hits > 0):
        diff = f"hits={res.hits} but the unprobed run {'executed' if executed else 'skipped'} it"
    if diff is not None:
        res.verdict, res.detail = "MISMATCH", diff
    return res


def _watch_patched_text(m: Machine, addr: int, seen: list[int], trace: Trace) -> None:
    """Record guest data loads of the bytes the probe patched at `addr`. Not when the
    unprobed run, which traced them, never loaded them: the probed run is the same run
    until it first does. (A load hook slows every load and store Unicorn translates while
    it exists, and that code stays translated across snapshot restores.)"""
    from unicorn import UC_HOOK_MEM_READ
    patched = [a for a in m.live_patches if addr <= a < addr + 32]
    if not patched:
        return
    lo, hi = min(patched), max(patched)
    if all(trace._traced(a) for a in range(max(0, lo - 16), hi + 1)) and \
            not any(a in trace.read for a in range(lo, hi + 1)):
        return

    def on_read(_uc, _access, a, size, _value, _ud) -> None:
        if a <= hi and a + size > lo:                     # the load overlaps the patch
            seen.append(a)
    # Hook from 16 bytes below: a wide load that starts before the patch covers it too.
    m.for_each_uc(lambda uc: uc.hook_add(UC_HOOK_MEM_READ, on_read, None, max(0, lo - 16), hi))


def _step(p: Kprobe) -> str:
    kind = probe_kind(p)
    return str(p.ainsn.kind) if kind == "kprobe" and p.ainsn is not None else kind


_RUNNERS: dict[str, object] = {}        # per process: the runner of the plan being worked on


def check_task(plan: Plan, task: Task) -> list[OffsetResult]:
    """The verdicts of one task (run in a worker, or in-process)."""
    runner = _RUNNERS.get(plan.key)
    if runner is None:
        _RUNNERS.clear()                # one plan at a time: drop older snapshots
        runner = _RUNNERS[plan.key] = SnapshotRunner(plan) if plan.resumable else FreshRunner(plan)
    return [check_offset(plan, runner, task.function, task.sym_addr, a, insn)
            for a, insn in task.offsets]


# --- planning and merging --------------------------------------------------------------------
TASK_OFFSETS = 32           # offsets per task: progress moves and work spreads across workers


@dataclass
class Prepared:
    """A planned sweep: the plan, its tasks in report order, what the baseline skipped."""
    plan: Plan
    tasks: list[Task]
    not_executed: list[str]

    def dispatch_order(self) -> list[Task]:
        """Tasks in the order the guest first ran their functions (a worker's snapshot then
        only ever moves forward); functions it never ran last."""
        rank = self.plan.trace.rank
        return sorted(self.tasks, key=lambda t: (rank.get(t.sym_addr, 1 << 62), t.index))


def prepare(cfg: SweepConfig) -> Prepared:
    from emu.arch import requested_arch
    image = load_elf(cfg.path, requested_arch(cfg.arch))
    symbols = SymbolTable(image.symbols)
    funcs = [symbols.lookup(f) for f in cfg.funcs] if cfg.funcs else symbols.functions()
    missing = [f for f, s in zip(cfg.funcs, funcs) if s is None]
    if missing:
        from emu.errors import UsageError
        raise UsageError(f"unknown function(s): {', '.join(missing)}")
    chosen = [f for f in funcs if f is not None and f.size and _in_text(image, f)]
    ref, _m = _run(cfg, image, None)
    assert ref is not None                    # observed runs give an outcome
    trace = trace_baseline(cfg, image, chosen)
    not_executed: list[str] = []
    if cfg.funcs:
        # A function the user chose but the program never runs: every probe there would
        # just be "not hit"; say so instead of spending a run per instruction on it.
        not_executed = [f.name for f in chosen if f.addr not in trace.first]
        chosen = [f for f in chosen if f.name not in not_executed]
    sha = _sha256(cfg.path)
    plan = Plan(cfg, image, ref, trace, sha, _plan_key(cfg, sha))
    return Prepared(plan, _tasks(cfg, image, chosen), not_executed)


def _tasks(cfg: SweepConfig, image: ElfImage, funcs: list[Symbol]) -> list[Task]:
    tasks: list[Task] = []
    for f in funcs:
        if cfg.mode == "kretprobe":
            offsets = [(f.addr, "(function entry)")]
        else:
            offsets = instruction_boundaries(image, f)
        for i in range(0, len(offsets), TASK_OFFSETS):
            tasks.append(Task(len(tasks), f.name, f.addr, tuple(offsets[i:i + TASK_OFFSETS])))
    return tasks


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plan_key(cfg: SweepConfig, sha: str) -> str:
    """A digest of the binary and every input that changes verdicts (not jobs or paths)."""
    inputs = [sha, cfg.arch, cfg.bare, cfg.argv, hashlib.sha256(cfg.stdin).hexdigest(),
              cfg.timeout, cfg.max_insns, cfg.fs_root, cfg.fs_writable, cfg.seed, cfg.cpus, cfg.mode]
    return hashlib.sha256(repr(inputs).encode()).hexdigest()[:16]


def result_key(plan: Plan, r: OffsetResult) -> tuple[str, str, str, int]:
    """How a result is filed: (binary sha256, mode, function, offset)."""
    return (plan.sha256, plan.cfg.mode, r.function, r.offset)


def merge(prepared: Prepared, results: dict[int, list[OffsetResult]]) -> SweepResult:
    """One report in task order, whatever order the tasks finished in."""
    plan = prepared.plan
    ordered = [r for t in prepared.tasks for r in results[t.index]]
    return SweepResult(plan.image.path, plan.image.arch.name, ordered, plan.ref,
                       prepared.not_executed)


class Progress(Protocol):
    def start(self, total: int, done: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


class Journal(Protocol):
    def open(self, plan: Plan) -> dict[tuple, OffsetResult]: ...
    def write(self, plan: Plan, results: list[OffsetResult]) -> None: ...
    def close(self) -> None: ...


def sweep(cfg: SweepConfig, backend=None, journal: Journal | None = None,
          progress: Progress | None = None) -> SweepResult:
    """Sweep as `cfg` says. `backend` runs the tasks (default: a local pool of cfg.jobs
    processes, probes/sweep_backends.py); `journal` files each result as it comes and
    gives back those of an interrupted sweep (which are not run again); `progress` is told
    the offsets done."""
    from probes.sweep_backends import LocalPool
    prepared = prepare(cfg)
    plan = prepared.plan
    done = journal.open(plan) if journal is not None else {}
    results: dict[int, list[OffsetResult]] = {}
    filed: dict[int, list[OffsetResult]] = {}       # results of a task's offsets already filed
    todo = []
    for t in prepared.dispatch_order():
        known = {a: done.get((plan.sha256, cfg.mode, t.function, a - t.sym_addr)) for a, _ in t.offsets}
        filed[t.index] = [k for k in known.values() if k is not None]
        rest = tuple(o for o in t.offsets if known[o[0]] is None)
        if rest:
            todo.append(dataclasses.replace(t, offsets=rest))
        else:
            results[t.index] = filed[t.index]
    if progress is not None:
        progress.start(sum(len(t.offsets) for t in prepared.tasks),
                       sum(len(r) for r in filed.values()))
    backend = backend if backend is not None else LocalPool(cfg.jobs)
    try:
        for task, res in backend.map(plan, todo):
            results[task.index] = sorted(filed[task.index] + res, key=lambda r: r.offset)
            if journal is not None:
                journal.write(plan, res)
            if progress is not None:
                progress.advance(len(res))
    finally:
        if journal is not None:
            journal.close()
        if progress is not None:
            progress.finish()
    return merge(prepared, results)


def hottest_functions(cfg: SweepConfig, n: int, max_bytes: int = 2048) -> list[str]:
    """The `n` functions the unprobed run (with cfg's inputs) spends the most executed code
    bytes in, among those of at most `max_bytes` of code: what to sweep first in a real
    program (a large inlined core alone can be thousands of runs). A block hook on this one
    run only; ties go by name."""
    from emu.arch import requested_arch
    image = load_elf(cfg.path, requested_arch(cfg.arch))
    counts: dict[int, int] = {}

    def count(m: Machine) -> None:
        def block(addr: int, size: int) -> None:
            counts[addr] = counts.get(addr, 0) + size
        m.hooks.block(block)
    _out, m = _run(cfg, image, count, observe=False)
    per: dict[str, int] = {}
    for addr, c in counts.items():
        s = m.symbols.find(addr)
        if s is not None and s.kind == "func" and 0 < s.size <= max_bytes:
            per[s.name] = per.get(s.name, 0) + c
    return [name for name, _ in sorted(per.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _in_text(image: ElfImage, sym: Symbol) -> bool:
    return any(s.vaddr <= sym.addr < s.vaddr + s.memsz and s.prot & 4 for s in image.segments)


def format_table(result: SweepResult) -> str:
    lines = [f"{'FUNCTION+OFF':<34} {'VERDICT':<9} {'STEP':<12} {'HITS':>8}  INSN / DETAIL"]
    for r in result.results:
        where = f"{r.function}+{r.offset:#x}"
        tail = r.insn + (f"  [{r.detail}]" if r.detail else "")
        lines.append(f"{where:<34} {r.verdict:<9} {r.step:<12} {r.hits:>8}  {tail}")
    if result.baseline is not None:
        b = result.baseline
        lines.append(f"baseline: {b.reason} {b.exit_code}, stdout {b.stdout.length} bytes, "
                     f"stderr {b.stderr.length} bytes")
    if result.not_executed:
        lines.append(f"not executed by the baseline (not swept): {', '.join(result.not_executed)}")
    lines.append(f"checked {result.checked}, rejected {result.rejected}, text-read {result.text_reads}, "
                 f"mismatches {result.mismatches}")
    return "\n".join(lines)
