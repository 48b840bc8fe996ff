"""Hostile command-line values, every subcommand: refused while parsing, before any guest is
loaded or run, as exactly one stderr line naming the value, exit 2, never a traceback."""
from __future__ import annotations

import os

import pytest

from conftest import LINUX_EXIT, firmware_elf, run_emu
from test_cli import emu_main

HUGE = str(1 << 64)


def refused(r, part: str) -> None:
    assert r.rc == 2, (r.rc, r.out, r.err)
    assert r.out == "", r.out                      # the guest never ran
    assert "Traceback" not in r.err
    assert len(r.err.splitlines()) == 1 and r.err.endswith("\n"), r.err
    assert r.err.startswith("emu: ") and part in r.err, r.err


# (argv with {elf} for a Linux guest and {dir} for an existing directory, expected fragment)
RUN_CASES = [
    (["run", "--max-insns", "-5", "{elf}"], "argument --max-insns: -5 is out of range"),
    (["run", "--max-insns", "1e3", "{elf}"], "argument --max-insns: '1e3' is not a count"),
    (["run", "--max-insns", HUGE, "{elf}"], f"argument --max-insns: {HUGE} is out of range"),
    (["run", "--max-cycles", "-1", "{elf}"], "argument --max-cycles: -1 is out of range"),
    (["run", "--timeout", "nan", "{elf}"], "argument --timeout: nan is not a number of seconds"),
    (["run", "--timeout", "inf", "{elf}"], "argument --timeout: inf is not a number of seconds"),
    (["run", "--timeout", "-1", "{elf}"], "argument --timeout: -1 is not a number of seconds"),
    (["run", "--timeout", "1e300", "{elf}"], "argument --timeout: 1e300 is not a number"),
    (["run", "--timeout", "soon", "{elf}"], "argument --timeout: 'soon' is not a number"),
    (["run", "--fs", "", "{elf}"], "argument --fs: empty path"),
    (["run", "--fs", "{dir}/missing", "{elf}"], "missing: no such directory"),
    (["run", "--fs", "{elf}", "{elf}"], ".elf: not a directory"),
    (["run", "--fs-write", "{elf}"], "--fs-write needs --fs DIR"),
    (["run", "--seed", "-1", "{elf}"], "argument --seed: -1 is out of range"),
    (["run", "--seed", HUGE, "{elf}"], "argument --seed"),
    (["run", "{elf}", "-x"], "unrecognized arguments: -x (guest arguments go after --"),
    (["run", "{elf}", "a", "--verbose", "b"], "unrecognized arguments: --verbose b (guest"),
    (["run", "--stats", "{dir}/missing/s.json", "{elf}"], "missing: no such directory"),
    (["run", "--stats", "{dir}", "{elf}"], "argument --stats: {dir}: is a directory"),
    (["run", "--stats", "", "{elf}"], "argument --stats: empty file name"),
    (["run", "--stats", "{elf}/s.json", "{elf}"], ".elf: not a directory"),
    (["run", "--ftrace-filter", "fib", "--trace-out", "{dir}/missing/t", "{elf}"],
     "argument --trace-out"),
    (["run", "--profile", "nope", "{elf}"], "unknown CPU profile 'nope'"),
    (["run", "--stats", "{dir}/o", "--ftrace-filter", "f", "--trace-out", "{dir}/o", "{elf}"],
     "emu: --trace-out {dir}/o: is --stats"),
    (["run", "--ftrace-filter", "", "{elf}"], "argument --ftrace-filter: '': no pattern"),
    (["run", "--ftrace-filter", "fib", "--ftrace-filter", ",", "{elf}"],
     "argument --ftrace-filter: ',': no pattern"),
    (["run", "/dev/zero"], "/dev/zero: not a regular file"),
    (["run", "--kprobe", "", "{elf}"], "argument --kprobe: '': no symbol name"),
    (["run", "--kprobe", "hot_call+-1", "{elf}"], "--kprobe: hot_call+-1: negative offset"),
    (["run", "--kretprobe", HUGE, "{elf}"], f"argument --kretprobe: {HUGE}: not a 64-bit address"),
    (["run", "--arch", "mips", "{elf}"], "argument --arch: invalid choice: 'mips'"),
]


@pytest.mark.parametrize("argv,part", RUN_CASES, ids=[" ".join(c[0][:-1]) for c in RUN_CASES])
def test_run_refuses(arch, tmp_path, argv, part):
    fill = {"elf": str(firmware_elf(arch, "hotloop")), "dir": str(tmp_path)}
    refused(emu_main(*[a.format(**fill) for a in argv]), part.format(**fill))


OTHER_CASES = [
    (["info", "/dev/zero"], "/dev/zero: not a regular file"),
    (["info"], "the following arguments are required: file"),
    (["info", ""], "argument file: empty file name"),
    (["run", ""], "argument file: empty file name"),
    (["disasm", "/dev/urandom", "main"], "/dev/urandom: not a regular file"),
    (["inspect", "/dev/zero", "main"], "/dev/zero: not a regular file"),
    (["inspect", "--frob", "{elf}", "main"], "unrecognized arguments: --frob"),
    (["inspect", "{elf}", "hot_call", "hot_call+-4"], "location: hot_call+-4: negative offset"),
    (["sweep", "--jobs", "0", "{elf}"], "argument --jobs: 0 is out of range"),
    (["sweep", "--jobs", "100000", "{elf}"], "argument --jobs: 100000 is out of range"),
    (["sweep", "--timeout", "nan", "{elf}"], "argument --timeout: nan is not a number"),
    (["sweep", "--timeout", "-3", "{elf}"], "argument --timeout: -3.0 is not a number"),
    (["sweep", "{elf}", "-x"], "guest arguments go after --"),
    (["bench", "--repeat", "0"], "argument --repeat: 0 is out of range"),
    (["bench", "--calls", "-1"], "argument --calls: -1 is out of range"),
    (["bench", "--plot", "{dir}/missing/p.png"], "argument --plot"),
    (["bench", "--arch", "x86_64", "--kind", "zz"], "unknown probe kind 'zz'"),
    (["bpf", "run"], "one of the arguments --asm --hex --obj is required"),
    (["bpf", "run", "--asm", "/dev/zero"], "argument --asm: /dev/zero: not a regular file"),
    (["bpf", "disasm", "--obj", "/dev/zero"], "argument --obj: /dev/zero: not a regular file"),
    (["bpf", "run", "--hex", "95", "--engine", "fast"], "argument --engine: invalid choice"),
    (["bpf", "verify", "--hex", "95", "--type", "nope"], "argument --type: invalid choice"),
    (["frob"], "argument command: invalid choice: 'frob'"),
    ([], "the following arguments are required: command"),
]


@pytest.mark.parametrize("argv,part", OTHER_CASES,
                         ids=[" ".join(c[0]) or "none" for c in OTHER_CASES])
def test_other_commands_refuse(tmp_path, argv, part):
    fill = {"elf": str(firmware_elf("x86_64", "hotloop")), "dir": str(tmp_path)}
    refused(emu_main(*[a.format(**fill) for a in argv]), part.format(**fill))


def test_stats_over_the_guest_file(arch, tmp_path):
    """A copy: a regression would overwrite the ELF with the JSON."""
    elf = tmp_path / "g.elf"
    elf.write_bytes(firmware_elf(arch, "hotloop").read_bytes())
    before = elf.read_bytes()
    (tmp_path / "link.elf").symlink_to(elf)
    for stats in (elf, tmp_path / "link.elf"):
        refused(emu_main("run", "--stats", str(stats), str(elf)),
                f"--stats {stats}: is the guest file")
    assert elf.read_bytes() == before


def test_fifo_is_refused_not_read(tmp_path):
    """Reading a FIFO nobody writes would block forever: the file type is checked first."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv in (["info", str(fifo)], ["run", str(fifo)], ["bpf", "run", "--asm", str(fifo)]):
        refused(run_emu(*argv, timeout=60), f"{fifo}: not a regular file")


def test_too_large_elf(arch, tmp_path):
    big = tmp_path / "big.elf"
    big.write_bytes(firmware_elf(arch, "hotloop").read_bytes())
    with open(big, "r+b") as f:
        f.truncate((1 << 30) + 1)                   # sparse: no disk used
    for argv in (["run", str(big)], ["info", str(big)], ["sweep", str(big)]):
        refused(emu_main(*argv), f"argument file: {big}: too large ({(1 << 30) + 1} bytes")


def test_bpf_too_large_input(tmp_path):
    big = tmp_path / "big.s"
    with open(big, "wb") as f:
        f.truncate((256 << 20) + 1)                 # sparse: no disk used
    refused(emu_main("bpf", "run", "--asm", str(big)), "too large")


def test_binary_bpf_asm_is_named(tmp_path):
    blob = tmp_path / "prog.s"
    blob.write_bytes(b"\x87\xff\x00" * 10)
    r = emu_main("bpf", "run", "--asm", str(blob))
    assert r.rc == 1 and r.err == f"error: {blob}: not a text file (assembler expected)\n"


# --- the same values that are valid are accepted (the checks are not simply "refuse") --------
def test_valid_edges_are_accepted(arch, tmp_path, make_tiny):
    elf = str(make_tiny(arch, [("_start", LINUX_EXIT[arch].format(code=7))]))
    for opts in (["--max-insns", "0"], ["--max-insns", "0x100"], ["--max-cycles", "0"],
                 ["--timeout", "0"], ["--timeout", "30.5"], ["--seed", str((1 << 64) - 1)],
                 ["--fs", str(tmp_path)], ["--fs", str(tmp_path), "--fs-write"],
                 ["--stats", str(tmp_path / "s.json")]):
        r = emu_main("run", *opts, elf)
        assert (r.rc, r.err) == (7, ""), (opts, r.err)
    assert (tmp_path / "s.json").read_text().startswith("{")


def test_fs_empty_does_not_grant_the_cwd(arch, tmp_path, monkeypatch):
    """`realpath("")` is the cwd: an unset variable in `--fs "$DIR"` must not expose it."""
    monkeypatch.chdir(tmp_path)
    r = emu_main("run", "--fs", "", str(firmware_elf(arch, "libc-files")))
    refused(r, "argument --fs: empty path")


def test_guest_args_still_reach_the_guest(arch, glibc_prog):
    """The hint is for options before `--`; plain words and everything after `--` are the
    guest's (argv printed by the guest)."""
    r = emu_main("run", str(glibc_prog(arch, "hello")), "3", "--", "-x", "--fs")
    assert r.rc == 3 and "argv[2]=-x (2)\nargv[3]=--fs (4)\n" in r.out, r.out


def test_double_dash_belongs_to_argparse_without_guest_args(arch):
    """`emu disasm FILE -- -1`: no guest there, so `--` only ends the options."""
    r = emu_main("disasm", str(firmware_elf(arch, "hotloop")), "--", "-1")
    assert r.rc == 2 and r.err == "emu: -1: not in a loaded segment\n", r.err
