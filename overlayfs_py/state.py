"""Where running mounts are recorded: one JSON file per mount, keyed by the mountpoint.

``pyoverlay umount`` uses it to find the server to wait for; later tools (trace,
ps) will use it to find a mount's server. Directory: ``$PYOVERLAY_STATE_DIR``, else
``/run/pyoverlay`` for root, else ``$XDG_RUNTIME_DIR/pyoverlay`` (when that directory is
the user's own and 0700) or ``/tmp/pyoverlay-$UID``. Root of a user namespace that is an
ordinary user outside it (``privilege.userns_root``: podman's rootless mount program) is
not root here: ``$XDG_RUNTIME_DIR/pyoverlay`` or ``/tmp/pyoverlay-$UID`` with the uid it has
outside, the directories that user has outside the namespace too.

The state dir is trusted (its records name pids to signal, mounts to unmount, trees to
remove), so it must be the user's: :func:`private_dir` creates it 0700 and refuses one
that is a symlink, belongs to someone else or is writable by others (another user may
pre-create ``/tmp/pyoverlay-$UID``: issue 13 item 8).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import asdict

from .errors import PyoverlayError

try:  # CPython's own sha256: hashlib would load OpenSSL (a few ms on every start)
    from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - another Python
    from hashlib import sha256


class StateDirError(PyoverlayError, OSError):
    """A state or data dir that is not safe to use (one line, for the user; an OSError too,
    for the callers that catch those)."""


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def private_dir(path: str, what: str = "state dir") -> str:
    """*path*, created 0700 if missing, once it is known to be the effective user's own
    directory: not a symlink, owned by the user, not writable by anyone else. One the
    user owns that others may only read or traverse is made 0700; anything else is
    refused with :class:`StateDirError`. The checks are made on an fd opened with
    O_NOFOLLOW (what is checked is what is there)."""
    try:
        try:
            os.mkdir(path, 0o700)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StateDirError(f"cannot create the {what} {path}: {e.strerror}") from None
    try:
        fd = _open_dir(path)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            why = "a symlink" if os.path.islink(path) else "not a directory"
            raise StateDirError(f"the {what} {path} is {why}; refusing to use it") from None
        raise StateDirError(f"cannot open the {what} {path}: {e.strerror}") from None
    try:
        check_private_fd(fd, path, what)
    finally:
        os.close(fd)
    return path


def check_private_fd(fd: int, path: str, what: str) -> None:
    """The checks of :func:`private_dir` on an open directory."""
    st = os.fstat(fd)
    me = os.geteuid()
    if st.st_uid != me:
        raise StateDirError(f"the {what} {path} belongs to uid {st.st_uid}, not to you (uid {me}); refusing to use it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise StateDirError(f"the {what} {path} is writable by other users (mode {mode:04o}); refusing to use it")
    # 0710: search (no read) for the directory's group only, kept as docker keeps
    # /var/lib/docker: ``pyoverlay serve`` as root gives /run/pyoverlay to the group
    # ``pyoverlay`` so that its members reach the API socket in it (runner/api/cli.py)
    if mode not in (0o700, 0o710):
        os.fchmod(fd, 0o700)


def _xdg_runtime_dir() -> str | None:
    """``$XDG_RUNTIME_DIR`` if it is set and is the user's own 0700 directory."""
    d = os.environ.get("XDG_RUNTIME_DIR")
    if not d or not os.path.isabs(d):
        return None
    try:
        fd = _open_dir(d)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        return None
    return d


def default_state_dir() -> str:
    """Where records go without ``$PYOVERLAY_STATE_DIR`` (only the path; see the module doc).
    Root of a user namespace whose uid 0 is an ordinary user outside (podman's rootless
    mount program, ``unshare -Ur``) is that user here: its uid 0 may not write the host's
    /run, so it gets the user's directory, named by its uid outside."""
    from .privilege import host_root, outer_uid

    if host_root():
        return "/run/pyoverlay"
    if (xdg := _xdg_runtime_dir()) is not None:
        return os.path.join(xdg, "pyoverlay")
    uid = outer_uid()
    return f"/tmp/pyoverlay-{os.geteuid() if uid is None else uid}"


def state_dir() -> str:
    return private_dir(os.environ.get("PYOVERLAY_STATE_DIR") or default_state_dir(), "state dir")


def _path(mountpoint: str) -> str:
    # *mountpoint* must already be absolute and resolved: never stat a live mountpoint
    # from the server itself (the request would come back to us and deadlock).
    h = sha256(os.fsencode(mountpoint)).hexdigest()[:24]
    return os.path.join(state_dir(), f"mount-{h}.json")


def trace_socket(mountpoint: str) -> str:
    """Where the server of *mountpoint* serves its live trace (see tracesink.py)."""
    return _path(mountpoint)[: -len(".json")] + ".trace.sock"


def record(mountpoint: str, pid: int, cfg) -> None:
    from .procfs import process_start_time

    data = {
        "mountpoint": mountpoint,
        "pid": pid,
        "start_time": process_start_time(pid),  # with the pid: this server for good (records())
        "config": asdict(cfg),
        "trace_socket": trace_socket(mountpoint),
    }
    tmp = _path(mountpoint) + f".{pid}.tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "w") as f:
        json.dump(data, f)
    os.replace(tmp, _path(mountpoint))


def lookup(mountpoint: str) -> dict | None:
    """The record of *mountpoint*, or None (none, unreadable, or not a record's shape).
    An unsafe state dir raises :class:`StateDirError`."""
    path = _path(mountpoint)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or type(data.get("pid")) is not int or data["pid"] <= 0:
        return None
    return data


def forget(mountpoint: str, pid: int) -> None:
    """Remove the record of *pid*'s mount of *mountpoint*, and its trace socket (a server
    killed with SIGKILL left both: ``pyoverlay umount`` forgets them for it)."""
    data = lookup(mountpoint)
    if data is not None and data.get("pid") == pid:
        for path in (_path(mountpoint), trace_socket(mountpoint)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def server_alive(rec: dict) -> bool:
    """Whether the server that wrote *rec* still runs: its pid, started at the time
    recorded with it (a pid reused since is not it; a record without a start time, from
    an older pyoverlay, goes by the pid alone)."""
    from . import procfs

    started = procfs.process_start_time(rec["pid"])
    return started is not None and rec.get("start_time", started) == started


def records() -> list[dict]:
    """Every mount record in the state dir (``pyoverlay mounts``), in mountpoint order; the
    records of servers that are gone are removed (with their trace sockets) and left out. A
    server is its pid and the start time recorded with it: a pid reused since is not it.
    A record is live while its server runs, wherever its mount is (a rootless podman's
    mount is in podman's mount namespace, not in the caller's)."""
    d = state_dir()
    out = []
    for name in sorted(os.listdir(d)):
        if not (name.startswith("mount-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(d, name)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if (
            not isinstance(data, dict)
            or type(data.get("pid")) is not int
            or not isinstance(data.get("mountpoint"), str)
        ):
            continue
        if data["pid"] <= 0 or _path(data["mountpoint"]) != os.path.join(d, name):
            continue  # not a record this state dir could have written
        if not server_alive(data):  # gone, or its pid reused
            forget(data["mountpoint"], data["pid"])
            continue
        out.append(data)
    out.sort(key=lambda r: r["mountpoint"])
    return out
