"""``overlay.impure`` on upper directories, compared with the kernel overlay (issue 17:
docs/semantics.md's known differences).

The kernel marks an upper directory ``overlay.impure=y`` when an object with an origin
record may be in it: a copy-up into it, a link of such an object into it, a move of one
into it from another directory (``ovl_set_impure``). Its readdir of a pure upper directory
(whose parent is not merged) looks the entries' origins up for ``d_ino`` only when the mark
is there, so an upper written without it lists a moved copied-up file with its upper inode
while ``stat`` reports the origin's. pyoverlay writes the mark where the kernel does.
"""

from __future__ import annotations

import os
import shutil

import pytest

from helpers.stacks import D, F
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


def _layers():
    l1 = {"keep": F(b"k\n")}
    l2 = {
        "f": F(b"f\n"),
        "g": F(b"g\n"),
        "h": F(b"h\n"),
        "x": F(b"x\n"),
        "d": D(),
        "d/y": F(b"y\n"),
    }
    return [l1, l2]


def _ops(m, rec):
    rec.do("mkdir p1..p5", lambda: [os.makedirs(m / p) for p in ("p1", "p2", "p3", "p4", "p5/sub")])
    rec.do("create p1/new", lambda: (m / "p1/new").write_bytes(b""))
    rec.do("link f p1/lf", os.link, m / "f", m / "p1/lf")  # copy-up (root), link into p1
    rec.do("move pure p1/new to p2", os.rename, m / "p1/new", m / "p2/new")  # no origin: p2 stays pure
    rec.do("chmod d/y", os.chmod, m / "d/y", 0o600)  # copy-up into d
    rec.do("create p3/a", lambda: (m / "p3/a").write_bytes(b""))
    rec.do("move pure p3/a to p4", os.rename, m / "p3/a", m / "p4/a")
    rec.do("link g g2", os.link, m / "g", m / "g2")
    rec.do("move g2 to p4", os.rename, m / "g2", m / "p4/g2")  # an origin into p4
    rec.do("move h to p5/sub", os.rename, m / "h", m / "p5/sub/h")  # p5/sub: parent not merged
    rec.do("chmod x", os.chmod, m / "x", 0o600)
    rec.do("same-dir rename x", os.rename, m / "x", m / "x2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("impure"), _layers(), _ops)


def _impure_dirs(upper):
    out = []
    for root, _dirs, _files in os.walk(upper):
        try:
            if os.getxattr(root, "trusted.overlay.impure") == b"y":
                out.append(os.path.relpath(root, upper))
        except OSError:
            pass
    return sorted(out)


def test_impure_marks_as_the_kernel(run):
    k = _impure_dirs(run.k.side.upper)
    assert k == [".", "d", "p1", "p4", "p5/sub"]
    assert _impure_dirs(run.s.side.upper) == k
    run.assert_results()
    run.assert_view()
    run.assert_upper()


def test_kernel_lists_the_written_upper_as_it_stats_it(run):
    """A kernel mount of pyoverlay's upper: readdir d_ino equals st_ino in the pure upper
    directory p5/sub (no fix-up of stale kernel d_ino here)."""
    side = run.s.side
    wd = side.fresh_workdir()
    try:
        with side.mount("kernel", workdir=wd) as m:
            sub = m.path / "p5/sub"
            listed = {e.name: e.inode() for e in os.scandir(sub)}
            stated = {n: os.lstat(sub / n).st_ino for n in listed}
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    assert listed == stated
