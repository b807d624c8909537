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

Both directories are the user's own and closed to everyone else (0700, created so and
checked on every use: :func:`overlayfs_py.state.private_dir`), as docker keeps
/var/lib/docker: a container's merged mount (``allow_other`` for a root container), its
upper layer and the image store beneath the data dir cannot be reached by other host
users. A record is trusted only in its expected shape: its id names its directory, and
every path it holds that pyoverlay made is exactly where pyoverlay puts it
(``<data dir>/containers/<id>/...``); ``rm`` removes through directory fds opened
beneath the data dir, never following a symlink (issue 13 items 5 and 8).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass, field, fields
from typing import Any

from overlayfs_py.mountinfo import mounts_under
from overlayfs_py.privilege import host_root
from overlayfs_py.state import private_dir, state_dir

from . import _linux
from .errors import RunnerError


class StateError(RunnerError):
    pass


# --- the record ------------------------------------------------------------------------------

#: JSON types a record's fields may hold (None is always allowed: not known yet)
_NUM = (int, float)


@dataclass
class ExecDefaults:
    """What ``exec`` needs to run a process the way PID 1 was run (the record's ``spec``)."""

    env: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str | None = None
    tty: bool = False
    caps: list[int] | None = None  # bounding set kept; None: all (--privileged)
    no_new_privs: bool = True
    network: str = "none"
    read_only: bool = False
    init: bool = False
    upper_given: bool = False
    volumes: list[str] = field(default_factory=list)  # "HOST:CTR:ro|rw"
    limits: dict = field(default_factory=dict)  # memory, pids, cpus
    remove: bool = False
    stop_timeout: float = 10.0
    seccomp: dict | None = None  # the compiled filter exec loads too (runner/seccomp Filter.to_record)
    security_opt: list[str] | None = None  # --security-opt as docker's inspect shows it
    cgroupns: str | None = None  # "private" | "host" (None: a record from before issue 20)


@dataclass
class RootlessInfo:
    """The user namespace of a rootless container (the record's ``rootless``)."""

    map: str  # "subid" | "single"
    uid_map: list  # kernel lines (inside, outside, count)
    gid_map: list
    storage_uidmap: list  # the server's (stored, presented, count)
    storage_gidmap: list


_TYPES: dict[str, Any] = {
    "id": str,
    "name": str,
    "command": list,
    "layers": list,
    "created": _NUM,
    "status": str,
    "data_dir": str,
    "monitor_pid": int,
    "monitor_start": int,  # clock ticks (procfs.process_start_time)
    "spec": dict,
    "image": dict,
    "upper": str,
    "workdir": str,
    "merged": str,
    "init_layer": str,
    "trace_file": str,
    "hostname": str,
    "server_pid": int,
    "server_start": int,  # clock ticks (procfs.process_start_time)
    "cgroup": dict,
    "rootless": dict,
    "net": dict,
    "pid": int,
    "pid_start": int,  # clock ticks (procfs.process_start_time)
    "pidns": int,
    "exit_code": int,
    "finished": _NUM,
    "pid_reaped": bool,
    "oom_killed": bool,
    "server_died": str,
    "dead": bool,
}


@dataclass
class Record:
    """A container's record: ``state.json``, one JSON object with these keys (None values
    are left out; keys this version does not know are kept in :attr:`extra`).

    Written by the container's monitor only (:func:`save`); read back with
    :func:`load_record` / :func:`find`, or as a plain dict with :func:`load` /
    :func:`resolve` / :func:`all_records` (what ``pyoverlay diff`` and friends use)."""

    id: str
    name: str | None = None
    command: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # lower layers, top first
    created: float | None = None
    status: str = "created"  # created | running | exited
    data_dir: str | None = None  # <data root>/containers/<id>
    monitor_pid: int | None = None
    monitor_start: int | None = None  # /proc/PID/stat start time
    spec: ExecDefaults | None = None
    image: dict | None = None  # run --image: ref, id, source
    upper: str | None = None
    workdir: str | None = None
    merged: str | None = None
    init_layer: str | None = None
    trace_file: str | None = None
    hostname: str | None = None
    server_pid: int | None = None
    server_start: int | None = None
    cgroup: dict | None = None  # runner.cgroups.Cgroup.to_dict()
    rootless: RootlessInfo | None = None
    # the container's network once set up (runner/net): {"mode": "bridge" | "slirp4netns",
    # "address": "A.B.C.D", "prefix_len": N, "gateway": ..., "ports": [PortMapping.to_dict(),
    # with the host port actually bound]}; the bridge's also "mac", "bridge", "subnet",
    # "veth", "proxy_pid", "proxy_start"; slirp4netns's its pid and DNS (runner/net/*.py)
    net: dict | None = None
    pid: int | None = None  # PID 1, on the host
    pid_start: int | None = None
    pidns: int | None = None
    exit_code: int | None = None
    finished: float | None = None
    pid_reaped: bool | None = None
    oom_killed: bool | None = None
    server_died: str | None = None  # how the root's FUSE server ended while the container ran
    dead: bool | None = None  # cleaned up after its monitor died
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, (ExecDefaults, RootlessInfo)):
                v = {g.name: getattr(v, g.name) for g in fields(v)}
            out[f.name] = v
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, d) -> Record:
        """StateError unless *d* is a record's shape (field types; not its paths, which
        :func:`check_record` checks)."""
        if not isinstance(d, dict) or not valid_id(d.get("id")):
            raise StateError("not a container record")
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():
            if k not in _TYPES:
                extra[k] = v
                continue
            want = _TYPES[k]
            if v is not None and (not isinstance(v, want) or (want is int and isinstance(v, bool))):
                raise StateError(f"container {d['id'][:12]}: its {k} {v!r} has the wrong type")
            known[k] = v
        try:
            if known.get("spec") is not None:
                spec = known["spec"]
                names = {g.name for g in fields(ExecDefaults)}
                known["spec"] = ExecDefaults(**{k: v for k, v in spec.items() if k in names})
            if known.get("rootless") is not None:
                known["rootless"] = RootlessInfo(**known["rootless"])
        except TypeError as e:
            raise StateError(f"container {d['id'][:12]}: {e}") from None
        return cls(**known, extra=extra)

    @classmethod
    def of(cls, rec: Record | dict) -> Record:
        """*rec* as a Record (a dict from :func:`load`/:func:`resolve` is converted)."""
        return rec if isinstance(rec, Record) else cls.from_dict(rec)

    @property
    def label(self) -> str:
        return self.name or self.id[:12]


_ID = re.compile(r"^[0-9a-f]{64}$")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def valid_id(cid) -> bool:
    return isinstance(cid, str) and bool(_ID.match(cid))


def data_root() -> str:
    """``$PYOVERLAY_DATA_DIR``, else /var/lib/pyoverlay (root) or ~/.local/share/pyoverlay.
    Only the path: :func:`data_dir` and the image store check it before use."""
    d = os.environ.get("PYOVERLAY_DATA_DIR")
    if not d:
        if host_root():  # not root of a user namespace that is a user outside (podman unshare)
            d = "/var/lib/pyoverlay"
        else:
            base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
            d = os.path.join(base, "pyoverlay")
    return os.path.abspath(d)


def private_data_root() -> str:
    """The data root, created 0700 and checked to be the user's own (or StateDirError)."""
    return private_dir(data_root(), "data dir")


def data_dir() -> str:
    """``<data root>/containers``, private like the data root (created if missing)."""
    return private_dir(os.path.join(private_data_root(), "containers"), "data dir")


def container_dir(cid: str) -> str:
    """Where the data of container *cid* lives (only the path)."""
    return os.path.join(data_root(), "containers", cid)


def records_dir() -> str:
    return private_dir(os.path.join(state_dir(), "containers"), "state dir")


@contextlib.contextmanager
def locked():
    """Serialise record creation and removal (name uniqueness)."""
    fd = os.open(os.path.join(records_dir(), ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _file(cid: str) -> str:
    return os.path.join(records_dir(), cid, "state.json")


def save(rec: Record | dict) -> None:
    """Write *rec* atomically (temp file, fsync, rename)."""
    if isinstance(rec, Record):
        rec = rec.to_dict()
    if not valid_id(rec.get("id")):
        raise StateError(f"invalid container id {rec.get('id')!r}")
    d = os.path.join(records_dir(), rec["id"])
    with contextlib.suppress(FileExistsError):
        os.mkdir(d, 0o700)
    tmp = os.path.join(d, f".state.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as f:
        json.dump(rec, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(d, "state.json"))


def load(cid: str) -> dict | None:
    """The record of *cid*; None if there is none or it is not a record pyoverlay wrote
    (unreadable, not JSON, another shape, or paths that are not where pyoverlay puts
    them: :func:`check_record`)."""
    if not valid_id(cid):
        return None
    path = _file(cid)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    try:
        check_record(rec, cid)
        Record.from_dict(rec)  # the field types
    except StateError:
        return None
    return rec


def load_record(cid: str) -> Record | None:
    """:func:`load` as a :class:`Record`."""
    rec = load(cid)
    if rec is None:
        return None
    try:
        return Record.from_dict(rec)
    except StateError:
        return None


def find(ref: str) -> Record:
    """:func:`resolve` as a :class:`Record` (StateError if there is none)."""
    return Record.from_dict(resolve(ref))


#: record fields naming a path pyoverlay made in the container's data dir
_DATA_PATHS = {"merged": "merged", "init_layer": "init"}


def check_record(rec, cid: str | None = None) -> None:
    """StateError unless *rec* has a record's shape: a dict whose id is *cid*, whose
    ``data_dir`` is exactly ``<data root>/containers/<id>`` and whose merged, init layer,
    (generated) upper and workdir are exactly where the monitor puts them. Paths are
    compared as strings after checking they are absolute and have no ``.``/``..``
    component (no resolution: symlinks are refused when the tree is opened)."""
    if not isinstance(rec, dict) or not valid_id(rec.get("id")) or (cid is not None and rec["id"] != cid):
        raise StateError("not a container record")
    data = rec.get("data_dir")
    if data is None:
        return
    want = container_dir(rec["id"])
    if data != want:
        raise StateError(f"container {rec['id'][:12]}: its data dir {data!r} is not {want}")
    spec = rec.get("spec")
    if not isinstance(spec, dict):
        spec = {}
    expect = dict(_DATA_PATHS)
    if not spec.get("upper_given"):
        expect.update(upper="upper", workdir="work")
    for key, value in rec.items():
        if key in expect and value is not None and value != os.path.join(want, expect[key]):
            raise StateError(f"container {rec['id'][:12]}: its {key} {value!r} is not in its data dir")
    for key in ("upper", "workdir", "trace_file"):
        v = rec.get(key)
        if v is not None and not _clean_abs(v):
            raise StateError(f"container {rec['id'][:12]}: its {key} {v!r} is not a clean absolute path")


def _clean_abs(path) -> bool:
    return (
        isinstance(path, str)
        and path.startswith("/")
        and "\0" not in path
        and not any(p in (".", "..") for p in path.split("/"))
    )


def all_records() -> list[dict]:
    d = records_dir()
    try:
        names = os.listdir(d)
    except OSError as e:
        raise StateError(f"cannot read the state dir {d}: {e.strerror}") from None
    out = []
    for cid in names:
        rec = load(cid)
        if rec is not None:
            out.append(rec)
    return sorted(out, key=lambda r: r.get("created", 0) if isinstance(r.get("created", 0), (int, float)) else 0)


def status(rec: Record | dict) -> str:
    """created | running | exited | dead (its monitor is gone without recording an exit).
    A record created by the API and not started yet has no monitor: "created"."""
    if isinstance(rec, Record):
        rec = rec.to_dict()
    st = rec.get("status", "created")
    if st == "created" and rec.get("monitor_pid") is None:
        return st  # created through the API (runner/api/containers.py): no monitor yet
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


def remove(rec: Record | dict) -> None:
    """Delete the record and the container's data dir (never a user-given --upper). Only
    a record of the right shape (:func:`check_record`) gets its data dir removed, and
    only ``<data root>/containers/<id>``, through fds opened beneath the data dir."""
    if isinstance(rec, Record):
        rec = rec.to_dict()
    check_record(rec)
    if rec.get("data_dir"):
        remove_container_data(rec["id"])
    rd = records_dir()
    fd = os.open(rd, _O_DIR)
    try:
        rmtree_at(fd, rec["id"])
    finally:
        os.close(fd)


def remove_container_data(cid: str) -> None:
    """rm -r ``<data root>/containers/<cid>``, refused while anything is mounted below
    (it would empty the mounted tree)."""
    if not valid_id(cid):
        raise StateError(f"invalid container id {cid!r}")
    parent = data_dir()
    path = os.path.join(parent, cid)
    left = mounts_under(os.path.join(os.path.realpath(parent), cid))
    if left:
        raise StateError(f"{left[0]} is still mounted; not removing {path}")
    fd = os.open(parent, _O_DIR)
    try:
        rmtree_at(fd, cid)
    finally:
        os.close(fd)


def rmtree_at(parent_fd: int, name: str) -> None:
    """Remove *name* in the directory *parent_fd* and everything below it, best effort
    (like ``rm -rf``): every step is relative to a directory fd opened with O_NOFOLLOW, so
    a symlink anywhere is removed, never followed; a directory on another filesystem (a
    mount) stops it with StateError. Directories made unreadable or read-only (an image's,
    a container's) are opened up first when they are ours. Iterative: a deep tree costs
    one fd per level, never Python's recursion limit."""
    dev = os.fstat(parent_fd).st_dev
    top = _open_child(parent_fd, name, dev)
    if top is None:
        return
    stack = [(parent_fd, name, top, iter(_names(top)), False)]
    try:
        while stack:
            pfd, dname, fd, names, opened = stack[-1]
            n = next(names, None)
            if n is None:
                stack.pop()
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.rmdir(dname, dir_fd=pfd)
                continue
            for _ in range(2):
                try:
                    os.unlink(n, dir_fd=fd)
                except FileNotFoundError:
                    pass
                except PermissionError:
                    if not opened:  # a read-only directory of ours: open it up, once
                        stack[-1] = (pfd, dname, fd, names, True)
                        opened = True
                        with contextlib.suppress(OSError):
                            _open_up(fd)
                        continue
                except OSError as e:
                    if e.errno == errno.EISDIR:
                        child = _open_child(fd, n, dev)
                        if child is not None:
                            stack.append((fd, n, child, iter(_names(child)), False))
                break
    finally:
        for _pfd, _n, fd, _names_it, _o in stack:
            os.close(fd)


def _open_child(parent_fd: int, name: str, dev: int) -> int | None:
    """An fd on the directory *name* (None: gone, unusable, or not a directory, which is
    then unlinked); StateError if it is on another filesystem."""
    fd = None
    for _ in range(2):
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent_fd)
            break
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=parent_fd)
                return None
            if e.errno != errno.EACCES or not _open_up_at(parent_fd, name):
                return None
    if fd is None:
        return None
    if os.fstat(fd).st_dev != dev:
        os.close(fd)
        raise StateError(f"{name}: another filesystem is mounted there; not removing it")
    return fd


def _names(fd: int) -> list[str]:
    try:
        return os.listdir(fd)
    except PermissionError:
        with contextlib.suppress(OSError):
            _open_up(fd)
            return os.listdir(fd)
    except OSError:
        pass
    return []


def _open_up(fd: int) -> None:
    st = os.fstat(fd)
    os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)


def _open_up_at(parent_fd: int, name: str) -> bool:
    """chmod u+rwx a directory we cannot open, through an O_PATH fd on it (the directory
    itself, never a symlink): True if that worked."""
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | 0o700)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
