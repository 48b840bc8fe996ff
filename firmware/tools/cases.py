#!/usr/bin/env python3
"""Record / check the expected outputs of the firmware programs.

    cases.py record [--qemu qemu-aarch64]   run every case of expected/cases.txt
                                            natively (x86_64) or under qemu-aarch64
                                            (arm64) and write expected/<arch>/<stem>.out/.rc
    cases.py check  [--qemu qemu-aarch64]   run them again and compare
    cases.py bare   [--runner tools/run_bare.py]
                                            run every bin/<arch>/<prog>.bare.elf with the
                                            Unicorn reference runner and compare with
                                            expected/<arch>/<prog>.out and .rc
    cases.py list                           print "arch binary stem stdin args..." per case

cases.txt: one case per line, `arch name args...` (blank lines and lines starting
with `#` ignored; tokens split with POSIX shell quoting rules, i.e. Python shlex).
  arch   x86_64 or arm64
  name   the binary firmware/bin/<arch>/<name>.elf (e.g. demo, demo.stripped,
         callpath.ftrace, libc-hello)
  args   argv[1..]; a token `<PATH` is not an argument but redirects stdin from PATH
         (stdin is /dev/null otherwise).  Paths are relative to the repository root,
         which is also the working directory.  argv[0] is the binary's path relative
         to the repository root, e.g. firmware/bin/x86_64/demo.elf; the environment
         is empty.
Expected files: firmware/expected/<arch>/<stem>.out (exact stdout bytes) and
<stem>.rc (exit status as a decimal line; a negative number -N means "killed by
signal N", e.g. -11 for SIGSEGV).  stem = name, then for every token "-" + token,
where a `<PATH` token becomes "stdin_" + basename(PATH), a token containing "/"
becomes its basename, and every character outside [A-Za-z0-9._+=-] becomes "_".
Examples: `x86_64 hotloop 1000` -> hotloop-1000.out, `arm64 libc-stdin_wc
<tests/data/progs/wc-input.txt` -> libc-stdin_wc-stdin_wc-input.txt.out.
stderr is not recorded.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys

FW = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(FW)
CASES = os.path.join(FW, "expected", "cases.txt")
TIMEOUT = 300


def sanitize(tok):
    if tok.startswith("<"):
        tok = "stdin_" + os.path.basename(tok[1:])
    elif "/" in tok:
        tok = os.path.basename(tok)
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", tok)


def load_cases():
    cases = []
    seen = set()
    with open(CASES) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            toks = shlex.split(line)
            arch, name, rest = toks[0], toks[1], toks[2:]
            if arch not in ("x86_64", "arm64"):
                sys.exit("%s:%d: bad arch %r" % (CASES, lineno, arch))
            stdin = None
            args = []
            for t in rest:
                if t.startswith("<"):
                    stdin = t[1:]
                else:
                    args.append(t)
            stem = "-".join([name] + [sanitize(t) for t in rest])
            if (arch, stem) in seen:
                sys.exit("%s:%d: duplicate stem %s" % (CASES, lineno, stem))
            seen.add((arch, stem))
            cases.append({"arch": arch, "name": name, "args": args, "stdin": stdin, "stem": stem})
    return cases


def run_case(case, qemu):
    binary = os.path.join("firmware", "bin", case["arch"], case["name"] + ".elf")
    cmd = [binary] + case["args"]
    if case["arch"] == "arm64":
        cmd = [qemu] + cmd
    stdin = open(os.path.join(ROOT, case["stdin"]), "rb") if case["stdin"] else subprocess.DEVNULL
    try:
        p = subprocess.run(cmd, cwd=ROOT, stdin=stdin, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env={}, timeout=TIMEOUT)
    finally:
        if case["stdin"]:
            stdin.close()
    return p.stdout, p.returncode


def paths(arch, stem):
    d = os.path.join(FW, "expected", arch)
    return os.path.join(d, stem + ".out"), os.path.join(d, stem + ".rc")


def read_expected(arch, stem):
    out_p, rc_p = paths(arch, stem)
    with open(out_p, "rb") as f:
        out = f.read()
    with open(rc_p) as f:
        rc = int(f.read().strip())
    return out, rc


def cmd_record(a):
    for c in load_cases():
        out, rc = run_case(c, a.qemu)
        out_p, rc_p = paths(c["arch"], c["stem"])
        os.makedirs(os.path.dirname(out_p), exist_ok=True)
        with open(out_p, "wb") as f:
            f.write(out)
        with open(rc_p, "w") as f:
            f.write("%d\n" % rc)
        print("%-7s %-40s rc=%-4d %6d bytes" % (c["arch"], c["stem"], rc, len(out)))
    return 0


def cmd_check(a):
    bad = 0
    for c in load_cases():
        out, rc = run_case(c, a.qemu)
        eout, erc = read_expected(c["arch"], c["stem"])
        ok = out == eout and rc == erc
        bad += not ok
        print("%-4s %-7s %s" % ("ok" if ok else "FAIL", c["arch"], c["stem"]))
    return 1 if bad else 0


def cmd_bare(a):
    bad = 0
    for arch in ("x86_64", "arm64"):
        d = os.path.join(FW, "bin", arch)
        for fn in sorted(os.listdir(d)):
            if not fn.endswith(".bare.elf"):
                continue
            prog = fn[: -len(".bare.elf")]
            p = subprocess.run([a.python, a.runner, os.path.join(d, fn)], stdout=subprocess.PIPE,
                               timeout=TIMEOUT)
            if prog == "counters":  # output is emulator dependent
                ok = p.returncode == 0
            else:
                eout, erc = read_expected(arch, prog)
                ok = p.stdout == eout and p.returncode == erc
            bad += not ok
            print("%-4s %-7s %s (rc=%d)" % ("ok" if ok else "FAIL", arch, fn, p.returncode))
    return 1 if bad else 0


def cmd_list(a):
    for c in load_cases():
        print(c["arch"], "firmware/bin/%s/%s.elf" % (c["arch"], c["name"]), c["stem"],
              c["stdin"] or "-", " ".join(shlex.quote(x) for x in c["args"]))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["record", "check", "bare", "list"])
    ap.add_argument("--qemu", default="qemu-aarch64")
    ap.add_argument("--runner", default=os.path.join(FW, "tools", "run_bare.py"))
    ap.add_argument("--python", default=None,
                    help="interpreter with unicorn for 'bare' (default: ../.venv/bin/python if present)")
    a = ap.parse_args()
    if a.python is None:
        venv = os.path.join(ROOT, ".venv", "bin", "python")
        a.python = venv if os.path.exists(venv) else sys.executable
    return {"record": cmd_record, "check": cmd_check, "bare": cmd_bare, "list": cmd_list}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
