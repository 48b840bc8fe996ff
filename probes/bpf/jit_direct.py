"""BPF programs entered from guest code, with no nested run (issue 17): optprobe thunks and
the per-CPU stubs of plain kprobes, kprobes on ftrace sites, kretprobes and tracepoints.

The kernel's optprobe template saves pt_regs on the stack and calls optimized_callback,
which reaches kprobe_perf_func -> trace_call_bpf -> the JITed bpf_func. Here, after a
host hit of an optimized probe has JITed its programs (probes/bpf/jit_guest.ProbeJit), a
*thunk* is written near the probe: it saves the pt_regs frame on the guest stack, takes
the bpf_prog_active guard, calls each JITed image with the frame as r1, restores every
register and ends in the detour's relocated copies. The probe's jump then targets the
thunk (Optimizer.direct), so later hits never leave the guest. The jump and its thunk are
every CPU's: with several CPUs the thunk loads the running CPU's guard address and stack
top from two this-CPU words the probe layer rewrites at every CPU switch, as the kernel's
template reaches per-CPU data through this_cpu_off.

Every other attach point gets a *stub* from the same generator, one copy per CPU (each
with that CPU's bpf_prog_active word, counters and part of the BPF stack in its code, as
the kernel's this_cpu accesses name the running CPU's copy). The hit's owner takes the
trap or the call as before, charges it and its handler, and sets pc to this CPU's stub
instead of running the programs on the host; the stub ends at its slot's last word, where
a host entry (the breakpoint under it is the backstop) hands the hit back to its owner:

* a plain kprobe (``kprobe_stub``, Kprobes.bpf_stub, from kprobe_handler or C's pre
  entry): Kprobes.bpf_stub_done goes on as after a pre handler returning 0 (the
  out-of-line step or the simulation, then the post handler);
* a kprobe on an ftrace site (the same stub, from kprobe_ftrace_handler or C's ftrace
  pre entry, which leave the trampoline for it as an IPMODIFY handler does): done, the
  hit steps over the nop and runs the post handler;
* a kretprobe (``kretprobe_stub``, from the Python trampoline or from C's, whose return
  handler asks it to resume at the stub): the return is handled as always but for the
  handler; the frame is the returning registers with ip = the real return address (this
  CPU's return word, the stub loads it), and the stub's end (Kretprobes.bpf_stub_done)
  puts lr back (arm64) and resumes at the caller;
* a tracepoint event's perf programs or a raw tracepoint link (``tracepoint_stub``, from
  the iterator's trap): the host does the rest of the function's work (the event's
  record) and writes the programs' context, the record or the raw u64 arguments, to this
  CPU's context buffer; the stub passes it as r1 (no frame) and either traps back for the
  next function or, for the last one, returns from the iterator itself. A raw tracepoint's
  guard is the program's own (prog->active, one word per link and CPU), not bpf_prog_active.

trace_call_bpf's AND of the results only gates a perf sample, which these events never
record, so the stubs drop it as the thunk does.

Only programs the guest code can run qualify: kprobe, tracepoint and raw tracepoint
programs whose helper calls are inlined (array and per-CPU array lookups, map_gen_lookup;
a per-CPU array made for fewer CPUs than the machine's is looked up behind the trampoline,
in Python, as TRAMPOLINE_HELPERS are), lookups in a hash
or LRU hash map whose values the guest maps (``guest_mapped_hash``: C's trampoline entry
returns the value's guest address, as htab_map_lookup_elem returns kernel memory) or in
TRAMPOLINE_HELPERS (a trap to the host helper inside the same run, no nested run): map
updates and deletes, the clocks, current's pid/tgid, uid/gid, comm and task (read from the
task and CPU that hit at each call, BpfTrace.current_task), the probe reads (into the BPF
stack, an array map's window or a C-held hash value: jit_guest moves exactly the bytes the
helper can touch, and a faulting read returns -EFAULT with the buffer zeroed, never a guest
fault), trace_printk, ringbuf_output and perf_event_output (ctx in r1: it is not read).
Output goes out at the call (BpfTrace.deliver), so it stays in order with the
trace events around the hit; the host path delivers a hit's lines, then its ring-buffer
records, then its perf samples, so programs whose calls come in another order
(``output_order``) keep the host path. get_func_ip and get_attach_cookie answer for the
one event whose thunk or stubs run the program (``site_of``): a program that calls them
runs from guest code for one event only. Also refused: an exception-table load (callx and
LD_ABS/LD_IND never get here: the verifier refuses both in these program types); a context
pointer handed to a map helper (C's entry could not read the frame); the helpers that need the hit's
registers (get_stack/get_stackid's walk, override_return) or add a region the image
would have to reach (ringbuf_reserve).
Anything else keeps the host path.

Loops and tail calls run as the kernel's JITed code runs them. The thunk enters each image
as the nested run's entry does: the budget register (x27 / r12, callee-saved in the
guest's ABI, so the frame keeps the guest's) holds the run's instruction budget, which the
image counts down at each backward branch, and the u32 tail-call count in the JIT's data
page is zeroed, as the kernel's prologue starts each program's count. One count serves
every CPU: no CPU's turn ends inside BPF-layer text, so a program and its tail calls run
to their end on the CPU that entered them. A spent budget reaches the budget trampoline by
a jump: its entry finds the program from the return address at the top of this CPU's BPF
stack, drops the guard and ends the run with the host path's error (BpfTraceError, exit
2). A tail call reads the prog array in guest code, as the kernel's code reads
array->ptrs[index]: each array's lookup routine loads the target's image entry from a
table the BPF layer rewrites at every update and delete of the array
(ScratchJit._tail_stub); a target put there later is JITed at its first call, which goes
to the host once (ScratchJit._direct_tail_call), and its helpers are served by the run it
was JITed under. The programs a stub's programs can reach now must all qualify, and its
frame holds every slot they read; an update of a prog array that breaks either (or brings
the first backward branch) sends the stubs that reach it back to the host path, to be
planned again at their next hit.

Hits, program run counts and guard misses are counted
in guest words and folded into the host's counters whenever a run stops; the map values
the images wrote are read back into the maps then too (the windows of jit_guest hold
them meanwhile). A change of an event's programs sends its probes back to the host path.

A dropped stub's slot is filled with breakpoints and *retired*; it is reused once no CPU
can be inside it (``_reclaim``, at the next allocation and whenever a run stops): every
CPU's pc outside it and no CPU inside a program (its bpf_prog_active clear: an image
returns into the stub that called it), as the kernel frees insn slots after
synchronize_rcu. Attach/detach loops therefore do not grow guest memory.

The frame holds what the programs can read and what must come back: the slots the verifier
saw the programs load (BpfProg.ctx_reads; every slot when it cannot tell) and the registers
the thunk and the images may change (THUNK_CLOBBERS in the arch's opt.py; the images keep
the callee-saved ones themselves). The rest of pt_regs is never read, so it is not written
(each store was Unicorn's slow path, most of a hit's cost, until the machine's virtual TLB,
emu/vtlb.py, made stores to data pages fast)."""
from __future__ import annotations

import bisect
import struct
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from emu.memory import PAGE, PROT_EXEC, PROT_READ
from emu.owners import RegionOwner
from emu.smp import MAX_CPUS

from .helpers import (
    BPF_FUNC_perf_event_output, BPF_FUNC_ringbuf_output, BPF_FUNC_tail_call, BPF_FUNC_trace_printk,
    KERNEL_HELPERS,
)
from .isa import BPF_CALL_OP, BPF_PSEUDO_CALL
from .jit_guest import ProbeJit, _jump_targets, _kind, _map_in_r1, function_starts
from .prog_types import BpfProgType

if TYPE_CHECKING:
    from emu.machine import Machine
    from probes.kprobes import Kprobe

    from .program import BpfProg

# Helpers a thunk's or stub's program may call through the helper trampoline (a trap into
# the host inside the same run, ScratchJit._direct_trap): map updates and deletes, the
# clocks and the random generator; ``current``'s pid/tgid, uid/gid, comm and task, which
# the trap reads from the CPU that hit (BpfTrace.current_task); the probe reads, into the
# BPF stack or a map value the program holds (ScratchJit._direct_helper moves exactly those
# bytes); and the output helpers, whose lines and records go out at the call
# (BpfTrace.deliver); func_ip and the attach cookie, of the one event whose thunk or
# stubs run the program (SITE_HELPERS). Left out: what needs the hit's registers (a stack
# walk, override_return) or adds a region the image would have to reach (ringbuf_reserve).
TRAMPOLINE_HELPERS = frozenset({
    2,      # map_update_elem
    3,      # map_delete_elem
    4,      # probe_read
    5,      # ktime_get_ns
    6,      # trace_printk
    7,      # get_prandom_u32
    8,      # get_smp_processor_id
    14,     # get_current_pid_tgid
    15,     # get_current_uid_gid
    16,     # get_current_comm
    25,     # perf_event_output (the ctx in r1 is not read)
    35,     # get_current_task
    42,     # get_numa_node_id
    45,     # probe_read_str
    112,    # probe_read_user
    113,    # probe_read_kernel
    114,    # probe_read_user_str
    115,    # probe_read_kernel_str
    118,    # jiffies64
    125,    # ktime_get_boot_ns
    130,    # ringbuf_output
    160,    # ktime_get_coarse_ns
    173,    # get_func_ip (of the one event the program runs for from guest code)
    174,    # get_attach_cookie (the same)
    208,    # ktime_get_tai_ns
})
SITE_HELPERS = frozenset({173, 174})    # answered from the program's event (DirectCalls.site_of)
# Output helpers, in the order the host path delivers a hit's output (output_order)
OUTPUT_RANK = {BPF_FUNC_trace_printk: 0, BPF_FUNC_ringbuf_output: 1, BPF_FUNC_perf_event_output: 2}
RECORD_HELPERS = frozenset({BPF_FUNC_perf_event_output, BPF_FUNC_ringbuf_output})
STUB_PROG_TYPES = frozenset({BpfProgType.BPF_PROG_TYPE_KPROBE, BpfProgType.BPF_PROG_TYPE_TRACEPOINT,
                             BpfProgType.BPF_PROG_TYPE_RAW_TRACEPOINT})
CTX_NAME = "[bpf stub ctx]"      # rw-: CPU k's tracepoint context (record or raw args) at 64k
CTX_SIZE = 64                    # the largest: an 8-byte header and six 8-byte arguments
THUNK_SLOT = 512                 # bytes per thunk (with budget and TCC: x86 ~245, arm64 ~395)
ACTIVE_OFF = 8                   # CPU k's bpf_prog_active at ACTIVE_OFF + 8k of the JIT's
                                 # data page (the tail-call count is at 0), k < MAX_CPUS
DATA_NAME = "[bpf stub data]"    # rw-: CPU k's return address at 8k, then the counters
COUNTERS_START = 8 * MAX_CPUS
STUB_HOST_ENTRY = True


def direct_eligible(prog: "BpfProg") -> str | None:
    """Why ``prog`` cannot run from a thunk, or None if it can: it and every program its
    prog arrays hold now (a tail call's target runs in the same stub call)."""
    from .jit_guest import _reachable

    reach = _reachable(prog)
    for target in reach:
        why = _eligible_one(target)
        if why is not None:
            return why if target is prog else f"tail call target {target.name}: {why}"
    return repeated_output(reach) or output_order([prog])


def repeated_output(progs: list["BpfProg"]) -> str | None:
    """Why the output of ``progs`` (a program and its tail calls' targets) could come out
    in another order than the host path's when a loop repeats the calls or a tail call
    follows them (``helper_sequence`` orders straight-line calls only), or None: output of
    one kind, to one map at most, keeps its order."""
    from .maps import PerfEventArrayMap, RingbufMap

    if len(progs) == 1 and not back_edges(progs[0]):
        return None
    fids = {fid for p in progs for fid in helper_ids(p.insns) if fid in OUTPUT_RANK}
    maps = {id(mp) for p in progs for mp in p.maps.values()
            if isinstance(mp, (RingbufMap, PerfEventArrayMap))}
    if len(fids) > 1 or (fids & RECORD_HELPERS and len(maps) > 1):
        return ("output of several kinds or maps from a loop or tail calls: the host path "
                "delivers printk lines, then ring-buffer records, then perf samples, map by map")
    return None


def _eligible_one(prog: "BpfProg") -> str | None:
    from .maps import ArrayMap, PercpuArrayMap

    if prog.prog_type not in STUB_PROG_TYPES:
        return "not a kprobe, tracepoint or raw tracepoint program"
    insns = prog.insns
    targets = _jump_targets(insns)
    lookup = KERNEL_HELPERS.get(1)
    for i, insn in enumerate(insns):
        kind = _kind(insn) if i == 0 or insns[i - 1].code != 0x18 else "lddw2"
        if kind in ("callx", "ldabs", "ldind"):
            # the verifier refuses both in these types (unknown opcode 8d; LD_ABS/IND
            # "not allowed for this program type"): only a lenient one could get here
            return f"insn {i}: {kind} (the verifier refuses it in these program types)"
        if insn.code == BPF_CALL_OP and insn.src_reg != BPF_PSEUDO_CALL:
            fid = insn.imm
            if insn.src_reg != 0 or prog.helpers.get(fid) is not KERNEL_HELPERS.get(fid):
                return f"insn {i}: helper call {fid}"
            if fid == BPF_FUNC_tail_call:
                continue                # inlined: the trampoline only looks the target up
            if fid in TRAMPOLINE_HELPERS:
                if fid in (2, 3) and prog.ctx_reads is None:
                    # the verifier saw a context pointer reach a helper: the host helper
                    # could not read the stub's frame or context buffer through it
                    return f"insn {i}: helper call {fid} may get a context pointer"
                continue
            if fid != 1 or prog.helpers.get(1) is not lookup:
                return f"insn {i}: helper call {fid}"
            mp = _map_in_r1(prog, insns, targets, i)
            if type(mp) not in (ArrayMap, PercpuArrayMap) and not guest_mapped_hash(mp):
                return f"insn {i}: map lookup not inlined"
    return None


def output_order(progs: list["BpfProg"]) -> str | None:
    """Why the output of ``progs`` (run in this order on a hit) would come out in another
    order from guest code, or None. Guest code delivers each line or record at its call;
    the host path delivers a hit's printk lines, then its ring-buffer records, then its
    perf samples, map by map (BpfTrace.poll): the same order when the calls come in it."""
    from .maps import PerfEventArrayMap, RingbufMap

    last, seen = 0, ""
    calls: dict[int, list["BpfProg"]] = {}
    for prog in progs:
        seq = helper_sequence(prog.insns)
        if seq is None:
            if helper_ids(prog.insns) & OUTPUT_RANK.keys():
                return f"{prog.name}: more than {SEQUENCE_MAX} helper calls to put in order"
            continue
        for i, fid in seq:
            rank = OUTPUT_RANK.get(fid)
            if rank is None:
                continue
            if rank < last:
                return (f"insn {i}: helper call {fid} after {seen}: the host path delivers "
                        "printk lines, then ring-buffer records, then perf samples")
            last, seen = rank, f"{prog.name or prog.section} insn {i}"
            calls.setdefault(fid, []).append(prog)
    for fid, kind in ((BPF_FUNC_ringbuf_output, RingbufMap),
                      (BPF_FUNC_perf_event_output, PerfEventArrayMap)):
        writers = calls.get(fid, [])
        maps = {id(mp) for prog in writers for mp in prog.maps.values() if isinstance(mp, kind)}
        if len(writers) > 1 and len(maps) > 1:
            return f"records to {len(maps)} maps of a kind: the host path delivers map by map"
    return None


SEQUENCE_MAX = 256      # helper calls helper_sequence follows before it gives up


def helper_sequence(insns: list, start: int = 0) -> list[tuple[int, int]] | None:
    """(insn, helper id) of the helper calls of the function at ``start``, its
    bpf-to-bpf callees' in place: with no backward branch, the calls any run makes come
    in this order. None past SEQUENCE_MAX calls: a callee called from several places
    repeats, and a call tree can be exponential in the program's size (each function is
    walked once)."""
    starts = sorted(function_starts(insns))
    memo: dict[int, list[tuple[int, int]] | None] = {}

    def walk(begin: int, depth: int) -> list[tuple[int, int]] | None:
        if begin in memo:
            return memo[begin]
        memo[begin] = None                # (a call back into a function on the way)
        k = bisect.bisect_right(starts, begin)
        end = starts[k] if k < len(starts) else len(insns)
        out: list[tuple[int, int]] = []
        for i in range(begin, end):
            insn = insns[i]
            if insn.code != BPF_CALL_OP:
                continue
            if insn.src_reg == BPF_PSEUDO_CALL and depth < 8:
                sub = walk(i + insn.imm + 1, depth + 1)
                if sub is None:
                    return None
                out += sub
            elif insn.src_reg == 0:
                out.append((i, insn.imm))
            if len(out) > SEQUENCE_MAX:
                return None
        memo[begin] = out
        return out
    return walk(start, 0)


def helper_ids(insns: list) -> frozenset[int]:
    """Every helper id the program (all its functions) calls."""
    return frozenset(insn.imm for insn in insns if insn.code == BPF_CALL_OP and insn.src_reg == 0)


def event_site(event: Any, kind: str, prog: "BpfProg") -> tuple[int, int]:
    """bpf_get_func_ip and bpf_get_attach_cookie for ``prog`` on ``event``: a kprobe-PMU
    event's func_ip (bpf_trace._func_ip), a raw tracepoint link's iterator and cookie
    (bpf_tracepoint's run), 0 and the item's cookie for a tracepoint event's perf program."""
    if kind == "raw_tp":
        return event.btp.tp.iterator, event.cookie
    cookie = next((it.bpf_cookie for it in event.prog_array.items if it.prog is prog), 0) \
        if event.prog_array else 0
    return (0 if kind == "tp" else event.func_ip), cookie


def back_edges(prog: "BpfProg") -> bool:
    """Whether ``prog`` has a backward branch (its image charges the budget register)."""
    for i, insn in enumerate(prog.insns):
        kind = _kind(insn) if i == 0 or prog.insns[i - 1].code != 0x18 else "lddw2"
        if kind in ("jmp", "jmp32", "ja", "ja32"):
            if (insn.imm if kind == "ja32" else insn.off) < 0:
                return True
    return False


def tail_calls(prog: "BpfProg") -> bool:
    """Whether ``prog`` calls bpf_tail_call (its image counts in the JIT's TCC word)."""
    return BPF_FUNC_tail_call in helper_ids(prog.insns)


def guest_mapped_hash(mp: Any) -> bool:
    """A hash map (any of the family) whose values C holds in pages a traced guest can map
    (ScratchJit.hash_values): a lookup from guest code returns a guest pointer to them (a
    per-CPU map's: the running CPU's value; C answers on one CPU, Python on several)."""
    from .maps import HashMap

    return isinstance(mp, HashMap) and mp.native is not None and mp.native.values_mm is not None


def reach(progs: list["BpfProg"]) -> list["BpfProg"]:
    """``progs`` and every program their prog arrays hold now (a tail call's target runs
    on the same frame, in the same stub call)."""
    from .jit_guest import _reachable

    out: list["BpfProg"] = []
    for prog in progs:
        out += [p for p in _reachable(prog) if all(p is not q for q in out)]
    return out


def frame_slots(progs: list["BpfProg"]) -> frozenset[int] | None:
    """The pt_regs offsets any of ``progs`` can read (the verifier's record), or None when
    one of them may read anywhere: the thunk writes only these slots of its frame."""
    out: set[int] = set()
    for prog in progs:
        prog.ensure_loaded()
        if prog.ctx_reads is None:
            return None
        out |= prog.ctx_reads
    return frozenset(out)


@dataclass
class Thunk:
    """A thunk (an optimized probe's jump target) or a stub (a hit's owner sends the guest
    there; ``trap`` is its closing breakpoint). Stubs are per CPU (``cpu``): each has that
    CPU's bpf_prog_active word, counters and part of the BPF stack in its code, as the
    kernel's this_cpu accesses name the running CPU's copy."""
    probe: "Kprobe | None"      # None: a tracepoint's stub
    addr: int
    counters: int               # guest address of (hits, misses)
    event: Any                  # the KprobePerfEvent whose programs it calls
    progs: list["BpfProg"]
    trap: int | None = None     # a stub's breakpoint, where the hit resumes
    kind: str = "optprobe"      # "optprobe", "kprobe" or "kretprobe"
    cpu: int = 0
    reads_ip: bool = False      # a kretprobe stub: its frame's ip word must be written
    guard: int = 0              # a raw tracepoint stub's prog->active word (else 0)
    entry: int | None = None    # the host entry on `trap`
    resume_to: int | None = None    # where a tracepoint's stub goes instead of its trap
    symbol: Any = None              # its name in the symbol table (removed when dropped)
    budget: int | None = None       # the budget each image starts with (back edges)
    calls: dict[int, "BpfProg"] = field(default_factory=dict)   # return address -> program
    slots: frozenset[int] | None = None     # the frame slots it writes (None: all)


class DirectPlan(NamedTuple):
    """What DirectCalls._plan found for a handler: its event, programs and image entries,
    or `why` they cannot run from guest code (`pending`: only because a program is not
    JITed yet, which the host run of this hit does)."""
    event: Any
    progs: list["BpfProg"]
    images: list[int]
    why: str | None
    pending: bool = False


StubKey = tuple[str, int, int]          # (kind, probe address, cpu)


class DirectCalls:
    """Per machine: the thunks, the stubs and their pages; ``__call__(p)`` is
    Optimizer.direct, ``kprobe_stub`` Kprobes.bpf_stub, ``kretprobe_stub`` and
    ``kretprobe_done`` Kretprobes.bpf_direct's, ``tracepoint_stub`` Tracepoints.bpf_stub."""

    def __init__(self, machine: "Machine", runner: ProbeJit) -> None:
        self.m = machine
        self.runner = runner
        self.thunks: dict[int, Thunk] = {}       # probe address -> live thunk
        self._pages: list[int] = []
        self._free: list[int] = []
        # dropped thunks' and stubs' (slot, counters, raw_tp guard or 0), until no CPU can
        # be inside: a CPU stopped there would go on in the slot and store to the words
        self._retired: list[tuple[int, int, int]] = []
        self._data: list[int] = []               # DATA_NAME pages
        self._free_counters: list[int] = []
        self.refused: dict[int, str] = {}        # probe address -> why it keeps the host path
        self.copies: dict[StubKey, Thunk] = {}   # live stubs
        self._stub_refused: dict[tuple[str, int], Any] = {}   # (kind, addr) -> handler refused
        self._ret_addr: dict[int, int] = {}      # cpu -> the return its kretprobe stub handles
        self._ctx_page: int | None = None        # CTX_NAME
        self._this_cpu_words: int | None = None  # the running CPU's guard and stack top
        self._watched: "weakref.WeakSet[Any]" = weakref.WeakSet()   # prog arrays it listens to
        machine.stop_listeners.append(self.fold)

    @property
    def stubs(self) -> dict[int, Thunk]:
        """Plain kprobes' stubs by probe address (the lowest CPU's copy)."""
        return self.stubs_of("kprobe")

    def stubs_of(self, kind: str) -> dict[int, Thunk]:
        out: dict[int, Thunk] = {}
        for (k, addr, _cpu), t in sorted(self.copies.items(), reverse=True):
            if k == kind:
                out[addr] = t
        return out

    # -- per-CPU words --
    def active_addr(self, cpu: int) -> int:
        """CPU ``cpu``'s bpf_prog_active word."""
        return self.runner.jit.tcc_addr + ACTIVE_OFF + 8 * cpu

    def _ret_word(self, cpu: int) -> int:
        return self._data_page(0) + 8 * cpu

    def _data_page(self, i: int) -> int:
        from emu.memory import PROT_WRITE
        from probes.insn_slots import place_near

        while len(self._data) <= i:
            page = place_near(self.m, self.runner.jit.tcc_addr, PAGE)
            self.m.memory.map(page, PAGE, PROT_READ | PROT_WRITE, DATA_NAME)
            self.m.claim_text(page, PAGE, RegionOwner.BPF, DATA_NAME)
            first = COUNTERS_START if not self._data else 0
            self._free_counters += range(page + PAGE - 16, page + first - 1, -16)
            self._data.append(page)
        return self._data[i]

    def _counters(self) -> int:
        """16 zeroed bytes for a thunk's (hits, misses)."""
        if not self._free_counters:
            self._data_page(len(self._data))
        return self._free_counters.pop()

    # -- deciding --
    def __call__(self, p: "Kprobe") -> int | None:
        """Optimizer.direct: the thunk an optimized probe's jump should target, or None."""
        assert p.addr is not None
        if p.addr in self.thunks:        # re-optimized after an unoptimization: a new thunk
            self._drop(p.addr)
        if self.m.nr_cpus > MAX_CPUS:
            self.refused[p.addr] = f"more than {MAX_CPUS} CPUs: no bpf_prog_active word"
            return None
        plan = self._plan(p.pre_handler, is_return=False, aggr=p.is_aggr)
        if plan.why is not None:
            self.refused[p.addr] = plan.why
            return None
        t = self._build(p, plan, "optprobe", 0)
        return None if t is None else t.addr

    def _this_cpu(self) -> int | None:
        """With several CPUs, the two u64 an optprobe thunk reads its CPU's guard address
        and stack top from (every CPU runs the one jump; the kernel's template reaches its
        per-CPU data through this_cpu_off): kept current at every CPU switch."""
        if self.m.nr_cpus <= 1:
            return None
        if self._this_cpu_words is None:
            self._this_cpu_words = self._counters()
            self.m.cpu_listeners.append(self._set_this_cpu)
            self._set_this_cpu(self.m.cpu)
        return self._this_cpu_words

    def _set_this_cpu(self, cpu: int) -> None:
        assert self._this_cpu_words is not None
        self.m.memory.write(self._this_cpu_words, struct.pack(
                "<QQ", self.active_addr(cpu), self.runner.jit.stack_top_of(cpu)))

    def _plan(self, handler: Any, is_return: bool, aggr: bool = False) -> "DirectPlan":
        """The event, programs and image entries when ``handler`` is one kprobe-PMU
        event's dispatcher whose programs can all run from guest code; else why not."""
        from probes.bpf.libbpf import KprobePerfEvent

        event = getattr(handler, "__self__", None)
        if aggr or not isinstance(event, KprobePerfEvent) or event.is_return != is_return \
                or not event.prog_array:
            return DirectPlan(event, [], [], "the handler is not one kprobe-PMU event with programs")
        return self._images(event, event.prog_array.progs())

    def _images(self, event: Any, progs: list["BpfProg"]) -> "DirectPlan":
        """The plan for ``progs``: their image entries, or why they need the host."""
        images: list[int] = []
        for prog in progs:
            image = self.runner.image_of(prog)
            if image is None or prog not in self.runner._runs:
                # JITed at load but never run on the host: no kept run yet to serve the
                # image's helper calls (ScratchJit.direct_run); the host hit makes one
                return DirectPlan(event, progs, images, f"{prog.name}: not JITed", pending=True)
            if image.extable:
                return DirectPlan(event, progs, images, f"{prog.name}: probe loads")
            why = direct_eligible(prog)
            if why is not None:
                return DirectPlan(event, progs, images, f"{prog.name}: {why}")
            images.append(image.entry)
        why = output_order(progs) if len(progs) > 1 else None
        return DirectPlan(event, progs, images, why or self._site_taken(event, progs))

    def _site_taken(self, event: Any, progs: list["BpfProg"]) -> str | None:
        """Why ``progs`` cannot run from guest code for ``event``: one that asks for its
        func_ip or attach cookie already runs there for another event (a helper call from
        its image names the program, not the thunk or stub that called it)."""
        for prog in progs:
            if not helper_ids(prog.insns) & SITE_HELPERS:
                continue
            for t in (*self.thunks.values(), *self.copies.values()):
                if t.event is not event and any(pr is prog for pr in t.progs):
                    return f"{prog.name}: get_func_ip/get_attach_cookie for a second event"
        return None

    def site_of(self, prog: "BpfProg") -> tuple[int, int] | None:
        """(func_ip, attach cookie) of the event whose thunk or stubs run ``prog``, as the
        host path's trace_call_bpf / bpf_trace_run would give them; None if none does."""
        for t in (*self.thunks.values(), *self.copies.values()):
            if any(pr is prog for pr in t.progs):
                return event_site(t.event, t.kind, prog)
        return None

    def kprobe_stub(self, p: "Kprobe") -> int | None:
        """Kprobes.bpf_stub, asked on every hit of a probe with a pre handler: this CPU's
        stub that runs ``p``'s programs in the guest (made once their images exist), or
        None: the host path runs them (the first hit, which JITs them; programs that need
        the host; an optimized probe, whose jump has a thunk of its own)."""
        assert p.addr is not None
        return self._stub("kprobe", p, p.pre_handler, p.is_aggr)

    def kretprobe_stub(self, rp: Any, ret_addr: int) -> int | None:
        """Kretprobes.bpf_direct: this CPU's stub that runs the programs of ``rp``'s
        return handler (a kretprobe-PMU event's) with the returning registers and ip =
        ``ret_addr``, the real return address, which its trap (``kretprobe_done``) goes
        on to; None: the host path runs them."""
        addr = self._stub("kretprobe", rp.kp, rp.handler, False)
        if addr is not None:
            cpu = self.m.cpu
            self._ret_addr[cpu] = ret_addr
            if self.copies[("kretprobe", rp.kp.addr, cpu)].reads_ip:
                self.m.uc.mem_write(self._ret_word(cpu), struct.pack("<Q", ret_addr))
        return addr

    def kretprobe_done(self) -> int | None:
        """The return address the kretprobe stub this CPU ran goes on to (None: it ran
        none)."""
        return self._ret_addr.pop(self.m.cpu, None)

    def _reads_ip(self, t: Thunk) -> bool:
        """Whether a program of ``t`` can read the frame's ip (else its word is not kept)."""
        from probes.arch import arch_ptrace

        slots = t.slots
        off = {n: o for o, n in arch_ptrace(self.m.arch.name).PT_REGS_SLOTS}[self.m.arch.pc]
        return slots is None or any(off <= s < off + 8 for s in slots)

    def _stub(self, kind: str, p: "Kprobe", handler: Any, aggr: bool) -> int | None:
        assert p.addr is not None
        key = (kind, p.addr, self.m.cpu)
        t = self.copies.get(key)
        if t is not None:
            if t.probe is p and getattr(handler, "__self__", None) is t.event:
                return t.addr
            self._drop_stubs(lambda k, _t: k[:2] == key[:2])
        if self._stub_refused.get(key[:2]) is handler:
            return None
        plan = self._plan(handler, is_return=kind == "kretprobe", aggr=aggr)
        if self._decided(key, plan, handler, lambda: self._build(p, plan, kind, self.m.cpu)):
            return self.copies[key].addr
        return None

    def _decided(self, key: StubKey, plan: DirectPlan, handler: Any, build: Any) -> bool:
        """Build the stub ``plan`` allows (True), or note why not: nothing while its
        programs are JITed by this hit's host run (asked again next hit), else refused
        for good for ``handler``."""
        if plan.why is None:
            if build() is not None:
                return True
        elif plan.pending and not any(pr in self.runner.fallback for pr in plan.progs):
            return False
        else:
            self.refused[key[1]] = plan.why
            self._watch(plan.progs)     # a prog array update may let them run here
        self._stub_refused[key[:2]] = handler
        return False

    def tracepoint_stub(self, tp: Any, func: Any, data: Any, args: tuple[int, ...],
                        ret: int | None) -> int | None:
        """Tracepoints.bpf_stub, asked for each function on a tracepoint's hit: this CPU's
        stub that runs the function's programs (a raw tracepoint link's, or a tracepoint
        event's perf programs) with their context written to this CPU's context buffer,
        after the host did the rest of the function's work (the event's record); None:
        the function runs on the host (other functions, the first hit, which JITs them,
        programs that need the host). ``ret``: the function is the last one, and the stub
        goes straight to the iterator's return there (else its trap goes on with the next
        function)."""
        kind, progs, ctx = self._tp_kind(func, data, args)
        if kind is None:
            return None
        cpu = self.m.cpu
        key = (kind, id(data), cpu)
        t = self.copies.get(key)
        if t is None or t.event is not data or t.progs != progs or t.resume_to != ret:
            if t is not None:
                self._drop_stubs(lambda k, _t: k[:2] == key[:2])
            if self._stub_refused.get(key[:2]) is func:
                return None
            plan = self._images(data, progs)
            if kind == "tp" and plan.why is None:
                plan = self._record_first(data, progs, plan)
            if not self._decided(key, plan, func,
                                 lambda: self._build(None, plan, kind, cpu, tp.iterator, ret)):
                return None
            t = self.copies[key]
        if kind == "tp":
            ctx = self._tp_record(func, data, args)
        self.m.uc.mem_write(self._ctx_buf(cpu), ctx)
        return t.addr

    def _record_first(self, event: Any, progs: list["BpfProg"], plan: "DirectPlan") -> "DirectPlan":
        """A tracepoint event's stub runs its programs after the host committed the event's
        record, but the host path runs them first (trace_event_raw_event): programs with
        output (printk lines, records) keep the host path, so their output and the
        event's triggers stay in that order."""
        for prog in progs:
            if any(helper_ids(p.insns) & OUTPUT_RANK.keys() for p in reach([prog])):
                return DirectPlan(event, progs, plan.images, f"{prog.name}: output on a "
                                  "tracepoint event (the host path writes it before the record)")
        return plan

    def _tp_kind(self, func: Any, data: Any, args: tuple[int, ...]) -> tuple[Any, list, bytes]:
        """("raw_tp", [prog], raw args) for a raw tracepoint link that is not writable,
        ("tp", programs, b"") for a tracepoint event with perf programs, else None."""
        from probes.trace.bpf_tracepoint import BpfRawTpLink

        if isinstance(data, BpfRawTpLink) and getattr(func, "__self__", None) is data:
            link: Any = data
            if link.writable:
                return None, [], b""
            vals = [v & ((1 << (8 * a.size)) - 1) for a, v in zip(link.btp.tp.args, args)]
            return "raw_tp", [link.prog], struct.pack(f"<{len(vals)}Q", *vals)
        from probes.trace.trace_tracepoint import TraceTracepointEvents

        if getattr(func, "__func__", None) is TraceTracepointEvents.trace_event_raw_event \
                and data.prog_array:
            return "tp", data.prog_array.progs(), b""
        return None, [], b""

    def _tp_record(self, func: Any, data: Any, args: tuple[int, ...]) -> bytes:
        """The tracepoint event's work but its programs (the record committed when the
        event is enabled); the record, the programs' context."""
        return bytes(func.__self__.raw_event_without_bpf(data, args))

    def _ctx_buf(self, cpu: int) -> int:
        from emu.memory import PROT_WRITE
        from probes.insn_slots import place_near

        if self._ctx_page is None:
            page = place_near(self.m, self.runner.jit.tcc_addr, PAGE)
            self.m.memory.map(page, PAGE, PROT_READ | PROT_WRITE, CTX_NAME)
            self.m.claim_text(page, PAGE, RegionOwner.BPF, CTX_NAME)
            self._ctx_page = page
        return self._ctx_page + CTX_SIZE * cpu

    def _build(self, p: "Kprobe | None", plan: DirectPlan, kind: str, cpu: int,
               near: int | None = None, resume_to: int | None = None) -> Thunk | None:
        """Write a thunk for ``p`` (a stub, unless ``kind`` is "optprobe": one that ends
        in a breakpoint of its own, the last word of its slot, instead of the detour's
        copies; a kretprobe stub's frame ip is CPU ``cpu``'s return-address word; a
        tracepoint's stub (``p`` None, placed ``near`` its iterator) passes CPU ``cpu``'s
        context buffer instead of a frame; ``resume_to``: where it goes when done, not its
        trap)."""
        from probes.arch import arch_probes_of

        m, jit = self.m, self.runner.jit
        site = near if p is None else p.addr
        assert site is not None
        if cpu >= MAX_CPUS:
            self.refused[site] = f"CPU {cpu}: no bpf_prog_active word"
            return None
        stub = kind != "optprobe"
        at = self._slot(site)
        bp = m.arch.breakpoint
        trap = at + THUNK_SLOT - len(bp) if stub else None
        counters = self._counters()
        guard = self._counters() if kind == "raw_tp" else 0     # prog->active, not bpf_prog_active
        tp = p is None
        slots = frozenset() if tp else frame_slots(reach(plan.progs))
        entry = self._entry_state(plan.progs)
        try:
            code = arch_probes_of(m).optprobes.bpf_thunk(
                p, at, site + (0 if tp else self._ip_offset()), plan.images,
                guard or self.active_addr(cpu), counters, jit.stack_top_of(cpu),
                slots, resume=resume_to or trap,
                ip_word=self._ret_word(cpu) if kind == "kretprobe" else None,
                ctx=self._ctx_buf(cpu) if tp else None,
                this_cpu=self._this_cpu() if not stub else None, **entry)
        except Exception as e:          # OptimizeRefused (out of branch range), or no encoding
            code, why = b"", f"thunk: {e}"
        else:
            why = "thunk too large" if len(code) > THUNK_SLOT - (len(bp) if stub else 0) else ""
        if why:
            self._free.append(at)
            self._free_counters += [c for c in (counters, guard) if c]
            self.refused[site] = why
            return None
        t = Thunk(p, at, counters, plan.event, list(plan.progs), trap, kind, cpu, guard=guard,
                  resume_to=resume_to, budget=entry.get("budget"), slots=slots)
        if t.budget is not None:        # the budget trampoline names the program from these
            t.calls = dict(zip(_call_returns(m, at, code), plan.progs))
        t.reads_ip = kind == "kretprobe" and self._reads_ip(t)
        if trap is not None:            # breakpoints up to the stub's own, which resumes the hit
            code += bp * ((trap - at - len(code)) // len(bp)) + bp
            self._arm_stub_trap(t)
        m.text_poke(at, code)
        name = "optprobe_thunk" if not stub else f"{kind}_stub"
        t.symbol = m.symbols.add(f"bpf_{name}_{site:x}" + (f"_cpu{cpu}" if cpu else ""), at,
                                 len(code))
        if not stub:
            self.thunks[site] = t
        else:
            self.copies[(kind, id(plan.event) if tp else site, cpu)] = t
        self.refused.pop(site, None)
        self._watch(plan.progs)
        return t

    def _watch(self, progs: list["BpfProg"]) -> None:
        """Be told of updates to the prog arrays ``progs`` can tail-call through."""
        from .jit_guest import listen_weakly
        from .maps import ProgArrayMap

        for p in reach(progs):
            for mp in p.maps.values():
                if isinstance(mp, ProgArrayMap) and mp not in self._watched:
                    self._watched.add(mp)
                    listen_weakly(mp, self._prog_array_changed)

    def _prog_array_changed(self, mp: Any) -> None:
        """A prog array got a program (from user space, between runs: no CPU is inside a
        stub). Stubs whose tail calls now reach a program the guest code cannot run, or
        one that reads a frame slot they do not write, go back to the host path and are
        planned again at their next hit (a target that fits is JITed at its first call,
        in the guest)."""
        def stale(t: Thunk) -> bool:
            progs = reach(t.progs)
            if not any(mp in p.maps.values() for p in progs):
                return False
            if any(direct_eligible(p) for p in t.progs):
                return True
            if t.budget is None and any(back_edges(p) for p in progs):
                return True                 # it does not set (nor keep) the budget register
            if t.probe is None:             # a tracepoint's: its context, not a frame
                return False
            now = frame_slots(progs)
            return t.slots is not None and (now is None or not now <= t.slots)

        self._forget(stale)
        self._stub_refused.clear()
        for t in (*self.thunks.values(), *self.copies.values()):
            self._watch(t.progs)        # arrays the survivors reach through new targets

    def _entry_state(self, progs: list["BpfProg"]) -> dict[str, int]:
        """What the nested run's entry sets and a thunk must set before each image: the
        budget register (programs with backward branches: the run's instruction budget,
        counted down at each one) and the tail-call count (programs with tail calls, or
        their targets: zeroed as the kernel's prologue zeroes it). One TCC word serves
        every CPU: no CPU's turn ends inside BPF-layer text (tasks._on_block), so a
        program and its tail calls run to their end on the CPU that entered them."""
        from .context import BpfRunContext

        out: dict[str, int] = {}
        progs_now = reach(progs)
        if any(back_edges(t) for t in progs_now):
            run = self.runner._runs.get(progs[0])
            out["budget"] = run.env.insn_budget if run is not None else \
                BpfRunContext.insn_budget
        if any(tail_calls(t) for t in progs_now):
            out["tcc"] = self.runner.jit.tcc_addr
        return out

    def program_at(self, ret: int) -> tuple[Thunk, "BpfProg"] | None:
        """The thunk or stub whose image call returns to ``ret``, and that image's program."""
        for t in (*self.thunks.values(), *self.copies.values()):
            prog = t.calls.get(ret)
            if prog is not None:
                return t, prog
        return None

    def release(self, t: Thunk, prog: "BpfProg") -> None:
        """``t``'s call of ``prog`` ended without coming back (its budget ran out): the
        guard it took is this CPU's again, as trace_call_bpf's exit path drops
        bpf_prog_active, and the hit's counts are the host path's (the programs from
        ``prog`` on did not complete a run: no run counted for them)."""
        from probes.trace.bpf_trace import prog_stats

        self.m.memory.write(t.guard or self.active_addr(self.m.cpu), bytes(4))
        self.fold()
        for p in t.progs[t.progs.index(prog):]:
            prog_stats(p).run_cnt -= 1

    def _arm_stub_trap(self, t: Thunk) -> None:
        """The owner of the stub's last word: a host entry there (a code hook on the BPF
        layer's own text, ~0.3 µs, where a breakpoint goes through Unicorn's exception
        path), with the breakpoint under it as the backstop; both finish the hit."""
        from probes.kprobes import kprobes_of

        assert t.trap is not None
        if t.probe is None:
            from probes.tracepoint import tracepoints_of
            tp_done = tracepoints_of(self.m).bpf_stub_done
            done: Any = lambda _addr: tp_done()
        elif t.kind == "kretprobe":
            from probes.kretprobes import kretprobes_of
            ret_done = kretprobes_of(self.m).bpf_stub_done
            done = lambda _addr: ret_done()
        else:
            kp_done, p = kprobes_of(self.m).bpf_stub_done, t.probe
            done = lambda _addr: kp_done(p)
        self.m.register_break_addr(t.trap, done)
        if STUB_HOST_ENTRY:
            t.entry = self.m.add_host_entry(t.trap, done)

    def _ip_offset(self) -> int:
        from probes.kprobes import kprobes_of
        return kprobes_of(self.m).arch.handler_ip_offset

    def _slot(self, near: int) -> int:
        """A thunk slot in a page near the probe (in branch range), owned by the BPF layer:
        a free one (a retired stub's once no CPU can be inside it), else a new page's."""
        from probes.insn_slots import place_near

        self._reclaim()
        for i, at in enumerate(self._free):
            if abs(at - near) < (64 << 20):
                return self._free.pop(i)
        page = place_near(self.m, near, PAGE)
        self.m.memory.map(page, PAGE, PROT_READ | PROT_EXEC, "[bpf optprobe thunks]")
        self.m.claim_text(page, PAGE, RegionOwner.BPF, "[bpf optprobe thunks]")
        self._pages.append(page)
        self._free += list(range(page, page + PAGE, THUNK_SLOT))
        return self._free.pop(0)

    def _reclaim(self) -> None:
        """Retired stub slots no CPU can be in any more become free: the kernel frees a
        kprobe's insn slot after synchronize_rcu, once every CPU has passed a quiescent
        point. Here a CPU is known outside a slot when its pc is not in it and it is not
        inside a program (its bpf_prog_active is clear; a program returns into the stub
        that called it); a CPU never made has never run one."""
        if not self._retired:
            return
        m = self.m
        pc_id = m.arch.reg_id(m.arch.pc)
        pcs = [uc.reg_read(pc_id) for uc in m.ucs]
        data = bytes(m.uc.mem_read(self.active_addr(0), 8 * max(m.nr_cpus, 1)))
        guards = [m.memory.read(g, 4) for _at, _c, g in self._retired if g]
        if any(data[i] for i in range(0, len(data), 8)) or any(any(g) for g in guards):
            return                      # some CPU is inside a program: wait
        keep: list[tuple[int, int, int]] = []
        for retired in self._retired:
            at, counters, guard = retired
            if any(at <= pc < at + THUNK_SLOT for pc in pcs):
                keep.append(retired)
            else:
                self._free.append(at)
                self._free_counters += [c for c in (counters, guard) if c]
        self._retired = keep

    # -- the host's view --
    def fold(self) -> None:
        """Add what the thunks counted to the probes, events and program stats, and read
        the map values the images wrote back into the maps (a run has stopped)."""
        if not self.thunks and not self.copies:
            self._reclaim()
            return
        from probes.trace.bpf_trace import prog_stats

        uc = self.m.uc
        for t in (*self.thunks.values(), *self.copies.values()):
            hits, misses = struct.unpack("<QQ", bytes(uc.mem_read(t.counters, 16)))
            if hits or misses:
                uc.mem_write(t.counters, bytes(16))
                if t.trap is None and t.probe is not None and not t.probe.is_aggr:
                    t.probe.hits += hits + misses        # (a stub's hits: its owner's)
                if t.kind == "raw_tp":
                    t.event.misses += misses             # the link's own count
                elif t.kind != "tp":
                    t.event.nhit += hits + misses
                for prog in t.progs:
                    st = prog_stats(prog)
                    st.run_cnt += hits
                    st.misses += misses
        jit = self.runner._jit
        if jit is not None and jit.run_state is not None:
            jit.sync_in(stack=False)
        self._reclaim()

    def forget_event(self, event: Any) -> None:
        """The event's programs changed: its probes go back to the host path."""
        self._forget(lambda t: t.event is event)
        for key, handler in list(self._stub_refused.items()):
            if getattr(handler, "__self__", None) is event:
                del self._stub_refused[key]

    def detach(self) -> None:
        """Another engine is installed: every probe and tracepoint goes back to the host
        path and the stub givers this layer set are unset. The layer stays, with its
        pages, for the JIT engine if it comes back (enable_direct_calls wires it again)."""
        from probes.kprobes import kprobes_of

        self._forget(lambda _t: True)
        self._stub_refused.clear()
        kp, m = kprobes_of(self.m), self.m
        if kp.bpf_stub == self.kprobe_stub:
            kp.bpf_stub = None
        krp: Any = m.layers.get("kretprobes")
        if krp is not None and krp.bpf_direct is self:
            krp.bpf_direct = None
        tps: Any = m.layers.get("tracepoints")
        if tps is not None and tps.bpf_stub == self.tracepoint_stub:
            tps.bpf_stub = None
        if kp.optimizer is not None and kp.optimizer.direct is self:
            kp.optimizer.direct = None

    def _forget(self, which: Any) -> None:
        """Drop the thunks and stubs ``which(thunk)`` picks: an optimized probe's jump goes
        to its detour again, the stubs' owners take the host path."""
        from probes.kprobes import kprobes_of

        opt = kprobes_of(self.m).optimizer
        for addr, t in list(self.thunks.items()):
            if which(t):
                self._drop(addr)
                if opt is not None and t.probe is not None:
                    opt.forget_direct(t.probe)
        self._drop_stubs(lambda _k, t: which(t))


    def _drop(self, addr: int) -> None:
        """Forget the thunk of the probe at ``addr`` (its counts folded first); its slot is
        reused once the probe's jump no longer targets it."""
        self.fold()
        t = self.thunks.pop(addr)
        self._retire(t)

    def _drop_stubs(self, which: Any) -> None:
        """Forget the stubs ``which(key, thunk)`` picks (counts folded first). Each slot is
        filled with breakpoints and retired: a CPU that stopped inside it (a limit, or
        another CPU's turn) must not go on in another probe's code, so it is reused only
        once no CPU can be inside (``_reclaim``)."""
        keys = [k for k, t in self.copies.items() if which(k, t)]
        if not keys:
            return
        self.fold()
        bp = self.m.arch.breakpoint
        for key in keys:
            t = self.copies.pop(key)
            assert t.trap is not None
            self.m.unregister_break_addr(t.trap)
            if t.entry is not None:
                self.m.remove_host_entry(t.entry)
            self.m.text_poke(t.addr, bp * (THUNK_SLOT // len(bp)))
            self._retire(t)
        self._reclaim()

    def _retire(self, t: Thunk) -> None:
        """The slot and words of a dropped thunk or stub wait for _reclaim; its symbol goes
        now (a reused slot is named by its new owner only)."""
        self._retired.append((t.addr, t.counters, t.guard))
        if t.symbol is not None:
            self.m.symbols.remove(t.symbol)


def _call_returns(m: "Machine", at: int, code: bytes) -> list[int]:
    """The return addresses of a thunk's image calls, in order (capstone's call group:
    no arch's mnemonics here)."""
    import capstone

    cs = capstone.Cs(m.arch.cs_arch, m.arch.cs_mode)
    cs.detail = True
    return [i.address + i.size for i in cs.disasm(code, at) if i.group(capstone.CS_GRP_CALL)]


def disable_direct_calls(machine: "Machine") -> None:
    """Another engine is installed: the JIT's thunks and stubs go (DirectCalls.detach)."""
    dc = direct_calls_of(machine)
    if dc is not None:
        dc.detach()


def direct_calls_of(machine: "Machine") -> DirectCalls | None:
    """The machine's thunks, if the JIT engine made them possible."""
    dc = machine.layers.get("bpf_direct_calls")
    return dc if isinstance(dc, DirectCalls) else None


def enable_direct_calls(machine: "Machine", runner: ProbeJit) -> DirectCalls:
    """Let optimized probes call JITed programs from a thunk, and plain kprobes and
    kretprobes from a stub (``--bpf-engine jit``)."""
    from probes.kprobes import kprobes_of

    dc = direct_calls_of(machine)
    if dc is None:
        dc = machine.layers["bpf_direct_calls"] = DirectCalls(machine, runner)
    kp = kprobes_of(machine)
    if kp.bpf_stub is None:
        kp.bpf_stub = dc.kprobe_stub
    krp: Any = machine.layers.get("kretprobes")
    if krp is not None and krp.bpf_direct is None:
        krp.bpf_direct = dc
    tps: Any = machine.layers.get("tracepoints")
    if tps is not None and tps.bpf_stub is None:
        tps.bpf_stub = dc.tracepoint_stub
    opt = kp.optimizer
    if opt is not None and opt.direct is None:
        opt.direct = dc
    return dc
