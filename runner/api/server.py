"""The HTTP layer of ``pyoverlay serve``: requests, responses, routing, listeners.

Threads, not an event loop: every connection has its own thread (``ThreadingMixIn``), so a
handler may block (wait for a container, follow its logs, relay an attached terminal)
without stalling the others, and a hijacked connection is a plain socket the handler owns.

A handler is ``def handler(req: Request) -> None``; it answers with one of ``req.json``,
``req.error``, ``req.empty``, ``req.stream_start`` + ``req.stream_write`` (chunked), or
``req.hijack`` (attach, exec start: the raw socket after the HTTP upgrade). Raising
``ApiError`` answers dockerd's way (``{"message": "..."}`` with the status).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import select
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import RunnerError

log = logging.getLogger(__name__)

#: the API version this server speaks (the docker CLI 20.10 asks for 1.41; docker-py
#: negotiates down to what /version says)
API_VERSION = "1.41"
MIN_API_VERSION = "1.24"
_VERSION_PREFIX = re.compile(r"^/v(\d+\.\d+)(/.*)$")


def peer_closed(conn: socket.socket) -> bool:
    """Whether the client has closed its end (EOF waiting on *conn*, or *conn* broken):
    a streaming or waiting handler stops then. Never blocks, never consumes data."""
    try:
        r, _, _ = select.select([conn], [], [], 0)
        return bool(r) and conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (OSError, ValueError):
        return True


class ApiError(RunnerError):
    """An error answered as dockerd does: *status* and ``{"message": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class AnsweredElsewhere(Exception):  # noqa: N818 - a signal to the dispatcher, not an error
    """Raised by a handler whose answer another process wrote on the connection (a child
    that joined a container's namespaces, runner/api/archive.py): nothing more is sent
    and the connection is closed (what was read and written on it is that process's)."""


def not_found(what: str) -> ApiError:
    return ApiError(404, what)


class Request:
    """One HTTP request, and the means to answer it (exactly once)."""

    def __init__(self, handler: _Handler, method: str, path: str, version: str | None, query: dict[str, list[str]]):
        self._h = handler
        self.method = method
        self.path = path  # without the version prefix
        self.version = version  # "1.41" or None (no prefix)
        self.query = query
        self.params: dict[str, str] = {}  # from the route's {name} parts
        self.headers = handler.headers
        self.answered = False
        self._chunked = False
        self._head = method == "HEAD"  # headers only
        self._close = False  # "Connection: close" in the answer
        self._body = "unread"  # unread | reading | done
        self._hijacked = False
        self.server: ApiServer = handler.server.api  # type: ignore[attr-defined]

    # --- reading ----------------------------------------------------------------------------
    def arg(self, name: str, default: str | None = None) -> str | None:
        v = self.query.get(name)
        return v[-1] if v else default

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean query parameter, as dockerd reads them ("1", "true", "True"; "0",
        "false", "" are false)."""
        v = self.arg(name)
        if v is None:
            return default
        return v.lower() not in ("", "0", "false", "no")

    def body(self, limit: int = 1 << 20) -> bytes:
        """The request body (Content-Length or chunked), at most *limit* bytes (413 beyond)."""
        self._body = "reading"
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            for chunk in self.body_chunks():
                out += chunk
                if len(out) > limit:
                    raise ApiError(413, "request body too large")
            self._body = "done"
            return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        if n > limit:
            raise ApiError(413, "request body too large")
        data = self._h.rfile.read(n) if n else b""
        self._body = "done"
        return data

    def body_chunks(self) -> Iterable[bytes]:
        """The body as it arrives (for uploads: image archives, ``cp`` into a container)."""
        self._body = "reading"
        rfile = self._h.rfile
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" not in te:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                b = rfile.read(min(left, 1 << 16))
                if not b:
                    raise ApiError(400, "request body ended early")
                left -= len(b)
                yield b
            self._body = "done"
            return
        while True:
            line = rfile.readline(1024)
            if not line:
                raise ApiError(400, "request body ended early")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self._body = "done"
                return
            data = rfile.read(size)
            rfile.readline(1024)
            yield data

    def drain(self, limit: int = 1 << 30) -> None:
        """Read what the handler left of the body (an error answered before an upload was
        read: the client is still sending it, and on a kept-alive connection the rest would
        be taken for the next request). A body half read, or above *limit*: the connection
        is closed instead."""
        if self._hijacked or self._body == "done":
            return
        if self._body == "reading":
            self._h.close_connection = True
            return
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        try:
            if "chunked" not in te and int(self.headers.get("Content-Length") or 0) > limit:
                self._h.close_connection = True
                return
            n = 0
            for chunk in self.body_chunks():
                n += len(chunk)
                if n > limit:
                    self._h.close_connection = True
                    return
        except (ApiError, ValueError, OSError):
            self._h.close_connection = True

    def json_body(self) -> Any:
        raw = self.body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"invalid JSON body: {e}") from None

    # --- answering ----------------------------------------------------------------------------
    def _start(self, status: int, headers: dict[str, str]) -> None:
        if self.answered:
            raise RuntimeError("request answered twice")
        self.answered = True
        h = self._h
        h.send_response(status)
        h.send_header("Api-Version", API_VERSION)
        h.send_header("Docker-Experimental", "false")
        h.send_header("Ostype", "linux")
        h.send_header("Server", f"pyoverlay (Docker Engine API {API_VERSION})")
        for k, v in headers.items():
            h.send_header(k, v)
        if self._close:
            h.send_header("Connection", "close")
        h.end_headers()

    def json(self, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self._start(status, {"Content-Type": "application/json", "Content-Length": str(len(data))})
        if not self._head:
            self._h.wfile.write(data)

    def text(
        self,
        text: str,
        status: int = 200,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        data = text.encode()
        self._start(status, {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})})
        if not self._head:
            self._h.wfile.write(data)

    def empty(self, status: int = 204, headers: dict[str, str] | None = None) -> None:
        self._start(status, ({"Content-Length": "0"} if status != 204 else {}) | (headers or {}))

    def error(self, status: int, message: str) -> None:
        self.json({"message": message}, status)

    def stream_start(
        self, content_type: str = "application/json", status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        """Start a chunked response (logs, events, image pulls' progress; *headers*: more
        of them). A HEAD request gets the headers only: check ``is_head`` before writing."""
        self._chunked = not self._head
        self._start(status, {"Content-Type": content_type, "Transfer-Encoding": "chunked", **(headers or {})})

    @property
    def connection(self) -> socket.socket:
        """The client's socket, to watch for a client that went away during a stream (not
        to write to: answers go through the methods above)."""
        return self._h.connection

    def flush(self) -> None:
        self._h.wfile.flush()

    def close_after(self) -> None:
        """Say in the answer (not started yet) that the connection ends with it: a client
        then opens a new one for its next request instead of finding this one closed."""
        self._close = True

    @property
    def is_head(self) -> bool:
        """A HEAD request: headers only, no body."""
        return self._head

    def stream_write(self, data: bytes) -> None:
        if data:
            w = self._h.wfile
            w.write(b"%x\r\n%s\r\n" % (len(data), data))
            w.flush()

    def stream_end(self) -> None:
        if self._chunked:
            self._h.wfile.write(b"0\r\n\r\n")
            self._h.wfile.flush()
            self._chunked = False

    def hijack(self, content_type: str = "application/vnd.docker.raw-stream") -> socket.socket:
        """Answer the upgrade (``101 UPGRADED`` when the client asked for ``Upgrade: tcp``,
        else ``200`` as older clients expect) and hand over the raw socket: the caller owns
        it; the server closes it after the handler returns."""
        upgrade = (self.headers.get("Upgrade") or "").lower() == "tcp"
        headers = {"Content-Type": content_type}
        if upgrade:
            headers.update({"Connection": "Upgrade", "Upgrade": "tcp"})
        self._hijacked = True
        self._start(101 if upgrade else 200, headers)
        self._h.wfile.flush()
        self._h.close_connection = True
        return self._h.connection


class ChunkWriter(io.RawIOBase):
    """A write-only file over a chunked response (``req.stream_start`` first): its bytes
    go to the client in chunks of about 64 KiB (tarfile's stream mode writes to it)."""

    def __init__(self, req: Request) -> None:
        super().__init__()
        self.req = req
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data, /) -> int:
        self.buf += data
        if len(self.buf) >= 1 << 16:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buf:
            self.req.stream_write(bytes(self.buf))
            self.buf.clear()


Handler = Callable[[Request], None]


class Router:
    """Routes ``(method, pattern)``; a pattern's ``{name}`` part matches one path segment
    (``{name:path}``: the rest, slashes included — image names hold slashes). Routers of
    endpoint groups are combined with ``include``."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def include(self, other: Router) -> None:
        self._routes.extend(other._routes)

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        rx = "^"
        for part in re.split(r"(\{[a-z_]+(?::path)?\})", pattern):
            if part.startswith("{"):
                name, _, kind = part[1:-1].partition(":")
                rx += f"(?P<{name}>.+)" if kind == "path" else f"(?P<{name}>[^/]+)"
            else:
                rx += re.escape(part)
        self._routes.append((method, re.compile(rx + "$"), handler))

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.add(method, pattern, fn)
            return fn

        return deco

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        """The handler and its path parameters; ApiError 405 when the path exists with
        another method; None: no such path."""
        other = False
        for m, rx, fn in self._routes:
            hit = rx.match(path)
            if hit is None:
                continue
            if m == method or (method == "HEAD" and m == "GET"):
                return fn, {k: unquote(v) for k, v in hit.groupdict().items()}
            other = True
        if other:
            raise ApiError(405, f"method {method} not allowed for {path}")
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the docker CLI expects
    server_version = "pyoverlay"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("%s " + format, self.client_address or "unix", *args)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        path, version = split.path, None
        m = _VERSION_PREFIX.match(path)
        if m:
            version, path = m.group(1), m.group(2)
        req = Request(self, self.command, path, version, parse_qs(split.query, keep_blank_values=True))
        api: ApiServer = self.server.api  # type: ignore[attr-defined]
        try:
            if version is not None and _vtuple(version) > _vtuple(API_VERSION):
                raise ApiError(
                    400, f"client version {version} is too new. Maximum supported API version is {API_VERSION}"
                )
            if version is not None and _vtuple(version) < _vtuple(MIN_API_VERSION):
                raise ApiError(
                    400,
                    f"client version {version} is too old. Minimum supported API version is {MIN_API_VERSION},"
                    " please upgrade your client to a newer version",
                )
            found = api.router.match(self.command, path)
            if found is None:
                raise ApiError(404, "page not found")
            fn, req.params = found
            fn(req)
            if not req.answered:
                req.empty(204)
            req.stream_end()
            req.drain()
        except AnsweredElsewhere:
            self.close_connection = True
            return
        except ApiError as e:
            self._fail(req, e.status, e.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug: dockerd answers 500 with the message
            log.exception("%s %s failed", self.command, self.path)
            self._fail(req, 500, f"{type(e).__name__}: {e}")
        with contextlib.suppress(OSError):
            self.wfile.flush()

    def _fail(self, req: Request, status: int, message: str) -> None:
        if req.answered:  # too late for a status: end the connection
            self.close_connection = True
            return
        with contextlib.suppress(OSError):
            req.drain()  # the client may still be sending its upload: read it first
            if self.close_connection:  # it could not be read: say the connection ends here
                req.close_after()
            req.error(status, message)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch  # noqa: N815


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def handle_error(self, request, client_address) -> None:
        log.debug("a connection ended with an error", exc_info=True)

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # BaseHTTPRequestHandler logs client_address[0]


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def finish_request(self, request, client_address) -> None:
        import ssl

        if isinstance(request, ssl.SSLSocket):  # the handshake in the connection's thread
            request.settimeout(30)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as e:  # no client certificate, a wrong one...
                log.info("TLS handshake with %s failed: %s", client_address, e)
                return
            request.settimeout(None)
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class SocketInUse(RunnerError):
    """A unix socket path another service answers on (or that is not a socket)."""


def _answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket *path*."""
    import errno

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        return True
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise SocketInUse(f"cannot tell whether a service answers on {path}: {e.strerror}") from None
    finally:
        s.close()


class _TcpServer6(_TcpServer):
    address_family = socket.AF_INET6


class ApiServer:
    """The listeners (unix sockets, TCP addresses) of one service, one router, and the
    service's state (*context*: what handlers need: the image store, the containers)."""

    def __init__(self, router: Router, context: Any = None):
        self.router = router
        self.context = context
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._sockets: list[tuple[str, int]] = []
        #: what ``docker info`` warns about (a TCP listener without TLS...)
        self.warnings: list[str] = []

    def listen_unix(self, path: str, mode: int = 0o660, gid: int | None = None) -> None:
        """A unix socket at *path*, *mode* and group *gid* set before the first connection
        is accepted. A socket another live service answers on is refused (SocketInUse); a
        stale one (nobody answers) is replaced; anything else there is refused. Check and
        bind happen under a lock on the directory, so two services starting at once cannot
        both take the path."""
        import fcntl
        import stat as stat_

        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                if not stat_.S_ISSOCK(st.st_mode):
                    raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
                if _answers(path):
                    raise SocketInUse(f"another service is already listening on {path}; stop it first")
                os.unlink(path)
            old = os.umask(0o177)
            try:
                srv = _UnixServer(path, _Handler, bind_and_activate=True)
            finally:
                os.umask(old)
            self._sockets.append((path, os.lstat(path).st_ino))
        finally:
            os.close(dfd)  # and the lock
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        self._add(srv)

    def remove_sockets(self) -> None:
        """Remove the unix sockets this service made (not one another has put there since)."""
        for path, ino in self._sockets:
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == ino:
                    os.unlink(path)
        self._sockets.clear()
        for srv in self._servers:
            with contextlib.suppress(OSError):
                srv.server_close()

    def listen_tcp(self, host: str, port: int, ssl_context: Any = None) -> None:
        cls: type[_TcpServer] = _TcpServer6 if ":" in host else _TcpServer
        srv = cls((host, port), _Handler, bind_and_activate=True)
        if ssl_context is not None:
            srv.socket = ssl_context.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
        self._add(srv)

    def _add(self, srv: socketserver.BaseServer) -> None:
        srv.api = self  # type: ignore[attr-defined]
        self._servers.append(srv)

    def serve_forever(self) -> None:
        """Serve every listener until ``shutdown``."""
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, name=f"listener-{srv}", daemon=True)
            t.start()
            self._threads.append(t)
        for t in self._threads:
            t.join()

    def shutdown(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
