"""The FUSE server of a running container's root SIGKILLed (issue 17, "Faults"): the
monitor notices, says so, stops the container (SIGKILL: 137) and tears down as usual (the
dead mount is unmounted, nothing is left); ``ps`` shows why it exited; the upper layer
(``--upper``) is whole: the next pyoverlay mount empties its work/ and shows the same tree
as the kernel's overlay on the same layers.

The container copies up a large lower file, then loops over writes, renames and ``rm -r``
when the server is killed (as soon as the copy-up is seen in progress, or once the loop
runs)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from helpers import containers
from helpers.faults import remount_and_compare
from overlayfs_py.config import default_workdir

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root, pytest.mark.kernel, pytest.mark.usefixtures("_no_leftovers")]

BIG_MB = 100
SCRIPT = (
    "echo x >> /big; echo copied > /copied; "
    "while :; do mkdir -p /t/a /t/b; cp /bin/busybox /t/a/x; mv /t/a/x /t/b/y; rm -r /t; done"
)


def _layer(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "big", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(BIG_MB):
            f.write(block)
    return data


def _record(rt, cid: str) -> dict:
    """The container's state.json ({} while it is being written for the first time)."""
    try:
        with open(rt.state / "containers" / cid / "state.json") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


def _running_record(rt, ref_of, timeout: float = 60) -> dict:
    """The record of the container once it runs (*ref_of()*: its id, None until known)."""
    deadline = time.monotonic() + timeout
    while True:
        cid = ref_of()
        if cid is not None:
            rec = _record(rt, cid)
            if rec.get("status") == "running" and rec.get("server_pid"):
                return rec
        assert time.monotonic() < deadline, "the container did not start"
        time.sleep(0.05)


def _kill_server_mid_work(rec: dict, upper) -> str:
    """SIGKILL the server as soon as the copy-up is under way (work/ holds something, or
    the server has an fd into it) or, if it was too quick to see, once it is done."""
    work = os.path.join(default_workdir(str(upper)), "work")
    pid = rec["server_pid"]
    deadline = time.monotonic() + 60
    when = "after 60 s"
    while time.monotonic() < deadline:
        if os.path.exists(upper / "copied"):
            when = "after the copy-up"
            break
        try:
            if os.listdir(work) or any(
                os.readlink(f"/proc/{pid}/fd/{fd}").startswith(work + "/") for fd in os.listdir(f"/proc/{pid}/fd")
            ):
                when = "during the copy-up"
                break
        except OSError:
            pass
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    print(f"server killed {when}")
    return when


def _check_after(rt, cid: str, rec: dict, upper, tmp_path) -> None:
    c = rt.find(cid)
    assert c is not None and c["status"] == "exited", c
    assert c["exit_code"] == 137, c
    assert c["server_died"] == "was killed by SIGKILL", c
    table = rt.ok("ps", "-a").stdout
    assert "(filesystem server died)" in table, table
    assert rt.mounts() == [], f"mounts left: {rt.mounts()}"
    assert containers.wait_gone(rec["pid"]), "the container's PID 1 still runs"
    lowers = [rec["init_layer"], *rec["layers"]]
    view = remount_and_compare(lowers, upper, default_workdir(str(upper)), tmp_path)
    # /big: the lower file, or it with the line appended: never a torn copy
    h = hashlib.sha256()
    with open(os.path.join(rec["layers"][0], "big"), "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    whole = ("file", BIG_MB << 20, h.hexdigest())
    h.update(b"x\n")
    assert view["big"] in (whole, ("file", (BIG_MB << 20) + 2, h.hexdigest())), view["big"]
    rt.ok("rm", cid)


def test_server_killed_under_a_detached_container(rt, img, tmp_path):
    data = _layer(tmp_path)
    upper = tmp_path / "upper"
    cid = rt.detach("--upper", upper, f"{data}:{img.spec}", "sh", "-c", SCRIPT)
    rec = _running_record(rt, lambda: cid)
    _kill_server_mid_work(rec, upper)
    c = rt.wait_status(cid, ("exited",), timeout=60)
    log = rt.cli("logs", cid).stdout + rt.cli("logs", cid).stderr
    assert f"the filesystem server of its root (pid {rec['server_pid']}) was killed by SIGKILL" in log, (c, log)
    _check_after(rt, cid, rec, upper, tmp_path)


def test_server_killed_under_a_foreground_container(rt, img, tmp_path):
    data = _layer(tmp_path)
    upper = tmp_path / "upper"
    p = rt.popen(
        "run", "--name", "fg", "--upper", upper, f"{data}:{img.spec}", "sh", "-c", SCRIPT,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def cid():
            for name in os.listdir(rt.state / "containers") if (rt.state / "containers").is_dir() else ():
                if not name.startswith(".") and _record(rt, name).get("name") == "fg":
                    return name
            return None

        rec = _running_record(rt, cid)
        _kill_server_mid_work(rec, upper)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 137, (p.returncode, out, err)
    assert f"the filesystem server of its root (pid {rec['server_pid']}) was killed by SIGKILL" in err, err
    _check_after(rt, rec["id"], rec, upper, tmp_path)
