"""A loaded program (struct bpf_prog) and the standalone ``run``.

``BpfProg.run(ctx, env)`` is what the trace layer calls on a probe hit:
the context bytes are mapped at the machine's context address (r1), the
environment supplies the task/CPU/clock facts and guest memory. The first
run verifies the program (``load``) and compiles it for the fast engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .context import BpfRunContext, sk_buff, xdp_md
from .errors import VerifierError
from .helpers import KERNEL_HELPERS, BpfFuncProto
from .isa import (
    BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE, Insn, decode, encode,
)
from .maps import BpfMap
from .memory import CTX_ADDR, PACKET_ADDR
from .prog_types import PACKET_TYPES, PROG_TYPES, BpfProgType, ProgTypeInfo
from .runtime import BpfRun

ENGINES = ("jit", "interp")


@dataclass(eq=False)
class BpfProg:
    """A program as the kernel holds it after BPF_PROG_LOAD.

    Attributes: ``insns`` (slots after relocation), ``prog_type``,
    ``name``, ``maps`` (fd -> BpfMap, what lddw map_fd immediates refer
    to), ``license``, ``section`` (ELF section it came from), ``helpers``
    (id -> proto), ``fd``, ``attach_kind``/``attach_point`` (from the
    section name: "kprobe"/"do_sys_openat2", "tracepoint"/"syscalls/..."),
    ``verifier_log`` (after ``load``).
    """

    insns: list[Insn] = field(repr=False)
    prog_type: BpfProgType = BpfProgType.BPF_PROG_TYPE_UNSPEC
    name: str = ""
    maps: dict[int, BpfMap] = field(default_factory=dict, repr=False)
    license: str = ""
    section: str = ""
    helpers: dict[int, BpfFuncProto] = field(default_factory=lambda: KERNEL_HELPERS, repr=False)
    fd: int | None = None
    attach_kind: str = ""
    attach_point: str = ""
    verifier_log: str = field(default="", repr=False)
    ctx_size: int | None = None   # context bytes for the target arch (kprobe: its pt_regs)
    max_ctx_offset: int = 0       # aux->max_ctx_offset: the verifier's highest ctx byte + 1
    max_tp_access: int = 0        # aux->max_tp_access: the same for a tracepoint's buffer
    # context byte offsets (8-byte slots) the verifier saw read; None: unknown, any of them
    ctx_reads: set[int] | None = field(default=None, repr=False)
    loaded: bool = False
    _compiled: Any = field(default=None, repr=False)

    @classmethod
    def from_bytes(cls, code: bytes, **kw: Any) -> "BpfProg":
        return cls(decode(code), **kw)

    @property
    def type_info(self) -> ProgTypeInfo:
        return PROG_TYPES[self.prog_type]

    def bytecode(self) -> bytes:
        return encode(self.insns)

    def map_for(self, insn: Insn) -> BpfMap:
        """The map an lddw refers to: by fd, or by index for *_IDX sources."""
        if insn.src_reg in (BPF_PSEUDO_MAP_IDX, BPF_PSEUDO_MAP_IDX_VALUE):
            fds = sorted(self.maps)
            if not 0 <= insn.imm < len(fds):
                raise VerifierError(f"map index {insn.imm} out of range")
            return self.maps[fds[insn.imm]]
        m = self.maps.get(insn.imm)
        if m is None:
            raise VerifierError(f"fd {insn.imm} is not pointing to valid bpf_map")
        return m

    def load(self, log_level: int = 0) -> str:
        """Verify the program (BPF_PROG_LOAD); returns the verifier log."""
        from .verifier import verify

        self.verifier_log = verify(self, log_level)
        self.loaded = True
        return self.verifier_log

    def ensure_loaded(self) -> None:
        if not self.loaded:
            self.load()

    def compiled(self) -> Any:
        if self._compiled is None:
            from .jit import compile_prog

            self._compiled = compile_prog(self)
        return self._compiled

    def run(self, ctx: bytes | bytearray = b"", env: BpfRunContext | None = None, *,
            packet: bytes | bytearray | None = None, engine: str = "jit") -> int:
        """Run once and return r0 (u64).

        ``ctx``: the context image; a bytearray is used in place, so a
        program's writes to a writable context reach the caller. For packet
        program types, pass ``packet`` and an empty ctx: the machine builds
        xdp_md / __sk_buff pointing at it. Raises VerifierError on first use
        if the program is refused, BpfRuntimeError on a fault.
        """
        if not self.loaded:
            self.load()
        if env is None:
            env = BpfRunContext()
        ctx_buf = ctx if type(ctx) is bytearray else bytearray(ctx)
        if packet is not None and not ctx_buf and self.prog_type in PACKET_TYPES:
            ctx_buf = (xdp_md(PACKET_ADDR, len(packet))
                       if self.prog_type == BpfProgType.BPF_PROG_TYPE_XDP
                       else sk_buff(PACKET_ADDR, bytes(packet)))
        run = BpfRun(self, ctx_buf, env, packet)
        if engine == "jit":
            compiled = self._compiled if self._compiled is not None else self.compiled()
            result = compiled.execute(run, CTX_ADDR, len(ctx_buf))
        elif engine == "interp":
            from .interpreter import Interpreter

            result = Interpreter(run, self.helpers).execute(CTX_ADDR, len(ctx_buf))
        else:
            raise ValueError(f"engine must be one of {ENGINES}")
        run.finish()
        return result


def run(code: bytes, mem: bytes = b"", *, env: BpfRunContext | None = None,
        maps: dict[int, BpfMap] | None = None, helpers: dict[int, BpfFuncProto] | None = None,
        engine: str = "jit") -> int:
    """Verify, then run raw bytecode the way the conformance suite does:
    r1 = address of a writable copy of ``mem``, r2 = its length, a 512-byte
    stack at r10. Returns r0 as an unsigned 64-bit integer.

    Raises VerifierError when refused, BpfRuntimeError on a run-time fault.
    """
    prog = BpfProg.from_bytes(code, maps=dict(maps or {}),
                              helpers=helpers if helpers is not None else KERNEL_HELPERS)
    return prog.run(bytearray(mem), env, engine=engine)


