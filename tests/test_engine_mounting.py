"""How a pyoverlay server's FUSE connection ends, on the direct engine (overlayfs_py/fuse/
mounting.py) and, where the engines agree, on pyfuse3 too.

* A fusectl abort (``echo 1 > /sys/fs/fuse/connections/N/abort``) ends the server at once
  (exit 0, its reason in the log, no state record left); the dead mount (ENOTCONN) stays,
  as libfuse leaves it, until ``pyoverlay umount`` removes it.
* A server killed with SIGKILL leaves a dead mount that ``pyoverlay umount`` removes.
* A server told to stop (SIGTERM) unmounts its own mount, never a mount stacked on the
  mountpoint since.
* The request loop ends on DESTROY as on ENODEV: the kernel has ended the connection, so
  nothing is unmounted afterwards (on a socket, no kernel).
Rootless mounts (fusermount3, a user namespace): tests/rootless/test_mount_direct.py.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys

import pytest
import trio

from helpers import mounts
from overlayfs_py.config import MountConfig
from overlayfs_py.fuse import mounting
from overlayfs_py.fuse import proto as p
from overlayfs_py.fuse.session import Session

ENGINES = ("direct", "pyfuse3")


def _layout(tmp_path):
    lo, up, wk, mnt = (tmp_path / n for n in ("lo", "up", "wk", "mnt"))
    for d in (lo, up, wk, mnt):
        d.mkdir()
    (lo / "a").write_text("lower\n")
    return lo, up, wk, mnt


def _cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=mounts.pyoverlay_env(),
        cwd=mounts.REPO_ROOT,
        timeout=timeout,
    )


def _records(state_dir) -> list[str]:
    return [n for n in os.listdir(state_dir) if n.endswith(".json")] if os.path.isdir(state_dir) else []


def _dead(path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("engine", ENGINES)
def test_fusectl_abort_ends_the_server(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path / "state"))
    lo, up, wk, mnt = _layout(tmp_path)
    log = tmp_path / "server.log"
    with mounts.PyoverlayMount([lo], mnt, up, wk, options=[f"engine={engine}"], log_path=log) as m:
        assert (mnt / "a").read_text() == "lower\n"
        assert len(_records(tmp_path / "state")) == 1
        assert mounts.abort_fuse_connection(mnt)
        try:
            rc = m.proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {engine} server did not end after the abort:\n{m.log_tail()}")
        assert rc == 0, m.log_tail()
        assert _records(tmp_path / "state") == []  # no stale record
        # the dead mount stays (as libfuse leaves it) until it is unmounted
        assert mounts.is_mounted(mnt) and _dead(mnt / "a")
        if engine == "direct":
            assert f"the FUSE connection of {mnt} was aborted" in log.read_text()
        r = _cli("umount", mnt)
        assert r.returncode == 0, r.stderr
        assert not mounts.is_mounted(mnt)


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("engine", ENGINES)
def test_sigkill_leaves_a_dead_mount_that_umount_removes(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path / "state"))
    lo, up, wk, mnt = _layout(tmp_path)
    with mounts.PyoverlayMount([lo], mnt, up, wk, options=[f"engine={engine}"], log_path=tmp_path / "log") as m:
        assert (mnt / "a").read_text() == "lower\n"
        records = list((tmp_path / "state").iterdir())
        assert records, "the mount has no record"
        m.proc.kill()
        m.proc.wait(20)
        assert mounts.is_mounted(mnt) and _dead(mnt / "a")
        r = _cli("umount", mnt)
        assert r.returncode == 0, r.stderr
        assert not mounts.is_mounted(mnt)
        # the killed server's record went with its mount
        assert not any(p.exists() for p in records), records


@pytest.mark.kernel
@pytest.mark.fuse
def test_sigterm_never_unmounts_a_mount_stacked_on_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path / "state"))
    lo, up, wk, mnt = _layout(tmp_path)
    log = tmp_path / "server.log"
    with mounts.PyoverlayMount([lo], mnt, up, wk, options=["engine=direct"], log_path=log) as m:
        assert (mnt / "a").read_text() == "lower\n"
        subprocess.run(["mount", "-t", "tmpfs", "stacked", str(mnt)], check=True)
        try:
            (mnt / "mine").write_text("on top\n")
            m.proc.send_signal(signal.SIGTERM)
            assert m.proc.wait(20) == 0, m.log_tail()
            # the tmpfs mounted on top since is still there: the server left it alone
            row = mounts.mount_entry(mnt)
            assert row is not None and row.fstype == "tmpfs", row
            assert (mnt / "mine").read_text() == "on top\n"
            assert "no longer our mount" in log.read_text()
        finally:
            if (row := mounts.mount_entry(mnt)) is not None and row.fstype == "tmpfs":
                subprocess.run(["umount", str(mnt)], check=True)
        # ours, under it, is dead (its server is gone); PyoverlayMount removes it
        assert mounts.mount_entry(mnt).fstype == "fuse.pyoverlay"


def test_destroy_ends_the_session_as_the_kernels_end():
    """DESTROY comes when the kernel tears the superblock down: the mount is gone already,
    so the server must not unmount its path afterwards (that would remove a mount under it)."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:

        class NoOps:
            sync: dict = {}
            asyncs: dict = {}

        class NoTracer:
            def emit(self, *a, **k):
                pass

        s = Session(ours.fileno(), NoOps(), NoTracer())  # type: ignore[arg-type]
        kernel.send(p.IN_HEADER.pack(p.IN_HEADER.size, p.DESTROY, 7, 1, 0, 0, 1, 0, 0))
        trio.run(s.run)
        assert p.OUT_HEADER.unpack(kernel.recv(4096)) == (16, 0, 7)
        assert s.ended_by_kernel and s.end_reason == "destroy"
    finally:
        ours.close()
        kernel.close()


def test_fusermount_options_are_what_fusermount3_accepts():
    cfg = MountConfig(lowerdirs=("/l",), upperdir=None, workdir=None, mountpoint="/m", fsname="a,b\\c")
    opts = mounting.fusermount_options(cfg)
    assert opts.startswith("fsname=a\\,b\\\\c,subtype=pyoverlay,")  # escaped as libfuse does
    assert "allow_other" not in opts and "fd=" not in opts and "suid" not in opts
    other = MountConfig(lowerdirs=("/l",), upperdir=None, workdir=None, mountpoint="/m", allow_other=True)
    assert "allow_other" in mounting.fusermount_options(other).split(",")


@pytest.mark.needs_root
def test_a_given_fd_is_never_unmounted(tmp_path):
    fm = mounting.FuseMount(fd=-1, mountpoint=str(tmp_path), how=mounting.GIVEN)
    assert not fm.owned
    before = mounts.mount_entry(tmp_path)
    subprocess.run(["mount", "-t", "tmpfs", "given", str(tmp_path)], check=True)
    try:
        mounting.unmount_fuse(fm, ended_by_kernel=False)
        row = mounts.mount_entry(tmp_path)
        assert row is not None and row.fstype == "tmpfs"
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)
    assert mounts.mount_entry(tmp_path) == before
