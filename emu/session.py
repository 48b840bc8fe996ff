"""A session: one guest plus whatever other layers attached to it (probes, tracers, BPF).

Layers attach through `Session.attach`: an attachment gets the machine, may report at exit
and may add keys to the `--stats` JSON. emu/ never imports those layers itself: the CLI
passes `Session.from_args` the option providers it lists, in the order they apply."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import IO, Any, BinaryIO, Callable, Protocol, Sequence

from emu.deadline import Deadline
from emu.loader import Guest, GuestConfig, load_guest
from emu.machine import RunResult, StopReason


class Attachment(Protocol):
    def report(self, out: IO[str]) -> None: ...
    def stats(self) -> dict[str, Any]: ...


def _limit_as_given(result: RunResult, deadline: Deadline) -> RunResult:
    """The machine names the time it was given (what was left); the user gave `--timeout`."""
    prefix = "wall-clock limit of "
    if result.reason is not StopReason.LIMIT or not result.message.startswith(prefix):
        return result
    _, sep, rest = result.message.partition(" s ")
    return replace(result, message=f"{prefix}{deadline.seconds:g} s {rest}") if sep else result


@dataclass(frozen=True)
class RunOptionProvider:
    """One layer's `emu run` options. Attributes: `name` (the layer, for messages), `add`
    (declares the options on the run parser), `apply` (acts on a loaded session with the
    parsed arguments: sets a budget, attaches probes, a tracer, a model)."""
    name: str
    add: Callable[[argparse.ArgumentParser], None]
    apply: Callable[["Session", argparse.Namespace], None]


@dataclass
class Session:
    guest: Guest
    attachments: list[Attachment] = field(default_factory=list)

    @classmethod
    def load(cls, cfg: GuestConfig, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None,
             stderr: BinaryIO | None = None) -> "Session":
        return cls(load_guest(cfg, stdin, stdout, stderr))

    @classmethod
    def from_args(cls, args: argparse.Namespace, guest_args: list[str],
                  stdin: BinaryIO | None = None, stdout: BinaryIO | None = None,
                  stderr: BinaryIO | None = None,
                  providers: Sequence[RunOptionProvider] = ()) -> "Session":
        """Load the guest of `emu run`, then let each provider act on it, in order."""
        cfg = GuestConfig(path=args.file, arch=args.arch, bare=args.bare, argv=guest_args,
                          fs_root=args.fs, fs_writable=args.fs_write, seed=args.seed,
                          strace=args.strace, cpus=getattr(args, "cpus", 1))
        session = cls.load(cfg, stdin, stdout, stderr)
        for provider in providers:
            provider.apply(session, args)
        return session

    @property
    def machine(self):
        return self.guest.machine

    def attach(self, attachment: Attachment) -> None:
        self.attachments.append(attachment)

    def run(self, max_insns: int = 0, timeout: float = 0.0,
            deadline: Deadline | None = None) -> RunResult:
        """Run the guest; `deadline` (what is left of it) overrides `timeout`."""
        if deadline is not None and deadline.at is not None:
            timeout = deadline.remaining()
            if timeout <= 0:
                return RunResult(StopReason.LIMIT, 124, f"wall-clock limit of "
                                 f"{deadline.seconds:g} s reached before the guest started")
        result = self.machine.run(max_insns=max_insns, timeout=timeout)
        if deadline is not None and deadline.at is not None:
            result = _limit_as_given(result, deadline)
        for stream in (self.machine.stdout, self.machine.stderr):
            if hasattr(stream, "flush"):
                stream.flush()
        return result

    def report(self, out: IO[str]) -> None:
        for a in self.attachments:
            a.report(out)

    def stats(self, result: RunResult) -> dict[str, Any]:
        m = self.machine
        data: dict[str, Any] = {
            "file": self.guest.image.path, "arch": m.arch.name,
            "mode": "bare" if self.guest.process is None else "linux-user",
            "exit_code": result.exit_code, "stop_reason": result.reason.value,
        }
        if result.reason is StopReason.FAULT:
            data["fault"] = result.message
        if self.guest.process is not None:
            data["syscalls"] = dict(sorted(m.syscall_handler.counts.items()))
        for a in self.attachments:
            data.update(a.stats())
        return data
