"""Directory listings after changes, compared with the kernel overlay, on a mount whose
directories were all listed BEFORE each change (docs/semantics.md, "Directory listings
cached by the kernel").

The direct engine lets the kernel keep listings (FOPEN_CACHE_DIR): getdents is then served
from the kernel's copy until the kernel changes that directory itself or the server tells
it otherwise. So every directory is listed to its end first, then changed, then listed
again, and each listing is compared with the kernel's: names, d_type, and d_ino as the
relation the kernel gives it (equal to the entry's st_ino; ``..`` equal to the parent's).
The kinds of change: create (copying the parent up; beside and inside a lower-only
subdirectory, whose ``..`` may follow its parent's copy-up), unlink of a lower entry (whiteout),
rename across directories, rmdir and mkdir (an opaque directory), a hard link, a copy-up
that changes an entry's d_ino (a lower file with two names), a directory moved to another
parent (its ``..``), and a directory larger than one page (READDIRPLUS for the first
request, READDIR after it, with READDIRPLUS_AUTO).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from helpers.snapshot import raw_readdir
from helpers.stacks import T1, T2, D, F, H
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

BIG = 300  # entries: several pages of dirents, many more of direntplus


def _layers():
    l1 = {
        "md": D(mtime_ns=T1),  # merged (l1 + l2)
        "md/top": F(b"top\n"),
        "big/l1-extra": F(b"x\n"),
    }
    l2 = {
        "ld": D(mtime_ns=T2),  # lower only
        "ld/f": F(b"f\n"),
        "ld/g": F(b"g\n"),
        "md/bottom": F(b"bottom\n"),
        "md/gone": F(b"unlinked: a whiteout\n"),
        "od": D(mtime_ns=T1),  # emptied, removed and made again: opaque
        "od/a": F(b"a\n"),
        "od/sub": D(),
        "od/sub/b": F(b"b\n"),
        "hl": D(mtime_ns=T2),
        "hl/a": F(b"two names\n"),
        "hl/b": H("hl/a"),
        "hl/other": F(b"other\n"),
        "deep/sub/x": F(b"x\n"),  # a lower-only directory under one that gets copied up
        "ln": D(),
        "ln/src": F(b"linked\n"),
        **{f"big/e{i:04d}-{'n' * 20}": F(b"") for i in range(BIG)},
    }
    return [l1, l2]


def _dirs(m: Path) -> list[Path]:
    out = [m]
    for root, dirnames, _ in os.walk(m):
        out += [Path(root) / d for d in sorted(dirnames)]
    return out


def _listing(d: Path) -> dict:
    """``d``'s listing as the kernel and the subject can both give it: the sorted names with
    their d_type, and the names whose d_ino is not what lstat reports (``..``: the parent's)."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        raw = raw_readdir(fd)
    finally:
        os.close(fd)
    names, odd = [], []
    for name, d_ino, d_type in sorted(raw):
        names.append(f"{os.fsdecode(name)}:{d_type}")
        target = d / ".." if name == b".." else d if name == b"." else d / os.fsdecode(name)
        if d_ino != os.lstat(target).st_ino:
            odd.append(os.fsdecode(name))
    return {"names": " ".join(names), "d_ino differs from st_ino": odd}


def _list_all(m: Path, rec, label: str) -> None:
    for d in _dirs(m):
        rec.do(f"{label}: list {d.relative_to(m)}", _listing, d)


def _ops(m: Path, rec) -> None:
    def step(label: str, fn, *args) -> None:
        _list_all(m, rec, "before " + label)  # fills the kernel's listing caches
        rec.do(label, fn, *args)
        _list_all(m, rec, "after " + label)

    step("create in a lower dir", (m / "ld/new").write_bytes, b"new\n")
    step("create beside a lower subdir", (m / "deep/new").write_bytes, b"new\n")
    step("create in a lower subdir", (m / "deep/sub/new").write_bytes, b"new\n")
    step("unlink a lower file", os.unlink, m / "md/gone")
    step("rename across dirs", os.rename, m / "ld/f", m / "md/f")
    for name in ("od/sub/b", "od/a"):
        rec.do("unlink " + name, os.unlink, m / name)
    rec.do("rmdir od/sub", os.rmdir, m / "od/sub")
    step("rmdir od", os.rmdir, m / "od")
    step("mkdir od (opaque)", os.mkdir, m / "od")
    step("hard link", os.link, m / "ln/src", m / "md/linked")
    step("copy-up of one name of two", os.chmod, m / "hl/a", 0o600)

    def parent_ctime_moves(path: Path) -> bool:
        before = os.stat(path.parent).st_ctime_ns  # cached by the kernel since the listing
        time.sleep(0.02)  # past the filesystem's timestamp granularity
        with open(path, "ab") as f:  # a file's copy-up: the upper parent gets a link
            f.write(b"!")
        return os.stat(path.parent).st_ctime_ns != before

    step("copy-up of a file: its parent's ctime", parent_ctime_moves, m / "md/bottom")
    rec.do("mkdir p1", os.mkdir, m / "p1")
    rec.do("mkdir p1/sub", os.mkdir, m / "p1/sub")
    rec.do("mkdir p2", os.mkdir, m / "p2")
    step("move a dir to another parent", os.rename, m / "p1/sub", m / "p2/sub")
    step("create in a big dir", (m / "big/new").write_bytes, b"")
    step("unlink in a big dir", os.unlink, m / ("big/e0150-" + "n" * 20))


def test_listings_after_changes_match_the_kernel(tmp_path):
    run = run_pair(tmp_path, _layers(), _ops)
    run.assert_results()
    run.assert_view()
    # the cases the server must tell the kernel about, as the kernel overlay shows them
    assert run.k.results["after copy-up of one name of two: list hl"]["d_ino differs from st_ino"] == []
    assert run.k.results["copy-up of a file: its parent's ctime"] is True
    assert run.k.results["after move a dir to another parent: list p2/sub"]["d_ino differs from st_ino"] == []
