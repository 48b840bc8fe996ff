"""Assembler and disassembler: encodings, syntax errors with their line, and
the llvm-objdump style listing."""
from __future__ import annotations

import pytest

from probes import bpf

# source line -> the 8 bytes (or 16 for lddw) it must encode to
ENCODINGS = [
    ("mov r0, 1", "b7 00 00 00 01 00 00 00"),
    ("mov %r0, 1", "b7 00 00 00 01 00 00 00"),
    ("mov32 %r0, -1", "b4 00 00 00 ff ff ff ff"),
    ("add r1, r2", "0f 21 00 00 00 00 00 00"),
    ("sdiv r1, 3", "37 01 01 00 03 00 00 00"),
    ("smod32 r1, r2", "9c 21 01 00 00 00 00 00"),
    ("movsx1664 r1, r2", "bf 21 10 00 00 00 00 00"),
    ("neg r3", "87 03 00 00 00 00 00 00"),
    ("be16 r0", "dc 00 00 00 10 00 00 00"),
    ("le64 r0", "d4 00 00 00 40 00 00 00"),
    ("bswap32 r0", "d7 00 00 00 20 00 00 00"),
    ("ldxw r0, [r1+4]", "61 10 04 00 00 00 00 00"),
    ("ldxsh r0, [r1-2]", "89 10 fe ff 00 00 00 00"),
    ("stdw [r10-8], 5", "7a 0a f8 ff 05 00 00 00"),
    ("stxb [r1], r2", "73 21 00 00 00 00 00 00"),
    ("lddw r0, 0x1122334455667788", "18 00 00 00 88 77 66 55 00 00 00 00 44 33 22 11"),
    ("lddw r1, map_fd(5)", "18 11 00 00 05 00 00 00 00 00 00 00 00 00 00 00"),
    ("lddw r1, map_value(5, 16)", "18 21 00 00 05 00 00 00 00 00 00 00 10 00 00 00"),
    ("jeq r1, 0, +1", "15 01 01 00 00 00 00 00"),
    ("jsgt32 r1, r2, -3", "6e 21 fd ff 00 00 00 00"),
    ("ja +2", "05 00 02 00 00 00 00 00"),
    ("ja32 +70000", "06 00 00 00 70 11 01 00"),
    ("call 1", "85 00 00 00 01 00 00 00"),
    ("call local +4", "85 10 00 00 04 00 00 00"),
    ("call %r2", "8d 02 00 00 00 00 00 00"),
    ("exit", "95 00 00 00 00 00 00 00"),
    ("lock add [r10-8], r1", "db 1a f8 ff 00 00 00 00"),
    ("lock fetch xor32 [r10-4], r1", "c3 1a fc ff a1 00 00 00"),
    ("lock xchg [r1], r2", "db 21 00 00 e1 00 00 00"),
    ("lock cmpxchg32 [r1], r2", "c3 21 00 00 f1 00 00 00"),
    ("ldacqw r0, [r1+8]", "c3 10 08 00 00 01 00 00"),
    ("ldabsh 12", "28 00 00 00 0c 00 00 00"),
    ("ldindb r2, 1", "50 20 00 00 01 00 00 00"),
]


@pytest.mark.parametrize("line,hexbytes", ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_encoding(line: str, hexbytes: str) -> None:
    code = bpf.assemble(line)
    assert code.hex(" ") == hexbytes
    assert bpf.assemble(bpf.disassemble(code)) == code


def test_labels_and_default_exit_label() -> None:
    code = bpf.assemble("""
        jeq r1, 0, exit     # 'exit' names the first exit
        lddw r0, 1          # two slots
        ja done
    done: mov r0, 2
        exit""")
    insns = bpf.decode(code)
    assert insns[0].off == 4 and insns[3].off == 0


# source -> (line number, message fragment)
ERRORS = [
    ("mov r0, 1\nldxq r0, [r1]", 2, "Invalid mnemonic: ldxq"),
    ("or r0, %r50", 1, "Invalid register: %r50"),
    ("ldxb r0, r1", 1, "Failed to decode register and offset: r1"),
    ("mov32 r0, 2147483648", 1, "Immediate out of 32-bit range"),
    ("mov32 r0, 0x100000000", 1, "Immediate out of 32-bit range"),
    ("ldxb r0, [r1+0x10000]", 1, "Offset out of 16-bit range"),
    ("lddw r0", 1, "Invalid number of operands for mnemonic: lddw"),
    ("\n\nja NOWHERE\nexit", 3, "Invalid label: NOWHERE"),
    ("lock or [r10-8]", 1, "Invalid number of operands for lock"),
    ("lock fetch xchg [r1], r2", 1, "Invalid atomic operation"),
    ("a:\na:\nexit", 2, "Duplicate label: a"),
    ("call weird 3", 1, "Invalid call mode"),
    ("mov r0, 12abc", 1, "Invalid number"),
]


@pytest.mark.parametrize("src,line,message", ERRORS, ids=[e[2] for e in ERRORS])
def test_syntax_error(src: str, line: int, message: str) -> None:
    with pytest.raises(bpf.AsmError) as exc:
        bpf.assemble(src)
    assert exc.value.line == line and message in str(exc.value)


LLVM = [
    ("mov r0, 1", "r0 = 1"),
    ("mov32 r1, r2", "w1 = w2"),
    ("add r1, -4", "r1 += -4"),
    ("arsh32 r1, 3", "w1 s>>= 3"),
    ("sdiv r1, r2", "r1 s/= r2"),
    ("movsx832 r1, r2", "w1 = (s8)w2"),
    ("neg r4", "r4 = -r4"),
    ("be32 r0", "r0 = be32 r0"),
    ("ldxw r0, [r1+4]", "r0 = *(u32 *)(r1 + 4)"),
    ("ldxsb r0, [r1-1]", "r0 = *(s8 *)(r1 - 1)"),
    ("stw [r10-4], 7", "*(u32 *)(r10 - 4) = 7"),
    ("stxdw [r10-8], r1", "*(u64 *)(r10 - 8) = r1"),
    ("jsge32 r1, 5, +3", "if w1 s>= 5 goto +3"),
    ("jset r1, r2, -1", "if r1 & r2 goto -1"),
    ("ja +1", "goto +1"),
    ("lock add [r7], r1", "lock *(u64 *)(r7 + 0) += r1"),
    ("lock fetch and32 [r7+8], r1", "w1 = atomic_fetch_and((u32 *)(r7 + 8), w1)"),
    ("lock cmpxchg [r7], r1", "r0 = cmpxchg_64(r7 + 0, r0, r1)"),
    ("lddw r1, 0x10", "r1 = 0x10 ll"),
    ("call 14", "call 14"),
    ("exit", "exit"),
]


@pytest.mark.parametrize("src,expected", LLVM, ids=[x[1] for x in LLVM])
def test_llvm_listing(src: str, expected: str) -> None:
    first = bpf.disassemble_llvm(bpf.assemble(src)).splitlines()[0]
    index, raw, text = first.split("\t")
    assert index.strip() == "0:" and text == expected
    assert raw == bpf.assemble(src)[:8].hex(" ")


def test_disassembly_names_helpers() -> None:
    assert bpf.disassemble(bpf.assemble("call 1")) == "call 1 # bpf_map_lookup_elem\n"


def test_disassembly_of_invalid_opcode() -> None:
    assert bpf.disassemble(bytes.fromhex("ff00000000000000")).startswith(".invalid ff")


def test_disassembly_marks_reserved_fields() -> None:
    text = bpf.disassemble(bytes.fromhex("0700010001000000"))
    assert text == ".invalid 07 00 01 00 01 00 00 00 # opcode 07 uses reserved fields (off=1)\n"
