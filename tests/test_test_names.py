"""Every test file has a basename of its own: pytest imports the files of the test dirs
(which are not packages) by basename, so a second ``test_run.py`` in another dir stops the
whole suite at collection."""

from __future__ import annotations

from collections import Counter

from helpers import mounts


def test_test_file_basenames_are_unique():
    names = Counter(p.name for p in (mounts.REPO_ROOT / "tests").rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1]
