"""The reserved-text registry (probes/reserved_text.py): who holds which guest text, and
patchers that consult it. Both arches: a kprobe right behind an ftrace site's patched
bytes (arm64: the site's second nop; x86: the next instruction) survives the site being
switched to a call and back, in either order; armed, optimized and ftrace text is recorded
and released."""
from __future__ import annotations

import errno
import io

import pytest

from conftest import firmware_elf
from probes.ftrace import FunctionTracer, ftrace_of
from probes.optprobes import enable_optprobes
from probes.reserved_text import ReservedText, TextBusy, TextUse, reserved_text_of
from probes.testing import ProbeLab, assert_armed

FIB_CALLS = 2155                  # recurse.ftrace: fib's entries (test_ftrace.py)


def _behind_site(lab: ProbeLab) -> tuple[int, int]:
    """fib's site and the first address after the bytes ftrace rewrites."""
    ft = ftrace_of(lab.machine)
    (site,) = [s.addr for s in ft.sites.values() if s.func == "fib"]
    return site, site + ft.arch.ftrace_patch_size


@pytest.mark.parametrize("tracer_first", [False, True])
def test_kprobe_behind_ftrace_site_survives_the_site_patch(arch, tracer_first):
    lab = ProbeLab.load(str(firmware_elf(arch, "recurse.ftrace")))
    site, addr = _behind_site(lab)
    whole = lab.original(site, 16)
    out = io.StringIO()
    tracer = FunctionTracer(lab.machine, ["fib"], out) if tracer_first else None
    p = lab.kprobe(addr, post_events=False)
    if tracer is None:
        tracer = FunctionTracer(lab.machine, ["fib"], out)
    assert tracer.enabled_sites == 1
    assert_armed(lab, p)                             # the site's rewrite kept the breakpoint
    lab.run()
    assert p.hits == FIB_CALLS and tracer.lines == FIB_CALLS
    ftrace_of(lab.machine).unregister_ftrace_function(tracer.ops)
    assert_armed(lab, p)                             # ... and so did putting the nop back
    lab.kprobes.unregister_kprobe(p)
    assert lab.text(site, 16) == whole


def test_reservations_follow_arming_and_optimizing(arch):
    lab = ProbeLab.load(str(firmware_elf(arch, "hotloop")))
    reserved = reserved_text_of(lab.machine)
    enable_optprobes(lab.kprobes)
    p = lab.kprobe("hot_call", post_events=False)
    bp = len(lab.machine.arch.breakpoint)
    (kp_res,) = reserved.overlapping(p.addr, p.addr + 1, TextUse.KPROBE)
    assert (kp_res.start, kp_res.end, kp_res.owner) == (p.addr, p.addr + bp, p.ainsn)
    assert lab.kprobes.optimizer is not None
    lab.kprobes.optimizer.kick_kprobe_optimizer()
    assert p.ainsn.optimized, p.ainsn.opt_reason
    (opt_res,) = reserved.overlapping(p.addr, p.addr + 1, TextUse.OPTPROBE)
    assert opt_res.end - opt_res.start == p.ainsn.optinsn.size
    lab.kprobes.disable_kprobe(p)
    assert not reserved.overlapping(p.addr, p.addr + 16)
    lab.kprobes.enable_kprobe(p)
    assert reserved.overlapping(p.addr, p.addr + 1, TextUse.KPROBE)
    lab.kprobes.unregister_kprobe(p)
    assert not reserved.overlapping(p.addr, p.addr + 16)


def test_ftrace_sites_are_reserved_from_discovery(arch):
    lab = ProbeLab.load(str(firmware_elf(arch, "recurse.ftrace")))
    ft = ftrace_of(lab.machine)
    reserved = reserved_text_of(lab.machine)
    for site in ft.sites.values():
        (res,) = reserved.overlapping(site.addr, site.addr + 1)
        assert (res.use, res.owner, res.end - res.start) == \
            (TextUse.FTRACE, site, ft.arch.ftrace_patch_size)


class _Owner:
    pass


def test_registry_overlap_check_and_merging_poke(arch):
    lab = ProbeLab.from_asm(arch, {"f": "nop\n" * 8})
    m, f = lab.machine, lab.addr_of("f")
    reserved, a, b = ReservedText(), _Owner(), _Owner()
    res = reserved.reserve(f + 4, 2, TextUse.KPROBE, a)
    assert reserved.overlapping(f, f + 4) == [] and reserved.overlapping(f + 5, f + 6) == [res]
    reserved.check(f + 4, 2, a)                      # one's own text is no conflict
    with pytest.raises(TextBusy) as e:
        reserved.check(f, 8, b, "jump")
    assert e.value.errno == errno.EBUSY and "kprobe" in e.value.reason
    before = m.memory.read(f + 4, 2)
    reserved.text_poke(m, f, b"\xaa" * 8, b)         # b's write leaves a's bytes alone
    assert m.memory.read(f, 8) == b"\xaa" * 4 + before + b"\xaa" * 2
    reserved.release(res)
    assert reserved.overlapping(f, f + 8) == []


def test_kprobe_on_text_someone_else_holds_is_refused_cleanly(arch):
    """A kprobe whose breakpoint would overwrite text another user reserved (here a
    jump-label site, as the kernel's jump_label_text_reserved) is refused and leaves
    nothing behind; once released, the same address probes fine. A jump-label site is
    -EINVAL, as check_kprobe_address_safe returns for it."""
    lab = ProbeLab.from_asm(arch, {"f": "nop\nnop\nret"})
    f = lab.addr_of("f")
    reserved = reserved_text_of(lab.machine)
    site = reserved.reserve(f, 1, TextUse.JUMP_LABEL, _Owner())
    before = lab.text(f, 4)
    with pytest.raises(TextBusy) as e:
        lab.kprobe("f")
    assert e.value.errno == errno.EINVAL and "jump_label" in e.value.reason
    assert lab.text(f, 4) == before and not lab.kprobes.table
    assert f not in lab.machine.break_addrs
    reserved.release(site)
    p = lab.kprobe("f")
    assert_armed(lab, p)
    lab.call("f")
    assert p.hits == 1
