"""Jump labels and static keys (kernel/jump_label.c, include/linux/jump_label.h).

A guest built with firmware/include/kemu_tracepoint.h lists its static-branch sites in
`__jump_table`: 16-byte `struct jump_entry {s32 code; s32 target; long key;}`, every
field relative to its own address, key bit 0 = branch, bit 1 = init. A site holds the
instruction `static_key_enabled(key) XOR branch` asks for: a NOP or a jump to `target`.
Enabling or disabling a key rewrites all its sites through the reserved-text record
(TextUse.JUMP_LABEL), so kprobes refuse the sites (-EINVAL, check_kprobe_address_safe)
and optimized probes whose jump would cover one stay breakpoint probes."""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from typing import Any

from emu.machine import Machine
from emu.memory import PROT_EXEC
from emu.uaccess import UserFault, copy_from_user, get_user, put_user
from probes.arch import ArchJumpLabel, arch_probes_of
from probes.errors import KprobeError
from probes.reserved_text import ReservedText, TextUse, reserved_text_of
from probes.text_poke import text_poker_of

JUMP_TABLE = "__jump_table"
JUMP_ENTRY_SIZE = 16
JUMP_TYPE_TRUE = 1                 # static_key.type bit 0: the key's initial value
JUMP_TYPE_MASK = 3
KEY_ENABLED_OFF = 0                # atomic_t enabled
KEY_TYPE_OFF = 8                   # unsigned long type


class JumpLabelError(KprobeError):
    """A malformed `__jump_table` or a site whose bytes are not what the key says."""


@dataclass(frozen=True)
class JumpEntry:
    code: int
    target: int
    key: int                       # the static_key's address (low bits cleared)
    branch: bool                   # static_branch_likely() site
    init: bool                     # in init text (never patched after boot)
    module: Any = None


@dataclass(eq=False)
class StaticKey:
    addr: int
    initial: bool                  # JUMP_TYPE_TRUE
    enabled: int = 0               # the refcount (static_key_count); -1 while patching
    entries: list[JumpEntry] = field(default_factory=list)


def parse_jump_table(base: int, data: bytes, module: Any = None) -> list[JumpEntry]:
    """The entries of a `__jump_table` loaded at `base` (jump_entry_code/target/key)."""
    if len(data) % JUMP_ENTRY_SIZE:
        raise JumpLabelError(errno.EINVAL, f"__jump_table of {len(data)} bytes is not "
                                           f"a whole number of entries")
    out = []
    for i, (code, target, key) in enumerate(struct.iter_unpack("<iiq", data)):
        at = base + i * JUMP_ENTRY_SIZE
        k = (at + 8 + key) & ((1 << 64) - 1)
        out.append(JumpEntry(at + code, at + 4 + target, k & ~JUMP_TYPE_MASK,
                             bool(k & 1), bool(k & 2), module))
    return out


def image_section(machine: Machine, image: Any, name: str) -> tuple[int, bytes] | None:
    """(address, bytes) of an allocated section of a loaded image: the loader's copy when it
    kept one, else the guest's memory over the section's range."""
    kept = getattr(image, "sections", {}).get(name)
    if kept is not None:
        return kept
    for sec, addr, size, _exec in getattr(image, "section_ranges", ()):
        if sec == name:
            try:
                return addr, copy_from_user(machine.memory, addr, size)
            except UserFault:
                return None
    return None


class JumpLabels:
    """The static keys of one machine: the image's table and any module's."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.arch: ArchJumpLabel = arch_probes_of(machine).need_jump_label()
        self.reserved: ReservedText = reserved_text_of(machine)
        self.keys: dict[int, StaticKey] = {}
        self.entries: list[JumpEntry] = []
        if machine.image is not None:
            self.add_image(machine.image)

    def add_image(self, image: Any, module: Any = None) -> list[JumpEntry]:
        """jump_label_add_module: take an image's sites, each left as its key says."""
        sec = image_section(self.m, image, JUMP_TABLE)
        if sec is None:
            return []
        added = parse_jump_table(sec[0], sec[1], module)
        size = self.arch.jump_label_nop_size
        for e in added:                  # a guest's table is input: sites must be its text
            if not (self._is_text(e.code, size) and self._is_text(e.target, 1)):
                raise JumpLabelError(errno.EINVAL, f"__jump_table entry for {e.code:#x} -> "
                                                   f"{e.target:#x} is not in executable text")
        for e in added:
            key = self.keys.get(e.key)
            if key is None:
                initial = self._initial(e.key)   # STATIC_KEY_INIT_TRUE starts enabled
                key = self.keys[e.key] = StaticKey(e.key, initial, int(initial))
            key.entries.append(e)
            self.reserved.reserve(e.code, size, TextUse.JUMP_LABEL, e)
        self.entries.extend(added)
        return added

    def remove_module(self, module: Any) -> None:
        """jump_label_del_module: forget a module's sites (its text is going away)."""
        for e in [e for e in self.entries if e.module is module]:
            self.entries.remove(e)
            self.reserved.release_owner(e, TextUse.JUMP_LABEL)
            key = self.keys.get(e.key)
            if key is not None:
                key.entries.remove(e)

    def _is_text(self, addr: int, size: int) -> bool:
        region = self.m.memory.find(addr)
        return region is not None and bool(region.prot & PROT_EXEC) and addr + size <= region.end

    def _initial(self, addr: int) -> bool:
        try:
            return bool(get_user(self.m.memory, addr + KEY_TYPE_OFF) & JUMP_TYPE_TRUE)
        except UserFault:
            return False

    def static_key(self, addr: int) -> StaticKey:
        key = self.keys.get(addr)
        if key is None:
            raise JumpLabelError(errno.ENOENT, f"no static key at {addr:#x}")
        return key

    def static_key_enabled(self, key: StaticKey) -> bool:
        return key.enabled > 0 if key.enabled >= 0 else True

    def static_key_enable(self, key: StaticKey) -> None:
        if key.enabled > 0:
            return
        key.enabled = -1                 # being enabled: readers see it on
        self._update(key, True)
        self._set(key, 1)

    def static_key_disable(self, key: StaticKey) -> None:
        if key.enabled != 1:
            return
        self._set(key, 0)
        self._update(key, False)

    def static_key_slow_inc(self, key: StaticKey) -> None:
        if key.enabled > 0:
            self._set(key, key.enabled + 1)
        else:
            self.static_key_enable(key)

    def static_key_slow_dec(self, key: StaticKey) -> None:
        if key.enabled > 1:
            self._set(key, key.enabled - 1)
        else:
            self.static_key_disable(key)

    def _set(self, key: StaticKey, count: int) -> None:
        key.enabled = count
        try:                              # the guest's own copy, for static_key_count()
            put_user(self.m.memory, key.addr + KEY_ENABLED_OFF, count, 4)
        except UserFault:
            pass

    def _update(self, key: StaticKey, on: bool) -> None:
        """__jump_label_update: every non-init site gets `on XOR branch`."""
        for e in key.entries:
            if e.init:
                continue
            want = self.arch.arch_jump_label_transform(e.code, e.target, on != e.branch)
            old = self.arch.arch_jump_label_transform(e.code, e.target, on == e.branch)
            text_poker_of(self.m).settle(e.code, len(want))     # text_mutex: one at a time
            have = self.m.memory.read(e.code, len(want))
            if have == want:
                continue
            if have != old:
                raise JumpLabelError(errno.EINVAL, f"jump_label: Fatal kernel bug, unexpected "
                                                   f"op at {e.code:#x} [{have.hex()}]")
            self.reserved.text_poke(self.m, e.code, want, e)

    def jump_label_text_reserved(self, start: int, end: int) -> bool:
        """Does [start, end] (inclusive, as the kernel's) touch a site?"""
        return bool(self.reserved.overlapping(start, end + 1, TextUse.JUMP_LABEL))


def jump_labels_of(machine: Machine) -> JumpLabels:
    labels: JumpLabels = machine.layer("jump_label", JumpLabels)
    return labels


# --- snapshots (emu/snapshot.py) ---------------------------------------------------------------
# A snapshot keeps each key's count and sites with the text, so that after a restore the
# keys say what the restored site bytes say (and the guest's own `enabled` word, which is
# memory, agrees with both).
JumpLabelState = tuple[dict[int, tuple[StaticKey, int, list[JumpEntry]]], list[JumpEntry]]


def _take_jump_labels(labels: JumpLabels) -> JumpLabelState:
    return ({a: (k, k.enabled, list(k.entries)) for a, k in labels.keys.items()},
            list(labels.entries))


def _restore_jump_labels(_m: Machine, labels: JumpLabels, state: JumpLabelState) -> None:
    keys, entries = state
    for key, enabled, sites in keys.values():
        key.enabled, key.entries = enabled, list(sites)
    labels.keys = {a: k for a, (k, _e, _s) in keys.items()}
    labels.entries = list(entries)


def _sites(labels: JumpLabels) -> list[tuple[int, int]]:
    size = labels.arch.jump_label_nop_size
    return [(e.code, e.code + size) for e in labels.entries]


def _take_reserved(rt: ReservedText) -> tuple[list[int], list[Any], int]:
    return list(rt._starts), list(rt._items), rt._longest


def _restore_reserved(_m: Machine, rt: ReservedText, state: tuple[list[int], list[Any], int]) -> None:
    rt._starts, rt._items, rt._longest = list(state[0]), list(state[1]), state[2]


def _take_arch_probes(answers: Any) -> None:
    """The arch's answers hold no state a snapshot must keep until they map slot pages
    (a kprobe's, which refuses the snapshot anyway)."""
    if answers.pages.slots.pages or answers.pages.tramps.pages:
        from emu.snapshot import SnapshotError
        raise SnapshotError("take snapshots before probes are registered (probe slot pages)")


def _drop_arch_probes(m: Machine, _answers: Any, _state: None) -> None:
    m.layers.pop("arch_probes", None)    # made again on next use: pages mapped since are gone


def _register_snapshot_layers() -> None:
    from emu.snapshot import LayerHooks, register_snapshot_layer
    register_snapshot_layer("jump_label", LayerHooks(_take_jump_labels, _restore_jump_labels,
                                                     _sites))
    register_snapshot_layer("reserved_text", LayerHooks(_take_reserved, _restore_reserved))
    register_snapshot_layer("arch_probes", LayerHooks(_take_arch_probes, _drop_arch_probes))


_register_snapshot_layers()
