"""``pyoverlay run`` as an ordinary user (docs/runner.md, "Rootless"): the container's
user namespace maps the user to root (with the /etc/subuid ranges through newuidmap, or
a single id), the FUSE connection belongs to that namespace, the server stays outside.

Every test runs the real thing as the user ``pyoverlay-test``: real namespaces, a real
FUSE mount, real newuidmap; the ``user`` fixture fails a test that leaves one of the
user's processes or mounts behind."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from helpers.rootless import busybox_image
from overlayfs_py.procfs import process_start_time

OVERRIDE = "user.containers.override_stat"
MAPS = ("subid", "single")


def _override(path) -> tuple[int, int] | None:
    try:
        raw = os.getxattr(path, OVERRIDE, follow_symlinks=False)
    except OSError:
        return None
    uid, gid, _mode = raw.decode().split(":")[:3]
    return int(uid), int(gid)


def _stored_owner(path) -> tuple[int, int]:
    """The owner pyoverlay recorded: the override xattr if any, else the disk owner."""
    st = os.lstat(path)
    return _override(path) or (st.st_uid, st.st_gid)


def _run(user, *args, mode="subid", **kw):
    return user.pyoverlay("run", "--userns-map", mode, *args, **kw)


def _is_whiteout(path) -> bool:
    st = os.lstat(path)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    try:
        return os.getxattr(path, "user.overlay.whiteout", follow_symlinks=False) is not None
    except OSError:
        return False


def _nothing_recorded(user) -> None:
    ps = user.pyoverlay("ps", "-a", "--json", check=True)
    assert json.loads(ps.stdout) == []


@pytest.mark.parametrize("mode", MAPS)
def test_run_root_image(user, mode):
    """A root-owned image: `id` says root, ps sees PID 1, a new file lands in upper owned by
    the user with 0:0 recorded, image files can be changed and deleted (whiteouts)."""
    img = busybox_image(user, "busybox", owned_by_user=False)
    (upper,) = user.mkdirs("upper")
    r = _run(
        user,
        "--rm",
        "--upper",
        upper,
        img,
        "sh",
        "-c",
        "id; ps -o pid,user,comm; echo new > /created; echo more >> /etc/motd; rm /etc/passwd;"
        " stat -c '%u:%g' / /bin/busybox /created",
        mode=mode,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("uid=0(root) gid=0(root)"), r.stdout
    assert any(line.split()[:2] == ["1", "root"] for line in out), r.stdout
    assert out[-3:] == ["0:0", "0:0", "0:0"], r.stdout
    created = upper / "created"
    st = os.lstat(created)
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
    assert _override(created) == (0, 0)
    assert created.read_text() == "new\n"
    assert (upper / "etc" / "motd").read_bytes().endswith(b"more\n")
    assert _is_whiteout(upper / "etc" / "passwd")
    assert (img / "etc" / "passwd").exists()  # the image is never written
    _nothing_recorded(user)


def test_run_user_image_chown_subid(user):
    """The user's own image shows the user as root; `chown 1:1` inside lands as the first
    subordinate id, recorded in the override (the server cannot chown to it)."""
    img = busybox_image(user, "busybox", owned_by_user=True)
    (upper,) = user.mkdirs("upper")
    r = _run(
        user,
        "--rm",
        "--upper",
        upper,
        img,
        "sh",
        "-c",
        "touch /mine /f && chown 1:1 /f && stat -c '%u:%g' / /bin/busybox /mine /f",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0:0", "0:0", "0:0", "1:1"]
    ((start, _n),) = user.subuid_ranges()
    assert _stored_owner(upper / "mine") == (user.uid, user.gid)
    assert _stored_owner(upper / "f") == (start, start)


def test_run_root_image_chown_single_refused(user):
    """With a single-id map only root exists inside: chown to 1 fails like the kernel's."""
    img = busybox_image(user, "busybox", owned_by_user=False)
    r = _run(user, "--rm", img, "sh", "-c", "touch /f; chown 1:1 /f; echo $?", mode="single")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] != "0"


@pytest.mark.parametrize("cmd,code", [(["true"], 0), (["sh", "-c", "exit 7"], 7), (["nope"], 127)])
def test_exit_codes(user, cmd, code):
    img = busybox_image(user, "busybox", owned_by_user=False)
    r = _run(user, "--rm", img, *cmd)
    assert r.returncode == code, r.stderr
    if code == 127:
        assert r.stderr.strip() == "pyoverlay: exec: 'nope': executable file not found in $PATH"
    _nothing_recorded(user)


def test_detached_ps_exec_logs_stop(user):
    img = busybox_image(user, "busybox", owned_by_user=False)
    r = _run(user, "-d", "--name", "web", img, "sh", "-c", "echo started; exec sleep 1000")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    assert len(cid) == 64
    ps = json.loads(user.pyoverlay("ps", "--json", check=True).stdout)
    assert [(c["name"], c["status"]) for c in ps] == [("web", "running")]
    ex = user.pyoverlay("exec", "web", "sh", "-c", "id -u; ps -o pid,comm; hostname")
    assert ex.returncode == 0, ex.stderr
    lines = ex.stdout.splitlines()
    assert lines[0] == "0"
    assert any(line.split() == ["1", "sleep"] for line in lines), ex.stdout
    assert lines[-1] == cid[:12]
    assert user.pyoverlay("exec", "web", "sh", "-c", "exit 3").returncode == 3
    top = user.pyoverlay("top", "web", check=True).stdout
    assert "sleep 1000" in top
    deadline = time.monotonic() + 10
    while "started" not in user.pyoverlay("logs", "web").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert user.pyoverlay("logs", "web").stdout == "started\n"
    assert user.pyoverlay("stop", "-t", "1", "web").returncode == 0
    (rec,) = json.loads(user.pyoverlay("ps", "-a", "--json", check=True).stdout)
    assert (rec["status"], rec["exit_code"]) == ("exited", 137)
    assert user.pyoverlay("rm", "web").returncode == 0
    _nothing_recorded(user)
    assert os.listdir(user.data_dir / "containers") == []


def test_kill_and_rm_force(user):
    img = busybox_image(user, "busybox", owned_by_user=True)
    cid = _run(user, "-d", img, "sleep", "1000", check=True).stdout.strip()
    assert user.pyoverlay("kill", "-s", "TERM", cid[:12]).returncode == 0  # PID 1 ignores it
    assert user.pyoverlay("rm", "-f", cid[:12]).returncode == 0
    _nothing_recorded(user)


def test_limits_refused_on_cgroup_v1(user):
    from runner.cgroups import detect

    layout = detect()
    if "memory" not in layout.v1:
        pytest.skip(f"memory is not a cgroup v1 controller here ({layout.describe()})")
    img = busybox_image(user, "busybox", owned_by_user=False)
    r = _run(user, "--memory", "64m", img, "true")
    assert r.returncode == 125
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "--memory" in r.stderr and "cgroup v1" in r.stderr
    _nothing_recorded(user)


def test_bad_map_setting(user):
    img = busybox_image(user, "busybox", owned_by_user=False)
    r = user.pyoverlay("run", img, "true", env={"PYOVERLAY_USERNS_MAP": "bogus"})
    assert r.returncode == 125
    assert r.stderr.strip().startswith("pyoverlay: invalid $PYOVERLAY_USERNS_MAP 'bogus'")


def test_killed_monitor_leaves_nothing(user):
    """SIGKILL to the monitor: PID 1 dies with it, the mount goes with the namespaces, the
    server gets SIGTERM; `ps -a` shows the container dead and `rm` removes it."""
    img = busybox_image(user, "busybox", owned_by_user=False)
    cid = _run(user, "-d", img, "sleep", "1000", check=True).stdout.strip()
    with open(user.state_dir / "containers" / cid / "state.json") as f:
        rec = json.load(f)
    os.kill(rec["monitor_pid"], 9)
    deadline = time.monotonic() + 10
    while any(process_start_time(p) is not None for p in (rec["pid"], rec["server_pid"])):
        assert time.monotonic() < deadline, "PID 1 or the server outlived the monitor"
        time.sleep(0.05)
    (row,) = json.loads(user.pyoverlay("ps", "-a", "--json", check=True).stdout)
    assert row["status"] == "dead"
    assert user.pyoverlay("rm", cid).returncode == 0
    _nothing_recorded(user)


def test_error_hints(monkeypatch):
    """The settings named when the machine forbids user namespaces (read from /proc/sys)."""
    from runner import userns

    files = {}
    monkeypatch.setattr(userns, "_read", files.get)
    assert userns.userns_hint() == ""
    files["/proc/sys/kernel/apparmor_restrict_unprivileged_userns"] = "1"
    assert "kernel.apparmor_restrict_unprivileged_userns" in userns.userns_hint()
    files["/proc/sys/user/max_user_namespaces"] = "0"
    assert "user.max_user_namespaces is 0" in userns.userns_hint()
    with pytest.raises(userns.UsernsError, match="user.max_user_namespaces"):
        userns.check_machine()
