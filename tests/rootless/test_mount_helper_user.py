"""``mount.fuse.pyoverlay`` as an ordinary user (docs/mounting.md): the setuid fusermount3
mounts, with the mount flags asked for (``noexec``, ``noatime``) beside the nosuid,nodev it
forces; ``pyoverlay mounts`` lists the user's mount from the user's own state dir; and
``fusermount3 -u`` (what containers/storage runs to unmount a mount program's mount) ends
the server and removes its record. (Root of a user namespace, podman's rootless case, is
tests/rootless/test_mount_direct.py's.)"""

from __future__ import annotations

import json
import time

from helpers import mounts
from helpers.rootless import VENV_BIN
from overlayfs_py.procfs import process_start_time


def _wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while process_start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_helper_as_an_ordinary_user(user):
    lo, up, wk, mnt = user.mkdirs("lo", "up", "wk", "mnt")
    (lo / "a").write_text("lower\n")
    user.chown_tree(lo)
    opts = f"lowerdir={lo},upperdir={up},workdir={wk},,volatile,noexec,noatime"
    r = user.run([VENV_BIN / "mount.fuse.pyoverlay", "-o", opts, mnt])
    assert r.returncode == 0, r.stderr
    try:
        row = mounts.mount_entry(mnt)
        assert row is not None and row.fstype == "fuse.pyoverlay"
        assert {"nosuid", "nodev", "noexec", "noatime"} <= set(row.options.split(",")), row.options
        r = user.sh(f"cat {mnt}/a && echo new > {mnt}/n")
        assert r.returncode == 0 and r.stdout == "lower\n", r.stderr
        r = user.pyoverlay("mounts", "--json")
        assert r.returncode == 0, r.stderr
        (listed,) = json.loads(r.stdout)
        assert listed["mountpoint"] == str(mnt) and listed["lowerdirs"] == [str(lo)] and listed["volatile"] is True
        pid = listed["pid"]
        r = user.run(["fusermount3", "-u", mnt])
        assert r.returncode == 0, r.stderr
        assert _wait_gone(pid), "the server did not exit after fusermount3 -u"
        assert not any(p.suffix == ".json" for p in user.state_dir.iterdir())
        assert (up / "n").read_text() == "new\n"
    finally:
        if mounts.is_mounted(mnt):
            user.pyoverlay("umount", mnt)
