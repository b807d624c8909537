"""Cgroups for containers: memory, pids and cpu limits, membership, cleanup.

Linux offers cgroups in three layouts, all read from /proc/self/mountinfo:

* v1: one ``cgroup`` mount per hierarchy, each holding one or more
  controllers, named in the mount's super options (``rw,memory``; cpu is
  often co-mounted with cpuacct: ``rw,cpu,cpuacct``).  A container gets a
  directory in every hierarchy it uses, and the limit files are
  per-controller (``memory.limit_in_bytes``, ``pids.max``,
  ``cpu.cfs_quota_us``).
* v2: a single ``cgroup2`` mount; one directory per container.  A controller
  must be listed in the parent's ``cgroup.subtree_control`` before its files
  (``memory.max``, ``pids.max``, ``cpu.max``) appear in the children.
* hybrid: v1 hierarchies plus a cgroup2 mount (usually
  /sys/fs/cgroup/unified) that holds whatever controllers v1 did not claim.
  A controller lives in exactly one of them; v1 is used when it has it.

The container's cgroup is ``<hierarchy>/<parent>/<name>`` (like docker's
/docker/<id>), never nested under the caller's own cgroup: the caller may
sit in a cgroup with its own limits, be moved by a service manager, or be a
v2 cgroup holding processes (a v2 cgroup with processes may not enable
controllers for children).  A container must outlive and not be charged to
whoever launched it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from dataclasses import dataclass
from fractions import Fraction

from overlayfs_py.mountinfo import mounts
from overlayfs_py.mountinfo import parse as parse_mountinfo

from . import _linux as L
from .errors import RunnerError

PERIOD = 100000  # cpu period in microseconds, as docker
CONTROLLERS = ("memory", "pids", "cpu")
_MOUNT_FLAGS = {
    "rw",
    "ro",
    "noprefix",
    "clone_children",
    "xattr",
    "cpuset_v2_mode",
    "favordynmods",
    "nsdelegate",
    "memory_recursiveprot",
}

#: docker's default device rules (moby oci/defaults.go ``deny a`` plus its allow list,
#: and runc's specconv.AllowedDevices appended to it): everything else is EPERM, on
#: mknod as on open. ``(type, major, minor, access)``, None for "*".
DEVICE_RULES = (
    ("c", None, None, "m"),
    ("b", None, None, "m"),  # mknod of any node; no open
    ("c", 1, 3, "rwm"),
    ("c", 1, 5, "rwm"),
    ("c", 1, 7, "rwm"),  # null zero full
    ("c", 1, 8, "rwm"),
    ("c", 1, 9, "rwm"),  # random urandom
    ("c", 5, 0, "rwm"),
    ("c", 5, 1, "rwm"),
    ("c", 5, 2, "rwm"),  # tty console ptmx
    ("c", 136, None, "rwm"),  # /dev/pts/*
    ("c", 10, 200, "rwm"),  # /dev/net/tun
)


def device_rule_text(rule) -> str:
    """A rule in the v1 ``devices.allow`` spelling: ``c 1:3 rwm``, ``b *:* m``."""
    kind, major, minor, access = rule
    star = lambda n: "*" if n is None else str(n)  # noqa: E731
    return f"{kind} {star(major)}:{star(minor)} {access}"


class CgroupError(RunnerError):
    """A cgroup could not be set up, used or removed (one-line message)."""


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    pids: int | None = None
    cpus: float | None = None  # 0.5 -> 50000us every 100000us

    def __post_init__(self):
        for field in ("memory", "pids", "cpus"):
            value = getattr(self, field)
            if value is not None and not 0 < value < float("inf"):
                raise ValueError(f"{field} limit must be positive, not {value!r}")
        if self.cpus is not None and int(self.cpus * PERIOD) < 1000:
            raise ValueError(f"cpus limit must be at least 0.01, not {self.cpus!r}")

    def any(self) -> bool:
        return any(v is not None for v in (self.memory, self.pids, self.cpus))


def parse_size(text: str) -> int:
    """Docker's size spelling: "1024", "10b", "512k", "64m", "1g", "1.5g", "64MiB" (any case)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit b, k, m, g or t (e.g. 64m)")
    value = int(Fraction(m[1]) * 1024 ** " kmgt".index((m[2] or " ").lower()))
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return value


@dataclass(frozen=True)
class Layout:
    mode: str  # "v1" | "v2" | "hybrid" | "none"
    v1: dict[str, str]  # controller -> mount point of its hierarchy
    v2_root: str | None  # cgroup2 mount point
    v2_controllers: frozenset[str]  # from <v2_root>/cgroup.controllers
    #: every v1 hierarchy: (mount point, what it holds: "memory", "cpu,cpuacct",
    #: "name=systemd"), in mountinfo's order
    v1_hierarchies: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        v1 = ", ".join(sorted(self.v1)) or "none"
        v2 = (
            f"cgroup2 at {self.v2_root} offers: {', '.join(sorted(self.v2_controllers)) or 'none'}"
            if self.v2_root
            else "no cgroup2 mount"
        )
        return f"v1 controllers: {v1}; {v2}"


#: tests: "v2" makes :func:`detect` see a hybrid host's cgroup2 tree only (as on a unified
#: host: limits, cgroup namespace default and /sys/fs/cgroup of v2), unset: the real layout
LAYOUT_ENV = "PYOVERLAY_CGROUP_LAYOUT"


def detect(mountinfo: str | None = None) -> Layout:
    """The cgroup layout described by /proc/self/mountinfo (or the given text;
    ``$PYOVERLAY_CGROUP_LAYOUT=v2`` applies to the real one only)."""
    v1: dict[str, str] = {}
    hierarchies: dict[str, str] = {}  # mount point -> what it holds (a bind of one counts once)
    v2_root = None
    for m in mounts() if mountinfo is None else parse_mountinfo(mountinfo):
        if m.fstype == "cgroup2" and v2_root is None:
            v2_root = m.mountpoint
        elif m.fstype == "cgroup":
            held = []
            for opt in m.super_options.split(","):
                if opt and opt not in _MOUNT_FLAGS and "=" not in opt:
                    v1.setdefault(opt, m.mountpoint)
                    held.append(opt)
                elif opt.startswith("name="):
                    held.append(opt)
            if held and ",".join(held) not in hierarchies.values():
                hierarchies[m.mountpoint] = ",".join(held)
    if mountinfo is None and v2_root is not None and os.environ.get(LAYOUT_ENV) == "v2":
        v1, hierarchies = {}, {}
    controllers: frozenset[str] = frozenset()
    if v2_root is not None:
        try:
            with open(os.path.join(v2_root, "cgroup.controllers")) as f:
                controllers = frozenset(f.read().split())
        except OSError:
            pass
    mode = "hybrid" if v1 and v2_root else "v1" if v1 else "v2" if v2_root else "none"
    return Layout(mode, v1, v2_root, controllers, tuple(hierarchies.items()))


# --- the cgroup namespace ------------------------------------------------------------------------

CGROUPNS_MODES = ("private", "host")


def default_cgroupns(layout: Layout | None = None) -> str:
    """dockerd's default ``--cgroupns``: ``private`` on a cgroup v2 (unified) host,
    ``host`` on v1 or hybrid (moby daemon/config: DefaultCgroupNamespaceMode). The one
    place the host's mode decides it (run, serve's create, ``docker info``)."""
    layout = layout or detect()
    return "private" if layout.mode == "v2" else "host"


def cgroup_version(layout: Layout | None = None) -> str:
    """``docker info``'s CgroupVersion: "2" on a unified host, else "1"."""
    return "2" if (layout or detect()).mode == "v2" else "1"


@dataclass(frozen=True)
class CgroupMount:
    """One mount of the container's ``/sys/fs/cgroup`` (docs/runner.md, "Cgroup namespace")."""

    name: str  # under /sys/fs/cgroup: "memory", "cpu,cpuacct", "systemd"; "" for cgroup2 itself
    fstype: str  # "cgroup" (a v1 hierarchy) | "cgroup2"
    data: str  # v1: what the hierarchy holds ("memory", "name=systemd"); cgroup2: ""
    source: str  # the container's own cgroup directory in it, on the host


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """/proc/PID/cgroup as {hierarchy ("memory", "cpu,cpuacct", "name=systemd", "" for v2): path}."""
    out = {}
    for line in proc_cgroup.splitlines():
        _, held, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if path.startswith("/"):
            out[held] = path
    return out


def container_mounts(own_dirs: frozenset[str] | None, layout: Layout | None = None, pid: str = "self"):
    """What the container's ``/sys/fs/cgroup`` shows, read from ``/proc/PID/cgroup`` before
    its cgroup namespace is made (runc reads the same): on v1 or hybrid one mount per v1
    hierarchy in which the process is in one of *own_dirs* (the container's cgroup; a
    hierarchy it was not put in would show the caller's cgroup, or the host's root), on
    v2 the cgroup2 tree; the unified tree of a hybrid host is left out, as runc does.
    *own_dirs* None (a rootless container without a cgroup): every hierarchy, at the
    caller's own cgroup (what its user may see anyway)."""
    layout = layout or detect()
    own = _own_paths(_read(f"/proc/{pid}/cgroup") or "")

    def where(mountpoint: str, held: str) -> str | None:
        path = own.get(held)
        if path is None:
            return None
        d = os.path.join(mountpoint, path.lstrip("/")).rstrip("/")
        return d if own_dirs is None or d in own_dirs else None

    if layout.mode == "v2" and layout.v2_root is not None:
        d = where(layout.v2_root, "")
        return (CgroupMount("", "cgroup2", "", d),) if d else ()
    out = []
    for mountpoint, held in layout.v1_hierarchies:
        d = where(mountpoint, held)
        if d is not None:
            out.append(CgroupMount(os.path.basename(mountpoint), "cgroup", held, d))
    return tuple(out)


def _check_component(what: str, value: str) -> None:
    if not value or "/" in value or "\0" in value or value in (".", ".."):
        raise ValueError(f"invalid cgroup {what} {value!r}: must be a single path component")


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise CgroupError(f"cannot write {text!r} to {path}: {e.strerror}") from None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


@dataclass
class Cgroup:
    name: str
    paths: dict[str, str]  # "memory"/"pids"/"cpu"/"unified" -> directory

    @classmethod
    def plan(
        cls,
        name: str,
        limits: Limits,
        layout: Layout | None = None,
        parent: str = "pyoverlay",
        devices: bool = False,
        every_hierarchy: bool = False,
    ) -> CgroupPlan:
        """Decide the cgroup's directories without creating anything: CgroupError (or
        ValueError for a bad name) when the layout cannot give what is asked. *devices*:
        restrict device access to DEVICE_RULES (docker's defaults): the v1 ``devices``
        controller where there is one, else a BPF device program on the cgroup v2
        directory. *every_hierarchy*: a directory in every other v1 hierarchy too
        (cpuacct, cpuset, freezer, name=systemd...), as docker makes, so that the
        container's /sys/fs/cgroup shows its own cgroup in each; those are made when
        possible (:meth:`CgroupPlan.create`), never required."""
        _check_component("name", name)
        _check_component("parent", parent)
        layout = layout or detect()
        unified = os.path.join(layout.v2_root, parent, name) if layout.v2_root else None
        bpf_devices = devices and "devices" not in layout.v1
        if bpf_devices and unified is None:
            raise CgroupError(
                "cannot restrict device access: no devices controller (cgroup v1) "
                f"and no cgroup2 mount for a BPF device program; {layout.describe()}"
            )
        paths: dict[str, str] = {}
        v2_used: list[str] = []
        for ctrl in CONTROLLERS:
            if ctrl in layout.v1:
                paths[ctrl] = os.path.join(layout.v1[ctrl], parent, name)
            elif ctrl in layout.v2_controllers and unified is not None:  # read from v2_root
                paths[ctrl] = unified
                v2_used.append(ctrl)
            elif getattr(limits, "cpus" if ctrl == "cpu" else ctrl) is not None:
                raise CgroupError(
                    f"cannot limit {ctrl}: no {ctrl} controller in "
                    f"/proc/self/mountinfo (cgroup v1 or v2); {layout.describe()}"
                )
        if devices and not bpf_devices:
            paths["devices"] = os.path.join(layout.v1["devices"], parent, name)
        if unified and (v2_used or layout.mode == "v2" or bpf_devices):
            paths["unified"] = unified
        if not paths:
            raise CgroupError(
                f"cannot create cgroup {name}: no cgroup hierarchy with memory, pids or cpu; {layout.describe()}"
            )
        optional = []
        if every_hierarchy:
            for mountpoint, held in layout.v1_hierarchies:
                d = os.path.join(mountpoint, parent, name)
                if d not in paths.values() and held not in paths:
                    paths[held] = d
                    optional.append(held)
        return CgroupPlan(name, paths, limits, devices, tuple(v2_used), layout.v2_root, tuple(optional))

    @classmethod
    def create(
        cls, name: str, limits: Limits, layout: Layout | None = None, parent: str = "pyoverlay", devices: bool = False
    ) -> Cgroup:
        """:meth:`plan`, then :meth:`CgroupPlan.create`; CgroupError if either fails."""
        return cls.plan(name, limits, layout, parent, devices).create()

    def _write_limits(self, limits: Limits) -> None:
        v2 = {c: self.paths.get(c) == self.paths.get("unified") for c in CONTROLLERS}
        if limits.memory is not None:
            f = "memory.max" if v2["memory"] else "memory.limit_in_bytes"
            _write(os.path.join(self.paths["memory"], f), str(limits.memory))
        if limits.pids is not None:
            _write(os.path.join(self.paths["pids"], "pids.max"), str(limits.pids))
        if limits.cpus is not None:
            quota, d = int(limits.cpus * PERIOD), self.paths["cpu"]
            if v2["cpu"]:
                _write(os.path.join(d, "cpu.max"), f"{quota} {PERIOD}")
            else:
                _write(os.path.join(d, "cpu.cfs_period_us"), str(PERIOD))
                _write(os.path.join(d, "cpu.cfs_quota_us"), str(quota))

    def _restrict_devices(self) -> None:
        """Before any process joins: deny everything, then allow DEVICE_RULES."""
        if "devices" in self.paths:
            d = self.paths["devices"]
            _write(os.path.join(d, "devices.deny"), "a")
            for rule in DEVICE_RULES:
                _write(os.path.join(d, "devices.allow"), device_rule_text(rule))
            return
        try:
            L.attach_device_filter(self.paths["unified"], DEVICE_RULES)
        except OSError as e:
            raise CgroupError(
                f"cannot restrict device access on {self.paths['unified']}: "
                f"{e.strerror} (no v1 devices controller; the cgroup v2 BPF device "
                "program could not be attached)"
            ) from None

    @classmethod
    def from_dict(cls, d: dict) -> Cgroup:
        paths = d.get("paths") if isinstance(d, dict) else None
        if (
            not isinstance(paths, dict)
            or not isinstance(d.get("name"), str)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in paths.items())
        ):
            raise CgroupError(f"invalid saved cgroup state: {d!r}")
        return cls(d["name"], dict(paths))

    def to_dict(self) -> dict:
        return {"name": self.name, "paths": dict(self.paths)}

    def _dirs(self) -> list[str]:
        return list(dict.fromkeys(self.paths.values()))  # unique, in order

    def add(self, pid: int) -> None:
        for d in self._dirs():
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def procs(self) -> list[int]:
        pids: set[int] = set()
        for d in self._dirs():
            pids.update(int(p) for p in (_read(os.path.join(d, "cgroup.procs")) or "").split())
        return sorted(pids)

    def _read_file(self, ctrl: str, v1_file: str, v2_file: str) -> str:
        d = self.paths.get(ctrl)
        if d is None:
            return ""
        return _read(os.path.join(d, v2_file if d == self.paths.get("unified") else v1_file)) or ""

    def oom_killed(self) -> bool:
        for line in self._read_file("memory", "memory.oom_control", "memory.events").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        return False

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process; for SIGKILL, repeat until none is left (~2 s at most)."""
        unified = self.paths.get("unified")
        if sig == signal.SIGKILL and unified and os.path.exists(os.path.join(unified, "cgroup.kill")):
            _write(os.path.join(unified, "cgroup.kill"), "1")
        deadline = time.monotonic() + 2.0
        while pids := self.procs():
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig != signal.SIGKILL or time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def remove(self, timeout: float = 5.0) -> None:
        """rmdir every directory, retrying while busy; missing ones are fine."""
        deadline = time.monotonic() + timeout
        for d in self._dirs():
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.01)
                        continue
                    left = _read(os.path.join(d, "cgroup.procs"))
                    procs = f" (processes: {' '.join(left.split())})" if left and left.split() else ""
                    raise CgroupError(f"cannot remove cgroup {d}: {e.strerror}{procs}") from None


@dataclass(frozen=True)
class CgroupPlan:
    """A container's cgroup as decided by :meth:`Cgroup.plan`, not created yet."""

    name: str
    paths: dict[str, str]  # as Cgroup.paths
    limits: Limits
    devices: bool  # restrict device access (DEVICE_RULES)
    v2_enable: tuple[str, ...]  # controllers to enable in cgroup.subtree_control
    v2_root: str | None
    optional: tuple[str, ...] = ()  # keys of paths made when possible (every_hierarchy)

    def create(self) -> Cgroup:
        """mkdir every directory, write the limits and the device rules; on failure
        remove what was made and raise CgroupError. An optional directory that cannot
        be made is left out of the cgroup."""
        cg, created = Cgroup(self.name, dict(self.paths)), []
        unified = self.paths.get("unified")
        enable = " ".join("+" + c for c in self.v2_enable)
        optional = {self.paths[k] for k in self.optional}
        try:
            if self.v2_enable and self.v2_root is not None:  # v2 controllers come with a v2 root
                _write(os.path.join(self.v2_root, "cgroup.subtree_control"), enable)
            for d in cg._dirs():
                if d in optional:
                    if _make_optional(d):
                        created.append(d)
                    else:
                        cg.paths = {k: v for k, v in cg.paths.items() if v != d}
                    continue
                os.makedirs(os.path.dirname(d), exist_ok=True)
                if self.v2_enable and d == unified:
                    _write(os.path.join(os.path.dirname(d), "cgroup.subtree_control"), enable)
                try:
                    os.mkdir(d)
                except FileExistsError:
                    raise CgroupError(
                        f"cgroup {d} already exists (another container with this name, or a leftover: rmdir it)"
                    ) from None
                created.append(d)
            cg._write_limits(self.limits)
            if self.devices:
                cg._restrict_devices()
        except (OSError, CgroupError) as e:
            for d in reversed(created):  # cgroupfs rmdir ignores the control files
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            if isinstance(e, CgroupError):
                raise
            raise CgroupError(f"cannot create cgroup {e.filename}: {e.strerror}") from None
        return cg


def _make_optional(d: str) -> bool:
    """mkdir *d* (and its parent) in a hierarchy no limit needs; a v1 cpuset directory gets
    its parent's cpus and mems (a new one has none, and no process may join it), as runc
    does. False (nothing left) if that cannot be done."""
    parent = os.path.dirname(d)
    try:
        os.makedirs(parent, exist_ok=True)
        _inherit_cpuset(parent)
        os.mkdir(d)
    except OSError:
        return False
    try:
        _inherit_cpuset(d)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(d)
        return False
    return True


def _inherit_cpuset(d: str) -> None:
    for f in ("cpuset.cpus", "cpuset.mems"):
        mine = _read(os.path.join(d, f))
        if mine is not None and not mine.strip():
            with open(os.path.join(d, f), "w") as out:
                out.write(_read(os.path.join(os.path.dirname(d), f)) or "")


def _own_cgroup_v2() -> str | None:
    """The caller's cgroup in the v2 hierarchy ("0::/path" in /proc/self/cgroup)."""
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def check_rootless(limits: Limits, layout: Layout | None = None) -> tuple[str, list[str]]:
    """Whether a rootless container can have a cgroup with limits: only in a cgroup v2 subtree
    delegated to the user (systemd's ``user@UID.service``: the parent of the caller's own
    cgroup, writable by the user, with the controllers enabled for it). The cgroup is
    ``<that parent>/pyoverlay-<name>``. On cgroup v1 (or hybrid, where the controllers are
    v1's) an ordinary user cannot be given a cgroup: refused, naming what to change.
    This checks (CgroupError) and returns the delegated parent and the controllers wanted;
    :func:`create_rootless` creates the cgroup."""
    layout = layout or detect()
    wanted = [c for c, v in (("memory", limits.memory), ("pids", limits.pids), ("cpu", limits.cpus)) if v is not None]
    flags = {"memory": "--memory", "pids": "--pids-limit", "cpu": "--cpus"}
    opts = "/".join(flags[c] for c in wanted)
    v1 = [c for c in wanted if c in layout.v1]
    if v1 or layout.v2_root is None:
        raise CgroupError(
            f"{opts} cannot be used without root here: cgroup v1 ({', '.join(v1) or 'no cgroup2'}) "
            "cannot be delegated to an ordinary user (run as root, or boot with cgroup v2 "
            "and a delegated subtree: systemd.unified_cgroup_hierarchy=1)"
        )
    own = _own_cgroup_v2()
    base = os.path.dirname(os.path.join(layout.v2_root, (own or "/").lstrip("/")).rstrip("/"))
    base_ctrls = (_read(os.path.join(base, "cgroup.controllers")) or "").split()
    missing = [c for c in wanted if c not in base_ctrls]
    if own is None or not os.access(os.path.join(base, "cgroup.subtree_control"), os.W_OK) or missing:
        why = (
            f"controllers {', '.join(missing)} are not delegated to {base}"
            if missing and own
            else f"{base} is not a cgroup v2 subtree delegated to this user"
        )
        raise CgroupError(
            f"{opts} cannot be used without root here: {why} (with systemd: "
            "Delegate=yes in user@.service, or run as root)"
        )
    return base, wanted


def create_rootless(name: str, limits: Limits, layout: Layout | None = None) -> Cgroup:
    """:func:`check_rootless`, then make ``<delegated parent>/pyoverlay-<name>`` with the limits."""
    base, wanted = check_rootless(limits, layout)
    _check_component("name", name)
    d = os.path.join(base, f"pyoverlay-{name}")
    _write(os.path.join(base, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))
    try:
        os.mkdir(d)
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {d}: {e.strerror}") from None
    cg = Cgroup(name, {**{c: d for c in wanted}, "unified": d})
    try:
        cg._write_limits(limits)
    except CgroupError:
        cg.remove()
        raise
    return cg
