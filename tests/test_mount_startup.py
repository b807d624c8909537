"""Startup and shutdown of ``pyoverlay mount`` / ``umount`` (docs/architecture.md, "The mount
lifecycle"; the times are measured by ``scripts/bench --mount-times``, never asserted here).

* The command line's mount and umount paths import neither the runner, nor trio, pyfuse3 or
  the filesystem core: those are the server's, imported after the fork.
* A failure after the mount command returned (the direct engine returns as soon as mount(2)
  succeeded; both engines once the mount is live) leaves nothing mounted and no server, and
  the server's log says why in one line; a process that reached the mount meanwhile gets an
  error, it does not hang.
* ``pyoverlay umount`` returns once the server has finished: the trace file is complete and
  a kernel overlay mounted at once on the same upper and workdir sees everything written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import mounts
from overlayfs_py import procfs

pytestmark = [pytest.mark.fuse]

REPO = Path(__file__).resolve().parent.parent
ENGINES = ["direct", "pyfuse3"]

#: what the command line's mount/umount paths must not import (the server's, or the runner's)
HEAVY = ("runner", "trio", "pyfuse3", "overlayfs_py.core", "overlayfs_py.overlay", "overlayfs_py.fuse")


def _cli(*args, check=False, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", *map(str, args)],
        cwd=REPO,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def _layers(tmp_path):
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "f").write_bytes(b"lower\n")
    (lower / "d").mkdir()
    (lower / "d" / "g").write_bytes(b"g\n")
    return lower, upper, work, mnt


def _server_pid(mnt: Path) -> int:
    """The server of *mnt*, from its mount record (overlayfs_py/state.py)."""
    env = mounts.pyoverlay_env()
    code = "import sys; from overlayfs_py import state; print(state.lookup(sys.argv[1])['pid'])"
    r = subprocess.run([sys.executable, "-c", code, str(mnt)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def _loaded_by(argv: list[str]) -> list[str]:
    """The heavy modules loaded by the ``pyoverlay`` command *argv* run in this interpreter."""
    code = (
        "import sys\n"
        f"sys.argv = ['pyoverlay', *{argv!r}]\n"
        "import pyoverlay_cli\n"
        "try:\n    pyoverlay_cli.main()\nexcept SystemExit:\n    pass\n"
        f"heavy = {HEAVY!r}\n"
        "print('LOADED', sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=mounts.pyoverlay_env(), capture_output=True, text=True, timeout=60
    )
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("LOADED ")]
    assert line, r.stdout + r.stderr
    return eval(line[0].removeprefix("LOADED "))  # a list literal printed above


def test_the_mount_and_umount_paths_import_nothing_heavy(tmp_path):
    lower, upper, work, mnt = _layers(tmp_path)
    # a mount refused after parsing, planning and the workdir's record: the whole parent path
    (tmp_path / "notadir").write_bytes(b"")
    assert _loaded_by(["mount", "-o", "engine=direct", str(lower), str(upper), str(tmp_path / "notadir")]) == []
    assert _loaded_by(["umount", str(mnt)]) == []  # "not mounted": mountinfo read, nothing else
    # the other commands still find what they need (registered on first use)
    assert "runner" in _loaded_by(["ps", "--help"])


@pytest.mark.needs_root
@pytest.mark.parametrize("engine", ENGINES)
def test_a_failure_after_the_mount_returned_leaves_nothing_mounted(tmp_path, engine):
    """The trace file is opened by the server once it serves (after the caller has gone on):
    on a read-only filesystem that fails. The check before the fork cannot see it."""
    lower, upper, work, mnt = _layers(tmp_path)
    log = tmp_path / "server.log"
    ro = tmp_path / "ro"
    with mounts.TmpfsMount(ro, size="1m"):
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        r = _cli(
            "mount", "-o", f"engine={engine}", "--log", log, "--trace", ro / "trace.jsonl", lower, upper, mnt,
            "--workdir", work,
        )  # fmt: skip
        try:
            assert r.returncode == 0, r.stderr  # the mount was live when the command returned
            # a process reaching the mount now is answered (an error), it is not left hanging
            probe = subprocess.run(["stat", str(mnt / "f")], capture_output=True, timeout=30)
            deadline = time.monotonic() + 30  # the server unmounts, then logs why and exits
            while (mounts.is_mounted(mnt) or "server failed" not in log.read_text()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not mounts.is_mounted(mnt)
            assert probe.returncode != 0  # ENOTCONN (or, once unmounted, the empty mountpoint)
        finally:
            if mounts.is_mounted(mnt):
                mounts.force_unmount(mnt)
    text = log.read_text()
    failed = [ln for ln in text.splitlines() if "server failed:" in ln]
    assert failed and "Read-only file system" in failed[-1], text
    assert "Traceback" not in text  # one line (the traceback only with --debug)
    state_dir = Path(mounts.pyoverlay_env().get("PYOVERLAY_STATE_DIR") or "/run/pyoverlay")
    for rec in state_dir.glob("mount-*.json"):  # the server forgot its mount before exiting
        assert json.loads(rec.read_text()).get("mountpoint") != str(mnt)


@pytest.mark.needs_root
@pytest.mark.parametrize("engine", ENGINES)
def test_umount_returns_once_the_server_is_done(tmp_path, engine):
    lower, upper, work, mnt = _layers(tmp_path)
    trace = tmp_path / "trace.jsonl"
    r = _cli("mount", "-o", f"engine={engine}", "--trace", trace, lower, upper, mnt, "--workdir", work)
    assert r.returncode == 0, r.stderr
    try:
        (mnt / "f").write_bytes(b"changed\n")  # a copy-up
        (mnt / "new").write_bytes(b"x" * 100_000)
        os.unlink(mnt / "d" / "g")  # a whiteout
        os.rename(mnt / "new", mnt / "moved")
        os.mkdir(mnt / "d" / "sub")  # a copied-up directory
        fd = os.open(mnt / "late", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"late\n")
        os.close(fd)  # its RELEASE reaches the server asynchronously
        pid = _server_pid(mnt)
        u = _cli("umount", mnt)
        server_alive = procfs.alive(pid)
    finally:
        if mounts.is_mounted(mnt):
            mounts.force_unmount(mnt)
    assert u.returncode == 0, u.stderr
    assert not server_alive  # umount waited for it
    # the server had finished when umount returned: its trace ends with its end record
    events = [json.loads(ln)["event"] for ln in trace.read_text().splitlines()]
    assert events and events[-1] == "end", events[-3:]
    # and the upper is whole: the kernel's overlay on the same upper and workdir sees it all
    kmnt = tmp_path / "kernel"
    kmnt.mkdir()
    with mounts.KernelOverlay([lower], kmnt, upper, work):
        assert (kmnt / "f").read_bytes() == b"changed\n"
        assert (kmnt / "moved").read_bytes() == b"x" * 100_000
        assert (kmnt / "late").read_bytes() == b"late\n"
        assert sorted(os.listdir(kmnt)) == ["d", "f", "late", "moved"]
        assert os.listdir(kmnt / "d") == ["sub"]


# --- the direct engine serves before it imports trio (docs/performance.md, "Startup") ----------


def _mount_direct(tmp_path):
    lower, upper, work, mnt = _layers(tmp_path)
    (lower / "big").write_bytes(b"b" * (3 << 20))  # copied up in a worker thread: a task
    log = tmp_path / "server.log"
    r = _cli("mount", "-o", "engine=direct", "--log", log, lower, upper, mnt, "--workdir", work)
    assert r.returncode == 0, r.stderr
    return mnt, log


def _why_trio(log: Path) -> str:
    """What ended the server's serving without trio (its log line; waited for)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [ln for ln in log.read_text().splitlines() if "answered before trio: " in ln]
        if lines:
            return lines[0].split("; then ", 1)[1]
        time.sleep(0.02)
    raise AssertionError(f"no 'answered before trio' line in the log:\n{log.read_text()}")


def _record(mnt: Path) -> dict:
    code = "import json, sys; from overlayfs_py import state; print(json.dumps(state.lookup(sys.argv[1])))"
    r = subprocess.run(
        [sys.executable, "-c", code, str(mnt)], env=mounts.pyoverlay_env(), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.needs_root
def test_a_stop_signal_before_trio_unmounts(tmp_path):
    mnt, log = _mount_direct(tmp_path)
    try:
        pid = _server_pid(mnt)  # (a process of its own: before the requests)
        assert (mnt / "f").read_bytes() == b"lower\n"  # answered without trio
        os.kill(pid, signal.SIGTERM)  # well within EARLY_IDLE_MS of the last request
        deadline = time.monotonic() + 30
        while procfs.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not procfs.alive(pid)
        assert not mounts.is_mounted(mnt)
    finally:
        if mounts.is_mounted(mnt):
            mounts.force_unmount(mnt)
    assert _why_trio(log) == "a signal"  # it woke the server at once (signalfd)
    assert "signal received: unmounting" in log.read_text()


@pytest.mark.needs_root
def test_a_stats_signal_before_trio_is_answered(tmp_path):
    """SIGUSR1 (the server's ``stats:`` line) wakes the early loop as a stop signal does."""
    mnt, log = _mount_direct(tmp_path)
    try:
        pid = _server_pid(mnt)  # (a process of its own: before the requests)
        assert (mnt / "f").read_bytes() == b"lower\n"
        os.kill(pid, signal.SIGUSR1)  # well within EARLY_IDLE_MS of the last request
        assert _why_trio(log) == "a signal"
        deadline = time.monotonic() + 30
        while "stats: nodes=" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "stats: nodes=" in log.read_text(), log.read_text()
        assert procfs.alive(pid) and mounts.is_mounted(mnt)  # only a stats line: it serves on
        u = _cli("umount", mnt)
        assert u.returncode == 0, u.stderr
    finally:
        if mounts.is_mounted(mnt):
            mounts.force_unmount(mnt)


@pytest.mark.needs_root
def test_a_trace_reader_before_trio_gets_what_happened_before(tmp_path):
    from overlayfs_py.unixsock import connect_unix

    mnt, log = _mount_direct(tmp_path)
    try:
        sock_path = _record(mnt)["trace_socket"]  # (a process of its own: before the requests)
        (mnt / "f").write_bytes(b"changed\n")  # a copy-up, answered without trio
        os.unlink(mnt / "d" / "g")  # a whiteout
        sock = connect_unix(sock_path)  # well within EARLY_IDLE_MS of the last request
        sock.sendall(b'{"history": true}\n')
        assert _why_trio(log) == "a trace reader"
        # the history comes first, once the sink has taken the reader on: then unmount (a
        # reader still being taken on when the mount ends gets nothing, by design)
        sock.settimeout(30)
        data = b""
        while data.count(b"\n") < 2:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        u = _cli("umount", mnt)
        assert u.returncode == 0, u.stderr
    finally:
        if mounts.is_mounted(mnt):
            mounts.force_unmount(mnt)
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    events = [(e["event"], e.get("path")) for e in map(json.loads, data.splitlines())]
    assert ("copy_up_done", "/f") in events and ("whiteout_create", "/d/g") in events, events
    assert events[-1][0] == "end"


@pytest.mark.needs_root
def test_a_request_that_needs_a_task_before_trio_is_answered(tmp_path):
    mnt, log = _mount_direct(tmp_path)
    try:
        with open(mnt / "big", "r+b") as f:  # a copy-up of 3 MiB: in a worker thread, a task
            f.write(b"B")
        assert _why_trio(log) == "a request that needs a task"
        assert (mnt / "big").read_bytes() == b"B" + b"b" * ((3 << 20) - 1)
    finally:
        u = _cli("umount", mnt)
        if mounts.is_mounted(mnt):
            mounts.force_unmount(mnt)
    assert u.returncode == 0, u.stderr


@pytest.mark.needs_root
def test_a_mount_unmounted_before_trio_leaves_nothing(tmp_path):
    mnt, log = _mount_direct(tmp_path)
    try:
        assert sorted(os.listdir(mnt)) == ["big", "d", "f"]
        sock_path = Path(_record(mnt)["trace_socket"])
        assert sock_path.exists()
        pid = _server_pid(mnt)
        u = _cli("umount", mnt)
        assert u.returncode == 0, u.stderr
    finally:
        if mounts.is_mounted(mnt):
            mounts.force_unmount(mnt)
    assert not procfs.alive(pid)
    assert _why_trio(log) == "the mount ended (disconnected)"  # and trio was never imported
    assert not sock_path.exists()
    state_dir = Path(mounts.pyoverlay_env().get("PYOVERLAY_STATE_DIR") or "/run/pyoverlay")
    for rec in state_dir.glob("mount-*.json"):
        assert json.loads(rec.read_text()).get("mountpoint") != str(mnt)
