"""Copy-up, compared with the kernel overlay (semantics.md rows 33-40, 43).

One module-wide run performs every operation below on a kernel mount and on
a subject mount of two identical, separately built stacks (each op on its
own lower file); the tests then compare, one rule each: the op's result,
the merged view of the file, and the upper layer after unmount.
"""

from __future__ import annotations

import fcntl
import os

import pytest

from helpers import mounts
from helpers.stacks import CHR, FIFO, T0, T1, T2, D, F, L
from helpers.writeops import PRESENT, run_pair, stat_with_atime

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

OWNED = dict(uid=1234, gid=5678, mtime_ns=T0, atime_ns=T1)

# op name -> (file kind, op); each gets its own lower file t/<name>
TRIGGERS = {
    "open_wronly": lambda p: os.close(os.open(p, os.O_WRONLY)),
    "open_rdwr": lambda p: os.close(os.open(p, os.O_RDWR)),
    "o_trunc": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)),
    "truncate": lambda p: os.truncate(p, 5),
    "chmod": lambda p: os.chmod(p, 0o600),
    "chown": lambda p: os.chown(p, 4321, 8765),
    "lchown_symlink": lambda p: os.chown(p, 4321, 8765, follow_symlinks=False),
    "utime": lambda p: os.utime(p, ns=(T2, T2)),
    "setxattr": lambda p: os.setxattr(p, "user.x", b"new value"),
    "removexattr": lambda p: os.removexattr(p, "user.t"),
    "link_source": lambda p: os.link(p, str(p) + ".newlink"),
    "rename_source": lambda p: os.rename(p, str(p) + ".renamed"),
    "append": lambda p: _append(p, b"appended\n"),
}


def _append(p, data):
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def _ro_read(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _flock_ro(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)


NON_TRIGGERS = {
    "ro_open_read": _ro_read,
    "stat": lambda p: os.stat(p),
    "lstat": lambda p: os.lstat(p),
    "readlink": lambda p: os.readlink(p),
    "access": lambda p: [os.access(p, m) for m in (os.R_OK, os.W_OK, os.X_OK)],
    "flock_ro_fd": _flock_ro,
    "listxattr": lambda p: sorted(os.listxattr(p)),
    "getxattr": lambda p: os.getxattr(p, "user.t"),
}

SYMLINK_OPS = {"lchown_symlink", "readlink"}


def _layers():
    l2 = {
        "t": D(mode=0o755, uid=1234, gid=5678, mtime_ns=T2),
        "n": D(mode=0o755, mtime_ns=T2),
        "deep": D(mode=0o750, uid=1234, gid=5678, mtime_ns=T0),
        "deep/a": D(mode=0o711, uid=2000, gid=2001, mtime_ns=T1),
        "deep/a/b": D(mode=0o1777, uid=3000, gid=3001, mtime_ns=T2),
        "deep/a/b/c": D(mode=0o2755, uid=0, gid=50, mtime_ns=T0),
        "deep/a/b/c/file": F(b"deep file\n", **OWNED),
        "deep/a/b/c/sibling": F(b"not copied up\n"),
        "deep/a/other/x": F(b"x\n"),
        "pres/file": F(
            b"keep all of me\n" * 100, mode=0o4750, xattrs={"user.one": b"1", "user.two": b"\x00\xff" * 50}, **OWNED
        ),
        "pres/sym": L("some/where/../target", uid=1234, gid=5678, mtime_ns=T0, atime_ns=T1),
        "sp/fifo": FIFO(mode=0o640, **OWNED),
        "sp/null": CHR(1, 3, mode=0o666, **OWNED),
        "fdb/file": F(b"old data in the lower layer\n"),
    }
    for name in TRIGGERS:
        if name in SYMLINK_OPS:
            l2[f"t/{name}"] = L("target/of/the/link", uid=1234, gid=5678, mtime_ns=T0, atime_ns=T1)
        else:
            l2[f"t/{name}"] = F(f"trigger {name}\n".encode(), mode=0o644, xattrs={"user.t": b"lower"}, **OWNED)
    for name in NON_TRIGGERS:
        if name in SYMLINK_OPS:
            l2[f"n/{name}"] = L("n/target", uid=1234, gid=5678, mtime_ns=T0)
        else:
            l2[f"n/{name}"] = F(f"no copy-up {name}\n".encode(), mode=0o644, xattrs={"user.t": b"lower"}, **OWNED)
    l1 = {
        # the top lower contributes to the merged dir t and hides nothing
        "t/top_only": F(b"t\n", mtime_ns=T1),
        "t": D(mode=0o775, uid=1234, gid=5678, mtime_ns=T1),
    }
    return [l1, l2]


def _fd_before_copy_up(m):
    p = m / "fdb" / "file"
    fd1 = os.open(p, os.O_RDONLY)
    try:
        before = os.pread(fd1, 100, 0)
        fd2 = os.open(p, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd2, b"NEW data written through a second fd\n")
        finally:
            os.close(fd2)
        after = os.pread(fd1, 100, 0)
        return {"before": before, "after": after, "fstat_size": os.fstat(fd1).st_size}
    finally:
        os.close(fd1)


def _ops(m, rec):
    t0 = rec.t_start
    for name, fn in TRIGGERS.items():
        rec.do(f"trigger {name}", fn, m / "t" / name)
        p = m / "t" / (name + (".renamed" if name == "rename_source" else ""))
        rec.do(f"after {name}", stat_with_atime, p, t0)
    for name, fn in NON_TRIGGERS.items():
        rec.do(f"non-trigger {name}", fn, m / "n" / name)
    rec.do("deep chmod", os.chmod, m / "deep/a/b/c/file", 0o600)
    # triggers that change nothing the copy must preserve
    rec.do("pres open", lambda: os.close(os.open(m / "pres/file", os.O_RDWR)))
    rec.do("pres lchown", os.chown, m / "pres/sym", 1234, 5678, follow_symlinks=False)
    rec.do("pres stat file", stat_with_atime, m / "pres/file", t0)
    rec.do("pres stat sym", stat_with_atime, m / "pres/sym", t0)
    rec.do("pres xattrs", lambda: {n: os.getxattr(m / "pres/file", n) for n in sorted(os.listxattr(m / "pres/file"))})
    rec.do("pres readlink", os.readlink, m / "pres/sym")
    rec.do("chmod fifo", os.chmod, m / "sp/fifo", 0o600)
    rec.do("chmod chr", os.chmod, m / "sp/null", 0o600)
    rec.do("stat fifo", os.lstat, m / "sp/fifo")
    rec.do("stat chr", os.lstat, m / "sp/null")
    rec.do("fd before copy-up", _fd_before_copy_up, m)


def _origin_via_mount(m, sr):
    # private xattrs stay hidden through the mount
    out = {}
    for p in ("t/chmod", "deep", "pres/file"):
        try:
            out[p] = os.getxattr(m / p, "trusted.overlay.origin", follow_symlinks=False)
        except OSError as e:
            out[p] = e.errno
    sr.extra["origin_via_mount"] = out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # Row 43 (an fd opened before the copy-up follows it) holds on the direct engine only
    # without FUSE passthrough: tests/test_passthrough.py pins what passthrough does there
    # (docs/semantics.md, "FUSE passthrough").
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(mounts.PASSTHROUGH_ENV, "off")
        return run_pair(tmp_path_factory.mktemp("copyup"), _layers(), _ops, remount=True, after=_origin_via_mount)


def _copied_path(name):
    return f"t/{name}.renamed" if name == "rename_source" else f"t/{name}"


@pytest.mark.parametrize("name", list(TRIGGERS))
def test_copy_up_trigger(run, name):
    """Each trigger copies the file up (op result, view and upper compared)."""
    p = _copied_path(name)
    # the oracle: the object is in upper, with an origin record (a lower
    # hard link gets none: link_source's upper file has nlink 2 after the op)
    ku = run.kupper(p)
    assert ku is not None, f"kernel did not copy up {p}"
    assert ku["xattrs"].get("trusted.overlay.origin") == PRESENT
    run.assert_results(f"trigger {name}", f"after {name}")
    paths = (
        [p]
        + ([f"t/{name}.newlink"] if name == "link_source" else [])
        + ([f"t/{name}"] if name == "rename_source" else [])
    )
    run.assert_view(*paths)
    run.assert_upper(*paths)


@pytest.mark.parametrize("name", list(NON_TRIGGERS))
def test_no_copy_up(run, name):
    """Reading ops leave the upper untouched (the file is absent from upper)."""
    assert run.kupper(f"n/{name}") is None
    assert run.kupper("n") is None
    run.assert_results(f"non-trigger {name}")
    run.assert_view(f"n/{name}")
    run.assert_upper("n")


def test_copy_up_creates_ancestors_with_lower_metadata(run):
    """Copy-up of deep/a/b/c/file creates deep, deep/a, deep/a/b, deep/a/b/c
    in upper with the lower dirs' mode/owner/mtime (and nothing else)."""
    for d, (mode, uid, gid, mt) in {
        "deep": (0o750, 1234, 5678, T0),
        "deep/a": (0o711, 2000, 2001, T1),
        "deep/a/b": (0o1777, 3000, 3001, T2),
        "deep/a/b/c": (0o2755, 0, 50, T0),
    }.items():
        k = run.kupper(d)
        assert (k["type"], k["mode"] & 0o7777, k["uid"], k["gid"], k["mtime_ns"]) == ("dir", mode, uid, gid, mt), d
    assert run.kupper("deep/a/b/c/sibling") is None and run.kupper("deep/a/other") is None
    run.assert_results("deep chmod")
    run.assert_upper("deep")
    run.assert_view("deep")


def test_copy_up_preserves_metadata(run):
    """Data, mode (incl. setuid), uid/gid, mtime and atime, user.* xattrs and
    the symlink target survive a copy-up that changes nothing."""
    k = run.k.results
    assert k["pres stat file"]["atime"] == T1 and k["pres stat file"]["mtime"] == T0
    assert k["pres stat file"]["mode"] == oct(0o4750)
    assert k["pres stat sym"]["mtime"] == T0 and k["pres stat sym"]["atime"] == T1
    ku = run.kupper("pres/file")
    assert ku["mtime_ns"] == T0 and ku["uid"] == 1234 and ku["gid"] == 5678
    assert ku["xattrs"]["user.two"] == b"\x00\xff" * 50
    assert run.kupper("pres/sym")["target"] == b"some/where/../target"
    run.assert_results("pres open", "pres lchown", "pres stat file", "pres stat sym", "pres xattrs", "pres readlink")
    run.assert_view("pres")
    run.assert_upper("pres")


def test_special_files_copy_up_as_same_type(run):
    """A lower fifo and char device 1/3 copy up (chmod) as a fifo and a char
    device 1/3."""
    assert run.kupper("sp/fifo")["type"] == "fifo"
    assert (run.kupper("sp/null")["type"], run.kupper("sp/null")["rdev"]) == ("chr", (1, 3))
    assert run.kupper("sp/null")["mode"] & 0o7777 == 0o600
    run.assert_results("chmod fifo", "chmod chr", "stat fifo", "stat chr")
    run.assert_view("sp")
    run.assert_upper("sp")


def test_fd_opened_before_copy_up_sees_new_data(run):
    """An fd opened O_RDONLY before another fd copies the file up reads the
    new data afterwards (row 43)."""
    k = run.k.results["fd before copy-up"]
    assert k["after"] == b"NEW data written through a second fd\n", k
    run.assert_results("fd before copy-up")
    run.assert_upper("fdb")


def test_private_xattrs_hidden_through_mount(run):
    """getxattr trusted.overlay.origin through the mount -> ENODATA."""
    import errno

    assert set(run.k.extra["origin_via_mount"].values()) == {errno.ENODATA}
    run._need(run.s, "the xattrs")
    assert run.s.extra["origin_via_mount"] == run.k.extra["origin_via_mount"]


def test_whole_tree_and_workdir(run):
    """Everything at once: all op results, the full view, the full upper, and
    a clean workdir after unmount."""
    run.assert_all()


def test_remount_stable(run):
    """After unmount + remount (same impl) the view is unchanged, st_ino of
    copied-up files included."""
    run.assert_remount_stable()
