"""Deleting, compared with the kernel overlay (semantics.md rows 17-19, 23,
24): whiteouts (char 0/0) for lower names, nothing for pure-upper names,
rmdir of merged dirs, re-creating whited-out names, ``rm -r d; mkdir d``
making an opaque dir (also after remount).
"""

from __future__ import annotations

import os
import shutil

import pytest

from helpers.stacks import OPQ, T0, T1, WH, D, F, L
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


def _layers():
    l1 = {
        "em": D(mode=0o750, mtime_ns=T1),  # merged with l2/em
        "em/top": F(b"top\n"),
        "ne": D(mtime_ns=T1),
        "ne/top": F(b"t\n"),
        "whd/gone": WH(),  # hides l2/whd/gone
        "whd/keep": F(b"keep\n"),
        "od": OPQ(mtime_ns=T0),  # hides l2/od/*
        "od/top": F(b"t\n"),
        "rmr": D(mtime_ns=T0),
        "rmr/top/t": F(b"t\n"),
        "rmr/wh": WH(),
    }
    l2 = {
        "f": F(b"lower file\n", mtime_ns=T0),
        "sym": L("f"),
        "ld": D(mode=0o700, mtime_ns=T0),  # lower-only empty dir
        "lnd/x": F(b"x\n"),  # lower-only non-empty dir
        "em/bottom": F(b"b\n"),
        "em/sub/s": F(b"s\n"),
        "ne/bottom": F(b"b\n"),
        "whd/gone": F(b"hidden\n"),
        "whd/gone_dir/x": F(b"x\n"),
        "od/hidden": F(b"h\n"),
        "od/hdir/h": F(b"h\n"),
        "rmr/x/y": F(b"y\n"),
        "rmr/z": F(b"z\n"),
        "rmr/wh": F(b"hidden\n"),
        "re": F(b"to be deleted and re-created\n", mode=0o600, uid=1234, mtime_ns=T0),
        "redir/old": F(b"old\n"),
    }
    return [l1, l2]


def _excl_create(p, data):
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def _ops(m, rec):
    rec.do("unlink lower file", os.unlink, m / "f")
    rec.do("unlink lower symlink", os.unlink, m / "sym")
    rec.do("stat unlinked", os.lstat, m / "f")
    rec.do("unlink unlinked", os.unlink, m / "f")
    rec.do("rmdir lower empty dir", os.rmdir, m / "ld")
    rec.do("rmdir lower non-empty dir", os.rmdir, m / "lnd")
    rec.do("unlink whited-out name", os.unlink, m / "whd/gone")
    rec.do("create pure upper", _excl_create, m / "pu", b"x")
    rec.do("unlink pure upper", os.unlink, m / "pu")
    rec.do("mkdir pure upper", os.mkdir, m / "pud")
    rec.do("mkdir pure upper child", os.mkdir, m / "pud/c")
    rec.do("rmdir pure upper non-empty", os.rmdir, m / "pud")
    rec.do("rmdir pure upper child", os.rmdir, m / "pud/c")
    rec.do("rmdir pure upper", os.rmdir, m / "pud")
    rec.do("rmdir merged non-empty", os.rmdir, m / "ne")
    rec.do("unlink em/top", os.unlink, m / "em/top")
    rec.do("unlink em/bottom", os.unlink, m / "em/bottom")
    rec.do("rmdir em/sub non-empty", os.rmdir, m / "em/sub")
    rec.do("unlink em/sub/s", os.unlink, m / "em/sub/s")
    rec.do("rmdir em/sub (only whiteouts)", os.rmdir, m / "em/sub")
    rec.do("listdir em", lambda: sorted(os.listdir(m / "em")))
    rec.do("rmdir em (only whiteouts)", os.rmdir, m / "em")
    rec.do("unlink re", os.unlink, m / "re")
    rec.do("O_EXCL re-create re", _excl_create, m / "re", b"new\n")
    rec.do("stat re", os.lstat, m / "re")
    rec.do("rmtree redir", shutil.rmtree, m / "redir")
    rec.do("mkdir over whited-out dir redir", os.mkdir, m / "redir", 0o755)
    rec.do("listdir redir", lambda: sorted(os.listdir(m / "redir")))
    rec.do("rm -r rmr", shutil.rmtree, m / "rmr")
    rec.do("mkdir rmr", os.mkdir, m / "rmr", 0o750)
    rec.do("listdir rmr", lambda: sorted(os.listdir(m / "rmr")))
    rec.do("rmdir od non-empty", os.rmdir, m / "od")
    rec.do("unlink od/top", os.unlink, m / "od/top")
    rec.do("rmdir opaque dir", os.rmdir, m / "od")
    rec.do("stat od/hidden", os.lstat, m / "od/hidden")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("whiteout"), _layers(), _ops, remount=True)


def _wh(run, p):
    r = run.kupper(p)
    return r is not None and r["type"] == "chr" and r["rdev"] == (0, 0)


def test_unlink_lower_leaves_whiteout(run):
    assert _wh(run, "f") and _wh(run, "sym")
    assert run.k.results["stat unlinked"] == "ERR:ENOENT"
    run.assert_results(
        "unlink lower file", "unlink lower symlink", "stat unlinked", "unlink unlinked", "unlink whited-out name"
    )
    run.assert_view("f", "sym", "whd")
    run.assert_upper("f", "sym", "whd")


def test_rmdir_lower_dir_leaves_whiteout(run):
    assert _wh(run, "ld") and run.k.results["rmdir lower non-empty dir"] == "ERR:ENOTEMPTY"
    assert run.kupper("lnd") is None
    run.assert_results("rmdir lower empty dir", "rmdir lower non-empty dir")
    run.assert_view("ld", "lnd")
    run.assert_upper("ld", "lnd")


def test_pure_upper_removal_leaves_nothing(run):
    assert run.kupper("pu") is None and run.kupper("pud") is None
    run.assert_results(
        "create pure upper",
        "unlink pure upper",
        "mkdir pure upper",
        "mkdir pure upper child",
        "rmdir pure upper non-empty",
        "rmdir pure upper child",
        "rmdir pure upper",
    )
    run.assert_upper("pu", "pud")


def test_rmdir_merged_dir_holding_only_whiteouts(run):
    """em (l1+l2) and em/sub: after their entries are unlinked, rmdir works
    and leaves a whiteout."""
    k = run.k.results
    assert k["rmdir em/sub (only whiteouts)"] == "OK" and k["rmdir em (only whiteouts)"] == "OK"
    assert k["rmdir em/sub non-empty"] == "ERR:ENOTEMPTY"
    assert _wh(run, "em") and run.kupper("em/top") is None
    run.assert_results(
        *[lb for lb in k if "em" in lb.split()[-1] or lb.startswith(("unlink em", "rmdir em", "listdir em"))]
    )
    run.assert_view("em")
    run.assert_upper("em")


def test_rmdir_nonempty_merged_dir_enotempty(run):
    assert run.k.results["rmdir merged non-empty"] == "ERR:ENOTEMPTY"
    assert run.kupper("ne") is None
    run.assert_results("rmdir merged non-empty", "rmdir od non-empty")
    run.assert_view("ne")
    run.assert_upper("ne")


def test_recreate_whited_out_name_with_o_excl(run):
    k = run.k.results
    assert k["O_EXCL re-create re"] == 4
    assert run.kupper("re")["type"] == "file" and run.kupper("re")["uid"] == 0
    assert "trusted.overlay.origin" not in run.kupper("re")["xattrs"]
    run.assert_results("unlink re", "O_EXCL re-create re", "stat re")
    run.assert_view("re")
    run.assert_upper("re")


def test_rm_r_then_mkdir_is_opaque(run):
    """``rm -r rmr; mkdir rmr`` -> upper rmr is a new dir with
    trusted.overlay.opaque=y and nothing in it; ``ls`` is empty, also after
    remount.  Same for a dir below a merged parent (redir)."""
    for d in ("rmr", "redir"):
        ku = run.kupper(d)
        assert ku["type"] == "dir" and ku["xattrs"] == {"trusted.overlay.opaque": b"y"}, ku
        assert not [p for p in run.k.upper["entries"] if p.startswith(d + "/")]
    assert run.k.results["listdir rmr"] == [] and run.k.results["listdir redir"] == []
    run.assert_results(
        "rm -r rmr", "mkdir rmr", "listdir rmr", "rmtree redir", "mkdir over whited-out dir redir", "listdir redir"
    )
    run.assert_view("rmr", "redir")
    run.assert_upper("rmr", "redir")
    run.assert_remount_stable()


def test_rmdir_opaque_dir(run):
    """An opaque lower dir whose visible entries are gone can be removed."""
    assert _wh(run, "od") and run.k.results["stat od/hidden"] == "ERR:ENOENT"
    run.assert_results("unlink od/top", "rmdir opaque dir", "stat od/hidden")
    run.assert_view("od")
    run.assert_upper("od")


def test_whole_tree_and_workdir(run):
    run.assert_all()
