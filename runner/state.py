"""Container records: one ``state.json`` per container, like runc's ``/run/runc/<id>``.

Two directories, as docker and runc split them:

* runtime records: ``$PYOVERLAY_STATE_DIR/containers/<id>/state.json`` (default
  ``/run/pyoverlay`` as root) -- small, rewritten atomically (temp file + rename);
* container data: ``$PYOVERLAY_DATA_DIR/containers/<id>/`` (default
  ``/var/lib/pyoverlay`` as root) -- the generated upper layer, its workdir, the init
  layer, the mountpoint, /etc/hosts and friends, the output of ``run -d``.

The monitor process of a container is the only writer of its record while it lives.
A record says "running" but its monitor is gone (killed, machine crashed): that is a
*dead* container, found by checking the recorded pids together with their start
times (a recycled pid is never mistaken for ours).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil

from overlayfs_py.mountinfo import mounts_under
from overlayfs_py.state import state_dir

from . import _linux


class StateError(Exception):
    pass


def data_root() -> str:
    """``$PYOVERLAY_DATA_DIR``, else /var/lib/pyoverlay (root) or ~/.local/share/pyoverlay."""
    d = os.environ.get("PYOVERLAY_DATA_DIR")
    if not d:
        if os.geteuid() == 0:
            d = "/var/lib/pyoverlay"
        else:
            base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
            d = os.path.join(base, "pyoverlay")
    return d


def data_dir() -> str:
    return os.path.join(data_root(), "containers")


def records_dir() -> str:
    d = os.path.join(state_dir(), "containers")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


@contextlib.contextmanager
def locked():
    """Serialise record creation and removal (name uniqueness)."""
    fd = os.open(os.path.join(records_dir(), ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _file(cid: str) -> str:
    return os.path.join(records_dir(), cid, "state.json")


def save(rec: dict) -> None:
    d = os.path.join(records_dir(), rec["id"])
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = os.path.join(d, f".state.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(d, "state.json"))


def load(cid: str) -> dict | None:
    try:
        with open(_file(cid)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def all_records() -> list[dict]:
    out = []
    for cid in os.listdir(records_dir()):
        rec = load(cid)
        if rec is not None:
            out.append(rec)
    return sorted(out, key=lambda r: r.get("created", 0))


def status(rec: dict) -> str:
    """created | running | exited | dead (its monitor is gone without recording an exit)."""
    st = rec.get("status", "created")
    if st in ("created", "running") and not _linux.alive(rec.get("monitor_pid"), rec.get("monitor_start")):
        return "dead"
    return st


def resolve(ref: str) -> dict:
    """A container by full id, name, or unique id prefix."""
    recs = all_records()
    for r in recs:
        if r["id"] == ref or r.get("name") == ref:
            return r
    matches = [r for r in recs if r["id"].startswith(ref)] if ref else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise StateError(f"container id prefix {ref!r} is ambiguous ({len(matches)} containers)")
    raise StateError(f"no such container: {ref}")


def name_taken(name: str) -> str | None:
    for r in all_records():
        if r.get("name") == name:
            return r["id"]
    return None


def remove(rec: dict) -> None:
    """Delete the record and the container's data dir (never a user-given --upper)."""
    data = rec.get("data_dir")
    if data and os.path.dirname(data) == data_dir():
        remove_tree(data)
    shutil.rmtree(os.path.join(records_dir(), rec["id"]), ignore_errors=True)


def remove_tree(path: str) -> None:
    """rm -r, refused while anything is mounted below (it would empty the mounted tree)."""
    left = mounts_under(os.path.realpath(path))
    if left:
        raise StateError(f"{left[0]} is still mounted; not removing {path}")
    shutil.rmtree(path, ignore_errors=True)
