"""A Linux process image for a static binary: segments, brk, stack with argv/envp/auxv,
and the state the syscalls keep (mm, fds, signals, ids)."""
from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field
from typing import Any

from unicorn import UcError

from emu.elf import ElfImage
from emu.errors import ElfError
from emu.linux.fs import FdTable, FileSystem, OpenFile
from emu.machine import Machine
from emu.memory import PAGE, PROT_READ, PROT_WRITE, page_down, page_up

STACK_TOP = 0x7FFF_FFFF_F000
STACK_SIZE = 8 << 20
MMAP_BASE = 0x7E00_0000_0000
MMAP_MIN_ADDR = 0x10000          # Linux's default vm.mmap_min_addr

AT = dict(NULL=0, PHDR=3, PHENT=4, PHNUM=5, PAGESZ=6, BASE=7, FLAGS=8, ENTRY=9, UID=11, EUID=12,
          GID=13, EGID=14, PLATFORM=15, HWCAP=16, CLKTCK=17, SECURE=23, RANDOM=25, HWCAP2=26,
          EXECFN=31)


@dataclass
class Credentials:
    pid: int = 1000
    ppid: int = 1
    uid: int = 0
    gid: int = 0


@dataclass
class LinuxProcess:
    machine: Machine
    image: ElfImage
    fs: FileSystem
    creds: Credentials = field(default_factory=Credentials)
    fds: FdTable = field(default_factory=FdTable)
    brk_start: int = 0
    brk: int = 0
    comm: bytes = b""
    sigactions: dict[int, bytes] = field(default_factory=dict)
    sigmask: int = 0
    seed: int = 0
    nr_cpus: int = 1                 # --cpus: the vCPUs its tasks run on
    rng: random.Random = field(default_factory=random.Random)
    strace: bool = False
    umask: int = 0o022
    dispatcher_name: str = ""        # the syscall being served (aliases share a handler)
    killed_by: int = 0
    deadline: float | None = None    # --timeout as time.monotonic(), until Machine keeps one
    warned: set[str] = field(default_factory=set)    # one-time "not supported" notes given
    sched: Any = None                # the tasks and their scheduler (emu/linux/tasks.py)
    dispatcher: Any = None           # the SyscallDispatcher serving this process
    signals: Any = None              # dispositions, pending signals, timers (emu/linux/signal.py)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


def stop_as_limit(m: Machine, message: str) -> None:
    """End the run as a limit (exit 124) through the machine's limit checks, as
    --max-cycles does: the check answers once, then removes itself."""
    def check() -> str | None:
        if check in m.limit_checks:
            m.limit_checks.remove(check)
        return message
    m.limit_checks.insert(0, check)
    m.uc.emu_stop()


def map_image(m: Machine, image: ElfImage) -> None:
    """Map PT_LOAD segments page-rounded; pages shared by two segments get both perms.
    Works on extents, not pages, so a hostile p_memsz cannot make it loop for ever."""
    spans = [(page_down(s.vaddr), page_up(s.vaddr + s.memsz), s.prot) for s in image.segments]
    cuts = sorted({x for lo, hi, _ in spans for x in (lo, hi)})
    pieces: list[list[int]] = []                     # [start, end, prot], merged when equal
    for lo, hi in zip(cuts, cuts[1:]):
        covering = [p for a, b, p in spans if a < hi and lo < b]
        if not covering:
            continue
        prot = 0
        for p in covering:
            prot |= p
        if pieces and pieces[-1][1] == lo and pieces[-1][2] == prot:
            pieces[-1][1] = hi
        else:
            pieces.append([lo, hi, prot])
    for lo, hi, prot in pieces:
        try:
            m.memory.map(lo, hi - lo, prot, _name(image, prot))
        except UcError as e:
            raise ElfError(f"{image.path}: cannot map segment {lo:#x}-{hi:#x} ({e})") from None
    for seg in image.segments:
        m.memory.write(seg.vaddr, seg.data)      # the rest up to memsz is zero (fresh pages)
    m.symbols = _symbols(image)
    m.image = image
    m.entry = image.entry


def check_user_layout(image: ElfImage) -> None:
    """Linux refuses to exec an image that overlaps page 0..mmap_min_addr or the stack."""
    for s in image.segments:
        lo, hi = page_down(s.vaddr), page_up(s.vaddr + s.memsz)
        if lo < MMAP_MIN_ADDR or hi > STACK_TOP - STACK_SIZE:
            raise ElfError(f"{image.path}: segment {s.vaddr:#x}-{s.vaddr + s.memsz:#x} lies outside "
                           f"the user address space ({MMAP_MIN_ADDR:#x}-"
                           f"{STACK_TOP - STACK_SIZE:#x})")


def _name(image: ElfImage, prot: int) -> str:
    base = image.path.rsplit("/", 1)[-1]
    return f"{base}:{'text' if prot & 4 else 'data' if prot & 2 else 'rodata'}"


def _symbols(image: ElfImage):
    from emu.symbols import SymbolTable
    return SymbolTable(image.symbols)


def setup_process(m: Machine, image: ElfImage, argv: list[str], envp: list[str],
                  fs: FileSystem, stdin, seed: int = 0, cpus: int = 1) -> LinuxProcess:
    check_user_layout(image)
    m.memory.task_size = m.arch.task_size
    map_image(m, image)
    proc = LinuxProcess(m, image, fs, seed=seed, nr_cpus=cpus)
    proc.brk_start = proc.brk = page_up(image.high_end)
    proc.comm = os.fsencode(argv[0]).rsplit(b"/", 1)[-1][:15] if argv else b"guest"
    m.task = (proc.comm.decode(errors="replace"), proc.creds.pid)
    fs.exe_path = image.path
    proc.fds.files.update({0: OpenFile("stream", "<stdin>", 0, stream=stdin),
                           1: OpenFile("stream", "<stdout>", 1, stream=m.stdout),
                           2: OpenFile("stream", "<stderr>", 1, stream=m.stderr)})
    m.memory.map(STACK_TOP - STACK_SIZE, STACK_SIZE, PROT_READ | PROT_WRITE, "[stack]")
    # Unicorn starts with every register zero, so _start's rtld_fini (rdx / x0) is NULL.
    m.seed_random(seed)                 # RDRAND/RDSEED, seeded like getrandom
    m.start_thread(image.entry, build_stack(m, image, argv, envp, proc.rng))
    return proc


def build_stack(m: Machine, image: ElfImage, argv: list[str], envp: list[str],
                rng: random.Random) -> int:
    """The initial stack: argc, argv, envp, auxv, then strings and AT_RANDOM bytes."""
    arch, sp = m.arch, STACK_TOP
    blob = bytearray()

    def put(data: bytes) -> int:
        nonlocal blob
        blob = bytearray(data) + blob
        return sp - len(blob)

    execfn = put(os.fsencode(argv[0] if argv else image.path) + b"\0")
    platform = put(arch.platform.encode() + b"\0")
    random_bytes = put(rng.randbytes(16))
    # Arguments are bytes as the host gave them (sys.argv's surrogateescape undone).
    env_ptrs = [put(os.fsencode(e) + b"\0") for e in reversed(envp)][::-1]
    arg_ptrs = [put(os.fsencode(a) + b"\0") for a in reversed(argv)][::-1]
    strings_bottom = sp - len(blob)
    auxv = [(AT["PHDR"], image.phdr_addr), (AT["PHENT"], image.phentsize), (AT["PHNUM"], image.phnum),
            (AT["PAGESZ"], PAGE), (AT["BASE"], 0), (AT["FLAGS"], 0), (AT["ENTRY"], image.entry),
            (AT["UID"], 0), (AT["EUID"], 0), (AT["GID"], 0), (AT["EGID"], 0),
            (AT["HWCAP"], arch.hwcap), (AT["HWCAP2"], arch.hwcap2), (AT["CLKTCK"], 100),
            (AT["RANDOM"], random_bytes), (AT["SECURE"], 0), (AT["EXECFN"], execfn),
            (AT["PLATFORM"], platform), (AT["NULL"], 0)]
    words = [len(argv), *arg_ptrs, 0, *env_ptrs, 0]
    for key, value in auxv:
        words += [key, value]
    table = struct.pack(f"<{len(words)}Q", *words)
    top = (strings_bottom - len(table)) & ~0xF
    m.memory.write(top, table)
    m.memory.write(strings_bottom, bytes(blob))
    return top
