"""Trees of any depth and names at the length limit, compared with the kernel overlay.

A directory whose path from the layer root is longer than PATH_MAX (4096 bytes) used
to fail: pyoverlay reached every directory with one ``openat2`` from the layer root
(issue 17, item 1; pjdfstest ``mkdir/03.t`` and ``rmdir/03.t``). The kernel builds,
lists, renames and removes such trees when a process walks into them with relative
paths (as pjdfstest does: ``chdir`` one level at a time), so every test here does the
same on a kernel overlay and on pyoverlay (both engines) over identical layers and
compares each result, the merged view, the upper the kernel sees after a remount and
the workdir: trees made through the mount, lower layers that already hold deep trees
(copy-up of a deep file and of a deep directory chain, whiteouts and opaque dirs deep
down), removal of everything bottom-up, names of NAME_MAX (255) bytes and of 256
(ENAMETOOLONG), and ``pyoverlay diff`` / ``explain`` on the deep uppers both wrote.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import mounts
from helpers.snapshot import diff_snapshots, format_diff
from helpers.stacks import OPQ, T0, T1, WH, D, F
from helpers.writeops import run_pair
from overlayfs_py import _sys
from overlayfs_py.explain import explain

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

ENGINES = ("direct", "pyfuse3")
REPO = Path(__file__).resolve().parent.parent

NAME_MAX = 255
PATH_MAX = 4096  # with the NUL
LONG = 200  # bytes per level of the deep trees
DEPTH = 32  # levels: 32 * 201 bytes, well past PATH_MAX


def level(i: int, c: str = "d") -> str:
    """The name of level *i* of a deep chain: LONG bytes, distinct per level."""
    tag = f"{c}{i:03d}"
    return tag + c * (LONG - len(tag))


def chain(depth: int, c: str = "d") -> str:
    return "/".join(level(i, c) for i in range(depth))


def assert_kernel_reads_subject_upper(run) -> None:
    """The kernel, mounting the upper pyoverlay wrote (fresh workdir), shows what it shows
    over the upper it wrote itself (both after the run)."""
    side = run.s.side
    with side.mount("kernel", workdir=side.fresh_workdir()) as m:
        got = side.view(m)
    d = diff_snapshots(run.k.remount_view, got, a_name="kernel-upper", b_name="kernel-over-pyoverlay-upper")
    assert not d, format_diff(d, "the kernel reads pyoverlay's upper differently:")


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    monkeypatch.setenv(mounts.ENGINE_ENV, request.param)
    return request.param


class Steps:
    """Run in a forked child: each step's result (``norm``-ed later) or ``ERR:<ERRNO>``."""

    def __init__(self) -> None:
        self.out: dict[str, object] = {}

    def __call__(self, label: str, fn, *args):
        assert label not in self.out, label
        try:
            v = fn(*args)
        except OSError as e:
            v = "ERR:" + errno.errorcode.get(e.errno, str(e.errno))
        if isinstance(v, os.stat_result):
            v = _stat(v)
        self.out[label] = v
        return v


def _stat(st: os.stat_result) -> dict:
    d = {"mode": oct(st.st_mode), "nlink": st.st_nlink, "uid": st.st_uid}
    if not stat.S_ISDIR(st.st_mode):
        d["size"] = st.st_size
    return d


def _write(name: str, data: bytes, flags: int = os.O_CREAT | os.O_EXCL) -> int:
    fd = os.open(name, os.O_WRONLY | flags, 0o640)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def _read(name: str) -> bytes:
    with open(name, "rb") as f:
        return f.read()


def _ls(name: str = ".") -> list[str]:
    return sorted(os.listdir(name))


def _down(names) -> None:
    for n in names:
        os.chdir(n)


def _rm_below(st: Steps, tag: str) -> None:
    """Remove everything in the cwd, depth first, with relative paths only."""
    for n in _ls():
        short = n[:4] if len(n) == LONG else n
        if stat.S_ISDIR(os.lstat(n).st_mode):
            os.chdir(n)
            _rm_below(st, f"{tag}/{short}")
            os.chdir("..")
            st(f"rmdir {tag}/{short}", os.rmdir, n)
        else:
            st(f"unlink {tag}/{short}", os.unlink, n)


def _name_limits(st: Steps, tag: str) -> None:
    """Names of NAME_MAX bytes work, one byte more is ENAMETOOLONG, for every call."""
    n255, n256 = "n" * NAME_MAX, "n" * (NAME_MAX + 1)
    st(f"{tag} create 255", _write, n255, b"255\n")
    st(f"{tag} lstat 255", os.lstat, n255)
    st(f"{tag} read 255", _read, n255)
    st(f"{tag} create 256", _write, n256, b"x")
    st(f"{tag} lstat 256", os.lstat, n256)
    st(f"{tag} mkdir 256", os.mkdir, n256)
    st(f"{tag} symlink 256", os.symlink, "t", n256)
    st(f"{tag} mknod 256", os.mkfifo, n256)
    st(f"{tag} link to 256", os.link, n255, n256)
    st(f"{tag} rename to 256", os.rename, n255, n256)
    st(f"{tag} rename 255 to m255", os.rename, n255, "m" * NAME_MAX)
    st(f"{tag} mkdir 255", os.mkdir, "d" * NAME_MAX)
    st(f"{tag} symlink 255", os.symlink, "m" * NAME_MAX, "s" * NAME_MAX)
    st(f"{tag} readlink 255", os.readlink, "s" * NAME_MAX)
    st(f"{tag} ls", _ls)


# --------------------------------------------------------------------------
# a tree made through the mount, from a cwd deep inside it
# --------------------------------------------------------------------------


def _build_through_mount() -> dict:
    st = Steps()
    for i in range(DEPTH):
        st(f"mkdir {i}", os.mkdir, level(i), 0o755)
        st(f"chdir {i}", os.chdir, level(i))
        st(f"create {i}", _write, "f", b"level %d\n" % i)
    # the bottom: listing, stat, a subdirectory, renames within and across levels
    st("ls bottom", _ls)
    st("lstat f", os.lstat, "f")
    st("lstat ..", os.lstat, "..")
    st("mkdir sub", os.mkdir, "sub", 0o700)
    st("create sub/x", _write, "sub/x", b"x\n")
    st("symlink s", os.symlink, "f", "s")
    st("readlink s", os.readlink, "s")
    st("rename f -> g", os.rename, "f", "g")
    st("rename g -> ../../../moved", os.rename, "g", "../../../moved")
    st("rename sub -> ../sub2", os.rename, "sub", "../sub2")
    st("ls ..", _ls, "..")
    st("read ../sub2/x", _read, "../sub2/x")
    _name_limits(st, "deep")
    # rm -r (fts, *at calls) of a deep subtree made below the bottom
    os.mkdir("rmme")
    os.chdir("rmme")
    for i in range(20):
        os.mkdir(level(i, "r"))
        os.chdir(level(i, "r"))
        _write("f", b"f")
    os.chdir("/".join([".."] * 21))
    st("rm -r rmme", lambda: subprocess.run(["rm", "-r", "rmme"], capture_output=True).returncode)
    st("lstat rmme", os.lstat, "rmme")
    # a sibling chain of short names, deeper than PATH_MAX by many more levels
    short = [f"{i % 100:02d}" for i in range(1400)]  # 1400 * 3 bytes
    for n in short:
        os.mkdir(n)
        os.chdir(n)
    st("create bottom of short chain", _write, "z", b"z\n")
    st("ls short bottom", _ls)
    os.chdir("/".join([".."] * 200))
    st("ls 200 levels up", _ls)
    # back to the top of the deep chain: list every level on the way up
    for _ in range(1200):
        os.chdir("..")
    for i in reversed(range(DEPTH)):
        st(f"ls level {i}", _ls)
        os.chdir("..")
    return st.out


def _rename_high_then_deep() -> dict:
    """A rename near the top drops every cached fd below it; the deep cwd still works."""
    st = Steps()
    _down(level(i) for i in range(DEPTH - 2))
    up = "../" * (DEPTH - 3)  # from inside level DEPTH-3 to level 0
    st("rename level 1 (from below)", os.rename, up + level(1), up + "L1")
    st("ls after rename", _ls)
    st("create after rename", _write, "after", b"after\n")
    st("read after rename", _read, "after")
    st("lstat deeper", os.lstat, level(DEPTH - 2) + "/" + level(DEPTH - 1))
    return st.out


def _remove_bottom_up() -> dict:
    st = Steps()
    os.chdir(level(0))
    _rm_below(st, "top")
    return st.out


def test_tree_built_through_the_mount(engine, tmp_path):
    """Build a tree far deeper than PATH_MAX through the mount with relative paths, use it
    at the bottom, rename near the top, then remove most of it bottom-up: each result, the
    view, the upper (and the view after a remount) as the kernel's."""

    def ops(m: Path, rec) -> None:
        rec.child("build", _build_through_mount, cwd=m, timeout=300)

    run = run_pair(tmp_path, [{"top": F(b"top\n")}], ops, remount=True)
    run.assert_results()
    built = run.k.results["build"]
    assert isinstance(built, dict) and not [k for k, v in built.items() if v == "ERR:ENAMETOOLONG" and "256" not in k]
    assert built["deep create 256"] == "ERR:ENAMETOOLONG" and built["deep create 255"] == 4
    assert built["rm -r rmme"] == 0 and built["lstat rmme"] == "ERR:ENOENT"
    run.assert_view()
    run.assert_upper()
    run.assert_workdirs()
    run.assert_remount_stable()
    assert_kernel_reads_subject_upper(run)


def test_rename_near_the_top_and_removal_bottom_up(engine, tmp_path):
    def ops(m: Path, rec) -> None:
        rec.child("build", _build_chain, cwd=m, timeout=300)
        rec.child("rename high", _rename_high_then_deep, cwd=m, timeout=300)
        rec.child("ls top", _ls, cwd=m / level(0))
        rec.child("remove", _remove_bottom_up, cwd=m, timeout=300)
        rec.child("rmdir top", lambda: os.rmdir(level(0)), cwd=m)

    run = run_pair(tmp_path, [{"top": F(b"top\n")}], ops, remount=True)
    run.assert_results()
    assert run.k.results["ls top"] == ["L1", "f"], run.k.results["ls top"]
    assert run.k.results["rmdir top"] == "OK"
    run.assert_view()
    run.assert_upper()
    run.assert_workdirs()
    run.assert_remount_stable()
    assert_kernel_reads_subject_upper(run)


def _build_chain() -> dict:
    st = Steps()
    for i in range(DEPTH):
        st(f"mkdir {i}", os.mkdir, level(i))
        os.chdir(level(i))
        st(f"create {i}", _write, "f", b"%d\n" % i)
    return st.out


# --------------------------------------------------------------------------
# lower layers that already hold deep trees
# --------------------------------------------------------------------------

DEEP = chain(DEPTH)  # merged at every level (both lowers)
SIDE = chain(DEPTH, "s")  # in the bottom lower only
HALF = chain(DEPTH // 2)


def _lower_layers():
    l1 = {
        DEEP + "/top": F(b"in l1\n", mtime_ns=T1),
        DEEP + "/both": F(b"l1 hides l2\n", mtime_ns=T1),
        DEEP + "/wh": WH(),  # hides l2's
        DEEP + "/opq": OPQ(mtime_ns=T0),  # hides l2's opq/*
        DEEP + "/opq/mine": F(b"mine\n"),
        HALF + "/half": F(b"half, in l1\n", mtime_ns=T0),
    }
    l2 = {
        DEEP + "/bottom": F(b"in l2\n", mode=0o640, uid=1234, gid=5678, mtime_ns=T0, xattrs={"user.k": b"v"}),
        DEEP + "/both": F(b"hidden\n"),
        DEEP + "/xa": F(b"gets an xattr\n", mtime_ns=T0),
        DEEP + "/lk": F(b"gets a hard link\n", mtime_ns=T0),
        DEEP + "/wh": F(b"hidden by a whiteout\n"),
        DEEP + "/opq/theirs": F(b"hidden by opaque\n"),
        DEEP + "/ldir": D(mode=0o750, uid=1234, mtime_ns=T0),  # lower-only, empty
        DEEP + "/ldir2/x": F(b"x\n"),
        SIDE + "/leaf": F(b"side leaf\n", mtime_ns=T0),
        SIDE + "/gone": F(b"to be removed\n"),
    }
    return [l1, l2]


def _deep_lower_ops() -> dict:
    """In the merged deep tree of the lowers: read, copy up, whiteout, opaque, rename."""
    st = Steps()
    _down(DEEP.split("/"))
    st("ls", _ls)
    st("read bottom", _read, "bottom")
    st("read both", _read, "both")
    st("lstat wh", os.lstat, "wh")
    st("ls opq", _ls, "opq")
    st("lstat bottom", os.lstat, "bottom")
    st("append bottom (copy-up)", _write, "bottom", b"more\n", os.O_APPEND)
    st("read bottom again", _read, "bottom")
    st("getxattr bottom", os.getxattr, "bottom", "user.k")
    st("setxattr xa (copy-up)", os.setxattr, "xa", "user.n", b"1")
    st("getxattr xa", os.getxattr, "xa", "user.n")
    st("link lk -> lk2 (copy-up)", os.link, "lk", "lk2")
    st("lstat lk2", os.lstat, "lk2")
    st("unlink both (whiteout)", os.unlink, "both")
    st("rmdir ldir (whiteout)", os.rmdir, "ldir")
    st("rmdir ldir2 (not empty)", os.rmdir, "ldir2")
    st("unlink ldir2/x", os.unlink, "ldir2/x")
    st("rmdir ldir2", os.rmdir, "ldir2")
    st("mkdir ldir (opaque)", os.mkdir, "ldir", 0o700)
    st("ls ldir", _ls, "ldir")
    st("create new", _write, "new", b"new\n")
    st("rename top -> top2", os.rename, "top", "top2")
    st("rename opq -> opq2", os.rename, "opq", "opq2")
    st("ls at the end", _ls)
    os.chdir("/".join([".."] * (DEPTH // 2)))
    st("ls half", _ls)
    st("unlink half", os.unlink, "half")
    return st.out


def _side_chain_ops() -> dict:
    """A deep lower-only directory chain: a chmod at the bottom copies all of it up."""
    st = Steps()
    _down(SIDE.split("/"))
    st("chmod . (copy-up of the chain)", os.chmod, ".", 0o711)
    st("lstat .", os.lstat, ".")
    st("lstat leaf", os.lstat, "leaf")
    st("unlink gone", os.unlink, "gone")
    st("ls", _ls)
    return st.out


def _lower_remove_all() -> dict:
    st = Steps()
    for top in (level(0), level(0, "s")):
        os.chdir(top)
        _rm_below(st, top[:4])
        os.chdir("..")
        st(f"rmdir {top[:4]}", os.rmdir, top)
    st("ls root", _ls)
    return st.out


def _diff_cli(upper: Path, lowers: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", "diff", "--json", "--lower", ":".join(map(str, lowers)), str(upper)],
        cwd=REPO,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _explain_cli(mnt: Path, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", "explain", "--json", str(mnt), path],
        cwd=REPO,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_deep_lower_trees(engine, tmp_path, monkeypatch):
    """Lowers holding trees deeper than PATH_MAX: listing, whiteouts and opaque dirs deep
    down, copy-up of a deep file and of a deep directory chain, renames; then ``pyoverlay
    diff`` and ``explain`` on both uppers agree and do not fail."""
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path / "state"))

    def ops(m: Path, rec) -> None:
        rec.child("deep", _deep_lower_ops, cwd=m, timeout=300)
        rec.child("side", _side_chain_ops, cwd=m, timeout=300)

    def after(m: Path, sr) -> None:
        if sr.impl == "subject":  # pyoverlay explain of the live mount
            sr.extra["explain"] = {p: _explain_cli(m, "/" + DEEP + p) for p in ("/both", "/bottom")}

    run = run_pair(tmp_path, _lower_layers(), ops, remount=True, after=after)
    run.assert_results()
    deep = run.k.results["deep"]
    assert deep["lstat wh"] == "ERR:ENOENT" and deep["ls opq"] == ["mine"] and deep["ls ldir"] == []
    assert deep["read bottom again"] == b"in l2\nmore\n"
    assert deep["getxattr xa"] == b"1" and deep["link lk -> lk2 (copy-up)"] == "OK"
    assert deep["rmdir ldir2"] == "OK" and deep["lstat lk2"]["nlink"] == 2
    run.assert_view()
    run.assert_upper()
    run.assert_workdirs()
    run.assert_remount_stable()
    assert_kernel_reads_subject_upper(run)

    # pyoverlay diff on the upper each side wrote: the same changes, none lost to depth
    got = {}
    for side in (run.k.side, run.s.side):
        r = _diff_cli(side.upper, side.lowers)
        assert r.returncode == 0, r.stderr
        got[side.root.name] = json.loads(r.stdout)
    assert got["kernel"] == got["subject"]
    changes = {(c["kind"], c["path"]) for c in got["subject"]}
    for want in [("D", "/" + DEEP + "/both"), ("C", "/" + DEEP + "/bottom"), ("A", "/" + DEEP + "/new")]:
        assert want in changes, want
    assert ("D", "/" + SIDE + "/gone") in changes and ("C", "/" + SIDE) in changes

    for p, r in run.s.extra["explain"].items():
        assert r.returncode == 0 and r.stderr == "", (p, r.stderr)
    assert json.loads(run.s.extra["explain"]["/both"].stdout)["missing"]["how"] == "whiteout"
    assert json.loads(run.s.extra["explain"]["/bottom"].stdout)["copied_up"] is True

    # explain a deep whiteout and a deep copied-up file in the subject's upper
    s = run.s.side
    ex = explain(str(s.upper), [str(p) for p in s.lowers], "/" + DEEP + "/both")
    assert not ex.exists and ex.missing["how"] == "whiteout" and ex.missing["layer"] == "upper"
    ex = explain(str(s.upper), [str(p) for p in s.lowers], "/" + DEEP + "/bottom")
    assert ex.exists and ex.served.label == "upper" and ex.copied_up


def test_deep_lower_trees_removed_bottom_up(engine, tmp_path):
    def ops(m: Path, rec) -> None:
        rec.child("remove", _lower_remove_all, cwd=m, timeout=300)

    run = run_pair(tmp_path, _lower_layers(), ops, remount=True)
    run.assert_results()
    assert run.k.results["remove"]["ls root"] == []
    run.assert_view()
    run.assert_upper()
    run.assert_workdirs()
    run.assert_remount_stable()
    assert_kernel_reads_subject_upper(run)


# --------------------------------------------------------------------------
# pjdfstest's PATH_MAX cases (mkdir/03.t, rmdir/03.t, ...), from a test dir
# --------------------------------------------------------------------------


def dirgen_max(complen: int = NAME_MAX // 2) -> str:
    """pjdfstest's ``dirgen_max``: a relative path of PATH_MAX - 1 bytes made of
    components of *complen* bytes (the last one cut short)."""
    comps, total, i = [], 0, 0
    while total < PATH_MAX - 1:
        c = (f"c{i:04d}" * complen)[:complen]
        comps.append(c)
        total += complen + 1
        i += 1
    name = "/".join(comps)[: PATH_MAX - 1]
    return name[:-1] + "x" if name.endswith("/") else name


def _path_max_calls() -> dict:
    """Whole paths of PATH_MAX - 1 bytes given to each call (from a directory inside the
    mount, so the path in the layer is longer still), and of PATH_MAX (ENAMETOOLONG)."""
    st = Steps()
    os.mkdir("fstest_dir")
    os.chdir("fstest_dir")
    nx = dirgen_max()
    nxx = nx + "x"
    assert len(nx) == PATH_MAX - 1
    parent = nx.rpartition("/")[0]
    done = ""
    for comp in parent.split("/"):
        done = f"{done}/{comp}" if done else comp
        os.mkdir(done)
    st("mkdir nx", os.mkdir, nx, 0o755)  # mkdir/03.t
    st("stat nx", os.lstat, nx)
    st("rmdir nx", os.rmdir, nx)  # rmdir/03.t
    st("rmdir nx again", os.rmdir, nx)
    st("mkdir nxx", os.mkdir, nxx, 0o755)
    st("rmdir nxx", os.rmdir, nxx)
    st("create nx", _write, nx, b"x")  # open/03.t
    st("create nxx", _write, nxx, b"x")
    st("chmod nx", os.chmod, nx, 0o600)  # chmod/03.t
    st("chown nx", os.chown, nx, 65534, 65533)  # chown/03.t
    st("truncate nx", os.truncate, nx, 123)  # truncate/03.t
    st("stat nx file", os.lstat, nx)
    st("link nx -> short", os.link, nx, "lnk")  # link/03.t
    st("link short -> nxx", os.link, "lnk", nxx)
    st("rename nx -> short", os.rename, nx, "ren")  # rename/02.t
    st("rename short -> nx", os.rename, "ren", nx)
    st("rename short -> nxx", os.rename, "lnk", nxx)
    st("unlink nx", os.unlink, nx)  # unlink/03.t
    st("unlink nxx", os.unlink, nxx)
    st("symlink nx", os.symlink, "target", nx)  # symlink/03.t
    st("readlink nx", os.readlink, nx)
    st("unlink symlink nx", os.unlink, nx)
    st("mkfifo nx", os.mkfifo, nx)  # mkfifo/03.t
    st("unlink fifo nx", os.unlink, nx)
    os.chdir("..")
    _rm_below(st, "all")
    return st.out


def test_pjdfstest_path_max_cases(engine, tmp_path):
    def ops(m: Path, rec) -> None:
        rec.child("calls", _path_max_calls, cwd=m, timeout=300)

    run = run_pair(tmp_path, [{"x": F(b"x\n")}], ops, remount=True)
    run.assert_results()
    calls = run.k.results["calls"]
    assert calls["mkdir nx"] == calls["rmdir nx"] == "OK" and calls["mkdir nxx"] == "ERR:ENAMETOOLONG"
    assert calls["stat nx"]["mode"] == "0o40755" and calls["rmdir nx again"] == "ERR:ENOENT"
    run.assert_view()
    run.assert_upper()
    run.assert_workdirs()
    run.assert_remount_stable()
    assert_kernel_reads_subject_upper(run)


# --------------------------------------------------------------------------
# name limits at the top, and the piecewise walk itself
# --------------------------------------------------------------------------


def test_name_max_at_the_top(engine, tmp_path):
    def ops(m: Path, rec) -> None:
        def steps():
            st = Steps()
            _name_limits(st, "top")
            return st.out

        rec.child("names", steps, cwd=m)

    run = run_pair(tmp_path, [{"x": F(b"x\n")}], ops)
    run.assert_results()
    assert run.k.results["names"]["top lstat 256"] == "ERR:ENAMETOOLONG"
    run.assert_view()
    run.assert_upper()


@pytest.mark.parametrize("width", [1, 7, 200, 255])
def test_openat2_walks_a_long_path_in_pieces(tmp_path, width):
    """``_sys.openat2`` opens any depth, piece by piece, and keeps its rules on the way: a
    symlink anywhere is ELOOP, a file in the middle ENOTDIR, a missing name ENOENT."""
    depth = 9000 // (width + 1) + 2
    names = [(b"%d" % i).ljust(width, b"p")[:width] if width > 3 else b"p" * width for i in range(depth)]
    root = os.open(tmp_path, _sys.DIR_FLAGS)
    try:
        fd = os.dup(root)
        for n in names:
            try:
                os.mkdir(n, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(n, _sys.DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open(b"leaf", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
        os.symlink(b".", b"sym", dir_fd=fd)
        bottom = os.fstat(fd)
        os.symlink(b".", b"sym", dir_fd=root)
        os.close(fd)
        path = b"/".join(names)
        assert len(path) >= 2 * _sys.PATH_MAX
        for piece in _sys.path_pieces(path):
            assert len(piece) < _sys.PATH_MAX and not piece.startswith(b"/") and not piece.endswith(b"/")
        assert b"/".join(_sys.path_pieces(path)) == path
        got = _sys.open_dir(root, path)
        try:
            st = os.fstat(got)
            assert (st.st_dev, st.st_ino) == (bottom.st_dev, bottom.st_ino)
        finally:
            os.close(got)
        f = _sys.open_beneath(root, path + b"/leaf", os.O_RDONLY)
        os.close(f)
        for tail, err in [(b"/sym/leaf", errno.ELOOP), (b"/leaf/x", errno.ENOTDIR), (b"/nope/x", errno.ENOENT)]:
            with pytest.raises(OSError) as exc:
                _sys.open_beneath(root, path + tail, os.O_RDONLY)
            assert exc.value.errno == err, tail
        with pytest.raises(OSError) as short:  # the answer of one walk: the same at any depth
            _sys.open_dir(root, b"sym")
        with pytest.raises(OSError) as exc:
            _sys.open_dir(root, path + b"/sym")
        assert exc.value.errno == short.value.errno
        # a symlink high up: a walk through it fails beneath the same rules
        with pytest.raises(OSError) as exc:
            _sys.open_dir(root, b"sym/" + path)
        assert exc.value.errno == errno.ELOOP
    finally:
        os.close(root)


def test_explain_and_diff_never_fail_on_depth_in_process(tmp_path):
    """diff and explain on a deep upper built on the host (no mount)."""
    from helpers.stacks import build_layer
    from overlayfs_py.diff import diff

    build_layer(tmp_path / "l1", {DEEP + "/f": F(b"f\n"), DEEP + "/gone": F(b"g\n")})
    build_layer(tmp_path / "up", {DEEP + "/new": F(b"n\n"), DEEP + "/gone": WH(), DEEP + "/f": F(b"changed\n")})
    changes = {(c.kind, c.path) for c in diff(str(tmp_path / "up"), [str(tmp_path / "l1")])}
    assert {("A", "/" + DEEP + "/new"), ("D", "/" + DEEP + "/gone"), ("C", "/" + DEEP + "/f")} <= changes
    ex = explain(str(tmp_path / "up"), [str(tmp_path / "l1")], "/" + DEEP + "/gone")
    assert not ex.exists and ex.missing["how"] == "whiteout"
    ex = explain(str(tmp_path / "up"), [str(tmp_path / "l1")], "/" + DEEP + "/f")
    assert ex.exists and ex.served.label == "upper"


def test_dir_fd_cache_at_any_depth(tmp_path):
    """``LayerStack.dir_fd`` reaches every level of a deep layer: walking down (the parent's
    fd cached), jumping straight to the bottom (nothing cached: in pieces), after the cache
    forgot an ancestor, and with a cache too small to keep the parents."""
    from helpers.stacks import build_layer
    from helpers.writeops import open_rel
    from overlayfs_py.layers import DirFdCache, LayerStack
    from overlayfs_py.whiteout import XattrNames

    build_layer(tmp_path / "l", {DEEP + "/f": F(b"f\n")})
    comps = DEEP.encode().split(b"/")
    paths = [b"/".join(comps[: i + 1]) for i in range(len(comps))]
    want = {}
    for p in paths:
        fd = open_rel(tmp_path / "l", os.fsdecode(p), os.O_PATH | os.O_DIRECTORY)
        want[p] = os.fstat(fd).st_ino
        os.close(fd)

    def check(stack, order):
        layer = stack.layers[0]
        for p in order:
            assert os.fstat(stack.dir_fd(layer, p)).st_ino == want[p], len(p)
            assert stack.lstat(layer, p + b"/f" if p == paths[-1] else p).st_ino > 0

    stack = LayerStack([str(tmp_path / "l")], None, XattrNames())
    try:
        check(stack, paths)  # downwards: each long one from its parent's fd
        stack.dirfds.forget(stack.layers[0], paths[3])  # drops everything below level 3
        check(stack, [paths[-1], paths[-2], paths[10]])  # nothing cached above: in pieces
        stack.dirfds.close()
        stack.dirfds = DirFdCache(capacity=2)  # parents evicted all the time
        check(stack, paths + paths[::-1])
    finally:
        stack.close()


def test_deep_leftover_in_work_is_removed_at_mount(tmp_path):
    """A leftover tree in work/ deeper than Python's recursion limit and than PATH_MAX (a
    symlink and a FIFO at the bottom) is removed at mount, nothing followed: the mount used
    to fail with "maximum recursion depth exceeded". (The kernel removes at most two levels
    of work/ leftovers; with more it cannot clean work/ and mounts read-only: pyoverlay has
    always removed every leftover, and now does at any depth.)"""
    lower, upper, work, mnt = (tmp_path / n for n in ("l1", "upper", "work", "mnt"))
    for d in (lower, upper, work / "work"):
        d.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep\n")
    fd = os.open(work / "work", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(2500):
            os.mkdir(b"x" if i % 2 else b"yy", dir_fd=fd)
            nfd = os.open(b"x" if i % 2 else b"yy", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if i % 100 == 0:
                os.close(os.open(b"f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=nfd))
            os.close(fd)
            fd = nfd
        os.symlink(os.fspath(outside), b"link", dir_fd=fd)
        os.mkfifo(b"fifo", dir_fd=fd)
    finally:
        os.close(fd)
    with mounts.PyoverlayMount([lower], mnt, upper=upper, workdir=work, log_path=tmp_path / "log") as m:
        assert os.listdir(work / "work") == [], m.log_tail()
        (mnt / "new").write_bytes(b"new\n")
    assert (outside / "keep").read_bytes() == b"keep\n" and (upper / "new").read_bytes() == b"new\n"


SHORT_DEPTH = 2000  # one-byte names: past PATH_MAX and past Python's default recursion limit
SHORT = "/".join(["s"] * SHORT_DEPTH)
SHORT_MID = "/".join(["s"] * (SHORT_DEPTH // 2))


def _short_chain_ops() -> dict:
    """Copy-up of a 2,000-level lower chain from its bottom, then removal bottom-up."""
    st = Steps()
    _down(["s"] * SHORT_DEPTH)
    st("append f (copy-up of the chain)", _write, "f", b"more\n", os.O_APPEND)
    st("chmod .", os.chmod, ".", 0o700)
    st("unlink g", os.unlink, "g")
    st("mkdir new", os.mkdir, "new")
    st("ls bottom", _ls)
    st("rename f -> ../../f2", os.rename, "f", "../../f2")
    st("rmdir new", os.rmdir, "new")
    for i in range(SHORT_DEPTH):
        os.chdir("..")
        for n in _ls():
            if n != "s":
                st(f"unlink {i} {n}", os.unlink, n)
        st(f"rmdir {i}", os.rmdir, "s")
    st("ls top", _ls)
    return st.out


def test_lower_chain_deeper_than_the_recursion_limit(engine, tmp_path):
    """A lower-only chain of 2,000 one-byte levels (merged with the top lower for the first
    1,000): copy-up of the whole chain from the bottom (it used to fail EIO with the pyfuse3
    engine: the ancestors were copied up by recursion), then removal level by level."""

    def ops(m: Path, rec) -> None:
        rec.child("chain", _short_chain_ops, cwd=m, timeout=600)

    layers = [
        {SHORT_MID + "/mid": F(b"mid\n", mtime_ns=T0)},
        {SHORT + "/f": F(b"f\n", mtime_ns=T0), SHORT + "/g": F(b"g\n", mtime_ns=T0), "top": F(b"top\n")},
    ]
    run = run_pair(tmp_path, layers, ops, remount=True)
    run.assert_results()
    chain_results = run.k.results["chain"]
    assert chain_results["append f (copy-up of the chain)"] == 5 and chain_results["ls top"] == []
    run.assert_view()
    run.assert_upper()
    run.assert_workdirs()
    run.assert_remount_stable()
    assert_kernel_reads_subject_upper(run)
