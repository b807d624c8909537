"""AUFS-style whiteouts (``-o aufs_whiteouts=on``, docs/semantics.md "AUFS whiteouts").

containers/storage writes the layers it stores from a tar with the tar's whiteouts: a deleted
NAME is an empty ``.wh.NAME``, an opaque directory holds ``.wh..wh..opq``. With the option
on, pyoverlay honours them in every layer as fuse-overlayfs does: the same operations on
pyoverlay (both engines) and on fuse-overlayfs, over identical layers, give the same results
and the same merged tree. With the option off (the default of ``pyoverlay mount``) they are
plain files, as in the kernel overlay (compared with the kernel). The rule itself (the
LayerStack) and ``explain``/``diff`` are checked without FUSE.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from helpers import mounts
from helpers.rootless import VENV_BIN
from helpers.stacks import D, F, build_layer
from helpers.writeops import errname, run_pair
from overlayfs_py.diff import diff
from overlayfs_py.explain import explain, format_text
from overlayfs_py.layers import LayerStack
from overlayfs_py.whiteout import XattrNames

ENGINES = ("direct", "pyfuse3")

# top lower: the markers; bottom lower: what they hide (and what stays)
L1 = {
    "etc": D(),
    "etc/.wh.motd": F(),  # hides l2 etc/motd
    "etc/hosts": F(b"hosts\n"),
    ".wh.gone": F(),  # hides the l2 directory gone/ and all it holds
    "opq": D(),
    "opq/.wh..wh..opq": F(),  # opq/ is opaque: l2 opq/old is hidden
    "opq/new": F(b"new\n"),
    "nest/a/.wh.b": F(),  # nested: hides l2 nest/a/b
    "same/x": F(b"same layer\n"),
    "same/.wh.x": F(),  # hides x in its own layer too (fuse-overlayfs's lookup)
    "rmd/.wh.only": F(),  # rmd/ holds nothing visible: rmdir works
    "over/.wh.f": F(),  # a file created over a hidden name
    "mk/.wh.d": F(),  # a directory created over a hidden directory: empty
    "ren/.wh.t": F(),  # a rename onto a hidden name
    "ren/s": F(b"source\n"),
    "keepdir/.wh.k1": F(),
}
L2 = {
    "etc/motd": F(b"motd\n"),
    "etc/passwd": F(b"root\n"),
    "gone/inner": F(b"i\n"),
    "opq/old": F(b"old\n"),
    "nest/a/b": F(b"b\n"),
    "nest/a/c": F(b"c\n"),
    "same/x": F(b"bottom\n"),
    "rmd/only": F(b"o\n"),
    "over/f": F(b"lower f\n"),
    "mk/d/inner": F(b"inner\n"),
    "ren/t": F(b"hidden target\n"),
    "keepdir/k1": F(b"k1\n"),
    "keepdir/k2": F(b"k2\n"),
    "up/u": F(b"u from below\n"),
    "up/v": F(b"v\n"),
    "up/ud/inner": F(b"inner\n"),
}
# an upper written the AUFS way (fuse-overlayfs without mknod): a marker there too
UPPER = {
    "up": D(),
    "up/.wh.u": F(),
    "up/.wh.ud": F(),  # hides the lower directory up/ud
    "up/keep": F(b"keep\n"),
}


def _build(base: Path) -> tuple[list[Path], Path, Path, Path]:
    l1 = build_layer(base / "l1", L1)
    l2 = build_layer(base / "l2", L2)
    upper = build_layer(base / "upper", UPPER)
    work = base / "work"
    work.mkdir()
    mnt = base / "mnt"
    mnt.mkdir()
    return [l1, l2], upper, work, mnt


def tree(root: Path) -> dict[str, str]:
    """Every path below *root*: its type and (files) content; never follows a symlink."""
    out: dict[str, str] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        for name in sorted(os.listdir(root / rel if rel else root)):
            r = f"{rel}/{name}" if rel else name
            p = root / r
            st = os.lstat(p)
            if os.path.isdir(p) and not os.path.islink(p):
                out[r] = "dir"
                todo.append(r)
            elif os.path.islink(p):
                out[r] = "symlink " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[r] = "file " + p.read_bytes().decode(errors="replace")
            else:
                out[r] = f"special {stat.S_IFMT(st.st_mode):o} {st.st_rdev}"
    return out


def _try(fn, *args) -> str:
    try:
        r = fn(*args)
    except OSError as e:
        return errname(e)
    return "ok" if r is None else repr(r)


def _create(p: Path, data: bytes) -> None:
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(p: Path) -> bytes:
    return p.read_bytes()


def scenario(m: Path) -> dict[str, str]:
    """Read and write through a mount over the layers above; every result, in order.

    The lookups come before any listing: with Debian's fuse-overlayfs 1.10, after a walk of
    the whole tree, a lookup of opq/old found the lower file that opq's ``.wh..wh..opq``
    hides (its listing did not show it; a fresh mount's lookup does not find it either).
    pyoverlay hides it in both, always."""
    r: dict[str, str] = {}
    for p in ("etc/motd", "etc/.wh.motd", "gone", "gone/inner", "opq/old", "nest/a/b", "same/x", "up/u", ".wh.gone"):
        r[f"lstat {p}"] = _try(lambda q: os.lstat(q) and None, m / p)
    r["tree before"] = repr(tree(m))
    r["read etc/passwd"] = _try(_read, m / "etc/passwd")
    r["listdir etc"] = repr(sorted(os.listdir(m / "etc")))
    r["listdir keepdir"] = repr(sorted(os.listdir(m / "keepdir")))
    r["rmdir rmd"] = _try(os.rmdir, m / "rmd")
    r["lstat rmd"] = _try(lambda q: os.lstat(q) and None, m / "rmd")
    r["rmdir nest/a"] = _try(os.rmdir, m / "nest/a")
    r["rmdir opq (holds new)"] = _try(os.rmdir, m / "opq")
    r["unlink opq/new"] = _try(os.unlink, m / "opq/new")
    r["rmdir opq"] = _try(os.rmdir, m / "opq")
    r["create over/f"] = _try(_create, m / "over/f", b"new f\n")
    r["read over/f"] = _try(_read, m / "over/f")
    r["mkdir mk/d"] = _try(os.mkdir, m / "mk/d")
    r["listdir mk/d"] = repr(sorted(os.listdir(m / "mk/d")))
    r["mkdir gone"] = _try(os.mkdir, m / "gone")
    r["listdir gone"] = repr(sorted(os.listdir(m / "gone")))
    r["create up/u (marker in upper)"] = _try(_create, m / "up/u", b"new u\n")
    r["read up/u"] = _try(_read, m / "up/u")
    r["mkdir up/ud (marker in upper)"] = _try(os.mkdir, m / "up/ud")
    r["listdir up/ud"] = repr(sorted(os.listdir(m / "up/ud")))
    r["create .wh.x"] = _try(_create, m / ".wh.x", b"")
    r["lstat .wh.x"] = _try(lambda q: os.lstat(q) and None, m / ".wh.x")
    r["rename ren/s ren/t"] = _try(os.rename, m / "ren/s", m / "ren/t")
    r["read ren/t"] = _try(_read, m / "ren/t")
    r["rename etc/hosts etc/motd"] = _try(os.rename, m / "etc/hosts", m / "etc/motd")
    r["read etc/motd"] = _try(_read, m / "etc/motd")
    r["unlink etc/passwd"] = _try(os.unlink, m / "etc/passwd")
    r["unlink same/x"] = _try(os.unlink, m / "same/x")
    r["create same/x"] = _try(_create, m / "same/x", b"again\n")
    r["unlink keepdir/k2"] = _try(os.unlink, m / "keepdir/k2")
    r["rmdir keepdir"] = _try(os.rmdir, m / "keepdir")
    # an upper directory holding markers goes (its markers with it)
    for q in ("up/u", "up/keep", "up/v"):
        r[f"unlink {q}"] = _try(os.unlink, m / q)
    r["rmdir up/ud"] = _try(os.rmdir, m / "up/ud")
    r["rmdir up"] = _try(os.rmdir, m / "up")
    r["lstat up"] = _try(lambda q: os.lstat(q) and None, m / "up")
    r["tree after"] = repr(tree(m))
    return r


def _run(base: Path, cls, options) -> tuple[dict[str, str], Path]:
    lowers, upper, work, mnt = _build(base)
    with cls(lowers, mnt, upper=upper, workdir=work, options=options, log_path=base / "log"):
        out = scenario(mnt)
    assert not mounts.is_mounted(mnt)
    return out, upper


def _diff_results(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return [f"{k}: fuse-overlayfs {a.get(k)!r} != pyoverlay {b.get(k)!r}" for k in a if a.get(k) != b.get(k)]


@pytest.mark.fuse
@pytest.mark.needs_root
@pytest.mark.parametrize("engine", ENGINES)
def test_aufs_whiteouts_as_fuse_overlayfs(engine, tmp_path, monkeypatch):
    """The same operations over the same AUFS-marked layers: pyoverlay answers as
    fuse-overlayfs does, and leaves the kernel's format in its upper."""
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path / "state"))
    want, _ = _run(tmp_path / "fo", mounts.FuseOverlayfsMount, [])
    got, upper = _run(tmp_path / "py", mounts.PyoverlayMount, ["aufs_whiteouts=on", f"engine={engine}"])
    assert _diff_results(want, got) == []
    # the things that matter, spelled out (fuse-overlayfs is the oracle, but not blindly)
    assert got["lstat etc/motd"] == "ENOENT" and got["lstat gone"] == "ENOENT" and got["lstat same/x"] == "ENOENT"
    assert got["listdir etc"] == repr(["hosts", "passwd"])
    assert got["rmdir rmd"] == "ok" and got["rmdir nest/a"] == "ENOTEMPTY" and got["rmdir opq"] == "ok"
    assert got["listdir mk/d"] == "[]" and got["listdir gone"] == "[]"
    assert got["read up/u"] == repr(b"new u\n") and got["create .wh.x"] == "EINVAL"
    assert got["read ren/t"] == repr(b"source\n")
    # up/ud made where the upper's marker hid a lower directory: empty (opaque), and up/,
    # holding markers, could go
    assert got["listdir up/ud"] == "[]" and got["rmdir up"] == "ok"
    # in the upper: the markers that were there went with up/; pyoverlay made none
    made = {p for p in tree(upper) if os.path.basename(p).startswith(".wh.")}
    assert made == set(), made


@pytest.mark.fuse
@pytest.mark.needs_root
@pytest.mark.parametrize("engine", ENGINES)
def test_markers_only_pyoverlay_refuses(engine, tmp_path, monkeypatch):
    """Every way of making a ``.wh.`` name through the mount fails EINVAL (fuse-overlayfs
    refuses a create; its mkdir, symlink, mknod and rename would make a marker that hides
    the name it spells: pyoverlay refuses them all alike), and nothing is written."""
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path / "state"))
    lowers, upper, work, mnt = _build(tmp_path)
    opts = ["aufs_whiteouts=on", f"engine={engine}"]
    with mounts.PyoverlayMount(lowers, mnt, upper=upper, workdir=work, options=opts, log_path=tmp_path / "log"):
        for what, fn in (
            ("mkdir", lambda: os.mkdir(mnt / ".wh.d")),
            ("symlink", lambda: os.symlink("x", mnt / "etc/.wh.hosts")),
            ("mknod", lambda: os.mkfifo(mnt / ".wh.fifo")),
            ("link", lambda: os.link(mnt / "etc/hosts", mnt / "etc/.wh.passwd")),
            ("rename", lambda: os.rename(mnt / "etc/hosts", mnt / "etc/.wh.passwd")),
        ):
            with pytest.raises(OSError) as exc:
                fn()
            assert exc.value.errno == errno.EINVAL, what
        assert sorted(os.listdir(mnt / "etc")) == ["hosts", "passwd"]
    assert {p for p in tree(upper) if os.path.basename(p).startswith(".wh.")} == {"up/.wh.u", "up/.wh.ud"}


LAYERS_OFF = [
    {
        "etc/.wh.motd": F(),
        "etc/hosts": F(b"h\n"),
        "opq/.wh..wh..opq": F(),
        "opq/new": F(b"n\n"),
        ".wh.gone": F(),
    },
    {
        "etc/motd": F(b"motd\n"),
        "opq/old": F(b"old\n"),
        "gone/inner": F(b"i\n"),
    },
]


def _ops_off(m: Path, rec) -> None:
    rec.do("listdir etc", lambda: sorted(os.listdir(m / "etc")))
    rec.do("read etc/motd", (m / "etc/motd").read_bytes)
    rec.do("lstat etc/.wh.motd", lambda: os.lstat(m / "etc/.wh.motd").st_size)
    rec.do("listdir opq", lambda: sorted(os.listdir(m / "opq")))
    rec.do("listdir gone", lambda: sorted(os.listdir(m / "gone")))
    rec.do("create .wh.x", _create, m / ".wh.x", b"x")
    rec.do("unlink etc/.wh.motd", os.unlink, m / "etc/.wh.motd")
    rec.do("rmdir opq", os.rmdir, m / "opq")


@pytest.mark.kernel
@pytest.mark.fuse
def test_markers_are_plain_files_when_off(tmp_path):
    """Without the option (``pyoverlay mount``'s default) a ``.wh.`` file is a file, as in
    the kernel overlay: listed, looked up, made and removed like any other."""
    run = run_pair(tmp_path, LAYERS_OFF, _ops_off)
    run.assert_results()
    run.assert_view("")
    run.assert_upper("")


# --- the rule without FUSE ----------------------------------------------------------------------


def test_layer_stack_rule(tmp_path):
    """LayerStack with aufs: lookups and listings honour markers; without: plain names."""
    lowers, upper, _work, _mnt = _build(tmp_path)
    names = XattrNames()
    for aufs in (True, False):
        stack = LayerStack([str(p) for p in lowers], str(upper), names, aufs=aufs)
        try:
            root = stack.merge_root()
            dirs = [(layer, b"") for layer in root]

            def sub(d: list, name: bytes, stack=stack) -> list:
                return [(h.layer, h.path) for h in stack.resolve(d, name)]

            etc = sub(dirs, b"etc")
            motd = stack.resolve(etc, b"motd")
            listed = sorted(n for n, _ in stack.list_merged(etc, True))
            if aufs:
                assert motd == [] and stack.resolve(etc, b".wh.motd") == []
                assert listed == [b"hosts", b"passwd"]
                assert stack.resolve(dirs, b"gone") == []
                assert [h.layer.label for h in stack.resolve(dirs, b"opq")] == ["lower1"]  # opaque
                assert stack.resolve(sub(dirs, b"same"), b"x") == []
                assert stack.resolve(sub(dirs, b"up"), b"u") == []  # the marker in the upper
                assert [h.layer.label for h in stack.resolve(sub(dirs, b"up"), b"v")] == ["lower2"]
                assert sorted(n for n, _ in stack.list_merged(sub(dirs, b"up"), True)) == [b"keep", b"v"]
            else:
                assert [h.layer.label for h in motd] == ["lower2"]
                assert listed == [b".wh.motd", b"hosts", b"motd", b"passwd"]
                assert [h.layer.label for h in stack.resolve(dirs, b"gone")] == ["lower2"]
                assert [h.layer.label for h in stack.resolve(dirs, b"opq")] == ["lower1", "lower2"]
        finally:
            stack.close()


def test_explain_names_the_marker(tmp_path):
    lowers, upper, _work, _mnt = _build(tmp_path)
    ex = explain(str(upper), [str(p) for p in lowers], "/etc/motd", aufs=True)
    assert not ex.exists and ex.missing is not None
    assert ex.missing["layer"] == "lower1" and ex.missing.get("marker") is True
    assert ex.missing["real_path"] == str(lowers[0] / "etc/.wh.motd")
    assert "AUFS whiteout .wh.motd in lower1" in format_text(ex)
    ex = explain(str(upper), [str(p) for p in lowers], "/gone/inner", aufs=True)
    assert not ex.exists and ex.missing is not None and ex.missing["at"] == "/gone"
    ex = explain(str(upper), [str(p) for p in lowers], "/opq/old", aufs=True)
    assert not ex.exists and ex.missing is not None and ex.missing["how"] == "opaque"
    # off: the marker is a plain file, motd is served by lower2
    ex = explain(str(upper), [str(p) for p in lowers], "/etc/motd")
    assert ex.exists and ex.served is not None and ex.served.label == "lower2"


def test_diff_reads_markers(tmp_path):
    """``diff`` with aufs: an upper marker is a deletion, a lower marker hides what it names."""
    lowers, upper, _work, _mnt = _build(tmp_path)
    build_layer(upper, {"etc/motd": F(b"new motd\n"), "opq2": D(), "opq2/.wh..wh..opq": F()})
    build_layer(lowers[1], {"opq2/z": F(b"z\n")})
    on = {(c.kind, c.path) for c in diff(str(upper), [str(p) for p in lowers], aufs=True)}
    assert ("D", "/up/u") in on  # the upper's marker
    assert ("A", "/etc/motd") in on  # hidden by lower1's marker: new in the lower view
    assert ("D", "/opq2") in on  # opaque over a lower directory
    assert not any(".wh." in p for _, p in on)
    off = {(c.kind, c.path) for c in diff(str(upper), [str(p) for p in lowers])}
    assert ("C", "/etc/motd") in off and ("A", "/up/.wh.u") in off


@pytest.mark.fuse
@pytest.mark.needs_root
def test_explain_and_diff_follow_the_mount_record(tmp_path, monkeypatch):
    """``pyoverlay explain MERGED`` and ``pyoverlay diff MERGED`` on a live mount with the
    option read the markers as the mount does (its record says so); ``--no-aufs-whiteouts``
    reads them as plain files."""
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path / "state"))
    lowers, upper, work, mnt = _build(tmp_path)
    env = mounts.pyoverlay_env()

    def cli(*args: str) -> str:
        r = subprocess.run([VENV_BIN / "pyoverlay", *args], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    with mounts.PyoverlayMount(lowers, mnt, upper=upper, workdir=work, options=["aufs_whiteouts=on"]):
        (mnt / "etc/passwd").unlink()
        said = cli("explain", str(mnt), "/etc/motd")
        assert f"does not exist — AUFS whiteout .wh.motd in lower1 ({lowers[0]}/etc/.wh.motd)" in said, said
        assert "served by lower2" in cli("explain", "--no-aufs-whiteouts", str(mnt), "/etc/motd")
        changes = set(cli("diff", str(mnt)).splitlines())
        assert {"C /etc", "D /etc/passwd", "D /up/u", "D /up/ud"} <= changes, changes
        assert not any(".wh." in c for c in changes), changes
        plain = set(cli("diff", "--no-aufs-whiteouts", str(mnt)).splitlines())
        assert "A /up/.wh.u" in plain, plain
