"""Building a ready-to-run Machine from a guest file: Linux user mode or bare metal."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import BinaryIO

from emu.arch import requested_arch
from emu.elf import ElfImage, load_elf
from emu.errors import ElfError, UsageError
from emu.firmware import image_fits_ram, setup_bare
from emu.linux.fs import FileSystem
from emu.linux.process import LinuxProcess, setup_process
from emu.linux.syscalls import install
from emu.machine import Machine

DEFAULT_ENV = ["PATH=/usr/bin:/bin", "HOME=/", "LANG=C"]


@dataclass
class GuestConfig:
    """Everything a run of a guest depends on (and nothing host-dependent beyond it)."""
    path: str
    arch: str = "auto"
    bare: bool = False
    argv: list[str] = field(default_factory=list)   # guest args after argv[0]
    env: list[str] | None = None
    fs_root: str | None = None
    fs_writable: bool = False
    seed: int = 0
    strace: bool = False
    cpus: int = 1                                   # vCPUs (--cpus; Linux user mode)


@dataclass
class Guest:
    machine: Machine
    image: ElfImage
    process: LinuxProcess | None


def load_guest(cfg: GuestConfig, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None,
               stderr: BinaryIO | None = None, image: ElfImage | None = None) -> Guest:
    """A machine with the guest loaded, ready to run. Pass an already parsed `image` to
    load the same file many times (the sweep does)."""
    if image is None:
        image = load_elf(cfg.path, requested_arch(cfg.arch))
    m = Machine(image.arch, stdout=stdout, stderr=stderr)
    if cfg.bare:
        if not image_fits_ram(m, image):
            raise ElfError(f"{cfg.path}: segments lie outside the {image.arch.name} bare-metal RAM "
                           f"({image.arch.bare_base:#x}-{image.arch.bare_base + image.arch.bare_ram_size:#x})")
        if cfg.cpus != 1:
            raise UsageError(f"--cpus {cfg.cpus}: bare-metal firmware runs on one CPU")
        setup_bare(m, image)
        return Guest(m, image, None)
    fs = FileSystem(cfg.fs_root, cfg.fs_writable)
    # argv[0] and AT_EXECFN are the path as the user gave it, as execve(2) passes them.
    argv = [cfg.path, *cfg.argv]
    env = DEFAULT_ENV if cfg.env is None else cfg.env
    proc = setup_process(m, image, argv, env, fs, stdin if stdin is not None else sys.stdin.buffer,
                         seed=cfg.seed, cpus=cfg.cpus)
    proc.strace = cfg.strace
    install(proc)
    return Guest(m, image, proc)
