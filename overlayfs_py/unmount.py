"""Unmounting a FUSE mount: the one place that runs ``fusermount3 -u`` (or ``umount``).

Used by ``pyoverlay umount``, the runner (a container's root), the test helpers and the
benchmark scripts. ``fusermount3`` is how an ordinary user unmounts a FUSE mount; when it
is missing, or fails where ``umount`` may work (root, a mount fusermount3 does not know
of), ``umount`` is tried next. With ``lazy`` the mount is detached even if busy
(``-z`` / ``-l``). Nothing here stats the mountpoint (a hung server would hang us).

As root (also root of a user namespace) ``umount2(2)`` is tried first, in this process:
what ``umount`` would do, without a fork and exec (docs/performance.md, Startup). When it
fails the tools run as before, so their messages are the ones reported.
"""

from __future__ import annotations

import os

from . import _sys
from .errors import PyoverlayError

FUSERMOUNT = "fusermount3"


class UnmountError(PyoverlayError):
    """Neither fusermount3 nor umount could unmount (the first tool's message)."""


def commands(path: str, lazy: bool = False) -> list[list[str]]:
    """The commands :func:`unmount` tries, in order (after umount2(2) as root)."""
    import shutil

    tool = shutil.which(FUSERMOUNT)
    out = [[tool, "-uz" if lazy else "-u", path]] if tool else []
    out.append(["umount", "-l", path] if lazy else ["umount", path])
    return out


def unmount(path: str, *, lazy: bool = False, timeout: float | None = None) -> None:
    """Unmount *path*: ``fusermount3 -u`` (``-uz`` if *lazy*), then ``umount`` (``-l``) if
    that fails or fusermount3 is missing. Raises UnmountError with the first failure's
    message; ``subprocess.TimeoutExpired`` if a tool hangs longer than *timeout* seconds
    (nothing more is tried then: the caller may abort the FUSE connection)."""
    import subprocess

    if os.geteuid() == 0:
        try:
            _sys.umount2(path, _sys.MNT_DETACH if lazy else 0)
            return
        except OSError:
            pass  # the tools say why (their messages), or manage where umount2 may not
    first = None
    for argv in commands(path, lazy):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if res.returncode == 0:
            return
        if first is None:
            first = res.stderr.strip() or f"{argv[0]} failed (exit status {res.returncode})"
    raise UnmountError(first or "failed")


def try_unmount(path: str, *, lazy: bool = False, timeout: float | None = None) -> bool:
    """:func:`unmount`, quietly: True if it worked."""
    try:
        unmount(path, lazy=lazy, timeout=timeout)
        return True
    except UnmountError:
        return False


def unmount_or_detach(path: str, *, timeout: float | None = None) -> bool:
    """Unmount *path*, or detach it lazily when a normal unmount fails (busy). True if
    either worked."""
    return try_unmount(path, timeout=timeout) or try_unmount(path, lazy=True, timeout=timeout)
