"""``pyoverlay explain``: why a path looks the way it does, from the layers alone.

A hand-made stack (upper + 3 lowers) with a whiteout, opaque dirs, files hidden by
higher files, a directory merged over every layer, type conflicts and an xattr
whiteout: the structured result is checked path by path, and for every path of every
layer the verdict (exists, type, size, symlink target) is checked against a kernel
overlay of the same layers. Then a copy-up made by the kernel, the CLI on a live
pyoverlay mount (with its server stopped, so a single request through the mount would
hang the command), and a container reference with its init layer.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import mounts
from helpers.stacks import OPQ, T0, WH, XWH, D, F, L, build_layer
from overlayfs_py.explain import explain, format_text

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.needs_root]


def _stack(base: Path) -> tuple[Path, list[Path]]:
    up, l1, l2, l3 = (base / n for n in ("upper", "l1", "l2", "l3"))
    build_layer(
        l3,
        {
            "a/x": F(b"x3\n"),
            "a/y": F(b"y3\n"),
            "etc/motd": F(b"base motd\n"),
            "bin/vi": L("/bin/busybox"),
            "bin/sh": L("/bin/busybox"),
            "opq/old": F(b"old\n"),
            "f": F(b"three\n"),
            "t/inner": F(b"inner\n"),
            "gone/deep": F(b"deep\n"),
            "xw": F(b"hidden by an xattr whiteout\n"),
        },
    )
    build_layer(
        l2,
        {
            "a/z": F(b"z2\n"),
            "etc/motd": F(b"app motd\n"),
            "opq/mid": F(b"mid\n"),
            "f": F(b"two\n"),
        },
    )
    build_layer(
        l1,
        {
            "a/w": F(b"w1\n"),
            "opq": OPQ(mtime_ns=T0),
            "opq/new": F(b"new\n"),
            "f": F(b"one\n"),
            "xw": XWH(),
        },
    )
    build_layer(
        up,
        {
            "a": D(mtime_ns=T0),
            "a/u": F(b"u\n"),
            "bin/vi": WH(),
            "etc/motd": F(b"upper motd\n"),
            "t": F(b"a file over a directory\n"),
            "gone": WH(),
        },
    )
    return up, [l1, l2, l3]


def _ex(up, lowers, path):
    return explain(str(up), [str(layer) for layer in lowers], path)


def _roles(ex):
    return [(o.label, o.role, o.how, o.hidden_by, o.at) for o in ex.layers]


@pytest.fixture
def stack(tmp_path):
    return _stack(tmp_path)


def test_dir_merged_over_every_layer(stack):
    up, lowers = stack
    ex = _ex(up, lowers, "/a")
    assert ex.exists and ex.served.label == "upper" and ex.served.kind == "dir"
    assert ex.served.real_path == str(up / "a")
    assert ex.merges == ["upper", "lower1", "lower2", "lower3"]
    assert ex.copied_up and ex.copied_up_from == "lower1"
    assert format_text(ex).splitlines()[0] == (
        f"/a: served by upper ({up}/a), directory — copied up from lower1; merges upper, lower1, lower2, lower3"
    )
    ex = _ex(up, lowers, "a/x")  # no leading slash: same path
    assert ex.path == "/a/x" and ex.served.label == "lower3" and ex.served.size == 3
    assert not ex.copied_up


def test_whiteout(stack):
    up, lowers = stack
    ex = _ex(up, lowers, "/bin/vi")
    assert not ex.exists
    assert ex.missing == {"how": "whiteout", "at": "/bin/vi", "layer": "upper", "real_path": str(up / "bin/vi")}
    assert _roles(ex) == [("upper", "whiteout", None, None, None), ("lower3", "hidden", "whiteout", "upper", "/bin/vi")]
    assert format_text(ex) == (
        f"/bin/vi: does not exist — whiteout in upper ({up}/bin/vi)\n"
        f"  lower3 ({lowers[2]}/bin/vi): symlink -> /bin/busybox, hidden by the whiteout in upper"
    )
    ex = _ex(up, lowers, "/gone/deep")  # a whiteout at an ancestor
    assert ex.missing["how"] == "whiteout" and ex.missing["at"] == "/gone"
    assert _roles(ex) == [("lower3", "hidden", "whiteout", "upper", "/gone")]
    assert "hidden by the whiteout at /gone in upper" in format_text(ex)
    ex = _ex(up, lowers, "/xw")  # an xattr whiteout in a lower
    assert not ex.exists and ex.missing["layer"] == "lower1"
    assert ex.layers[0].xattr_whiteout
    assert _roles(ex)[1] == ("lower3", "hidden", "whiteout", "lower1", "/xw")


def test_opaque_dir(stack):
    up, lowers = stack
    ex = _ex(up, lowers, "/opq")
    assert ex.served.label == "lower1" and ex.served.opaque and ex.merges == ["lower1"]
    assert _roles(ex) == [
        ("lower1", "serves", None, None, None),
        ("lower2", "hidden", "opaque", "lower1", "/opq"),
        ("lower3", "hidden", "opaque", "lower1", "/opq"),
    ]
    assert f"lower2 ({lowers[1]}/opq): directory, hidden by the opaque directory in lower1" in format_text(ex)
    ex = _ex(up, lowers, "/opq/old")
    assert not ex.exists
    assert ex.missing == {"how": "opaque", "at": "/opq", "layer": "lower1", "real_path": str(lowers[0] / "opq")}
    assert format_text(ex).splitlines() == [
        f"/opq/old: does not exist — hidden by the opaque directory /opq in lower1 ({lowers[0]}/opq)",
        f"  lower3 ({lowers[2]}/opq/old): regular file, 4 bytes, hidden by the opaque directory /opq in lower1",
    ]
    assert _ex(up, lowers, "/opq/new").served.label == "lower1"


def test_file_hidden_by_higher_files(stack):
    up, lowers = stack
    ex = _ex(up, lowers, "/f")
    assert ex.served.label == "lower1" and not ex.copied_up
    assert _roles(ex)[1:] == [
        ("lower2", "hidden", "higher", "lower1", "/f"),
        ("lower3", "hidden", "higher", "lower2", "/f"),
    ]
    ex = _ex(up, lowers, "/etc/motd")
    assert format_text(ex).splitlines() == [
        f"/etc/motd: served by upper ({up}/etc/motd), regular file, 11 bytes — copied up from lower2",
        f"  lower2 ({lowers[1]}/etc/motd): regular file, 9 bytes, hidden by upper",
        f"  lower3 ({lowers[2]}/etc/motd): regular file, 10 bytes, hidden by lower2",
    ]
    assert not ex.served.origin  # hand-made: no origin record; the lower file tells


def test_type_conflicts_and_non_directories_on_the_way(stack):
    up, lowers = stack
    ex = _ex(up, lowers, "/t")
    assert ex.served.kind == "file"
    assert _roles(ex)[1] == ("lower3", "hidden", "higher", "upper", "/t")
    assert not ex.copied_up  # a file over a directory is not a copy of it
    ex = _ex(up, lowers, "/t/inner")
    assert ex.missing["how"] == "nondir" and ex.missing["at"] == "/t" and ex.missing["layer"] == "upper"
    assert _roles(ex) == [("lower3", "hidden", "nondir", "upper", "/t")]
    assert format_text(ex).splitlines() == [
        f"/t/inner: does not exist — /t is a regular file in upper ({up}/t), not a directory",
        f"  lower3 ({lowers[2]}/t/inner): regular file, 6 bytes, hidden by the non-directory at /t in upper",
    ]
    ex = _ex(up, lowers, "/bin/sh/x")  # a symlink is never followed
    assert ex.missing["how"] == "nondir" and ex.missing["kind"] == "symlink"
    assert _ex(up, lowers, "/nothing/here").missing == {"how": "absent", "at": "/nothing"}


def test_root_and_opaque_root(tmp_path):
    up, lowers = _stack(tmp_path)
    ex = _ex(up, lowers, "/")
    assert ex.merges == ["upper", "lower1", "lower2", "lower3"] and not ex.copied_up
    l1, l2 = tmp_path / "r1", tmp_path / "r2"
    build_layer(l1, {"a": F(b"a\n")})
    build_layer(l2, {"b": F(b"b\n")})
    os.setxattr(l1, "trusted.overlay.opaque", b"y")
    ex = explain(None, [str(l1), str(l2)], "/b")
    assert not ex.exists and ex.missing["how"] == "opaque" and ex.missing["at"] == "/"
    assert _roles(ex) == [("lower2", "hidden", "opaque", "lower1", "/")]


def test_redirect_is_noted(tmp_path):
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    build_layer(l1, {"new": D(xattrs={"trusted.overlay.redirect": b"old"}), "new/n": F(b"n")})
    build_layer(l2, {"old/o": F(b"o")})
    ex = explain(None, [str(l1), str(l2)], "/new/n")
    assert ex.served.label == "lower1"
    assert ex.notes and "redirect" in ex.notes[0] and "'old'" in ex.notes[0]
    assert "  note: /new in lower1 has a redirect" in format_text(ex)
    assert "renamed by redirect" in ex.notes[0] and "at /old (lower2 has it)" in ex.notes[0]


def test_redirect_rename_explained(tmp_path):
    """An upper directory renamed by redirect (absolute, elsewhere): the note says where its
    lower content is and which lower layers have it."""
    up, l1, l2 = tmp_path / "u", tmp_path / "l1", tmp_path / "l2"
    build_layer(up, {"q/moved": D(xattrs={"trusted.overlay.redirect": b"/a/b"})})
    build_layer(l1, {"a/b/x": F(b"x")})
    build_layer(l2, {"a/b/y": F(b"y"), "c": D()})
    ex = explain(str(up), [str(l1), str(l2)], "/q/moved")
    assert ex.served.label == "upper"
    assert "/q/moved in upper has a redirect ('/a/b'); it was renamed by redirect" in ex.notes[0]
    assert "at /a/b (lower1, lower2 have it)" in ex.notes[0]


# --- the kernel as the oracle of the verdicts ---------------------------------------------


def _all_paths(layers) -> set[str]:
    out = set()
    for root in layers:
        for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not follow symlinks
            rel = os.path.relpath(dirpath, root)
            for n in dirnames + filenames:
                out.add("/" + os.path.normpath(os.path.join(rel, n)))
                out.add("/" + os.path.normpath(os.path.join(rel, n, "nope")))
    return out


def _lstat_no_follow(root: str, path: str) -> os.stat_result | None:
    """lstat of *path* under *root* without following a symlink on the way (as explain)."""
    parts = path.strip("/").split("/")
    for i in range(len(parts)):
        try:
            st = os.lstat(os.path.join(root, *parts[: i + 1]))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return None
    return st


ORACLE_STACKS = [
    "precedence",
    "type_conflicts",
    "char_whiteouts",
    "opaque_dirs",
    "xattr_whiteouts",
    "xattr_whiteouts_userxattr",
    "symlinks",
    "files_and_specials",
    "kernel_upper_as_lower",
    "kernel_upper",
    "handmade_upper",
]


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["this_module"] + ORACLE_STACKS)
def test_verdicts_match_the_kernel(tmp_path, name):
    """For every path of every layer (and one below each), explain's verdict is what a
    kernel overlay of the same layers shows: exists or not, type, size and content,
    symlink target; a directory lists only names of the layers it says merge."""
    if name == "this_module":
        up, lowers = _stack(tmp_path)
        layers, options = [up, *lowers], []
    else:
        from helpers.stacks import build_stack

        st = build_stack(name, tmp_path / "stack")
        layers, options = ([st.upper] if st.upper else []) + list(st.lowers), st.options
    # a read-only kernel overlay with the upper as its top lower shows the same view
    # (and, unlike a read-write mount, writes nothing into the upper)
    paths = sorted(_all_paths(layers))
    assert len(paths) > 20
    with mounts.KernelOverlay(layers, tmp_path / "mnt", options=options) as k:
        for path in paths:
            ex = explain(None, [str(layer) for layer in layers], path, userxattr="userxattr" in options)
            merged = str(k.path) + path
            st = _lstat_no_follow(str(k.path), path)
            if st is None:
                assert not ex.exists, (path, ex)
                continue
            assert ex.exists, (path, ex.missing)
            real = os.lstat(ex.served.real_path)
            assert stat.S_IFMT(real.st_mode) == stat.S_IFMT(st.st_mode), path
            if stat.S_ISREG(st.st_mode):
                assert ex.served.size == st.st_size, path
                assert Path(ex.served.real_path).read_bytes() == Path(merged).read_bytes(), path
            if stat.S_ISLNK(st.st_mode):
                assert ex.served.target == os.readlink(merged), path
            if stat.S_ISDIR(st.st_mode):
                assert ex.merges and ex.merges[0] == ex.served.label
                names = set()
                for label in ex.merges:
                    names |= set(os.listdir(str(layers[int(label[len("lower") :]) - 1]) + path))
                assert set(os.listdir(merged)) <= names, path


@pytest.mark.kernel
def test_copy_up_by_the_kernel(tmp_path):
    l1, l2, up, work = (tmp_path / n for n in ("l1", "l2", "upper", "work"))
    build_layer(l1, {"etc/motd": F(b"app\n")})
    build_layer(l2, {"etc/motd": F(b"base\n"), "etc/passwd": F(b"root\n")})
    up.mkdir()
    work.mkdir()
    with mounts.KernelOverlay([l1, l2], tmp_path / "mnt", upper=up, workdir=work) as k:
        with open(k.path / "etc/motd", "ab") as f:
            f.write(b"more\n")
        os.chmod(k.path / "etc/passwd", 0o600)
    ex = explain(str(up), [str(l1), str(l2)], "/etc/motd")
    assert ex.served.label == "upper" and ex.served.origin
    assert ex.copied_up and ex.copied_up_from == "lower1"
    assert ex.served.size == len(b"app\nmore\n")
    ex = explain(str(up), [str(l1), str(l2)], "/etc/passwd")
    assert ex.copied_up_from == "lower2"
    ex = explain(str(up), [str(l1), str(l2)], "/etc")
    assert ex.served.origin and ex.merges == ["upper", "lower1", "lower2"]


# --- the command line -----------------------------------------------------------------------


def _cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", *map(str, args)],
        cwd=REPO,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(d))
    return d


def _wait_for_record(mountpoint: Path, timeout: float = 10.0) -> None:
    """The server records itself just after the mount appears in mountinfo."""
    from overlayfs_py import state

    deadline = time.monotonic() + timeout
    while state.lookup(os.path.realpath(mountpoint.parent) + "/" + mountpoint.name) is None:
        assert time.monotonic() < deadline, "the server never recorded its mount"
        time.sleep(0.02)


@pytest.mark.fuse
def test_cli_on_a_live_mount_never_touches_it(tmp_path, state_dir):
    up, lowers = _stack(tmp_path)
    want = format_text(_ex(up, lowers, "/bin/vi")) + "\n"
    with mounts.PyoverlayMount(lowers, tmp_path / "mnt", upper=up) as m:
        _wait_for_record(m.path)
        # nothing was looked up through the mount yet (no cached dentry could answer), and
        # with the server stopped any request through it would hang the command
        m.proc.send_signal(signal.SIGSTOP)
        try:
            r = _cli("explain", m.path, "/bin/vi", timeout=30)
            rj = _cli("explain", "--json", m.path, "etc/motd", timeout=30)
        finally:
            m.proc.send_signal(signal.SIGCONT)
        assert not os.path.exists(m.path / "bin/vi") and os.path.exists(m.path / "etc/motd")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want
    assert rj.returncode == 0, rj.stderr
    data = json.loads(rj.stdout)
    assert data["served"]["label"] == "upper" and data["copied_up_from"] == "lower2"
    assert [o["label"] for o in data["layers"]] == ["upper", "lower2", "lower3"]
    r = _cli("explain", tmp_path / "mnt", "/a")  # unmounted: no record any more
    assert r.returncode == 1 and r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1


def test_cli_container_ref_labels_the_init_layer(tmp_path, state_dir):
    from runner import state as rstate

    image, init, upper = tmp_path / "image", tmp_path / "init", tmp_path / "cupper"
    build_layer(image, {"etc/hostname": F(b"image\n"), "bin/sh": L("busybox")})
    build_layer(init, {"etc/hostname": F(b""), "proc": D()})
    build_layer(upper, {"etc/new": F(b"n\n")})
    rstate.save(
        {
            "id": "9a8b7c" + "0" * 58,
            "name": "db",
            "layers": [str(image)],
            "upper": str(upper),
            "init_layer": str(init),
            "merged": str(tmp_path / "merged"),
            "created": 1.0,
            "status": "exited",
        }
    )
    r = _cli("explain", "db", "/etc/hostname")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"/etc/hostname: served by init ({init}/etc/hostname), regular file, 0 bytes",
        f"  lower1 ({image}/etc/hostname): regular file, 6 bytes, hidden by init",
    ]
    r = _cli("explain", "--json", "9a8b", "/etc")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["merges"] == ["upper", "init", "lower1"]
    r = _cli("explain", "nope", "/etc")
    assert r.returncode == 1
    assert r.stderr.strip() == "pyoverlay: nope is neither a pyoverlay mountpoint nor a container"
