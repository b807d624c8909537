"""Part 4 of the demo: a podman container traced through pyoverlay.

podman (Debian's, installed by scripts/setup) runs with a private configuration: the one the
podman tests use (tests/helpers/podman.py: its own storage.conf with ``mount_program`` =
this checkout's ``mount.fuse.pyoverlay``, containers.conf with runc, cgroupfs, no default
ulimits and a file events log, registries.conf, policy.json, HOME and XDG dirs, a short
runroot). A busybox image is imported from a rootfs tarball (no registry). A detached
container appends to a file of the image, deletes one and writes a new one. The demo then
finds its merged dir with ``podman inspect`` and runs ``pyoverlay trace --history`` on it:
the copy-ups and whiteouts the container made before anyone looked, each with the process
that made it, and a change ``podman exec`` makes while the trace follows. It compares
``podman diff`` with ``pyoverlay diff`` of the container's upper layer and stops and removes
the container, which ends the trace. Last, everything is removed: the containers, podman's
private store and run dirs, and the check that no mount or process is left.

Then the same as the ordinary user ``pyoverlay-test`` (rootless podman: scripts/setup gives it
subordinate ids), if it can: the mount is in podman's own mount namespace, and the same
user's ``pyoverlay trace MERGED`` on the host follows it (docs/podman.md).

Called by scripts/demo.py as root (it acts as the user with ``setpriv``). Nothing of the
machine's containers configuration is read or written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

NAME = "demo-web"
#: what the detached container does; /done tells the demo it got that far
SCRIPT = "echo hello > /hello.txt && echo more >> /etc/motd && rm /etc/group && touch /done && exec sleep 600"
#: the trace rows SCRIPT must give: (process, event, path)
BEFORE = (("sh", "copy_up_done", "/etc/motd"), ("rm", "whiteout_create", "/etc/group"))
#: what ``podman exec`` changes while the trace follows, and the row it must give
LIVE_CHANGE = ("sh", "-c", "echo app:x:1000:1000::/home/app:/bin/sh >> /etc/passwd")
LIVE_ROW = ("sh", "copy_up_done", "/etc/passwd")
#: in both ``podman diff`` and ``pyoverlay diff``
DIFF = ("A /hello.txt", "C /etc/motd", "D /etc/group", "C /etc/passwd")
DONE_WAIT = 30  # seconds for the container to make its changes


def _helpers(repo: Path):
    """tests/helpers/podman.py (the podman tests' private environment), or why it cannot be used."""
    tests = str(repo / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        from helpers import podman
    except ImportError as e:
        return None, f"cannot import tests/helpers/podman.py: {e}"
    return podman, None


def _mount_program(podman) -> Path:
    """/usr/sbin/mount.fuse.pyoverlay when it is this checkout's (scripts/setup links it), else
    the checkout's .venv/bin/mount.fuse.pyoverlay."""
    sbin = Path("/usr/sbin/mount.fuse.pyoverlay")
    if os.path.realpath(sbin) == os.path.realpath(podman.MOUNT_HELPER):
        return sbin
    return podman.MOUNT_HELPER


def _row(comm: str, event: str, path: str) -> re.Pattern[str]:
    """A row of the ``pyoverlay trace`` table: *event* on *path* by process *comm*."""
    return re.compile(rf"\s{re.escape(comm)}\(\d+\)\S*\s+{event}\s+{re.escape(path)}(\s|$)")


def part(demo, base: Path) -> int:
    """*demo*: the scripts/demo.py module (say, heading, failed, indent, LiveTrace...)."""
    demo.say()
    if not demo.ROOT:
        demo.say("#### Part 4, a podman container traced through pyoverlay, needs root: skipped.")
        return 0
    podman, why = _helpers(demo.REPO)
    if podman is not None:
        why = podman.skip_reason()
        if why is None and not podman.MOUNT_HELPER.exists():
            why = f"no {podman.MOUNT_HELPER} (scripts/setup installs it)"
    if why:
        demo.say(f"#### Part 4, a podman container traced through pyoverlay: skipped ({why}).")
        return 0
    failures = len(demo.FAILURES)
    demo.say("#### Part 4: a podman container traced through pyoverlay")
    _one(demo, podman, base / "podman", None)
    demo.say()
    why = podman.skip_reason(rootless=True)
    if why:
        demo.say(f"#### Part 4, rootless podman: skipped ({why}).")
    else:
        from helpers import rootless

        user = rootless.User()  # its own directory under /tmp/pyoverlay-rootless
        demo.say(f"#### Part 4, rootless: the same as the ordinary user {user.name} (uid {user.uid})")
        try:
            _one(demo, podman, user.dir / "podman", user)
        finally:
            left = user.cleanup()
            if left:
                demo.failed(f"{user.name} left behind: {', '.join(left)}")
    return 1 if len(demo.FAILURES) > failures else 0


def _one(demo, podman, base: Path, user) -> None:
    """The whole story with a private podman in *base*, as root (*user* None) or as *user*."""
    started = time.monotonic()
    try:
        p = podman.Podman(base, _mount_program(podman), user)
    except OSError as e:
        demo.failed(f"cannot set up a private podman in {base}: {e}")
        return
    try:
        _show(demo, p, user)
    except (AssertionError, subprocess.TimeoutExpired, OSError) as e:  # a podman command failed
        lines = [line for line in str(e).splitlines() if line.strip()][:2]  # the command, then its error
        demo.failed(": ".join(lines) or repr(e))
    finally:
        demo.heading("Removing the container and podman's private store")
        demo.say(f"  $ podman rm -f -t 0 {NAME}")
        try:
            rm = p.podman("rm", "-f", "-t", "0", NAME, check=False)
            demo.indent(rm.stdout or rm.stderr or "(no output)")
        except (subprocess.TimeoutExpired, OSError) as e:
            demo.say(f"  podman rm: {e}")
        left = p.cleanup()  # every container, the pause process, then processes, mounts, files
        if left:
            demo.failed(f"podman left behind: {'; '.join(left)}")
        else:
            demo.say(f"  no mount, no process, no file left: removed {p.base} and {p.short}")
        demo.say(f"  took {time.monotonic() - started:.1f}s")


def _cmd(demo, p, *args: str, show: bool = True) -> subprocess.CompletedProcess:
    """``podman ARGS`` in the private environment; printed with its output when *show*."""
    if show:
        demo.say("  $ podman " + shlex.join(args))
    r = p.podman(*args, check=False)
    if show and r.stdout.strip():
        demo.indent(r.stdout)
    if r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _pyoverlay(demo, p, user, *args: str) -> list[str]:
    """``pyoverlay ARGS``, as root or as *user* on the host (not in podman's namespaces)."""
    argv = demo.pyoverlay(*args)
    return argv if user is None else user.argv(argv)


def _env(p, user) -> dict[str, str]:
    """pyoverlay's environment: as root the state dir the mount program was given; as the
    user, the user's own (``$XDG_RUNTIME_DIR/pyoverlay``, as podman's mount program had)."""
    if user is None:
        return {**os.environ, "PYOVERLAY_STATE_DIR": str(p.state)}
    env = user.env(p.env())
    env.pop("PYOVERLAY_STATE_DIR", None)
    return env


def _show(demo, p, user) -> None:
    who = "root" if user is None else f"{user.name}, rootless"
    demo.heading(f"A private podman ({who}) in {p.base}")
    demo.say("  Its own storage.conf (CONTAINERS_STORAGE_CONF): pyoverlay is the overlay driver's mount program")
    demo.indent((p.base / "storage.conf").read_text())
    demo.say("  and its own containers.conf (runc, cgroupfs, default_ulimits = [], as this machine needs),")
    demo.say("  registries.conf, policy.json, HOME and XDG dirs: the system's containers config is not touched.")
    if user is not None:
        demo.say(f"  podman runs as {user.name}: in a user namespace of its own (root there is {user.name} here,")
        demo.say("  uids 1... its /etc/subuid range) and a mount namespace of its own, held by its pause process.")
    demo.say("  The image: a busybox rootfs tarball, imported (no registry is asked).")
    demo.say(f"  $ podman import rootfs.tar {p.import_busybox()}")

    demo.heading("A detached container that writes, appends and deletes")
    _cmd(demo, p, "run", "-d", "--name", NAME, "localhost/busybox:test", "sh", "-c", SCRIPT)
    deadline = time.monotonic() + DONE_WAIT
    while p.podman("exec", NAME, "test", "-e", "/done", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"the container did not make its changes within {DONE_WAIT}s")
        time.sleep(0.1)
    demo.say("  it has made its changes (it touched /done) and sleeps")

    demo.heading("Where its root is mounted: podman inspect")
    merged = _cmd(demo, p, "inspect", "--format", "{{.GraphDriver.Data.MergedDir}}", NAME).stdout.strip()
    upper = p.upper_of(NAME)
    lowers = p.lowers_of(NAME)
    entry = demo.mountinfo.mount_at(merged)
    if user is None:
        demo.say(f"  mounted there: {entry.fstype if entry else 'NOTHING'} (from /proc/self/mountinfo)")
        if entry is None or entry.fstype != "fuse.pyoverlay":
            demo.failed(f"{merged} is not a fuse.pyoverlay mount")
    else:
        demo.say(f"  on the host: {'a ' + entry.fstype + ' mount' if entry else 'nothing is mounted there'}.")
        demo.say("  The mount is in podman's mount namespace; podman unshare enters it:")
        r = _cmd(demo, p, "unshare", "findmnt", "-n", "-o", "FSTYPE,OPTIONS", merged)
        if entry is not None or not r.stdout.startswith("fuse.pyoverlay "):
            demo.failed(f"{merged} is not a fuse.pyoverlay mount in podman's namespace only")
    env = _env(p, user)
    where = "the state dir the test environment gives it" if user is None else "$XDG_RUNTIME_DIR/pyoverlay"
    demo.say(f"  pyoverlay's record of the mount ({where}): pyoverlay mounts")
    r = subprocess.run(
        _pyoverlay(demo, p, user, "mounts"), env=env, capture_output=True, text=True, timeout=demo.CMD_TIMEOUT
    )
    demo.indent(r.stdout or r.stderr or "(nothing)")

    demo.heading("What it did, and who: pyoverlay trace --history MERGED")
    if user is not None:
        demo.say(f"  Run on the host as {user.name}, not inside podman unshare: pyoverlay finds the mount by its")
        demo.say("  record, and its trace socket is beside the record.")
    demo.say("  --history starts with the server's last 1000 events: the container made its changes")
    demo.say("  before anyone looked.  Then the trace follows live; its lines start with [live trace].")
    demo.say("  $ pyoverlay trace --history MERGED &")
    live = demo.LiveTrace(p.base, env=env, argv=_pyoverlay(demo, p, user, "trace", "--history", merged))
    try:
        seen = 0
        for comm, event, path in BEFORE:
            got = live.wait_for(_row(comm, event, path), 0)
            if got is None:
                demo.failed(f"the trace did not show {event} {path} by {comm}")
            else:
                seen = max(seen, got)
        demo.say()
        demo.say("  A change made now, with podman exec, shows up as it happens:")
        _cmd(demo, p, "exec", NAME, *LIVE_CHANGE)
        if live.wait_for(_row(*LIVE_ROW), seen) is None:
            demo.failed(f"the live trace did not show {LIVE_ROW[1]} {LIVE_ROW[2]} by {LIVE_ROW[0]}")

        demo.heading("What it changed: podman diff, and pyoverlay diff of its upper layer")
        podman_diff = _cmd(demo, p, "diff", NAME).stdout.splitlines()
        lower = ":".join(map(str, lowers))
        demo.say("  $ pyoverlay diff UPPER --lower LOWERS   (the layers from podman inspect: UpperDir, LowerDir)")
        r = subprocess.run(
            _pyoverlay(demo, p, user, "diff", str(upper), "--lower", lower),
            env=env,
            capture_output=True,
            text=True,
            timeout=demo.CMD_TIMEOUT,
        )
        demo.indent(r.stdout or r.stderr or "(no output)")
        demo.say("  pyoverlay diff reads the upper layer itself, so it also lists what podman puts into every")
        demo.say("  container (/etc/hostname, /etc/hosts, /run/.containerenv...), which podman diff leaves out.")
        ours = r.stdout.splitlines()
        for change in DIFF:
            if change not in podman_diff or change not in ours:
                demo.failed(f"{change!r} is not in both podman diff and pyoverlay diff")

        demo.heading("Stopping it: podman unmounts its root, the server exits, the trace ends")
        _cmd(demo, p, "stop", "-t", "0", NAME)
        rc = live.finish(demo.CMD_TIMEOUT)
        if rc is None:
            demo.failed(f"the live trace did not end within {demo.CMD_TIMEOUT}s of the stop")
        elif not any("end of trace" in line for line in live.lines):
            demo.failed("the live trace ended without its end record")
        else:
            demo.say("  the live trace reader exited after the end record")
    finally:
        live.close()
