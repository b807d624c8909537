"""uid/gid mapping and stored owners through real mounts (docs/rootless.md, "Uid and gid
mapping"): as root with -o uidmapping/gidmapping, and as the ordinary user with
--uidmap/--gidmap, where the server cannot chown and records owners in the override xattr
``user.containers.override_stat``; fuse-overlayfs reads the same upper the same way."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import mounts

OVERRIDE = "user.containers.override_stat"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="builds root-owned layers, chowns")
pytestmark = [pytest.mark.fuse, needs_root]


def _xattr(p) -> bytes | None:
    try:
        return os.getxattr(p, OVERRIDE, follow_symlinks=False)
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return None


def _owner(p) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


# --- as root ----------------------------------------------------------------------------------


@pytest.fixture
def root_stack(tmp_path: Path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    (lower / "root_file").write_bytes(b"r\n")
    (lower / "u5").write_bytes(b"5\n")
    os.chown(lower / "u5", 5, 6)
    (lower / "u50").write_bytes(b"50\n")
    os.chown(lower / "u50", 50, 50)
    (lower / "shared").mkdir(mode=0o777)
    os.chmod(lower / "shared", 0o777)
    return tmp_path, lower, upper


def test_root_mount_presents_mapped_owners(root_stack):
    base, lower, upper = root_stack
    opts = ["uidmapping=0:1000:10", "gidmapping=0:2000:10"]
    with mounts.PyoverlayMount([lower], base / "m", upper=upper, options=opts) as m:
        m = m.path
        assert _owner(m / "root_file") == (1000, 2000)
        assert _owner(m / "u5") == (1005, 2006)
        assert _owner(m / "u50") == (65534, 65534)  # stored ids outside every range: overflow
        assert {e.name: (e.stat(follow_symlinks=False).st_uid) for e in os.scandir(m)} == {
            "root_file": 1000,
            "u5": 1005,
            "u50": 65534,
            "shared": 1000,
        }
        # requests carry presented ids: chown writes stored ones, as root really (no override)
        os.chown(m / "root_file", 1003, 2004)
        assert _owner(m / "root_file") == (1003, 2004)
        assert _owner(upper / "root_file") == (3, 4) and _xattr(upper / "root_file") is None
        assert _errno(os.chown, m / "u5", 5, -1) == errno.EINVAL  # no stored counterpart
        assert _errno(os.chown, m / "u5", -1, 1500) == errno.EINVAL
        # a caller whose ids are unmapped cannot create; a mapped one creates its stored ids
        assert _errno(os.mkdir, m / "shared" / "byroot") == errno.EINVAL
        fd = os.open(m / "shared", os.O_PATH | os.O_DIRECTORY)  # tmp_path is root's alone
        try:
            r = subprocess.run(
                ["setpriv", "--reuid=1002", "--regid=2002", "--clear-groups", "--", "touch", f"/proc/self/fd/{fd}/new"],
                capture_output=True,
                text=True,
                pass_fds=(fd,),
            )
        finally:
            os.close(fd)
        assert r.returncode == 0, r.stderr
        assert _owner(m / "shared" / "new") == (1002, 2002)
        assert _owner(upper / "shared" / "new") == (2, 2) and _xattr(upper / "shared" / "new") is None
        assert _xattr(upper) is None  # root never needs the override
        # the override xattr is the overlay's: neither listed, readable nor settable
        assert OVERRIDE not in os.listxattr(m / "root_file")
        assert _errno(os.setxattr, m / "root_file", OVERRIDE, b"0:0:04755") == errno.EPERM
        assert _errno(os.getxattr, m / "root_file", OVERRIDE) == errno.ENODATA


def test_root_mount_honours_a_lower_override(tmp_path: Path):
    """A lower layer whose root carries the override (an upper written without root) shows
    its recorded owners; a copy-up as root chowns to them and drops the override."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    f = lower / "f"
    f.write_bytes(b"data\n")
    os.chmod(f, 0o644)
    os.setxattr(f, OVERRIDE, b"7:8:0600")
    os.setxattr(lower, OVERRIDE, b"0:0:0755")
    with mounts.PyoverlayMount([lower], tmp_path / "m", upper=upper) as m:
        st = os.lstat(m.path / "f")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (7, 8, 0o600)
        os.utime(m.path / "f", ns=(0, 0))  # copy-up
        st = os.lstat(upper / "f")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (7, 8, 0o600)
        assert _xattr(upper / "f") is None
        assert _owner(m.path / "f") == (7, 8)


def test_root_mount_ignores_overrides_in_a_users_layer(tmp_path: Path):
    """A layer owned by another user is not believed: its owner could otherwise show a
    file of theirs as a set-uid root program to a root mount. Once root owns the layer's
    root (root vouches for it), the same override is honoured."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    f = lower / "prog"
    f.write_bytes(b"#!/bin/sh\n")
    os.chmod(f, 0o4755)
    os.chown(f, 1001, 1001)
    os.chmod(f, 0o4755)
    os.setxattr(f, OVERRIDE, b"0:0:04755")
    os.setxattr(lower, OVERRIDE, b"0:0:0755")
    os.chown(lower, 1001, 1001)
    with mounts.PyoverlayMount([lower], tmp_path / "m", upper=upper) as m:
        st = os.lstat(m.path / "prog")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1001, 1001, 0o4755)  # the disk's
    os.chown(lower, 0, 0)
    with mounts.PyoverlayMount([lower], tmp_path / "m2", upper=upper) as m:
        st = os.lstat(m.path / "prog")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o4755)


# --- as the ordinary user (the case) -----------------------------------------------------


@pytest.fixture
def user_stack(user):
    lower = user.dir / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "file").write_bytes(b"image file\n")
    (lower / "dir" / "sub").write_bytes(b"sub\n")
    os.chmod(lower / "dir", 0o755)  # made by root, readable by all
    upper, merged = user.mkdirs("upper", "merged")
    return user, lower, upper, merged


def _in_userns(user, script: str) -> str:
    r = user.run(["unshare", "--user", "--map-root-user", "sh", "-ec", script])
    assert r.returncode == 0, r.stderr
    return r.stdout


def _mount(user, *args):
    r = user.pyoverlay("mount", *map(str, args))
    assert r.returncode == 0, r.stderr


def _umount(user, merged):
    r = user.pyoverlay("umount", str(merged))
    assert r.returncode == 0, r.stderr


def test_rootless_map_shows_root_owned_image_as_root(user_stack):
    user, lower, upper, merged = user_stack
    umap = f"0:{user.uid}:1"
    gmap = f"0:{user.gid}:1"
    _mount(user, lower, upper, merged)  # no map first: root's files are unmapped in the userns
    try:
        assert _in_userns(user, f"stat -c '%u %g' {merged}/file").split() == ["65534", "65534"]
    finally:
        _umount(user, merged)

    _mount(user, "--uidmap", umap, "--gidmap", gmap, lower, upper, merged)
    try:
        out = _in_userns(
            user,
            f"""
            cd {merged}
            stat -c '%u %g' file dir dir/sub
            echo hi > dir/new; mkdir dir/newdir; echo more >> file; chmod 0640 dir/new
            stat -c '%u %g %a' dir/new dir/newdir file
        """,
        )
        assert out.splitlines() == ["0 0", "0 0", "0 0", "0 0 640", "0 0 755", "0 0 644"]
        assert _in_userns(user, f"id -u; stat -c '%u' {merged}/dir/new").split() == ["0", "0"]
    finally:
        _umount(user, merged)
    # on disk: the user's, with the override recording root
    for rel, mode in (("dir/new", "0640"), ("dir/newdir", "0755"), ("file", "0644"), ("dir", "0755")):
        assert _owner(upper / rel) == (user.uid, user.gid), rel
        assert _xattr(upper / rel) == f"0:0:{mode}".encode(), rel
    assert _xattr(upper) == f"{user.uid}:{user.gid}:0755".encode()  # marks the layer

    # a remount shows the same owners
    _mount(user, "--uidmap", umap, "--gidmap", gmap, lower, upper, merged)
    try:
        out = _in_userns(user, f"cd {merged}; stat -c '%n %u %g %a' dir/new dir/newdir file dir")
    finally:
        _umount(user, merged)
    assert out.splitlines() == ["dir/new 0 0 640", "dir/newdir 0 0 755", "file 0 0 644", "dir 0 0 755"]

    # fuse-overlayfs with the same mapping reads the same owners from this upper
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("fuse-overlayfs not installed")
    fwork, fmnt = user.mkdirs("fwork", "fmnt")
    r = user.run(
        [
            "fuse-overlayfs",
            "-o",
            f"lowerdir={lower},upperdir={upper},workdir={fwork},uidmapping={umap},gidmapping={gmap}",
            str(fmnt),
        ]
    )
    assert r.returncode == 0, r.stderr
    try:
        fout = _in_userns(user, f"cd {fmnt}; stat -c '%n %u %g %a' dir/new dir/newdir file dir")
    finally:
        user.run(["fusermount3", "-u", str(fmnt)])
    assert fout == out
