"""KUnit-like scenarios for the generic kprobe core (probes/kprobes.py) on both arches:
registration refusals with the kernel's errno, aggregation, enable/disable, reentry
(nmissed), handlers that redirect execution, faults in stepped instructions, probing a
stripped binary, the guest seeing its patched text, and the CLI (`emu inspect`,
`emu run --kprobe ... --stats`)."""
from __future__ import annotations

import errno
import json

import pytest

from conftest import FIRMWARE, firmware_elf
from probes.errors import KprobeError
from probes.kprobes import KPROBE_FLAG_DISABLED, KPROBE_FLAG_ON_FUNC_ENTRY, Kprobe
from probes.testing import ASM_BASE, ASM_DATA

BREAKPOINT = {"arm64": (0xD4200080).to_bytes(4, "little"), "x86_64": b"\xcc"}

# Tiny guests: leaf(x) = x + 1 (first instruction stepped out of line), store(p, v) writes
# v to *p and returns 7, wild(p) = *p, selfread(p) = the 32-bit word at p,
# outer(x) = inner(x) + 100, inner(x) = x + 1.
GUEST = {
    "arm64": {
        "leaf": "add x0, x0, #1\nret",
        "store": "str x1, [x0]\nmov x0, #7\nret",
        "wild": "ldr x0, [x0]\nret",
        "selfread": "ldr w0, [x0]\nret",
        "inner": "add x0, x0, #1\nret",
        "outer": "mov x19, x30\nbl {inner}\nadd x0, x0, #100\nmov x30, x19\nret",
        "svc": "svc #0\nret",
    },
    "x86_64": {
        "leaf": "lea rax, [rdi + 1]\nret",
        "store": "mov qword ptr [rdi], rsi\nmov eax, 7\nret",
        "wild": "mov rax, qword ptr [rdi]\nret",
        "selfread": "mov eax, dword ptr [rdi]\nret",
        "inner": "lea rax, [rdi + 1]\nret",
        "outer": "call {inner}\nadd rax, 100\nret",
        "svc": "ud2\nret",
    },
}
REJECTED_ERRNO = {"arm64": errno.EINVAL, "x86_64": errno.EILSEQ}


def asm_lab(probe_lab, arch: str):
    """The GUEST functions, `outer` calling `inner` at its real address."""
    src = dict(GUEST[arch])
    first = probe_lab.asm(arch, {**src, "outer": src["outer"].replace("{inner}", hex(ASM_BASE))})
    inner = first.machine.symbols.lookup("inner").addr
    lab = probe_lab.asm(arch, {**src, "outer": src["outer"].replace("{inner}", hex(inner))})
    assert lab.machine.symbols.lookup("inner").addr == inner
    return lab


def refused(lab, p: Kprobe) -> KprobeError:
    with pytest.raises(KprobeError) as exc:
        lab.kprobes.register_kprobe(p)
    return exc.value


def return_early(regs, value: int) -> None:
    """What a pre_handler does to make the probed function return `value` at once."""
    regs.return_value = value
    if regs.machine.arch.link is not None:
        regs.ip = regs["x30"]
    else:
        regs.ip = regs.machine.memory.read_u64(regs.sp)
        regs.sp = regs.sp + 8


# --- registration refusals --------------------------------------------------------------------
def test_both_or_neither_addr_and_symbol_einval(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    leaf = lab.addr_of("leaf")
    assert refused(lab, Kprobe(symbol_name="leaf", addr=leaf)).errno == errno.EINVAL
    assert refused(lab, Kprobe()).errno == errno.EINVAL
    assert lab.text("leaf", 4) == lab.original("leaf", 4) and not lab.machine.patches


def test_unknown_symbol_enoent(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    e = refused(lab, Kprobe(symbol_name="no_such_function"))
    assert e.errno == errno.ENOENT and "no_such_function" in e.reason


def test_address_in_no_symbol_enoent(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    addr = ASM_BASE + 0x8000                   # mapped text, but no symbol covers it
    assert lab.machine.symbols.find(addr) is None
    assert refused(lab, Kprobe(addr=addr)).errno == errno.ENOENT


def test_off_boundary(arch, probe_lab):
    """arm64: misaligned -> EINVAL (arch_prepare_kprobe); x86: can_probe decodes from the
    symbol and refuses a mid-instruction address with EILSEQ, by symbol or by address."""
    lab = probe_lab(firmware_elf(arch, "insns"))
    where = "t_adr" if arch == "arm64" else "t_rip_load"
    want = errno.EINVAL if arch == "arm64" else errno.EILSEQ
    assert refused(lab, Kprobe(symbol_name=where, offset=2)).errno == want
    assert refused(lab, Kprobe(addr=lab.addr_of(where) + 3)).errno == want
    assert not lab.kprobes.probes() and not lab.machine.patches


def test_rejected_instruction(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    e = refused(lab, Kprobe(symbol_name="svc"))
    assert e.errno == REJECTED_ERRNO[arch]
    assert lab.kprobes.get_kprobe(lab.addr_of("svc")) is None
    assert lab.text("svc", 4) == lab.original("svc", 4)


def test_arm64_probe_inside_ll_sc_sequence_einval(probe_lab):
    lab = probe_lab(firmware_elf("arm64", "insns"))
    for off in (0, 4, 8):                      # LDXR itself, the ADD, the STXR
        assert refused(lab, Kprobe(symbol_name="t_ldxr_stxr", offset=off)).errno == errno.EINVAL
    p = lab.kprobe("t_ldxr_stxr+12")            # the CBNZ after the STXR
    assert p.ainsn.kind == "simulate"


def test_same_kprobe_twice_einval(arch, probe_lab, kprobe_asserts):
    """The kernel answers -EINVAL (not -EEXIST) for a struct kprobe already registered."""
    lab = asm_lab(probe_lab, arch)
    p = lab.kprobe("leaf")
    e = refused(lab, p)
    assert e.errno == errno.EINVAL and e.errno != errno.EEXIST
    assert lab.call("leaf", 1) == 2
    kprobe_asserts.hits(p, 1)                   # the first registration is unharmed


@pytest.mark.parametrize("func", ["syscall_entry", "do_trap"])
def test_nokprobe_symbol_einval(arch, probe_lab, func):
    lab = probe_lab(firmware_elf(arch, "callpath"))
    for off in (0, 4):                          # the whole extent of the function
        e = refused(lab, Kprobe(symbol_name=func, offset=off))
        assert e.errno == errno.EINVAL and f"NOKPROBE_SYMBOL({func})" in e.reason
    e = refused(lab, Kprobe(addr=lab.addr_of(func)))
    assert e.errno == errno.EINVAL
    assert not lab.machine.patches


@pytest.mark.parametrize("func", ["handle_bad_syscall", "enter_from_user_mode"])
def test_kprobes_text_and_noinstr_einval(arch, probe_lab, func):
    lab = probe_lab(firmware_elf(arch, "callpath"))
    assert refused(lab, Kprobe(symbol_name=func)).errno == errno.EINVAL


def test_data_address_einval(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    assert refused(lab, Kprobe(symbol_name="__lab_data")).errno == errno.EINVAL
    assert refused(lab, Kprobe(addr=ASM_DATA)).errno == errno.EINVAL
    fw = probe_lab(firmware_elf(arch, "insns"))
    data_sym = "t_atomic_q" if arch == "arm64" else "t_data_q"
    e = refused(fw, Kprobe(symbol_name=data_sym))
    assert e.errno == errno.EINVAL and "not in guest text" in e.reason


def test_rodata_address_einval(arch, probe_lab):
    lab = probe_lab(firmware_elf(arch, "insns"))
    sym = {"arm64": "t_rodata_q", "x86_64": "jcc_pairs"}[arch]
    assert refused(lab, Kprobe(symbol_name=sym)).errno == errno.EINVAL


def test_slot_page_address_einval(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    p = lab.kprobe("wild")                      # a load: stepped in a slot
    assert p.ainsn.slot is not None
    assert refused(lab, Kprobe(addr=p.ainsn.slot)).errno == errno.EINVAL


def test_slot_page_address_refused(arch, probe_lab):
    """Whatever the errno, the probe layer never patches its own slot page."""
    lab = asm_lab(probe_lab, arch)
    p = lab.kprobe("wild")
    slot_code = lab.slot(p)
    e = refused(lab, Kprobe(addr=p.ainsn.slot))
    assert e.errno in (errno.EINVAL, errno.ENOENT)
    assert lab.slot(p) == slot_code and lab.kprobes.get_kprobe(p.ainsn.slot) is None


def test_register_kprobes_rolls_back(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    good = [Kprobe(symbol_name="leaf"), Kprobe(symbol_name="store")]
    with pytest.raises(KprobeError) as exc:
        lab.kprobes.register_kprobes(good + [Kprobe(symbol_name="nosuch"), Kprobe(symbol_name="wild")])
    assert exc.value.errno == errno.ENOENT
    assert not lab.kprobes.probes() and not lab.kprobes.table
    for name in ("leaf", "store", "wild"):
        assert lab.text(name, 4) == lab.original(name, 4)
        assert lab.machine.live_patches.keys().isdisjoint(range(lab.addr_of(name), lab.addr_of(name) + 4))
    with pytest.raises(KprobeError) as exc:
        lab.kprobes.register_kprobes([])
    assert exc.value.errno == errno.EINVAL
    # As in the kernel, a struct keeps the resolved addr: with symbol_name also set it is
    # refused until the caller clears addr.
    assert all(p.addr is not None for p in good)
    with pytest.raises(KprobeError) as exc:
        lab.kprobes.register_kprobes(good)
    assert exc.value.errno == errno.EINVAL and not lab.kprobes.probes()
    for p in good:
        p.addr = None
    lab.kprobes.register_kprobes(good)
    assert lab.call("leaf", 1) == 2 and good[0].hits == 1


def test_enable_disable_unregistered_einval(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    p = Kprobe(symbol_name="leaf")
    for op in (lab.kprobes.enable_kprobe, lab.kprobes.disable_kprobe):
        with pytest.raises(KprobeError) as exc:
            op(p)
        assert exc.value.errno == errno.EINVAL
    p.addr = lab.addr_of("leaf")
    p.symbol_name = None
    lab.kprobes.unregister_kprobe(p)            # unregistering an invalid probe clears addr
    assert p.addr is None


# --- arming, disarming, enable/disable -----------------------------------------------------------
def test_patched_bytes_and_disarm(arch, probe_lab, kprobe_asserts):
    lab = asm_lab(probe_lab, arch)
    addr, orig = lab.addr_of("leaf"), lab.text("leaf", 8)
    p = lab.kprobe("leaf")
    bp = BREAKPOINT[arch]
    assert lab.text(addr, 8) == bp + orig[len(bp):]
    kprobe_asserts.armed(lab, p)
    assert lab.original(addr, 8) == orig
    assert p.flags & KPROBE_FLAG_ON_FUNC_ENTRY
    lab.kprobes.unregister_kprobe(p)
    assert lab.text(addr, 8) == orig
    kprobe_asserts.disarmed(lab, addr, orig)
    assert lab.call("leaf", 1) == 2 and p.hits == 0


def test_enable_disable_flip_bytes_and_hits(arch, probe_lab, kprobe_asserts):
    lab = asm_lab(probe_lab, arch)
    addr, orig = lab.addr_of("leaf"), lab.text("leaf", 4)
    bp = BREAKPOINT[arch]
    p = lab.kprobe("leaf")
    assert lab.call("leaf", 1) == 2
    kprobe_asserts.hits(p, 1)
    lab.kprobes.disable_kprobe(p)
    assert lab.text(addr, 4) == orig and p.disabled()
    assert lab.call("leaf", 2) == 3
    kprobe_asserts.hits(p, 1)
    lab.kprobes.enable_kprobe(p)
    assert lab.text(addr, len(bp)) == bp
    assert lab.call("leaf", 3) == 4
    kprobe_asserts.hits(p, 2)


def test_register_disabled_then_enable(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    orig = lab.text("leaf", 4)
    p = Kprobe(symbol_name="leaf", flags=KPROBE_FLAG_DISABLED)
    lab.kprobes.register_kprobe(p)
    assert lab.text("leaf", 4) == orig
    assert lab.call("leaf", 1) == 2 and p.hits == 0
    lab.kprobes.enable_kprobe(p)
    assert lab.text("leaf", 1) == BREAKPOINT[arch][:1]
    assert lab.call("leaf", 1) == 2 and p.hits == 1


# --- aggregation -------------------------------------------------------------------------------
def _tracing_probes(lab, n: int, where: str, order: list, pre_ret: dict | None = None,
                    first: int = 1):
    """n probes at `where`, numbered from `first`, logging their handler calls in `order`."""
    probes = []
    for i in range(first, first + n):
        def pre(kp, regs, i=i):
            order.append(f"pre{i}")
            if pre_ret and i in pre_ret:
                return pre_ret[i](regs)
            return 0

        def post(kp, regs, flags, i=i):
            order.append(f"post{i}")
        probes.append(lab.kprobe(where, pre=pre, post=post))
    return probes


@pytest.mark.parametrize("where", ["leaf", "outer+4"])      # stepped / simulated (bl) or emulated
def test_aggregate_newest_first(arch, probe_lab, where):
    lab = asm_lab(probe_lab, arch)
    if arch == "x86_64" and where == "outer+4":
        where = "outer"                                      # x86 `call` at offset 0
    order: list[str] = []
    func, ret = ("outer", 102) if "outer" in where else ("leaf", 2)
    p1, p2 = _tracing_probes(lab, 2, where, order)
    assert lab.call(func, 1) == ret
    assert order == ["pre2", "pre1", "post2", "post1"]
    order.clear()
    (p3,) = _tracing_probes(lab, 1, where, order, first=3)   # a third: at the head
    p3.events.clear()
    top = lab.kprobes.get_kprobe(p1.addr)
    assert top.is_aggr and top.list == [p3, p2, p1] and lab.kprobes.probes() == [p3, p2, p1]
    assert p1.ainsn is p2.ainsn is p3.ainsn is top.ainsn
    assert lab.call(func, 1) == ret
    assert order == ["pre3", "pre2", "pre1", "post3", "post2", "post1"]
    assert (p1.hits, p2.hits, p3.hits) == (2, 2, 1)


def test_aggregate_pre_handler_returning_1_stops_chain(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    order: list[str] = []

    def skip(regs):
        return_early(regs, 99)
        return 1
    p1, p2, p3 = _tracing_probes(lab, 3, "store", order, pre_ret={2: skip})
    assert lab.call("store", ASM_DATA, 0x1234) == 99
    assert order == ["pre3", "pre2"]                # p1 never ran, no post handlers
    assert lab.machine.memory.read_u64(ASM_DATA) == 0   # the store never executed
    assert (p1.hits, p2.hits, p3.hits) == (0, 1, 1)


def test_aggregate_disable_children(arch, probe_lab, kprobe_asserts):
    lab = asm_lab(probe_lab, arch)
    addr, orig = lab.addr_of("leaf"), lab.text("leaf", 4)
    order: list[str] = []
    p1, p2, p3 = _tracing_probes(lab, 3, "leaf", order)
    lab.kprobes.disable_kprobe(p2)
    assert lab.text(addr, 1) == BREAKPOINT[arch][:1]        # still armed for the others
    assert lab.call("leaf", 1) == 2
    assert order == ["pre3", "pre1", "post3", "post1"]
    order.clear()
    lab.kprobes.disable_kprobe(p1)
    lab.kprobes.disable_kprobe(p3)
    assert lab.text(addr, 4) == orig                        # all disabled: disarmed
    assert lab.call("leaf", 1) == 2 and order == []
    lab.kprobes.enable_kprobe(p1)
    assert lab.text(addr, 1) == BREAKPOINT[arch][:1]
    assert lab.call("leaf", 5) == 6 and order == ["pre1", "post1"]
    assert (p1.hits, p2.hits, p3.hits) == (2, 0, 1)


def test_aggregate_unregister_children(arch, probe_lab, kprobe_asserts):
    lab = asm_lab(probe_lab, arch)
    addr, orig = lab.addr_of("wild"), lab.text("wild", 4)
    order: list[str] = []
    p1, p2, p3 = _tracing_probes(lab, 3, "wild", order)
    slot = p1.ainsn.slot
    lab.kprobes.unregister_kprobe(p3)
    lab.machine.memory.write(ASM_DATA, (5).to_bytes(8, "little"))
    assert lab.call("wild", ASM_DATA) == 5
    assert order == ["pre2", "pre1", "post2", "post1"]
    lab.kprobes.unregister_kprobe(p1)
    order.clear()
    assert lab.call("wild", ASM_DATA) == 5 and order == ["pre2", "post2"]
    lab.kprobes.unregister_kprobe(p2)
    assert lab.kprobes.get_kprobe(addr) is None and not lab.kprobes.probes()
    kprobe_asserts.disarmed(lab, addr, orig)
    assert lab.machine.memory.read(slot, 8) == bytes(8)       # the slot was freed (poisoned)
    order.clear()
    assert lab.call("wild", ASM_DATA) == 5 and order == []


def test_aggregate_post_handler_added_later(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    seen: list[str] = []
    lab.kprobe("leaf", pre=lambda kp, r: seen.append("pre1"))
    p2 = Kprobe(symbol_name="leaf", post_handler=lambda kp, r, f: seen.append(("post2", r.ip)))
    lab.kprobes.register_kprobe(p2)
    assert lab.call("leaf", 1) == 2
    resume = lab.addr_of("leaf") + 4                 # add x0.. / lea rax, [rdi + 1]: 4 bytes
    assert seen == ["pre1", ("post2", resume)]


# --- handlers that redirect execution; post handler ip -----------------------------------------
def test_pre_handler_changes_ip_skips_step_and_post(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)

    def pre(kp, regs):
        return_early(regs, 99)
        return 1
    p = lab.kprobe("store", pre=pre)
    assert lab.call("store", ASM_DATA, 0x1234) == 99
    assert [e.handler for e in p.events] == ["pre"]
    assert lab.machine.memory.read_u64(ASM_DATA) == 0
    assert lab.result.reason.value == "halt" and lab.kprobes.kcb.current is None
    lab.kprobes.unregister_kprobe(p)
    assert lab.call("store", ASM_DATA, 0x1234) == 7
    assert lab.machine.memory.read_u64(ASM_DATA) == 0x1234


RESUME_CASES = {"arm64": [("t_bl+8", "t_bl_back"), ("t_plain+8", None)],      # bl; add
                "x86_64": [("t_call", "t_call_helper"), ("t_plain+5", None)]}    # call; mov


@pytest.mark.parametrize("case", [0, 1], ids=["branch", "stepped"])
def test_post_handler_sees_resume_ip(arch, probe_lab, case):
    where, target = RESUME_CASES[arch][case]
    lab = probe_lab(firmware_elf(arch, "insns"))
    p = lab.kprobe(where)
    lab.run()
    assert lab.result.exit_code == 0 and p.hits == 1
    pre, post = p.events
    assert pre.ip == p.addr + (1 if arch == "x86_64" else 0)
    assert post.ip == (lab.addr_of(target) if target else p.addr + p.ainsn.length)


# --- reentry: nmissed --------------------------------------------------------------------------
def _nested_call_lab(probe_lab, arch):
    """outer's pre_handler calls inner through a nested run (lab.call) and restores the
    registers afterwards; `nested` records (return value, inner.nmissed, inner's handler
    calls) as seen right after the nested call."""
    lab = asm_lab(probe_lab, arch)
    m = lab.machine
    nested = []

    def pre(kp, regs):
        saved = {n: m.reg(n) for n in m.arch.regs}
        # A nested run must not use a wall-clock limit: two watchdog threads on one Uc abort
        # the process in libunicorn (qemu_thread_join: No such process).
        ret = lab.call("inner", 41, timeout=0)
        nested.append((ret, inner.nmissed, len(inner.events)))
        for n, v in saved.items():
            m.set_reg(n, v)
        return 0
    outer = lab.kprobe("outer", pre=pre)
    inner = lab.kprobe("inner")
    return lab, outer, inner, nested


def test_nmissed_on_recursion(arch, probe_lab, kprobe_asserts):
    """outer's pre_handler calls into the guest and hits the probe on inner while outer's
    probe is running: inner counts a miss, its handlers do not run, and the instruction
    still runs (the nested call returns 42)."""
    lab, outer, inner, nested = _nested_call_lab(probe_lab, arch)
    lab.call("outer", 1, timeout=0)
    assert nested == [(42, 1, 0)]
    assert inner.nmissed == 1
    kprobe_asserts.hits(outer, 1)
    assert outer.events[0].handler == "pre"


def test_nested_run_resumes_outer(arch, probe_lab, kprobe_asserts):
    """After the pre_handler's nested run the outer run must go on: outer(1) = 102, and
    inner's own hit (from outer's bl/call) runs its handlers. (A nested Machine.run stops
    at its return address with `until`, not with emu_stop, which would also end the outer
    run.)"""
    lab, outer, inner, nested = _nested_call_lab(probe_lab, arch)
    ret = lab.call("outer", 1, timeout=0)
    assert ret == 102 and lab.result.reason.value == "halt"
    assert lab.kprobes.kcb.current is None and not lab.kprobes.kcb.prev
    kprobe_asserts.hits(inner, 1, nmissed=1)
    assert [e.handler for e in inner.events] == ["pre", "post"]


# --- faults in stepped instructions ------------------------------------------------------------
def test_fault_in_stepped_instruction_reported_at_probe(arch, probe_lab):
    plain = asm_lab(probe_lab, arch)
    plain.call("wild", 0x10)
    lab = asm_lab(probe_lab, arch)
    p = lab.kprobe("wild")
    assert p.ainsn.kind == "out-of-line"
    lab.call("wild", 0x10)
    res = lab.result
    assert res.reason.value == "fault" and res.fault.pc == p.addr
    assert lab.machine.pc == p.addr
    assert not (p.ainsn.slot <= res.fault.pc < p.ainsn.slot + 16)
    assert res.message == plain.result.message and res.exit_code == plain.result.exit_code
    assert "wild+0x0" in res.message
    assert [e.handler for e in p.events] == ["pre", "fault"]
    assert p.events[1].ip == p.addr
    assert lab.kprobes.kcb.current is None
    lab.machine.memory.write(ASM_DATA, (3).to_bytes(8, "little"))
    assert lab.call("wild", ASM_DATA) == 3      # the probe still works after the fault
    assert p.hits == 2


# --- stripped binaries, text the guest can see -------------------------------------------------
def test_probe_stripped_demo_by_address(arch, probe_lab, kprobe_asserts):
    named = probe_lab(firmware_elf(arch, "demo"))
    addrs = {f: named.addr_of(f) for f in ("do_sys_open", "parse_packet", "hot_leaf")}
    lab = probe_lab(firmware_elf(arch, "demo.stripped"))
    with pytest.raises(KprobeError) as exc:
        lab.kprobe("do_sys_open")
    assert exc.value.errno == errno.ENOENT
    probes = {f: lab.kprobe(a) for f, a in addrs.items()}
    lab.run()
    expected = (FIRMWARE / "expected" / arch / "demo.stripped.out").read_bytes()
    assert lab.stdout == expected and lab.result.exit_code == 0
    text = expected.decode()
    kprobe_asserts.hits(probes["do_sys_open"], text.count("] open(") + text.count("] openat("))
    kprobe_asserts.hits(probes["parse_packet"], text.count("\npkt "))
    kprobe_asserts.hits(probes["hot_leaf"], 1000)           # hotloop_run(10000, 1000)


def test_guest_sees_patched_text(arch, probe_lab):
    lab = asm_lab(probe_lab, arch)
    leaf = lab.addr_of("leaf")
    orig = int.from_bytes(lab.text(leaf, 4), "little")
    assert lab.call("selfread", leaf) == orig
    p = lab.kprobe("leaf")
    patched = int.from_bytes(BREAKPOINT[arch] + lab.text(leaf + len(BREAKPOINT[arch]),
                                                       4 - len(BREAKPOINT[arch])), "little")
    assert lab.call("selfread", leaf) == patched != orig
    lab.kprobes.disable_kprobe(p)
    assert lab.call("selfread", leaf) == orig


def test_arm64_t_adr_reads_its_own_breakpoint(probe_lab):
    """t_adr loads its own first word and adds its top byte: 0x10 (ADR) unprobed, 0xd4
    (BRK) with a kprobe on that word, as on a real kernel."""
    plain = probe_lab(firmware_elf("arm64", "insns"))
    lab = probe_lab(firmware_elf("arm64", "insns"))
    lab.kprobe("t_adr")
    assert lab.call("t_adr", 1) - plain.call("t_adr", 1) == 0xD4 - 0x10


def test_x86_endbr_entry_offsets(probe_lab):
    lab = probe_lab(firmware_elf("x86_64", "insns"))
    p0 = lab.kprobe("t_endbr")
    p4 = Kprobe(symbol_name="t_endbr", offset=4)
    lab.kprobes.register_kprobe(p4)
    assert p0.addr == p4.addr == lab.addr_of("t_endbr") + 4
    assert p0.flags & KPROBE_FLAG_ON_FUNC_ENTRY and p4.flags & KPROBE_FLAG_ON_FUNC_ENTRY
    assert lab.text("t_endbr", 4) == bytes.fromhex("f30f1efa")   # the ENDBR stays
    lab.run()
    assert (p0.hits, p4.hits) == (1, 1)


# --- CLI ---------------------------------------------------------------------------------------
def test_emu_inspect(arch, emu_cli):
    path = str(firmware_elf(arch, "insns"))
    where = {"arm64": ["t_bl+8", "t_plain+8", "t_ldxr_stxr"],
             "x86_64": ["t_call", "t_rip_load", "t_rip_load+1"]}[arch]
    r = emu_cli("inspect", "--json", path, *where)
    assert r.rc == 0, r.err
    sim, step, bad = json.loads(r.out)
    bp = BREAKPOINT[arch].hex()
    assert sim["verdict"] == ("simulate" if arch == "arm64" else "emulate") and sim["slot"] is None
    assert sim["patched"].startswith(bp) and not sim["original"].startswith(bp)
    assert step["verdict"] == "out-of-line" and step["slot"] is not None
    assert step["slot_code"].endswith("c00020d4" if arch == "arm64" else "cc")
    assert bad["verdict"] == "rejected"
    assert bad["errno"] == ("EINVAL" if arch == "arm64" else "EILSEQ")
    r = emu_cli("inspect", path, where[1])
    assert r.rc == 0 and "verdict:  out-of-line" in r.out and "slot at" in r.out


def test_emu_run_kprobe_stats(arch, emu_cli, tmp_path):
    stats = tmp_path / "stats.json"
    r = emu_cli("run", "--kprobe", "do_sys_open", "--kprobe", "sys_dispatch+0x4" if arch == "arm64"
                else "sys_dispatch", "--stats", str(stats), str(firmware_elf(arch, "callpath")))
    expected = (FIRMWARE / "expected" / arch / "callpath.out").read_text()
    assert r.rc == 0, r.err
    assert r.out == expected
    data = json.loads(stats.read_text())
    assert data["exit_code"] == 0
    rows = {row["symbol"]: row for row in data["probes"]}
    assert set(rows) == {"do_sys_open", "sys_dispatch"}
    for row in rows.values():
        assert {"symbol", "offset", "addr", "kind", "hits", "nmissed"} <= set(row)
        # x86 may report a probe whose slot got a jmp back after the first step as boosted
        assert row["kind"] in ({"kprobe"} if arch == "arm64" else {"kprobe", "boosted"})
        assert row["nmissed"] == 0
    assert rows["do_sys_open"]["offset"] == 0
    assert rows["sys_dispatch"]["offset"] == (4 if arch == "arm64" else 0)
    assert rows["do_sys_open"]["hits"] == expected.count("] open(") + expected.count("] openat(")
    assert rows["sys_dispatch"]["hits"] == sum(line.startswith("[") for line in expected.splitlines())
    assert "do_sys_open" in r.err and "sys_dispatch" in r.err       # the exit table


def test_emu_run_kprobe_unknown_symbol(arch, emu_cli):
    r = emu_cli("run", "--kprobe", "nosuch", str(firmware_elf(arch, "callpath")))
    assert r.rc == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "ENOENT" in lines[0] and "nosuch" in lines[0]
    assert r.out == ""
