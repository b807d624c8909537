"""Unix sockets at any path (the trace sockets beside the mount records), made and
reached through the directory's fd: a socket path may be at most 107 bytes, and nothing is
resolved again through the path once its directory is open. Plain functions, no trio: the
server binds its trace socket before it imports trio (docs/performance.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)


def _via_dir_fd(path: str):
    """A unix socket path may be at most 107 bytes: go through /proc/self/fd/N of its
    directory, so any path works. Returns (short path, dir fd to close)."""
    dfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dfd}/{os.path.basename(path)}", dfd


def bind_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    short, dfd = _via_dir_fd(path)
    base = os.path.basename(path)
    try:
        # A stale socket of an earlier mount goes; unlinkat never follows a symlink, and the
        # mode is set on the name just bound (AT_SYMLINK_NOFOLLOW), both relative to the
        # directory fd: nothing is resolved again through the path.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(base, dir_fd=dfd)
        sock.bind(short)
        os.chmod(base, 0o600, dir_fd=dfd, follow_symlinks=False)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dfd)
    sock.listen(16)
    return sock


def connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    short, dfd = _via_dir_fd(path)
    try:
        sock.connect(short)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dfd)
    return sock


def unbind_unix(sock: socket.socket, path: str) -> None:
    """Close a listening socket of :func:`bind_unix` and remove its name."""
    sock.close()
    with contextlib.suppress(OSError):
        os.unlink(path)


def listen(socket_path: str) -> socket.socket | None:
    """A trace socket for live readers, bound; None (and a warning) where it cannot be:
    the mount works without a live stream."""
    try:
        return bind_unix(socket_path)
    except OSError as e:
        log.warning("trace: no live stream (%s: %s)", socket_path, e.strerror)
        return None
