"""Shared fixtures: paths, the firmware catalogue, and running the CLI in-process."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
ARCHES = ("arm64", "x86_64")


def firmware_elf(arch: str, name: str) -> Path:
    return FIRMWARE / "bin" / arch / f"{name}.elf"


@dataclass
class CliResult:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


def run_emu(*argv: str, stdin: bytes = b"", timeout: float = 120) -> CliResult:
    """Run the `emu` CLI in a subprocess (real stdio, real exit code)."""
    proc = subprocess.run([sys.executable, "-m", "emu.cli", *argv], input=stdin,
                          capture_output=True, timeout=timeout, cwd=ROOT)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(params=ARCHES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def emu_cli():
    return run_emu
