"""Hard links of an object copied up without an origin record, compared with the kernel
overlay (issue 17 item 4, docs/semantics.md "Namespace changes": the userxattr hard-link
corner).

With ``-o userxattr`` a fifo or symlink cannot carry a ``user.*`` origin record, so its
copy-up reports the lower ``st_ino`` under its first name for the life of the mount, and
the names linked to it later report the upper one: the kernel has two overlay inodes for
one real inode (the second shared by all later names), and pyoverlay two FUSE nodes. The
kernel's overlay stats the real inode on every ``stat``, so a change through any name
(mode, owner, times, link count) shows under every name at once; pyoverlay drops the
kernel's cached attributes of the other node (``InodeTable.peer``).
"""

from __future__ import annotations

import os

import pytest

from helpers.stacks import FIFO, T0, F, L
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


def _layers():
    l1 = {"keep": F(b"k\n")}
    l2 = {
        "p": FIFO(mode=0o644, mtime_ns=T0),
        "sl": L("keep", mtime_ns=T0),
    }
    return [l1, l2]


def _st(m, *names):
    out = {}
    for n in names:
        st = os.lstat(m / n)
        out[n] = (oct(st.st_mode), st.st_nlink, st.st_uid, st.st_mtime_ns)
    return out


def _inos(m, *names):
    """Which names report the same st_ino (the numbers differ between the two stacks)."""
    inos = [os.lstat(m / n).st_ino for n in names]
    return [inos.index(i) for i in inos]


def _ops(m, rec):
    rec.do("rename p q", os.rename, m / "p", m / "q")  # copy-up: no origin (fifo)
    rec.do("link q r", os.link, m / "q", m / "r")
    rec.do("link r s", os.link, m / "r", m / "s")
    rec.do("stat linked", _st, m, "q", "r", "s")
    rec.do("inos linked", _inos, m, "q", "r", "s")
    rec.do("chmod s", os.chmod, m / "s", 0o600)
    rec.do("stat after chmod s", _st, m, "q", "r", "s")
    rec.do("chmod q", os.chmod, m / "q", 0o640)
    rec.do("stat after chmod q", _st, m, "q", "r", "s")
    rec.do("chown r", os.chown, m / "r", 1234, -1)
    rec.do("stat after chown r", _st, m, "q", "r", "s")
    rec.do("utime q", os.utime, m / "q", ns=(T0, T0))
    rec.do("stat after utime q", _st, m, "q", "r", "s")
    rec.do("unlink r", os.unlink, m / "r")
    rec.do("stat after unlink r", _st, m, "q", "s")
    rec.do("link s t", os.link, m / "s", m / "t")
    rec.do("stat after link s t", _st, m, "q", "s", "t")
    rec.do("mkfifo u", os.mkfifo, m / "u")
    rec.do("rename u over t", os.rename, m / "u", m / "t")
    rec.do("stat after rename over t", _st, m, "q", "s")
    rec.do("setxattr trusted on s", os.setxattr, m / "s", "trusted.k", b"v")
    rec.do("stat after setxattr", _st, m, "q", "s")

    rec.do("lchown sl", os.chown, m / "sl", 1234, -1, follow_symlinks=False)  # copy-up: no origin
    rec.do("link sl sl2", os.link, m / "sl", m / "sl2", follow_symlinks=False)
    rec.do("utime sl2", os.utime, m / "sl2", ns=(T0, T0), follow_symlinks=False)
    rec.do("stat symlinks", _st, m, "sl", "sl2")
    rec.do("unlink sl2", os.unlink, m / "sl2")
    rec.do("stat sl", _st, m, "sl")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("splitlinks"), _layers(), _ops, remount=True, options=("userxattr",))


def test_split_pair_shows_every_change_under_every_name(run):
    k = run.k.results
    assert k["inos linked"] == [0, 1, 1]  # the first name keeps the lower st_ino
    assert {v[0] for v in k["stat after chmod s"].values()} == {"0o10600"}
    assert [v[1] for v in k["stat after unlink r"].values()] == [2, 2]
    assert [v[1] for v in k["stat after rename over t"].values()] == [2, 2]
    run.assert_results()


def test_split_pair_view_and_upper(run):
    run.assert_view()
    run.assert_upper()
    run.assert_workdirs()
