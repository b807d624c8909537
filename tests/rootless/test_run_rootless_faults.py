"""A rootless container whose root's FUSE server is killed (issue 17, "Faults"): the
monitor (in the container's user namespace by then) notices on the server's pidfd, stops
the container (137) and cleans up; ``ps`` says why. ``sleep 1000`` would otherwise go on
"running" on a dead root for 1000 s."""

from __future__ import annotations

import json
import os
import signal
import time

from helpers.rootless import busybox_image
from overlayfs_py.procfs import process_start_time


def test_killed_server_stops_the_container(user):
    img = busybox_image(user, "busybox", owned_by_user=False)
    cid = user.pyoverlay("run", "-d", img, "sleep", "1000", check=True).stdout.strip()
    with open(user.state_dir / "containers" / cid / "state.json") as f:
        rec = json.load(f)
    os.kill(rec["server_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        (c,) = json.loads(user.pyoverlay("ps", "-a", "--json", check=True).stdout)
        if c["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (c["status"], c["exit_code"], c["server_died"]) == ("exited", 137, "was killed by SIGKILL"), c
    assert process_start_time(rec["pid"]) is None, "PID 1 still runs"
    assert "(filesystem server died)" in user.pyoverlay("ps", "-a", check=True).stdout
    log = user.pyoverlay("logs", cid).stderr + user.pyoverlay("logs", cid).stdout
    assert "the filesystem server of its root" in log and "was killed by SIGKILL" in log, log
    assert user.mounts() == [], user.mounts()
    assert user.pyoverlay("rm", cid).returncode == 0
