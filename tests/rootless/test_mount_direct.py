"""The direct engine (``-o engine=direct``) mounting without root (overlayfs_py/fuse/mounting.py).

* An ordinary user: the setuid ``fusermount3`` mounts (``_FUSE_COMMFD``, the /dev/fuse fd
  sent back over SCM_RIGHTS) with the options the pyfuse3 engine's libfuse gives it, and a
  server told to stop (SIGTERM) unmounts through ``fusermount3 -u -z`` (umount2 is root's).
* Root of a user namespace with a mount namespace of its own (as podman runs a mount
  program rootless): mount(2) with ``fd=N`` directly, no fusermount3; the mount lives in
  that mount namespace only and its server runs in that user namespace.

The other rootless mount tests run on both engines: scripts/test runs the suite once per
engine (``PYOVERLAY_ENGINE``; tests/helpers/rootless.py passes it to the user's commands).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from helpers import mounts
from helpers.rootless import VENV_BIN
from overlayfs_py.procfs import process_start_time

#: the rootless mount tests (no containers) run again on the direct engine


def _layout(user):
    lo, up, wk, mnt = user.mkdirs("lo", "up", "wk", "mnt")
    (lo / "a").write_text("lower\n")
    (lo / "d").mkdir()
    (lo / "d" / "b").write_text("b\n")
    user.chown_tree(lo)
    return lo, up, wk, mnt


def _wait_gone(pid: int, timeout: float = 20) -> bool:
    """Whether *pid* exits (or is a zombie) within *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_start_time(pid) is None:
            return True
        time.sleep(0.02)
    return False


def _server_pid(user, mnt) -> int:
    (record,) = [p for p in user.state_dir.iterdir() if p.suffix == ".json"]
    data = json.loads(record.read_text())
    assert data["mountpoint"] == str(mnt), data
    return data["pid"]


def test_fusermount3_mount_and_sigterm_unmount(user):
    lo, up, wk, mnt = _layout(user)
    log = user.dir / "server.log"
    r = user.pyoverlay("mount", "-o", "engine=direct", "--log", log, "--workdir", wk, lo, up, mnt)
    assert r.returncode == 0, r.stderr
    try:
        row = mounts.mount_entry(mnt)
        assert row is not None and row.fstype == "fuse.pyoverlay" and row.source == "pyoverlay"
        # what fusermount3 makes of the options (the pyfuse3 engine's libfuse passes the same)
        assert {"nosuid", "nodev"} <= set(row.options.split(","))
        assert f"user_id={user.uid}" in row.super_options and "default_permissions" in row.super_options
        assert "allow_other" not in row.super_options  # not asked for
        r = user.sh(f"cat {mnt}/a && echo new > {mnt}/n && rm {mnt}/d/b && ls -A {mnt}/d")
        assert r.returncode == 0 and r.stdout == "lower\n", (r.stdout, r.stderr)
        assert (up / "n").read_text() == "new\n" and os.stat(up / "d" / "b").st_rdev == 0
        pid = _server_pid(user, mnt)
        text = log.read_text()
        assert "with fusermount3" in text and "direct engine: INIT" in text, text
        os.kill(pid, signal.SIGTERM)
        assert _wait_gone(pid), "the server did not exit on SIGTERM"
        # the server unmounted its own mount (as the user: fusermount3 -u -z)
        assert not mounts.is_mounted(mnt), log.read_text()
        assert not any(p.suffix == ".json" for p in user.state_dir.iterdir())
    finally:
        if mounts.is_mounted(mnt):
            user.pyoverlay("umount", mnt)


def test_fusermount3_refusal_is_one_line(user):
    lo, up, wk, mnt = _layout(user)
    os.chown(mnt, 0, 0)  # fusermount3 refuses a mountpoint the user cannot write to
    r = user.pyoverlay("mount", "-o", "engine=direct", "--workdir", wk, lo, up, mnt)
    if r.returncode == 0:
        user.pyoverlay("umount", mnt)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert "fusermount3" in r.stderr and "no write access to mountpoint" in r.stderr, r.stderr  # its reason
    assert not mounts.is_mounted(mnt)


#: run as the user: unshare a user and a mount namespace (ctypes: Python 3.11 has no
#: os.unshare), become root there, mount with the direct engine, use the mount, report,
#: wait for the test's go, unmount, wait for the server's exit
_IN_USERNS = r"""
import ctypes, json, os, subprocess, sys
from overlayfs_py.mountinfo import is_mounted
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x10000000, 0x00020000, 0x4000, 1 << 18
uid, gid = os.getuid(), os.getgid()
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
    sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
    sys.exit(f"mount --make-rprivate /: {os.strerror(ctypes.get_errno())}")
pyoverlay, lo, up, wk, mnt, log = sys.argv[1:7]
r = subprocess.run([pyoverlay, "mount", "-o", "engine=direct", "--log", log, "--workdir", wk, lo, up, mnt],
                   capture_output=True, text=True)
if r.returncode != 0:
    sys.exit("mount: " + r.stderr)
with open(os.path.join(mnt, "a")) as f:
    a = f.read()
with open(os.path.join(mnt, "new"), "w") as f:
    f.write("new\n")
os.unlink(os.path.join(mnt, "d", "b"))
rec = [n for n in os.listdir(os.environ["PYOVERLAY_STATE_DIR"]) if n.endswith(".json")]
with open(os.path.join(os.environ["PYOVERLAY_STATE_DIR"], rec[0])) as f:
    pid = json.load(f)["pid"]
print(json.dumps({"a": a, "d": os.listdir(os.path.join(mnt, "d")), "pid": pid,
                  "euid": os.geteuid(), "mounted": is_mounted(mnt)}),
      flush=True)
sys.stdin.readline()
r = subprocess.run([pyoverlay, "umount", mnt], capture_output=True, text=True)
if r.returncode != 0:
    sys.exit("umount: " + r.stderr)
print(json.dumps({"mounted": is_mounted(mnt),
                  "server_alive": os.path.exists(f"/proc/{pid}")}), flush=True)
"""


def test_user_namespace_root_mounts_with_mount2(user):
    lo, up, wk, mnt = _layout(user)
    log = user.dir / "server.log"
    script = user.dir / "in_userns.py"
    script.write_text(_IN_USERNS)
    argv = user.argv([VENV_BIN / "python", script, VENV_BIN / "pyoverlay", lo, up, wk, mnt, log])
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=user.dir,
        env=user.env(),
    )
    try:
        line = proc.stdout.readline()
        assert line, f"the namespace child failed: {proc.stderr.read()}"
        seen = json.loads(line)
        assert seen["euid"] == 0 and seen["mounted"], seen
        assert seen["a"] == "lower\n" and seen["d"] == [], seen
        assert (up / "new").read_text() == "new\n" and os.stat(up / "d" / "b").st_rdev == 0
        assert os.stat(up / "new").st_uid == user.uid  # uid 0 there is the user here
        pid = seen["pid"]
        # the server runs in the user namespace (root there, the user here), and its
        # mount lives in the namespace's mount namespace only
        assert os.stat(f"/proc/{pid}").st_uid == user.uid
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert not mounts.is_mounted(mnt)
        text = log.read_text()
        assert "with mount(2)" in text and "fusermount3" not in text, text  # no setuid helper
        out, err = proc.communicate("go\n", timeout=60)
        assert proc.returncode == 0, err
        after = json.loads(out.strip().splitlines()[-1])
        assert after == {"mounted": False, "server_alive": False} or (not after["mounted"] and _wait_gone(pid)), after
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


#: run as the user: a holder child unshares a user and a mount namespace, mounts FUSE
#: there with mount(2) and hands the fd out (the rootless runner's arrangement); the
#: server, started here outside both namespaces, serves the fd; the holder uses the mount,
#: then exits without unmounting: its mount namespace goes, and the server must end
_HANDED_IN = r"""
import ctypes, json, os, socket, sys, time
from overlayfs_py.config import MountConfig
from overlayfs_py.mount import start_background
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 0x10000000, 0x20000, 0x4000, 1 << 18, 2, 4
lo, up, wk, mnt, log = sys.argv[1:6]
ours, theirs = socket.socketpair()
uid, gid = os.getuid(), os.getgid()
holder = os.fork()
if holder == 0:
    ours.close()
    try:
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "make-rprivate")
        fd = os.open("/dev/fuse", os.O_RDWR)
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
        if libc.mount(b"pyoverlay", mnt.encode(), b"fuse.pyoverlay", MS_NOSUID | MS_NODEV, opts.encode()) != 0:
            raise OSError(ctypes.get_errno(), "mount")
        socket.send_fds(theirs, [b"fd"], [fd])
        os.close(fd)
        theirs.recv(3)  # "use"
        with open(os.path.join(mnt, "a")) as f:
            a = f.read()
        with open(os.path.join(mnt, "new"), "w") as f:
            f.write("new\n")
        os.unlink(os.path.join(mnt, "d", "b"))
        theirs.sendall(json.dumps({"a": a, "d": os.listdir(os.path.join(mnt, "d"))}).encode() + b"\n")
        theirs.recv(4)  # "exit": leave without unmounting
    except BaseException as e:
        theirs.sendall(json.dumps({"error": repr(e)}).encode() + b"\n")
    os._exit(0)
theirs.close()
_msg, fds, _f, _a = socket.recv_fds(ours, 16, 1)
if not fds:
    sys.exit("the holder failed: " + _msg.decode(errors="replace"))
# the user's files are root's in the namespace (stored uid, presented 0), as the runner maps them
maps = {"uidmap": ((uid, 0, 1),), "gidmap": ((gid, 0, 1),)}
cfg = MountConfig(lowerdirs=(lo,), upperdir=up, workdir=wk, mountpoint=mnt, fuse_fd=fds[0], engine="direct", **maps)
server = start_background(cfg, logfile=log)
os.close(fds[0])
ours.sendall(b"use")
seen = json.loads(ours.makefile().readline())
print(json.dumps({"seen": seen, "server": server, "holder": holder}), flush=True)
sys.stdin.readline()
ours.sendall(b"exit")
os.waitpid(holder, 0)
deadline = time.monotonic() + 20
status = None
while time.monotonic() < deadline:
    done, st = os.waitpid(server, os.WNOHANG)
    if done:
        status = os.waitstatus_to_exitcode(st)
        break
    time.sleep(0.02)
print(json.dumps({"server_exit": status}), flush=True)
"""


def test_a_fd_mounted_in_a_user_namespace_is_served_from_outside(user):
    lo, up, wk, mnt = _layout(user)
    log = user.dir / "server.log"
    script = user.dir / "handed_in.py"
    script.write_text(_HANDED_IN)
    argv = user.argv([VENV_BIN / "python", script, lo, up, wk, mnt, log])
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=user.dir,
        env=user.env(),
    )
    try:
        line = proc.stdout.readline()
        assert line, f"the script failed: {proc.stderr.read()}"
        out = json.loads(line)
        assert out["seen"] == {"a": "lower\n", "d": []}, out
        assert (up / "new").read_text() == "new\n" and os.stat(up / "d" / "b").st_rdev == 0
        server, holder = out["server"], out["holder"]
        # the mount is the holder's (its namespaces); the server runs outside them, here
        assert os.readlink(f"/proc/{holder}/ns/user") != os.readlink("/proc/self/ns/user")
        assert os.readlink(f"/proc/{server}/ns/user") == os.readlink("/proc/self/ns/user")
        assert os.readlink(f"/proc/{server}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
        assert not mounts.is_mounted(mnt)
        assert "direct engine: INIT" in log.read_text()
        rest, err = proc.communicate("go\n", timeout=60)
        assert proc.returncode == 0, err
        # the holder left without unmounting: its mount went with its namespace, and the
        # server ended by itself (exit 0), having unmounted nothing
        assert json.loads(rest.strip().splitlines()[-1]) == {"server_exit": 0}, log.read_text()
        assert "the kernel ended the connection" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
