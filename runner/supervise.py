"""Waiting for a container process: one loop for ``run`` and ``exec``.

Watches the process's pidfd, the signals delivered to us (through
``signal.set_wakeup_fd``: no work in handlers) and, with ``-t``, the terminal relay.
Signals are forwarded through the pidfd, so a recycled pid can never be hit. SIGWINCH
resizes the container's terminal instead. With *stop_timeout*, SIGTERM/SIGHUP (we are
being stopped) also arm a SIGKILL after that many seconds, like ``docker stop``.

With *server_pidfd* (the pidfd of the FUSE server of the container's root) the loop also
watches that process: when it exits while the container still runs, the root is dead
(every access fails with ENOTCONN), so *on_server_exit* is called once and the container
is killed (SIGKILL: nothing of its root can run any more, not even a signal handler's
next exec); the wait then goes on until the container is gone.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from collections.abc import Callable
from typing import Protocol

from .tty import raw_mode


class Relay(Protocol):
    """What the loop drives: the terminal relay (runner/tty.py) or the attach relay
    (runner/attach.py)."""

    stdin: int | None

    def fds(self) -> list[int]: ...
    def readable(self, fd: int) -> None: ...
    def resize(self) -> None: ...
    def drain(self) -> None: ...


FORWARD = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
STOPPING = (signal.SIGTERM, signal.SIGHUP)


def catch_signals(pending: list[int]) -> None:
    """Until :func:`supervise` runs, remember the signals that should be forwarded."""
    for sig in FORWARD:
        signal.signal(sig, lambda s, f: pending.append(s))


def supervise(
    pid: int,
    relay: Relay | None,
    *,
    pending: list[int] | None = None,
    stop_timeout: float | None = None,
    server_pidfd: int | None = None,
    on_server_exit: Callable[[], None] | None = None,
) -> int:
    """Wait for our child *pid*; return its raw wait status."""
    pidfd = os.pidfd_open(pid)
    rsig, wsig = os.pipe()
    os.set_blocking(wsig, False)
    saved = {s: signal.signal(s, lambda *_: None) for s in FORWARD}
    old_wakeup = signal.set_wakeup_fd(wsig)
    sel = selectors.DefaultSelector()
    sel.register(pidfd, selectors.EVENT_READ, "exit")
    sel.register(rsig, selectors.EVENT_READ, "signal")
    if server_pidfd is not None:
        sel.register(server_pidfd, selectors.EVENT_READ, "server")
    deadline = None
    killed = False
    term = relay is not None and relay.stdin is not None
    try:
        with raw_mode(0) if term else contextlib.nullcontext():
            watched: set[int] = set()
            if relay:
                _sync(sel, relay, watched)
                relay.resize()
            signals = list(pending or ())
            done = False
            while not done:
                for s in signals:
                    if s == signal.SIGWINCH:
                        if relay:
                            relay.resize()
                        continue
                    _send(pidfd, s)
                    if s in STOPPING and stop_timeout is not None and deadline is None:
                        deadline = time.monotonic() + stop_timeout
                signals = []
                timeout = None
                if deadline is not None and not killed:
                    timeout = max(0.0, deadline - time.monotonic())
                events = sel.select(timeout)
                if deadline is not None and not killed and time.monotonic() >= deadline:
                    _send(pidfd, signal.SIGKILL)
                    killed = True
                for key, _ in events:
                    if key.data == "exit":
                        done = True
                    elif key.data == "signal":
                        signals = list(os.read(rsig, 64))
                    elif key.data == "server":  # the root's server is gone: stop the container
                        sel.unregister(key.fd)
                        if on_server_exit is not None:
                            on_server_exit()
                        _send(pidfd, signal.SIGKILL)
                        killed = True
                    elif relay is not None and key.fd in watched:  # "tty" (not dropped this round)
                        relay.readable(key.fd)
                        _sync(sel, relay, watched)
            if relay:
                relay.drain()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for s, h in saved.items():
            signal.signal(s, h)
        sel.close()
        for fd in (pidfd, rsig, wsig):
            os.close(fd)
    return os.waitpid(pid, 0)[1]


def _sync(sel: selectors.BaseSelector, relay, watched: set[int]) -> None:
    """Watch exactly the relay's fds (an attach relay gains and loses clients)."""
    now = set(relay.fds())
    for fd in watched - now:
        with contextlib.suppress(KeyError, ValueError, OSError):
            sel.unregister(fd)
    for fd in now - watched:
        sel.register(fd, selectors.EVENT_READ, "tty")
    watched.clear()
    watched.update(now)


def _send(pidfd: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, sig)
