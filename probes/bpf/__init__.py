"""The eBPF virtual machine: ISA, assembler/disassembler, verifier,
interpreter and compiled engine, maps, helpers, and a loader for
clang-compiled objects. It knows nothing of probes: a caller hands a
program its context bytes, a guest-memory accessor and a run environment.

    from probes import bpf
    code = bpf.assemble("mov r0, 1\\nexit")
    bpf.run(code)                       # -> 1
    obj = bpf.load_object("prog.o")
    obj.programs["handler"].run(ctx_bytes, bpf.BpfRunContext(pid=42))
"""
from .asm import assemble, assemble_insns
from .context import BpfRunContext, FlatGuestMemory, GuestMemory
from .disasm import disassemble, disassemble_llvm, format_insn
from .errors import (
    AsmError, BpfError, BpfRuntimeError, LoaderError, MapError, VerifierError,
)
from .helpers import KERNEL_HELPERS, BpfArgType, BpfFuncProto, BpfRetType
from .isa import Insn, decode, encode
from .maps import (
    BPF_ANY, BPF_EXIST, BPF_NOEXIST, BpfMap, BpfMapType, create_map,
)
from .program import BpfProg
from .program import run as _run_vm
from .prog_types import BpfProgType

ENGINES = ("interp", "python", "jit")


def run(code: bytes, mem: bytes = b"", *, engine: str = "jit", arch: str | None = None,
        env: BpfRunContext | None = None, maps: dict[int, BpfMap] | None = None,
        helpers: dict[int, BpfFuncProto] | None = None) -> int:
    """Verify and run raw bytecode the conformance way (r1 = a writable copy of
    ``mem``, r2 = its length) and return r0.

    ``engine``: "interp" (the reference interpreter), "python" (the compiled Python
    path, jit.py) or "jit" (the program JITed to ``arch``'s machine code and run in a
    scratch machine of that arch, jit_guest.py). For compatibility, "jit" without an
    ``arch`` is the compiled Python path, as before the guest JIT existed.
    """
    if engine == "jit" and arch is not None:
        from .jit_guest import run_prog

        prog = BpfProg.from_bytes(code, maps=dict(maps or {}),
                                  helpers=helpers if helpers is not None else KERNEL_HELPERS)
        return run_prog(prog, bytearray(mem), env, arch=arch)[0]
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}")
    return _run_vm(code, mem, env=env, maps=maps, helpers=helpers,
                   engine="jit" if engine == "python" else engine)


def verify(code: bytes, prog_type: BpfProgType = BpfProgType.BPF_PROG_TYPE_UNSPEC,
           log_level: int = 1, **kw: object) -> str:
    """Verify raw bytecode; returns the log or raises VerifierError."""
    return BpfProg.from_bytes(code, prog_type=prog_type, **kw).load(log_level)  # type: ignore[arg-type]


def load_object(path: str, **kw: object) -> "BpfObject":
    """Load a clang ``-target bpf`` ELF object (see loader.py)."""
    from .loader import load_object as _load

    return _load(path, **kw)  # type: ignore[arg-type]


def __getattr__(name: str):
    # BpfObject on first use: the loader imports pyelftools, ~0.1 s of every `emu` start-up.
    if name == "BpfObject":
        from .loader import BpfObject
        return BpfObject
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "assemble", "assemble_insns", "disassemble", "disassemble_llvm", "format_insn",
    "run", "verify", "load_object", "BpfObject", "BpfProg", "BpfProgType", "BpfRunContext",
    "GuestMemory", "FlatGuestMemory", "BpfError", "VerifierError", "BpfRuntimeError",
    "AsmError", "MapError", "LoaderError", "BpfMap", "BpfMapType", "create_map",
    "BPF_ANY", "BPF_NOEXIST", "BPF_EXIST", "Insn", "decode", "encode",
    "KERNEL_HELPERS", "BpfFuncProto", "BpfArgType", "BpfRetType",
]
