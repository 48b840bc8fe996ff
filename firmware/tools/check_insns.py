#!/usr/bin/env python3
"""Check with objdump that the special instructions really are in the insns
functions (and were not changed by the toolchain), and that the ftrace /
blacklist sections are present.

    check_insns.py [--cross aarch64-linux-gnu-]
Exit status 0 when everything is found.
"""
import argparse
import os
import re
import subprocess
import sys

FW = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# function -> list of (regex over the objdump lines of that function, min count)
ARM64 = {
    "t_adr": [(r"\tadr\tx1, ", 1), (r"\tadr\tx2, ", 1)],
    "t_adrp": [(r"\tadrp\t", 2)],
    "t_ldr_lit": [(r"\tprfm\tpldl1keep, [0-9a-f]+ <", 1), (r"\tldr\tx1, [0-9a-f]+ <", 1)],
    "t_ldr_lit_w": [(r"\tldr\tw1, [0-9a-f]+ <", 1)],
    "t_ldrsw_lit": [(r"\tldrsw\tx1, [0-9a-f]+ <", 1)],
    "t_bcond": [(r"\tb\.(eq|ne|cs|cc|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al|nv)\t", 16)],
    "t_cbz": [(r"\tcbz\tx0, ", 1), (r"\tcbz\tw0, ", 1), (r"\tcbz\tx3, ", 1)],
    "t_cbnz": [(r"\tcbnz\tx0, ", 1), (r"\tcbnz\tw0, ", 1), (r"\tcbnz\tx3, ", 1)],
    "t_tbz": [(r"\ttbz\t", 4)],
    "t_tbnz": [(r"\ttbnz\t", 6)],
    "t_bl": [(r"\tbl\t[0-9a-f]+ <t_bl_back>", 1), (r"\tbl\t[0-9a-f]+ <t_bl_fwd>", 1)],
    "t_br": [(r"\tbr\tx16", 1)],
    "t_blr": [(r"\tblr\tx9", 1)],
    "t_ret": [(r"\tret$", 1), (r"\tret\tx2", 1)],
    "t_plain": [(r"\tstp\tx29, x30, \[sp, #-32\]!", 1), (r"\tmul\t", 1)],
    "t_ldxr_stxr": [(r"\tldxr\tx2, \[x0\]", 1), (r"\tstxr\tw4, x3, \[x0\]", 1)],
    "t_nop_hint": [(r"\tbti\tc", 1), (r"\tpaciasp", 1), (r"\tnop", 1), (r"\tcsdb", 1),
                   (r"\thint\t#0x7f", 1), (r"\tautiasp", 1)],
}
X86 = {
    "t_rip_load": [(r"\tmov\s+0x[0-9a-f]+\(%rip\),%rax", 1), (r"movzbl 0x[0-9a-f]+\(%rip\)", 1)],
    "t_rip_store": [(r"\tmov\s+%rax,0x[0-9a-f]+\(%rip\)", 1), (r"\tmovl\s+\$0x5a5a5a5a,0x[0-9a-f]+\(%rip\)", 1),
                    (r"\tmovb\s+\$0x77,0x[0-9a-f]+\(%rip\)", 1)],
    "t_rip_lea": [(r"\tlea\s+0x[0-9a-f]+\(%rip\),%rax", 1)],
    "t_rip_cmp": [(r"\tcmp\s+0x[0-9a-f]+\(%rip\),%rdi", 1), (r"\tcmpl\s+\$0x12345678,0x[0-9a-f]+\(%rip\)", 1),
                  (r"\ttestb\s+\$0x80,0x[0-9a-f]+\(%rip\)", 1), (r"\tadd\s+0x[0-9a-f]+\(%rip\),%rdi", 1),
                  (r"\taddq\s+\$0x1,0x[0-9a-f]+\(%rip\)", 1)],
    "t_call": [(r"\te8 .*\tcall\s+[0-9a-f]+ <t_call_helper>", 1)],
    "t_call_indirect": [(r"\tff d0\s+\tcall\s+\*%rax", 1), (r"\t41 ff d3\s+\tcall\s+\*%r11", 1)],
    "t_jmp": [(r"\teb [0-9a-f]{2}\s+\tjmp", 2), (r"\te9 ([0-9a-f]{2} ){4}\s*\tjmp", 1)],
    "t_jcc": [(r"\t7[0-9a-f] [0-9a-f]{2}\s+\tj", 16), (r"\t0f 8[0-9a-f] ([0-9a-f]{2} ){4}\s*\tj", 16)],
    "t_loop": [(r"\te3 [0-9a-f]{2}\s+\tjrcxz", 1), (r"\te2 [0-9a-f]{2}\s+\tloop ", 1),
               (r"\te0 [0-9a-f]{2}\s+\tloopne", 1), (r"\te1 [0-9a-f]{2}\s+\tloope", 1)],
    "t_ret_imm": [(r"\tc2 08 00\s+\tret\s+\$0x8", 1)],
    "t_ret": [(r"\tc3\s+\tret", 1), (r"\tcall\s+[0-9a-f]+ <t_ret_imm>", 1)],
    "t_rep_movsb": [(r"\tf3 a4\s+\trep movsb", 1)],
    "t_rep_stosq": [(r"\tf3 48 ab\s+\trep stos %rax", 1)],
    "t_pushf_popf": [(r"\t9c\s+\tpushf", 3), (r"\t9d\s+\tpopf", 2)],
    "t_plain": [(r"\timul\s+%rsi,%rbx", 1)],
    "t_jmp_indirect": [(r"\tff e0\s+\tjmp\s+\*%rax", 1)],
    "t_endbr": [(r"\tf3 0f 1e fa\s+\tendbr64", 1)],
}


def disasm(objdump, path):
    out = subprocess.run([objdump, "-d", path], stdout=subprocess.PIPE, check=True,
                         universal_newlines=True).stdout
    funcs = {}
    cur = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <([^>]+)>:$", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
        elif cur is not None and line.strip():
            cur.append(line)
    return funcs


def sections(readelf, path):
    out = subprocess.run([readelf, "-SW", path], stdout=subprocess.PIPE, check=True,
                         universal_newlines=True).stdout
    return set(re.findall(r"\]\s+(\S+)\s+(?:PROGBITS|NOBITS)", out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cross", default=os.environ.get("CROSS", "aarch64-linux-gnu-"))
    a = ap.parse_args()
    tools = {"x86_64": ("objdump", "readelf", X86), "arm64": (a.cross + "objdump", a.cross + "readelf", ARM64)}
    bad = 0
    for arch, (objdump, readelf, spec) in tools.items():
        for prog in ("insns.elf", "insns.bare.elf", "demo.elf", "demo.bare.elf"):
            path = os.path.join(FW, "bin", arch, prog)
            funcs = disasm(objdump, path)
            for fn, checks in spec.items():
                lines = funcs.get(fn)
                if lines is None:
                    print("FAIL %s %s: function %s missing" % (arch, prog, fn))
                    bad += 1
                    continue
                for rx, n in checks:
                    got = sum(1 for l in lines if re.search(rx, l))
                    if got < n:
                        print("FAIL %s %s: %s has %d x /%s/, want >= %d" % (arch, prog, fn, got, rx, n))
                        bad += 1
            print("ok   %s %s: %d special-instruction functions" % (arch, prog, len(spec)))
        for prog in ("demo.elf", "demo.bare.elf", "demo.stripped.elf", "callpath.elf", "callpath.bare.elf"):
            secs = sections(readelf, os.path.join(FW, "bin", arch, prog))
            for s in ("_kprobe_blacklist", ".kprobes.text", ".noinstr.text"):
                if s not in secs:
                    print("FAIL %s %s: section %s missing" % (arch, prog, s))
                    bad += 1
        want = "__mcount_loc" if arch == "x86_64" else "__patchable_function_entries"
        for prog in ("callpath.ftrace.elf", "recurse.ftrace.elf"):
            if want not in sections(readelf, os.path.join(FW, "bin", arch, prog)):
                print("FAIL %s %s: section %s missing" % (arch, prog, want))
                bad += 1
    print("check_insns: %s" % ("FAILED (%d)" % bad if bad else "all ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
