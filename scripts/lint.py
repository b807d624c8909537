"""The static gate behind ``scripts/lint`` (see there for the options).

mypy may still report what ``scripts/mypy-baseline.txt`` lists (the FUSE handlers are
getting their pyfuse3 types); any other mypy error fails. An entry is ``path: error:
message [code]`` without the line number, so editing elsewhere in a file does not make
its old errors look new; a message that names a line has it replaced by ``N``. The
baseline is a multiset: two equal errors in one file are two lines.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(REPO, "scripts", "mypy-baseline.txt")
BIN = os.path.dirname(sys.executable)

_ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):(?P<line>\d+)(?::\d+)?: error: (?P<msg>.*)$")


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True)


_LINE_REF = re.compile(r"\bline \d+")


def key(path: str, msg: str) -> str:
    return f"{path}: error: " + _LINE_REF.sub("line N", msg)


def mypy_errors() -> tuple[list[tuple[str, str]], str]:
    """(key, the error as mypy printed it) of every error, and mypy's summary line."""
    r = run([os.path.join(BIN, "mypy"), "--no-color-output", "--no-error-summary", "--show-error-codes"])
    if r.returncode not in (0, 1):  # 2: mypy itself failed
        sys.exit(f"lint: mypy failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
    out = []
    for line in r.stdout.splitlines():
        m = _ERROR.match(line)
        if m:
            out.append((key(m["path"], m["msg"]), line))
    return out, f"mypy: {len(out)} errors in {len({k.split(':')[0] for k, _ in out})} files"


def compare(errors: list[tuple[str, str]], baseline: collections.Counter[str]) -> tuple[list[str], list[str]]:
    """The errors (as mypy printed them) beyond what the baseline allows, and the baseline
    entries no error matches any more. The baseline absorbs the first errors of each key."""
    budget = collections.Counter(baseline)
    new = []
    for k, line in errors:
        if budget[k] > 0:
            budget[k] -= 1
        else:
            new.append(line)
    return new, sorted(budget.elements())


def read_baseline() -> collections.Counter[str]:
    try:
        with open(BASELINE) as f:
            return collections.Counter(line.rstrip("\n") for line in f if line.strip() and not line.startswith("#"))
    except FileNotFoundError:
        return collections.Counter()


def write_baseline(entries: collections.Counter[str]) -> None:
    with open(BASELINE, "w") as f:
        f.write("# mypy errors still allowed (scripts/lint); it may only shrink: scripts/lint --shrink-baseline\n")
        for entry in sorted(entries.elements()):
            f.write(entry + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/lint", description="ruff check, ruff format --check, mypy + baseline")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--shrink-baseline", action="store_true", help="drop the fixed entries from the baseline")
    mode.add_argument("--write-baseline", action="store_true", help="write the baseline from the current errors")
    args = ap.parse_args()

    errors, summary = mypy_errors()
    current = collections.Counter(k for k, _ in errors)
    baseline = read_baseline()
    if args.write_baseline:
        write_baseline(current)
        print(f"lint: wrote {sum(current.values())} entries to {os.path.relpath(BASELINE, REPO)} ({summary})")
        return 0
    if args.shrink_baseline:
        kept = baseline & current
        write_baseline(kept)
        print(f"lint: baseline {sum(baseline.values())} -> {sum(kept.values())} entries")
        return 0

    failed = []
    ruff = os.path.join(BIN, "ruff")
    r = run([ruff, "check", "--no-fix", "--output-format", "concise", "."])
    if r.returncode != 0:
        print(r.stdout.rstrip() or r.stderr.rstrip())
        failed.append("ruff check")
    r = run([ruff, "format", "--check", "--output-format", "concise", "."])
    if r.returncode != 0:
        print(r.stdout.rstrip() or r.stderr.rstrip())
        failed.append("ruff format --check (run: ruff format)")

    new, gone = compare(errors, baseline)
    if new:
        print("\n".join(new))
        failed.append(f"mypy: {len(new)} errors not in the baseline")
    if gone:
        print(
            f"lint: {len(gone)} baseline entries are fixed; shrink the baseline with"
            " scripts/lint --shrink-baseline and commit it:"
        )
        for entry in gone:
            print(f"  {entry}")
    print(f"lint: {summary}, {sum(baseline.values())} in the baseline")
    if failed:
        print("lint: FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    print("lint: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
