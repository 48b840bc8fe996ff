"""BPF Type Format: enough of include/uapi/linux/btf.h to read map definitions.

The loader needs the ``.maps`` DATASEC of an object's ``.BTF`` section: each
map is a variable whose struct type encodes the map's attributes as
members (``int (*type)[N]`` means type = N; ``key``/``value`` point to the
key and value types, whose sizes we resolve). Every kind is decoded so
offsets stay right; only names, sizes and those member shapes are used.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from .errors import LoaderError

BTF_MAGIC = 0xEB9F


class BtfKind(IntEnum):
    BTF_KIND_UNKN = 0
    BTF_KIND_INT = 1
    BTF_KIND_PTR = 2
    BTF_KIND_ARRAY = 3
    BTF_KIND_STRUCT = 4
    BTF_KIND_UNION = 5
    BTF_KIND_ENUM = 6
    BTF_KIND_FWD = 7
    BTF_KIND_TYPEDEF = 8
    BTF_KIND_VOLATILE = 9
    BTF_KIND_CONST = 10
    BTF_KIND_RESTRICT = 11
    BTF_KIND_FUNC = 12
    BTF_KIND_FUNC_PROTO = 13
    BTF_KIND_VAR = 14
    BTF_KIND_DATASEC = 15
    BTF_KIND_FLOAT = 16
    BTF_KIND_DECL_TAG = 17
    BTF_KIND_TYPE_TAG = 18
    BTF_KIND_ENUM64 = 19


K = BtfKind
# bytes that follow struct btf_type: (fixed, per vlen item)
_TRAILER = {K.BTF_KIND_INT: (4, 0), K.BTF_KIND_ARRAY: (12, 0), K.BTF_KIND_STRUCT: (0, 12),
            K.BTF_KIND_UNION: (0, 12), K.BTF_KIND_ENUM: (0, 8), K.BTF_KIND_FUNC_PROTO: (0, 8),
            K.BTF_KIND_VAR: (4, 0), K.BTF_KIND_DATASEC: (0, 12), K.BTF_KIND_DECL_TAG: (4, 0),
            K.BTF_KIND_ENUM64: (0, 12)}
_MODIFIERS = {K.BTF_KIND_TYPEDEF, K.BTF_KIND_VOLATILE, K.BTF_KIND_CONST, K.BTF_KIND_RESTRICT,
              K.BTF_KIND_TYPE_TAG}


@dataclass
class BtfMember:
    name: str
    type_id: int
    offset: int  # bits for struct members, bytes for datasec entries
    size: int = 0  # datasec entries only


@dataclass
class BtfType:
    """struct btf_type, decoded. ``size_or_type`` is the size for sized kinds
    and the referenced type id for PTR/TYPEDEF/modifiers/VAR/FUNC."""

    type_id: int
    kind: BtfKind
    name: str
    size_or_type: int
    vlen: int
    members: list[BtfMember] = field(default_factory=list)
    array: tuple[int, int, int] | None = None  # elem type, index type, nelems


@dataclass
class Btf:
    """All types of one .BTF section, by id (index 0 is void)."""

    types: list[BtfType | None]

    def get(self, type_id: int) -> BtfType:
        if not 0 < type_id < len(self.types):
            raise LoaderError(f"BTF type id {type_id} out of range")
        t = self.types[type_id]
        assert t is not None
        return t

    def skip_modifiers(self, type_id: int) -> BtfType:
        t = self.get(type_id)
        while t.kind in _MODIFIERS:
            t = self.get(t.size_or_type)
        return t

    def size_of(self, type_id: int, depth: int = 0) -> int:
        if depth > 32:
            raise LoaderError("BTF type chain too deep")
        t = self.skip_modifiers(type_id)
        if t.kind == K.BTF_KIND_PTR:
            return 8
        if t.kind == K.BTF_KIND_ARRAY:
            assert t.array is not None
            return self.size_of(t.array[0], depth + 1) * t.array[2]
        if t.kind in (K.BTF_KIND_INT, K.BTF_KIND_STRUCT, K.BTF_KIND_UNION, K.BTF_KIND_ENUM,
                      K.BTF_KIND_FLOAT, K.BTF_KIND_ENUM64, K.BTF_KIND_DATASEC):
            return t.size_or_type
        raise LoaderError(f"BTF type {t.name or t.type_id} ({t.kind.name}) has no size")

    def find_datasec(self, name: str) -> BtfType | None:
        for t in self.types[1:]:
            if t is not None and t.kind == K.BTF_KIND_DATASEC and t.name == name:
                return t
        return None


def _string(strings: bytes, off: int) -> str:
    if off >= len(strings):
        raise LoaderError(f"BTF string offset {off} out of range")
    end = strings.find(b"\0", off)
    return strings[off:end if end >= 0 else len(strings)].decode("utf-8", "replace")


def _decode_type(data: bytes, pos: int, type_id: int, strings: bytes) -> tuple[BtfType, int]:
    name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
    pos += 12
    vlen, kind_no = info & 0xFFFF, (info >> 24) & 0x1F
    try:
        kind = BtfKind(kind_no)
    except ValueError:
        raise LoaderError(f"BTF type {type_id} has unknown kind {kind_no}") from None
    t = BtfType(type_id, kind, _string(strings, name_off), size_or_type, vlen)
    fixed, item = _TRAILER.get(kind, (0, 0))
    if pos + fixed + item * vlen > len(data):
        raise LoaderError(f"BTF type {type_id} runs past the type section")
    if kind == K.BTF_KIND_ARRAY:
        t.array = struct.unpack_from("<III", data, pos)
    elif kind in (K.BTF_KIND_STRUCT, K.BTF_KIND_UNION):
        for i in range(vlen):
            m_name, m_type, m_off = struct.unpack_from("<III", data, pos + fixed + 12 * i)
            # kind_flag set: low 24 bits are the bit offset, high 8 the bitfield size
            bit_off = m_off & 0xFFFFFF if info >> 31 else m_off
            t.members.append(BtfMember(_string(strings, m_name), m_type, bit_off))
    elif kind == K.BTF_KIND_DATASEC:
        for i in range(vlen):
            v_type, v_off, v_size = struct.unpack_from("<III", data, pos + 12 * i)
            var = v_type
            t.members.append(BtfMember("", var, v_off, v_size))
    return t, pos + fixed + item * vlen


def parse_btf(raw: bytes) -> Btf:
    """Decode a .BTF section; raise LoaderError if malformed."""
    if len(raw) < 24:
        raise LoaderError("BTF section too short")
    magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", raw, 0)
    if magic != BTF_MAGIC:
        raise LoaderError(f"bad BTF magic {magic:#x}")
    if version != 1:
        raise LoaderError(f"unsupported BTF version {version}")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", raw, 8)
    base = hdr_len
    types_raw = raw[base + type_off:base + type_off + type_len]
    strings = raw[base + str_off:base + str_off + str_len]
    if len(types_raw) != type_len or len(strings) != str_len:
        raise LoaderError("BTF sections run past the end of .BTF")
    types: list[BtfType | None] = [None]
    pos = 0
    while pos < len(types_raw):
        if pos + 12 > len(types_raw):
            raise LoaderError("truncated BTF type")
        t, pos = _decode_type(types_raw, pos, len(types), strings)
        types.append(t)
    return Btf(types)


# --- map definitions ------------------------------------------------------------

@dataclass
class BtfMapDef:
    """The attributes a BTF-defined map declares (libbpf's btf_map_def)."""

    name: str
    map_type: int = 0
    key_size: int = 0
    value_size: int = 0
    max_entries: int = 0
    map_flags: int = 0


def _array_len(btf: Btf, type_id: int, what: str) -> int:
    ptr = btf.skip_modifiers(type_id)
    if ptr.kind != K.BTF_KIND_PTR:
        raise LoaderError(f"map attribute {what!r} must be declared as int (*{what})[N]")
    arr = btf.skip_modifiers(ptr.size_or_type)
    if arr.kind != K.BTF_KIND_ARRAY or arr.array is None:
        raise LoaderError(f"map attribute {what!r} must be declared as int (*{what})[N]")
    return arr.array[2]


def map_def_from_btf(btf: Btf, var_type_id: int) -> BtfMapDef:
    var = btf.get(var_type_id)
    if var.kind != K.BTF_KIND_VAR:
        raise LoaderError(f"{var.name!r} in .maps is not a variable")
    st = btf.skip_modifiers(var.size_or_type)
    if st.kind != K.BTF_KIND_STRUCT:
        raise LoaderError(f"map {var.name!r} is not a struct")
    d = BtfMapDef(var.name)
    for m in st.members:
        if m.name == "type":
            d.map_type = _array_len(btf, m.type_id, "type")
        elif m.name == "max_entries":
            d.max_entries = _array_len(btf, m.type_id, "max_entries")
        elif m.name == "map_flags":
            d.map_flags = _array_len(btf, m.type_id, "map_flags")
        elif m.name == "key_size":
            d.key_size = _array_len(btf, m.type_id, "key_size")
        elif m.name == "value_size":
            d.value_size = _array_len(btf, m.type_id, "value_size")
        elif m.name in ("key", "value"):
            ptr = btf.skip_modifiers(m.type_id)
            if ptr.kind != K.BTF_KIND_PTR:
                raise LoaderError(f"map {var.name!r}: {m.name} must be a pointer type")
            size = btf.size_of(ptr.size_or_type)
            if m.name == "key":
                d.key_size = size
            else:
                d.value_size = size
        # pinning, values (static prog-array contents), numa_node: not needed here
    return d


def btf_map_defs(btf: Btf) -> dict[str, BtfMapDef]:
    """Map definitions of the ``.maps`` DATASEC, by variable name."""
    sec = btf.find_datasec(".maps")
    if sec is None:
        return {}
    defs = {}
    for entry in sec.members:
        d = map_def_from_btf(btf, entry.type_id)
        defs[d.name] = d
    return defs
