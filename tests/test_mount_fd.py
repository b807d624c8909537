"""Serving a /dev/fuse fd that the caller has already mounted (``MountConfig.fuse_fd``), as
the rootless runner does inside a user namespace: here root opens /dev/fuse and calls
mount(2) itself with ``fd=N``, then ``start_background`` serves that fd (libfuse's
``/dev/fd/N`` mountpoint). The server neither mounts nor unmounts; it exits when the mount
goes away (umount: the fd reads ENODEV) and on SIGTERM, leaving the mount to its owner."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import os
import signal
import time

import pytest

from helpers import mounts
from overlayfs_py.config import ConfigError, MountConfig, validate
from overlayfs_py.mount import start_background

pytestmark = pytest.mark.needs_root

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount_fuse(fd: int, target: str) -> None:
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    if _libc.mount(b"pyoverlay", target.encode(), b"fuse.pyoverlay", 0, opts.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _wait_exit(pid: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"server {pid} did not exit within {timeout}s")


@pytest.fixture
def layout(tmp_path):
    lo, up, wk, mnt = (tmp_path / n for n in ("lo", "up", "wk", "mnt"))
    for d in (lo, up, wk, mnt):
        d.mkdir()
    (lo / "a").write_text("lower\n")
    (lo / "d").mkdir()
    (lo / "d" / "b").write_text("b\n")
    yield lo, up, wk, mnt
    if mounts.is_mounted(mnt):
        _umount(str(mnt), 2)  # MNT_DETACH


def _start(lo, up, wk, mnt, tmp_path):
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)  # the fork keeps it; no exec
    try:
        _mount_fuse(fd, str(mnt))
        cfg = MountConfig(lowerdirs=(str(lo),), upperdir=str(up), workdir=str(wk), mountpoint=str(mnt), fuse_fd=fd)
        engine = os.environ.get(mounts.ENGINE_ENV)  # PYOVERLAY_ENGINE, as for the CLI's mounts
        if engine:
            cfg = dataclasses.replace(cfg, engine=engine)
        validate(cfg)  # must not stat the mountpoint: nobody serves it yet
        pid = start_background(cfg, logfile=str(tmp_path / "server.log"))
    finally:
        os.close(fd)  # the server holds its own copy
    return pid


def test_serves_a_mounted_fd_and_exits_on_umount(layout, tmp_path):
    lo, up, wk, mnt = layout
    pid = _start(lo, up, wk, mnt, tmp_path)
    try:
        assert (mnt / "a").read_text() == "lower\n"
        (mnt / "a").write_text("upper\n")  # copy-up
        os.unlink(mnt / "d" / "b")  # whiteout
        assert sorted(os.listdir(mnt)) == ["a", "d"] and os.listdir(mnt / "d") == []
        assert (up / "a").read_text() == "upper\n"
        assert os.stat(up / "d" / "b").st_rdev == 0
        assert mounts.mount_entry(mnt).fstype == "fuse.pyoverlay"
    finally:
        _umount(str(mnt))
    assert _wait_exit(pid) == 0
    assert not mounts.is_mounted(mnt)
    assert (lo / "a").read_text() == "lower\n"


def test_sigterm_ends_the_server_but_leaves_the_mount_to_its_owner(layout, tmp_path):
    lo, up, wk, mnt = layout
    pid = _start(lo, up, wk, mnt, tmp_path)
    assert (mnt / "a").read_text() == "lower\n"
    os.kill(pid, signal.SIGTERM)
    assert _wait_exit(pid) == 0
    # the server did not unmount what it did not mount; with its fd closed the
    # connection is gone, so the mount answers ENOTCONN until its owner removes it
    assert mounts.is_mounted(mnt)
    with pytest.raises(OSError) as exc:
        os.stat(mnt / "a")
    assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    _umount(str(mnt))


def test_a_fuse_fd_must_be_dev_fuse(tmp_path):
    r, w = os.pipe()
    try:
        for d in ("lo", "mnt"):
            (tmp_path / d).mkdir()
        cfg = MountConfig(
            lowerdirs=(str(tmp_path / "lo"),), upperdir=None, workdir=None, mountpoint=str(tmp_path / "mnt"), fuse_fd=r
        )
        with pytest.raises(ConfigError, match=f"fuse_fd {r} is not an open /dev/fuse descriptor"):
            validate(cfg)
    finally:
        os.close(r)
        os.close(w)
