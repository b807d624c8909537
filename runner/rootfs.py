"""Inside the container's new mount namespace: build the root and pivot into it.

Runs in the container's PID 1 before ``execve`` (docs/runner.md, steps 6-8). Order
matters: ``/proc`` must be mounted while the host's proc is still visible, every mount
happens under the new root before ``pivot_root``, and ``pivot_root(".", ".")`` needs
no scratch directory in the merged root (one would land in the upper layer).

Mount targets are resolved with ``openat2(RESOLVE_IN_ROOT)`` against the new root and
mounted through ``/proc/self/fd/N``: a symlink in the image (``/etc/hosts -> /x``)
resolves inside the container, never onto the host (what runc's securejoin does). So a
failing ``mount(2)`` would name ``/proc/self/fd/N``: the callers name the step and the
path inside the container instead (:func:`runner.container.step`, ``mounting volume
/data: ...``), as bubblewrap does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import TYPE_CHECKING

from overlayfs_py import _sys

from . import _linux as L
from .errors import RunnerError

if TYPE_CHECKING:
    from .cgroups import CgroupMount
    from .plan import VolumeMount

RESOLVE_IN_ROOT = 0x10

_NOSUID_NODEV_NOEXEC = L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC

DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
#: docker's maskedPaths / readonlyPaths (moby oci/defaults.go)
MASKED = (
    "proc/asound",
    "proc/acpi",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
)
READ_ONLY = ("proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger")


class Target:
    """An O_PATH fd on a mount target inside the new root, used as /proc/self/fd/N."""

    def __init__(self, root_fd: int, path: str, must_exist: bool = True):
        self.fd = -1
        try:
            self.fd = _sys.openat2(
                root_fd,
                os.fsencode(path.lstrip("/") or "."),
                _sys.O_PATH | os.O_CLOEXEC,
                0,
                RESOLVE_IN_ROOT | _sys.RESOLVE_NO_MAGICLINKS,
            )
        except OSError:
            if must_exist:
                raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd >= 0:
            os.close(self.fd)

    @property
    def ok(self) -> bool:
        return self.fd >= 0

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def is_dir(self) -> bool:
        return stat.S_ISDIR(os.fstat(self.fd).st_mode)


def make_private() -> None:
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)


def bind_root(root: str) -> None:
    """The merged mount, bound onto itself: the container's own root mount (so a
    read-only remount of it leaves the host's mount alone)."""
    L.mount(root, root, None, L.MS_BIND | L.MS_REC)


def mount_proc(root_fd: int, privileged: bool) -> None:
    with Target(root_fd, "proc") as t:
        L.mount("proc", t.path, "proc", _NOSUID_NODEV_NOEXEC)


def mount_dev(root_fd: int, bind_devices: bool = False) -> None:
    """A tmpfs ``/dev`` with the usual devices. *bind_devices* (a user namespace, where
    ``mknod`` is refused): bind the host's device nodes onto empty files instead."""
    with Target(root_fd, "dev") as t:
        # nosuid,noexec (docker: nosuid only); not nodev: the nodes below must work.
        # What may be opened is up to the device cgroup (runner/cgroups.py DEVICE_RULES)
        L.mount("tmpfs", t.path, "tmpfs", L.MS_NOSUID | L.MS_NOEXEC | L.MS_STRICTATIME, "mode=755,size=65536k")
    # resolve again: the old fd names the directory the tmpfs now covers
    dev = Target(root_fd, "dev").fd
    try:
        base = f"/proc/self/fd/{dev}"
        for name, major, minor in DEVICES:
            if bind_devices:
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o666, dir_fd=dev))
                L.mount(f"/dev/{name}", f"{base}/{name}", None, L.MS_BIND)
                continue
            os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=dev)
            os.chmod(name, 0o666, dir_fd=dev)
        for name, target in DEV_LINKS:
            os.symlink(target, name, dir_fd=dev)
        for name, mode in (("pts", 0o755), ("shm", 0o1777), ("mqueue", 0o755)):
            os.mkdir(name, mode, dir_fd=dev)
        # gid=5 (tty) must exist in the user namespace's map (a single-id map has only 0)
        tty_gid = ",gid=5" if not bind_devices or _gid_mapped(5) else ""
        L.mount(
            "devpts",
            f"{base}/pts",
            "devpts",
            L.MS_NOSUID | L.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620" + tty_gid,
        )
        L.mount("shm", f"{base}/shm", "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=1777,size=65536k")
        try:
            L.mount("mqueue", f"{base}/mqueue", "mqueue", _NOSUID_NODEV_NOEXEC)
        except OSError:
            pass  # no mqueue support in this kernel: docker's /dev/mqueue is optional too
    finally:
        os.close(dev)


def _gid_mapped(gid: int) -> bool:
    try:
        with open("/proc/self/gid_map") as f:
            lines = [line.split() for line in f]
    except OSError:
        return True
    return any(len(p) == 3 and int(p[0]) <= gid < int(p[0]) + int(p[2]) for p in lines)


def mount_sys(root_fd: int) -> None:
    with Target(root_fd, "sys") as t:
        try:
            L.mount("sysfs", t.path, "sysfs", _NOSUID_NODEV_NOEXEC | L.MS_RDONLY)
        except PermissionError:  # sharing the host's net ns without owning it: bind it
            L.mount("/sys", t.path, None, L.MS_BIND | L.MS_REC)
            _remount_ro(root_fd, "sys", _NOSUID_NODEV_NOEXEC)


def mount_cgroup(root_fd: int, mounts: tuple[CgroupMount, ...], private: bool, rootless: bool) -> None:
    """``/sys/fs/cgroup``, read-only, as runc shows it (docs/runner.md, "Cgroup namespace").
    v1 or hybrid: a tmpfs holding one directory per hierarchy: with a private cgroup
    namespace the hierarchy itself mounted there (its root is the container's cgroup),
    else a bind of the container's own directory in it. v2: the cgroup2 tree mounted
    there (bound at the container's directory where it cannot be mounted). Rootless
    (no v1 hierarchy can be mounted in a user namespace): binds only, and anything
    refused leaves ``/sys/fs/cgroup`` as sysfs shows it."""
    try:
        _mount_cgroup(root_fd, mounts, private and not rootless, rootless)
    except OSError:
        if not rootless:
            raise
        with Target(root_fd, "sys/fs/cgroup", must_exist=False) as t:
            if t.ok:  # the tmpfs (or cgroup2 bind) and all below it; EINVAL if none was made
                with contextlib.suppress(OSError):
                    L.umount2(t.path, L.MNT_DETACH)


_CGROUP_FLAGS = _NOSUID_NODEV_NOEXEC | L.MS_RDONLY


def _mount_cgroup(root_fd: int, mounts: tuple[CgroupMount, ...], private: bool, rootless: bool) -> None:
    with Target(root_fd, "sys/fs/cgroup", must_exist=False) as t:
        if not t.ok:
            return  # a kernel without cgroups: nothing to show
        if mounts and mounts[0].fstype == "cgroup2":
            try:
                L.mount("cgroup2", t.path, "cgroup2", _CGROUP_FLAGS)
                return
            except PermissionError:  # a cgroup namespace it does not own (rootless, host mode)
                pass
            L.mount(mounts[0].source, t.path, None, L.MS_BIND | L.MS_REC)
        else:
            L.mount("tmpfs", t.path, "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=755")
    if mounts and mounts[0].fstype == "cgroup2":
        _remount_ro(root_fd, "sys/fs/cgroup", _NOSUID_NODEV_NOEXEC)
        return
    with Target(root_fd, "sys/fs/cgroup") as top:  # the tmpfs (a fresh lookup)
        for m in mounts:
            os.mkdir(m.name, 0o755, dir_fd=top.fd)
            target = f"{top.path}/{m.name}"
            if private:  # runc: source "systemd" for the systemd hierarchy, else "cgroup"
                source = "systemd" if m.data == "name=systemd" else "cgroup"
                L.mount(source, target, "cgroup", _CGROUP_FLAGS, m.data)
            else:
                L.mount(m.source, target, None, L.MS_BIND)
                _remount_ro(root_fd, f"sys/fs/cgroup/{m.name}", _NOSUID_NODEV_NOEXEC)
        for m in mounts:  # co-mounted controllers: cpu -> cpu,cpuacct (as runc links them)
            if "," in m.name:
                for ctl in m.name.split(","):
                    if ctl not in {x.name for x in mounts}:
                        os.symlink(m.name, ctl, dir_fd=top.fd)
    _remount_ro(root_fd, "sys/fs/cgroup", _NOSUID_NODEV_NOEXEC)


def bind(root_fd: int, source: str, target: str, read_only: bool, *, must_exist: bool = True) -> bool:
    with Target(root_fd, target, must_exist) as t:
        if not t.ok:
            return False
        L.mount(source, t.path, None, L.MS_BIND | L.MS_REC)
    if read_only:
        _remount_ro(root_fd, target)
    return True


def _remount_ro(root_fd: int, path: str, extra: int = 0) -> None:
    # a fresh lookup: an fd opened before the bind names the covered directory, not the mount
    # and keep nosuid/nodev/noexec (in a user namespace dropping them is EPERM)
    with Target(root_fd, path) as t:
        keep = os.statvfs(t.path).f_flag & _NOSUID_NODEV_NOEXEC
        L.mount(None, t.path, None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | keep | extra)


class MountError(RunnerError):
    pass


def mount_volume(root_fd: int, v: VolumeMount) -> None:
    """Bind the volume *v* (its mount point exists: the init layer has it, or, on the
    /dev tmpfs, it is made here as the plan says: a directory or a file)."""
    if v.on_dev:  # on the container's tmpfs, not in any layer
        _make_mountpoint(root_fd, v.target, v.is_dir)
    bind(root_fd, v.source, v.target, v.read_only)


def _make_mountpoint(root_fd: int, path: str, is_dir: bool) -> None:
    parent, name = os.path.split(path)
    with Target(root_fd, parent) as t:
        try:
            if is_dir:
                os.mkdir(name, 0o755, dir_fd=t.fd)
            else:
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=t.fd))
        except FileExistsError:
            pass


def mask_paths(root_fd: int) -> None:
    """docker's defaults: hide kernel interfaces a container has no business with.
    MountError names the path that could not be masked."""
    for path in MASKED:
        try:
            _mask(root_fd, path)
        except OSError as e:
            raise MountError(f"masking /{path}: {e.strerror}") from None
    for path in READ_ONLY:
        try:
            with Target(root_fd, path, must_exist=False) as t:
                if t.ok:
                    L.mount(t.path, t.path, None, L.MS_BIND | L.MS_REC)
            if t.ok:
                _remount_ro(root_fd, path)
        except OSError as e:
            raise MountError(f"making /{path} read-only: {e.strerror}") from None


def _mask(root_fd: int, path: str) -> None:
    with Target(root_fd, path, must_exist=False) as t:
        if not t.ok:
            return
        if t.is_dir():
            L.mount("tmpfs", t.path, "tmpfs", L.MS_RDONLY)
        else:
            with Target(root_fd, "dev/null") as null:  # the container's own
                L.mount(null.path, t.path, None, L.MS_BIND)


def pivot(root: str) -> None:
    """``pivot_root(".", ".")``: the old root ends up stacked on the new one; detach it.
    After this the host's tree is unreachable."""
    os.chdir(root)
    L.pivot_root(".", ".")
    L.umount2(".", L.MNT_DETACH)
    os.chdir("/")


def remount_root_read_only() -> None:
    keep = os.statvfs("/").f_flag & _NOSUID_NODEV_NOEXEC
    L.mount(None, "/", None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | keep)


def loopback_up() -> None:
    """Bring ``lo`` up in the new network namespace (docker does; ping 127.0.0.1 works)."""
    import fcntl
    import socket
    import struct

    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifr)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def ensure_dir(path: str) -> None:
    """``-w DIR`` that does not exist is created, as docker does (it lands in upper)."""
    try:
        os.makedirs(path, 0o755, exist_ok=True)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
