"""The direct engine's mount and unmount: every way a /dev/fuse connection comes to be.

``mount_fuse(cfg)`` returns a :class:`FuseMount` for one of three ways, chosen as libfuse
chooses (``fuse_kern_mount``):

* **given**: ``cfg.fuse_fd`` is a /dev/fuse fd the caller has mounted already (the
  runner's rootless holder mounts it inside its user namespace). The engine serves it,
  never unmounts it, and ends when the kernel ends the connection (the holder's mount
  goes away).
* **mount(2)**: with CAP_SYS_ADMIN in this process's user namespace: root, or root of a
  user namespace that owns its mount namespace (FUSE may be mounted there). The engine
  opens /dev/fuse and calls mount(2) with ``fd=N,rootmode=,user_id=,group_id=``.
* **fusermount3**: an ordinary user (or mount(2) refused with EPERM, as libfuse falls
  back): the setuid ``fusermount3 -o OPTS -- MOUNTPOINT`` with ``_FUSE_COMMFD`` naming
  one end of a socketpair; fusermount3 opens /dev/fuse, mounts it (forcing nosuid,nodev)
  and sends the fd back over SCM_RIGHTS (libfuse's ``fuse_mount_fusermount``). Its
  unmount, ``fusermount3 -uz``, is unmount.py's (the one place that runs it).

``unmount_fuse`` undoes only what the engine mounted, and only while the kernel still
serves the connection: once the kernel has ended it (an unmount, DESTROY, or a fusectl
abort) nothing is unmounted, as libfuse's ``fuse_kern_unmount`` does. An aborted
connection leaves a dead mount (ENOTCONN), as a killed server does; ``pyoverlay umount``
removes it. Before unmounting, the mount on top at the mountpoint must still be the one
the engine made (its device number), so a mount stacked there since is never removed.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass

from .. import _sys, mountinfo, privilege
from ..config import MountConfig
from ..errors import PyoverlayError
from ..unmount import try_unmount

log = logging.getLogger(__name__)

FSTYPE = "fuse.pyoverlay"
SUBTYPE = "pyoverlay"
COMMFD_ENV = "_FUSE_COMMFD"

GIVEN = "given"
MOUNT2 = "mount(2)"
FUSERMOUNT = "fusermount3"


class DirectMountFailed(PyoverlayError):
    """The direct engine could not mount (one line)."""


@dataclass
class FuseMount:
    """A /dev/fuse connection the engine serves (``fd``) and how it came to be (``how``).
    ``devno`` ("major:minor", also the fusectl connection number's minor) is read from
    mountinfo after the engine's own mounts; None for a given fd."""

    fd: int
    mountpoint: str
    how: str
    devno: str | None = None

    @property
    def owned(self) -> bool:
        """Whether the engine mounted it (and so may unmount it)."""
        return self.how != GIVEN


_MS_FLAGS = {"nosuid": _sys.MS_NOSUID, "nodev": _sys.MS_NODEV, "noexec": _sys.MS_NOEXEC, "noatime": _sys.MS_NOATIME}


def mount_options(cfg: MountConfig, fd: int, root_mode: int) -> tuple[int, str]:
    """mount(2) flags and data for *cfg* on /dev/fuse *fd* (the options
    ``mount.fuse_options`` gives libfuse for the pyfuse3 engine)."""
    opts = [f"fd={fd}", f"rootmode={stat.S_IFMT(root_mode):o}", f"user_id={os.geteuid()}", f"group_id={os.getegid()}"]
    if cfg.default_permissions:
        opts.append("default_permissions")
    root = os.geteuid() == 0
    if cfg.allow_other or root:  # a kernel overlay is visible to every user (mount.fuse_options)
        opts.append("allow_other")
    flags = 0 if root else _sys.MS_NOSUID | _sys.MS_NODEV
    for name in cfg.mount_flags:  # mount.fuse.pyoverlay -o nosuid,nodev,noexec,noatime
        flags |= _MS_FLAGS[name]
    if cfg.read_only:
        flags |= _sys.MS_RDONLY
    return flags, ",".join(opts)


def _escape(value: str) -> str:
    """An option value as fusermount3 splits options: ``\\`` and ``,`` escaped."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def fusermount_options(cfg: MountConfig) -> str:
    """``-o`` for fusermount3: only options it accepts from an ordinary user (it adds
    ``fd``, ``rootmode``, ``user_id``, ``group_id`` and forces nosuid,nodev itself).
    ``allow_other`` only when asked for (``check_fuse_access`` has checked fuse.conf)."""
    opts = [f"fsname={_escape(cfg.fsname)}", f"subtype={SUBTYPE}"]
    if cfg.default_permissions:
        opts.append("default_permissions")
    if cfg.allow_other:
        opts.append("allow_other")
    opts.append("ro" if cfg.read_only else "rw")
    opts.extend(cfg.mount_flags)  # fusermount3 takes nosuid, nodev, noexec, noatime from anyone
    return ",".join(opts)


def mount_fuse(cfg: MountConfig) -> FuseMount:
    """The connection to serve for *cfg*: the given fd, or a new mount (module doc)."""
    if cfg.fuse_fd is not None:
        return FuseMount(cfg.fuse_fd, cfg.mountpoint, GIVEN)
    if privilege.can_mount():
        try:
            fd = _mount_sys(cfg)
        except PermissionError:  # e.g. root of a user namespace without its own mount namespace
            if privilege.fusermount_path() is None:
                raise DirectMountFailed(
                    f"mount(2) of {cfg.mountpoint}: permission denied, and no {FUSERMOUNT} to fall back to"
                ) from None
            log.info("direct engine: mount(2) refused (EPERM); mounting with %s", FUSERMOUNT)
        else:
            return _mounted(cfg, fd, MOUNT2)
    return _mounted(cfg, _mount_fusermount(cfg), FUSERMOUNT)


def _mounted(cfg: MountConfig, fd: int, how: str) -> FuseMount:
    row = mountinfo.mount_at(cfg.mountpoint)
    devno = row.devno if row is not None and row.fstype == FSTYPE else None
    log.info("direct engine: mounted %s with %s (device %s)", cfg.mountpoint, how, devno or "unknown")
    return FuseMount(fd, cfg.mountpoint, how, devno)


def _mount_sys(cfg: MountConfig) -> int:
    """/dev/fuse opened and mounted with mount(2); PermissionError when refused."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags, data = mount_options(cfg, fd, os.stat(cfg.mountpoint).st_mode)
        try:
            _sys.mount(cfg.fsname, cfg.mountpoint, FSTYPE, flags, data)
        except PermissionError:
            raise
        except OSError as exc:
            raise DirectMountFailed(f"mount(2) of {cfg.mountpoint}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mount_fusermount(cfg: MountConfig) -> int:
    """Mount with the setuid fusermount3; the /dev/fuse fd it sends back."""
    tool = privilege.fusermount_path()
    if tool is None:
        raise DirectMountFailed(f"{FUSERMOUNT} is missing: install fuse3 (mounting without root needs it)")
    import subprocess  # here: a mount(2) mount (podman's, every container) starts without it

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ)
        env[COMMFD_ENV] = str(theirs.fileno())
        try:
            res = subprocess.run(
                [tool, "-o", fusermount_options(cfg), "--", cfg.mountpoint],
                env=env,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                check=False,
            )
        except OSError as exc:
            raise DirectMountFailed(f"cannot run {tool}: {exc.strerror}") from None
        theirs.close()  # now EOF once fusermount3's message (if any) is read
        try:
            _data, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        except OSError as exc:
            fds = []
            log.debug("receiving the fd from %s: %s", tool, exc)
        if res.returncode != 0 or not fds:
            for fd in fds:
                os.close(fd)
            lines = [line for line in (res.stderr or "").splitlines() if line.strip()]
            why = lines[-1].strip() if lines else f"exit status {res.returncode}, no fd received"
            raise DirectMountFailed(f"{FUSERMOUNT} could not mount {cfg.mountpoint}: {why}")
        fd = fds[0]
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fd, False)
        return fd
    finally:
        ours.close()
        theirs.close()


def unmount_fuse(m: FuseMount, ended_by_kernel: bool) -> None:
    """Unmount what the engine mounted (lazily, as libfuse does) unless the kernel has ended
    the connection already; never a given fd's mount, never a mount stacked on ours since.
    Problems are logged (the server is exiting)."""
    if ended_by_kernel:
        _log_end(m)
        return
    if not m.owned:
        return
    row = mountinfo.mount_at(m.mountpoint)
    if row is None or row.fstype != FSTYPE or (m.devno is not None and row.devno != m.devno):
        log.info("direct engine: %s is no longer our mount; not unmounting it", m.mountpoint)
        return
    try:
        _sys.umount2(m.mountpoint, _sys.MNT_DETACH)
        return
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES) or m.how != FUSERMOUNT:
            log.warning("direct engine: umount2(%s): %s", m.mountpoint, exc.strerror)
            return
    if not try_unmount(m.mountpoint, lazy=True):  # an ordinary user: fusermount3 -uz (unmount.py)
        log.warning("direct engine: could not unmount %s (%s -uz)", m.mountpoint, FUSERMOUNT)


def _log_end(m: FuseMount) -> None:
    """The kernel ended the connection: an unmount, or (our mount still there, dead) an
    abort. Without FUSE_ABORT_ERROR both read ENODEV, so mountinfo tells them apart."""
    if m.devno is None:  # a given fd: its mount is the caller's (perhaps in another namespace)
        log.info("direct engine: the kernel ended the connection of %s; the server ends", m.mountpoint)
        return
    row = mountinfo.mount_at(m.mountpoint)
    if row is not None and row.devno == m.devno:
        log.warning(
            "direct engine: the FUSE connection of %s was aborted; the server ends, the dead mount"
            " stays until it is unmounted (pyoverlay umount %s)",
            m.mountpoint,
            m.mountpoint,
        )
    else:
        log.info("direct engine: %s was unmounted; the server ends", m.mountpoint)
