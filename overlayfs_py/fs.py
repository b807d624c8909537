"""pyfuse3 glue: decode requests, call the core, encode replies. No overlay rules here.

The engine sees the core (``core.Core``: the read side ``Overlay``, the write path
``WritePath``, the ``NodeBudget``) and nothing of its insides; the core tells the kernel's
caches what changed through two engine functions given to ``mount.build_overlay``:
:func:`drop_entries` and :func:`attr_changed`. Another engine replaces this module.

Caveats (as pyfuse3 3.5 offers them: its ``Operations`` has no such methods): no handlers
for fallocate, lseek SEEK_DATA/SEEK_HOLE, copy_file_range, O_TMPFILE, ioctl or file locks
(the kernel keeps flock/POSIX locks locally); readdir is always READDIRPLUS. The core
serves the first four (``WritePath.fallocate``, ``Overlay.lseek``,
``WritePath.copy_file_range``, ``WritePath.tmpfile``) to the direct engine (docs/semantics.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from types import TracebackType

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from . import trace
from .budget import FD_WAIT, clamp_node_budget, node_fd_cap
from .core import Core
from .entryattr import set_st_ino
from .inodes import Node
from .overlay import Caller
from .trace import Tracer

__all__ = ["FD_WAIT", "Operations", "attr_changed", "clamp_node_budget", "drop_entries", "node_fd_cap"]

log = logging.getLogger(__name__)

# Lowers never change while mounted and the upper changes only through us, so the
# kernel may cache names and attributes for long (fuse-overlayfs does the same).
TIMEOUT = 86400.0


def drop_entries(drops: list[tuple[int, bytes]]) -> None:
    """Ask the kernel to drop these ``(parent node id, name)`` entries (asynchronously:
    never from inside a request); its FORGETs then free the nodes."""
    for parent_id, name in drops:
        pyfuse3.invalidate_entry_async(parent_id, name, ignore_enoent=True)


def attr_changed(node_id: int) -> None:
    """Drop the kernel's cached attributes of a node (changed in a copy-up: its st_ino, or
    a parent's size)."""
    with contextlib.suppress(OSError, pyfuse3.FUSEError):  # the kernel no longer knows the node
        pyfuse3.invalidate_inode(node_id, attr_only=True)


class _Errors:
    """Anything unexpected is logged, traced and answered EIO: the server must never die
    under a container. With a request context, the requesting process is recorded for
    trace events while the request runs. A plain class, not a generator context
    manager: it wraps every request, and this is several microseconds cheaper."""

    __slots__ = ("tracer", "op", "token")

    def __init__(self, tracer: Tracer, op: str, ctx: RequestContext | None) -> None:
        self.tracer = tracer
        self.op = op
        self.token = trace.request(ctx.pid, ctx.uid, ctx.gid) if ctx is not None else None

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.token is not None:
            trace.done(self.token)
        if exc is None or isinstance(exc, pyfuse3.FUSEError):
            return
        if isinstance(exc, OSError):
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        if not isinstance(exc, Exception):
            return  # KeyboardInterrupt, cancellation: not ours to answer
        log.error("internal error in %s", self.op, exc_info=(et or type(exc), exc, tb))
        self.tracer.emit("error", op=self.op, error=f"{type(exc).__name__}: {exc}")
        raise pyfuse3.FUSEError(errno.EIO) from None


def _caller(ctx: RequestContext | None) -> Caller:
    if ctx is None:
        return Caller()
    return Caller(ctx.uid, ctx.gid, ctx.pid, ctx.umask)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, core: Core) -> None:
        super().__init__()
        self.ov = core.view
        self.writes = core.writes
        self.budget = core.budget
        self.inodes = core.view.inodes
        self.owners = core.view.owners
        self.tracer = core.view.trace

    # --- helpers ------------------------------------------------------------------------

    def _errors(self, op: str, ctx: RequestContext | None = None) -> _Errors:
        """The one place where exceptions become FUSE replies (a ``with`` block)."""
        return _Errors(self.tracer, op, ctx)

    def _attrs(self, node: Node | None, st: os.stat_result, ino: int, nlink: int) -> EntryAttributes:
        e = EntryAttributes()
        set_st_ino(e, node.id if node is not None else 0, ino)
        e.generation = 0
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        e.st_mode = st.st_mode
        e.st_nlink = nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        # Owners other than the disk's (uid/gid maps, override xattrs): looked up only
        # then, so a plain mount pays one attribute test (docs/rootless.md).
        if self.owners.presenting:
            e.st_uid, e.st_gid, e.st_mode = self.ov.presented_owner(node, st)
        return e

    def _node_attrs(self, node: Node, st: os.stat_result | None = None) -> EntryAttributes:
        if st is None:
            st = self.ov.getattr(node)
        return self._attrs(node, st, node.ino, self.ov.nlink(node, st))

    def _node(self, inode: int) -> Node:
        node = self.inodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    # --- lookup and attributes ----------------------------------------------------------

    async def lookup(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext | None = None) -> EntryAttributes:
        log.debug("lookup %d %r", parent_inode, name)
        parent = self._node(parent_inode)
        st: os.stat_result | None
        if name == b".":
            node, st = parent, None
        elif name == b"..":
            node, st = (parent.parent or parent), None
        else:
            waited = 0.0
            while True:
                try:
                    with self._errors("lookup"):
                        node, st = self.ov.lookup(parent, name)
                    break
                except pyfuse3.FUSEError as exc:
                    if exc.errno == errno.ENOENT:
                        # A negative entry the kernel may cache (node id 0).
                        e = EntryAttributes()
                        e.st_ino = 0
                        e.entry_timeout = TIMEOUT
                        return e
                    if exc.errno == errno.ESTALE and waited == 0.0:
                        waited = -1.0  # the name changed under the lookup: once more
                        continue
                    if exc.errno in (errno.EMFILE, errno.ENFILE) and waited < FD_WAIT:
                        # Out of descriptors for nodes: the kernel was asked to drop some
                        # entries; their FORGETs come as other requests meanwhile.
                        await trio.sleep(0.02)
                        waited += 0.02
                        continue
                    raise
        with self._errors("lookup"):
            attrs = self._node_attrs(node, st)
        self.inodes.ref(node)
        self.budget.check()
        return attrs

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for inode, nlookup in inode_list:
            self.inodes.forget(inode, nlookup)

    async def getattr(self, inode: InodeT, ctx: RequestContext | None = None) -> EntryAttributes:
        with self._errors("getattr"):
            return self._node_attrs(self._node(inode))

    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        with self._errors("readlink"):
            return self.ov.readlink(self._node(inode))

    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        with self._errors("statfs"):
            sv = self.ov.statfs()
        s = StatvfsData()
        s.f_bsize = sv.f_bsize
        s.f_frsize = sv.f_frsize
        s.f_blocks = sv.f_blocks
        s.f_bfree = sv.f_bfree
        s.f_bavail = sv.f_bavail
        s.f_files = sv.f_files
        s.f_ffree = sv.f_ffree
        s.f_favail = sv.f_favail
        s.f_namemax = sv.f_namemax
        return s

    # --- files --------------------------------------------------------------------------

    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        log.debug("open %d %o", inode, flags)
        with self._errors("open", ctx):
            fh = await self.ov.open(self._node(inode), flags, _caller(ctx))
        return FileInfo(fh=fh, keep_cache=True)

    def _entry(self, node: Node, st: os.stat_result) -> EntryAttributes:
        attrs = self._node_attrs(node, st)
        self.inodes.ref(node)
        return attrs

    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        log.debug("create %d %r %o", parent_inode, name, mode)
        with self._errors("create", ctx):
            node, st, fh = self.writes.create(self._node(parent_inode), name, mode, flags, _caller(ctx))
            return FileInfo(fh=fh, keep_cache=True), self._entry(node, st)

    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext) -> EntryAttributes:
        with self._errors("mkdir", ctx):
            return self._entry(*self.writes.mkdir(self._node(parent_inode), name, mode, _caller(ctx)))

    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        with self._errors("mknod", ctx):
            return self._entry(*self.writes.mknod(self._node(parent_inode), name, mode, rdev, _caller(ctx)))

    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        with self._errors("symlink", ctx):
            return self._entry(*self.writes.symlink(self._node(parent_inode), name, target, _caller(ctx)))

    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        with self._errors("link", ctx):
            node, st = await self.writes.link(self._node(inode), self._node(new_parent_inode), new_name, _caller(ctx))
            return self._entry(node, st)

    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        with self._errors("unlink", ctx):
            await self.writes.remove_async(self._node(parent_inode), name, is_dir=False)

    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        with self._errors("rmdir", ctx):
            self.writes.remove(self._node(parent_inode), name, is_dir=True)

    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        with self._errors("rename", ctx):
            await self.writes.rename(
                self._node(parent_inode_old), name_old, self._node(parent_inode_new), name_new, flags
            )

    async def setattr(
        self, inode: InodeT, attr: EntryAttributes, fields: SetattrFields, fh: FileHandleT | None, ctx: RequestContext
    ) -> EntryAttributes:
        changes: dict[str, int] = {}
        if fields.update_size:
            changes["size"] = attr.st_size
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        with self._errors("setattr", ctx):
            node = self._node(inode)
            st = await self.writes.setattr(node, changes, fh)
            return self._node_attrs(node, st)

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        with self._errors("write"):
            return self.writes.write(fh, off, buf)

    async def flush(self, fh: FileHandleT) -> None:
        # Nothing to flush (writes go straight to the real file). ENOSYS makes the kernel
        # stop sending FLUSH at all (fc->no_flush): one request less for every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        with self._errors("fsync"):
            await self.writes.fsync(fh, datasync)

    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        with self._errors("fsyncdir"):
            await self.writes.fsyncdir(fh, datasync)

    async def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext) -> None:
        with self._errors("setxattr", ctx):
            await self.writes.setxattr(self._node(inode), os.fsdecode(name), value)

    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        with self._errors("removexattr", ctx):
            await self.writes.removexattr(self._node(inode), os.fsdecode(name))

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        with self._errors("read"):
            return self.ov.read(fh, off, size)

    async def release(self, fh: FileHandleT) -> None:
        with self._errors("release"):
            self.ov.release(fh)

    # --- directories --------------------------------------------------------------------

    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        with self._errors("opendir"):
            return self.ov.opendir(self._node(inode))

    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        self.budget.check()  # READDIRPLUS makes a node per entry
        with self._errors("readdir"):
            for index, entry in self.ov.listing(fh, start_id):
                attrs = self._attrs(entry.node, entry.st, entry.ino, entry.nlink)
                if not pyfuse3.readdir_reply(token, entry.name, attrs, index + 1):
                    if entry.node is not None:
                        self.inodes.maybe_drop(entry.node)
                    return
                if entry.node is not None:
                    self.inodes.ref(entry.node)

    async def releasedir(self, fh: FileHandleT) -> None:
        with self._errors("releasedir"):
            self.ov.release(fh)

    # --- xattrs -------------------------------------------------------------------------

    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        with self._errors("getxattr"):
            return self.ov.getxattr(self._node(inode), os.fsdecode(name))

    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        with self._errors("listxattr"):
            return [os.fsencode(n) for n in self.ov.listxattr(self._node(inode), _caller(ctx))]
