"""``-t``: relay between the caller's terminal and a pty made inside the container.

A pty from the host's devpts would be "not a tty" inside (the container mounts its
own devpts instance), so the container makes it and sends the master here over a
unix socket (what runc's ``--console-socket`` does). The caller's terminal is put in
raw mode, so Ctrl-C travels as a byte and the container's line discipline turns it
into SIGINT for the container's foreground process group.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import termios
import tty

from .container import winsize_of


def recv_master(sock: socket.socket) -> int:
    _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    if not fds:
        raise OSError(errno.EPROTO, "the container sent no terminal")
    return fds[0]


@contextlib.contextmanager
def raw_mode(fd: int):
    """Put the terminal *fd* in raw mode for the block; restore it whatever happens."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keep what was typed ahead
    try:
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):  # EIO: the terminal hung up
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class PtyRelay:
    """Copies the caller's stdin to the master and the master to the caller's stdout.
    Driven by the monitor's event loop: ``fds()`` to watch, ``readable(fd)`` when one is."""

    def __init__(self, master: int, stdin: int | None, stdout: int):
        self.master = master
        self.stdin = stdin
        self.stdout = stdout
        self.master_open = True
        os.set_blocking(master, False)

    def fds(self) -> list[int]:
        out = [self.master] if self.master_open else []
        if self.stdin is not None:
            out.append(self.stdin)
        return out

    def readable(self, fd: int) -> None:
        if fd == self.master:
            self._pump_out()
            return
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:
            self.stdin = None  # caller's stdin closed: stop forwarding, keep the container
            return
        write_all(self.master, data)

    def _pump_out(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: every slave fd closed
                data = b""
            if not data:
                self.master_open = False
                return
            write_all(self.stdout, data)

    def resize(self) -> None:
        if self.stdin is not None:
            ws = winsize_of(self.stdin)
            if ws:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(self.master, termios.TIOCSWINSZ, ws)

    def drain(self) -> None:
        if self.master_open:
            self._pump_out()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.master)


def write_all(fd: int, data: bytes) -> None:
    """All of *data* to *fd*, non-blocking or not (waiting while it is full); nothing more
    once its reader is gone or it was closed meanwhile (no one to deliver to)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            try:
                select.select([], [fd], [], 30)
            except (OSError, ValueError):  # closed meanwhile
                return
            continue
        except OSError:
            return
        view = view[n:]
