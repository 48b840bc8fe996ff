"""Python handlers called from C (probes/native, issue 14): kprobes on ftrace sites whose
only handler is a Python pre handler are served by C's ftrace caller, which calls the
handler once with the reused pt_regs view (FS_PRE). Handlers see the same registers
(ip as after a breakpoint, the site's sp, arguments), may change registers and ip (a
redirect leaves the trampoline for the new ip), and the hits, misses, guest output,
cycles and their reasons are the Python path's on both arches."""
from __future__ import annotations

from conftest import firmware_elf, needs_native
from probes.kprobes import Kprobe
from probes.testing import ProbeLab


def _run(arch: str, native: bool, monkeypatch) -> dict:
    monkeypatch.setenv("KPROBE_EMU_NATIVE", "1" if native else "0")
    lab = ProbeLab.load(str(firmware_elf(arch, "recurse.ftrace")))
    m = lab.machine
    m.enable_cycle_model()
    a1 = m.arch.args[0]
    seen: list[tuple] = []
    fib_addr = lab.addr_of("fib")

    def record(p, regs):
        seen.append((p.symbol_name, regs.ip, regs.arg(1), regs.sp))
        return 0

    def clamp(p, regs):                       # sum_rec(n): never deeper than 3
        seen.append((p.symbol_name, regs.ip, regs.arg(1)))
        if regs.arg(1) > 3:
            regs[a1] = 3
        return 0

    def redirect(p, regs):                    # factorial(n) runs fib(n) instead
        seen.append((p.symbol_name, regs.ip, regs.arg(1)))
        if regs.arg(1) == 5:
            regs.ip = fib_addr
            return 1
        return 0

    probes = []
    for func, handler in (("fib", record), ("sum_rec", clamp), ("factorial", redirect),
                          ("is_even", None)):
        p = Kprobe(symbol_name=func, pre_handler=handler)
        lab.kprobes.register_kprobe(p)
        assert p.ainsn.ftrace
        probes.append(p)
    res = lab.run(timeout=120)
    lab.kprobes.probes()                                  # folds C's counters
    d = lab.kprobes.native
    out = {"exit": res.exit_code, "stdout": lab.stdout, "cycles": m.clock.cycles,
           "breakdown": m.clock.breakdown(), "seen": seen,
           "probes": [(p.symbol_name, p.hits, p.nmissed) for p in probes]}
    handled = sum(rec.handled for rec, _p in d.ftrace.values()) if d is not None else 0
    return {"out": out, "handled": handled}


@needs_native
def test_ftrace_pre_handlers_called_from_c(arch, monkeypatch):
    c, py = _run(arch, True, monkeypatch), _run(arch, False, monkeypatch)
    assert c["out"] == py["out"]
    out = c["out"]
    assert out["exit"] == 0 and len(out["seen"]) > 100
    assert any(s[0] == "factorial" and s[2] == 5 for s in out["seen"])
    hits = sum(h for _f, h, _n in out["probes"])
    assert c["handled"] == hits and py["handled"] == 0     # every hit through C's caller
