"""scripts/lint's mypy baseline: line numbers do not matter, counts do, and fixed
entries are reported so the baseline can shrink (the tools themselves run in scripts/lint)."""

from __future__ import annotations

import collections
import importlib.util
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lint", REPO / "scripts" / "lint.py")
lint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint)


def _errors(*lines: str) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        m = lint._ERROR.match(line)
        assert m, line
        out.append((lint.key(m["path"], m["msg"]), line))
    return out


def test_keys_drop_line_numbers_also_inside_messages():
    (k1, _), (k2, _) = _errors(
        'a/b.py:10: error: Name "x" already defined on line 3  [no-redef]',
        'a/b.py:99: error: Name "x" already defined on line 70  [no-redef]',
    )
    assert k1 == k2 == 'a/b.py: error: Name "x" already defined on line N  [no-redef]'


def test_compare_counts_each_error_and_reports_fixed_entries():
    base = collections.Counter({"a.py: error: one  [c]": 2, "a.py: error: fixed  [c]": 1})
    errs = _errors(
        "a.py:1: error: one  [c]", "a.py:5: error: one  [c]", "a.py:9: error: one  [c]", "b.py:2: error: one  [c]"
    )
    new, gone = lint.compare(errs, base)
    # a third "one" in a.py is new, as is the same message in another file
    assert new == ["a.py:9: error: one  [c]", "b.py:2: error: one  [c]"]
    assert gone == ["a.py: error: fixed  [c]"]
    assert lint.compare(errs[:2], base) == ([], ["a.py: error: fixed  [c]"])


def test_the_committed_baseline_is_well_formed():
    assert os.path.isfile(lint.BASELINE), "scripts/mypy-baseline.txt is missing"
    entries = lint.read_baseline()  # empty now: overlayfs_py and runner type-check cleanly
    for entry in entries:
        assert entry.split(":")[0].startswith(("overlayfs_py/", "runner/")), entry
        assert ": error: " in entry and not any(c.isdigit() for c in entry.split(":")[1]), entry
