"""rename / renameat2, compared with the kernel overlay (semantics.md rows
47-51): lower files copy up and leave a whiteout, NOREPLACE / EXCHANGE /
WHITEOUT flags, pure-upper dirs rename, lower and merged dirs give EXDEV
(default redirect_dir=off), and shell ``mv`` of a lower dir falls back to
copy + delete.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers.stacks import T0, T1, T2, D, F, L
from helpers.writeops import PRESENT, RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, renameat2, run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

OWN = dict(uid=1234, gid=5678, mtime_ns=T0)


def _layers():
    l1 = {
        "md": D(mtime_ns=T1),  # merged dir (l1 + l2)
        "md/top": F(b"top\n"),
        "r/over_top": F(b"in the top lower\n", mtime_ns=T1),
    }
    l2 = {
        "r": D(mode=0o755, mtime_ns=T2),
        "r/a": F(b"a: renamed to a new name\n", mode=0o640, xattrs={"user.a": b"1"}, **OWN),
        "r/b": F(b"b: renamed over c\n", **OWN),
        "r/c": F(b"c: replaced\n", mtime_ns=T1),
        "r/d": F(b"d: noreplace source\n"),
        "r/e": F(b"e: noreplace target\n"),
        "r/x1": F(b"x1: exchanged\n", mode=0o600, **OWN),
        "r/x2": F(b"x2: exchanged\n", mode=0o644, mtime_ns=T1),
        "r/w": F(b"w\n"),
        "r/s": L("a"),
        "r/over_top": F(b"hidden\n"),
        "sub/deep": D(mode=0o700, mtime_ns=T0),
        "ld": D(mode=0o750, uid=1234, mtime_ns=T0),
        "ld/f": F(b"in lower dir\n", mtime_ns=T1, xattrs={"user.k": b"v"}),
        "ld/sub/g": F(b"g\n", mtime_ns=T2),
        "ld/sym": L("f", mtime_ns=T1),
        "md/bottom": F(b"bottom\n"),
        "mvd": D(mode=0o751, uid=1234, gid=5678, mtime_ns=T1),
        "mvd/f": F(b"moved by mv\n", mode=0o640, uid=1234, gid=5678, mtime_ns=T0, xattrs={"user.mv": b"kept"}),
        "mvd/sub": D(mode=0o700, mtime_ns=T2),
        "mvd/sub/g": F(b"g\n", mtime_ns=T1),
        "mvd/link": L("f", mtime_ns=T0),
    }
    return [l1, l2]


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _ops(m, rec):
    r = m / "r"
    rec.do("rename lower file", os.rename, r / "a", r / "a2")
    rec.do("read a2", _read, r / "a2")
    rec.do("stat a2", os.lstat, r / "a2")
    rec.do("stat a", os.lstat, r / "a")
    rec.do("rename over lower file", os.rename, r / "b", r / "c")
    rec.do("read c", _read, r / "c")
    rec.do("stat b", os.lstat, r / "b")
    rec.do("rename over top-lower file", os.rename, r / "w", r / "over_top")
    rec.do("RENAME_NOREPLACE", renameat2, r / "d", r / "e", RENAME_NOREPLACE)
    rec.do("RENAME_NOREPLACE to new", renameat2, r / "d", r / "d2", RENAME_NOREPLACE)
    rec.do("RENAME_EXCHANGE", renameat2, r / "x1", r / "x2", RENAME_EXCHANGE)
    rec.do("read x1", _read, r / "x1")
    rec.do("read x2", _read, r / "x2")
    rec.do("stat x1", os.lstat, r / "x1")
    rec.do("stat x2", os.lstat, r / "x2")
    rec.do("RENAME_EXCHANGE with missing", renameat2, r / "x1", r / "nope", RENAME_EXCHANGE)
    rec.do("RENAME_WHITEOUT", renameat2, r / "e", r / "e2", RENAME_WHITEOUT)
    rec.do("rename lower symlink", os.rename, r / "s", r / "s2")
    rec.do("rename into a lower dir", os.rename, r / "a2", m / "sub/deep/a3")
    rec.do("stat a3", os.lstat, m / "sub/deep/a3")
    # directories
    rec.do("mkdir pure upper dir", os.mkdir, m / "ud")
    rec.do("mkdir pure upper child", os.mkdir, m / "ud/child")
    rec.do("create in pure upper dir", lambda: open(m / "ud/child/f", "wb").close())
    rec.do("rename pure upper dir", os.rename, m / "ud", m / "ud2")
    rec.do("listdir ud2/child", lambda: sorted(os.listdir(m / "ud2/child")))
    rec.do("rename pure upper dir into lower dir", os.rename, m / "ud2", m / "sub/ud3")
    rec.do("rename lower dir", os.rename, m / "ld", m / "ld2")
    rec.do("rename lower dir NOREPLACE", renameat2, m / "ld", m / "ld3", RENAME_NOREPLACE)
    rec.do("rename merged dir", os.rename, m / "md", m / "md2")
    rec.do("rename lower dir over empty upper dir", lambda: (os.mkdir(m / "empty"), os.rename(m / "ld", m / "empty")))
    rec.do("rename upper dir over lower dir", os.rename, m / "empty", m / "ld")
    rec.do("rename file over dir", os.rename, r / "c", m / "sub")
    rec.do("rename dir over file", os.rename, m / "sub", r / "c")
    rec.do("listdir ld", lambda: sorted(os.listdir(m / "ld")))
    rec.do(
        "mv lower dir", lambda: subprocess.run(["mv", str(m / "mvd"), str(m / "mvd2")], capture_output=True).returncode
    )
    rec.do("listdir mvd2", lambda: sorted(os.listdir(m / "mvd2")))
    rec.do("stat mvd", os.lstat, m / "mvd")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("rename"), _layers(), _ops, remount=True)


def _wh(run, p):
    r = run.kupper(p)
    return r is not None and r["type"] == "chr" and r["rdev"] == (0, 0)


def test_rename_lower_file(run):
    """Copy-up (origin, metadata kept) + whiteout at the old name."""
    assert _wh(run, "r/a")
    assert run.kupper("sub/deep/a3")["xattrs"] == {"trusted.overlay.origin": PRESENT, "user.a": b"1"}
    assert run.kupper("sub/deep/a3")["mtime_ns"] == T0
    run.assert_results(
        "rename lower file",
        "read a2",
        "stat a2",
        "stat a",
        "rename into a lower dir",
        "stat a3",
        "rename lower symlink",
    )
    run.assert_view("r/a", "r/a2", "sub/deep", "r/s", "r/s2")
    run.assert_upper("r/a", "r/a2", "sub/deep", "r/s", "r/s2")


def test_rename_over_existing_lower_file(run):
    assert _wh(run, "r/b") and run.k.results["read c"] == b"b: renamed over c\n"
    run.assert_results("rename over lower file", "read c", "stat b", "rename over top-lower file")
    run.assert_view("r/b", "r/over_top", "r/w")
    run.assert_upper("r/b", "r/over_top", "r/w")


def test_rename_noreplace(run):
    k = run.k.results
    assert k["RENAME_NOREPLACE"] == "ERR:EEXIST" and k["RENAME_NOREPLACE to new"] == "OK"
    run.assert_results("RENAME_NOREPLACE", "RENAME_NOREPLACE to new")
    run.assert_view("r/d", "r/d2", "r/e")
    run.assert_upper("r/d", "r/d2", "r/e")


def test_rename_exchange_two_lower_files(run):
    """Both names copied up (with origin) and swapped."""
    k = run.k.results
    assert k["RENAME_EXCHANGE"] == "OK" and k["read x1"] == b"x2: exchanged\n"
    for p in ("r/x1", "r/x2"):
        assert run.kupper(p)["xattrs"].get("trusted.overlay.origin") == PRESENT
    run.assert_results("RENAME_EXCHANGE", "read x1", "read x2", "stat x1", "stat x2", "RENAME_EXCHANGE with missing")
    run.assert_view("r/x1", "r/x2")
    run.assert_upper("r/x1", "r/x2")


def test_rename_whiteout_flag_rejected(run):
    assert run.k.results["RENAME_WHITEOUT"] == "ERR:EINVAL"
    run.assert_results("RENAME_WHITEOUT")


def test_rename_pure_upper_dir(run):
    k = run.k.results
    assert k["rename pure upper dir"] == "OK"
    assert k["rename pure upper dir into lower dir"] == "OK"
    run.assert_results(
        "mkdir pure upper dir",
        "mkdir pure upper child",
        "create in pure upper dir",
        "rename pure upper dir",
        "listdir ud2/child",
        "rename pure upper dir into lower dir",
    )
    run.assert_view("ud", "ud2", "sub/ud3")
    run.assert_upper("ud", "ud2", "sub/ud3")


def test_rename_lower_or_merged_dir_exdev(run):
    k = run.k.results
    for lb in (
        "rename lower dir",
        "rename lower dir NOREPLACE",
        "rename merged dir",
        "rename lower dir over empty upper dir",
    ):
        assert k[lb] == "ERR:EXDEV", lb
    assert k["rename upper dir over lower dir"] == "ERR:ENOTEMPTY"
    run.assert_results(
        "rename lower dir",
        "rename lower dir NOREPLACE",
        "rename merged dir",
        "rename lower dir over empty upper dir",
        "rename upper dir over lower dir",
        "rename file over dir",
        "rename dir over file",
        "listdir ld",
    )
    run.assert_view("ld", "ld2", "md", "md2", "empty")
    run.assert_upper("ld", "ld2", "md", "md2", "empty")


def test_mv_lower_dir_falls_back_to_copy(run):
    """Shell ``mv`` of a lower dir: EXDEV, then copy + delete; the view and
    the upper end up the same (mvd a whiteout, mvd2 a new dir)."""
    k = run.k.results
    assert k["mv lower dir"] == 0 and k["stat mvd"] == "ERR:ENOENT"
    assert k["listdir mvd2"] == ["f", "link", "sub"] and _wh(run, "mvd")
    run.assert_results("mv lower dir", "listdir mvd2", "stat mvd")
    run.assert_view("mvd", "mvd2")
    run.assert_upper("mvd", "mvd2")


def test_whole_tree_workdir_and_remount(run):
    run.assert_all()
    run.assert_remount_stable()
