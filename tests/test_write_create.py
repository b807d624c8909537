"""New objects, compared with the kernel overlay: create / mkdir / mknod
(fifo, char device) / symlink / link belong to the CALLER's uid/gid, honour
the umask, and inherit the group (and S_ISGID for dirs) of a setgid dir.

Another user is a forked child doing ``setgroups([])``,
``setresgid(1000)``, ``setresuid(1000)`` inside a lower dir made
world-writable through the mount (``chmod 1777``).
"""

from __future__ import annotations

import os
import stat

import pytest

from helpers.stacks import T0, T1, D, F
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

USER = 1000


def _layers():
    l2 = {
        "pub": D(mode=0o755, mtime_ns=T0),
        "pub/own": F(b"owned by the user\n", uid=USER, gid=USER, mode=0o644),
        "pub/lower_root_file": F(b"root's\n", mode=0o644),
        "sg": D(mode=0o2777, uid=0, gid=5678, mtime_ns=T1),
        "sg/old": F(b"old\n"),
        "um": D(mode=0o777, mtime_ns=T0),
        "rootdir": D(mode=0o755, uid=2000, gid=2000, mtime_ns=T1),
    }
    l1 = {"top": F(b"top\n")}
    return [l1, l2]


def _create(name, mode, flags=os.O_CREAT | os.O_WRONLY | os.O_EXCL):
    def f():
        os.close(os.open(name, flags, mode))

    return f


def _ops(m, rec):
    rec.do("chmod pub 1777", os.chmod, m / "pub", 0o1777)
    user = dict(uid=USER, gid=USER, umask=0o022, cwd=m)
    # the other user, umask 022
    rec.child("user create", _create("pub/file", 0o666), **user)
    rec.child("user mkdir", lambda: os.mkdir("pub/dir", 0o777), **user)
    rec.child("user mkfifo", lambda: os.mkfifo("pub/fifo", 0o666), **user)
    rec.child("user symlink", lambda: os.symlink("file", "pub/sym"), **user)
    rec.child("user link own lower", lambda: os.link("pub/own", "pub/own.link"), **user)
    rec.child("user link new", lambda: os.link("pub/file", "pub/file.link"), **user)
    rec.child("user mknod chr", lambda: os.mknod("pub/chr", stat.S_IFCHR | 0o600, os.makedev(1, 3)), **user)
    rec.child("user chown away", lambda: os.chown("pub/file", 0, 0), **user)
    rec.child("user unlink root file in sticky dir", lambda: os.unlink("pub/lower_root_file"), **user)
    rec.child("user create umask 077", _create("pub/private", 0o666), **dict(user, umask=0o077))
    rec.child("user create sgid mode in sg", _create("sg/ufile", 0o2777), **user)
    rec.child("user mkdir in sg", lambda: os.mkdir("sg/udir", 0o777), **user)
    rec.child("user mkfifo in sg", lambda: os.mkfifo("sg/ufifo", 0o644), **user)
    # root with various umasks
    root = dict(cwd=m)
    rec.child("umask 027 create", _create("um/f", 0o666), umask=0o027, **root)
    rec.child("umask 027 mkdir", lambda: os.mkdir("um/d", 0o777), umask=0o027, **root)
    rec.child("umask 027 mkfifo", lambda: os.mkfifo("um/p", 0o666), umask=0o027, **root)
    rec.child(
        "umask 027 mknod chr", lambda: os.mknod("um/n", stat.S_IFCHR | 0o666, os.makedev(1, 3)), umask=0o027, **root
    )
    rec.child("umask 0 create 7777", _create("um/all", 0o7777), umask=0, **root)
    rec.child("umask 0 mkdir 7777", lambda: os.mkdir("um/alld", 0o7777), umask=0, **root)
    rec.child("umask 0 symlink", lambda: os.symlink("nowhere", "um/s"), umask=0, **root)
    # setgid dir inheritance, as root
    rec.child("sg mkdir", lambda: os.mkdir("sg/sub", 0o755), umask=0o022, **root)
    rec.child("sg create", _create("sg/file", 0o644), umask=0o022, **root)
    rec.child("sg mkfifo", lambda: os.mkfifo("sg/fifo", 0o644), umask=0o022, **root)
    rec.child("sg symlink", lambda: os.symlink("x", "sg/sym"), umask=0o022, **root)
    rec.child("sg nested mkdir", lambda: os.mkdir("sg/sub/nested", 0o700), umask=0o022, **root)
    rec.child("sg nested create", _create("sg/sub/nested/f", 0o600), umask=0o022, **root)
    # root in a dir owned by someone else (no setgid): root:root
    rec.child("root create in foreign dir", _create("rootdir/f", 0o644), umask=0o022, **root)
    # what everything looks like afterwards
    for p in (
        "pub/file",
        "pub/dir",
        "pub/fifo",
        "pub/sym",
        "pub/own",
        "pub/own.link",
        "pub/file.link",
        "pub/private",
        "sg/ufile",
        "sg/udir",
        "sg/ufifo",
        "um/f",
        "um/d",
        "um/p",
        "um/n",
        "um/all",
        "um/alld",
        "um/s",
        "sg/sub",
        "sg/file",
        "sg/fifo",
        "sg/sym",
        "sg/sub/nested",
        "sg/sub/nested/f",
        "rootdir/f",
    ):
        rec.do(f"lstat {p}", os.lstat, m / p)
    rec.do(
        "same ino pub/own pub/own.link", lambda: os.lstat(m / "pub/own").st_ino == os.lstat(m / "pub/own.link").st_ino
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("create"), _layers(), _ops)


def _k(run, p):
    return run.k.results[f"lstat {p}"]


USER_OPS = {
    "create": ["pub/file"],
    "mkdir": ["pub/dir"],
    "mkfifo": ["pub/fifo"],
    "symlink": ["pub/sym"],
    "link own lower": ["pub/own", "pub/own.link"],
    "link new": ["pub/file.link"],
}


@pytest.mark.parametrize("op", list(USER_OPS))
def test_new_object_belongs_to_caller(run, op):
    """An object created by uid/gid 1000 is owned by 1000:1000 (umask 022)."""
    for p in USER_OPS[op]:
        assert (_k(run, p)["uid"], _k(run, p)["gid"]) == (USER, USER), p
    labels = [f"user {op}"] + [f"lstat {p}" for p in USER_OPS[op]]
    run.assert_results(*labels)
    run.assert_view(*USER_OPS[op])
    run.assert_upper(*USER_OPS[op])


def test_user_denied_ops(run):
    """mknod of a device and chown away are EPERM for the user; unlinking
    root's lower file in a sticky dir is EPERM too (no whiteout made)."""
    k = run.k.results
    assert k["user mknod chr"] == "ERR:EPERM" and k["user chown away"] == "ERR:EPERM"
    assert k["user unlink root file in sticky dir"] == "ERR:EPERM"
    assert run.kupper("pub/lower_root_file") is None
    run.assert_results("user mknod chr", "user chown away", "user unlink root file in sticky dir")
    run.assert_view("pub/chr", "pub/lower_root_file")
    run.assert_upper("pub/chr", "pub/lower_root_file")


def test_umask_respected(run):
    """umask 027/077/0 shape the modes of new files, dirs, fifos, devices."""
    assert _k(run, "um/f")["mode"] == oct(0o640) and _k(run, "um/d")["mode"] == oct(0o750)
    assert _k(run, "um/all")["mode"] == oct(0o7777)
    assert _k(run, "pub/private")["mode"] == oct(0o600)
    labels = [lb for lb in run.k.results if "umask" in lb or lb.startswith("lstat um/") or lb == "lstat pub/private"]
    run.assert_results(*labels)
    run.assert_view("um", "pub/private")
    run.assert_upper("um", "pub/private")


def test_setgid_dir_inheritance(run):
    """In a setgid dir (gid 5678): new objects get gid 5678, new subdirs also
    S_ISGID (recursively); a non-member's S_ISGID file mode is dropped."""
    assert _k(run, "sg/sub")["gid"] == 5678 and _k(run, "sg/sub")["mode"] == oct(0o2755)
    assert _k(run, "sg/sub/nested")["mode"] == oct(0o2700)
    assert _k(run, "sg/sub/nested/f")["gid"] == 5678
    assert _k(run, "sg/udir")["gid"] == 5678 and _k(run, "sg/udir")["uid"] == USER
    assert _k(run, "sg/ufile")["mode"] == oct(0o755)
    labels = [lb for lb in run.k.results if lb.startswith(("sg ", "lstat sg/")) or "in sg" in lb]
    run.assert_results(*labels)
    run.assert_view("sg")
    run.assert_upper("sg")


def test_root_creates_in_foreign_dir(run):
    assert (_k(run, "rootdir/f")["uid"], _k(run, "rootdir/f")["gid"]) == (0, 0)
    run.assert_results("root create in foreign dir", "lstat rootdir/f")
    run.assert_upper("rootdir")


def test_whole_tree_and_workdir(run):
    run.assert_all()
