"""The monitor's attach endpoint (like conmon's attach socket): the container's stdio,
reachable by the API service (``pyoverlay serve``) for as long as the container runs,
whether or not the service that started it still lives.

A container started through the API has no terminal or log file of the monitor's as
its stdio: its stdout and stderr are pipes (or, with a TTY, the master of its pty) that
the monitor reads, writes to ``<data dir>/container.log`` (JSON lines, docker's json-file
format: ``{"log", "stream", "time"}``) and copies to every client of the unix socket
``<data dir>/attach.sock``. Stdin is a pipe (``OpenStdin``) or the pty.

Both directions use the framing of dockerd's multiplexed streams: an 8-byte header
``[kind, 0, 0, 0, size (big-endian u32)]`` then *size* bytes. Monitor -> client: kind 1
stdout, 2 stderr (with a TTY everything is 1). Client -> monitor: 0 stdin data, 3 end
of stdin (closes the container's stdin when ``StdinOnce``), 4 resize (payload: rows and
columns as two big-endian u16).

The socket path is usually longer than a unix address allows (108 bytes), so it is
bound and reached as ``/proc/self/fd/<dir fd>/attach.sock`` through an ``O_PATH`` fd on
the (private, 0700) data dir.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import queue
import socket
import struct
import termios
import threading

from .tty import write_all

STDIN, STDOUT, STDERR, CLOSE_STDIN, RESIZE = 0, 1, 2, 3, 4
SOCKET_NAME = "attach.sock"
LOG_NAME = "container.log"
_HEADER = struct.Struct(">BxxxI")


def frame(kind: int, data: bytes) -> bytes:
    return _HEADER.pack(kind, len(data)) + data


class FrameReader:
    """Splits a byte stream into (kind, payload) frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            kind, size = _HEADER.unpack_from(self._buf)
            if len(self._buf) < _HEADER.size + size:
                break
            out.append((kind, bytes(self._buf[_HEADER.size : _HEADER.size + size])))
            del self._buf[: _HEADER.size + size]
        return out


def _at(dir_path: str):
    fd = os.open(dir_path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return fd, f"/proc/self/fd/{fd}/{SOCKET_NAME}"


def listen(data_dir: str) -> socket.socket:
    """The attach socket in *data_dir* (a stale one is replaced), listening."""
    fd, path = _at(data_dir)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCKET_NAME, dir_fd=fd)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(16)
        s.setblocking(False)
        return s
    finally:
        os.close(fd)


def connect(data_dir: str, timeout: float | None = None) -> socket.socket:
    """A connection to the attach socket of the container whose data dir is *data_dir*."""
    fd, path = _at(data_dir)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError:
            s.close()
            raise
        s.settimeout(None)
        return s
    finally:
        os.close(fd)


def unlink(data_dir: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(data_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.unlink(SOCKET_NAME, dir_fd=fd)
        finally:
            os.close(fd)


def log_entries(data: bytes, stream: str, partial: bytearray) -> list[dict]:
    """*data* as json-file entries, one per line (a line split across reads is kept in
    *partial* until its newline arrives)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    partial += data
    out = []
    while True:
        i = partial.find(b"\n")
        if i < 0:
            break
        line = bytes(partial[: i + 1])
        del partial[: i + 1]
        out.append({"log": line.decode("utf-8", "surrogateescape"), "stream": stream, "time": now})
    return out


class Stdio:
    """The container's stdio as the monitor makes it: pipes (non-TTY) set up in PID 1
    before it starts; with a TTY the container makes its pty and only stdin's mode is
    kept here."""

    def __init__(self, tty: bool, stdin: bool):
        self.tty = tty
        self.stdin = stdin
        self.child_fds: list[int] = []  # (stdin r, stdout w, stderr w) for PID 1
        self.parent: dict[str, int] = {}
        if not tty:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            self.parent.update(stdout=out_r, stderr=err_r)
            if stdin:
                in_r, in_w = os.pipe()
                self.parent["stdin"] = in_w
            else:
                in_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            self.child_fds = [in_r, out_w, err_w]

    def install(self) -> None:
        """In PID 1 (before it closes other fds): the pipes become its 0, 1 and 2."""
        for target, fd in enumerate(self.child_fds):
            os.dup2(fd, target)  # dup2's copy is inheritable

    def close_child_ends(self) -> None:
        for fd in self.child_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child_fds = []


class AttachRelay:
    """Driven by :func:`runner.supervise.supervise` like the terminal relay: ``fds()`` to
    watch (it changes as clients come and go), ``readable(fd)`` when one is."""

    stdin: int | None = None  # the monitor's own stdin is never relayed (no raw mode)

    def __init__(self, listener: socket.socket, data_dir: str, stdio: Stdio, master: int | None, stdin_once: bool):
        self.listener = listener
        self.data_dir = data_dir
        self.clients: dict[int, tuple[socket.socket, FrameReader]] = {}
        self.outputs: dict[int, str] = {}  # fd -> stream
        self.partial: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.master = master
        self.stdin_once = stdin_once
        if master is not None:
            os.set_blocking(master, False)
            self.outputs[master] = "stdout"
            self.stdin_fd: int | None = master if stdio.stdin else None
        else:
            self.outputs[stdio.parent["stdout"]] = "stdout"
            self.outputs[stdio.parent["stderr"]] = "stderr"
            self.stdin_fd = stdio.parent.get("stdin")
            for fd in self.outputs:
                os.set_blocking(fd, False)
        self._stdin_q: queue.SimpleQueue[bytes | None] | None = None
        self.log_fd = os.open(
            os.path.join(data_dir, LOG_NAME),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )

    # --- the supervise interface ---------------------------------------------------------------
    def fds(self) -> list[int]:
        return [self.listener.fileno(), *self.clients, *self.outputs]

    def readable(self, fd: int) -> None:
        if fd == self.listener.fileno():
            self._accept()
        elif fd in self.outputs:
            self._pump(fd)
        elif fd in self.clients:
            self._from_client(fd)

    def resize(self) -> None:
        pass

    def drain(self) -> None:
        """PID 1 is gone: what is left in the pipes (or the pty) goes out, then the
        clients are told the stream ended (their connection closes)."""
        self._accept()
        for fd in list(self.outputs):
            self._pump(fd, until_empty=True)
        for stream, rest in self.partial.items():
            if rest:
                self._log([{"log": rest.decode("utf-8", "surrogateescape"), "stream": stream, "time": _now()}])
                rest.clear()
        for fd in list(self.clients):
            self._drop(fd, flush=False)

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd, flush=False)
        with contextlib.suppress(OSError):
            self.listener.close()
        unlink(self.data_dir)
        stdin = self.stdin_fd
        if self._stdin_q is not None and stdin is not None:
            self._stdin_q.put(None)  # the writer closes it
            stdin = None
        for ofd in [*self.outputs, self.log_fd, stdin]:
            if ofd is not None and ofd != self.master:
                with contextlib.suppress(OSError):
                    os.close(ofd)
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
        self.outputs = {}

    # --- the work ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(True)
            conn.settimeout(30)  # a client that stops reading is dropped, not waited for
            self.clients[conn.fileno()] = (conn, FrameReader())

    def _pump(self, fd: int, until_empty: bool = False) -> None:
        stream = self.outputs[fd]
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: the pty's every slave is closed
                data = b""
            if not data:
                del self.outputs[fd]
                if fd != self.master:
                    os.close(fd)
                return
            self._log(log_entries(data, stream, self.partial[stream]))
            out = frame(STDOUT if stream == "stdout" else STDERR, data)
            for cfd in list(self.clients):
                try:
                    self.clients[cfd][0].sendall(out)
                except OSError:
                    self._drop(cfd)
            if not until_empty:
                return

    def _log(self, entries: list[dict]) -> None:
        if entries:
            data = "".join(json.dumps(e) + "\n" for e in entries).encode()
            with contextlib.suppress(OSError):
                os.write(self.log_fd, data)

    def _from_client(self, fd: int) -> None:
        conn, reader = self.clients[fd]
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(fd, flush=False)
            return
        self._frames(reader.feed(data))

    def _frames(self, frames: list[tuple[int, bytes]]) -> None:
        for kind, payload in frames:
            if kind == STDIN and self.stdin_fd is not None:
                self._stdin(payload)
            elif kind == CLOSE_STDIN and self.stdin_fd is not None and self.stdin_once and self.master is None:
                self._stdin(None)  # closed by the writer once what came before is written
                self.stdin_fd = None
            elif kind == RESIZE and self.master is not None and len(payload) == 4:
                rows, cols = struct.unpack(">HH", payload)
                with contextlib.suppress(OSError):
                    fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _stdin(self, data: bytes | None) -> None:
        """Input for the container (None: close its stdin), written by a thread of its
        own: a container that writes while not reading (``cat``) must not stop the loop
        that empties its stdout."""
        if self._stdin_q is None:
            self._stdin_q = queue.SimpleQueue()
            fd, q = self.stdin_fd, self._stdin_q
            assert fd is not None

            def writer() -> None:
                while (chunk := q.get()) is not None:
                    write_all(fd, chunk)
                if fd != self.master:
                    with contextlib.suppress(OSError):
                        os.close(fd)

            threading.Thread(target=writer, daemon=True, name="stdin").start()
        self._stdin_q.put(data)

    def _drop(self, fd: int, flush: bool = True) -> None:
        """Forget the client *fd*; with *flush*, what it sent and was not read yet is
        acted on first (a client that sends a resize and closes at once is dropped when
        the output copied to it fails, maybe before its frame was read)."""
        conn, reader = self.clients.pop(fd)
        if flush:
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                while data := conn.recv(65536):
                    self._frames(reader.feed(data))
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
