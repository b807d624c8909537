"""Hard links and inode numbers, compared with the kernel overlay
(semantics.md rows 52, 53, 55): link() of a lower file, a lower hard-link
set broken by copy-up (index=off), st_ino stable across copy-up and
remount.
"""

from __future__ import annotations

import os

import pytest

from helpers.stacks import T0, F, H
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


def _layers():
    l1 = {"top": F(b"top lower file\n", mtime_ns=T0)}
    l2 = {
        "f": F(b"lower f\n", mtime_ns=T0),
        "g": F(b"lower g, chmod'ed\n", mtime_ns=T0),
        "l2/h1": F(b"orig\n", mtime_ns=T0),
        "l2/h2": H("l2/h1"),
        "l2/h3": H("l2/h1"),
    }
    return [l1, l2]


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _append(p, data):
    with open(p, "ab") as f:
        f.write(data)


def _ino(p):
    return os.lstat(p).st_ino


def _ops(m, rec):
    lower_ino = {p: _ino(m / p) for p in ("f", "g", "top", "l2/h1", "l2/h2")}
    rec.do("link lower file", os.link, m / "f", m / "f.link")
    rec.do("link top lower file", os.link, m / "top", m / "sub.link")
    rec.do("nlink f, f.link", lambda: (os.lstat(m / "f").st_nlink, os.lstat(m / "f.link").st_nlink))
    rec.do("same ino f, f.link", lambda: _ino(m / "f") == _ino(m / "f.link"))
    rec.do("f keeps its lower ino", lambda: _ino(m / "f") == lower_ino["f"])
    rec.do("write via link", _append, m / "f.link", b"more\n")
    rec.do("read f", _read, m / "f")
    rec.do("unlink f", os.unlink, m / "f")
    rec.do("nlink f.link after unlink", lambda: os.lstat(m / "f.link").st_nlink)
    rec.do("chmod g", os.chmod, m / "g", 0o600)
    rec.do("g keeps its lower ino", lambda: _ino(m / "g") == lower_ino["g"])
    rec.do("link new file", lambda: (open(m / "new", "wb").close(), os.link(m / "new", m / "new2")))
    rec.do("same ino new, new2", lambda: _ino(m / "new") == _ino(m / "new2"))
    # lower hard-link set: append through one name
    rec.do("nlink h1 h2 before", lambda: (os.lstat(m / "l2/h1").st_nlink, os.lstat(m / "l2/h2").st_nlink))
    rec.do("append h1", _append, m / "l2/h1", b"+new\n")
    rec.do("read h1", _read, m / "l2/h1")
    rec.do("read h2", _read, m / "l2/h2")
    rec.do("read h3", _read, m / "l2/h3")
    rec.do("nlink h1 h2 h3 after", lambda: tuple(os.lstat(m / f"l2/{n}").st_nlink for n in ("h1", "h2", "h3")))
    rec.do("h1 keeps its lower ino", lambda: _ino(m / "l2/h1") == lower_ino["l2/h1"])
    rec.do("h2 keeps its lower ino", lambda: _ino(m / "l2/h2") == lower_ino["l2/h2"])
    rec.do("h1 same ino as h2", lambda: _ino(m / "l2/h1") == _ino(m / "l2/h2"))
    rec.do("chmod h3", os.chmod, m / "l2/h3", 0o600)
    rec.do("read h3 after chmod", _read, m / "l2/h3")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("links"), _layers(), _ops, remount=True)


def test_link_of_lower_file(run):
    """link(): copy-up + real upper hard link: nlink 2 on both names, same
    st_ino, and it is the lower file's st_ino."""
    k = run.k.results
    assert k["nlink f, f.link"] == [2, 2] and k["same ino f, f.link"] is True
    assert k["f keeps its lower ino"] is True
    assert run.k.upper["hardlinks"] == [("new", "new2"), ("sub.link", "top")]
    run.assert_results(
        "link lower file",
        "link top lower file",
        "nlink f, f.link",
        "same ino f, f.link",
        "f keeps its lower ino",
        "write via link",
        "read f",
        "unlink f",
        "nlink f.link after unlink",
        "link new file",
        "same ino new, new2",
    )
    run.assert_view("f", "f.link", "sub.link", "top", "new", "new2")
    run.assert_upper("f", "f.link", "sub.link", "top", "new", "new2")


def test_lower_hardlink_set_broken_by_copy_up(run):
    """index=off: appending via h1 copies only h1 up; h2/h3 keep the old data
    and the lower nlink; h1 gets nlink 1, no origin xattr, and a NEW st_ino
    (a multiply-linked lower file does not keep its lower inode number)."""
    k = run.k.results
    assert k["nlink h1 h2 before"] == [3, 3]
    assert k["read h1"] == b"orig\n+new\n" and k["read h2"] == b"orig\n"
    assert k["nlink h1 h2 h3 after"] == [1, 3, 3]
    assert k["h1 keeps its lower ino"] is False and k["h2 keeps its lower ino"] is True
    assert "trusted.overlay.origin" not in run.kupper("l2/h1")["xattrs"]
    run.assert_results(
        "nlink h1 h2 before",
        "append h1",
        "read h1",
        "read h2",
        "read h3",
        "nlink h1 h2 h3 after",
        "h1 keeps its lower ino",
        "h2 keeps its lower ino",
        "h1 same ino as h2",
        "chmod h3",
        "read h3 after chmod",
    )
    run.assert_view("l2")
    run.assert_upper("l2")


def test_copied_up_file_keeps_lower_ino(run):
    assert run.k.results["g keeps its lower ino"] is True
    run.assert_results("chmod g", "g keeps its lower ino")
    run.assert_view("g")


def test_whole_tree_workdir_and_remount(run):
    """Including: st_ino of copied-up and new files the same after remount."""
    run.assert_all()
    run.assert_remount_stable()
