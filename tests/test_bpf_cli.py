"""``emu bpf run|disasm|verify`` through probes.bpf.cli.main."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from probes.bpf.cli import main

HEX_OK = "b7 00 00 00 2a 00 00 00 95 00 00 00 00 00 00 00"   # mov r0, 42; exit


@pytest.fixture
def asm_file(tmp_path: Path):
    def write(text: str, name: str = "prog.s") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write


def test_run_hex(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bpf", "run", "--hex", HEX_OK]) == 0
    assert capsys.readouterr().out == "r0 = 0x2a\n"


def test_run_asm_with_mem(asm_file, capsys: pytest.CaptureFixture[str]) -> None:
    path = asm_file("ldxh r0, [r1+1]\nadd r0, r2\nexit\n")
    assert main(["run", "--asm", path, "--mem", "00 34 12", "--engine", "interp"]) == 0
    assert capsys.readouterr().out == "r0 = 0x1237\n"


def test_run_conformance_data_file(asm_file, capsys: pytest.CaptureFixture[str]) -> None:
    path = asm_file("-- asm\nldxb r0, [r1+1]\nexit\n-- mem\n01 09\n-- result\n0x9\n", "t.data")
    assert main(["bpf", "run", "--asm", path]) == 0
    assert capsys.readouterr().out == "r0 = 0x9\n"


@pytest.mark.parametrize("argv,message", [
    (["run", "--hex", "95 00 00 00 00 00 00 00"], "error: verifier: insn 0: R0 !read_ok"),
    (["run", "--hex", "zz"], "error: non-hexadecimal"),
    (["run", "--asm", "/nonexistent.s"], "error: /nonexistent.s: No such file"),
    (["run", "--obj", "/nonexistent.o", "--prog", "x"], "error: /nonexistent.o: No such file"),
])
def test_errors_are_one_line(argv: list[str], message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message) and captured.err.count("\n") == 1


def test_run_fault_names_instruction(asm_file, capsys: pytest.CaptureFixture[str]) -> None:
    path = asm_file("ldxdw r0, [r1+8]\nexit\n")
    assert main(["run", "--asm", path, "--mem", "00"]) == 1
    assert "insn 0 (ldxdw r0, [r1+8])" in capsys.readouterr().err


def test_asm_syntax_error(asm_file, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--asm", asm_file("mov r0, 1\nfrob r0\nexit\n")]) == 1
    assert capsys.readouterr().err == "error: line 2: Invalid mnemonic: frob\n"


def test_verify_accepts_and_refuses(asm_file, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--hex", HEX_OK]) == 0
    out = capsys.readouterr().out
    assert "processed" in out and out.endswith("program: accepted\n")
    path = asm_file("mov r0, 0\nja +1\nexit\n")
    assert main(["verify", "--asm", path]) == 1
    out = capsys.readouterr().out
    assert "1: jump out of range from insn 1 to 3" in out
    assert out.endswith("program: refused: jump out of range from insn 1 to 3\n")


def test_verify_kernel_type(asm_file, capsys: pytest.CaptureFixture[str]) -> None:
    path = asm_file("mov r0, 0\nexit\nmov r0, 1\nexit\n")
    assert main(["verify", "--asm", path]) == 0            # conformance type: a warning
    assert "warning: unreachable insn 2" in capsys.readouterr().out
    assert main(["verify", "--asm", path, "--type", "kprobe", "-v"]) == 1
    out = capsys.readouterr().out
    assert "0: (b7) r0 = 0" not in out  # refused before the listing: structural error
    assert "unreachable insn 2" in out


def test_disasm_both_styles(asm_file, capsys: pytest.CaptureFixture[str]) -> None:
    path = asm_file("mov r0, 1\nexit\n")
    assert main(["disasm", "--asm", path]) == 0
    assert capsys.readouterr().out == "mov r0, 0x1\nexit\n"
    assert main(["disasm", "--hex", HEX_OK, "--llvm"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "       0:\tb7 00 00 00 2a 00 00 00\tr0 = 42"


def test_packet_program(asm_file, capsys: pytest.CaptureFixture[str]) -> None:
    path = asm_file("ldxw r2, [r1]\nldxw r3, [r1+4]\nmov r0, r3\nsub r0, r2\nexit\n")
    assert main(["run", "--asm", path, "--type", "xdp", "--packet", "01 02 03"]) == 0
    assert capsys.readouterr().out == "r0 = 0x3\n"


def test_usage_error_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "one of the arguments --asm --hex --obj is required" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed")
def test_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = Path(__file__).resolve().parent / "data" / "bpf" / "calls.c"
    obj = tmp_path / "calls.o"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-c", str(src), "-o", str(obj)],
                   check=True)
    assert main(["run", "--obj", str(obj), "--prog", "fib_tp", "--mem", "00" * 64]) == 0
    assert capsys.readouterr().out == f"r0 = {6765 + 4:#x}\n"
    assert main(["run", "--obj", str(obj), "--prog", "calc"]) == 0     # zeroed pt_regs
    assert capsys.readouterr().out == "r0 = 0xa\n"                   # 0 + 0 + 9 + 1
    assert main(["run", "--obj", str(obj)]) == 1
    assert "--prog is required" in capsys.readouterr().err
    assert main(["verify", "--obj", str(obj)]) == 0
    out = capsys.readouterr().out
    assert "calc: accepted" in out and "fib_tp: accepted" in out
    assert main(["disasm", "--obj", str(obj), "--prog", "calc"]) == 0
    assert capsys.readouterr().out.startswith("Disassembly of calc (kprobe/calc):\n")
