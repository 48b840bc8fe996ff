"""`emu run` options of the probe layer: --kprobe, --kretprobe, --optimize, --ftrace-filter and
--trace-out; the probe table (stderr) and the "probes" list of --stats at exit."""
from __future__ import annotations

import argparse
import sys
from typing import IO, Any

from emu.session import Session
from probes.kprobes import Kprobe, Kprobes, kprobes_of, probe_kind
from probes.location import LocationError


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kprobe", action="append", default=[], metavar="SYM[+OFF]|ADDR",
                   help="place a kprobe (repeatable)")
    p.add_argument("--kretprobe", action="append", default=[], metavar="SYM|ADDR",
                   help="place a return probe on a function (repeatable)")
    p.add_argument("--optimize", action="store_true",
                   help="let eligible kprobes be jump-optimized (after their first hit)")
    p.add_argument("--ftrace-filter", action="append", default=[], metavar="GLOB",
                   help="function tracer on functions matching GLOB (repeatable, or comma-separated)")
    p.add_argument("--trace-out", metavar="FILE", help="write trace lines to FILE (default: stderr)")
    from probes import module, text_poke_cli
    module.add_run_options(p)          # --module: loaded before the probes that name MOD:SYM
    text_poke_cli.add_run_options(p)   # --text-poke, --flip-static-key


def kprobe_from_spec(spec: str) -> Kprobe:
    """`SYM`, `SYM+OFF` or an address (0x...), as --kprobe and `emu inspect` take them."""
    try:
        return Kprobe.at(spec)
    except LocationError:
        from emu.errors import UsageError
        raise UsageError(f"bad probe location {spec!r} (SYM, SYM+OFF or ADDR)") from None


def attach_from_args(session: Session, args: argparse.Namespace) -> None:
    from probes import module, text_poke_cli
    module.attach_from_args(session, args)
    text_poke_cli.attach_from_args(session, args)
    specs = getattr(args, "kprobe", None) or []
    rspecs = getattr(args, "kretprobe", None) or []
    filters = [f for spec in getattr(args, "ftrace_filter", None) or [] for f in spec.split(",") if f]
    if filters:
        session.attach(TraceReport(session, filters, getattr(args, "trace_out", None),
                                   getattr(args, "stderr", None) or sys.stderr))
    if not specs and not rspecs:
        return
    kprobes = kprobes_of(session.machine)
    if getattr(args, "optimize", False):
        from probes.optprobes import enable_optprobes
        enable_optprobes(kprobes)
    for spec in specs:
        kprobes.register_kprobe(kprobe_from_spec(spec))
    if rspecs:
        from probes.kretprobes import Kretprobe, kretprobes_of
        krp = kretprobes_of(session.machine)
        for spec in rspecs:
            krp.register_kretprobe(Kretprobe(kp=kprobe_from_spec(spec)))
    session.attach(ProbeReport(kprobes))


class TraceReport:
    """The function tracer of `--ftrace-filter`, and its summary in --stats."""

    def __init__(self, session: Session, filters: list[str], path: str | None,
                 stderr: IO[str]) -> None:
        from probes.ftrace import FunctionTracer
        # Not closed at exit: `--event` lines may share the file (one ring buffer, one stream).
        self.out = open(path, "w") if path else stderr
        self.tracer = FunctionTracer(session.machine, filters, self.out)
        if not self.tracer.enabled_sites:
            from emu.errors import UsageError
            raise UsageError(f"--ftrace-filter {','.join(filters)}: no ftrace site matches "
                             "(build with -pg -mfentry -mnop-mcount / -fpatchable-function-entry=2)")

    def report(self, out: IO[str]) -> None:
        self.out.flush()

    def stats(self) -> dict[str, Any]:
        return {"ftrace": {"filters": self.tracer.ops.filters, "sites": self.tracer.enabled_sites,
                           "lines": self.tracer.lines}}


class ProbeReport:
    """The exit table (stderr) and the "probes" list of the --stats JSON."""

    def __init__(self, kprobes: Kprobes) -> None:
        self.kprobes = kprobes

    def rows(self) -> list[dict[str, Any]]:
        syms, rows = self.kprobes.m.symbols, []
        for p in self.kprobes.probes():
            addr = p.addr
            assert addr is not None                 # a registered probe has its address
            sym, kind = syms.find(addr), probe_kind(p)
            row = {
                "symbol": sym.name if sym else None,
                "offset": addr - sym.addr if sym else None,
                # an optimized probe is not stepped: its detour runs the replaced code
                "addr": addr, "kind": kind,
                "step": "optimized" if kind == "optimized" else p.ainsn.kind,
                "insn": p.ainsn.mnemonic, "hits": p.hits, "nmissed": p.nmissed,
            }
            if p.symbol_name and syms.is_ifunc(p.symbol_name):
                row["ifunc"] = p.symbol_name           # the name given; "symbol" is the guest's choice
            if p.kretprobe is not None:
                row["returns"] = p.kretprobe.hits
                row["dropped"] = p.kretprobe.ndropped       # frames left by longjmp/unwinding
                row["nmissed"] = p.nmissed + p.kretprobe.nmissed   # as kprobe_profile
            rows.append(row)
        return rows

    def report(self, out: IO[str]) -> None:
        rows = self.rows()
        out.write(f"{'PROBE':<32} {'ADDR':>18}  {'KIND':<10} {'STEP':<12} {'HITS':>10} {'NMISSED':>8}\n")
        for r in rows:
            name = f"{r['symbol']}+{r['offset']:#x}" if r["symbol"] else f"{r['addr']:#x}"
            name = f"{r['ifunc']} -> {name}" if "ifunc" in r else name
            out.write(f"{name:<32} {r['addr']:>#18x}  {r['kind']:<10} {r['step']:<12} "
                      f"{r['hits']:>10} {r['nmissed']:>8}\n")

    def stats(self) -> dict[str, Any]:
        return {"probes": self.rows()}
