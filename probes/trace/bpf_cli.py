"""`emu run` options of the BPF trace layer: `--bpf OBJ[:PROG]` (repeatable) and
`--dump-maps`. `emu trace` reuses the same provider (`attach_from_args`).

Each object is opened, loaded for the guest's arch and every program in it attached by
its SEC name (`OBJ:PROG`: only PROG). While the guest runs, bpf_trace_printk messages are
written as trace_pipe lines, and every ring-buffer record and perf sample as one line
(`--bpf-format hex`, the default) or one JSON object with the raw bytes
(`--bpf-format json`), to `BpfAttachment.out` (stderr unless a caller sets it). At exit
`--dump-maps` prints every map in `bpftool map dump -j` layout."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import IO, Any, cast

from emu.errors import UsageError
from emu.session import Session

# The BPF machine and loader are imported when --bpf is given: `emu run` without it must
# not pay their ~0.2 s of import time.


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bpf", action="append", default=[], metavar="OBJ[:PROG]",
                   help="load a clang BPF object and attach its programs by SEC name "
                        "(kprobe/SYM, kretprobe/SYM, ksyscall/NAME); OBJ:PROG for one (repeatable)")
    p.add_argument("--dump-maps", action="store_true",
                   help="print every BPF map at exit (bpftool map dump -j layout)")
    p.add_argument("--bpf-format", choices=("hex", "json"), default="hex",
                   help="ring-buffer records and perf samples as hex lines or JSON objects")
    p.add_argument("--bpf-engine", choices=("interp", "python", "jit"), default="jit",
                   help="how programs run on hits: interpreter, compiled Python, or JITed "
                        "guest code run on the traced CPU (the default; a program the JIT "
                        "cannot take runs compiled Python, and a line at exit says why)")


def split_spec(spec: str) -> tuple[str, str | None]:
    """`OBJ` or `OBJ:PROG`; a path that exists as given wins over a split."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, prog = spec.rpartition(":")
    return path, prog or None


def attach_from_args(session: Session, args: Any) -> None:
    specs = getattr(args, "bpf", None) or []
    if not specs:
        if getattr(args, "dump_maps", False):
            raise UsageError("--dump-maps needs --bpf OBJ")
        return
    att = BpfAttachment(session, specs, getattr(args, "dump_maps", False),
                        getattr(args, "bpf_format", "hex"), getattr(args, "stderr", None))
    session.attach(att)
    from probes.bpf.jit_guest import install_engine
    install_engine(session.machine, getattr(args, "bpf_engine", "jit"))
    att.jit_all()


class BpfAttachment:
    """The objects of `--bpf`, their output while the guest runs, and the map dump."""

    def __init__(self, session: Session, specs: list[str], dump_maps: bool = False,
                 fmt: str = "hex", out: IO[str] | None = None) -> None:
        from probes.bpf.libbpf import BpfObject
        from probes.bpf.maps import PerfEventArrayMap, RingbufMap
        from probes.trace.bpf_trace import bpf_trace_of
        self.m = session.machine
        self.dump = dump_maps
        self.fmt = fmt
        self.out = out
        self.objects: list[Any] = []            # libbpf BpfObjects
        self.links: list[Any] = []              # their attached programs
        self.records = 0
        trace = bpf_trace_of(self.m)
        trace.printk_sink = self.printk
        for spec in specs:
            path, prog = split_spec(spec)
            if not os.path.exists(path):
                raise UsageError(f"--bpf {spec}: no such file {path!r}")
            obj = BpfObject.open(path, nr_cpus=self.m.nr_cpus).load(self.m)
            self.links += obj.attach_all(self.m, prog)
            for name, mp in sorted(obj.maps.items()):
                if isinstance(mp, RingbufMap):
                    trace.ring_buffer(mp, self._record_cb(name, None))
                elif isinstance(mp, PerfEventArrayMap):
                    trace.perf_buffer(mp, lambda cpu, data, name=name:
                                      self._record(name, cpu, data))
            self.objects.append(obj)

    def jit_all(self) -> None:
        """Under the JIT engine: JIT the attached programs now, as BPF_PROG_LOAD does."""
        from probes.bpf.jit_guest import jit_load
        for link in self.links:
            jit_load(self.m, link.prog)

    @property
    def stream(self) -> IO[str]:
        return self.out or sys.stderr

    def printk(self, text: str) -> None:
        """A bpf_trace_printk message as trace_pipe shows it."""
        comm, pid = self.m.task
        ns = self.m.clock.monotonic_ns()
        stamp = f"{ns // 10**9:5d}.{ns // 1000 % 10**6:06d}"
        self.stream.write(f"{comm:>16}-{pid:<7} [000] d..31 {stamp}: "
                          f"bpf_trace_printk: {text.rstrip(chr(10))}\n")

    def _record_cb(self, name: str, cpu: int | None):
        return lambda data: self._record(name, cpu, data)

    def _record(self, name: str, cpu: int | None, data: bytes) -> None:
        self.records += 1
        kind = "ringbuf" if cpu is None else "perf"
        if self.fmt == "json":
            obj: dict[str, Any] = {"map": name, "kind": kind, "bytes": list(data)}
            if cpu is not None:
                obj["cpu"] = cpu
            self.stream.write(json.dumps(obj) + "\n")
        else:
            where = f"{name}" if cpu is None else f"{name} cpu {cpu}"
            self.stream.write(f"bpf {kind} {where}: {data.hex()}\n")

    def report(self, out: IO[str]) -> None:
        from probes.bpf.jit_guest import engine_info
        for obj in self.objects:
            for name, prog in sorted(obj.programs.items()):
                why = engine_info(self.m, prog).get("jit_fallback")
                if why is not None:
                    self.stream.write(f"bpf: {name} ran compiled Python, not JITed: {why}\n")
        if self.dump:
            dumps = [d for obj in self.objects for d in obj.dump_maps()]
            out.write(json.dumps(dumps) + "\n")

    def stats(self) -> dict[str, Any]:
        from probes.bpf.jit_guest import engine_info
        from probes.trace.bpf_trace import prog_stats
        progs = []
        for obj in self.objects:
            for name, prog in sorted(obj.programs.items()):
                st = prog_stats(prog)
                progs.append({"name": name, "section": prog.section, "id": st.id,
                              "run_cnt": st.run_cnt, "run_insns": st.run_insns,
                              "misses": st.misses, **engine_info(self.m, prog)})
        return {"bpf": {"programs": progs, "records": self.records,
                        "maps": [d for obj in self.objects for d in obj.dump_maps()]}}


class _MachineOnly:
    """What BpfAttachment needs of a Session: the machine."""

    def __init__(self, machine) -> None:
        self.machine = machine


class TraceBpfProvider:
    """`emu trace --bpf OBJ[:PROG] [--dump-maps]`: programs attach as under `emu run`; their
    bpf_trace_printk messages become bpf_trace_printk events in the same ring buffer (so
    they interleave with the kprobe events as trace_pipe shows them), their records and
    the map dump go to the trace's stdout."""

    def add_options(self, p: argparse.ArgumentParser) -> None:
        add_run_options(p)

    def setup(self, machine, tracefs, args) -> None:
        specs = getattr(args, "bpf", None) or []
        if not specs:
            if getattr(args, "dump_maps", False):
                raise UsageError("--dump-maps needs --bpf OBJ")
            return
        from probes.trace.bpf_trace import bpf_trace_of
        att = BpfAttachment(_MachineOnly(machine), specs, args.dump_maps, args.bpf_format,
                            out=getattr(args, "stdout", None) or sys.stdout)
        bpf_trace_of(machine).printk_sink = tracefs.trace_bpf_printk
        from probes.bpf.jit_guest import install_engine
        install_engine(machine, getattr(args, "bpf_engine", "jit"))
        att.jit_all()
        args._bpf_attachment = att

    def finish(self, machine, tracefs, args, out: IO[str]) -> None:
        att = getattr(args, "_bpf_attachment", None)
        if att is not None:
            att.report(out)


def _register_trace_provider() -> None:
    from probes.trace.cli import TRACE_OPTION_PROVIDERS
    if not any(isinstance(p, TraceBpfProvider) for p in TRACE_OPTION_PROVIDERS):
        TRACE_OPTION_PROVIDERS.append(TraceBpfProvider())


_register_trace_provider()


# --- emu inspect --bpf -----------------------------------------------------------------------

def add_inspect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bpf", action="append", default=[], metavar="OBJ[:PROG]",
                   help="attach a clang BPF object's programs (JITed into the guest) and show, "
                        "for each probe, the programs on it and their image addresses")


def inspect_attach(machine: Any, args: Any) -> "BpfAttachment | None":
    """`emu inspect --bpf`: attach and JIT the programs before the inspection."""
    specs = getattr(args, "bpf", None) or []
    if not specs:
        return None
    from probes.bpf.jit_guest import install_engine
    att = BpfAttachment(cast(Any, _MachineOnly(machine)), specs, out=getattr(args, "stderr", None))
    install_engine(machine, "jit")
    att.jit_all()
    return att


def inspect_programs(att: "BpfAttachment | None", addr: int | None) -> list[dict[str, Any]]:
    """The programs attached at `addr`: name, section, and how they run (engine_info)."""
    if att is None or addr is None:
        return []
    from probes.bpf.jit_guest import engine_info
    return [{"program": link.prog.name, "section": link.prog.section,
             **engine_info(att.m, link.prog)}
            for link in att.links if getattr(link.call, "func_ip", None) == addr]


def format_programs(progs: list[dict[str, Any]]) -> list[str]:
    """`bpf:      NAME (SEC) JITed at 0x... (N bytes)` lines for `emu inspect`."""
    out = []
    for p in progs:
        if p.get("jit_image") is not None:
            how = f"JITed at {p['jit_image']:#x} ({p['jit_size']} bytes)"
        else:
            how = f"compiled Python ({p.get('jit_fallback', p['engine'])})"
        out.append(f"bpf:      {p['program']} ({p['section']}) {how}")
    return out
