"""The docker CLI on a real terminal for the API tests (a pty of the test's, made the
CLI's controlling terminal so that a resize reaches it as SIGWINCH)."""

from __future__ import annotations

import os
import time

from helpers import api


def wait_for(pred, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Pty:
    """The docker CLI on a real terminal (a pty of the test's; its controlling terminal)."""

    def __init__(self, service, *args, rows: int = 24, cols: int = 80):
        import fcntl
        import pty
        import struct
        import subprocess
        import termios
        import threading

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        def ctty():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [api.DOCKER, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=service.env(),
            start_new_session=True,
            preexec_fn=ctty,
        )
        os.close(slave)
        self.out = b""
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.out += data

    def text(self) -> str:
        with self._lock:
            return self.out.decode(errors="replace")

    def send(self, s: str) -> None:
        os.write(self.master, s.encode())

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def expect(self, what: str, timeout: float = 60) -> None:
        try:
            wait_for(lambda: what in self.text(), timeout, what=repr(what))
        except AssertionError:
            raise AssertionError(f"{what!r} not seen; the terminal shows:\n{self.text()}") from None

    def close(self) -> int:
        import subprocess

        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        os.close(self.master)
        return code


def until(t: Pty, send: str, want: str, timeout: float = 60) -> None:
    """Send *send* until *want* shows (the CLI sizes the terminal just after start: a
    command typed before that sees the pty's first size)."""
    deadline = time.monotonic() + timeout
    while want not in t.text() and time.monotonic() < deadline:
        t.send(send)
        time.sleep(0.5)
    assert want in t.text(), t.text()
