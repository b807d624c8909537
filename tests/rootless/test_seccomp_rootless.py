"""Seccomp in rootless containers (docs/runner.md, "Seccomp"): the ordinary user's
containers get docker's default profile too (compiled by the user, loaded in the
container's user namespace), for run and exec; unconfined lifts it."""

from __future__ import annotations

import json

from helpers.rootless import busybox_image


def _mode(out: str) -> str:
    return out.split()[-1]


def test_rootless_run_and_exec_are_filtered(user):
    img = busybox_image(user, "busybox", owned_by_user=False)
    r = user.pyoverlay("run", "--rm", img, "grep", "^Seccomp:", "/proc/self/status")
    assert r.returncode == 0 and _mode(r.stdout) == "2", r.stderr
    # root in the container's user namespace may create another, but not past the filter
    r = user.pyoverlay("run", "--rm", img, "unshare", "-U", "true")
    assert r.returncode == 1 and "Operation not permitted" in r.stderr, r.stdout + r.stderr
    r = user.pyoverlay(
        "run", "--rm", "--security-opt", "seccomp=unconfined", img, "grep", "^Seccomp:", "/proc/self/status"
    )
    assert r.returncode == 0 and _mode(r.stdout) == "0", r.stderr

    r = user.pyoverlay("run", "-d", "--name", "sec", img, "sleep", "1000")
    assert r.returncode == 0, r.stderr
    try:
        ex = user.pyoverlay("exec", "sec", "grep", "^Seccomp:", "/proc/self/status")
        assert ex.returncode == 0 and _mode(ex.stdout) == "2", ex.stderr
    finally:
        assert user.pyoverlay("rm", "-f", "sec").returncode == 0
    assert json.loads(user.pyoverlay("ps", "-a", "--json", check=True).stdout) == []
