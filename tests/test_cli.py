"""The command line end to end: the kernel's -o spelling, background mount + umount,
--debug logging requests, and the server exiting once its mount is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import mounts
from overlayfs_py.unmount import try_unmount

pytestmark = [pytest.mark.fuse]

REPO = Path(__file__).resolve().parent.parent


def _cli(*args, check=True):
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", *map(str, args)],
        cwd=REPO,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def _layers(tmp_path):
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "f").write_bytes(b"lower\n")
    return lower, upper, work, mnt


def test_kernel_option_spelling_background_mount_and_umount(tmp_path):
    lower, upper, work, mnt = _layers(tmp_path)
    r = _cli("mount", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mnt)
    try:
        assert r.returncode == 0, r.stderr
        assert mounts.is_mounted(mnt)  # live as soon as the command returned
        (mnt / "f").write_bytes(b"changed\n")
    finally:
        u = _cli("umount", mnt, check=False)
        if mounts.is_mounted(mnt):
            mounts.force_unmount(mnt)
    assert u.returncode == 0, u.stderr
    assert not mounts.is_mounted(mnt)
    assert (upper / "f").read_bytes() == b"changed\n"
    assert (lower / "f").read_bytes() == b"lower\n"


def test_debug_logs_requests(tmp_path):
    lower, upper, work, mnt = _layers(tmp_path)
    log = tmp_path / "server.log"
    with mounts.PyoverlayMount(
        [lower],
        mnt,
        upper,
        work,
        options=(),
        log_path=log,
    ):
        pass
    quiet = log.read_text()
    argv = mounts.pyoverlay_argv([lower], mnt, upper, work) + ["--debug"]
    with open(tmp_path / "debug.log", "w") as out:
        p = subprocess.Popen(argv, cwd=REPO, env=mounts.pyoverlay_env(), stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not mounts.is_mounted(mnt):
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "debug.log").read_text()
            time.sleep(0.05)
        os.stat(mnt / "f")
    finally:
        try_unmount(str(mnt))
        p.wait(timeout=20)
    text = (tmp_path / "debug.log").read_text()
    assert "lookup" in text and "b'f'" in text, text[-2000:]
    assert "lookup" not in quiet


def test_server_exits_when_its_mount_vanishes(tmp_path):
    lower, upper, work, mnt = _layers(tmp_path)
    argv = mounts.pyoverlay_argv([lower], mnt, upper, work)
    p = subprocess.Popen(
        argv, cwd=REPO, env=mounts.pyoverlay_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while not mounts.is_mounted(mnt):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        subprocess.run(["umount", "-l", str(mnt)], check=True)  # not through pyoverlay
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if mounts.is_mounted(mnt):
            mounts.force_unmount(mnt)
