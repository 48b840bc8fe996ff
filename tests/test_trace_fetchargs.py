"""kprobe_events fetch arguments the kernel accepts that are easy to get wrong: the arch's
register names (regs_query_register_offset, exactly), symstr of a value, a string at an
immediate address, group-only event names, errnos of refused writes that log nothing."""
from __future__ import annotations

import errno
import io

import pytest

from emu.loader import GuestConfig, load_guest
from probes.trace.trace_probe import ERRORS
from probes.trace.tracefs import tracefs_of

from conftest import ARCHES, firmware_elf

# arch/<arch>/kernel/ptrace.c regoffset_table, and names that table does not have
KERNEL_REGS = {
    "x86_64": ["r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8", "bx", "cx", "dx", "si",
               "di", "bp", "ax", "orig_ax", "ip", "cs", "flags", "sp", "ss"],
    "arm64": [f"x{i}" for i in range(31)] + ["lr", "sp", "pc", "pstate"],
}
NOT_REGS = {
    "x86_64": ["rax", "rdi", "rip", "rsp", "eax", "al", "ds", "es", "fs", "gs", "r16", "rflags",
               "x0", "AX"],
    "arm64": ["x31", "xzr", "fp", "w0", "nzcv", "x0x", "X0", "ip", "rax", "cpsr"],
}


def tracefs(arch: str):
    g = load_guest(GuestConfig(path=str(firmware_elf(arch, "demo"))), stdout=io.BytesIO())
    return g.machine, tracefs_of(g.machine)


@pytest.mark.parametrize("arch", ARCHES)
def test_register_names_are_the_kernels(arch):
    m, fs = tracefs(arch)
    for i, reg in enumerate(KERNEL_REGS[arch]):
        assert fs.write("kprobe_events", f"p:r/ok{i} vfs_read v=%{reg}", append=True) == 0, reg
    for reg in NOT_REGS[arch]:
        cmd = f"p vfs_read v=%{reg}"
        assert fs.write("kprobe_events", cmd, append=True) == -errno.EINVAL, reg
        log = fs.read("error_log").splitlines()[-3:]
        assert log[0].endswith(ERRORS["BAD_REG_NAME"]) and log[2] == " " * (11 + 13) + "^"


@pytest.mark.parametrize("arch", ARCHES)
def test_register_values_at_a_hit(arch):
    """%ip is what the pre handler sees (x86: address + 1); x86 orig_ax is -1 after int3;
    arm64 lr and x30 are one register."""
    m, fs = tracefs(arch)
    addr = m.symbols.lookup("vfs_read").addr
    args = {"x86_64": "ip=%ip:x64 oa=%orig_ax:s64 a1=%di:x64 a1b=$arg1:x64",
            "arm64": "ip=%pc:x64 lr=%lr:x64 x30=%x30:x64 a1=%x0:x64 a1b=$arg1:x64"}[arch]
    assert fs.write("kprobe_events", f"p:r/v vfs_read {args}") == 0
    fs.write("events/enable", "1")
    m.run(timeout=60)
    lines = [ln for ln in fs.read("trace").splitlines() if not ln.startswith("#")]
    assert len(lines) == 7
    for ln in lines:
        vals = dict(kv.split("=") for kv in ln.split(") ", 1)[1].split())
        want_ip = addr + (1 if arch == "x86_64" else 0)
        assert int(vals["ip"], 16) == want_ip
        assert vals["a1"] == vals["a1b"]
        if arch == "x86_64":
            assert vals["oa"] == "-1"
        else:
            assert vals["lr"] == vals["x30"] and int(vals["lr"], 16) != 0


@pytest.mark.parametrize("arch", ARCHES)
def test_symstr_of_a_value_and_string_at_an_immediate(arch):
    """symstr symbolizes the fetched value itself (REG, STACK, ARG or a load); string on an
    immediate reads the string at that address, as `@ADDR:string` does."""
    m, fs = tracefs(arch)
    ret = {"x86_64": "$stack0", "arm64": "%lr"}[arch]
    root = m.symbols.lookup("inode_table").addr + 16
    cmd = (f"p:r/s vfs_read rs={ret}:symstr rsym={ret}:symbol "
           f"imm=\\{root:#x}:string mem=@{root:#x}:string")
    assert fs.write("kprobe_events", cmd) == 0, fs.read("error_log")
    fs.write("events/enable", "1")
    m.run(timeout=60)
    lines = [ln for ln in fs.read("trace").splitlines() if not ln.startswith("#")]
    assert lines
    for ln in lines:
        body = ln.split(") ", 1)[1]
        vals = dict(kv.split("=", 1) for kv in body.split())
        assert vals["rs"] == f'"{vals["rsym"]}"' and "+0x" in vals["rsym"]
        assert vals["imm"] == vals["mem"] == '"/"'


@pytest.mark.parametrize("arch", ARCHES)
def test_group_only_event_name_and_plus_arg(arch):
    """`p:GRP/ SYM` names the event as if no name was given (traceprobe_parse_event_name);
    `$arg+1` is $arg1 (kstrtoul base 10 takes a '+'); a bitfield appends to an event whose
    argument has the container's type (the kernel compares type pointers)."""
    m, fs = tracefs(arch)
    assert fs.write("kprobe_events", "p:mine/ vfs_read a=$arg+1:u32 b=@pkt0:u16") == 0
    assert "mine/p_vfs_read_0" in fs.events
    assert fs.write("kprobe_events", "p:mine/p_vfs_read_0 vfs_write a=$arg1:u32 b=@pkt0:b4@4/16",
                    append=True) == 0, fs.read("error_log")
    assert fs.read("kprobe_events").splitlines() == [
        "p:mine/p_vfs_read_0 vfs_read a=$arg+1:u32 b=@pkt0:u16",
        "p:mine/p_vfs_read_0 vfs_write a=$arg1:u32 b=@pkt0:b4@4/16"]


@pytest.mark.parametrize("arch", ARCHES)
def test_refusals_without_a_log_entry_and_errnos(arch):
    """Not a kprobe command at all (trace_kprobe_create's -ECANCELED) is -EINVAL with no
    error_log entry; an over-long argument is -E2BIG; a BTF name -EOPNOTSUPP."""
    m, fs = tracefs(arch)
    for cmd in ("p", "r:foo/bar", "p foo/bar:baz", "x vfs_read"):
        assert fs.write("kprobe_events", cmd, append=True) == -errno.EINVAL, cmd
    assert fs.read("error_log") == ""
    long_arg = "+0(" * 21 + "@0" + ")" * 21
    assert fs.write("kprobe_events", f"p vfs_read {long_arg}", append=True) == -errno.E2BIG
    assert fs.read("error_log").splitlines()[0].endswith(ERRORS["ARG_TOO_LONG"])
    assert fs.write("kprobe_events", "p vfs_read file", append=True) == -errno.EOPNOTSUPP
    assert fs.write("kprobe_events", "p vfs_read @pkt0+junk", append=True) == -errno.EINVAL
    assert fs.write("kprobe_events", "p vfs_read @no_such", append=True) == -errno.ENOENT
    assert fs.read("kprobe_events") == ""
