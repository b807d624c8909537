"""``pyoverlay mount`` as the ordinary user pyoverlay-test (through fusermount3).

The user mounts, writes, deletes and renames; the upper it leaves uses ``user.overlay.*``
private xattrs and char 0/0 whiteouts, and a kernel overlay mounted by root with
``-o userxattr`` over the same layers shows the same tree (the oracle). The xattr form is
recorded in the workdir, so later mounts (the user's, root's) read the upper the same way.
Errors the machine causes (/dev/fuse closed, allow_other refused) are one line, exit 2,
and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import mounts
from helpers.rootless import VENV_BIN
from helpers.snapshot import diff_snapshots, format_diff, snapshot

# what a rootless view is compared on (times and inode numbers are not the point here)
KEYS = ("type", "mode", "uid", "gid", "size", "sha256", "target", "rdev", "xattrs")

_SNAPSHOT = f"""
import json, sys
sys.path.insert(0, {str(mounts.REPO_ROOT / "tests")!r})
from helpers.snapshot import snapshot
print(json.dumps(snapshot(sys.argv[1]), default=lambda o: o.decode("utf-8", "surrogateescape")))
"""


def _view(snap: dict) -> dict:
    """A snapshot reduced to KEYS, through JSON (as the user's snapshot comes)."""
    snap = json.loads(json.dumps(snap, default=lambda o: o.decode("utf-8", "surrogateescape")))
    entries = {p: {k: r[k] for k in KEYS if k in r} for p, r in snap["entries"].items()}
    return {"entries": entries, "hardlinks": [], "problems": []}


def _user_view(user, mnt: Path) -> dict:
    r = user.run([VENV_BIN / "python", "-c", _SNAPSHOT, mnt])
    assert r.returncode == 0, r.stderr
    return _view(json.loads(r.stdout))


def _same(a: dict, b: dict, what: str) -> None:
    diff = diff_snapshots(a, b, a_name="expected", b_name="actual")
    assert not diff, format_diff(diff, what)


def _mount(user, *args: str) -> None:
    r = user.pyoverlay("mount", *map(str, args))
    assert r.returncode == 0, r.stderr


def _umount(user, mnt: Path) -> None:
    r = user.pyoverlay("umount", mnt)
    assert r.returncode == 0, r.stderr
    assert not mounts.is_mounted(mnt)


def _one_line_error(r: subprocess.CompletedProcess, *parts: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("pyoverlay: "), r.stderr
    for part in parts:
        assert part in r.stderr, r.stderr


def _user_layout(user):
    """A lower layer made by the user; empty upper, workdir and mountpoint of the user's."""
    lo, up, wk, mnt = user.mkdirs("lo", "up", "wk", "mnt")
    r = user.sh(
        "mkdir -p lo/d/sub lo/keep && echo a > lo/a && echo b > lo/d/b && echo c > lo/d/sub/c"
        " && echo old > lo/old && echo x > lo/x && chmod 640 lo/x && ln -s a lo/ln"
        " && echo k > lo/keep/k && setfattr -n user.tag -v lower lo/x"
        " && touch -d 2001-01-01 lo/x"
    )
    assert r.returncode == 0, r.stderr
    return lo, up, wk, mnt


def _xattrs(path: Path) -> dict:
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}


def test_write_as_user_then_kernel_userxattr_reads_the_same(user, tmp_path):
    lo, up, wk, mnt = _user_layout(user)
    _mount(user, lo, up, mnt, "--workdir", wk)
    r = user.sh(
        'test "$(cat mnt/a)" = a'
        " && rm mnt/a"  # whiteout over a lower file
        " && rm -r mnt/d && mkdir mnt/d && echo fresh > mnt/d/f"  # opaque directory
        " && mv mnt/old mnt/renamed"  # rename over a lower name
        " && echo more >> mnt/keep/k"  # copy-up of a file and its dir
        " && setfattr -n user.note -v hi mnt/x && chmod 600 mnt/x"  # copy-up keeps xattrs, times
        " && echo new > mnt/new && mkdir mnt/newdir && ln -s new mnt/newln"
        " && ls mnt"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["d", "keep", "ln", "new", "newdir", "newln", "renamed", "x"]
    first = _user_view(user, mnt)
    assert first["entries"]["x"]["xattrs"] == {"user.note": "hi", "user.tag": "lower"}
    assert first["entries"]["new"]["uid"] == user.uid and first["entries"]["newdir"]["gid"] == user.gid
    _umount(user, mnt)

    # the upper: user.overlay.* only, char 0/0 whiteouts, the user's files, the record
    for name in ("a", "old"):
        st = os.lstat(up / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and st.st_uid == user.uid, name
    assert _xattrs(up / "d").get("user.overlay.opaque") == b"y"
    assert "user.overlay.origin" in _xattrs(up / "x")
    assert os.stat(up / "x").st_mtime == os.stat(lo / "x").st_mtime
    for root, dirs, files in os.walk(up):
        for n in [root, *(os.path.join(root, f) for f in dirs + files)]:
            assert not [x for x in os.listxattr(n, follow_symlinks=False) if x.startswith("trusted.")], n
            assert os.lstat(n).st_uid == user.uid, n
    assert json.loads((wk / "pyoverlay.json").read_text()) == {"userxattr": True}
    assert stat.S_IMODE(os.stat(wk / "pyoverlay.json").st_mode) == 0o644

    # remount as the user, no options: the recorded form, the same view
    _mount(user, lo, up, mnt, "--workdir", wk)
    try:
        _same(first, _user_view(user, mnt), "remount as the user")
    finally:
        _umount(user, mnt)

    # the oracle: root's kernel overlay with -o userxattr over the same layers
    kmnt, kwk = tmp_path / "kmnt", tmp_path / "kwk"
    with mounts.KernelOverlay([lo], kmnt, upper=up, workdir=kwk, options=["userxattr"]):
        _same(_view(snapshot(kmnt)), first, "kernel -o userxattr (expected) vs pyoverlay as the user")


def test_root_reads_a_user_upper_in_the_recorded_form(user, tmp_path):
    lo, up, wk, mnt = _user_layout(user)
    _mount(user, lo, up, mnt, "--workdir", wk)
    assert user.sh("rm -r mnt/d && mkdir mnt/d && rm mnt/a").returncode == 0
    view = _user_view(user, mnt)
    _umount(user, mnt)

    env = mounts.pyoverlay_env() | {"PYOVERLAY_STATE_DIR": str(tmp_path / "state")}
    cli = [sys.executable, "-m", "pyoverlay_cli"]
    r = subprocess.run(
        [*cli, "mount", "-o", "nouserxattr", lo, up, mnt, "--workdir", wk], capture_output=True, text=True, env=env
    )
    _one_line_error(r, f"upper layer '{up}' has user.overlay.* private xattrs", "-o nouserxattr conflicts with it")
    # the user's workdir is refused to root (its work/ would be the user's to swap entries
    # in while root builds objects there: docs/rootless.md, "Security model")
    before = sorted(os.listdir(wk))
    r = subprocess.run([*cli, "mount", lo, up, mnt, "--workdir", wk], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert f"workdir '{wk}' belongs to uid {user.uid}, not to the mounting user (uid 0)" in r.stderr
    assert not mounts.is_mounted(mnt) and sorted(os.listdir(wk)) == before
    # a workdir of root's beside the user's upper: the form is found on the upper's files
    rwk = user.dir / "rootwk"
    rwk.mkdir()
    r = subprocess.run([*cli, "mount", lo, up, mnt, "--workdir", rwk], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    try:
        _same(view, _view(snapshot(mnt)), "pyoverlay as root without -o userxattr")
    finally:
        r = subprocess.run([*cli, "umount", mnt], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
    assert json.loads((rwk / "pyoverlay.json").read_text()) == {"userxattr": True}
    assert json.loads((wk / "pyoverlay.json").read_text()) == {"userxattr": True}
    # the user's workdir is still usable by the user
    _mount(user, lo, up, mnt, "--workdir", wk)
    _umount(user, mnt)


def test_recorded_trusted_form_and_nouserxattr_are_refused(user):
    lo, up, wk, mnt = _user_layout(user)
    r = user.pyoverlay("mount", "-o", "nouserxattr", lo, up, mnt, "--workdir", wk)
    _one_line_error(r, "-o nouserxattr", "needs root")
    (wk / "pyoverlay.json").write_text('{"userxattr": false}\n')
    r = user.pyoverlay("mount", lo, up, mnt, "--workdir", wk)
    _one_line_error(
        r,
        f"upper layer '{up}' has trusted.overlay.* private xattrs (recorded in '{wk}/pyoverlay.json')",
        "mount it as root",
    )
    assert not mounts.is_mounted(mnt) and os.listdir(wk) == ["pyoverlay.json"]


def test_dev_fuse_closed_to_users_is_one_line_and_leaves_nothing(user):
    lo, up, _wk, mnt = _user_layout(user)
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o600)
    try:
        r = user.pyoverlay("mount", lo, up, mnt)
    finally:
        os.chmod("/dev/fuse", mode)
    _one_line_error(r, f"/dev/fuse is not accessible to uid {user.uid} (mode 0600)", "0666")
    assert not mounts.is_mounted(mnt)
    assert not (user.dir / ".up.pyoverlay-work").exists()  # the default workdir was not made


def test_allow_other_without_user_allow_other(user):
    from overlayfs_py.privilege import user_allow_other

    if user_allow_other():
        pytest.skip("/etc/fuse.conf has user_allow_other: allow_other is allowed here")
    lo, up, _wk, mnt = _user_layout(user)
    r = user.pyoverlay("mount", "-o", "allow_other", lo, up, mnt)
    _one_line_error(r, "allow_other without root needs 'user_allow_other' in /etc/fuse.conf")
    assert not mounts.is_mounted(mnt) and not (user.dir / ".up.pyoverlay-work").exists()


def test_lower_files_the_user_may_not_read_stay_unreadable(user):
    lo = user.dir / "rootlo"  # made by root
    lo.mkdir()
    (lo / "secret").write_text("root only\n")
    os.chmod(lo / "secret", 0o600)
    (lo / "public").write_text("everyone\n")
    (lo / "mine").write_text("0200\n")
    os.chown(lo / "mine", user.uid, user.gid)
    os.chmod(lo / "mine", 0o200)
    up, mnt = user.mkdirs("up", "mnt")
    _mount(user, lo, up, mnt)
    try:
        r = user.sh("cat mnt/secret", check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = user.sh("echo x >> mnt/secret", check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = user.sh("cat mnt/public && stat -c %u:%a mnt/public mnt/secret")
        assert r.stdout.split() == ["everyone", "0:644", "0:600"], r.stderr
        r = user.sh("echo x >> mnt/public", check=False)  # not the user's: the kernel refuses
        assert r.returncode != 0 and "Permission denied" in r.stderr
        # the user's own write-only file: the server (the user) cannot read it to copy it up
        r = user.sh("echo x >> mnt/mine", check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = user.sh("echo new > mnt/new && stat -c %u:%g mnt/new")
        assert r.stdout.split() == [f"{user.uid}:{user.gid}"]
    finally:
        _umount(user, mnt)
    assert sorted(os.listdir(up)) == ["new"]
    assert os.stat(up / "new").st_uid == user.uid


def test_fusermount3_not_setuid(user, tmp_path):
    """In a private mount namespace a copy without the setuid bit hides /usr/bin/fusermount3."""
    from overlayfs_py.privilege import fusermount_path

    tool = fusermount_path()
    assert tool is not None
    copy = tmp_path / "fusermount3"
    copy.write_bytes(Path(tool).read_bytes())
    copy.chmod(0o755)
    lo, up, _wk, mnt = _user_layout(user)
    argv = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$0" "$1" && shift && exec "$@"',
        copy,
        tool,
        *user.argv([VENV_BIN / "pyoverlay", "mount", lo, up, mnt]),
    ]
    r = subprocess.run(list(map(str, argv)), capture_output=True, text=True, cwd=user.dir, env=user.env(), timeout=60)
    _one_line_error(r, f"{tool} is not setuid root", "chmod u+s")
    assert not mounts.is_mounted(mnt) and not (user.dir / ".up.pyoverlay-work").exists()
