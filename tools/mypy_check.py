"""mypy against a baseline that only shrinks: `python tools/mypy_check.py` runs mypy (the
[tool.mypy] settings of pyproject.toml) and fails when an error appears that the baseline
(mypy-baseline.txt) does not hold; it says how many baseline errors are gone, so that the
baseline can be regenerated (`--update`, or `make mypy-baseline`) and get smaller.

Errors are compared without their line and column numbers (`path: error: message  [code]`),
as a multiset: moving code does not make an old error new, and a second copy of an old error
in the same file is a new one."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "mypy-baseline.txt"
# `path:line[:col]: error: message  [code]` (mypy's default, --no-pretty output)
ERROR = re.compile(r"^(?P<path>[^:\s]+\.pyi?):\d+(?::\d+)?: error: (?P<rest>.*)$")


def normalise(output: str) -> dict[str, list[str]]:
    """mypy's error lines by their form without positions (notes and the summary dropped)."""
    found: dict[str, list[str]] = {}
    for line in output.splitlines():
        m = ERROR.match(line.strip())
        if m:
            key = f"{m['path']}: error: {' '.join(m['rest'].split())}"
            found.setdefault(key, []).append(line.strip())
    return found


def run_mypy(extra: list[str]) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "mypy", "--no-pretty", "--no-error-summary",
           "--show-error-codes", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):          # 2: mypy itself failed (config, crash)
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"mypy_check: mypy failed (exit {proc.returncode})")
    return proc.returncode, proc.stdout


def read_baseline(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(line for line in path.read_text().splitlines()
                   if line and not line.startswith("#"))


def write_baseline(path: Path, errors: Counter[str]) -> None:
    lines = sorted(errors.elements())
    path.write_text("# mypy errors accepted for now (tools/mypy_check.py; regenerate with "
                    "`make mypy-baseline`).\n# It may only shrink.\n" + "".join(f"{l}\n" for l in lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true", help="rewrite the baseline with today's errors")
    ap.add_argument("--baseline", type=Path, default=BASELINE)
    ap.add_argument("mypy_args", nargs="*", help="passed to mypy (default: the configured files)")
    args = ap.parse_args(argv)
    _, out = run_mypy(args.mypy_args)
    raw = normalise(out)
    current = Counter({key: len(lines) for key, lines in raw.items()})
    baseline = read_baseline(args.baseline)
    if args.update:
        write_baseline(args.baseline, current)
        print(f"mypy_check: baseline {args.baseline.name}: {sum(current.values())} errors "
              f"(was {sum(baseline.values())})")
        return 0
    new, fixed = current - baseline, baseline - current
    for key in sorted(new):                 # with positions: every copy, as mypy gave them
        print("\n".join(raw[key]))
    print(f"mypy_check: {sum(current.values())} errors, {sum(baseline.values())} in the baseline, "
          f"{sum(new.values())} new, {sum(fixed.values())} fixed"
          + (" (make mypy-baseline to shrink it)" if fixed else ""))
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
