"""Published ports: a userspace forwarder per container, like docker-proxy.

The monitor binds every published port itself (so a port in use is a one-line error,
exit 125, before the container starts, and host port 0 becomes the free port the kernel
picked), then forks one proxy process that serves them all: it runs in the host's
network namespace, dies with the monitor (PR_SET_PDEATHSIG) and is killed by the
monitor's teardown, so a published port is gone once the container stops.

TCP: each accepted connection gets its own connection to the container's
address:port, bytes relayed both ways, half-closes passed on. UDP: each client address
gets its own connected socket towards the container (replies go back from the published
socket), forgotten after two minutes without traffic. One thread and a selector: a slow
or stuck peer never blocks another connection (sockets are non-blocking, each direction
keeps its own small buffer and stops reading while it is full).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass

from overlayfs_py import _sys

from .. import _linux as L
from .links import NetError
from .ports import PortMapping

UDP_IDLE = 120.0
_BUF = 65536


@dataclass
class Published:
    mapping: PortMapping  # with the host port actually bound
    sock: socket.socket


def bind(ports: tuple[PortMapping, ...] | list[PortMapping]) -> list[Published]:
    """Bind every published port (NetError naming the one that failed; the others
    are closed again)."""
    out: list[Published] = []
    try:
        for p in ports:
            fam = socket.AF_INET6 if ":" in p.host_ip else socket.AF_INET
            kind = socket.SOCK_STREAM if p.proto == "tcp" else socket.SOCK_DGRAM
            s = socket.socket(fam, kind)
            try:
                if kind == socket.SOCK_STREAM:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((p.host_ip or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), p.host_port))
                if kind == socket.SOCK_STREAM:
                    s.listen(128)
            except OSError as e:
                s.close()
                what = f"{p.host_ip or '0.0.0.0'}:{p.host_port}/{p.proto}"
                if e.errno == errno.EADDRINUSE:
                    raise NetError(f"cannot publish {what}: the port is already in use") from None
                raise NetError(f"cannot publish {what}: {e.strerror}") from None
            s.setblocking(False)
            bound = s.getsockname()[1]
            out.append(Published(PortMapping(p.host_ip, bound, p.container_port, p.proto), s))
    except BaseException:
        for pub in out:
            pub.sock.close()
        raise
    return out


def start(published: list[Published], address: str) -> int:
    """Fork the proxy serving *published* towards the container at *address*; its pid.
    The caller closes its copies of the sockets (:func:`close`)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent = os.getppid()
            L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the monitor died before the prctl
                os._exit(1)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # never the monitor's terminal or a caller's pipe
                os.dup2(null, fd)
            os.close(null)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            keep = [p.sock.fileno() for p in published]
            _sys.close_fds_except(0, 1, 2, *keep)
            L.set_comm("pyoverlay-proxy")
            Proxy(published, address).serve()
        except BaseException:  # noqa: BLE001 - a child never returns into the monitor
            code = 1
        os._exit(code)
    return pid


def close(published: list[Published]) -> None:
    for p in published:
        with contextlib.suppress(OSError):
            p.sock.close()


def stop(pid: int) -> None:
    """Kill and reap the proxy."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class _Pipe:
    """One direction of a TCP relay: what was read from *src* and not yet written to *dst*."""

    def __init__(self, src: socket.socket, dst: socket.socket):
        self.src, self.dst = src, dst
        self.buf = b""
        self.eof = False  # src said EOF
        self.done = False  # ... and it was passed on (shutdown of dst's write side)


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self.connected = False
        self.up = _Pipe(client, upstream)
        self.down = _Pipe(upstream, client)
        self.closed = False


class Proxy:
    def __init__(self, published: list[Published], address: str):
        self.published = published
        self.address = address
        self.sel = selectors.DefaultSelector()
        self.conns: set[_Conn] = set()
        # UDP: (published socket, client address) -> (connected socket, last activity)
        self.udp: dict[tuple[int, object], tuple[socket.socket, float]] = {}

    def serve(self) -> None:
        for p in self.published:
            self.sel.register(p.sock, selectors.EVENT_READ, ("listen", p))
        while True:
            for key, _ in self.sel.select(timeout=30):
                kind, obj = key.data
                try:
                    if kind == "listen":
                        if obj.mapping.proto == "tcp":
                            self._accept(obj)
                        else:
                            self._udp_in(obj)
                    elif kind == "udp-reply":
                        self._udp_reply(*obj)
                    else:
                        self._pump(obj)
                except OSError:  # one connection or datagram failed, never the proxy
                    if kind == "conn":
                        self._close(obj)
            self._udp_expire()

    # --- TCP ---------------------------------------------------------------------------------

    def _accept(self, pub: Published) -> None:
        while True:
            try:
                client, _ = pub.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNABORTED, EMFILE...: the next one may work
            client.setblocking(False)
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setblocking(False)
            err = up.connect_ex((self.address, pub.mapping.container_port))
            if err not in (0, errno.EINPROGRESS):
                client.close()
                up.close()
                continue
            c = _Conn(client, up)
            self.conns.add(c)
            self._watch(c)  # the upstream socket until it is connected, then both

    def _pump(self, c: _Conn) -> None:
        if c.closed:
            return
        if not c.connected:
            err = c.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == errno.EINPROGRESS:
                return
            if err:
                self._close(c)
                return
            c.connected = True
        for p in (c.up, c.down):
            self._move(p)
        if (c.up.done and c.down.done) or c.closed:
            self._close(c)
            return
        self._watch(c)

    def _move(self, p: _Pipe) -> None:
        # read while there is room, write what we have
        if not p.eof and len(p.buf) < _BUF:
            try:
                data = p.src.recv(_BUF - len(p.buf))
                if data:
                    p.buf += data
                else:
                    p.eof = True
            except (BlockingIOError, InterruptedError):
                pass
        if p.buf:
            try:
                n = p.dst.send(p.buf)
                p.buf = p.buf[n:]
            except (BlockingIOError, InterruptedError):
                pass
        if p.eof and not p.buf and not p.done:
            with contextlib.suppress(OSError):
                p.dst.shutdown(socket.SHUT_WR)
            p.done = True

    def _watch(self, c: _Conn) -> None:
        """Register each socket for what its directions need now."""
        if not c.connected:
            self._set(c.upstream, selectors.EVENT_WRITE, c)
            self._set(c.client, 0, c)
            return
        for sock in (c.client, c.upstream):
            ev = 0
            for p in (c.up, c.down):
                if p.src is sock and not p.eof and len(p.buf) < _BUF:
                    ev |= selectors.EVENT_READ
                if p.dst is sock and p.buf:
                    ev |= selectors.EVENT_WRITE
            self._set(sock, ev, c)

    def _set(self, sock: socket.socket, ev: int, c: _Conn) -> None:
        try:
            key = self.sel.get_key(sock)
        except KeyError:
            key = None
        if ev == 0:
            if key is not None:
                self.sel.unregister(sock)
        elif key is None:
            self.sel.register(sock, ev, ("conn", c))
        elif key.events != ev:
            self.sel.modify(sock, ev, ("conn", c))

    def _close(self, c: _Conn) -> None:
        if c.closed:
            return
        c.closed = True
        for sock in (c.client, c.upstream):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
            sock.close()
        self.conns.discard(c)

    # --- UDP ---------------------------------------------------------------------------------

    def _udp_in(self, pub: Published) -> None:
        while True:
            try:
                data, client = pub.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            key = (pub.sock.fileno(), client)
            entry = self.udp.get(key)
            if entry is None:
                up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.setblocking(False)
                try:
                    up.connect((self.address, pub.mapping.container_port))
                except OSError:
                    up.close()
                    continue
                self.sel.register(up, selectors.EVENT_READ, ("udp-reply", (pub, client, up)))
                entry = (up, time.monotonic())
            up = entry[0]
            self.udp[key] = (up, time.monotonic())
            with contextlib.suppress(OSError):
                up.send(data)

    def _udp_reply(self, pub: Published, client, up: socket.socket) -> None:
        while True:
            try:
                data = up.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNREFUSED from an earlier datagram
                return
            key = (pub.sock.fileno(), client)
            if key in self.udp:
                self.udp[key] = (up, time.monotonic())
            with contextlib.suppress(OSError):
                pub.sock.sendto(data, client)

    def _udp_expire(self) -> None:
        now = time.monotonic()
        for key, (up, last) in list(self.udp.items()):
            if now - last > UDP_IDLE:
                del self.udp[key]
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(up)
                up.close()
