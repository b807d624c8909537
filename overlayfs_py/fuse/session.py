"""The direct engine's request loop: /dev/fuse read and written by this process.

Mounting is mounting.py's (mount(2), fusermount3, or an fd handed in). ``Session.run``
reads requests (the fd non-blocking, trio waiting for it), answers the synchronous core
calls inline and runs each awaitable one (opens, copy-ups, renames) in a task of its own.
Errors become replies here and only here. Notifications that take the kernel's directory
locks (inval_entry) are written from a thread of their own: a request being answered may
hold the lock they wait for. The loop ends when the kernel ends the connection (an
unmount, DESTROY, a fusectl abort) or when the server cancels it (a signal).

Before ``run``, ``serve_early`` answers the requests the core answers inline (INIT, and
most others) without trio: importing trio takes 50 ms, and a new mount's first requests
(podman's, runc's: a short container's all) should not wait for it. A request that needs a
task waits in ``_deferred`` until trio is imported and ``run`` starts it.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import trace
from ..trace import Tracer
from . import proto as p
from .ops import NeedsTask, Ops, Request
from .passthrough import Passthrough

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20
MAX_PAGES = 256
#: a request is at most max_write + its headers (the kernel wants room for both)
BUFFER_SIZE = MAX_WRITE + 64 * 1024

#: what we ask for in INIT (granted: the part the kernel offers)
WANT = (
    p.ASYNC_READ
    | p.ATOMIC_O_TRUNC
    | p.EXPORT_SUPPORT
    | p.BIG_WRITES
    | p.HAS_IOCTL_DIR
    | p.AUTO_INVAL_DATA
    | p.DO_READDIRPLUS  # always: READDIRPLUS_AUTO measured slower (docs/performance.md)
    | p.ASYNC_DIO
    | p.PARALLEL_DIROPS
    | p.MAX_PAGES
    | p.INIT_EXT
)

#: max_stack_depth with passthrough: backing files on a filesystem that stacks on none
PASSTHROUGH_STACK_DEPTH = 1

#: requests made on behalf of a process the trace records (fs.py passes ctx for these)
_TRACED = frozenset(
    (p.OPEN, p.CREATE, p.MKDIR, p.MKNOD, p.SYMLINK, p.LINK, p.UNLINK, p.RMDIR, p.RENAME, p.RENAME2)
    + (p.SETATTR, p.SETXATTR, p.REMOVEXATTR, p.TMPFILE, p.FALLOCATE, p.COPY_FILE_RANGE)
)

#: answered ENOSYS on purpose: the kernel then stops sending them (fc->no_flush, ...)
_NOT_NEEDED = frozenset((p.FLUSH,))

#: how long the loop waits for a request in poll(2) itself, while no task of its own is
#: running, before it hands the wait to trio (trio's other tasks, the trace sink and the
#: signal handling, run then; under load they run every 32 requests)
IDLE_POLL_MS = 20

_pack_out = p.OUT_HEADER.pack
_OUT_SIZE = p.OUT_HEADER.size
_unpack_in = p.IN_HEADER.unpack_from
_IN_SIZE = p.IN_HEADER.size


class Notifier:
    """The engine's two ways of telling the kernel's caches (``mount.build_overlay``'s
    *drop_entries* and *attr_changed*). Works once ``start`` gave it the fd."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, fd: int) -> None:
        self.fd = fd
        self._thread = threading.Thread(target=self._writer, name="fuse-notify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(5)
            self._thread = None

    def _writer(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None or self.fd is None:
                return
            try:
                os.write(self.fd, msg)
            except OSError as exc:  # ENOENT: the kernel no longer knows it; ENODEV: gone
                if exc.errno == errno.ENODEV:
                    return

    def drop_entries(self, drops: list[tuple[int, bytes]]) -> None:
        """Asynchronously (never from inside a request: the kernel takes the parent's lock)."""
        if self.fd is None:
            return
        for parent_id, name in drops:
            self._queue.put(p.notify_inval_entry(parent_id, name))

    def listing_changed(self, node_id: int) -> None:
        """Drop the kernel's cached listing of a directory (FOPEN_CACHE_DIR keeps it in the
        directory's pages: offset 0 drops them) and its attributes. Synchronous, so that
        no readdir after the request that changed it sees the old one: a directory's pages
        are locked only while the kernel copies entries in or out, never across a request."""
        if self.fd is None:
            return
        try:
            os.write(self.fd, p.notify_inval_inode(node_id, 0, 0))
        except OSError:
            pass  # the kernel no longer knows the node (or never cached it)

    def attr_changed(self, node_id: int) -> None:
        """Drop the kernel's cached attributes of a node (takes no lock the kernel holds)."""
        if self.fd is None:
            return
        try:
            os.write(self.fd, p.notify_inval_inode(node_id))
        except OSError:
            pass  # the kernel no longer knows the node


def _log_request(opcode: int, nodeid: int, pid: int, body: memoryview) -> None:
    """``--debug``: the request, and the name it carries when it carries one."""
    name = bytes(body[:256]).split(b"\0", 1)[0] if opcode in _NAMED else b""
    log.debug("%s node %d pid %d%s", p.OPCODE_NAMES.get(opcode, str(opcode)), nodeid, pid, f" {name!r}" if name else "")


#: requests whose body starts with a name
_NAMED = frozenset((p.LOOKUP, p.UNLINK, p.RMDIR, p.SYMLINK))


class Session:
    def __init__(self, fd: int, ops: Ops, tracer: Tracer) -> None:
        self.fd = fd
        self.ops = ops
        self.tracer = tracer
        self.passthrough: Passthrough = getattr(ops, "passthrough", None) or Passthrough("off")
        self.initialized = False
        self.proto_minor = 0
        self._nursery: trio.Nursery | None = None
        self.ended_by_kernel = False
        #: why serving ended: "disconnected" (ENODEV: unmounted, or a fusectl abort),
        #: "aborted" (ECONNABORTED: an abort with FUSE_ABORT_ERROR granted), "destroy"
        #: (DESTROY), None (stopped by the server: a signal)
        self.end_reason: str | None = None
        self._spawned = False  # a task was started: the loop yields to it
        self.debug = log.isEnabledFor(logging.DEBUG)  # --debug: one line per request
        self._tasks = 0  # tasks of requests not yet answered
        self._deferred: list[tuple[object, Request]] = []  # tasks to start once trio runs
        self.early_served = 0  # requests answered by serve_early

    # --- replies ------------------------------------------------------------------------

    def _write(self, parts: list[bytes]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                raise

    def reply(self, unique: int, payload: bytes) -> None:
        # the hot path of every request: the header packed here, no helper calls
        try:
            os.writev(self.fd, (_pack_out(_OUT_SIZE + len(payload), 0, unique), payload))
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                raise

    def reply_error(self, unique: int, err: int) -> None:
        try:
            os.write(self.fd, _pack_out(_OUT_SIZE, -err, unique))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def _errno(self, exc: BaseException, opcode: int) -> int:
        """The one place where exceptions become FUSE replies."""
        if isinstance(exc, OSError):
            return exc.errno or errno.EIO
        log.error("internal error in opcode %d", opcode, exc_info=exc)
        self.tracer.emit("error", op=str(opcode), error=f"{type(exc).__name__}: {exc}")
        return errno.EIO

    # --- the loop -----------------------------------------------------------------------

    def serve_early(self, wake: Sequence[int], idle_ms: int) -> int | None:
        """Serve without trio (``run`` takes over) until one of the fds *wake* is readable
        (a trace reader connects, a signal is pending: that fd is returned), a request
        needs a task (kept for ``run``), no request came for *idle_ms*, or the kernel ends
        the connection (None then). ``early_served`` counts the requests answered."""
        os.set_blocking(self.fd, False)
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        for w in wake:
            poller.register(w, select.POLLIN)
        fd = self.fd
        while not self._deferred and self.end_reason is None:
            events = poller.poll(idle_ms)
            if not events:
                return None
            for f, _ev in events:
                if f != fd:
                    return f
            try:
                n = os.readv(fd, [buf])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                    self._ended("disconnected" if exc.errno == errno.ENODEV else "aborted")
                    return None
                raise
            self.early_served += 1
            if not self._handle(view[:n]):
                self._ended("destroy")
                return None
        return None

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    async def run(self) -> None:
        """Serve until the kernel ends the connection (unmount, abort) or DESTROY."""
        import trio

        if self.end_reason is not None:  # ended while served early
            return
        os.set_blocking(self.fd, False)
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        served = 0
        # The next request is usually not there yet when a reply is written (a caller
        # waits for it): waiting in poll(2) first costs one syscall, where a read that
        # fails with EAGAIN and trio's wait_readable cost a raised exception, an epoll
        # round and a pass of trio's scheduler (~10 us in all).
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poll = poller.poll
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for handler, req in self._deferred:  # requests that came before trio
                nursery.start_soon(self._run_async, handler, req)
            self._deferred = []
            while True:
                if not self._tasks and not poll(IDLE_POLL_MS):
                    await trio.lowlevel.wait_readable(self.fd)
                try:
                    n = os.readv(self.fd, [buf])
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.fd)
                    continue
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOENT:  # an interrupted request: gone already
                        continue
                    if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                        self._ended("disconnected" if exc.errno == errno.ENODEV else "aborted")
                        break
                    raise
                if not self._handle(view[:n]):
                    self._ended("destroy")  # the kernel tears the superblock down
                    break
                served += 1
                # let started tasks and the trace sink (events queued) run under load too
                if self._spawned or self.tracer.pending or served % 32 == 0:
                    self._spawned = False
                    await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()

    def _ended(self, reason: str) -> None:
        """The kernel ended the connection: nothing is left to unmount (mounting.py tells
        an unmount from an abort and logs it)."""
        self.ended_by_kernel = True
        self.end_reason = reason
        log.debug("direct engine: the kernel ended the connection (%s)", reason)

    def _handle(self, data: memoryview) -> bool:
        """Answer (or start answering) one request; False ends the session."""
        _len, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = _unpack_in(data)
        body = data[_IN_SIZE:]
        if self.debug:
            _log_request(opcode, nodeid, pid, body)
        ops = self.ops
        handler = ops.sync.get(opcode)
        if handler is not None:
            req = Request(opcode, unique, nodeid, uid, gid, pid, body)
            token = trace.request(pid, uid, gid) if opcode in _TRACED else None
            try:
                payload = handler(req)
            except NeedsTask:
                req.body = memoryview(bytes(body))
                self._spawn(ops.asyncs[opcode], req)
                return True
            except BaseException as exc:
                err = self._errno(exc, opcode)
                if opcode == p.LOOKUP and err in (errno.EMFILE, errno.ENFILE):
                    req.body = memoryview(bytes(body))
                    self._spawn(ops.lookup_waiting, req)
                else:
                    self.reply_error(unique, err)
                return True
            finally:
                if token is not None:
                    trace.done(token)
            self.reply(unique, payload)
            return True
        ahandler = ops.asyncs.get(opcode)
        if ahandler is not None:
            self._spawn(ahandler, Request(opcode, unique, nodeid, uid, gid, pid, memoryview(bytes(body))))
            return True
        if opcode == p.FORGET:
            (nlookup,) = p.FORGET_IN.unpack_from(body)
            ops.forget(nodeid, nlookup)
        elif opcode == p.BATCH_FORGET:
            count, _dummy = p.BATCH_FORGET_IN.unpack_from(body)
            off = p.BATCH_FORGET_IN.size
            for _ in range(count):
                node_id, nlookup = p.FORGET_ONE.unpack_from(body, off)
                off += p.FORGET_ONE.size
                ops.forget(node_id, nlookup)
        elif opcode == p.INTERRUPT:
            pass  # never interrupted: each request (a copy-up too) finishes and is answered
        elif opcode == p.INIT:
            self._init(unique, body)
        elif opcode == p.DESTROY:
            self.reply(unique, b"")
            return False
        else:  # FLUSH on purpose (_NOT_NEEDED); the rest: not served
            self.reply_error(unique, errno.ENOSYS)
        return True

    def _spawn(self, handler: object, req: Request) -> None:
        """Answer *req* in a task of its own. It counts as running from now on: trio may
        resume the loop before the task's first step, and the loop must not then sit in
        poll(2) (``IDLE_POLL_MS``) while the kernel waits for this very reply. Before trio
        runs (``serve_early``) it waits in ``_deferred``."""
        self._tasks += 1
        self._spawned = True
        if self._nursery is None:
            self._deferred.append((handler, req))
        else:
            self._nursery.start_soon(self._run_async, handler, req)

    async def _run_async(self, handler: object, req: Request) -> None:
        import trio

        token = trace.request(req.pid, req.uid, req.gid) if req.opcode in _TRACED else None
        try:
            payload = await handler(req)  # type: ignore[operator]
        except trio.Cancelled:
            raise
        except BaseException as exc:
            self.reply_error(req.unique, self._errno(exc, req.opcode))
            return
        finally:
            self._tasks -= 1
            if token is not None:
                trace.done(token)
        self.reply(req.unique, payload)

    def _init(self, unique: int, body: memoryview) -> None:
        major, minor, max_readahead, flags = p.INIT_IN_OLD.unpack_from(body)
        if major != p.KERNEL_VERSION or minor < 31:
            log.error("FUSE protocol %d.%d not supported (need 7.31 or later)", major, minor)
            self.reply_error(unique, errno.EPROTO)
            return
        flags2 = p.INIT_IN.unpack_from(body)[4] if flags & p.INIT_EXT and len(body) >= p.INIT_IN.size else 0
        offered = flags | (flags2 << 32)
        pt = self.passthrough
        # Passthrough (7.40): backing files of at most one stacking level below (a layer on
        # ext4 or xfs; not on another overlay or FUSE mount), never with the writeback cache.
        granted = offered & (WANT | p.PASSTHROUGH if pt.wanted() and minor >= 40 else WANT)
        pt.granted(self.fd, bool(granted & p.PASSTHROUGH))
        self.proto_minor = min(minor, p.KERNEL_MINOR_VERSION)
        out = p.INIT_OUT.pack(
            p.KERNEL_VERSION,
            self.proto_minor,
            max_readahead,
            granted & 0xFFFF_FFFF,
            64,  # max_background
            48,  # congestion_threshold
            MAX_WRITE,
            1,  # time_gran: nanoseconds
            MAX_PAGES,
            0,
            granted >> 32,
            PASSTHROUGH_STACK_DEPTH if granted & p.PASSTHROUGH else 0,  # max_stack_depth
            0,
        )
        log.info("direct engine: INIT, kernel 7.%d offers %#x; granted %#x", minor, offered, granted)
        self.initialized = True
        self.reply(unique, out)
