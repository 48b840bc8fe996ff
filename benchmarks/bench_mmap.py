"""Thousands of small mmaps: cost per mmap as the region count grows (issue 11).

N one-page anonymous mappings with alternating protections (so no two merge), placed as
the mmap syscall places them (first fit from MMAP_BASE), then half of them mprotect'ed and
a quarter munmap'ed. Two columns per operation:

* `book`: emu/memory.py's own bookkeeping (the VMA list, first-fit search, splits), with
  Unicorn stubbed out;
* `uc`: Unicorn's `mem_map` of the same pages alone, which the machine cannot avoid while
  each permission run is one Unicorn region.

Prints a table; asserts nothing. `--sizes 1000,5000,20000`, `--uc-max N` (Unicorn is
measured only up to N regions: it is superlinear and 20k takes minutes)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc   # noqa: E402

from emu.linux.process import MMAP_BASE           # noqa: E402
from emu.memory import PAGE, Memory                # noqa: E402


class NullUc:
    """Unicorn's memory calls as no-ops: what is left is the bookkeeping."""

    def mem_map(self, *_a) -> None: ...
    def mem_unmap(self, *_a) -> None: ...
    def mem_protect(self, *_a) -> None: ...
    def ctl_remove_cache(self, *_a) -> None: ...


def bookkeeping(n: int) -> tuple[float, float, float]:
    """µs per mmap, per mprotect and per munmap with Unicorn stubbed."""
    mem = Memory(NullUc())                                    # type: ignore[arg-type]
    t0 = time.perf_counter()
    for i in range(n):
        addr = mem.find_free(PAGE, MMAP_BASE, 1 << 47)
        assert addr is not None
        mem.map(addr, PAGE, 3 if i & 1 else 1, "[anon]")
    t1 = time.perf_counter()
    for i in range(0, n, 2):
        mem.protect(MMAP_BASE + i * PAGE, PAGE, 5)
    t2 = time.perf_counter()
    for i in range(0, n, 4):
        mem.unmap(MMAP_BASE + i * PAGE, PAGE)
    t3 = time.perf_counter()
    return (1e6 * (t1 - t0) / n, 1e6 * (t2 - t1) / (n / 2), 1e6 * (t3 - t2) / (n / 4))


def unicorn_map(n: int) -> float:
    """µs per Unicorn mem_map of the same pages (the last tenth: the marginal cost)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_tcg_buffer_size(4 << 20)                     # type: ignore[attr-defined]
    tail = max(n // 10, 1)
    for i in range(n - tail):
        uc.mem_map(MMAP_BASE + i * PAGE, PAGE, 3 if i & 1 else 1)
    t0 = time.perf_counter()
    for i in range(n - tail, n):
        uc.mem_map(MMAP_BASE + i * PAGE, PAGE, 3 if i & 1 else 1)
    return 1e6 * (time.perf_counter() - t0) / tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--uc-max", type=int, default=5000)
    args = ap.parse_args()
    print(f"{'regions':>8} {'book mmap µs':>13} {'book mprotect µs':>17} {'book munmap µs':>15}"
          f" {'uc mem_map µs (marginal)':>25}")
    for n in (int(x) for x in args.sizes.split(",")):
        mm, mp, mu = bookkeeping(n)
        ucs = f"{unicorn_map(n):25.0f}" if n <= args.uc_max else f"{'(skipped)':>25}"
        print(f"{n:>8} {mm:13.1f} {mp:17.1f} {mu:15.1f} {ucs}", flush=True)


if __name__ == "__main__":
    main()
