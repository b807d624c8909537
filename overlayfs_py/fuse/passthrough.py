"""FUSE passthrough (kernel 6.9+): reads, writes and mmap of an open regular file served by
the kernel straight from a real file of a layer, with no READ or WRITE reaching the server.

The kernel's rules (fs/fuse/backing.c, passthrough.c, iomode.c) and what the engine does
about them (docs/semantics.md, "FUSE passthrough"):

- A backing file is registered with the ``FUSE_DEV_IOC_BACKING_OPEN`` ioctl on the
  /dev/fuse fd, which needs CAP_SYS_ADMIN in the initial user namespace; the first EPERM
  turns passthrough off for the mount (plain READ/WRITE from then on).
- The kernel binds ONE backing file to a FUSE inode while passthrough files of it are open:
  another backing, or an open without FOPEN_PASSTHROUGH, fails (EIO). ``NodeBacking`` keeps
  one registration per node and real object, counts the node's passthrough files and
  closes the registration (``FUSE_DEV_IOC_BACKING_CLOSE``) once the last is released (the
  kernel sends RELEASE after it let go of the backing).
- A copy-up while passthrough files of the lower object are open leaves the inode bound
  to the lower object: the engine then gives the name a new FUSE node (``Ops._opened``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass

from ..errors import PyoverlayError

log = logging.getLogger(__name__)

#: ``struct fuse_backing_map {int32 fd; uint32 flags; uint64 padding}``
BACKING_MAP = struct.Struct("=iIQ")
_IOC_WRITE = 1
#: ``_IOW(229, 1, struct fuse_backing_map)`` and ``_IOW(229, 2, uint32_t)``
BACKING_OPEN = (_IOC_WRITE << 30) | (BACKING_MAP.size << 16) | (229 << 8) | 1
BACKING_CLOSE = (_IOC_WRITE << 30) | (4 << 16) | (229 << 8) | 2

#: the inode number of the initial user namespace (the kernel's PROC_USER_INIT_INO)
INIT_USER_NS_INO = 0xEFFFFFFD
CAP_SYS_ADMIN = 21
MODES = ("auto", "on", "off")
#: refusals that hold for every file of the mount: no CAP_SYS_ADMIN (EPERM), a layer on a
#: stacked filesystem (ELOOP: an overlay or FUSE mount below), no passthrough (EINVAL)
_MOUNT_WIDE = frozenset((errno.EPERM, errno.ELOOP, errno.EINVAL, errno.EOPNOTSUPP))


class PassthroughUnavailable(PyoverlayError):
    """``-o passthrough=on`` where the kernel would refuse it."""


def why_not_possible() -> str | None:
    """Why this process cannot use passthrough (None: it can, as far as can be told before
    mounting): the kernel must be 6.9 or later and the server hold CAP_SYS_ADMIN in the
    initial user namespace."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        major = minor = 0
    if (major, minor) < (6, 9):
        return f"kernel {os.uname().release} has no FUSE passthrough (6.9 or later)"
    try:
        if os.stat("/proc/self/ns/user").st_ino != INIT_USER_NS_INO:
            return "the server runs in a user namespace (passthrough needs CAP_SYS_ADMIN in the initial one)"
        with open("/proc/self/status", encoding="ascii") as f:
            caps = next((line.split()[1] for line in f if line.startswith("CapEff:")), "0")
    except OSError as exc:
        return f"cannot tell the server's capabilities: {exc.strerror}"
    if not int(caps, 16) >> CAP_SYS_ADMIN & 1:
        return "the server lacks CAP_SYS_ADMIN (passthrough needs it in the initial user namespace)"
    return None


def refuse_if_impossible(mode: str) -> None:
    """``-o passthrough=on``: refuse the mount, in one line, where it cannot work."""
    if mode == "on":
        why = why_not_possible()
        if why is not None:
            raise PassthroughUnavailable(f"passthrough=on: {why}")


@dataclass(slots=True)
class NodeBacking:
    """The backing file the kernel binds to one FUSE inode while it has passthrough files."""

    backing_id: int
    obj: int  # the index of the layer of the real file registered (ops.Ops._opened)
    opens: int = 0


class Passthrough:
    """The connection's passthrough state: the mode asked for, whether the kernel granted
    it (INIT), and the backing ioctls. ``fd`` is set by the session."""

    def __init__(self, mode: str = "off") -> None:
        self.mode = mode
        self.fd = -1
        self.active = False  # asked for, granted in INIT, not refused (EPERM) since
        self._why_not: str | None = None

    def wanted(self) -> bool:
        """Whether INIT asks for passthrough: ``auto`` only where the server may register
        backing files (asking sets the mount's stacking depth, which would keep another
        overlay from stacking on it, for nothing)."""
        if self.mode == "auto" and self._why_not is None:
            self._why_not = why_not_possible() or ""
            if self._why_not:
                log.debug("no FUSE passthrough: %s", self._why_not)
        return self.mode == "on" or (self.mode == "auto" and not self._why_not)

    def granted(self, fd: int, ok: bool) -> None:
        """INIT answered: *ok* if the kernel offered passthrough and we asked for it."""
        self.fd = fd
        self.active = ok
        if self.wanted() and not ok:
            msg = "the kernel did not offer FUSE passthrough: plain reads and writes"
            (log.warning if self.mode == "on" else log.debug)(msg)

    def register(self, fd: int) -> int:
        """A backing id for the real file open as *fd*; OSError when the kernel refuses.
        EPERM (no CAP_SYS_ADMIN in the initial user namespace) turns passthrough off."""
        buf = bytearray(BACKING_MAP.pack(fd, 0, 0))
        try:
            return fcntl.ioctl(self.fd, BACKING_OPEN, buf)
        except OSError as exc:
            if exc.errno in _MOUNT_WIDE:
                self.active = False
                log.debug("FUSE passthrough refused by the kernel (%s): plain reads and writes", exc.strerror)
            raise

    def close(self, backing_id: int) -> None:
        try:
            fcntl.ioctl(self.fd, BACKING_CLOSE, bytes(ctypes.c_uint32(backing_id)))
        except OSError as exc:  # the connection is gone: nothing to give back
            log.debug("FUSE backing close %d: %s", backing_id, exc.strerror)
