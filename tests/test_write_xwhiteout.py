"""Removing directories that hold xattr whiteouts, compared with the kernel overlay
(issue 17 item 2, docs/semantics.md "Whiteouts").

A zero-size regular file with ``overlay.whiteout`` in a lower directory marked
``overlay.opaque=x`` is hidden by readdir and by lookup, yet the kernel's emptiness check
(``ovl_check_empty_dir`` -> ``ovl_dir_read_merged``) counts it as an entry: only its
readdir (``ovl_iterate``) tests such files (``check_xwhiteout``), the emptiness check sees
a regular file. So ``rmdir`` of such a directory, and a rename over it, give ``ENOTEMPTY``
even when the listing is empty; an upper whiteout of the same name hides it again.
"""

from __future__ import annotations

import os

import pytest

from helpers.stacks import OPQ, T0, WH, XWH, D, F
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


def _layers():
    l1 = {
        "xd": OPQ(value=b"x", mtime_ns=T0),  # the case: merged with l2/xd
        "xd/x.txt": XWH(),
        "xonly": OPQ(value=b"x", mtime_ns=T0),  # only in l1: listed raw, xwhiteout shown
        "xonly/gone": XWH(),
        "xren": OPQ(value=b"x", mtime_ns=T0),  # a rename target
        "xren/x.txt": XWH(),
        "xmix": OPQ(value=b"x", mtime_ns=T0),  # a char whiteout and an xattr whiteout
        "xmix/w": WH(),
        "xmix/x": XWH(),
        "xre": OPQ(value=b"x", mtime_ns=T0),  # the xattr whiteout replaced by an upper one
        "xre/x.txt": XWH(),
        "plain": D(mtime_ns=T0),  # no opaque=x: the xattr whiteout is listed
        "plain/x.txt": XWH(),
    }
    l2 = {
        "xd/a": F(b"a\n"),
        "xd/x.txt": F(b"hidden\n"),
        "xren/b": F(b"b\n"),
        "xren/x.txt": F(b"hidden\n"),
        "xmix/w": F(b"hidden\n"),
        "xmix/x": F(b"hidden\n"),
        "xmix/keep": F(b"k\n"),
        "xre/a": F(b"a\n"),
        "xre/x.txt": F(b"hidden\n"),
        "plain/y": F(b"y\n"),
    }
    return [l1, l2]


def _ls(p):
    return sorted(os.listdir(p))


def _make(p):
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(fd)


def _ops(m, rec):
    rec.do("ls xd", _ls, m / "xd")
    rec.do("unlink xd/a", os.unlink, m / "xd/a")
    rec.do("ls xd emptied", _ls, m / "xd")
    rec.do("stat xd/x.txt", os.lstat, m / "xd/x.txt")
    rec.do("rmdir xd", os.rmdir, m / "xd")
    rec.do("ls xd after rmdir", _ls, m / "xd")
    rec.do("rmdir xd again", os.rmdir, m / "xd")

    rec.do("ls xonly", _ls, m / "xonly")
    rec.do("rmdir xonly", os.rmdir, m / "xonly")

    rec.do("unlink xren/b", os.unlink, m / "xren/b")
    rec.do("ls xren", _ls, m / "xren")
    rec.do("mkdir newdir", os.mkdir, m / "newdir")
    rec.do("rename newdir over xren", os.rename, m / "newdir", m / "xren")
    rec.do("ls newdir", _ls, m / "newdir")

    rec.do("unlink xmix/keep", os.unlink, m / "xmix/keep")
    rec.do("ls xmix", _ls, m / "xmix")
    rec.do("rmdir xmix", os.rmdir, m / "xmix")

    # A name made over the xattr whiteout and removed again leaves no upper whiteout (the
    # lower has no such name for the kernel's ovl_lower_positive): the xattr whiteout counts.
    rec.do("unlink xre/a", os.unlink, m / "xre/a")
    rec.do("create xre/x.txt", _make, m / "xre/x.txt")
    rec.do("ls xre with x.txt", _ls, m / "xre")
    rec.do("unlink xre/x.txt", os.unlink, m / "xre/x.txt")
    rec.do("ls xre", _ls, m / "xre")
    rec.do("rmdir xre", os.rmdir, m / "xre")
    rec.do("stat xre", lambda: os.path.lexists(m / "xre"))

    rec.do("ls plain", _ls, m / "plain")
    rec.do("unlink plain/y", os.unlink, m / "plain/y")
    rec.do("rmdir plain", os.rmdir, m / "plain")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("xwhiteout"), _layers(), _ops, remount=True)


def test_rmdir_of_emptied_dir_with_xattr_whiteout_enotempty(run):
    """The issue's reproduction: the listing is empty, rmdir gives ENOTEMPTY, nothing changes."""
    k = run.k.results
    assert k["ls xd"] == ["a"] and k["ls xd emptied"] == [] and k["stat xd/x.txt"] == "ERR:ENOENT"
    assert k["rmdir xd"] == "ERR:ENOTEMPTY" and k["rmdir xd again"] == "ERR:ENOTEMPTY"
    run.assert_results(*[lb for lb in k if lb.split()[1].startswith("xd")])
    run.assert_view("xd")
    run.assert_upper("xd")


def test_rmdir_lower_only_dir_with_xattr_whiteout(run):
    run.assert_results("ls xonly", "rmdir xonly")
    run.assert_view("xonly")
    run.assert_upper("xonly")


def test_rename_over_dir_with_xattr_whiteout_enotempty(run):
    k = run.k.results
    assert k["ls xren"] == [] and k["rename newdir over xren"] == "ERR:ENOTEMPTY"
    run.assert_results("unlink xren/b", "ls xren", "mkdir newdir", "rename newdir over xren")
    run.assert_results("ls newdir")
    run.assert_view("xren", "newdir")
    run.assert_upper("xren", "newdir")


def test_char_whiteout_does_not_count_xattr_whiteout_does(run):
    k = run.k.results
    assert k["ls xmix"] == [] and k["rmdir xmix"] == "ERR:ENOTEMPTY"
    run.assert_results("unlink xmix/keep", "ls xmix", "rmdir xmix")
    run.assert_view("xmix")
    run.assert_upper("xmix")


def test_name_made_and_removed_over_xattr_whiteout(run):
    k = run.k.results
    assert k["ls xre with x.txt"] == ["x.txt"] and k["ls xre"] == []
    assert k["rmdir xre"] == "ERR:ENOTEMPTY" and k["stat xre"] is True
    assert run.kupper("xre/x.txt") is None and run.kupper("xre/a")["type"] == "chr"
    run.assert_results(*[lb for lb in k if "xre" in lb])
    run.assert_view("xre")
    run.assert_upper("xre")


def test_xattr_whiteout_outside_opaque_x_dir(run):
    k = run.k.results
    assert k["ls plain"] == ["x.txt", "y"] and k["rmdir plain"] == "ERR:ENOTEMPTY"
    run.assert_results("ls plain", "unlink plain/y", "rmdir plain")
    run.assert_view("plain")
    run.assert_upper("plain")


def test_whole_tree_workdir_and_remount(run):
    run.assert_all()
    run.assert_remount_stable()
