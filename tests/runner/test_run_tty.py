"""``pyoverlay run -t``: the container gets a pty from its own devpts.

The interactive test runs ``pyoverlay run -it IMAGE sh`` on a pseudo-terminal
the test owns (the runner is a session leader with that terminal as its
controlling tty, 33 rows x 101 columns), types into it and reads the
output.  Markers are computed by the shell (``echo M$((40+2))`` prints M42)
so the terminal's echo of the typed line never matches them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from helpers import containers
from helpers.containers import describe

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root, pytest.mark.usefixtures("_no_leftovers")]

ROWS, COLS = 33, 101


class PtySession:
    """The runner on a pty whose master the test holds."""

    def __init__(self, argv, env, cwd, rows=ROWS, cols=COLS):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.initial_attrs = termios.tcgetattr(slave)

        def make_controlling_tty():  # runs after setsid (start_new_session)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=make_controlling_tty,
            )
        finally:
            os.close(slave)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def _read(self, timeout: float) -> None:
        if self.eof:
            return
        r, _, _ = select.select([self.master], [], [], timeout)
        if not r:
            return
        try:
            chunk = os.read(self.master, 65536)
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: no process has the slave open
                raise
            chunk = b""
        if not chunk:
            self.eof = True
        self.buf += chunk

    def expect(self, pattern: bytes, timeout: float = 30) -> re.Match:
        """Wait for ``pattern`` (a regex) in the output since the last match;
        the output up to and including the match is consumed."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end() :]
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise AssertionError(
                    f"did not see {pattern!r} within {timeout}s (eof={self.eof}, "
                    f"runner status={self.proc.poll()}); output so far:\n{self.buf[-3000:]!r}"
                )
            self._read(min(left, 0.5))

    def wait_prompt(self, timeout: float = 60) -> None:
        """Wait for the interactive shell's first prompt ("/ # ")."""
        self.expect(rb"# ", timeout)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"runner did not exit within {timeout}s; output:\n{self.buf[-3000:]!r}")
            self._read(0.2)  # keep draining the master
        return self.proc.returncode

    def attrs(self):
        return termios.tcgetattr(self.master)

    def close(self) -> None:
        """Hang up (close the master: the runner gets SIGHUP and must clean
        up, like a closed terminal window); SIGKILL if it does not exit."""
        os.close(self.master)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def container_sleeps(before) -> list[int]:
    """Host pids of ``sleep 100`` processes in a foreign pid ns, new since ``before``."""
    out = []
    for pid, _start in set(containers.foreign_pidns_procs()) - set(before):
        if containers.cmdline(pid) == ["sleep", "100"] and containers.alive(pid):
            out.append(pid)
    return out


def test_interactive_tty_session(rt, img):
    s = PtySession(rt.argv("run", "--rm", "-it", img.spec, "sh"), rt.env, str(rt.base))
    try:
        s.wait_prompt()
        s.send(b"echo READY$((1+2))\n")
        s.expect(rb"READY3")

        s.send(b'echo "<$(tty)>"\n')
        assert s.expect(rb"<([^<>$]*)>").group(1) == b"/dev/pts/0"

        s.send(b'echo "<$(stty size)>"\n')
        assert s.expect(rb"<([^<>$]*)>").group(1) == f"{ROWS} {COLS}".encode()

        s.send(b'echo "<$(readlink /proc/self/fd/0)>"\n')
        assert s.expect(rb"<([^<>$]*)>").group(1) == b"/dev/pts/0"

        # Ctrl-C interrupts the foreground command inside, not the runner
        before = containers.foreign_pidns_procs()
        s.send(b"sleep 100\n")
        deadline = time.monotonic() + 20
        while not container_sleeps(before):
            assert time.monotonic() < deadline, "sleep 100 never started"
            s._read(0.1)
        sleeper = container_sleeps(before)[0]
        s.send(b"\x03")
        assert containers.wait_gone(sleeper, 10), "Ctrl-C did not interrupt sleep"
        assert s.proc.poll() is None, "Ctrl-C killed the runner"
        s.send(b'echo "rc=$?"\n')
        assert s.expect(rb"rc=(\d+)").group(1) == b"130"
        s.send(b"echo AFTER$((2+3))\n")
        s.expect(rb"AFTER5")

        s.send(b"exit 42\n")
        assert s.wait() == 42
        # the runner put its terminal into raw mode: it must restore it
        assert s.attrs()[3] == s.initial_attrs[3], "terminal lflags not restored"
    finally:
        s.close()


def test_typeahead_is_not_lost(rt, img):
    """Typed before the container is up: a terminal keeps typeahead (docker's
    raw mode is set with TCSANOW; TCSAFLUSH would discard it)."""
    s = PtySession(rt.argv("run", "--rm", "-it", img.spec, "sh"), rt.env, str(rt.base))
    try:
        s.send(b"echo EARLY$((3+4))\n")
        s.expect(rb"EARLY7", timeout=60)
        s.send(b"exit 0\n")
        assert s.wait() == 0
    finally:
        s.close()


def test_hangup_cleans_up(rt, img):
    """Closing the terminal (SIGHUP to the runner) stops and removes the container."""
    s = PtySession(rt.argv("run", "--rm", "--stop-timeout", "2", "-it", img.spec, "sh"), rt.env, str(rt.base))
    try:
        s.wait_prompt()
        s.send(b"echo UP$((1+1))\n")
        s.expect(rb"UP2")
    finally:
        s.close()
    assert s.proc.returncode is not None
    assert rt.state_entries() == [] and rt.data_entries() == [], (
        f"runner exit status {s.proc.returncode}; --rm container left: {rt.ps()}"
    )


def test_tty_exit_code_of_sh_c(rt, img):
    s = PtySession(rt.argv("run", "--rm", "-it", img.spec, "sh", "-c", "exit 42"), rt.env, str(rt.base))
    try:
        assert s.wait(60) == 42
    finally:
        s.close()


def test_tty_without_a_terminal(rt, img):
    """``-t`` with stdin/stdout not a terminal still runs (docker allows it)."""
    r = rt.run("--rm", "-t", img.spec, "tty")
    assert r.returncode == 0, describe(r)
    assert r.stdout.replace("\r", "").strip() == "/dev/pts/0", describe(r)
    r = rt.run("--rm", "-t", img.spec, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert r.returncode == 3, describe(r)
    # with a tty, stdout and stderr are one stream: the pty
    assert "out" in r.stdout and "err" in r.stdout, describe(r)


def test_tty_sees_a_devpts_of_its_own(rt, img):
    r = rt.run("--rm", "-t", img.spec, "sh", "-c", "cd /dev/pts && echo *")
    assert r.returncode == 0, describe(r)
    out = r.stdout.replace("\r", "")
    names = out.split()
    assert "0" in names and "ptmx" in names, out
    # host ptys (the test's own, at least) are not visible
    assert not [n for n in names if n.isdigit() and int(n) > 0], out
