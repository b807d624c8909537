"""The demo's podman part (scripts/demo.py --part podman, scripts/demo_podman.py) runs as
the README says and shows what it narrates: the container's copy-ups and whiteouts in
``pyoverlay trace`` with the processes that made them, ``podman diff`` and ``pyoverlay diff``,
and nothing left behind (no mount, no process, no file of its private store); then the same
as the rootless test user, whose ``pyoverlay trace`` runs on the host."""

from __future__ import annotations

import os
import re

import pytest

from helpers import demo, mounts, podman


def _row(comm: str, event: str, path: str) -> re.Pattern[str]:
    """A ``[live trace]`` line of the table: *event* on *path* by process *comm*."""
    return re.compile(
        rf"^  \[live trace\] \d\d:\d\d:\d\d\.\d{{3}}  {re.escape(comm)}\(\d+\)\s+{event}\s+{re.escape(path)}(\s|$)",
        re.M,
    )


def test_demo_traces_a_podman_container(tmp_path):
    """As root, and (where the test user can run rootless podman) as that user, whose trace
    runs on the host while the mount is in podman's mount namespace only."""
    reason = podman.skip_reason()
    if reason:
        pytest.skip(reason)
    r = demo.run_part("podman", tmp_path, timeout=180)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "FAILED" not in out, out
    parts = out.split("#### Part 4")[1:]
    rootless = podman.skip_reason(rootless=True) is None
    assert len(parts) == 2, out
    assert parts[0].startswith(": a podman container traced through pyoverlay\n"), out
    if not rootless:
        assert parts[1].startswith(", rootless podman: skipped ("), out
        parts = parts[:1]
    else:
        assert parts[1].startswith(", rootless: the same as the ordinary user pyoverlay-test"), out
        assert "  on the host: nothing is mounted there.\n" in parts[1], out
        assert re.search(r"^  \$ podman unshare findmnt .*\n    fuse\.pyoverlay ", parts[1], re.M), out
        assert "Run on the host as pyoverlay-test, not inside podman unshare" in parts[1], out
    assert "  mounted there: fuse.pyoverlay (from /proc/self/mountinfo)\n" in parts[0], out
    for part in parts:
        # the history: the container's own shell, then rm; then what podman exec did, live
        for comm, event, path in (
            ("sh", "copy_up_start", "/etc/motd"),
            ("sh", "copy_up_done", "/etc/motd"),
            ("rm", "whiteout_create", "/etc/group"),
            ("sh", "copy_up_done", "/etc/passwd"),
        ):
            assert _row(comm, event, path).search(part), f"no trace row {comm} {event} {path}:\n{part}"
        assert re.search(r"^  \[live trace\] .* -- end of trace: \d+ events, 0 dropped", part, re.M), part
        diffs = part.split("$ podman diff demo-web\n", 1)[1].split("== Stopping it", 1)[0]
        podman_diff, pyoverlay_diff = diffs.split("$ pyoverlay diff UPPER", 1)
        for change in ("A /hello.txt", "C /etc/motd", "D /etc/group", "C /etc/passwd"):
            assert f"    {change}\n" in podman_diff and f"    {change}\n" in pyoverlay_diff, diffs
        assert "no mount, no process, no file left" in part, part
    assert not os.listdir(tmp_path), os.listdir(tmp_path)  # the demo removed its directories
    assert not mounts.mounts_under(tmp_path)
