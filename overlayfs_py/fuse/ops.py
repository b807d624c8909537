"""Requests of the direct engine translated to calls on the core (``core.Core``): the same
translation ``fs.py`` makes for pyfuse3, on raw ``fuse.h`` structures.

A handler takes the request (``Request``: the header's fields and the body) and returns the
reply's payload, or raises ``OSError``; ``session.Session`` turns errors into replies (the
one place). Handlers in ``SYNC`` run inline in the request loop; those in ``ASYNC`` (the core's
awaitable calls: opens, copy-ups, renames) each run in a task of their own.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from .. import _sys
from ..budget import FD_WAIT
from ..core import Core
from ..inodes import Node
from ..overlay import Caller
from ..write import INLINE_MAX
from . import proto as p
from .passthrough import NodeBacking, Passthrough

log = logging.getLogger(__name__)

#: lowers never change while mounted and the upper only through us (fs.TIMEOUT)
TIMEOUT = 86400
#: getxattr answers of lower objects kept at most (``Ops.getxattr``)
LOWER_XATTRS_MAX = 4096
_NO_XATTR = b"\0no xattr"  # a miss, kept (identity-compared: no value is this object)
_RENAME_EXCHANGE = 2


class NeedsTask(Exception):
    """Raised by a synchronous handler before doing anything: this request must be served
    by the handler of the same opcode in ``Ops.asyncs``, in a task of its own."""


@dataclass(slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview


def _name(body: memoryview, start: int = 0) -> bytes:
    """A NUL-terminated name at *start* of the body."""
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _two_names(body: memoryview, start: int = 0) -> tuple[bytes, bytes]:
    raw = bytes(body[start:])
    first, _, rest = raw.partition(b"\0")
    return first, rest.partition(b"\0")[0]


#: LOOKUP of a name that does not exist: node 0, kept by the kernel for TIMEOUT
_NEGATIVE_ENTRY = p.ENTRY_OUT.pack(0, 0, TIMEOUT, 0, 0, 0, *([0] * 16))

#: backing files kept registered for nodes with no open file (least recently used closed first)
IDLE_BACKINGS = 65536

#: a plain open: the kernel keeps cached pages across opens (pyoverlay owns every change of
#: the upper layer) and sends no FLUSH
PLAIN_OPEN = p.FOPEN_KEEP_CACHE | p.FOPEN_NOFLUSH


def _setattr_changes(body: memoryview) -> tuple[dict[str, int], int | None]:
    """SETATTR's changes (``WritePath.setattr``'s spelling) and the file handle it names."""
    (valid, _pad, fh, size, _lo, atime, mtime, _ct, atimensec, mtimensec, _ctn, mode, _u4, uid, gid, _u5) = (
        p.SETATTR_IN.unpack_from(body)
    )
    changes: dict[str, int] = {}
    if valid & p.FATTR_SIZE:
        changes["size"] = size
    if valid & p.FATTR_MODE:
        changes["mode"] = mode
    if valid & p.FATTR_UID:
        changes["uid"] = uid
    if valid & p.FATTR_GID:
        changes["gid"] = gid
    if valid & p.FATTR_ATIME:  # with ATIME_NOW too: the kernel filled in its time
        changes["atime_ns"] = atime * 1_000_000_000 + atimensec
    if valid & p.FATTR_MTIME:
        changes["mtime_ns"] = mtime * 1_000_000_000 + mtimensec
    return changes, (fh if valid & p.FATTR_FH else None)


class Ops:
    def __init__(self, core: Core, passthrough: Passthrough | None = None) -> None:
        self.passthrough = passthrough if passthrough is not None else Passthrough("off")
        # node id -> the backing file the kernel has bound to it; fh -> its node id
        self._backing: dict[int, NodeBacking] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # registered, no open file
        self._backed_fh: dict[int, tuple[int, int | None]] = {}  # fh -> (node id, ctime at open)
        self._clones: dict[int, int] = {}  # layer index -> fd of its noatime clone (-1: none)
        self.ov = core.view
        self.writes = core.writes
        self.budget = core.budget
        self.inodes = core.view.inodes
        self.owners = core.view.owners
        self._lower_xattrs: dict[tuple[int, bytes], bytes] = {}
        self.sync: dict[int, Callable[[Request], bytes]] = {
            p.LOOKUP: self.lookup,
            p.GETATTR: self.getattr,
            p.READLINK: self.readlink,
            p.STATFS: self.statfs,
            p.READ: self.read,
            p.WRITE: self.write,
            p.RELEASE: self.release,
            p.OPENDIR: self.opendir,
            p.READDIR: self.readdir,
            p.READDIRPLUS: self.readdirplus,
            p.RELEASEDIR: self.releasedir,
            p.GETXATTR: self.getxattr,
            p.LISTXATTR: self.listxattr,
            p.ACCESS: self.access,
            p.MKDIR: self.mkdir,
            p.MKNOD: self.mknod,
            p.SYMLINK: self.symlink,
            p.UNLINK: self.unlink,
            p.RMDIR: self.rmdir,
            p.OPEN: self.open_now,
            p.CREATE: self.create,
            p.SETATTR: self.setattr_now,
            p.LSEEK: self.lseek,
            p.TMPFILE: self.tmpfile,
            p.FALLOCATE: self.fallocate_now,
            p.COPY_FILE_RANGE: self.copy_file_range_now,
        }
        self.asyncs: dict[int, Callable[[Request], Awaitable[bytes]]] = {
            p.OPEN: self.open,
            p.LINK: self.link,
            p.UNLINK: self.unlink_async,
            p.RENAME: self.rename,
            p.RENAME2: self.rename2,
            p.SETATTR: self.setattr,
            p.FSYNC: self.fsync,
            p.FSYNCDIR: self.fsyncdir,
            p.SETXATTR: self.setxattr,
            p.REMOVEXATTR: self.removexattr,
            p.FALLOCATE: self.fallocate,
            p.COPY_FILE_RANGE: self.copy_file_range,
        }

    # --- helpers ------------------------------------------------------------------------

    def _node(self, node_id: int) -> Node:
        node = self.inodes.get(node_id)
        if node is None:
            raise OSError(errno.ESTALE, "no such node")
        return node

    def _attr(self, node: Node | None, st: os.stat_result, ino: int, nlink: int) -> tuple[int, ...]:
        mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
        if self.owners.presenting:
            uid, gid, mode = self.ov.presented_owner(node, st)
        return p.pack_attr_fields(
            ino, mode, nlink, uid, gid, st.st_rdev, st.st_size, st.st_blocks, st.st_blksize,
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
        )  # fmt: skip

    def _entry_out(self, node: Node | None, st: os.stat_result, ino: int, nlink: int) -> bytes:
        node_id = node.id if node is not None else 0
        return p.ENTRY_OUT.pack(node_id, 0, TIMEOUT, TIMEOUT, 0, 0, *self._attr(node, st, ino, nlink))

    def _node_entry(self, node: Node, st: os.stat_result | None = None) -> bytes:
        if st is None:
            st = self.ov.getattr(node)
        return self._entry_out(node, st, node.ino, self.ov.nlink(node, st))

    def _new_entry(self, node: Node, st: os.stat_result) -> bytes:
        out = self._node_entry(node, st)
        self.inodes.ref(node)
        return out

    def _node_attr_out(self, node: Node, st: os.stat_result | None = None) -> bytes:
        if st is None:
            st = self.ov.getattr(node)
        return p.ATTR_OUT.pack(TIMEOUT, 0, 0, *self._attr(node, st, node.ino, self.ov.nlink(node, st)))

    @staticmethod
    def caller(req: Request, umask: int = 0) -> Caller:
        return Caller(req.uid, req.gid, req.pid, umask)

    # --- lookup and attributes ----------------------------------------------------------

    def _lookup_once(self, parent: Node, name: bytes) -> bytes:
        st: os.stat_result | None
        if name == b".":
            node, st = parent, None
        elif name == b"..":
            node, st = (parent.parent or parent), None
        else:
            try:
                node, st = self.ov.lookup(parent, name)
            except OSError as exc:
                if exc.errno == errno.ESTALE:  # the name changed under the lookup: once more
                    node, st = self.ov.lookup(parent, name)
                else:
                    raise
        out = self._node_entry(node, st)
        self.inodes.ref(node)
        self.budget.check()
        return out

    def lookup(self, req: Request) -> bytes:
        try:
            return self._lookup_once(self._node(req.nodeid), _name(req.body))
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # a negative entry the kernel may cache
                return _NEGATIVE_ENTRY
            raise

    async def lookup_waiting(self, req: Request) -> bytes:
        """LOOKUP out of descriptors for nodes: the kernel was asked to drop some entries;
        their FORGETs come as other requests meanwhile (the session retries here)."""
        import trio

        waited = 0.0
        while True:
            try:
                return self.lookup(req)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE) or waited >= FD_WAIT:
                    raise
            await trio.sleep(0.02)
            waited += 0.02

    def forget(self, node_id: int, nlookup: int) -> None:
        self.inodes.forget(node_id, nlookup)
        if node_id in self._idle and self.inodes.get(node_id) is None:  # the node is gone
            del self._idle[node_id]
            self._unregister(node_id)

    def getattr(self, req: Request) -> bytes:
        return self._node_attr_out(self._node(req.nodeid))

    def readlink(self, req: Request) -> bytes:
        return self.ov.readlink(self._node(req.nodeid))

    def statfs(self, req: Request) -> bytes:
        sv = self.ov.statfs()
        return p.STATFS_OUT.pack(
            sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree, sv.f_bsize, sv.f_namemax, sv.f_frsize, 0
        )

    def access(self, req: Request) -> bytes:
        return b""  # the kernel checks permissions (default_permissions); else allowed

    def setattr_now(self, req: Request) -> bytes:
        """SETATTR without a task when nothing in it can wait: a node already in the upper
        layer, no truncation (``WritePath.setattr_waits``)."""
        node = self._node(req.nodeid)
        changes, fh = _setattr_changes(req.body)
        if self.writes.setattr_waits(node, changes) and not self.writes.setattr_copying_now(node, changes):
            raise NeedsTask
        return self._node_attr_out(node, self.writes.setattr_now(node, changes, fh))

    async def setattr(self, req: Request) -> bytes:
        node = self._node(req.nodeid)
        changes, fh = _setattr_changes(req.body)
        return self._node_attr_out(node, await self.writes.setattr(node, changes, fh))

    # --- files --------------------------------------------------------------------------

    def _opened(self, node: Node, fh: int) -> tuple[int, int]:
        """The FOPEN flags and backing id for *fh* just opened on *node*: passthrough to its
        real file when the kernel allows it, else a plain open (docs/semantics.md)."""
        pt = self.passthrough
        if not (pt.active or self._backing) or not stat.S_ISREG(node.mode):
            return PLAIN_OPEN, 0
        h = self.ov.handles[fh]
        # The real object a node serves changes only in a copy-up, which moves the node to
        # the upper layer: its layer tells (no fstat needed; its key does not: an unlinked
        # or renamed-over node loses its key and keeps its object).
        obj = node.layer.index
        bound = self._backing.get(node.id)
        if node.lowerdata is not None and bound is not None and bound.opens:
            self._stale(node, fh)  # metadata copied up under open passthrough files: as below
        plain = [o for o in self.ov.handles.fhs_of(node) if o != fh and o not in self._backed_fh]
        if node.lowerdata is not None or plain:
            # a metacopy file: plain opens until its data copy-up, and after it while a
            # plain open of it lasts (the kernel refuses passthrough beside cached I/O: EIO)
            return PLAIN_OPEN, 0
        if bound is not None and bound.opens == 0:  # registered, but bound to no inode now
            del self._idle[node.id]
            if bound.obj != obj or not pt.active:  # copied up since: the kernel may take the new file
                self._unregister(node.id)
                bound = None
        if bound is None:
            if not pt.active:  # refused since (a layer on a stacked filesystem): plain opens
                return PLAIN_OPEN, 0
            try:
                backing_id = self._register(node, h.fd)  # type: ignore[union-attr]
            except OSError as exc:  # a plain open (Passthrough.register logs a refusal)
                log.debug("no passthrough for %r: %s", node, exc.strerror)
                return PLAIN_OPEN, 0
            bound = self._backing[node.id] = NodeBacking(backing_id, obj)
        elif bound.obj != obj:
            self._stale(node, fh)
        bound.opens += 1
        # Writes through passthrough never reach the core, which watches for copy-ups made
        # for an open and never used (``OpenFile.unused_copy_up``): release compares ctimes.
        ctime = os.fstat(h.fd).st_ctime_ns if h.unused_copy_up is not None else None  # type: ignore[union-attr]
        self._backed_fh[fh] = (node.id, ctime)
        return p.FOPEN_PASSTHROUGH | p.FOPEN_NOFLUSH, bound.backing_id

    def _stale(self, node: Node, fh: int) -> NoReturn:
        """A copy-up while passthrough files of the lower object are open: the kernel keeps
        this inode bound to the lower file, so no open of the upper one (nor a plain open
        of a metacopy file) can be answered on it. Its names lead to a new node from now
        on; ESTALE makes the kernel look the name up again (LOOKUP_REVAL) and open that
        node."""
        self.ov.handles[fh].unused_copy_up = None  # type: ignore[union-attr]
        self.ov.release(fh)
        self.inodes.unhash(node)
        raise OSError(errno.ESTALE, "the node was copied up under open passthrough files")

    def _register(self, node: Node, fd: int) -> int:
        """A backing id for the real file open as *fd*. The kernel opens each passthrough
        file's backing file on the registered file's path with the FUSE file's flags, not
        with the ``O_NOATIME`` of real files (``handles.open_real``, as the kernel's
        overlay): registered through a noatime clone of the layer's mount (one per layer,
        made once; the file reached by its handle), reads leave the layer's atime alone as
        they do through the kernel's overlay. Where that fails, a noatime bind mount of the
        file alone (slower: about 50 us), else the file itself."""
        bfd = -1
        clone = self._clones.get(node.layer.index)
        if clone is None:
            try:
                clone = _sys.noatime_clone(node.layer.fd)
            except OSError as exc:
                log.debug("no noatime clone of %s (%s)", node.layer.label, exc.strerror)
                clone = -1
            self._clones[node.layer.index] = clone
        if clone >= 0:
            try:
                bfd = _sys.reopen_in(clone, fd, os.O_RDONLY)
            except OSError:
                bfd = -1
        if bfd < 0:
            try:
                bfd = _sys.reopen_noatime(fd, os.O_RDONLY)
            except OSError as exc:
                log.debug("no noatime mount for a backing file (%s): reads update its atime", exc.strerror)
                return self.passthrough.register(fd)
        try:
            return self.passthrough.register(bfd)
        finally:
            os.close(bfd)

    def _open_out(self, node: Node, fh: int) -> bytes:
        flags, backing_id = self._opened(node, fh)
        return p.OPEN_OUT.pack(fh, flags, backing_id)

    def open_now(self, req: Request) -> bytes:
        """OPEN without a task when it copies up a small file that no task is copying up
        (``Overlay.open_copying_now``: its data is copied, synced and named here, as a task
        would, without waiting for anything; an O_TRUNC then truncates that small copy), or
        when it cannot copy up (read-only, or an object already in the upper layer:
        ``Overlay.open_now`` never blocks on anything but the open itself) and truncates
        nothing (O_TRUNC of a large upper file may take a while)."""
        flags, _open_flags = p.OPEN_IN.unpack_from(req.body)
        node = self._node(req.nodeid)
        if self.ov.open_copies_up(node, flags):
            fh = self.ov.open_copying_now(node, flags)
            if fh is None:
                raise NeedsTask
            return self._open_out(node, fh)
        if flags & os.O_TRUNC:
            raise NeedsTask
        return self._open_out(node, self.ov.open_now(node, flags, lazy=self._backed_now(node)))

    def _backed_now(self, node: Node) -> bool:
        """Whether an open of *node* will be served by the backing file already bound to
        it (``_opened``): then the server needs no real fd of its own for it (reads and
        writes never reach it), and opens one only if another request asks."""
        bound = self._backing.get(node.id)
        return bound is not None and bound.obj == node.layer.index and self.passthrough.active

    async def open(self, req: Request) -> bytes:
        flags, _open_flags = p.OPEN_IN.unpack_from(req.body)
        node = self._node(req.nodeid)
        fh = await self.ov.open(node, flags, self.caller(req))
        return self._open_out(node, fh)

    def create(self, req: Request) -> bytes:
        flags, mode, umask, _open_flags = p.CREATE_IN.unpack_from(req.body)
        name = _name(req.body, p.CREATE_IN.size)
        node, st, fh = self.writes.create(self._node(req.nodeid), name, mode, flags, self.caller(req, umask))
        opened = self._open_out(node, fh)
        return self._new_entry(node, st) + opened

    def mkdir(self, req: Request) -> bytes:
        mode, umask = p.MKDIR_IN.unpack_from(req.body)
        name = _name(req.body, p.MKDIR_IN.size)
        return self._new_entry(*self.writes.mkdir(self._node(req.nodeid), name, mode, self.caller(req, umask)))

    def mknod(self, req: Request) -> bytes:
        mode, rdev, umask, _pad = p.MKNOD_IN.unpack_from(req.body)
        name = _name(req.body, p.MKNOD_IN.size)
        return self._new_entry(*self.writes.mknod(self._node(req.nodeid), name, mode, rdev, self.caller(req, umask)))

    def symlink(self, req: Request) -> bytes:
        name, target = _two_names(req.body)
        return self._new_entry(*self.writes.symlink(self._node(req.nodeid), name, target, self.caller(req)))

    async def link(self, req: Request) -> bytes:
        (old,) = p.LINK_IN.unpack_from(req.body)
        name = _name(req.body, p.LINK_IN.size)
        node, st = await self.writes.link(self._node(old), self._node(req.nodeid), name, self.caller(req))
        return self._new_entry(node, st)

    def unlink(self, req: Request) -> bytes:
        parent, name = self._node(req.nodeid), _name(req.body)
        if self.writes.index_waits([(parent, name)]):  # index=on: a large copy-up first
            raise NeedsTask
        self.writes.remove(parent, name, is_dir=False)
        return b""

    async def unlink_async(self, req: Request) -> bytes:
        await self.writes.remove_async(self._node(req.nodeid), _name(req.body), is_dir=False)
        return b""

    def rmdir(self, req: Request) -> bytes:
        self.writes.remove(self._node(req.nodeid), _name(req.body), is_dir=True)
        return b""

    async def _rename(self, req: Request, newdir: int, flags: int, start: int) -> bytes:
        old, new = _two_names(req.body, start)
        parent, newparent = self._node(req.nodeid), self._node(newdir)
        moved = [parent.child(old)] + ([newparent.child(new)] if flags & _RENAME_EXCHANGE else [])
        await self.writes.rename(parent, old, newparent, new, flags)
        if parent is not newparent:  # a moved directory's ".." changed
            for node in moved:
                if node is not None:
                    self.ov.listings.moved(node)
        return b""

    async def rename(self, req: Request) -> bytes:
        (newdir,) = p.RENAME_IN.unpack_from(req.body)
        return await self._rename(req, newdir, 0, p.RENAME_IN.size)

    async def rename2(self, req: Request) -> bytes:
        newdir, flags, _pad = p.RENAME2_IN.unpack_from(req.body)
        return await self._rename(req, newdir, flags, p.RENAME2_IN.size)

    def read(self, req: Request) -> bytes:
        fh, off, size, *_ = p.READ_IN.unpack_from(req.body)
        return self.ov.read(fh, off, size)

    def write(self, req: Request) -> bytes:
        fh, off, size, *_ = p.WRITE_IN.unpack_from(req.body)
        # the request's own buffer (not copied: written before the next request is read)
        data = req.body[p.WRITE_IN.size : p.WRITE_IN.size + size]
        return p.WRITE_OUT.pack(self.writes.write(fh, off, data), 0)

    async def fsync(self, req: Request) -> bytes:
        fh, fsync_flags, _pad = p.FSYNC_IN.unpack_from(req.body)
        await self.writes.fsync(fh, bool(fsync_flags & 1))
        return b""

    async def fsyncdir(self, req: Request) -> bytes:
        fh, fsync_flags, _pad = p.FSYNC_IN.unpack_from(req.body)
        await self.writes.fsyncdir(fh, bool(fsync_flags & 1))
        return b""

    def release(self, req: Request) -> bytes:
        (fh, *_) = p.RELEASE_IN.unpack_from(req.body)
        backed = self._backed_fh.pop(fh, None)
        if backed is not None and backed[1] is not None:
            h = self.ov.handles[fh]
            if os.fstat(h.fd).st_ctime_ns != backed[1]:  # type: ignore[union-attr]
                h.unused_copy_up = None  # type: ignore[union-attr]  # written through passthrough
        self.ov.release(fh)
        if backed is not None:
            node_id = backed[0]
            # The kernel let go of the inode's backing before sending this (iomode.c): with
            # the last passthrough file gone, the node may be bound to another real file.
            # The registration is kept for the next open (registering costs more than an
            # open), up to IDLE_BACKINGS of them; FORGET of the node closes it.
            bound = self._backing[node_id]
            bound.opens -= 1
            if bound.opens == 0:
                self._idle[node_id] = None
                if len(self._idle) > IDLE_BACKINGS:
                    self._unregister(self._idle.popitem(last=False)[0])
        return b""

    def _unregister(self, node_id: int) -> None:
        bound = self._backing.pop(node_id)
        self.passthrough.close(bound.backing_id)

    def releasedir(self, req: Request) -> bytes:
        (fh, *_) = p.RELEASE_IN.unpack_from(req.body)
        self.ov.release(fh)
        return b""

    # --- directories --------------------------------------------------------------------

    def opendir(self, req: Request) -> bytes:
        fh = self.ov.opendir(self._node(req.nodeid))
        # The kernel keeps the listing in the directory's pages and serves getdents from
        # them until it changes the directory itself or the server says otherwise
        # (dircache.ListingCache.kernel_stale); KEEP_CACHE: an opendir does not drop it.
        return p.OPEN_OUT.pack(fh, p.FOPEN_CACHE_DIR | p.FOPEN_KEEP_CACHE, 0)

    def _listing(self, req: Request, plus: bool) -> bytes:
        fh, off, size, *_ = p.READ_IN.unpack_from(req.body)
        if plus:
            self.budget.check()  # READDIRPLUS makes a node per entry
        out: list[bytes] = []
        used = 0
        for index, entry in self.ov.listing(fh, off):
            typ = stat.S_IFMT(entry.st.st_mode) >> 12
            if plus:
                node = entry.node
                dent = p.direntplus(
                    node.id if node is not None else 0,
                    TIMEOUT,
                    self._attr(node, entry.st, entry.ino, entry.nlink),
                    entry.ino,
                    index + 1,
                    typ,
                    entry.name,
                )
            else:
                dent = p.dirent(entry.ino, index + 1, typ, entry.name)
            if used + len(dent) > size:
                if entry.node is not None:
                    self.inodes.maybe_drop(entry.node)
                break
            if entry.node is not None:
                if plus:
                    self.inodes.ref(entry.node)
                else:
                    self.inodes.maybe_drop(entry.node)
            out.append(dent)
            used += len(dent)
        return b"".join(out)

    def readdir(self, req: Request) -> bytes:
        return self._listing(req, plus=False)

    def readdirplus(self, req: Request) -> bytes:
        return self._listing(req, plus=True)

    # --- xattrs -------------------------------------------------------------------------

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return p.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return value

    def getxattr(self, req: Request) -> bytes:
        size, _pad = p.GETXATTR_IN.unpack_from(req.body)
        name = _name(req.body, p.GETXATTR_IN.size)
        node = self._node(req.nodeid)
        if node.layer.is_upper:
            return self._sized(self.ov.getxattr(node, os.fsdecode(name)), size)
        # A lower object's xattrs never change while mounted (a change copies it up first,
        # and the node then serves the upper one): its answers are kept, misses too (the
        # kernel asks security.capability before every write, tools ask ACLs per file).
        key = (node.id, name)
        value = self._lower_xattrs.get(key)
        if value is None:
            try:
                value = self.ov.getxattr(node, os.fsdecode(name))
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                value = _NO_XATTR
            if len(self._lower_xattrs) >= LOWER_XATTRS_MAX:
                self._lower_xattrs.clear()
            self._lower_xattrs[key] = value
        if value is _NO_XATTR:
            raise OSError(errno.ENODATA, "no such attribute")
        return self._sized(value, size)

    def listxattr(self, req: Request) -> bytes:
        size, _pad = p.GETXATTR_IN.unpack_from(req.body)
        names = self.ov.listxattr(self._node(req.nodeid), self.caller(req))
        return self._sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    async def setxattr(self, req: Request) -> bytes:
        size, flags = p.SETXATTR_IN.unpack_from(req.body)
        raw = bytes(req.body[p.SETXATTR_IN.size :])
        name, _, rest = raw.partition(b"\0")
        node = self._node(req.nodeid)
        await self.writes.setxattr(node, os.fsdecode(name), rest[:size], flags & (os.XATTR_CREATE | os.XATTR_REPLACE))
        return b""

    async def removexattr(self, req: Request) -> bytes:
        await self.writes.removexattr(self._node(req.nodeid), os.fsdecode(_name(req.body)))
        return b""

    # --- data operations on open files (fallocate, lseek, copy_file_range) ----------------

    def fallocate_now(self, req: Request) -> bytes:
        """A small range inline; a large one in a task (``fallocate``)."""
        fh, offset, length, mode, _pad = p.FALLOCATE_IN.unpack_from(req.body)
        if length > INLINE_MAX:
            raise NeedsTask
        self.writes.fallocate_now(fh, mode, offset, length)
        return b""

    async def fallocate(self, req: Request) -> bytes:
        fh, offset, length, mode, _pad = p.FALLOCATE_IN.unpack_from(req.body)
        await self.writes.fallocate(fh, mode, offset, length)
        return b""

    def lseek(self, req: Request) -> bytes:
        fh, offset, whence, _pad = p.LSEEK_IN.unpack_from(req.body)
        return p.LSEEK_OUT.pack(self.ov.lseek(fh, offset, whence))

    def copy_file_range_now(self, req: Request) -> bytes:
        """A short copy inline; a long one in a task (``copy_file_range``)."""
        fh_in, off_in, _node_out, fh_out, off_out, length, flags = p.COPY_FILE_RANGE_IN.unpack_from(req.body)
        if length > INLINE_MAX:
            raise NeedsTask
        done = self.writes.copy_file_range_now(fh_in, off_in, fh_out, off_out, length, flags)
        return p.WRITE_OUT.pack(done, 0)

    async def copy_file_range(self, req: Request) -> bytes:
        fh_in, off_in, _node_out, fh_out, off_out, length, flags = p.COPY_FILE_RANGE_IN.unpack_from(req.body)
        # the reply's size is 32 bits: the kernel asks again for the rest
        done = await self.writes.copy_file_range(fh_in, off_in, fh_out, off_out, min(length, 1 << 30), flags)
        return p.WRITE_OUT.pack(done, 0)

    def tmpfile(self, req: Request) -> bytes:
        """open(dir, O_TMPFILE): a CREATE without a name (the kernel sends "/")."""
        flags, mode, umask, _open_flags = p.CREATE_IN.unpack_from(req.body)
        node, st, fh = self.writes.tmpfile(self._node(req.nodeid), mode, flags, self.caller(req, umask))
        return self._new_entry(node, st) + p.OPEN_OUT.pack(fh, p.FOPEN_KEEP_CACHE | p.FOPEN_NOFLUSH, 0)
