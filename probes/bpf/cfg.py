"""The verifier's structural pass (kernel/bpf/verifier.c: resolve_pseudo_ldimm64,
check_subprogs, check_cfg).

Each instruction on its own (valid opcode, registers, reserved fields, lddw
pairs, helper ids), then the shape of the program: jump targets inside
their subprogram and never into an lddw's second half, every subprogram
ending in exit or jump, no recursion, bounded call depth, no unreachable
instruction, and no instruction from which no exit can be reached (a loop
with no way out). Bounded loops that can exit are allowed, as in kernels
since 5.3; the machine's instruction budget stops them at run time.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Callable

from .errors import VerifierError
from .isa import (
    BPF_ARSH, BPF_COMPLEXITY_LIMIT_INSNS, BPF_DIV, BPF_LSH, BPF_MOD, BPF_PSEUDO_BTF_ID,
    BPF_PSEUDO_FUNC, BPF_RSH, MAX_CALL_FRAMES, OPCODES, Insn, check_fields,
    check_lddw_second,
)

# kinds whose successor is only the next instruction
_LINEAR = {"alu", "alu64", "neg", "neg64", "end", "ldx", "ldxsx", "st", "stx", "atomic",
           "ldabs", "ldind", "callx"}


@dataclass
class Subprog:
    """A function of the program: slots [start, end)."""

    start: int
    end: int
    callees: set[int] = field(default_factory=set)


@dataclass
class Cfg:
    """What the structural pass learnt. ``kinds[pc]`` is None for the second
    slot of an lddw; ``subprog_of[pc]`` indexes ``subprogs``."""

    insns: list[Insn]
    kinds: list[str | None]
    subprogs: list[Subprog]
    subprog_of: list[int]
    reachable: set[int]
    warnings: list[str]


def jump_target(insn: Insn, kind: str, pc: int) -> int | None:
    if kind in ("jmp", "jmp32", "ja"):
        return pc + 1 + insn.off
    if kind == "ja32" or (kind == "call" and insn.src_reg == 1):
        return pc + 1 + insn.imm
    if kind == "lddw" and insn.src_reg == BPF_PSEUDO_FUNC:
        return pc + 1 + insn.imm
    return None


def successors(insn: Insn, kind: str, pc: int) -> list[int]:
    """Control-flow successors inside the same function (calls fall through)."""
    if kind in _LINEAR or kind == "call":
        return [pc + 1]
    if kind == "lddw":
        return [pc + 2]
    if kind in ("ja", "ja32"):
        return [jump_target(insn, kind, pc)]  # type: ignore[list-item]
    if kind in ("jmp", "jmp32"):
        return [pc + 1, pc + 1 + insn.off]
    return []  # exit


class _Checker:
    """Runs the structural checks; ``fail`` raises with the log so far."""

    def __init__(self, insns: list[Insn], lenient: bool,
                 check_insn: Callable[[Insn, str, int], str | None], log: list[str]):
        self.insns = insns
        self.lenient = lenient
        self.check_insn = check_insn
        self.log = log

    def fail(self, reason: str, pc: int | None = None, err: int = errno.EINVAL) -> None:
        self.log.append(f"{pc}: {reason}" if pc is not None else reason)
        raise VerifierError(reason, pc, "\n".join(self.log), err)

    def decode_kinds(self) -> list[str | None]:
        insns, kinds = self.insns, []
        pc = 0
        while pc < len(insns):
            insn = insns[pc]
            why = check_fields(insn)
            if why:
                self.fail(why, pc)
            kind = OPCODES[insn.code].kind
            kinds.append(kind)
            if kind == "lddw":
                if pc + 1 >= len(insns):
                    self.fail("invalid BPF_LD_IMM insn (incomplete lddw)", pc)
                why = check_lddw_second(insns[pc + 1])
                if why:
                    self.fail(why, pc + 1)
                if insn.src_reg == BPF_PSEUDO_BTF_ID:
                    self.fail("kernel variables (BPF_PSEUDO_BTF_ID) are not supported", pc)
                why = self.check_insn(insn, kind, pc)
                if why:
                    self.fail(why, pc)
                kinds.append(None)
                pc += 2
                continue
            self.check_operands(insn, kind, pc)
            pc += 1
        return kinds

    def check_operands(self, insn: Insn, kind: str, pc: int) -> None:
        """Checks the kernel makes that the ISA does not require."""
        if kind == "callx" and not self.lenient:
            self.fail(f"unknown opcode {insn.code:02x}", pc)
        if kind == "call" and insn.src_reg == 0:
            why = self.check_insn(insn, kind, pc)
            if why:
                self.fail(why, pc)
        if kind == "call" and insn.src_reg == 2:
            self.fail(f"kernel function calls are not supported (btf id {insn.imm})", pc)
        if self.lenient or kind not in ("alu", "alu64") or insn.is_reg_src:
            return
        if insn.op in (BPF_DIV, BPF_MOD) and insn.imm == 0:
            self.fail("div by zero", pc)
        width = 64 if kind == "alu64" else 32
        if insn.op in (BPF_LSH, BPF_RSH, BPF_ARSH) and not 0 <= insn.imm < width:
            self.fail(f"invalid shift {insn.imm}", pc)

    def jumps(self, kinds: list[str | None]):
        """(pc, kind, target) of every instruction that names another one."""
        for pc, kind in enumerate(kinds):
            if kind is not None:
                target = jump_target(self.insns[pc], kind, pc)
                if target is not None:
                    yield pc, kind, target

    def check_targets(self, kinds: list[str | None]) -> list[int]:
        """Every jump lands on an instruction; returns subprogram starts."""
        starts = {0}
        for pc, kind, target in self.jumps(kinds):
            if not 0 <= target < len(kinds):
                self.fail(f"jump out of range from insn {pc} to {target}", pc)
            if kinds[target] is None:
                self.fail(f"jump into the middle of ldimm64 insn {target - 1}", pc)
            if kind in ("call", "lddw"):
                starts.add(target)
        return sorted(starts)

    def split_subprogs(self, kinds: list[str | None], starts: list[int]) -> tuple[list[Subprog], list[int]]:
        subprogs = [Subprog(s, e) for s, e in zip(starts, starts[1:] + [len(kinds)])]
        owner = [0] * len(kinds)
        for idx, sp in enumerate(subprogs):
            owner[sp.start:sp.end] = [idx] * (sp.end - sp.start)
            last = sp.end - 1 if kinds[sp.end - 1] is not None else sp.end - 2
            if kinds[last] not in ("exit", "ja", "ja32"):
                self.fail("last insn is not an exit or jmp", last)
        for pc, kind, target in self.jumps(kinds):
            if kind in ("call", "lddw"):
                if kind == "call":
                    subprogs[owner[pc]].callees.add(owner[target])
            elif owner[target] != owner[pc]:
                self.fail(f"jump out of range from insn {pc} to {target}", pc)
        return subprogs, owner

    def check_call_graph(self, subprogs: list[Subprog]) -> None:
        """No recursion, at most MAX_CALL_FRAMES nested frames. Depths are
        memoised, so a hostile call graph costs linear time."""
        depth: dict[int, int] = {}
        active: list[int] = []

        def visit(idx: int) -> int:
            if idx in active:
                self.fail(f"recursive call to the function at insn {subprogs[idx].start}",
                          subprogs[active[-1]].start)
            if idx not in depth:
                if len(active) >= MAX_CALL_FRAMES:  # also bounds this recursion
                    self.fail(f"the call stack of {len(active) + 1} frames is too deep",
                              subprogs[idx].start)
                active.append(idx)
                depth[idx] = 1 + max((visit(c) for c in sorted(subprogs[idx].callees)), default=0)
                active.pop()
            return depth[idx]
        frames = visit(0)
        if frames > MAX_CALL_FRAMES:
            self.fail(f"the call stack of {frames} frames is too deep", subprogs[0].start)

    def check_flow(self, kinds: list[str | None], warnings: list[str]) -> set[int]:
        """Reachability from the entry, and a way to an exit from everywhere."""
        reach, todo = set(), [0]
        preds: dict[int, list[int]] = {}
        while todo:
            pc = todo.pop()
            if pc in reach:
                continue
            reach.add(pc)
            kind = kinds[pc]
            assert kind is not None
            nxt = successors(self.insns[pc], kind, pc)
            if kind == "call" and self.insns[pc].src_reg == 1:
                nxt = nxt + [pc + 1 + self.insns[pc].imm]
            for s in nxt:
                preds.setdefault(s, []).append(pc)
                todo.append(s)
        for pc, kind in enumerate(kinds):
            if kind is not None and pc not in reach:
                if not self.lenient:
                    self.fail(f"unreachable insn {pc}", pc)
                warnings.append(f"{pc}: warning: unreachable insn {pc}")
        self._check_exits(kinds, reach, preds)
        return reach

    def _check_exits(self, kinds: list[str | None], reach: set[int],
                     preds: dict[int, list[int]]) -> None:
        # Walk backwards from every exit (and every LD_ABS/IND, which may end
        # the program); whatever is reachable but never met loops forever.
        alive = set()
        todo = [pc for pc in reach if kinds[pc] in ("exit", "ldabs", "ldind")]
        while todo:
            pc = todo.pop()
            if pc in alive:
                continue
            alive.add(pc)
            todo.extend(preds.get(pc, ()))
        stuck = reach - alive
        if stuck:
            # name the head of the loop: a stuck instruction a later one jumps back to
            heads = [pc for pc in stuck if any(p >= pc for p in preds.get(pc, ()) if p in stuck)]
            at = min(heads or stuck)
            self.fail(f"infinite loop detected at insn {at}", at)


def check_structure(insns: list[Insn], lenient: bool,
                    check_insn: Callable[[Insn, str, int], str | None], log: list[str]) -> Cfg:
    """Run the structural pass; raise VerifierError on the first problem.
    ``check_insn`` vets what depends on the program's environment (helper
    ids, map fds of lddw) and returns a reason to refuse, or None."""
    checker = _Checker(insns, lenient, check_insn, log)
    if not insns:
        checker.fail("the program has no instructions")
    if len(insns) > BPF_COMPLEXITY_LIMIT_INSNS:
        checker.fail(f"program of {len(insns)} insns is too large "
                     f"(limit {BPF_COMPLEXITY_LIMIT_INSNS})", None, errno.E2BIG)
    kinds = checker.decode_kinds()
    starts = checker.check_targets(kinds)
    subprogs, owner = checker.split_subprogs(kinds, starts)
    checker.check_call_graph(subprogs)
    for sp in subprogs:
        log.append(f"func#{subprogs.index(sp)} @{sp.start}")
    warnings: list[str] = []
    reach = checker.check_flow(kinds, warnings)
    return Cfg(insns, kinds, subprogs, owner, reach, warnings)

