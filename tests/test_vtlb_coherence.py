"""The virtual TLB stays coherent with the guest's mappings (emu/vtlb.py, emu/memory.py): a
store made fast by a first write still faults once its page is read-only or gone; code
rewritten between mprotects (W^X) runs as rewritten; rwx pages keep self-modifying code
coherent; every CPU's Uc and a snapshot restore see the current permissions."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from conftest import LINUX_EXIT, run_emu, run_reference
from emu.loader import GuestConfig, load_guest
from emu.machine import StopReason
from emu.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from emu.vtlb import load

DATA = Path(__file__).parent / "data" / "vtlb"
PAGE_ADDR = 0x1000_0000


@pytest.fixture(params=["native", "python"])
def fill(request, monkeypatch) -> str:
    """Runs a test with the C fill and with the Python one."""
    if request.param == "native" and load() is None:
        pytest.skip("no C compiler to build emu/vtlb.c")
    monkeypatch.setenv("KPROBE_EMU_VTLB", request.param)
    return request.param


def mmap(arch: str, prot: int) -> str:
    """mmap(PAGE_ADDR, 0x1000, prot, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED, -1, 0)."""
    return {"arm64": f"mov x0, #0x10000000; mov x1, #0x1000; mov x2, #{prot}; mov x3, #0x32; "
                     "mov x4, #-1; mov x5, #0; mov x8, #222; svc #0; ",
            "x86_64": f"mov edi, 0x10000000; mov esi, 0x1000; mov edx, {prot}; mov r10d, 0x32; "
                      "mov r8, -1; xor r9d, r9d; mov eax, 9; syscall; "}[arch]


def mprotect(arch: str, prot: int) -> str:
    return {"arm64": f"mov x0, #0x10000000; mov x1, #0x1000; mov x2, #{prot}; mov x8, #226; svc #0; ",
            "x86_64": f"mov edi, 0x10000000; mov esi, 0x1000; mov edx, {prot}; mov eax, 10; syscall; "}[arch]


def munmap(arch: str) -> str:
    return {"arm64": "mov x0, #0x10000000; mov x1, #0x1000; mov x8, #215; svc #0; ",
            "x86_64": "mov edi, 0x10000000; mov esi, 0x1000; mov eax, 11; syscall; "}[arch]


BASE = {"arm64": "mov x9, #0x10000000; ", "x86_64": "mov rbx, 0x10000000; "}
STORE = {"arm64": "str x9, [x9, #{off}]; ", "x86_64": "mov [rbx + {off}], rbx; "}
LOAD = {"arm64": "ldr x10, [x9, #{off}]; ", "x86_64": "mov rcx, [rbx + {off}]; "}


def store(arch: str, off: int) -> str:
    return STORE[arch].format(off=off)


@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_write_after_mprotect_read_only_faults(make_tiny, fill, arch):
    """Two stores make the page's TLB entry dirty (the inline path); mprotect(PROT_READ)
    must take that away: loads still work, the next store faults at its own address."""
    src = (mmap(arch, 3) + BASE[arch] + store(arch, 0x18) + store(arch, 0x20) + mprotect(arch, 1)
           + BASE[arch] + LOAD[arch].format(off=0x18) + store(arch, 0x28) + LINUX_EXIT[arch].format(code=0))
    r = run_emu("run", str(make_tiny(arch, [("_start", src)])))
    assert r.rc == 139
    assert "guest fault: write to protected address 0x10000028 at pc" in r.err


@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_munmap_then_remap_after_writes(make_tiny, fill, arch):
    """Written, unmapped: a load faults as unmapped. Written, unmapped, mapped again: the
    page reads as fresh zeros (exit code = the word loaded + 3)."""
    gone = (mmap(arch, 3) + BASE[arch] + store(arch, 0x40) + munmap(arch) + BASE[arch]
            + LOAD[arch].format(off=0x40) + LINUX_EXIT[arch].format(code=0))
    r = run_emu("run", str(make_tiny(arch, [("_start", gone)], name="gone")))
    assert r.rc == 139 and "guest fault: read of unmapped address 0x10000040 at pc" in r.err
    exit_with = {"arm64": "add x0, x10, #3; mov x8, #94; svc #0",
                 "x86_64": "lea rdi, [rcx + 3]; mov eax, 231; syscall"}[arch]
    again = (mmap(arch, 3) + BASE[arch] + store(arch, 0x40) + munmap(arch) + mmap(arch, 3)
             + BASE[arch] + LOAD[arch].format(off=0x40) + exit_with)
    r = run_emu("run", str(make_tiny(arch, [("_start", again)], name="again")))
    assert (r.rc, r.err) == (3, "")


# Two tiny functions as machine code: `return 5` and `return 7`, as 32-bit words.
RET = {"arm64": {5: [0xD28000A0, 0xD65F03C0], 7: [0xD28000E0, 0xD65F03C0]},     # mov x0, #n; ret
       "x86_64": {5: [0x000005B8, 0xC300], 7: [0x000007B8, 0xC300]}}           # mov eax, n; ret
WRITE32 = {"arm64": "movz w10, #{lo}; movk w10, #{hi}, lsl #16; str w10, [x9, #{off}]; ",
           "x86_64": "mov dword ptr [rbx + {off}], {word}; "}
CALL = {"arm64": "mov x9, #0x10000000; blr x9; ", "x86_64": "mov rbx, 0x10000000; call rbx; "}
KEEP = {"arm64": "mov x19, x0; ", "x86_64": "mov r12, rax; "}
EXIT_KEPT = {"arm64": "mov x1, #10; mul x0, x19, x1; add x0, x0, x20; mov x8, #94; svc #0",
             "x86_64": "imul rdi, r12, 10; add rdi, r13; mov eax, 231; syscall"}
KEEP2 = {"arm64": "mov x20, x0; ", "x86_64": "mov r13, rax; "}


def write_code(arch: str, n: int) -> str:
    out = BASE[arch]
    for i, word in enumerate(RET[arch][n]):
        out += WRITE32[arch].format(lo=word & 0xFFFF, hi=word >> 16, word=word, off=4 * i)
    return out


def wx_program(arch: str) -> str:
    """A JIT that keeps W^X: write `return 5` on an rw page, mprotect r-x, call it; mprotect
    rw, rewrite as `return 7`, mprotect r-x, call again. Exit code 10*first + second."""
    return (mmap(arch, 3) + write_code(arch, 5) + mprotect(arch, 5) + CALL[arch] + KEEP[arch]
            + mprotect(arch, 3) + write_code(arch, 7) + mprotect(arch, 5) + CALL[arch] + KEEP2[arch]
            + EXIT_KEPT[arch])


@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_w_xor_x_jit_runs_its_rewritten_code(make_tiny, fill, arch):
    r = run_emu("run", str(make_tiny(arch, [("_start", wx_program(arch))])))
    assert (r.rc, r.err) == (57, "")


@pytest.mark.parametrize("change", ["r-x>rw-", "r-x>r--", "rwx>rw-"])
@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_call_into_code_that_lost_execute_faults(make_tiny, fill, arch, change):
    """After the first call the page loses execute: calling it again is an NX fetch fault
    at the page, not a run of the code translated while it was executable. (Unicorn
    flushes its TLB itself only when a page's writability changes: r-x to r-- and rwx to
    rw- rely on the machine's flush.)"""
    prot = {"r": 1, "w": 2, "x": 4, "-": 0}
    before, after = (sum(prot[c] for c in part) for part in change.split(">"))
    src = (mmap(arch, 3) + write_code(arch, 5) + mprotect(arch, before) + CALL[arch]
           + mprotect(arch, after) + CALL[arch] + LINUX_EXIT[arch].format(code=0))
    r = run_emu("run", str(make_tiny(arch, [("_start", src)])))
    assert r.rc == 139
    assert "guest fault: fetch from non-executable address 0x10000000 at pc 0x10000000" in r.err


@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_rwx_page_self_modifying_code(make_tiny, fill, arch):
    """On an rwx page stores keep the slow path, which drops code they overwrite: the
    rewrite needs no mprotect (the same program as the W^X one without them)."""
    src = (mmap(arch, 7) + write_code(arch, 5) + CALL[arch] + KEEP[arch] + write_code(arch, 7)
           + CALL[arch] + KEEP2[arch] + EXIT_KEPT[arch])
    r = run_emu("run", str(make_tiny(arch, [("_start", src)])))
    assert (r.rc, r.err) == (57, "")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_w_xor_x_jit_in_c_matches_the_reference(c_prog, fill, arch):
    """tests/data/vtlb/wx_jit.c: many rounds of write, mprotect r-x, run, mprotect rw."""
    path = c_prog(arch, DATA / "wx_jit.c")
    ref = run_reference(arch, [str(path)])
    assert ref.rc == 0
    r = run_emu("run", str(path))
    assert (r.rc, r.out, r.err) == (0, ref.out, "")
    assert "round 39: 1312" in r.out


# --- the Machine API: several CPUs, snapshots --------------------------------------------------
def _machine(tmp_path: Path, arch: str, prot: int, call: bool = False, before: int = 0):
    """A guest that maps the page with `prot`, then from `poke` (reached with
    run(until=...)) stores to it (at `before` first, if given) or, with `call`, calls code
    at its start; then exits 0."""
    from conftest import tiny_elf
    path = tmp_path / f"poke-{arch}.elf"
    jump = "b {sym:poke}" if arch == "arm64" else "jmp {sym:poke}"
    touch = CALL[arch] if call else \
        BASE[arch] + (store(arch, before) if before else "") + store(arch, 0x30)
    path.write_bytes(tiny_elf(arch, [("_start", mmap(arch, prot) + jump),
                                     ("poke", touch + LINUX_EXIT[arch].format(code=0))]))
    g = load_guest(GuestConfig(path=str(path)), stdout=io.BytesIO(), stderr=io.BytesIO())
    m = g.machine
    poke = m.symbols.lookup("poke").addr
    assert m.run(until=poke).reason is StopReason.HALT
    return m, poke


@pytest.mark.parametrize("call", [False, True], ids=["store", "call"])
@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_protect_reaches_every_cpu(tmp_path, fill, arch, call):
    """Each of two CPUs' Unicorns stores to the page (its own dirty TLB entry) or runs code
    there (its own translation); a protect from the host must reach both: the next store,
    or call, faults on either CPU."""
    m, poke = _machine(tmp_path, arch, 3, call)
    if call:
        m.memory.write(PAGE_ADDR, b"".join(w.to_bytes(4, "little") for w in RET[arch][5]))
        m.memory.protect(PAGE_ADDR, 0x1000, PROT_READ | PROT_EXEC)
    m.set_nr_cpus(2)
    ctx = m.uc.context_save()
    for cpu in (0, 1):
        m.use_cpu(cpu)
        m.uc.context_restore(ctx)
        r = m.run(begin=poke)
        assert r.reason is StopReason.EXIT, r
    m.memory.protect(PAGE_ADDR, 0x1000, PROT_READ)
    want = ("fetch from non-executable address", PAGE_ADDR) if call else \
        ("write to protected address", PAGE_ADDR + 0x30)
    for cpu in (0, 1):
        m.use_cpu(cpu)
        m.uc.context_restore(ctx)
        r = m.run(begin=poke)
        assert r.fault is not None and (r.fault.kind, r.fault.addr) == want, (cpu, r)


@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_restore_gives_back_the_snapshots_permissions(tmp_path, fill, arch):
    """Snapshot with the page rw; made read-only, the store faults; restored, it writes
    again. Snapshot with it read-only; made rw on the host, the store works (a dirty TLB
    entry); restored, it faults again. The same with execute and a call."""
    m, poke = _machine(tmp_path, arch, 3)
    snap = m.snapshot()
    m.memory.protect(PAGE_ADDR, 0x1000, PROT_READ)
    assert m.run().reason is StopReason.FAULT
    m.restore(snap)
    assert m.run().reason is StopReason.EXIT

    m, poke = _machine(tmp_path, arch, 1)
    snap = m.snapshot()
    m.memory.protect(PAGE_ADDR, 0x1000, PROT_READ | PROT_WRITE)
    assert m.run().reason is StopReason.EXIT
    m.restore(snap)
    r = m.run()
    assert r.fault is not None and (r.fault.kind, r.fault.addr) == ("write to protected address",
                                                                    PAGE_ADDR + 0x30)

    m, poke = _machine(tmp_path, arch, 1, call=True)
    m.memory.write(PAGE_ADDR, b"".join(w.to_bytes(4, "little") for w in RET[arch][5]))
    snap = m.snapshot()
    m.memory.protect(PAGE_ADDR, 0x1000, PROT_READ | PROT_EXEC)
    assert m.run().reason is StopReason.EXIT
    m.restore(snap)
    r = m.run()
    assert r.fault is not None and (r.fault.kind, r.fault.addr) == (
        "fetch from non-executable address", PAGE_ADDR)


@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
@pytest.mark.parametrize("before", [0, 0x100], ids=["slot", "other-store-first"])
def test_a_write_watch_added_later_sees_the_store(tmp_path, fill, arch, before):
    """IfuncWatch's one-shot write watch (emu/symbols.py) on a page the guest has already
    written (a dirty TLB entry, stores inline): the next store to the slot still reaches
    it, also when another store on the page comes first (Unicorn marks the page dirty
    after a store no hook covers)."""
    from emu.symbols import IfuncWatch
    m, poke = _machine(tmp_path, arch, 3, before=before)
    ctx = m.uc.context_save()
    assert m.run(begin=poke).reason is StopReason.EXIT       # the page is written: dirty
    fired: list[bool] = []
    m.layer("ifunc", IfuncWatch).add(PAGE_ADDR + 0x30, lambda: fired.append(True))
    m.uc.context_restore(ctx)
    assert m.run(begin=poke).reason is StopReason.EXIT
    assert m.symbols._resolved.get(PAGE_ADDR + 0x30) == PAGE_ADDR        # the stored value
