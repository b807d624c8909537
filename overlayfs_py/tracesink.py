"""Where trace events go: a JSON-lines file and any number of live readers.

One trio task drains the tracer's channel. Each event is written to the file (if
``--trace FILE`` was given) and offered to every connected reader. A reader has its
own bounded queue: a slow or paused reader only loses its own events (it is told how
many, with a ``dropped`` record, as soon as it catches up) and never slows the
filesystem or the other readers. The last 1000 events are kept for readers that ask
for history when they attach.

Readers connect to a unix socket beside the mount record (mode 0600: events name
processes and paths). Protocol: the reader sends one JSON line (``{"history": true}``
or ``{}``), then receives JSON lines until the mount ends with an ``end`` record.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import time

import trio

from .trace import SCHEMA_VERSION, Tracer
from .unixsock import listen

log = logging.getLogger(__name__)

READER_QUEUE = 2048
HISTORY = 1000


class _Reader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.send, self.receive = trio.open_memory_channel(READER_QUEUE)
        self.dropped = 0

    def _room(self) -> bool:
        # two slots stay free for the final dropped notice and the end record
        return self.send.statistics().current_buffer_used < READER_QUEUE - 2

    def finish(self, end_line: bytes) -> None:
        """The last records: what this reader lost, then the end. Never dropped."""
        if self.dropped:
            notice = (
                json.dumps(
                    {"v": SCHEMA_VERSION, "event": "dropped", "count": self.dropped, "ts": round(time.time(), 6)}
                )
                + "\n"
            )
            self.send.send_nowait(notice.encode())
        self.send.send_nowait(end_line)
        self.send.close()

    def offer(self, line: bytes) -> None:
        if not self._room():
            self.dropped += 1
            return
        if self.dropped:
            notice = (
                json.dumps(
                    {"v": SCHEMA_VERSION, "event": "dropped", "count": self.dropped, "ts": round(time.time(), 6)}
                )
                + "\n"
            )
            self.send.send_nowait(notice.encode())
            self.dropped = 0
            if not self._room():
                self.dropped += 1
                return
        self.send.send_nowait(line)

    async def pump(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async with self.receive:
                async for line in self.receive:
                    lines = [line]  # and all queued behind it: one send per turn
                    while True:
                        try:
                            lines.append(self.receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await self.stream.send_all(b"".join(lines))
        with contextlib.suppress(Exception):
            await self.stream.aclose()


class TraceSink:
    def __init__(
        self, tracer: Tracer, file: str | None, socket_path: str | None, listener: socket.socket | None = None
    ) -> None:
        """*listener*: the socket at *socket_path*, bound already (``unixsock.listen``)."""
        self.tracer = tracer
        self.file_path = file
        self.socket_path = socket_path
        self.listener = listener
        self.readers: set[_Reader] = set()
        self.history: collections.deque[bytes] = collections.deque(maxlen=HISTORY)
        self.running = False
        self.readers_closed = False

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        out = None
        if self.file_path:  # 0600: events name processes and paths (the server's umask is 0)
            # O_NOFOLLOW: a symlink planted at the name is refused, never written through.
            fd = os.open(self.file_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            out = os.fdopen(fd, "wb")
        listener = self.listener
        if listener is None and self.socket_path:
            listener = listen(self.socket_path)
            if listener is None:
                self.socket_path = None
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                if listener is not None:
                    nursery.start_soon(self._accept, trio.socket.from_stdlib_socket(listener), nursery)
                task_status.started()
                async with self.tracer.receive:
                    async for rec in self.tracer.receive:
                        out = self._deliver(rec, out)
                        out = self._drain(out)  # all that is queued, in this one turn
                end = {
                    "v": SCHEMA_VERSION,
                    "event": "end",
                    "ts": round(time.time(), 6),
                    "emitted": self.tracer.seq,
                    "dropped": self.tracer.dropped,
                }
                readers, self.readers_closed = list(self.readers), True
                out = self._deliver(end, out, to_readers=False)
                if self.tracer.dropped:
                    log.warning("trace: %d events were dropped (queue full)", self.tracer.dropped)
                end_line = (json.dumps(end, separators=(",", ":")) + "\n").encode()
                for r in readers:
                    r.finish(end_line)
                with trio.move_on_after(2):  # let readers receive the end record
                    while self.readers:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        finally:
            self.running = False
            if out is not None:
                out.close()
            if self.socket_path:
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)

    def _drain(self, out):
        """Deliver every event queued now without waiting: an engine that serves requests
        inline gives the sink one turn now and then, and each turn must empty the queue."""
        while True:
            try:
                rec = self.tracer.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                self.tracer.pending = False
                return out
            out = self._deliver(rec, out)

    def _deliver(self, rec: dict, out, to_readers: bool = True):
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        self.history.append(line)
        if out is not None:
            try:
                out.write(line)
                if self.tracer.receive.statistics().current_buffer_used == 0:
                    out.flush()  # a burst is written in one go; a lone event at once
            except OSError as e:
                log.error("trace file %s: %s; no longer writing it", self.file_path, e)
                out = None
        if to_readers:
            for r in list(self.readers):
                r.offer(line)
        return out

    async def _accept(self, listener, nursery) -> None:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(self._serve_reader, trio.SocketStream(sock))

    async def _serve_reader(self, stream: trio.SocketStream) -> None:
        reader = _Reader(stream)
        hello = b""
        with trio.move_on_after(2):
            while b"\n" not in hello:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                hello += chunk
        try:
            want = json.loads(hello.split(b"\n", 1)[0] or b"{}")
        except ValueError:
            want = {}
        if self.readers_closed:  # attached after the end: nothing more will come
            await stream.aclose()
            return
        if want.get("history"):
            for line in list(self.history):
                reader.offer(line)
        self.readers.add(reader)
        try:
            await reader.pump()
        finally:
            self.readers.discard(reader)
