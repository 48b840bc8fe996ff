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

import errno
import hashlib
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from emu.elf import ElfImage, load_elf
from emu.loader import GuestConfig, load_guest
from emu.machine import Machine, RunResult
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
    # How each run is probed: "kprobe" (every instruction), "optprobe" (every instruction,
    # jump-optimized where can_optimize allows) or "kretprobe" (each function entry).
    mode: str = "kprobe"


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
        gcfg = GuestConfig(path=cfg.path, arch=cfg.arch, bare=cfg.bare, argv=cfg.argv,
                           fs_root=root, fs_writable=cfg.fs_writable, seed=cfg.seed)
        guest = load_guest(gcfg, stdin=io.BytesIO(cfg.stdin), stdout=out, stderr=err, image=image)
        m = guest.machine
        if setup is not None:
            setup(m)
        result = m.run(max_insns=cfg.max_insns, timeout=cfg.timeout)
    return (_outcome(m, result, out.summary(), err.summary()) if observe else None), m


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
    return _Unwinder(state.trampoline, state.pending_ret_addrs())


def counting_kprobe(m: Machine, addr: int) -> list:
    p = Kprobe(addr=addr, pre_handler=_count_pre, post_handler=_count_post)
    p.post_hits = 0
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
    rp = Kretprobe(kp=Kprobe(addr=addr), handler=lambda ri, regs: 0)
    kretprobes_of(m).register_kretprobe(rp)
    rp.kp.post_hits = 0
    return [rp.kp]


MODES = {"kprobe": counting_kprobe, "optprobe": optimized_kprobe, "kretprobe": counting_kretprobe}


def _count_pre(p, regs) -> int:
    return 0


def _count_post(p, regs, flags) -> None:
    p.post_hits += 1


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


def _executed(cfg: SweepConfig, image: ElfImage, ranges: list[tuple[int, int]]) -> set[int]:
    """Addresses of the chosen functions the unprobed run executes (one traced run)."""
    seen: set[int] = set()

    def setup(m: Machine) -> None:
        def saw(addr: int, _size: int) -> None:
            if not m.stopping:          # Unicorn ends the block after an exit request
                seen.add(addr)
        for lo, hi in ranges:
            m.hooks.code(saw, lo, hi - 1)
    _run(cfg, image, setup, observe=False)
    return seen


def _check(cfg: SweepConfig, image: ElfImage, ref: Outcome, executed: set[int],
           func: str, sym_addr: int, addr: int, insn: str) -> OffsetResult:
    res = OffsetResult(func, addr - sym_addr, addr, "ok", insn)
    probes: list = []
    factory = MODES[cfg.mode]
    text_reads: list[int] = []

    def setup(m: Machine) -> None:
        probes.extend(factory(m, addr))
        _watch_patched_text(m, addr, text_reads)
    try:
        outcome, _m = _run(cfg, image, setup)
    except KprobeError as e:
        res.verdict, res.detail = "rejected", f"-{errno.errorcode.get(e.errno, e.errno)}: {e.reason}"
        return res
    res.hits = sum(p.hits for p in probes)
    res.post_hits = sum(getattr(p, "post_hits", 0) for p in probes)
    res.nmissed = sum(p.nmissed + (p.kretprobe.nmissed if p.kretprobe is not None else 0)
                      for p in probes)                   # as kprobe_profile counts misses
    res.step = _step(probes[0]) if probes else ""
    diff = outcome.first_difference(ref)
    if diff is not None and text_reads:
        # The guest loaded the patched bytes as data and saw the breakpoint/jump, as it
        # would under the kernel: a faithful difference, not a probe bug.
        res.verdict, res.detail = "text-read", f"guest read its patched text at {text_reads[0]:#x}; {diff}"
        return res
    if diff is None and (addr in executed) != (res.hits > 0):
        diff = f"hits={res.hits} but the unprobed run {'executed' if addr in executed else 'skipped'} it"
    if diff is not None:
        res.verdict, res.detail = "MISMATCH", diff
    return res


def _watch_patched_text(m: Machine, addr: int, seen: list[int]) -> None:
    """Record guest data loads of the bytes the probe patched at `addr`."""
    from unicorn import UC_HOOK_MEM_READ
    patched = [a for a in m.live_patches if addr <= a < addr + 32]
    if not patched:
        return
    lo, hi = min(patched), max(patched)

    def on_read(_uc, _access, a, size, _value, _ud) -> None:
        if a <= hi and a + size > lo:                     # the load overlaps the patch
            seen.append(a)
    # Hook from 16 bytes below: a wide load that starts before the patch covers it too.
    m.uc.hook_add(UC_HOOK_MEM_READ, on_read, None, max(0, lo - 16), hi)


def _step(p) -> str:
    ainsn = getattr(p, "ainsn", None)
    kind = probe_kind(p)
    return ainsn.kind if kind == "kprobe" else kind


_WORKER: dict = {}


def _init_worker(cfg: SweepConfig, image: ElfImage, ref: Outcome, executed: set[int]) -> None:
    _WORKER.update(cfg=cfg, image=image, ref=ref, executed=executed)


def _work(task: tuple[str, int, int, str]) -> OffsetResult:
    w = _WORKER
    return _check(w["cfg"], w["image"], w["ref"], w["executed"], *task)


def sweep(cfg: SweepConfig) -> SweepResult:
    from emu.arch import get_arch
    image = load_elf(cfg.path, None if cfg.arch == "auto" else get_arch(cfg.arch))
    symbols = SymbolTable(image.symbols)
    funcs = [symbols.lookup(f) for f in cfg.funcs] if cfg.funcs else symbols.functions()
    missing = [f for f, s in zip(cfg.funcs, funcs) if s is None]
    if missing:
        from emu.errors import UsageError
        raise UsageError(f"unknown function(s): {', '.join(missing)}")
    funcs = [f for f in funcs if f.size and _in_text(image, f)]
    ref, _m = _run(cfg, image, None)
    executed = _executed(cfg, image, [(f.addr, f.end) for f in funcs])
    not_executed: list[str] = []
    if cfg.funcs:
        # A function the user chose but the program never runs: every probe there would
        # just be "not hit"; say so instead of spending a run per instruction on it.
        not_executed = [f.name for f in funcs if not any(f.addr <= a < f.end for a in executed)]
        funcs = [f for f in funcs if f.name not in not_executed]
    if cfg.mode == "kretprobe":
        tasks = [(f.name, f.addr, f.addr, "(function entry)") for f in funcs]
    else:
        tasks = [(f.name, f.addr, a, text) for f in funcs for a, text in instruction_boundaries(image, f)]
    if cfg.jobs > 1 and len(tasks) > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(cfg.jobs, _init_worker, (cfg, image, ref, executed)) as pool:
            results = pool.map(_work, tasks, chunksize=max(1, len(tasks) // (cfg.jobs * 8)))
    else:
        _init_worker(cfg, image, ref, executed)
        results = [_work(t) for t in tasks]
    return SweepResult(image.path, image.arch.name, results, ref, not_executed)


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
