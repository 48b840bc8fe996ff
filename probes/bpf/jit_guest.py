"""The BPF JIT to the guest ISA (arch/{x86,arm64}/net/bpf_jit_comp.c), common part.

A verified program is translated to arm64 or x86-64 machine code by the arch's emitter
(``jit_arm64.py``, ``jit_x86_64.py``) and run where the cycle model can charge it like
any guest code: in a scratch ``Machine`` of that arch (``ScratchJit(arch)``: ``emu bpf run
--bpf-engine jit``, ``probes.bpf.run(..., engine="jit")``), or inside the traced machine
itself (``ScratchJit(arch, machine=m)``, used by ``ProbeJit`` on probe hits): there the
trampolines, the run's data page and the images sit in pages the BPF layer maps and claims
from GUEST_JIT_BASE up (r-x, written through text_poke, refused as probe targets), the
windows (see Memory) hold the maps and the pt_regs context, and a hit runs the image on the
traced CPU in a nested run on the layer's own stack, after which the CPU's registers are
restored. This module holds what the two JITs share: the image builder (labels,
fixed-size branches resolved in a second pass, the per-instruction address map that ``emu
bpf disasm --jited`` and fault reports use, the exception table), the helper trampolines,
and the runners.

Memory. The machine's regions (context, map values, ring-buffer records; see memory.py)
sit at non-canonical addresses no CPU can load from, so each region gets a guest window:
the region's key with bit 62 cleared (0x4000_0001_xxxx_xxxx -> 0x1_xxxx_xxxx), the bytes
placed at the end of the window's pages (rounded to 16) so an access past the end faults
as it does in the interpreter. The packet keeps its address (xdp_md holds it as a u32).
The BPF stack is the native stack, as in the kernel's JITs; it is one more region so that
helpers can read keys and buffers on it.

Helpers. A helper call is a ``call``/``bl`` to a two-instruction trampoline (``nop; ret``)
with a host entry on its nop (a code hook, cheaper in Unicorn than a breakpoint trap). For
map_lookup_elem (a hash map whose values the guest maps, ``hash_values``: r0 is the
value's guest address), map_update_elem, map_delete_elem, get_prandom_u32,
get_smp_processor_id and current's get_current_pid_tgid, _uid_gid, _task and _comm (into
the BPF stack; from words ``_direct_task_words`` keeps) that entry is C's
(probes/native/bpf_native.c, through ``_native_helpers``): a call from an image a thunk or
stub runs, on a hash map (elements preallocated in C) or an array map's guest window, with
its key and value on the live native stack, is served there, charged as Python charges it.
Everything else reaches the Python entry (``_on_trap``): the guest pointers in r1-r5 are
mapped back to the machine's addresses, the windows are synchronised, the existing helper
runs, and r0 comes back in the arch's return register. A call from a thunk or stub
(``_direct_trap``) first sets current from the CPU that hit; a helper that follows
pointers moves only the bytes it can touch (``_direct_helper``, ``_memory_plan``), and its
printk lines and records are delivered at once.

Optimized probes call the images from a guest thunk; plain kprobes, kprobes on ftrace
sites, kretprobes and tracepoints from a per-CPU guest stub the hit sends the guest to
(jit_direct.py), once a first hit has JITed them: no nested run, and for a thunk no host
exit at all when every helper is inlined; helper calls from a thunk or stub reach
``_direct_trap`` in the same run. In a guest each array map has one region and window for
every run (``_seed_maps``), so every program's image reaches its own maps whichever run the
host synced last; with several CPUs each CPU has its own part of the native stack. While images run that way the windows hold the array
maps' bytes: user-space lookups and updates go through them (``pull``/``push``, the maps'
MapBacking) and every run's stop reads them back. A per-CPU array has one window per CPU,
CPU c's at CPU 0's plus one offset for every such map (``_seed_percpu``), and its lookup is
inlined as the kernel's percpu_array_map_gen_lookup: the image adds this_cpu_off, a word the
JIT rewrites at every CPU switch (a per-CPU array made for fewer CPUs than the machine has
is looked up through the helper). Slots, windows and images of programs and maps that died
are given back at allocation (``_reclaim``). A snapshot restore past the JIT drops all of
it; a map it backed keeps its host bytes (``_gone``: ``is_dropped``).

The nested run (first hits, programs that need the host, aggregated probes) is kept lean: a bare nested emu_start (Machine.run's stop handling only when the image did not
come back), one Unicorn context kept for every hit, raw libunicorn register and memory
calls, windows re-mapped only when the run's regions changed and copied only when their
bytes did (``_UcFast``; ~4 µs of Python a hit beside Unicorn's ~5).

Left out (see the report in the issue): maps backed by the guest pages themselves (the
windows are copied in and out around a nested run, skipping unchanged ones; a hash value a
nested run looks up too, though thunks and stubs use C's pool mapped into the guest); native twins of the
other helpers (ktime_get_ns needs the cycle model's running block; a per-CPU array's
update, which Python serves on the hit's CPU); constant tail-call patching,
the kernel's short-branch passes. Tail calls read a guest copy of the prog array (one
lookup routine and u64 table per array, ``_tail_stub``), so in a nested run the run's
``prog`` stays the one the hit entered (the interpreter's names the target).
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import importlib
import struct
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Protocol, Union

from unicorn import UcError

from emu.owners import RegionOwner
from emu.smp import MAX_CPUS
from emu.uaccess import UserFault, copy_from_user, copy_to_user

from .disasm import format_insn
from .errors import BpfError, BpfRuntimeError
from .helpers import KERNEL_HELPERS, BpfArgType, BpfFuncProto, BpfRetType
from .interpreter import load_packet, pseudo_value, unexpected
from .isa import (
    BPF_CALL_OP, BPF_LDDW, BPF_PSEUDO_CALL, MAX_TAIL_CALL_CNT, OPCODES, U64, Insn,
    lddw_imm64,
)
from .maps import ProgArrayMap
from .memory import CTX_ADDR, MemoryFault, Region, STACK_BASE, VM_BASE
from .runtime import BpfRun, GuestFault, ProgramExit

if TYPE_CHECKING:
    from emu.machine import Machine

    from .program import BpfProg

ARCHES = ("arm64", "x86_64")
_EMITTERS = {"arm64": "probes.bpf.jit_arm64", "x86_64": "probes.bpf.jit_x86_64"}

PAGE = 0x1000
STUB_BASE = 0x0010_0000        # helper trampolines (r-x)
DATA_BASE = 0x0011_0000        # the run's data page (rw-): the tail-call counter
TEXT_BASE = 0x0020_0000        # JIT images (r-x), one after another
STUB_SIZE = 16
LOOKUP_SLOT = 64               # a prog array's tail-call lookup routine (in a guest)
MAX_TABLE_ENTRIES = 1 << 16    # larger prog arrays are read on the host (512 KiB of table)
NATIVE_STACK = 0x10000         # 64 KiB: 8 frames of 512 bytes plus saved registers
PERCPU_STACK = 0x4000          # in a guest with several CPUs: each CPU's part of the stack
TCC_ADDR = DATA_BASE           # u32 tail-call count of the run (see Tailcall in the arch JITs)
GUEST_JIT_BASE = 0x0800_0000_0000   # in a traced guest: trampolines, data, images from here
GUEST_JIT_END = 0x1000_0000_0000    # (below the map windows at 0x1000_xxxx_xxxx)
MAP_KEY_BASE = (VM_BASE >> 32) + 0x3000   # in a guest: array maps' windows from 0x3000_xxxx_xxxx
# In a guest, per-CPU array maps (see _seed_percpu): map i's copy for CPU c in the window of
# key PCPU_KEY_BASE + c * PCPU_KEYS + i, so every map's CPU-c copy is its CPU-0 copy plus
# one offset, (c * PCPU_KEYS) << 32, as the kernel's __per_cpu_offset[c] is every per-CPU
# variable's; the running CPU's offset is the u64 at PERCPU_OFF_AT in the JIT's data page.
PCPU_KEY_BASE = (VM_BASE >> 32) + 0x4000
PCPU_KEYS = 0x40                 # per-CPU array maps a machine's JIT can hold
RECLAIM_EVERY = 64               # new images between two reclaims of dead programs' images
PERCPU_OFF_AT = 0x800            # this_cpu_off (after the tail-call count and the guards)
BPF_PROBE_MEM = 0x20           # internal load modes the kernel's verifier rewrites to
BPF_PROBE_MEMSX = 0x40

_TRACE_PRINTK = 6
_POINTER_RETS = {BpfRetType.RET_PTR_TO_MAP_VALUE_OR_NULL, BpfRetType.RET_PTR_TO_RINGBUF_MEM_OR_NULL}
_MAP_HELPERS = frozenset({1, 2, 3})     # a thunk's map helpers: key and value on the stack
_MEMORY_ARGS = frozenset({BpfArgType.ARG_PTR_TO_MEM, BpfArgType.ARG_PTR_TO_UNINIT_MEM})
_PROBE_READS = frozenset({4, 45, 112, 113, 114, 115})   # r3: the source, r2 bytes
_STRING_MAX = 1024             # a %s of trace_printk read off the BPF stack
_NO_MEMORY_ARGS = {BpfArgType.ARG_ANYTHING, BpfArgType.ARG_DONTCARE, BpfArgType.ARG_CONST_SIZE,
                   BpfArgType.ARG_CONST_SIZE_OR_ZERO, BpfArgType.ARG_CONST_ALLOC_SIZE_OR_ZERO}


# --- the pieces an emitter produces ---------------------------------------------------------

@dataclass(frozen=True)
class Mark:
    """A label at the current position."""
    label: Hashable


@dataclass(frozen=True)
class Branch:
    """A branch resolved at layout time. ``op``: "jmp", "call", "jcc" (with ``cond``),
    "cbz"/"cbnz" (arm64, with ``reg``). ``target``: a label, or an int (absolute)."""
    op: str
    target: Any
    cond: str = ""
    reg: str = ""


@dataclass(frozen=True)
class Probe:
    """The next bytes are a load that may fault: an exception-table entry (as the
    kernel's ex_handler_bpf) zeroes ``dst`` and resumes after it."""
    dst: str


Piece = Union[bytes, Mark, Branch, Probe]


class Emitter(Protocol):
    """What an arch JIT provides (jit_arm64.py, jit_x86_64.py)."""

    arch: str
    reg_names: tuple[str, ...]     # machine register of BPF r0..r10, then AX
    helper_ret: str                # where a helper's result comes back (rax / x0)
    budget_reg: str                # counts the run's budget down at backward branches
    stub_code: bytes               # nop; ret (a host entry on the nop)

    def branch_size(self, b: Branch) -> int: ...
    def encode_branch(self, b: Branch, at: int, target: int) -> bytes: ...
    def return_address(self, m: "Machine") -> int: ...
    def push_return(self, m: "Machine", sp: int, ret: int) -> int: ...
    def call_size(self) -> int: ...
    def prologue(self, used: frozenset[int] = ...) -> list[Piece]: ...
    def epilogue(self, used: frozenset[int] = ...) -> list[Piece]: ...
    def insn(self, c: "InsnCtx") -> list[Piece]: ...
    def tail_lookup(self, table: int, entries: int, slow: int) -> list[Piece]: ...


def get_emitter(arch: str) -> Emitter:
    """The JIT for ``arch`` (one instance per process; emitters are stateless)."""
    if arch not in _EMITTERS:
        raise BpfError(f"no BPF JIT for arch {arch!r} (one of {', '.join(ARCHES)})")
    return importlib.import_module(_EMITTERS[arch]).EMITTER


@dataclass
class InsnCtx:
    """What an emitter needs to translate one instruction: the instruction (and the
    second slot of an lddw), labels of its jump targets, resolved constants."""
    idx: int
    insn: Insn
    kind: str
    func: int                      # first instruction of the enclosing BPF function
    value: int = 0                 # lddw: the value to load
    stub: int = 0                  # calls: trampoline address
    probe: bool = False            # a BPF_PROBE_MEM load
    used: frozenset[int] = frozenset(range(6, 10))   # callee-saved BPF regs the function uses

    def target(self, off: int) -> tuple[str, int]:
        return ("insn", self.idx + 1 + off)

    @property
    def exit_label(self) -> tuple[str, int]:
        return ("exit", self.func)


# --- the image --------------------------------------------------------------------------------

@dataclass
class JitImage:
    """A JITed program (struct bpf_prog's bpf_func and jited_linfo). Attributes: ``prog``
    (held weakly: as the kernel's bpf_jit_free, the image goes with its program),
    ``addr``, ``code``, ``insn_addr`` (BPF instruction index -> start of its code),
    ``funcs`` (BPF function start -> entry address), ``extable`` (faulting pc -> (resume
    pc, register to zero))."""
    prog_ref: "weakref.ref[BpfProg]"
    arch: str
    addr: int
    code: bytes
    insn_addr: dict[int, int]
    funcs: dict[int, int]
    extable: dict[int, tuple[int, str]] = field(default_factory=dict)
    _starts: list[tuple[int, int]] = field(default_factory=list, repr=False)

    @property
    def prog(self) -> "BpfProg":
        prog = self.prog_ref()
        if prog is None:
            raise BpfError(f"the program JITed at {self.addr:#x} was freed")
        return prog

    @property
    def entry(self) -> int:
        return self.funcs[0]

    def insn_at(self, pc: int) -> int | None:
        """The BPF instruction whose code holds ``pc`` (None: prologue/epilogue)."""
        if not self._starts:
            self._starts = sorted((a, i) for i, a in self.insn_addr.items())
        k = bisect.bisect_right(self._starts, (pc, 1 << 62)) - 1
        if k < 0 or not self.addr <= pc < self.addr + len(self.code):
            return None
        return self._starts[k][1]

    def insn_code(self, idx: int) -> tuple[int, bytes]:
        """Address and bytes of instruction ``idx``'s code (up to the next marked piece)."""
        start = self.insn_addr[idx]
        ends = [a for a in self.insn_addr.values() if a > start]
        ends += [a for a in self.funcs.values() if a > start] + [a for a in self._exits if a > start]
        end = min(ends, default=self.addr + len(self.code))
        return start, self.code[start - self.addr:end - self.addr]

    _exits: list[int] = field(default_factory=list, repr=False)


class ImageTable(dict[int, JitImage]):
    """id(program) -> its image. An entry whose program died is not found (its id may be
    another program's now) until ScratchJit._free_images frees it."""

    def __init__(self) -> None:
        super().__init__()
        self._orphans: list[tuple[int, JitImage]] = []   # dead entries a new one replaced

    def get(self, key: int, default: Any = None) -> Any:
        image = super().get(key)
        return image if image is not None and image.prog_ref() is not None else default

    def __getitem__(self, key: int) -> JitImage:
        image = self.get(key)
        if image is None:
            raise KeyError(key)
        return image

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and self.get(key) is not None

    def __setitem__(self, key: int, image: JitImage) -> None:
        old = super().get(key)
        if old is not None and old.prog_ref() is None:   # a dead program's id, reused
            self._orphans.append((key, old))
        super().__setitem__(key, image)

    def take_dead(self) -> list[tuple[int, JitImage]]:
        """Remove and return the images whose programs died."""
        dead = [(k, i) for k, i in super().items() if i.prog_ref() is None]
        for k, _i in dead:
            super().__delitem__(k)
        orphans, self._orphans = self._orphans, []
        return orphans + dead


def function_starts(insns: list[Insn]) -> list[int]:
    starts = {0}
    for i, insn in enumerate(insns):
        if insn.code == BPF_CALL_OP and insn.src_reg == BPF_PSEUDO_CALL:
            starts.add(i + 1 + insn.imm)
    return sorted(starts)


def _kind(insn: Insn) -> str:
    mode = insn.code & 0xE0
    if insn.cls == 0x01 and mode in (BPF_PROBE_MEM, BPF_PROBE_MEMSX):
        return "ldx" if mode == BPF_PROBE_MEM else "ldxsx"
    return OPCODES[insn.code].kind


@dataclass
class _InlineCtx(InsnCtx):
    """An instruction of a sequence that replaces one call (map_gen_lookup): its jumps
    land inside the sequence (("inl", call index, position))."""
    pos: int = 0

    def target(self, off: int) -> tuple[str, int, int]:  # type: ignore[override]
        return ("inl", self.idx, self.pos + 1 + off)


Inliner = Callable[[int, Insn], Union[list[Insn], None]]


def build_pieces(em: Emitter, prog: "BpfProg", resolve: Callable[[InsnCtx], None],
                 probe_mem: frozenset[int] = frozenset(),
                 inline: Inliner | None = None) -> list[Piece]:
    """The whole program as pieces: per BPF function its prologue, its instructions
    (each after a ("insn", i) mark), its epilogue after ("exit", start). Loads listed in
    ``probe_mem`` (or in the kernel-internal PROBE_MEM modes) get exception-table entries;
    a call ``inline`` gives BPF instructions for is replaced by them (as the kernel's
    verifier patches in map_gen_lookup before the JIT runs)."""
    insns, out = prog.insns, []
    starts = function_starts(insns)
    bounds = starts[1:] + [len(insns)]
    for start, end in zip(starts, bounds):
        used = callee_regs_used(insns[start:end])
        out += [Mark(("func", start)), *em.prologue(used)]
        i = start
        while i < end:
            insn = insns[i]
            out.append(Mark(("insn", i)))
            seq = inline(i, insn) if inline is not None and insn.code == BPF_CALL_OP else None
            if seq is not None:
                out += _inlined(em, i, start, seq)
                i += 1
                continue
            probe = insn.cls == 0x01 and (i in probe_mem or (insn.code & 0xE0) in (
                BPF_PROBE_MEM, BPF_PROBE_MEMSX))
            c = InsnCtx(i, insn, _kind(insn), start, probe=probe, used=used)
            resolve(c)
            out += em.insn(c)
            i += 2 if insn.code == BPF_LDDW else 1
        out += [Mark(("exit", start)), *em.epilogue(used)]
    return out


def callee_regs_used(insns: list[Insn]) -> frozenset[int]:
    """detect_reg_usage (x86 JIT): which of r6-r9 a function names, so its prologue
    saves only those."""
    return frozenset(r for insn in insns for r in (insn.dst_reg, insn.src_reg) if 6 <= r <= 9)


def _inlined(em: Emitter, idx: int, func: int, seq: list[Insn]) -> list[Piece]:
    out: list[Piece] = []
    pos = 0
    while pos < len(seq):
        insn = seq[pos]
        c = _InlineCtx(idx, insn, _kind(insn), func, pos=pos)
        if insn.code == BPF_LDDW:
            c.value = lddw_imm64(insn, seq[pos + 1])
        out += [Mark(("inl", idx, pos)), *em.insn(c)]
        if insn.code == BPF_LDDW:
            out.append(Mark(("inl", idx, pos + 1)))
            pos += 1
        pos += 1
    return out + [Mark(("inl", idx, len(seq)))]


def array_map_gen_lookup(base: int, max_entries: int, elem_size: int) -> list[Insn]:
    """kernel/bpf/arraymap.c array_map_gen_lookup: r0 = &value[*(u32 *)r2], or NULL past
    the end (r1 and r2 are the call's arguments, dead after it)."""
    from .isa import BPF_ALU64, BPF_JGE, BPF_JMP, BPF_JMP32, BPF_LSH, BPF_LDX, BPF_MEM, BPF_MUL

    scale = (Insn(BPF_ALU64 | BPF_LSH, 0, 0, 0, elem_size.bit_length() - 1)
             if elem_size & (elem_size - 1) == 0 else Insn(BPF_ALU64 | BPF_MUL, 0, 0, 0, elem_size))
    return [Insn(BPF_LDDW, 1, 0, 0, _s32(base)), Insn(0, 0, 0, 0, _s32(base >> 32)),
            Insn(BPF_LDX | BPF_MEM | 0x00, 0, 2, 0),                   # r0 = *(u32 *)r2
            Insn(BPF_JMP32 | BPF_JGE, 0, 0, 3, max_entries),           # past the end: NULL
            scale,
            Insn(BPF_ALU64 | 0x08, 0, 1),                              # r0 += r1
            Insn(BPF_JMP | 0x00, 0, 0, 1),
            Insn(BPF_ALU64 | 0xB0, 0, 0, 0, 0)]                        # r0 = 0


def percpu_array_map_gen_lookup(base: int, max_entries: int, elem_size: int,
                                this_cpu_off: int) -> list[Insn]:
    """kernel/bpf/arraymap.c percpu_array_map_gen_lookup: array_map_gen_lookup's bounds
    check and scaling on CPU 0's copy (``base``; the elements are contiguous, so the
    kernel's load of pptrs[index] is the scaling), then BPF_MOV64_PERCPU_REG: add the
    running CPU's offset, which the JITs read from this_cpu_off (here the u64 at
    ``this_cpu_off``, rewritten at every CPU switch), spliced in after ``r0 += r1``."""
    from .isa import BPF_ALU64, BPF_DW, BPF_JGE, BPF_JMP32, BPF_LDX, BPF_MEM

    seq = array_map_gen_lookup(base, max_entries, elem_size)
    add_cpu = [Insn(BPF_LDDW, 1, 0, 0, _s32(this_cpu_off)), Insn(0, 0, 0, 0, _s32(this_cpu_off >> 32)),
               Insn(BPF_LDX | BPF_MEM | BPF_DW, 1, 1, 0),              # r1 = this_cpu_off
               Insn(BPF_ALU64 | 0x08, 0, 1)]                           # r0 += r1
    bound = next(i for i, x in enumerate(seq) if x.code == BPF_JMP32 | BPF_JGE)
    at = bound + 3                      # after the scaling and r0 += r1: the ja over NULL
    jge = seq[bound]
    seq[bound] = Insn(jge.code, jge.dst_reg, jge.src_reg, jge.off + len(add_cpu), jge.imm)
    return seq[:at] + add_cpu + seq[at:]


def _value_buffers(m: Any) -> list[bytearray]:
    """An array map's value bytes: a per-CPU array's one copy per CPU."""
    from .maps import PercpuArrayMap

    return m.percpu if isinstance(m, PercpuArrayMap) else [m.values]


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def code_size(em: Emitter, pieces: list[Piece]) -> int:
    """Bytes the pieces take (every piece has a fixed size, wherever it lands)."""
    return sum(em.branch_size(p) if isinstance(p, Branch) else len(p)
               for p in pieces if isinstance(p, (Branch, bytes)))


def layout(em: Emitter, pieces: list[Piece], base: int) -> tuple[bytes, dict, dict]:
    """Two passes: label addresses (every piece has a fixed size), then the bytes."""
    labels: dict[Hashable, int] = {}
    pc = base
    for p in pieces:
        if isinstance(p, Mark):
            labels[p.label] = pc
        elif isinstance(p, Branch):
            pc += em.branch_size(p)
        elif isinstance(p, bytes):
            pc += len(p)
    code, extable, pc, probe = bytearray(), {}, base, None
    for p in pieces:
        if isinstance(p, Branch):
            target = p.target if isinstance(p.target, int) else labels[p.target]
            enc = em.encode_branch(p, pc, target)
            code += enc
            pc += len(enc)
        elif isinstance(p, Probe):
            probe = p.dst
        elif isinstance(p, bytes):
            if probe is not None:
                extable[pc] = (pc + len(p), probe)
                probe = None
            code += p
            pc += len(p)
    return bytes(code), labels, extable


# --- guest windows over the machine's regions -----------------------------------------------

@dataclass
class PercpuSlot:
    """A per-CPU array's place in a traced guest (see ScratchJit._seed_percpu): ``index``
    (its keys), ``map`` (weakly, so a dead map's slot can be reclaimed), ``regions`` (one
    per CPU, over the map's per-CPU buffers)."""
    index: int
    map: "weakref.ref[Any]"
    regions: list[Region]

    def of(self, mp: Any) -> bool:
        """Whether this is ``mp``'s slot (not a dead map's whose id ``mp`` now has)."""
        return self.map() is mp


@dataclass
class Window:
    region: Region
    gstart: int          # guest address of region.data[0]
    gpage: int           # first mapped page
    size: int            # mapped bytes
    shadow: bytes | None = None   # what the guest holds (not for the stack): skip equal writes


def _guest_base(region: Region) -> tuple[int, int]:
    """(first page, guest address of the data) for a region."""
    span = (len(region.data) + PAGE - 1) & ~(PAGE - 1)
    if region.base & VM_BASE:
        page = region.base & ~VM_BASE
        return page, page + ((span - len(region.data)) & ~15)
    return region.base & ~(PAGE - 1), packet_guest_addr(region.base, len(region.data))


def packet_guest_addr(vm_addr: int, size: int) -> int:
    """Where a packet's bytes sit in the guest: ending exactly at a page end, so a load
    past data_end faults (the context's data/data_end are built with this address)."""
    span = (size + PAGE - 1) & ~(PAGE - 1)
    return (vm_addr & ~(PAGE - 1)) + span - size


def _returned() -> Any:
    from emu.machine import RunResult, StopReason
    return RunResult(StopReason.HALT, 0, "returned")


_RETURNED = _returned()


@dataclass
class _Pending:
    error: BaseException | None = None
    exit_r0: int | None = None


class _UcFast:
    """Raw libunicorn calls for the per-hit path, where each binding call costs ~1 µs of a
    hit worth a few: one Unicorn context kept for every hit (the binding's context_save
    allocates and wraps a new one each time), the image's entry registers (r1, r2, the
    budget, sp) in one uc_reg_write_batch, and guest memory reads and writes."""

    def __init__(self, uc: Any, entry_ids: list[int]) -> None:
        from emu.ucfast import raw_lib as lib

        self.uc, self._uch = uc, uc._uch
        self._ctx = uc.context_save()        # allocated once; freed with this object
        self._raw_ctx = self._ctx.context
        self._save, self._restore = lib.uc_context_save, lib.uc_context_restore
        self._read, self._write = lib.uc_mem_read, lib.uc_mem_write
        self._bufs: dict[int, Any] = {}
        n = len(entry_ids)
        self._batch, self._n = lib.uc_reg_write_batch, ctypes.c_int(n)
        self._ids = (ctypes.c_int * n)(*entry_ids)
        self._vals = (ctypes.c_uint64 * n)()
        size = ctypes.sizeof(ctypes.c_uint64)
        self._ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(self._vals) + i * size
                                             for i in range(n)])

    def save(self) -> None:
        if self._save(self._uch, self._raw_ctx):
            raise BpfError("uc_context_save failed")

    def restore(self) -> None:
        if self._restore(self._uch, self._raw_ctx):
            raise BpfError("uc_context_restore failed")

    def write_entry(self, *values: int) -> None:
        vals = self._vals
        for i, v in enumerate(values):
            vals[i] = v & U64
        if self._batch(self._uch, self._ids, self._ptrs, self._n):
            raise BpfError("uc_reg_write_batch failed")

    def read(self, addr: int, size: int) -> bytes:
        buf = self._bufs.get(size)
        if buf is None:
            buf = self._bufs[size] = ctypes.create_string_buffer(size)
        if self._read(self._uch, ctypes.c_uint64(addr), buf, ctypes.c_uint64(size)):
            return bytes(self.uc.mem_read(addr, size))     # raises the binding's UcError
        return buf.raw

    def write(self, addr: int, data: bytes) -> None:
        if self._write(self._uch, ctypes.c_uint64(addr), data, ctypes.c_uint64(len(data))):
            self.uc.mem_write(addr, data)                  # raises the binding's UcError


class _RegBatch:
    """Registers read in one raw uc_reg_read_batch (a binding or ctypes call per register
    costs ~0.4 µs): a helper trap from guest code reads the return address and r1-r5."""

    def __init__(self, uc: Any, ids: list[int]) -> None:
        from emu.ucfast import raw_lib as lib

        n = len(ids)
        self.uc, self._uch, self._fn = uc, uc._uch, lib.uc_reg_read_batch
        self._ids, self._n = (ctypes.c_int * n)(*ids), ctypes.c_int(n)
        self._vals = (ctypes.c_uint64 * n)()
        size = ctypes.sizeof(ctypes.c_uint64)
        self._ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(self._vals) + i * size
                                             for i in range(n)])

    def read(self) -> list[int]:
        if self._fn(self._uch, self._ids, self._ptrs, self._n):
            raise BpfError("uc_reg_read_batch failed")
        return self._vals[:]


class ScratchJit:
    """A scratch machine of one arch that holds JIT images and runs them.

    ``compile(prog)`` JITs a program (bpf_int_jit_compile); ``run(prog, ctx, env)``
    runs it like ``BpfProg.run``. Attributes: ``machine``, ``emitter``, ``images``
    (id(prog) -> JitImage), ``cycles`` (modelled cycles of the last run, with
    ``cycle_profile``)."""

    def __init__(self, arch: str, cycle_profile: str | None = None,
                 machine: "Machine | None" = None) -> None:
        from emu.machine import Machine
        from emu.memory import PROT_EXEC, PROT_READ, PROT_WRITE

        self.emitter = get_emitter(arch)
        self.arch = arch
        # in_guest: the images live in the traced machine's own pages and run on its CPU
        self.in_guest = machine is not None
        self.machine = m = machine if machine is not None else Machine(arch)
        self.images = ImageTable()
        self._new_images = 0             # images made: every RECLAIM_EVERY-th reclaims first
        self._image_text: dict[int, tuple[int, Any]] = {}   # image addr -> (mapped size, symbol)
        self.stubs: dict[Hashable, int] = {}
        self._native: Any = False        # NativeHelpers, None (Python's), False (not asked yet)
        self._stub_fns: dict[int, Callable[[int], None]] = {}
        self.stub_base = self._free_span(GUEST_JIT_BASE, 2 * PAGE) if self.in_guest else STUB_BASE
        self.tcc_addr = self.stub_base + PAGE
        self._text_end = self.stub_base + 2 * PAGE if self.in_guest else TEXT_BASE
        self.windows: dict[int, Window] = {}     # guest key (addr >> 32) -> window
        self._by_vm_key: dict[int, Window] = {}
        self._by_buffer: dict[int, Window] = {}     # id(region bytes) -> window (MapBacking)
        self._window_regions: set[int] = set()       # id() of each window's region
        # in a guest: one region (and window) per array map for every run, so that the
        # images of every program, called from stubs with no host sync, each reach their
        # own maps (id(values) -> (values, region); the keys after MAP_KEY_BASE)
        self._map_regions: dict[int, tuple[bytearray, Region]] = {}
        self._persistent: set[int] = set()           # id() of those regions
        # per-CPU array maps: their slots by index (the map weakly, a region per CPU), and
        # id(map) -> its slot (an entry of a dead map whose id was reused: not its slot)
        self._percpu_slots: dict[int, PercpuSlot] = {}
        self._percpu_regions: dict[int, PercpuSlot] = {}
        self._percpu_off_kept = False     # this_cpu_off written at every CPU switch
        self.run_state: BpfRun | None = None
        self._stack: Region | None = None
        self.inline_maps = True          # array lookups as map_gen_lookup (False: helper)
        self._plans: dict[tuple[int, int], tuple[tuple[int, ...], bool, bool]] = {}
        self._ret_id = m.arch.reg_id(self.emitter.helper_ret)
        names = self.emitter.reg_names
        self._entry_ids = [m.arch.reg_id(n) for n in (names[1], names[2],
                                                      self.emitter.budget_reg, m.arch.sp)]
        self.cycles = 0
        self._executing = False         # inside execute (else a trap comes from a thunk)
        self._direct = False            # serving a thunk's helper call
        self._call_sites: dict[int, JitImage] = {}   # helper call pc -> its image
        self._tail_root: dict[int, "BpfProg"] = {}   # id(tail call target) -> JITed under
        # trampolines with an entry of their own from a thunk (the budget, tail calls)
        self._direct_fns: dict[int, Callable[[int], None]] = {}
        self._tail_ids: tuple[int, ...] | None = None   # r2, r3, AX
        # in a guest: id(prog array) -> (map, its lookup routine, its table of entries)
        # prog array id -> (the array, its lookup routine, its table, the entries written)
        self._tail_tables: dict[int, tuple[ProgArrayMap, int, int, dict[int, int]]] = {}
        self._ptr_masks: dict[int, tuple[bool, ...]] = {}     # _pointer_args, per proto
        self._lookup_free: list[int] = []
        self._table_space: tuple[int, int] = (0, 0)     # next free table byte, end
        self._hash_bases: dict[int, tuple[Any, int]] = {}   # id(map) -> (map, values' address)
        self._pending = _Pending()
        self._fast: _UcFast | None = None
        self._trace: Any = None          # the machine's BpfTrace (a direct helper call's task)
        self._mem_plans: dict[int, tuple[tuple[int, int, bool, bool], ...]] = {}
        # program -> its kept run, for helper calls from optprobe thunks (set by ProbeJit)
        self.direct_run: Callable[["BpfProg"], BpfRun | None] | None = None
        # whether the windows hold the maps' values now (the JIT engine runs the programs),
        # and whether a snapshot restore took the machine back past this JIT (set by ProbeJit)
        self.is_current: Callable[[], bool] = lambda: True
        self.is_dropped: Callable[[], bool] = lambda: False
        self._map(self.stub_base, PAGE, PROT_READ | PROT_EXEC, "[bpf jit trampolines]", True)
        self._map(self.tcc_addr, PAGE, PROT_READ | PROT_WRITE, "[bpf jit data]", False)
        # named as kallsyms names BPF trampolines (a run's end is described by its symbol)
        m.symbols.add("bpf_jit_trampolines", self.stub_base, PAGE)
        self.return_addr = self._stub("return", lambda addr: None)
        self.model = None
        if cycle_profile is not None:      # "default": the arch's default profile
            self.model = m.enable_cycle_model(None if cycle_profile == "default" else cycle_profile)

    def _free_span(self, lo: int, size: int) -> int:
        """In the traced guest: the first free range at or above ``lo`` (deterministic)."""
        addr = self.machine.memory.find_free(size, lo, GUEST_JIT_END)
        if addr is None:
            raise BpfError(f"no room in the guest's address space for {size:#x} bytes of BPF JIT")
        return addr

    def _map(self, addr: int, size: int, prot: int, name: str, text: bool) -> None:
        """Map pages of the JIT's own, claimed as the BPF layer's: a guest cannot unmap
        or replace them, and probes refuse them (the kernel blacklists BPF images)."""
        from emu.memory import MemoryLimit

        try:
            self.machine.memory.map(addr, size, prot, name)
        except MemoryLimit as e:
            raise BpfError(f"no room for {name} ({e.mapped} of {e.limit} bytes mapped)") from None
        except Exception as e:   # Unicorn: the range is taken by the guest
            raise BpfError(f"{name} at {addr:#x}: the guest already maps it ({e})") from None
        if text or self.in_guest:
            self.machine.claim_text(addr, size, RegionOwner.BPF, name)

    # -- trampolines --
    def _stub(self, key: Hashable, fn: Callable[[int], None]) -> int:
        addr = self.stubs.get(key)
        if addr is None:
            addr = self.stub_base + len(self.stubs) * STUB_SIZE
            if addr + STUB_SIZE > self.stub_base + PAGE:
                raise BpfError("too many distinct helpers for the JIT's trampoline page")
            self.stubs[key] = addr
            self.machine.text_poke(addr, self.emitter.stub_code)
            self._stub_fns[addr] = fn
            # a host entry (a code hook on the stub's nop), not a trap: Unicorn takes a
            # breakpoint through its exception path, several µs more per helper call
            handle = self.machine.add_host_entry(addr, self._on_trap)
            if isinstance(key, tuple) and key[0] == "helper":
                native = self._native_helpers()
                if native is not None:
                    native.serve(handle, key[1])
        return addr

    def _native_helpers(self) -> Any:
        """The C entries of this JIT's helper trampolines (probes/native/bpf_native.py),
        made once; None in a scratch machine, without the C library or a native clock."""
        if not self.in_guest:
            return None
        if self._native is False:
            from probes.native.bpf_native import NativeHelpers

            m, em = self.machine, self.emitter
            top = self.stack_top
            self._native = NativeHelpers.create(
                m, [m.arch.reg_id(r) for r in em.reg_names[1:6]], self._ret_id,
                em.call_size(), (top - NATIVE_STACK, top))
        return self._native

    def _array_window(self, m: Any) -> int | None:
        """Where an array map's values are while images run (its MapBacking window)."""
        w = self._by_buffer.get(id(m.values))
        return w.gstart if w is not None and w.size and m.backing is self else None

    def _value_base(self, m: Any) -> int | None:
        """Guest address of a map's values for C's helpers: an array map's window, or a
        C-held hash map's values (mapped on first use, ``hash_values``)."""
        from .maps import HashMap

        if isinstance(m, HashMap):
            return self.hash_values(m)
        return self._array_window(m)

    def hash_values(self, m: Any) -> int | None:
        """In a traced guest: the guest address of a C-held hash map's values, whose pages
        are mapped here (rw-, claimed as the BPF layer's) on first use and stay mapped
        with the map kept alive; element slot s, CPU c is at base + (s*ncpus + c)*vstride.
        None: not in a guest, or the map keeps Python storage."""
        from emu.memory import PROT_READ, PROT_WRITE

        native = getattr(m, "native", None)
        if not self.in_guest or native is None or native.values_mm is None:
            return None
        got = self._hash_bases.get(id(m))
        if got is None:
            size = len(native.values_mm)
            addr = self._free_span(self.stub_base, size)
            self.machine.memory.map_host(addr, size, PROT_READ | PROT_WRITE, "[bpf htab values]",
                                         native.values_addr)
            self.machine.claim_text(addr, size, RegionOwner.BPF, "[bpf htab values]")
            got = self._hash_bases[id(m)] = (m, addr)
        return got[1]

    def _direct_lookup(self, run: Any, args: list[int]) -> int | None:
        """map_lookup_elem from a thunk or stub on a hash map the guest maps: the guest
        address of the value (C declined: no C entry, or the key is not on the stack), or
        None for the generic helper."""
        mp = run.map_at(args[0])
        base = self.hash_values(mp) if mp is not None else None
        if base is None:
            return None
        key = run.mem.read(args[1], mp.key_size)
        ncpus, cpu = mp._cpus(), run.env.cpu
        if mp.percpu and not 0 <= cpu < ncpus:
            return 0                    # BpfRun.map_value_ptr: no value for this CPU
        slot = mp.native.find(key, mp.lru)
        cpu = 0 if ncpus == 1 else cpu
        return 0 if slot < 0 else base + (slot * ncpus + cpu) * mp.native.h.vstride

    @property
    def _executing(self) -> bool:
        """Inside ``execute`` (a nested run: Python serves every helper there)."""
        return self._in_execute

    @_executing.setter
    def _executing(self, on: bool) -> None:
        self._in_execute = on
        native = self.__dict__.get("_native")
        if native:
            native.set_executing(on)

    def _on_trap(self, addr: int) -> None:
        # A helper's body is host code: charged as a host handler (a modelling choice).
        self.machine.clock.advance(self.machine.clock.handler_cost, "bpf helper")
        if self._executing:
            self._stub_fns[addr](addr)
        else:
            self._direct_fns.get(addr, self._direct_trap)(addr)

    def _direct_trap(self, addr: int) -> None:
        """A helper trampoline reached from an optprobe thunk's call (jit_direct.py), not
        from ``execute``: the calling program's kept run serves it (the thunk runs the
        image on the same native stack window), and a failure is the program's error,
        raised as the host path raises it. The hot path of every helper C does not serve:
        what depends only on the trampoline or the call site is worked out once."""
        regs = self._direct_regs().read()
        image, run = self._direct_caller(addr, regs[0])
        native = self._native
        if native:                  # later calls from this image: C's (bpf_native.c)
            native.register(image, run, self._value_base)
        saved, self.run_state, self._pending = self.run_state, run, _Pending()
        # current is the task on the CPU that hit, not the last host hit's
        trace = self._trace
        if trace is None:
            from probes.trace.bpf_trace import bpf_trace_of
            trace = self._trace = bpf_trace_of(self.machine)
        env = trace.current_task(run.env)
        if native and not native.jit.task_valid:
            self._direct_task_words(trace, env)
        fid, site, record = self._direct_kind(addr)
        if site:
            self._direct_site(run, image.prog)
        self._direct = True
        try:
            self._direct_call(fid, addr, run, regs)
        finally:
            self._direct, self.run_state = False, saved
        if env.trace_printk or record:
            trace.deliver()
        pending = self._pending
        if pending.error is not None or pending.exit_r0 is not None:
            from probes.trace.bpf_trace import BpfTraceError
            err = pending.error
            reason = str(err) if err is not None else "bpf_exit from a thunk"
            raise BpfTraceError(image.prog.name or image.prog.section, reason)

    def _direct_caller(self, addr: int, word: int) -> tuple[JitImage, BpfRun]:
        """The image whose call reached a trampoline (by its call site, remembered) and
        the kept run that serves it; ``word``: the link register, or without one sp (the
        return address is the word there)."""
        ret: int | None = word
        if not self.machine.arch.link:
            try:
                ret = int(self.machine.regs.read_u64(word))
            except ValueError:
                ret = None
        image = self._image_at(ret - self.emitter.call_size()) if ret is not None else None
        run = self._direct_run_of(image.prog) if image is not None else None
        if image is None or run is None:
            from probes.trace.bpf_trace import BpfTraceError
            raise BpfTraceError("?", f"helper trampoline {addr:#x} reached outside a run")
        return image, run

    def _image_at(self, call: int) -> JitImage | None:
        """The image whose code holds the call at ``call`` (remembered per call site)."""
        image = self._call_sites.get(call)
        if image is None:
            image = next((i for i in self.images.values() if i.insn_at(call) is not None), None)
            if image is not None:
                self._call_sites[call] = image
        return image

    def _direct_regs(self) -> "_RegBatch":
        """One raw uc_reg_read_batch of the link register (sp without one) and r1-r5 on
        the running CPU, made again when the machine runs on another Unicorn."""
        batch = self.__dict__.get("_reg_batch")
        m = self.machine
        if batch is None or batch.uc is not m.uc:
            arch, names = m.arch, self.emitter.reg_names
            ids = [arch.reg_id(arch.link or arch.sp)] + [arch.reg_id(r) for r in names[1:6]]
            batch = self._reg_batch = _RegBatch(m.uc, ids)
        return batch

    def _direct_kind(self, addr: int) -> tuple[int | None, bool, bool]:
        """A trampoline's helper id (None: not a helper's), whether it is one of
        jit_direct's SITE_HELPERS and of its RECORD_HELPERS; worked out again only when a
        trampoline was added."""
        kinds = self.__dict__.get("_kinds")
        if kinds is None or kinds[0] != len(self.stubs):
            from . import jit_direct

            rows = {a: (k[1], k[1] in jit_direct.SITE_HELPERS, k[1] in jit_direct.RECORD_HELPERS)
                    for k, a in self.stubs.items() if isinstance(k, tuple) and k[0] == "helper"}
            kinds = self._kinds = (len(self.stubs), rows)
        return kinds[1].get(addr, (None, False, False))

    def _direct_call(self, fid: int | None, addr: int, run: BpfRun, regs: list[int]) -> None:
        """The trampoline's host function; a helper that follows pointers straight to
        ``_direct_helper`` with r1-r5 as read (what ``_call_helper`` would decide, without
        its way there)."""
        proto = run.prog.helpers.get(fid) if fid is not None else None
        if proto is not None:
            ids, touches, _ptr = self._plan(proto, fid)          # type: ignore[arg-type]
            if touches and fid not in _MAP_HELPERS:
                return self._direct_helper(proto, addr, ids, regs[1:1 + len(ids)])
        self._stub_fns[addr](addr)
        return None

    def _direct_task_words(self, trace: Any, env: Any) -> None:
        """current's words for C's get_current_* (bpf_native.c), from the environment
        ``trace.current_task`` has just set, and kept at every CPU switch from then on."""
        native = self._native
        native.set_task(env)
        if native.task_source is None:
            native.task_source = functools.partial(trace.current_task, env)

    def _direct_site(self, run: BpfRun, prog: "BpfProg") -> None:
        """func_ip and the attach cookie of the event whose thunk or stub called ``prog``."""
        from .jit_direct import direct_calls_of

        dc = direct_calls_of(self.machine)
        site = dc.site_of(prog) if dc is not None else None
        if site is not None:
            run.env.func_ip, run.env.attach_cookie = site

    def _direct_run_of(self, prog: "BpfProg") -> BpfRun | None:
        """The kept run that serves ``prog``'s helper calls from a thunk: its own, or for a
        tail call's target the run of the program it was JITed under (whose map handles
        its image holds), as a tail call goes on in its caller's run."""
        if self.direct_run is None:
            return None
        run = self.direct_run(prog)
        root = self._tail_root.get(id(prog))
        return run if run is not None or root is None else self.direct_run(root)

    # -- compiling --
    def compile(self, prog: "BpfProg", probe_mem: frozenset[int] = frozenset()) -> JitImage:
        """JIT ``prog`` into this machine (once); see ``_compile``."""
        image = self.images.get(id(prog))
        if image is None:
            self._new_images += 1
            if self._new_images % RECLAIM_EVERY == 0:
                self._reclaim()
        if image is None and self.in_guest:
            # the layout is done for an address; in a guest that must be a free one
            pieces = build_pieces(self.emitter, prog, self._resolve, probe_mem,
                                  self._inliner(prog) if self.inline_maps else None)
            size = (code_size(self.emitter, pieces) + PAGE - 1) & ~(PAGE - 1)
            self._text_end = self._free_span(self._text_end, size or PAGE)
        return self._compile(prog, probe_mem)

    def _compile(self, prog: "BpfProg", probe_mem: frozenset[int] = frozenset()) -> JitImage:
        """JIT ``prog`` into this machine (once). ``probe_mem``: indices of loads the
        kernel's verifier would have turned into BPF_PROBE_MEM (loads through untrusted
        pointers): a fault there zeroes the destination and execution goes on."""
        image = self.images.get(id(prog))
        if image is not None:
            return image
        prog.ensure_loaded()
        pieces = build_pieces(self.emitter, prog, self._resolve, probe_mem,
                              self._inliner(prog) if self.inline_maps else None)
        code, labels, extable = layout(self.emitter, pieces, self._text_end)
        image = self._install(prog, code, labels, extable)
        self.images[id(prog)] = image
        return image

    def _install(self, prog: "BpfProg", code: bytes, labels: dict, extable: dict) -> JitImage:
        from emu.memory import PROT_EXEC, PROT_READ

        base = self._text_end
        size = (len(code) + PAGE - 1) & ~(PAGE - 1) or PAGE
        m = self.machine
        self._map(base, size, PROT_READ | PROT_EXEC, "[bpf jit]", True)
        m.text_poke(base, code)
        self._text_end = base + size
        name = prog.name or "prog"
        sym = m.symbols.add(f"bpf_prog_{name}", base, len(code))   # as kallsyms names BPF images
        self._image_text[base] = (size, sym)
        named = {k: v for k, v in labels.items() if isinstance(k, tuple)}
        image = JitImage(weakref.ref(prog), self.arch, base, code,
                         {k[1]: v for k, v in named.items() if k[0] == "insn"},
                         {k[1]: v for k, v in named.items() if k[0] == "func"}, extable)
        image._exits = [v for k, v in named.items() if k[0] == "exit"]
        return image

    def _reclaim(self) -> None:
        """Give back what dead programs and maps held: their images and per-CPU slots. Done
        at allocation (every RECLAIM_EVERY-th new image, or with every per-CPU slot taken),
        never from a finalizer in the middle of a run, and after a garbage collection
        (programs sit in reference cycles: their verifier state), so what is freed, and
        which addresses are free after it, does not hang on when the collector last ran."""
        import gc

        gc.collect()
        self._free_images()
        self._reclaim_percpu()

    def _free_images(self) -> None:
        """bpf_jit_free for the images whose programs died: text unmapped, symbol dropped.
        Their addresses are not handed out again, so a pc cached anywhere finds no other
        program's code."""
        dead = self.images.take_dead()
        if not dead:
            return
        m = self.machine
        for key, image in dead:
            if key not in self.images:          # (its id may be another program's next)
                self._tail_root.pop(key, None)
            size, sym = self._image_text.pop(image.addr)
            m.memory.unmap(image.addr, size)
            m.owners.release(image.addr, size)
            m.symbols.remove(sym)
        gone = {id(image) for _k, image in dead}
        self._call_sites = {pc: i for pc, i in self._call_sites.items() if id(i) not in gone}
        if self._native:
            self._native.invalidate()     # C's registrations name the freed images' maps

    def _resolve(self, c: InsnCtx) -> None:
        """Constants and trampolines an instruction needs, as the kernel's JIT resolves
        them from the verifier's env (map addresses, helper addresses)."""
        run = self.run_state
        if c.kind == "lddw":
            assert run is not None
            second = self._cur.insns[c.idx + 1]
            value = pseudo_value(run, self._cur, c.insn, second, c.idx)
            c.value = self.to_guest(value) if c.insn.src_reg else value
        elif c.kind == "call" and c.insn.src_reg == 0:
            fid = c.insn.imm
            if fid == 12:          # BPF_FUNC_tail_call: inlined (emit_bpf_tail_call_indirect)
                c.kind = "tail_call"
                c.stub = self._tail_stub(c)
                c.value = self.tcc_addr
            else:
                c.stub = self._stub(("helper", fid), self._helper_trap(fid))
        elif c.kind in ("jmp", "jmp32", "ja", "ja32"):
            off = c.insn.imm if c.kind == "ja32" else c.insn.off
            if off < 0:
                c.stub = self._stub("budget", self._on_budget)
                self._direct_fns[c.stub] = self._on_budget
        elif c.kind == "callx":
            c.stub = self._stub("callx", self._on_callx)
        elif c.kind in ("ldabs", "ldind"):
            size = {0x00: 4, 0x08: 2, 0x10: 1}[c.insn.size]
            c.stub = self._stub(("ld_abs", size), self._ld_abs_trap(size))

    def _inliner(self, prog: "BpfProg") -> Inliner:
        """map_lookup_elem on a plain array map whose lddw reaches the call in a straight
        line becomes array_map_gen_lookup (the values are in guest memory already), on
        a per-CPU array percpu_array_map_gen_lookup."""
        from .maps import ArrayMap, PercpuArrayMap

        insns = prog.insns
        targets = _jump_targets(insns)
        lookup = KERNEL_HELPERS.get(1)

        def inline(idx: int, insn: Insn) -> list[Insn] | None:
            if insn.src_reg != 0 or insn.imm != 1 or prog.helpers.get(1) is not lookup:
                return None
            m = _map_in_r1(prog, insns, targets, idx)
            if type(m) is PercpuArrayMap:
                return self._percpu_lookup(m)
            if type(m) is not ArrayMap or self.run_state is None:
                return None
            base = self.to_guest(self.run_state.global_data_ptr(m, 0))
            return array_map_gen_lookup(base, m.max_entries, m.elem_size)
        return inline

    def _percpu_lookup(self, m: Any) -> list[Insn] | None:
        """percpu_array_map_gen_lookup for a per-CPU array whose copies _seed_percpu
        placed (one for every CPU the machine has; else the helper answers, NULL on a CPU
        the map has no value for)."""
        slot = self._percpu_regions.get(id(m))
        if slot is None or not slot.of(m) or len(slot.regions) < max(self.machine.nr_cpus, 1):
            return None
        base = self.to_guest(slot.regions[0].base)
        return percpu_array_map_gen_lookup(base, m.max_entries, m.elem_size,
                                           self.percpu_off_addr)

    # -- the run --
    def prepare(self, prog: "BpfProg", ctx: bytearray, env: Any,
                packet: bytes | bytearray | None,
                probe_mem: frozenset[int] = frozenset()) -> BpfRun:
        """A new run (BpfRun) of ``prog`` on this machine: its regions mapped, the
        program and every program it can tail-call compiled (once per machine)."""
        run = BpfRun(prog, ctx, env, packet)
        if self._stack is None:           # one native stack for every run: it stays mapped
            self._stack = Region(STACK_BASE, bytearray(self._stack_size()), True, "jit stack")
        run.mem.add(self._stack)
        self.run_state = run
        if self.in_guest:
            self._seed_maps(run, prog)
        for p in _reachable(prog):
            run.bind_maps(p)
        self.sync_windows(stack=not self.in_guest)   # in a guest, sp is the guest's yet
        for p in _reachable(prog):
            self._cur = p
            if p is not prog and id(p) not in self.images:
                self._tail_root[id(p)] = prog       # its helpers' run on the direct path
            self.compile(p, probe_mem if p is prog else frozenset())
            if self.in_guest:       # user-space reads and writes see the guest's bytes
                for mp in p.maps.values():
                    if id(getattr(mp, "values", None)) in self._by_buffer:
                        mp.backing = self
        return run

    def _seed_maps(self, run: BpfRun, prog: "BpfProg") -> None:
        """Give the run this machine's one region per array map (bind_maps then finds
        them): keys per run would put two programs' maps at one window address, and
        the images called from stubs would reach whichever run was synced last."""
        from .maps import ArrayMap, PercpuArrayMap

        for p in _reachable(prog):
            for fd in sorted(p.maps):
                mp = p.maps[fd]
                if type(mp) is PercpuArrayMap:
                    self._seed_percpu(run, mp)
                if type(mp) is not ArrayMap:
                    continue
                got = self._map_regions.get(id(mp.values))
                if got is None or got[0] is not mp.values:
                    key = MAP_KEY_BASE + len(self._map_regions)
                    region = Region(key << 32, mp.values, mp.prog_writable, mp.name)
                    got = self._map_regions[id(mp.values)] = (mp.values, region)
                    self._persistent.add(id(region))
                _give_region(run, got[1])

    def _seed_percpu(self, run: BpfRun, mp: Any) -> None:
        """A per-CPU array's copies, CPU c's in the window of key PCPU_KEY_BASE +
        c * PCPU_KEYS + i (its slot i on this machine): the same offset from CPU 0's copy
        for every map, as the kernel's per-CPU areas. Given to every run, so the helper's
        map_value_ptr names the same bytes the inlined lookup reaches."""
        slot = self._percpu_regions.get(id(mp))
        if slot is None or not slot.of(mp):
            slot = self._percpu_slot(mp)
        for region in slot.regions:
            _give_region(run, region)

    def _percpu_slot(self, mp: Any) -> "PercpuSlot":
        """A new slot for ``mp``: the lowest free index; when every index is taken, the
        slots of maps that died are reclaimed first (``_reclaim``)."""
        if len(mp.percpu) > MAX_CPUS:
            raise BpfError(f"per-CPU array {mp.name!r}: {len(mp.percpu)} CPUs, the JIT's "
                           f"per-CPU windows hold {MAX_CPUS} at most")
        if len(self._percpu_slots) >= PCPU_KEYS:
            self._reclaim()
        i = next((k for k in range(PCPU_KEYS) if k not in self._percpu_slots), None)
        if i is None:
            raise BpfError(f"per-CPU array {mp.name!r}: no room for its copies in the guest "
                           f"({PCPU_KEYS} live per-CPU arrays at most)")
        regions = [Region((PCPU_KEY_BASE + c * PCPU_KEYS + i) << 32, buf, mp.prog_writable,
                          mp.name) for c, buf in enumerate(mp.percpu)]
        slot = self._percpu_slots[i] = self._percpu_regions[id(mp)] = \
            PercpuSlot(i, weakref.ref(mp), regions)
        self._persistent.update(id(r) for r in regions)
        self._keep_percpu_off()
        return slot

    def _reclaim_percpu(self) -> None:
        """Free the slots of per-CPU arrays that died (the kernel frees a map's per-CPU
        areas with it): their windows unmapped, their regions no longer kept."""
        dead = [i for i, slot in self._percpu_slots.items() if slot.map() is None]
        gone: set[int] = set()
        for i in dead:
            gone.update(id(r) for r in self._percpu_slots.pop(i).regions)
        self._percpu_regions = {k: slot for k, slot in self._percpu_regions.items()
                                if slot.map() is not None}
        if gone:
            self._drop_windows(gone)
            self._persistent -= gone

    def _drop_windows(self, regions: set[int]) -> None:
        """Unmap the windows over these regions (id()s) and forget them; C's array windows
        are looked up again."""
        m = self.machine
        for key, w in list(self.windows.items()):
            if id(w.region) in regions:
                if w.size:
                    m.memory.unmap(w.gpage, w.size)
                    m.owners.release(w.gpage, w.size)
                del self.windows[key]
        self._by_vm_key = {w.region.base >> 32: w for w in self.windows.values()}
        self._window_regions = {id(w.region) for w in self.windows.values()}
        self._by_buffer = {id(w.region.data): w for w in self.windows.values()}
        if self._native:
            self._native.invalidate()

    @property
    def percpu_off_addr(self) -> int:
        """The u64 this_cpu_off: the running CPU's per-CPU offset (see _seed_percpu)."""
        return self.tcc_addr + PERCPU_OFF_AT

    def _keep_percpu_off(self) -> None:
        if not self._percpu_off_kept:
            self._percpu_off_kept = True
            self.machine.cpu_listeners.append(self._set_percpu_off)
            self._set_percpu_off(self.machine.cpu)

    def _set_percpu_off(self, cpu: int) -> None:
        self.machine.memory.write(self.percpu_off_addr,
                                  ((cpu * PCPU_KEYS) << 32).to_bytes(8, "little"))

    def _stack_size(self) -> int:
        """The native stack: with several CPUs each has its own PERCPU_STACK of it, as
        each kernel CPU runs its programs on its own stack (the scheduler ends no turn
        inside probe-layer text today, so this is the kernel's layout, not yet a need)."""
        cpus = self.machine.nr_cpus if self.in_guest else 1
        return max(NATIVE_STACK, PERCPU_STACK * cpus)

    @property
    def stack_top(self) -> int:
        """Top of the native stack window the images run on (CPU 0's part)."""
        size = len(self._stack.data) if self._stack is not None else self._stack_size()
        return (STACK_BASE & ~VM_BASE) + size

    def stack_top_of(self, cpu: int) -> int:
        """Top of CPU ``cpu``'s part of the native stack."""
        return self.stack_top - PERCPU_STACK * cpu

    # -- MapBacking: an array map's values while their window holds them --
    def _gone(self, m: Any) -> bool:
        """Whether the map's host bytes are the ones to use: another engine runs the
        programs (its helpers write the host bytes, which the next hit under the JIT copies
        out), or a snapshot restore took the machine back past this JIT (its windows are
        unmapped, their addresses maybe another JIT's: the map drops this backing). Every
        run's stop brought the host bytes up to date."""
        if self.is_current():
            return False
        if self.is_dropped():
            m.backing = None
        return True

    def pull(self, m: Any) -> None:
        """The guest's bytes of ``m`` into the map, where an image wrote them since the last
        sync (else the map's own are newer: another engine's runs, a user update)."""
        if self._gone(m):
            return
        for buf in _value_buffers(m):
            w = self._by_buffer.get(id(buf))
            if w is not None:
                self._window_in(w.gstart)

    def push(self, m: Any) -> None:
        if self._gone(m):
            return
        for buf in _value_buffers(m):
            w = self._by_buffer.get(id(buf))
            if w is not None and w.size:
                data = bytes(buf)
                self.machine.uc.mem_write(w.gstart, data)
                w.shadow = data

    def prepare_reuse(self, prog: "BpfProg", ctx: bytearray, env: Any) -> BpfRun:
        """``prepare`` for a program that runs on every hit: the run state is kept and
        ``rerun`` restarts it, so its windows stay mapped (BpfRun.prepare_reuse's contract,
        without its BPF stack frame: the JIT's native stack is the program's stack)."""
        run = self.prepare(prog, ctx, env, None)
        mem = run.mem
        run._root, run._ctx_region = prog, mem.regions[CTX_ADDR >> 32]
        run._static = (dict(mem.regions), dict(mem._by_buffer), mem._next_key)
        return run

    def rerun(self, run: BpfRun, ctx: bytearray) -> BpfRun:
        """The next hit of a kept run: what the last one added is dropped, bytes go out."""
        run.reset(ctx)
        self.run_state = run
        if self._windows_match(run):     # the usual hit: the same regions as the last one
            self.sync_out(stack=False)
        else:
            self.sync_windows(stack=False)
        return run

    def _windows_match(self, run: BpfRun) -> bool:
        """Whether every region of ``run`` has its window and no window is left over."""
        regions, windows = run.mem.regions, self._window_regions
        if not all(id(r) in windows for r in regions.values()):
            return False
        others = sum(1 for w in self.windows.values() if id(w.region) in self._persistent
                     and regions.get(w.region.base >> 32) is not w.region)
        return len(regions) + others == len(windows)

    def execute(self, prog: "BpfProg", run: BpfRun, r1: int, r2: int) -> int:
        """Call the image as the kernel's bpf_prog_run does: r1 = ctx, r2 = its length."""
        m, em = self.machine, self.emitter
        image = self.images[id(prog)]
        self._executing = True
        try:
            if self.in_guest:   # the traced CPU runs the image: its state comes back after
                cpu = self._cpu_context()
                try:
                    return self._execute(m, em, image, run, r1, r2)
                finally:
                    cpu.restore()
            return self._execute(m, em, image, run, r1, r2)
        finally:
            self._executing = False

    @property
    def _uc(self) -> "_UcFast":
        """Raw libunicorn access to the CPU the images run on (made again if the machine
        runs on another Unicorn)."""
        fast = self._fast
        if fast is None or fast.uc is not self.machine.uc:
            fast = self._fast = _UcFast(self.machine.uc, self._entry_ids)
        return fast

    def _cpu_context(self) -> "_UcFast":
        """The traced CPU's state, saved into one context kept for every hit (a new
        UcContext per hit costs an allocation and the binding's wrapper: ~5 µs)."""
        fast = self._uc
        fast.save()
        return fast

    def _execute(self, m: "Machine", em: Emitter, image: JitImage, run: BpfRun,
                 r1: int, r2: int) -> int:
        if "tail_call" in self.stubs:     # only a program with tail calls counts them
            m.memory.write(self.tcc_addr, bytes(4))
        # The budget: every backward branch the JITed code evaluates costs one (a register
        # counts down; see back_edge in the arch JITs). Without backward branches a
        # program ends by itself: no recursion, at most 33 tail calls.
        sp = em.push_return(m, self.stack_top_of(m.cpu) if self.in_guest else self.stack_top,
                            self.return_addr)
        self._uc.write_entry(self.to_guest(r1), r2, run.budget, sp)
        self._pending = _Pending()
        # in a traced guest ProbeJit counts the cycles per program (a clock read is ~1 µs)
        start, cycles0 = image.entry, 0 if self.in_guest else m.clock.cycles
        while True:
            result = self._run(start)
            resume = self._fixup(result) if result is not _RETURNED else None
            if resume is None:
                break
            start = resume
        if not self.in_guest:
            self.cycles = m.clock.cycles - cycles0
        self.sync_in(stack=False)
        return self._outcome(result, image)

    def _run(self, start: int) -> Any:
        """Run the image to the return trampoline. In a scratch machine without the cycle
        model (which settles its accounts when a run stops) this is a bare emu_start: the
        machine's run loop (limits, stop listeners, the stop message naming the symbol)
        costs ~10 µs a run, more than a few thousand JITed instructions; the images bound
        themselves (the budget at backward branches), so no limit is needed."""
        from unicorn import UcError

        from emu.machine import RunResult, StopReason

        m = self.machine
        if self.in_guest:
            return self._run_nested(start)
        if m.clock.model_counts is not None:
            return m.run(begin=start, until=self.return_addr)
        m.hooks.errors.clear()
        m._mem_fault = None            # what the machine's TLB fault window records
        try:
            m.uc.emu_start(start, self.return_addr)
        except UcError as e:
            m.uc_error_seen()
            if m.hooks.errors:
                raise m.hooks.errors[0] from None
            return m._fault_from_uc(e)
        if m.hooks.errors:
            raise m.hooks.errors[0]
        if m.pc == self.return_addr:
            return _RETURNED
        return RunResult(StopReason.LIMIT, 124, f"stopped at {m.pc:#x}")

    def _run_nested(self, start: int) -> Any:
        """The image on the traced CPU, from inside a hit: Machine.call_nested, whose fast
        path is a run that comes back to the return trampoline with nothing stopped. It
        keeps the outer run's limits: its instructions count toward --max-insns (as the
        stubs' do), and a --timeout stop that meets it ends the outer run, not the image."""
        stop = self.machine.call_nested(start, self.return_addr)
        return _RETURNED if stop is None else stop

    def _fixup(self, result: Any) -> int | None:
        """A fault at a pc in an exception table: zero the destination, resume after
        the load (ex_handler_bpf)."""
        from emu.machine import StopReason

        if result.reason is not StopReason.FAULT or result.fault is None:
            return None
        for image in self.images.values():
            entry = image.extable.get(result.fault.pc)
            if entry is not None:
                self.machine.set_reg(entry[1], 0)
                return entry[0]
        return None

    def _outcome(self, result: Any, image: JitImage) -> int:
        pend = self._pending
        if result is _RETURNED and pend.exit_r0 is None and pend.error is None:
            return self.machine.regs.read(self._ret_id) & U64
        from emu.machine import StopReason

        if pend.exit_r0 is not None:
            return pend.exit_r0
        if pend.error is not None:
            raise pend.error
        if result.reason is StopReason.HALT and self.machine.pc == self.return_addr:
            return self.machine.regs.read(self._ret_id) & U64
        run = self.run_state
        assert run is not None
        f = result.fault
        where = f.pc if f is not None else self.machine.pc
        what = f"{f.kind}{f' {f.addr:#x}' if f.addr is not None else ''}" if f else result.message
        raise self._fault(image, where, f"{what} in JITed code at {self.machine.describe(where)}")

    def _fault(self, image: JitImage, pc: int, reason: str) -> BpfRuntimeError:
        for img in self.images.values():
            idx = img.insn_at(pc)
            if idx is not None:
                insns = img.prog.insns
                second = insns[idx + 1] if idx + 1 < len(insns) else None
                return BpfRuntimeError(reason, idx, format_insn(insns[idx], second), img.prog.name)
        return BpfRuntimeError(reason, None, "", image.prog.name)

    # -- windows --
    def to_guest(self, vm: int) -> int:
        w = self._by_vm_key.get(vm >> 32)
        if w is None or not (w.region.base & VM_BASE or w.region.base <= vm < w.region.end):
            return vm
        return vm - w.region.base + w.gstart

    def to_vm(self, guest: int) -> int:
        """A guest pointer into a window as the machine's address (a region's whole 4 GiB
        key translates; the packet, which shares key 0 with code, only its own pages)."""
        w = self.windows.get(guest >> 32)
        if w is None or not (w.region.base & VM_BASE or w.gpage <= guest < w.gpage + w.size):
            return guest
        return guest - w.gstart + w.region.base

    def sync_windows(self, stack: bool = True) -> None:
        """Map new regions of the run into the guest, drop removed ones, copy bytes out
        (of the native stack too if ``stack``: during a run, for helpers' writes)."""
        from emu.memory import PROT_READ, PROT_WRITE

        run = self.run_state
        assert run is not None
        m = self.machine
        live = {id(r) for r in run.mem.regions.values()}
        for key, w in list(self.windows.items()):
            if id(w.region) not in live and id(w.region) not in self._persistent:
                if w.size:
                    m.memory.unmap(w.gpage, w.size)
                    if self.in_guest:
                        m.owners.release(w.gpage, w.size)
                del self.windows[key]
        have = {id(w.region) for w in self.windows.values()}
        for region in list(run.mem.regions.values()):
            if id(region) in have:
                continue
            page, start = _guest_base(region)
            # an empty region maps nothing: every access faults, as in the interpreter
            size = ((start - page) + len(region.data) + PAGE - 1) & ~(PAGE - 1)
            # In a traced guest every window is writable, as the kernel's pt_regs (on the
            # stack) and map values are: the verifier already refused writes to read-only
            # ones, and Unicorn re-protecting a page for each host write costs ~30 µs a hit.
            writable = region.writable or self.in_guest
            prot = PROT_READ | (PROT_WRITE if writable else 0)
            if size:
                self._map(page, size, prot, f"[bpf {region.name or 'region'}]", False)
            self.windows[page >> 32] = Window(region, start, page, size)
        self._by_vm_key = {w.region.base >> 32: w for w in self.windows.values()}
        self._window_regions = {id(w.region) for w in self.windows.values()}
        by_buffer = {id(w.region.data): w for w in self.windows.values()}
        if self._native and (len(by_buffer) != len(self._by_buffer) or any(
                self._by_buffer.get(k) is not w for k, w in by_buffer.items())):
            self._native.invalidate()    # C's array windows moved
        self._by_buffer = by_buffer
        self.sync_out(stack)

    def _span(self, w: Window, stack: bool) -> tuple[int, int]:
        """The bytes of a window to copy: of the native stack only the live part above
        sp (helpers read keys and buffers there), and none of it once the run is over."""
        if w.region.base != STACK_BASE:
            return 0, len(w.region.data)
        if not stack:
            return 0, 0
        low = max(self.machine.sp - w.gstart, 0)
        return low, len(w.region.data)

    def sync_out(self, stack: bool = True) -> None:
        """Host bytes to the guest; a window whose bytes the guest already holds is left
        alone (a write to guest memory costs microseconds, and most maps rest per hit)."""
        if not stack:
            return self._out_regions()
        uc = self.machine.uc
        for w in self.windows.values():
            lo, hi = self._span(w, stack)
            if hi <= lo:
                continue
            data = bytes(w.region.data[lo:hi])
            if w.region.base != STACK_BASE:
                if data == w.shadow:
                    continue
                w.shadow = data
            uc.mem_write(w.gstart + lo, data)

    def _out_regions(self) -> None:
        """sync_out of every window but the stack: the per-hit path (raw uc_mem_write)."""
        raw = self._uc
        for w in self.windows.values():
            data = w.region.data
            if w.region.base == STACK_BASE or not data or data == w.shadow:
                continue
            w.shadow = bytes(data)
            raw.write(w.gstart, w.shadow)

    def _stack_in(self) -> None:
        """The live part of the native stack window into its region (a thunk's helper)."""
        w = self._by_vm_key.get(STACK_BASE >> 32)
        if w is not None:
            lo, hi = self._span(w, True)
            if hi > lo:
                w.region.data[lo:hi] = self.machine.uc.mem_read(w.gstart + lo, hi - lo)

    def sync_in(self, stack: bool = True) -> None:
        if not stack:
            return self._in_regions()
        uc = self.machine.uc
        for w in self.windows.values():
            lo, hi = self._span(w, stack)
            if w.region.writable and hi > lo:
                got = bytes(uc.mem_read(w.gstart + lo, hi - lo))
                w.region.data[lo:hi] = got
                if w.region.base != STACK_BASE:
                    w.shadow = got

    def _in_regions(self) -> None:
        """sync_in of the writable windows but the stack: the per-hit path (raw
        uc_mem_read; a region is written only where the guest changed it)."""
        read = self._uc.read
        for w in self.windows.values():
            region = w.region
            if not region.writable or region.base == STACK_BASE or not region.data:
                continue
            got = read(w.gstart, len(region.data))
            if got != w.shadow:
                region.data[:] = got
                w.shadow = got

    # -- host entries --
    def _helper_trap(self, fid: int) -> Callable[[int], None]:
        def on_helper(addr: int) -> None:
            run = self.run_state
            assert run is not None
            proto = run.prog.helpers.get(fid)
            self._call_helper(proto, fid, addr)
        return on_helper

    def _plan(self, proto: BpfFuncProto, fid: int) -> tuple[tuple[int, ...], bool, bool]:
        """(register ids to read, whether memory must be synchronised, whether r0 is a
        pointer), worked out once per helper: the hot path of a helper call."""
        plan = self._plans.get((id(proto), fid))
        if plan is None:
            kernel = proto is KERNEL_HELPERS.get(fid)
            # a kernel helper reads only the registers its proto lists (trace_printk: all
            # five, its r3-r5 are variadic); a caller's helper may read any
            n = len(proto.args) if kernel and fid != _TRACE_PRINTK else 5
            ids = tuple(self.machine.arch.reg_id(r) for r in self.emitter.reg_names[1:n + 1])
            touches = not kernel or proto.ret in _POINTER_RETS or \
                any(a not in _NO_MEMORY_ARGS for a in proto.args)
            plan = self._plans[(id(proto), fid)] = (ids, touches, proto.ret in _POINTER_RETS)
        return plan

    def _pointer_args(self, proto: BpfFuncProto) -> tuple[bool, ...]:
        """Which of r1-r5 a helper takes as a pointer, to be mapped back from a window: a
        kernel helper's typed ones (a probe read's source and trace_printk's %s arguments
        are plain values, read where they point, in guest memory, which holds the windows);
        any of a caller's helper's."""
        got = self._ptr_masks.get(id(proto))
        if got is None:
            if proto is KERNEL_HELPERS.get(proto.func_id):
                got = tuple(i < len(proto.args) and proto.args[i] not in _NO_MEMORY_ARGS
                            for i in range(5))
            else:
                got = (True,) * 5
            self._ptr_masks[id(proto)] = got
        return got

    def _call_helper(self, proto: BpfFuncProto | None, fid: int, addr: int) -> None:
        m, run = self.machine, self.run_state
        assert run is not None
        if proto is None:
            return self._fail(addr, f"invalid func unknown#{fid}")
        ids, touches, ptr_ret = self._plan(proto, fid)
        if touches and self._direct and fid not in _MAP_HELPERS:
            return self._direct_helper(proto, addr, ids)
        read, to_vm = m.regs.read, self.to_vm
        args = [to_vm(read(i)) if p else read(i) for i, p in zip(ids, self._pointer_args(proto))]
        args += [0] * (5 - len(args))
        backed, bounced = None, []
        if touches and self._direct:
            # a thunk's map helper reads a key and value and changes one map: only those
            # bytes move
            self._stack_in()
            backed, next_key = run.map_at(args[0]), run.mem._next_key
            try:
                bounced = self._map_args_in(run, backed, fid, ids, args)
            except UserFault as e:
                return self._fail(addr, f"helper memory {e}")
            if getattr(backed, "backing", None) is not self:
                backed = None
            if backed is not None:
                self.pull(backed)
        elif touches:
            self.sync_in()
        try:
            got = self._direct_lookup(run, args) if self._direct and fid == 1 and \
                proto is KERNEL_HELPERS.get(1) else None
            if got is not None:
                m.regs.write(self._ret_id, got)
                return None
            r0 = proto.impl(run, *args) & U64
        except ProgramExit as e:
            self._pending.exit_r0 = e.r0
            if not self._direct:
                m.uc.emu_stop()
            return None
        except (MemoryFault, GuestFault) as e:
            return self._fail(addr, str(e))
        except BpfRuntimeError as e:
            return self._fail(addr, e.reason) if e.pc is None else self._stop(e)
        except BpfError as e:
            return self._stop(e)
        except Exception as e:  # a helper's bug must not take the host down
            return self._fail(addr, unexpected(e))
        finally:
            if bounced:
                for region in bounced:
                    run.mem.remove(region)
                run.mem._next_key = next_key     # the next call's bounce gets the same keys
        if backed is not None:
            self.push(backed)
        elif touches and not self._direct:
            self.sync_windows()
        if ptr_ret:
            r0 = self.to_guest(r0)
        m.regs.write(self._ret_id, r0)
        return None

    def _map_args_in(self, run: BpfRun, mp: Any, fid: int, ids: tuple[int, ...],
                     args: list[int]) -> list[Region]:
        """A map helper's key (and an update's value) where the program holds them, called
        from a thunk or stub: a map window's bytes read in (an image may have changed them
        since the last stop); anything but a window (a C-held hash value the program looked
        up) bounced through the uaccess path. The stack was read in already."""
        if mp is None:
            return []
        bounced: list[Region] = []
        sizes = ((1, mp.key_size), (2, mp.value_size)) if fid == 2 else ((1, mp.key_size),)
        for i, size in sizes:
            if i >= len(ids):
                break
            raw = self.machine.regs.read(ids[i])
            if raw != args[i]:
                self._window_in(raw)
            elif size > 0:
                region = self._bounce(run, raw, size)
                bounced.append(region)
                args[i] = region.base
        return bounced

    def _direct_helper(self, proto: BpfFuncProto, addr: int, ids: tuple[int, ...],
                       raw: list[int] | None = None) -> None:
        """A helper that reads or writes memory, called from a thunk's or stub's image
        (jit_direct.TRAMPOLINE_HELPERS). Only the bytes it can touch move
        (``_memory_plan``): those of the BPF stack and the whole map values window its
        pointers reach are read in first; a sized memory argument outside the windows (a
        hash value in C's pages, the stub's pt_regs frame or context buffer) is handed over
        in a bounce region, through the uaccess path; what it may write
        (ARG_PTR_TO_UNINIT_MEM) goes back to where the program holds it. (Locals and no
        list or region made unless needed: this runs on every such call.)"""
        m, run = self.machine, self.run_state
        assert run is not None
        to_vm = self.to_vm
        if raw is None:                 # (``raw``: the registers ``ids`` names, read)
            read = m.regs.read
            raw = [read(i) for i in ids]
        if len(raw) < 5:
            raw += [0] * (5 - len(raw))
        windows = self.windows          # (most arguments are in no window: no call)
        args = [to_vm(a) if p and a >> 32 in windows else a
                for a, p in zip(raw, self._pointer_args(proto))]
        writes: list[tuple[int, int, int]] | None = None     # (guest, vm, size) to write back
        bounced: list[tuple[int, Region, bool]] | None = None
        next_key = run.mem._next_key
        try:
            for i, size_arg, typed, out in self._memory_plan(proto):
                size = args[size_arg] if size_arg >= 0 else -1
                if raw[i] != args[i]:
                    self._arg_in(raw[i], args[i], size)
                    if out:
                        writes = writes or []
                        writes.append((raw[i], args[i], size))
                elif typed and size > 0:
                    region = self._bounce(run, raw[i], size)
                    bounced = bounced or []
                    bounced.append((raw[i], region, out))
                    args[i] = region.base
            r0 = self._direct_impl(proto, addr, run, args)
            if r0 is None:
                return None
            for guest, vm, size in writes or ():
                self._write_back(guest, vm, size)
            for guest, region, out in bounced or ():
                if out:
                    copy_to_user(m.memory, guest, bytes(region.data))
        except UserFault as e:      # the verifier let no such pointer through
            return self._fail(addr, f"helper memory {e}")
        finally:
            for _g, region, _o in bounced or ():
                run.mem.remove(region)
            run.mem._next_key = next_key     # the next call's bounce gets the same keys
        m.regs.write(self._ret_id, r0)
        return None

    def _memory_plan(self, proto: BpfFuncProto) -> tuple[tuple[int, int, bool, bool], ...]:
        """(argument, its size's argument or -1 for a string, sized memory the verifier
        typed, written) for each pointer a kernel helper may follow: its ARG_PTR_TO_MEM and
        ARG_PTR_TO_UNINIT_MEM, a probe read's source, trace_printk's %s arguments."""
        plan = self._mem_plans.get(id(proto))
        if plan is None:
            rows = [(i, i + 1, True, kind is BpfArgType.ARG_PTR_TO_UNINIT_MEM)
                    for i, kind in enumerate(proto.args) if kind in _MEMORY_ARGS]
            if proto.func_id in _PROBE_READS:
                rows.append((2, 1, False, False))
            if proto.func_id == _TRACE_PRINTK:
                rows += [(i, -1, False, False) for i in (2, 3, 4)]
            plan = self._mem_plans[id(proto)] = tuple(rows)
        return plan

    def _arg_in(self, guest: int, vm: int, size: int) -> None:
        """The bytes a helper may read at ``vm`` (a window's region), from the guest: on
        the BPF stack ``size`` of them (a string: up to the window's end, at most
        _STRING_MAX), of a map window all (the windows hold the values while images run)."""
        w = self.windows.get(guest >> 32)
        if w is None or not w.size:
            return
        if w.region.base != STACK_BASE:
            return self._window_in(guest)
        off = vm - w.region.base
        n = min(size if size >= 0 else _STRING_MAX, len(w.region.data) - off)
        if off >= 0 and n > 0:
            w.region.data[off:off + n] = self._uc.read(guest, n)

    def _window_in(self, guest: int) -> None:
        """The bytes of the map window ``guest`` points into, into its region (a thunk's
        image may have changed them since the last stop)."""
        w = self.windows.get(guest >> 32)
        if w is None or w.region.base == STACK_BASE or not w.size:
            return
        got = bytes(self._uc.read(w.gstart, len(w.region.data)))
        if got != w.shadow:
            w.region.data[:] = got
            w.shadow = got

    def _write_back(self, guest: int, vm: int, size: int) -> None:
        """What a helper wrote at ``vm`` (a window's region) to the program's ``guest``."""
        w = self.windows.get(guest >> 32)
        if w is None or not size:
            return
        off = vm - w.region.base
        data = bytes(w.region.data[off:off + size])
        self._uc.write(guest, data)
        if w.region.base != STACK_BASE:
            w.shadow = bytes(w.region.data)

    def _bounce(self, run: BpfRun, guest: int, size: int) -> Region:
        """A region holding ``size`` bytes of guest memory at ``guest`` for one helper."""
        data = bytearray(copy_from_user(self.machine.memory, guest, size))
        return run.mem.map_buffer(data, True, "helper arg")

    def _direct_impl(self, proto: BpfFuncProto, addr: int, run: BpfRun,
                     args: list[int]) -> int | None:
        """The helper's r0, or None when it failed (the program's error is pending)."""
        try:
            return proto.impl(run, *args) & U64
        except ProgramExit as e:
            self._pending.exit_r0 = e.r0
        except (MemoryFault, GuestFault) as e:
            self._fail(addr, str(e))
        except BpfRuntimeError as e:
            self._fail(addr, e.reason) if e.pc is None else self._stop(e)
        except BpfError as e:
            self._stop(e)
        except Exception as e:  # a helper's bug must not take the host down
            self._fail(addr, unexpected(e))
        return None

    def _fail(self, addr: int, reason: str) -> None:
        call = self.emitter.return_address(self.machine) - self.emitter.call_size()
        img = self._image_at(call)
        return self._stop(self._fault(img, call, reason) if img is not None
                          else BpfRuntimeError(reason))

    def _stop(self, e: BaseException) -> None:
        self._pending.error = e
        if not self._direct:          # a thunk's helper: the caller raises, the run goes on
            self.machine.uc.emu_stop()

    def _on_budget(self, addr: int) -> None:
        """A backward branch found the budget register at zero: the program ends with the
        error the nested run and a thunk's call both report (the host path raises it)."""
        if not self._executing:
            return self._direct_budget()
        run = self.run_state
        assert run is not None
        self._stop(BpfRuntimeError(_budget_text(run.budget), None, "", run.prog.name))

    def _direct_budget(self) -> None:
        """The budget ran out in an image a thunk or stub called (jit_direct.py): the program
        is the one whose call left its return address at the top of this CPU's BPF stack
        (x86 ``call``, arm64's prologue stores x30 there; a tail call keeps it). Its guard
        is dropped and the hit ends the run as the host path's error does."""
        from probes.trace.bpf_trace import BpfTraceError

        from .jit_direct import direct_calls_of

        m = self.machine
        top = self.stack_top_of(m.cpu) if self.in_guest else self.stack_top
        ret = int.from_bytes(m.uc.mem_read(top - 8, 8), "little")
        dc = direct_calls_of(m)
        found = dc.program_at(ret) if dc is not None else None
        if found is None:
            if dc is not None:          # trace_call_bpf's exit path drops the guard
                m.memory.write(dc.active_addr(m.cpu), bytes(4))
            raise BpfTraceError("?", "budget trampoline reached outside a run")
        thunk, prog = found
        dc.release(thunk, prog)                 # type: ignore[union-attr]
        err = BpfRuntimeError(_budget_text(thunk.budget or 0), None, "", prog.name)
        raise BpfTraceError(prog.name or prog.section, str(err))

    def _on_callx(self, addr: int) -> None:
        run = self.run_state
        assert run is not None
        fid = self.machine.reg(self.emitter.reg_names[11])
        self._call_helper(run.prog.helpers.get(fid), fid, addr)

    def _on_tail_call(self, addr: int) -> None:
        """Index bounds and the NULL check of emit_bpf_tail_call_indirect; the count check
        and increment are inline. Leaves the target's entry (or 0) in AX. The prog array
        is read at each call, as the kernel's is: a target put there after its caller was
        JITed is JITed now. From a thunk (``_direct``) the kept run is only borrowed: it
        is not switched to the target."""
        m, regs, run = self.machine, self.emitter.reg_names, self.run_state
        assert run is not None
        mp = run.map_at(m.reg(regs[2]))
        index = m.reg(regs[3]) & 0xFFFFFFFF
        target = None
        if isinstance(mp, ProgArrayMap) and index < mp.max_entries:
            target = mp.get_prog(index)
        image = self.images.get(id(target)) if target is not None else None
        if image is None and target is not None:
            image = self._tail_image(run, target)
        self._tail_filled(mp)            # its routine sent it here: the table was behind
        if image is not None and not self._direct:
            run.tail_calls += 1
            run.prog = image.prog
        m.set_reg(regs[11], image.entry if image is not None else 0)

    def _tail_stub(self, c: InsnCtx) -> int:
        """What a tail call at ``c`` calls: in a guest, when the verifier's view names its
        prog array (an lddw into r2 on the straight path), that array's lookup routine, the
        guest code reading array->ptrs[index] as the kernel's JITed code does, with the
        host trampoline (``_on_tail_call``) behind it for a program not JITed yet;
        else the host trampoline itself."""
        host = self._stub("tail_call", self._on_tail_call)
        self._direct_fns[host] = self._direct_tail_call
        if not self.in_guest:
            return host
        insns = self._cur.insns
        mp = _map_in_reg(self._cur, insns, _jump_targets(insns), c.idx, 2)
        if type(mp) is not ProgArrayMap or mp.max_entries > MAX_TABLE_ENTRIES:
            return host
        got = self._tail_tables.get(id(mp))
        if got is None:
            got = self._tail_tables[id(mp)] = (mp, self._lookup_slot(), self._table(mp), {})
            code, _labels, _extable = layout(
                self.emitter, self.emitter.tail_lookup(got[2], mp.max_entries, host), got[1])
            assert len(code) <= LOOKUP_SLOT, "tail call lookup routine too large"
            self.machine.text_poke(got[1], code)
            listen_weakly(mp, self._fill_table)
            self._fill_table(mp)
        return got[1]

    def _lookup_slot(self) -> int:
        from emu.memory import PROT_EXEC, PROT_READ

        if not self._lookup_free:
            page = self._free_span(self.stub_base, PAGE)
            self._map(page, PAGE, PROT_READ | PROT_EXEC, "[bpf jit tail calls]", True)
            self._lookup_free = list(range(page + PAGE - LOOKUP_SLOT, page - 1, -LOOKUP_SLOT))
        return self._lookup_free.pop()

    def _table(self, mp: ProgArrayMap) -> int:
        """Room for a prog array's entries (u64 each) in the BPF layer's data pages."""
        from emu.memory import PROT_READ, PROT_WRITE

        size = 8 * mp.max_entries
        at, end = self._table_space
        if at + size > end:
            span = (size + PAGE - 1) & ~(PAGE - 1)
            at = self._free_span(self.stub_base, span)
            self._map(at, span, PROT_READ | PROT_WRITE, "[bpf prog arrays]", False)
            end = at + span
        self._table_space = (at + size, end)
        return at

    def _fill_table(self, mp: ProgArrayMap) -> None:
        """The guest's copy of a prog array (ProgArrayMap.listeners, after each update or
        delete): per entry the target's image entry, 0 for none, or 1 for a program not
        JITed yet (the lookup routine then asks the host, which JITs it)."""
        got = self._tail_tables.get(id(mp))
        if got is None or got[0] is not mp:
            return
        now = {}
        for i, prog in mp.progs.items():
            image = self.images.get(id(prog))
            now[i] = image.entry if image is not None else 1
        written = got[3]            # (the table's pages were mapped zeroed, never reused)
        for i in sorted(written.keys() | now.keys()):
            if written.get(i, 0) != now.get(i, 0):
                self.machine.memory.write(got[2] + 8 * i, struct.pack("<Q", now.get(i, 0)))
        written.clear()
        written.update(now)

    def _tail_filled(self, mp: Any) -> None:
        """A tail call the host served found the target's image: the guest's table gets it."""
        if self._tail_tables and type(mp) is ProgArrayMap:
            self._fill_table(mp)

    def _direct_tail_call(self, addr: int) -> None:
        """``_on_tail_call`` from a thunk or stub, on its own entry (the hot path of a tail
        call from guest code: no helper to serve, so none of _direct_trap's set-up): the
        calling image's run reads the prog array, as the kernel's JITed code reads
        array->ptrs[index] at each call."""
        from probes.trace.bpf_trace import BpfTraceError

        m, em = self.machine, self.emitter
        image = self._image_at(em.return_address(m) - em.call_size())
        run = self._direct_run_of(image.prog) if image is not None else None
        if image is None or run is None:
            raise BpfTraceError("?", f"tail call trampoline {addr:#x} reached outside a run")
        ids = self._tail_ids
        if ids is None:
            ids = self._tail_ids = tuple(m.arch.reg_id(em.reg_names[i]) for i in (2, 3, 11))
        read = m.regs.read
        mp = run.map_at(read(ids[0]))
        index = read(ids[1]) & 0xFFFFFFFF
        target = mp.get_prog(index) if type(mp) is ProgArrayMap and index < mp.max_entries \
            else None
        entry = 0
        if target is not None:
            found = self.images.get(id(target))
            if found is None:
                saved, self.run_state, self._pending = self.run_state, run, _Pending()
                self._direct = True
                try:
                    found = self._tail_image(run, target)
                finally:
                    self._direct, self.run_state = False, saved
                if self._pending.error is not None:
                    raise BpfTraceError(image.prog.name or image.prog.section,
                                        str(self._pending.error))
            entry = found.entry if found is not None else 0
        self._tail_filled(mp)            # its routine sent it here: the table was behind
        m.regs.write(ids[2], entry)

    def _tail_image(self, run: BpfRun, target: "BpfProg") -> JitImage | None:
        """JIT a tail call's target the prog array got after its caller's run was prepared
        (in the kernel every program is JITed at its load): its maps bound in ``run``, the
        run it is JITed under. None: it cannot be JITed, and the program fails with why."""
        saved = self._cur if hasattr(self, "_cur") else None
        try:
            target.ensure_loaded()
            if self.in_guest:
                self._seed_maps(run, target)
            for p in _reachable(target):
                run.bind_maps(p)
            self.sync_windows(stack=False)
            root = getattr(run, "_root", None) or run.prog
            for p in _reachable(target):
                if id(p) not in self.images:
                    self._tail_root[id(p)] = self._tail_root.get(id(root), root)
                    self._cur = p
                    self.compile(p)
                if self.in_guest:
                    for mp in p.maps.values():
                        if not isinstance(mp, ProgArrayMap) and \
                                id(getattr(mp, "values", None)) in self._by_buffer:
                            mp.backing = self
        except BpfError as e:
            self._stop(BpfRuntimeError(f"tail call target {target.name}: {e}"))
            return None
        finally:
            if saved is not None:
                self._cur = saved
        return self.images.get(id(target))

    def _ld_abs_trap(self, size: int) -> Callable[[int], None]:
        def on_ld_abs(addr: int) -> None:
            m, regs, run = self.machine, self.emitter.reg_names, self.run_state
            assert run is not None
            off = m.reg(regs[11]) & 0xFFFFFFFF
            self.sync_in()
            try:
                value, ok = load_packet(run, off, size), 1
            except ProgramExit:
                value, ok = 0, 0
            m.set_reg(regs[0], value)
            m.set_reg(regs[11], ok)
        return on_ld_abs


def _give_region(run: BpfRun, region: Region) -> None:
    """Give ``run`` the machine's one region for a map's bytes, in place of the one
    bind_maps made for them (BpfRun binds its program's maps already)."""
    old = run.mem._by_buffer.get(id(region.data))
    if old is not None and old is not region:
        run.mem.remove(old)
    run.mem.add(region)
    run.mem._by_buffer[id(region.data)] = region


def listen_weakly(mp: ProgArrayMap, method: Callable[[Any], None]) -> None:
    """Tell ``method`` of ``mp``'s updates without the map keeping its machine alive."""
    ref = weakref.WeakMethod(method)

    def call(m: Any) -> None:
        fn = ref()
        if fn is not None:
            fn(m)
    mp.listeners.append(call)


def _budget_text(budget: int) -> str:
    return f"instruction budget of {budget} exhausted (JIT: backward branches)"


def _jump_targets(insns: list[Insn]) -> set[int]:
    out = set(function_starts(insns))
    for i, insn in enumerate(insns):
        kind = OPCODES.get(insn.code)
        if kind is not None and kind.kind in ("jmp", "jmp32", "ja", "ja32"):
            out.add(i + 1 + (insn.imm if kind.kind == "ja32" else insn.off))
    return out


def _map_in_r1(prog: "BpfProg", insns: list[Insn], targets: set[int], idx: int) -> Any:
    """The map an lddw put in r1 on the straight path into the call at ``idx`` (what the
    verifier's insn_aux map_ptr_state says), or None."""
    return _map_in_reg(prog, insns, targets, idx, 1)


def _map_in_reg(prog: "BpfProg", insns: list[Insn], targets: set[int], idx: int,
                reg: int) -> Any:
    """The map an lddw put in ``reg`` on the straight path into the call at ``idx``."""
    from .isa import BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX

    i = idx - 1
    while i >= 0 and idx - i < 64:
        if i + 1 in targets:
            return None              # another path joins before the call
        insn = insns[i]
        if i > 0 and insns[i - 1].code == BPF_LDDW:
            insn, i = insns[i - 1], i - 1
        if insn.code == BPF_LDDW and insn.dst_reg == reg:
            ok = insn.src_reg in (BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_IDX)
            return prog.map_for(insn) if ok else None
        kind = OPCODES.get(insn.code)
        if kind is None or kind.kind in ("call", "callx", "exit", "ja", "ja32", "jmp", "jmp32",
                                         "ldabs", "ldind"):
            return None
        if insn.dst_reg == reg and kind.kind not in ("st", "stx") and not (
                kind.kind == "atomic"):
            return None              # the register written by something else
        if kind.kind == "atomic" and insn.src_reg == reg and insn.imm & 0x01:
            return None              # a fetch writes its source register
        i -= 1
    return None


def _reachable(prog: "BpfProg") -> list["BpfProg"]:
    """The program and every program its prog arrays can tail-call, in a fixed order."""
    from .maps import ProgArrayMap

    out, seen, todo = [], set(), [prog]
    while todo:
        p = todo.pop(0)
        if id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
        for fd in sorted(p.maps):
            mp = p.maps[fd]
            if isinstance(mp, ProgArrayMap):      # the occupied slots, in index order
                todo += [t for _i, t in sorted(mp.progs.items(), key=lambda it: it[0])]
    return out


def run_prog(prog: "BpfProg", ctx: bytes | bytearray, env: Any = None, *, arch: str,
             packet: bytes | bytearray | None = None, cycle_profile: str | None = None,
             probe_mem: frozenset[int] = frozenset()) -> tuple[int, ScratchJit]:
    """Run ``prog`` JITed for ``arch`` in a fresh scratch machine, like BpfProg.run:
    returns (r0, the scratch JIT) and writes the context back into a bytearray ctx."""
    from .context import BpfRunContext, sk_buff, xdp_md
    from .memory import CTX_ADDR, PACKET_ADDR
    from .prog_types import PACKET_TYPES, BpfProgType

    if not prog.loaded:
        prog.load()
    env = env if env is not None else BpfRunContext()
    ctx_buf = ctx if type(ctx) is bytearray else bytearray(ctx)
    if packet is not None and not ctx_buf and prog.prog_type in PACKET_TYPES:
        addr = packet_guest_addr(PACKET_ADDR, len(packet))
        ctx_buf = (xdp_md(addr, len(packet)) if prog.prog_type == BpfProgType.BPF_PROG_TYPE_XDP
                   else sk_buff(addr, bytes(packet)))
    jit = ScratchJit(arch, cycle_profile)
    run = jit.prepare(prog, ctx_buf, env, packet, probe_mem)
    r0 = jit.execute(prog, run, CTX_ADDR, len(ctx_buf))
    run.finish()
    return r0, jit


class ProbeJit:
    """``--bpf-engine jit`` on probe hits: programs are JITed into the traced machine
    itself (text pages the BPF layer claims, written through text_poke, maps and the
    pt_regs context in windows it maps), and a host-side hit runs the image on the traced
    CPU: a nested run on the BPF layer's stack, after which the CPU's registers are put
    back and the probe's handling goes on (the first hit of a plain kprobe or an optimized
    probe; later ones call the images from guest code, jit_direct.py). With the cycle model on,
    the profile charges the JITed code as it runs it; ``cycles`` sums them per program.
    Call as ``runner(prog, ctx, env) -> r0``, the signature of ``BpfProg.run``.

    A program the JIT cannot take (``BpfError`` while compiling) runs on the compiled
    Python path instead; ``fallback`` says which and why."""

    def __init__(self, machine: "Machine") -> None:
        self.machine = machine
        self.arch = machine.arch.name
        self._jit: ScratchJit | None = None
        # program -> modelled cycles of all its hits; program -> why it is not JITed
        self.cycles: "weakref.WeakKeyDictionary[BpfProg, int]" = weakref.WeakKeyDictionary()
        self.fallback: "weakref.WeakKeyDictionary[BpfProg, str]" = weakref.WeakKeyDictionary()
        self._runs: "weakref.WeakKeyDictionary[BpfProg, BpfRun]" = weakref.WeakKeyDictionary()
        self._direct_on = False
        self._kprobes: Any = None
        # (program, env, kept run) of the last hit: the next is most likely the same
        self._last: tuple[Callable[[], "BpfProg | None"], Any, BpfRun] | None = None

    def rewire(self) -> None:
        """Installed (again): its thunks and stubs are wired at its next host hit."""
        self._kprobes, self._direct_on = None, False

    def _enable_direct(self) -> None:
        """Plain kprobes may run the images from a guest stub, optimized probes from a
        thunk (jit_direct.py), once the optimizer exists; asked on host hits until then."""
        from .jit_direct import enable_direct_calls

        first = self._kprobes is None
        if first:
            from probes.kprobes import kprobes_of
            self._kprobes = kprobes_of(self.machine)
        optimizer = self._kprobes.optimizer is not None
        if first or optimizer:
            enable_direct_calls(self.machine, self)
        self._direct_on = optimizer

    @property
    def jit(self) -> ScratchJit:
        if self._jit is None:
            self._jit = ScratchJit(self.arch, machine=self.machine)
            self._jit.direct_run = self._runs.get
            from probes.trace.bpf_trace import bpf_trace_of

            layers, trace = self.machine.layers, bpf_trace_of(self.machine)
            self._jit.is_dropped = lambda: layers.get("bpf_probe_jit") is not self
            self._jit.is_current = lambda: layers.get("bpf_probe_jit") is self and \
                trace.runner is self
        return self._jit

    def image_of(self, prog: "BpfProg") -> JitImage | None:
        return self._jit.images.get(id(prog)) if self._jit is not None else None

    def load(self, prog: "BpfProg") -> JitImage | None:
        """JIT ``prog`` now, as the kernel does at BPF_PROG_LOAD, rather than at its first
        hit: its image (None: it falls back, ``fallback`` says why)."""
        from probes.trace.bpf_trace import bpf_trace_of

        if prog in self.fallback:
            return None
        trace = bpf_trace_of(self.machine)
        try:
            self.jit.prepare(prog, bytearray(len(trace.image.image)), trace.env, None)
        except BpfRuntimeError:
            raise
        except BpfError as e:
            self.fallback[prog] = str(e)
        return self.image_of(prog)

    def __call__(self, prog: "BpfProg", ctx: bytes | bytearray, env: Any) -> int:
        ctx_buf = ctx if type(ctx) is bytearray else bytearray(ctx)
        last = self._last
        if last is not None and last[0]() is prog and last[1] is env:
            self.jit.rerun(last[2], ctx_buf)    # the usual hit: the last one's program
            if not self._direct_on:
                self._enable_direct()
            return self._execute(prog, last[2], ctx_buf)
        if prog in self.fallback:
            return prog.run(ctx, env, engine="jit")   # BpfProg's "jit": the compiled Python
        if not self._direct_on:
            self._enable_direct()
        run = self._runs.get(prog)
        if run is not None and run.env is env:
            self.jit.rerun(run, ctx_buf)
        else:
            try:
                run = self._runs[prog] = self.jit.prepare_reuse(prog, ctx_buf, env)
            except BpfRuntimeError:
                raise
            except BpfError as e:
                self.fallback[prog] = str(e)
                return prog.run(ctx, env, engine="jit")   # BpfProg's "jit": compiled Python
        self._last = (weakref.ref(prog), env, run)
        return self._execute(prog, run, ctx_buf)

    def _execute(self, prog: "BpfProg", run: BpfRun, ctx: bytearray) -> int:
        from .memory import CTX_ADDR

        clock = self.machine.clock
        model = clock.model_counts is not None
        c0 = clock.cycles if model else 0
        r0 = self.jit.execute(prog, run, CTX_ADDR, len(ctx))
        if model:
            self.cycles[prog] = self.cycles.get(prog, 0) + clock.cycles - c0
        run.finish()
        return r0


def engine_info(machine: "Machine", prog: "BpfProg") -> dict[str, Any]:
    """How ``prog`` runs on ``machine``'s hits, for reports: {"engine": "jit" | "python" |
    "interp"}, and under the JIT the image's address and size, the modelled cycles of its
    hits (with the cycle model), or why it fell back to the compiled Python path."""
    from probes.trace.bpf_trace import bpf_trace_of

    runner = bpf_trace_of(machine).runner
    if not isinstance(runner, ProbeJit):
        return {"engine": "python" if runner is None else "interp"}
    if prog in runner.fallback:
        return {"engine": "python", "jit_fallback": runner.fallback[prog]}
    image = runner.image_of(prog)
    info: dict[str, Any] = {"engine": "jit"}
    if image is not None:
        info.update(jit_image=image.addr, jit_size=len(image.code))
    if prog in runner.cycles:
        info["jit_cycles"] = runner.cycles[prog]
    return info


def jit_load(machine: "Machine", prog: "BpfProg") -> JitImage | None:
    """Under ``--bpf-engine jit``: JIT ``prog`` into ``machine`` now (see ProbeJit.load)."""
    from probes.trace.bpf_trace import bpf_trace_of

    runner = bpf_trace_of(machine).runner
    return runner.load(prog) if isinstance(runner, ProbeJit) else None


def install_engine(machine: "Machine", engine: str) -> None:
    """Select how programs attached to ``machine`` run: "python" (the compiled path,
    the default), "interp" or "jit" (probe hits run the JITed guest code)."""
    from probes.trace.bpf_trace import bpf_trace_of

    from .jit_direct import disable_direct_calls

    trace = bpf_trace_of(machine)
    if engine == "jit":
        # One JIT per machine (its images and stubs live in the guest): kept across
        # switches to another engine and back.
        jit: ProbeJit = machine.layer("bpf_probe_jit", ProbeJit)
        jit.rewire()
        trace.runner = jit
        return
    disable_direct_calls(machine)
    if engine == "interp":
        trace.runner = lambda prog, ctx, env: prog.run(ctx, env, engine="interp")
    else:
        trace.runner = None


def jited_listing(prog: "BpfProg", arch: str) -> str:
    """``bpftool prog dump jited`` with the BPF instruction before its code."""
    import capstone

    from .context import BpfRunContext
    from .isa import slot_starts

    jit = ScratchJit(arch)
    jit.prepare(prog, bytearray(), BpfRunContext(), None)
    image = jit.images[id(prog)]
    arch_obj = jit.machine.arch
    cs = capstone.Cs(arch_obj.cs_arch, arch_obj.cs_mode)
    lines = [f"bpf_prog_{prog.name or 'prog'}:  ; {arch}, {len(image.code)} bytes at "
             f"{image.addr:#x}"]
    insns, starts = prog.insns, slot_starts(prog.insns)
    func_of = {a: i for i, a in image.funcs.items()}
    pos = image.addr
    order = sorted(list(image.insn_addr.items()), key=lambda t: t[1])
    for idx, addr in order:
        if pos < addr:
            lines += _dis(cs, image, pos, addr, "prologue" if pos in func_of else "")
        second = insns[idx + 1] if idx + 1 < len(insns) else None
        lines.append(f"; {idx}: {format_insn(insns[idx], second)}")
        a, code = image.insn_code(idx)
        lines += _dis(cs, image, a, a + len(code), "")
        pos = a + len(code)
    lines += _dis(cs, image, pos, image.addr + len(image.code), "epilogue")
    del starts
    return "\n".join(lines) + "\n"


def _dis(cs: Any, image: JitImage, start: int, end: int, title: str) -> list[str]:
    out = [f"; {title}"] if title and start < end else []
    code = image.code[start - image.addr:end - image.addr]
    for ins in cs.disasm(code, start):
        out.append(f"  {ins.address:#x}:  {ins.bytes.hex(' '):<24} {ins.mnemonic} {ins.op_str}".rstrip())
    return out


__all__ = ["ARCHES", "ScratchJit", "JitImage", "run_prog", "jited_listing", "get_emitter",
           "MAX_TAIL_CALL_CNT", "BPF_PROBE_MEM", "BPF_PROBE_MEMSX"]
