"""Trace events: what the overlay did to its upper layer, and which process made it.

Every copy-up, whiteout, opaque directory, EXDEV and new upper object becomes one
event (schema in docs/tracing.md). ``Tracer.emit`` is called from the filesystem's
request handlers, in the trio thread, while the requesting process is still blocked
in its system call -- so its pid, command and namespaces can be read from /proc right
then. It never blocks and never raises: events go into a bounded channel, and when
that is full they are counted as dropped (reported in the stream's ``end`` event)
instead of stalling the filesystem. :mod:`overlayfs_py.tracesink` drains the channel
into a JSON-lines file and to live readers.

The requesting process comes from a context variable that the FUSE glue sets for each
request (:func:`request`); code that emits does not need to pass it around.
"""

from __future__ import annotations

import contextvars
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import trio

SCHEMA_VERSION = 1

#: event name -> the fields it carries besides the common ones (docs/tracing.md)
EVENTS = {
    "copy_up_start": ("path", "layer", "size", "reason"),
    "copy_up_done": ("path", "layer", "size", "bytes", "duration_ms", "reason"),
    "copy_up_failed": ("path", "layer", "size", "reason", "error"),
    "copy_up_unused": ("path", "bytes"),
    # index=on: a copy-up of a hard-linked lower file carries ``index`` (its entry's name in
    # <workdir>/index); a name linked to an existing entry, an entry removed
    "index_link": ("path", "index", "nlink"),
    "index_remove": ("path", "index"),
    "whiteout_create": ("path",),
    "whiteout_remove": ("path",),
    "opaque_dir": ("path",),
    "rename_exdev": ("path", "target"),
    "rename": ("path", "target", "exchange", "redirect"),
    "create": ("path", "kind"),
    "error": ("op", "error"),
}
#: stream records that are not filesystem events
CONTROL = ("dropped", "end")


@dataclass(frozen=True)
class Request:
    pid: int
    uid: int
    gid: int


_current: contextvars.ContextVar[Request | None] = contextvars.ContextVar("request", default=None)


def request(pid: int, uid: int, gid: int) -> contextvars.Token:
    """Record who made the request being served (the FUSE glue; undo with :func:`done`)."""
    return _current.set(Request(pid, uid, gid))


def done(token: contextvars.Token) -> None:
    _current.reset(token)


def current() -> Request | None:
    return _current.get()


class ProcessInfo:
    """pid -> (command, pid namespace inode, pid inside that namespace). The namespace and
    the pid in it are cached briefly (a process keeps them for life). The command is read
    each time, since an exec changes it: a container's PID 1 is runc's init until it execs
    the container's command, whose first changes come right after. It is read from the
    process's ``comm`` file kept open (one ``pread`` per event, not an open, read and close:
    a create of an untar emits one event per file), for the most recent ``OPEN_COMM``
    processes (counted in the server's ``stats:``). A process that has exited since (the
    kernel releases a file after its opener is gone) keeps the command it had when last seen."""

    TTL = 2.0
    OPEN_COMM = 8

    def __init__(self) -> None:
        self._own_pidns = _pidns(os.getpid())
        self._cache: dict[int, tuple[float, str, int | None, int | None]] = {}
        self._comm_fds: dict[int, int] = {}  # pid -> its /proc/PID/comm, oldest first

    @property
    def open_files(self) -> int:
        """The comm files held open now (at most ``OPEN_COMM``)."""
        return len(self._comm_fds)

    def _comm(self, pid: int) -> str:
        fd = self._comm_fds.get(pid)
        if fd is not None:
            try:
                return os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:  # ESRCH: gone (and the pid maybe reused): look again
                os.close(self._comm_fds.pop(pid))
        try:
            fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return ""
        if len(self._comm_fds) >= self.OPEN_COMM:
            os.close(self._comm_fds.pop(next(iter(self._comm_fds))))
        self._comm_fds[pid] = fd
        try:
            return os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:
            return ""

    def of(self, pid: int) -> tuple[str, int | None, int | None]:
        comm = self._comm(pid)
        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit is not None and now - hit[0] < self.TTL:
            if comm and comm != hit[1]:
                self._cache[pid] = (hit[0], comm, *hit[2:])
            return (comm or hit[1], *hit[2:])
        ns = _pidns(pid)
        cpid = None
        if ns is not None and ns != self._own_pidns:
            for line in _read(f"/proc/{pid}/status").splitlines():
                if line.startswith("NSpid:"):
                    cpid = int(line.split()[-1])
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[pid] = (now, comm or "?", ns, cpid)
        return comm or "?", ns, cpid

    def foreign(self, ns: int | None) -> bool:
        return ns is not None and ns != self._own_pidns


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _pidns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def display(relpath: bytes) -> str:
    return "/" + os.fsdecode(relpath) if relpath else "/"


class Tracer:
    """The producer side. ``container``: the id of the container this mount is the root
    of (processes in another pid namespace than the server's are attributed to it)."""

    def __init__(self, capacity: int = 8192, container: str | None = None) -> None:
        self.capacity = capacity
        # the channel is opened in trio, by the sink (``receive``); the events of the first
        # requests, served before trio is imported (docs/performance.md), wait in _early
        self._send: trio.MemorySendChannel[dict[str, Any]] | None = None
        self._receive: trio.MemoryReceiveChannel[dict[str, Any]] | None = None
        self._full: tuple[type[BaseException], ...] = ()
        self._early: list[dict[str, Any]] = []
        self.container = container
        self.procs = ProcessInfo()
        self.seq = 0
        self.dropped = 0
        self.closed = False
        self.pending = False  # events queued since the sink last emptied the queue

    def emit(self, event: str, who: Request | None = None, **fields) -> None:
        """Queue one event; *who* overrides the current request's process."""
        if self.closed:
            return
        self.seq += 1
        rec = {"v": SCHEMA_VERSION, "seq": self.seq, "ts": round(time.time(), 6), "event": event}
        rec.update(fields)
        req = who if who is not None else _current.get()
        if req is not None:
            comm, ns, cpid = self.procs.of(req.pid)
            rec.update(
                pid=req.pid,
                comm=comm,
                uid=req.uid,
                gid=req.gid,
                container=self.container if self.procs.foreign(ns) else None,
                cpid=cpid,
            )
        else:
            rec.update(pid=None, comm=None, uid=None, gid=None, container=None, cpid=None)
        send = self._send
        if send is None:
            if len(self._early) < self.capacity:
                self._early.append(rec)
                self.pending = True
            else:
                self.dropped += 1
            return
        try:
            send.send_nowait(rec)
            self.pending = True
        except self._full:
            self.dropped += 1

    @property
    def receive(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """The sink's end of the event channel (opened on first use, in trio)."""
        if self._receive is None:
            import trio

            self._send, self._receive = trio.open_memory_channel(self.capacity)
            self._full = (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError)
            for rec in self._early:
                self._send.send_nowait(rec)
            self._early = []
            if self.closed:
                self._send.close()
        return self._receive

    def close(self) -> None:
        """No more events; the sink drains what is queued and writes the ``end`` record."""
        if not self.closed:
            self.closed = True
            if self._send is not None:
                self._send.close()
