"""Self-tests of the harness (snapshot/diff, stack builders) and the parts of
pyoverlay's CLI contract the harness relies on (foreground server unmounts
on SIGTERM; background mount returns once live; ``umount`` waits)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import mounts
from helpers.snapshot import diff_snapshots, raw_readdir, snapshot
from helpers.stacks import CHR, FIFO, OPQ, T0, WH, XWH, D, F, H, L, build_layer
from overlayfs_py import procfs

pytestmark = [pytest.mark.needs_root]


def test_snapshot_records_and_diff_reports(tmp_path):
    spec = {
        "f": F(b"data", mode=0o640, uid=12, gid=34, mtime_ns=T0, xattrs={"user.k": b"v"}),
        "d": D(mode=0o711),
        "d/h": H("f"),
        "s": L(b"target\xff"),
        "p": FIFO(),
        "c": CHR(1, 3),
        "w": WH(),
        "x": XWH(),
        "o": OPQ(),
    }
    a = build_layer(tmp_path / "a", spec)
    s = snapshot(a)
    e = s["entries"]
    assert e["f"]["mode"] == 0o100640 and (e["f"]["uid"], e["f"]["gid"]) == (12, 34)
    assert e["f"]["mtime_ns"] == T0 and e["f"]["nlink"] == 2
    assert e["f"]["xattrs"] == {"user.k": b"v"}
    assert e["s"]["target"] == b"target\xff"
    assert e["c"]["rdev"] == (1, 3) and e["w"]["rdev"] == (0, 0) and e["w"]["mode"] == 0o20000
    assert e["x"]["xattrs"] == {"trusted.overlay.whiteout": b""} and e["x"]["size"] == 0
    assert e["o"]["xattrs"] == {"trusted.overlay.opaque": b"y"}
    assert ("d/h", "f") in s["hardlinks"]
    assert e["d"]["dot_d_ino"] == e["d"]["ino"] and e["d"]["dotdot_d_ino"] == e["."]["ino"]
    assert not s["problems"]

    spec2 = dict(spec)
    spec2["f"] = F(b"DATA", mode=0o600, uid=12, gid=34, mtime_ns=T0, xattrs={"user.k": b"w"})
    spec2["new"] = F(b"")
    b = build_layer(tmp_path / "b", spec2)
    d = diff_snapshots(
        snapshot(a),
        snapshot(b),
        a_name="A",
        b_name="B",
        ignore_keys=("ino", "d_ino", "ctime_ns", "dot_d_ino", "dotdot_d_ino", "mtime_ns"),
    )
    text = "\n".join(d)
    assert "only in B: 'new'" in text
    assert "'f': mode: A=0o100640 B=0o100600" in text
    assert "'f': xattr 'user.k': A=b'v' B=b'w'" in text
    assert "'f': sha256" in text


def test_raw_readdir_lists_dots(tmp_path):
    (tmp_path / "x").write_bytes(b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = sorted(n for n, _, _ in raw_readdir(fd))
    finally:
        os.close(fd)
    assert names == [b".", b"..", b"x"]


def test_deep_layer_builder(tmp_path):
    comps = [b"c" * 200] * 19
    path = b"/".join(comps) + b"/" + b"f" * 200
    assert len(path) > 4000
    build_layer(tmp_path / "deep", {path: F(b"deep")})
    s = snapshot(tmp_path / "deep", xattrs=False)
    assert s["entries"][os.fsdecode(path)]["size"] == 4


# --------------------------------------------------------------------------
# the CLI contract the harness relies on (pyoverlay only)


def _need_pyoverlay():
    if mounts.subject_name() != "pyoverlay":
        pytest.skip("CLI contract tests need PYOVERLAY_TEST_SUBJECT=pyoverlay")


def _layers(tmp_path):
    l1 = build_layer(tmp_path / "l1", {"a": F(b"a\n")})
    l2 = build_layer(tmp_path / "l2", {"b": F(b"b\n")})
    return [l1, l2]


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.mark.fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_server_unmounts_on_signal(tmp_path, sig):
    _need_pyoverlay()
    m = mounts.PyoverlayMount(
        _layers(tmp_path),
        tmp_path / "mnt",
        upper=tmp_path / "u",
        workdir=tmp_path / "w",
        log_path=tmp_path / "server.log",
    )
    (tmp_path / "u").mkdir()
    (tmp_path / "w").mkdir()
    with m:
        assert sorted(os.listdir(m.path)) == ["a", "b"]
        m.proc.send_signal(sig)
        exited = _wait(lambda: m.proc.poll() is not None, 15)
        still = mounts.is_mounted(m.path)
        rc = m.proc.returncode
    assert exited, f"server still running 15 s after {sig.name}\n{m.log_tail()}"
    assert not still, f"still mounted after the server exited on {sig.name}\n{m.log_tail()}"
    assert rc == 0, f"exit status {rc} after {sig.name}\n{m.log_tail()}"


def _server_pids(mountpoint) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"overlayfs_py" in cmd and os.fsencode(str(mountpoint)) in cmd:
            out.append(int(d))
    return out


@pytest.mark.fuse
def test_background_mount_and_umount(tmp_path):
    _need_pyoverlay()
    lowers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = mounts.pyoverlay_argv(lowers, mnt, foreground=False)
    try:
        r = subprocess.run(
            argv,
            cwd=mounts.REPO_ROOT,
            env=mounts.pyoverlay_env(),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, f"mount exited {r.returncode}: {r.stderr}"
        assert mounts.is_mounted(mnt), "mount returned 0 but the mount is not live"
        assert sorted(os.listdir(mnt)) == ["a", "b"]
        pids = _server_pids(mnt)
        r = subprocess.run(
            [sys.executable, "-m", "pyoverlay_cli", "umount", str(mnt)],
            cwd=mounts.REPO_ROOT,
            env=mounts.pyoverlay_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, f"umount exited {r.returncode}: {r.stderr}"
        assert not mounts.is_mounted(mnt)
        alive = [p for p in pids if procfs.alive(p)]
        assert not alive, f"server(s) {alive} still running after umount returned"
    finally:
        if mounts.is_mounted(mnt):
            mounts.abort_fuse_connection(mnt)
            mounts.force_unmount(mnt)
        for pid in _server_pids(mnt):  # the daemon this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.fuse
def test_mount_failure_is_reported(tmp_path):
    _need_pyoverlay()
    m = mounts.PyoverlayMount(
        [tmp_path / "missing1", tmp_path / "missing2"],
        tmp_path / "mnt",
        log_path=tmp_path / "server.log",
        start_timeout=20,
    )
    with pytest.raises(mounts.MountError) as ei, m:
        pass
    assert "exited with status" in str(ei.value), str(ei.value)
    assert m.proc.returncode not in (0, None)
    assert not mounts.is_mounted(tmp_path / "mnt")
