"""pyfuse3 glue: decode requests, call ``Overlay``, encode replies. No overlay rules here.

Caveats (as pyfuse3 offers them): no handlers for fallocate, lseek SEEK_DATA/SEEK_HOLE,
copy_file_range, ioctl or file locks (the kernel keeps flock/POSIX locks locally);
readdir is always READDIRPLUS.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import pyfuse3
import trio

from . import _sys, trace
from .entryattr import set_st_ino
from .inodes import Node
from .overlay import Caller, Overlay

log = logging.getLogger(__name__)

# Lowers never change while mounted and the upper changes only through us, so the
# kernel may cache names and attributes for long (fuse-overlayfs does the same).
TIMEOUT = 86400.0


class _Errors:
    """Anything unexpected is logged, traced and answered EIO: the server must never die
    under a container. With a request context, the requesting process is recorded for
    trace events while the request runs. A plain class, not a generator context
    manager: it wraps every request, and this is several microseconds cheaper."""

    __slots__ = ("ov", "op", "token")

    def __init__(self, ov: Overlay, op: str, ctx) -> None:
        self.ov = ov
        self.op = op
        self.token = trace.request(ctx.pid, ctx.uid, ctx.gid) if ctx is not None else None

    def __enter__(self) -> None:
        return None

    def __exit__(self, et, exc, tb) -> bool:
        if self.token is not None:
            trace.done(self.token)
        if exc is None or isinstance(exc, pyfuse3.FUSEError):
            return False
        if isinstance(exc, OSError):
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        if not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, cancellation: not ours to answer
        log.error("internal error in %s", self.op, exc_info=(et, exc, tb))
        self.ov.trace.emit("error", op=self.op, error=f"{type(exc).__name__}: {exc}")
        raise pyfuse3.FUSEError(errno.EIO) from None


def _caller(ctx) -> Caller:
    if ctx is None:
        return Caller()
    return Caller(ctx.uid, ctx.gid, ctx.pid, ctx.umask)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, overlay: Overlay, max_nodes: int = 0) -> None:
        super().__init__()
        self.ov = overlay
        self.inodes = overlay.inodes
        # Node budget: beyond it the kernel is asked to drop the oldest file entries. Every
        # node holds an fd, so the budget is clamped to what RLIMIT_NOFILE lets nodes have.
        self.fd_limit = _sys.raise_nofile_limit()
        self.max_nodes = clamp_node_budget(max_nodes, self.fd_limit, overlay.stack.dirfds)
        self.inodes.fd_cap = node_fd_cap(self.fd_limit, overlay.stack.dirfds.capacity)
        self._shed_at = self.max_nodes
        overlay.on_out_of_fds = self._out_of_fds
        self._last_emergency = 0.0
        # Owners other than the disk's (uid/gid maps, override xattrs): a slower _attrs,
        # bound only when needed, so a plain mount pays nothing (docs/rootless.md).
        if overlay.owners.presenting:
            self._start_presenting()
        overlay.owners.on_presenting = self._start_presenting

    def _start_presenting(self) -> None:
        self._attrs = self._attrs_presented

    # --- helpers ------------------------------------------------------------------------

    def _errors(self, op: str, ctx=None) -> _Errors:
        """The one place where exceptions become FUSE replies (a ``with`` block)."""
        return _Errors(self.ov, op, ctx)

    def _attrs(self, node: Node | None, st: os.stat_result, ino: int, nlink: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
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
        return e

    def _attrs_presented(self, node: Node | None, st: os.stat_result, ino: int, nlink: int) -> pyfuse3.EntryAttributes:
        e = Operations._attrs(self, node, st, ino, nlink)
        e.st_uid, e.st_gid, e.st_mode = self.ov.presented_owner(node, st)
        return e

    def _node_attrs(self, node: Node, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        if st is None:
            st = self.ov.getattr(node)
        return self._attrs(node, st, node.ino, self.ov.nlink(node, st))

    def _node(self, inode: int) -> Node:
        node = self.inodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    # --- lookup and attributes ----------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        log.debug("lookup %d %r", parent_inode, name)
        parent = self._node(parent_inode)
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
                        e = pyfuse3.EntryAttributes()
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
        if self.max_nodes:
            self._budget()
        return attrs

    def _budget(self) -> None:
        n = len(self.inodes)
        if n > self._shed_at:
            self._shed()
        elif n < self.max_nodes:
            self._shed_at = self.max_nodes  # the kernel's FORGETs came: watch the budget again

    def _shed(self) -> None:
        """Over the node budget: ask the kernel (asynchronously: never from inside a
        request) to drop the oldest file entries down to 80 % of it; their FORGETs free
        the nodes. Not again before the table has grown by another 20 %."""
        keep = self.max_nodes * 4 // 5
        drops = self.inodes.shed(keep)
        for parent_id, name in drops:
            pyfuse3.invalidate_entry_async(parent_id, name, ignore_enoent=True)
        self._shed_at = max(self.max_nodes, len(self.inodes) + self.max_nodes - keep)
        log.info(
            "node budget %d: %d live nodes, asked the kernel to drop %d entries",
            self.max_nodes,
            len(self.inodes),
            len(drops),
        )

    def _out_of_fds(self) -> None:
        """A node could not get its fd: ask the kernel to drop file entries beyond 80 % of
        the budget and, since directories can fill the descriptors on their own, some
        directories with no live children too (at most once a second)."""
        keep = self.max_nodes * 4 // 5
        drops = self.inodes.shed(keep)  # each file node is offered once: cheap to repeat
        now = time.monotonic()
        if now - self._last_emergency >= 1.0:
            self._last_emergency = now
            drops += self.inodes.shed_dirs(max(16, len(self.inodes) - len(drops) - keep))
        if not drops:
            return
        for parent_id, name in drops:
            pyfuse3.invalidate_entry_async(parent_id, name, ignore_enoent=True)
        log.warning(
            "out of descriptors: %d live nodes, asked the kernel to drop %d entries", len(self.inodes), len(drops)
        )

    async def forget(self, inode_list):
        for inode, nlookup in inode_list:
            self.inodes.forget(inode, nlookup)

    async def getattr(self, inode, ctx=None):
        with self._errors("getattr"):
            return self._node_attrs(self._node(inode))

    async def readlink(self, inode, ctx):
        with self._errors("readlink"):
            return self.ov.readlink(self._node(inode))

    async def statfs(self, ctx):
        with self._errors("statfs"):
            sv = self.ov.statfs()
        s = pyfuse3.StatvfsData()
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

    async def open(self, inode, flags, ctx):
        log.debug("open %d %o", inode, flags)
        with self._errors("open", ctx):
            fh = await self.ov.open(self._node(inode), flags, _caller(ctx))
        self._invalidate()
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _invalidate(self) -> None:
        """Drop cached attributes of nodes whose st_ino changed in a copy-up."""
        cu = self.ov.copyup
        while cu is not None and cu.ino_changed:
            node_id = cu.ino_changed.pop()
            try:
                pyfuse3.invalidate_inode(node_id, attr_only=True)
            except (OSError, pyfuse3.FUSEError):
                pass  # the kernel no longer knows the node

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attrs = self._node_attrs(node, st)
        self.inodes.ref(node)
        return attrs

    async def create(self, parent_inode, name, mode, flags, ctx):
        log.debug("create %d %r %o", parent_inode, name, mode)
        with self._errors("create", ctx):
            node, st, fh = await self.ov.create(self._node(parent_inode), name, mode, flags, _caller(ctx))
            return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(node, st)

    async def mkdir(self, parent_inode, name, mode, ctx):
        with self._errors("mkdir", ctx):
            return self._entry(*self.ov.mkdir(self._node(parent_inode), name, mode, _caller(ctx)))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        with self._errors("mknod", ctx):
            return self._entry(*self.ov.mknod(self._node(parent_inode), name, mode, rdev, _caller(ctx)))

    async def symlink(self, parent_inode, name, target, ctx):
        with self._errors("symlink", ctx):
            return self._entry(*self.ov.symlink(self._node(parent_inode), name, target, _caller(ctx)))

    async def link(self, inode, new_parent_inode, new_name, ctx):
        with self._errors("link", ctx):
            node, st = await self.ov.link(self._node(inode), self._node(new_parent_inode), new_name, _caller(ctx))
            attrs = self._entry(node, st)
        self._invalidate()
        return attrs

    async def unlink(self, parent_inode, name, ctx):
        with self._errors("unlink", ctx):
            self.ov.remove(self._node(parent_inode), name, is_dir=False)

    async def rmdir(self, parent_inode, name, ctx):
        with self._errors("rmdir", ctx):
            self.ov.remove(self._node(parent_inode), name, is_dir=True)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        with self._errors("rename", ctx):
            await self.ov.rename(self._node(parent_inode_old), name_old, self._node(parent_inode_new), name_new, flags)
        self._invalidate()

    async def setattr(self, inode, attr, fields, fh, ctx):
        changes = {}
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
            st = await self.ov.setattr(node, changes, fh)
            attrs = self._node_attrs(node, st)
        self._invalidate()
        return attrs

    async def write(self, fh, off, buf):
        with self._errors("write"):
            return self.ov.write(fh, off, buf)

    async def flush(self, fh):
        # Nothing to flush (writes go straight to the real file). ENOSYS makes the kernel
        # stop sending FLUSH at all (fc->no_flush): one request less for every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh, datasync):
        with self._errors("fsync"):
            self.ov.fsync(fh, datasync)

    async def fsyncdir(self, fh, datasync):
        # Directory changes are made with *at() calls on the real dirs; ENOSYS: the kernel
        # then treats fsync of a directory as done and stops asking (fc->no_fsyncdir).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def setxattr(self, inode, name, value, ctx):
        with self._errors("setxattr", ctx):
            await self.ov.setxattr(self._node(inode), os.fsdecode(name), value)
        self._invalidate()

    async def removexattr(self, inode, name, ctx):
        with self._errors("removexattr", ctx):
            await self.ov.removexattr(self._node(inode), os.fsdecode(name))
        self._invalidate()

    async def read(self, fh, off, size):
        with self._errors("read"):
            return self.ov.read(fh, off, size)

    async def release(self, fh):
        with self._errors("release"):
            self.ov.release(fh)

    # --- directories --------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        with self._errors("opendir"):
            return self.ov.opendir(self._node(inode))

    async def readdir(self, fh, start_id, token):
        if self.max_nodes:
            self._budget()  # READDIRPLUS makes a node per entry
        with self._errors("readdir"):
            entries = self.ov.readdir(fh, start_id)
            replied = False
            while True:
                try:
                    index, entry = next(entries)
                except StopIteration:
                    return
                except OSError as exc:
                    # Out of fds for new nodes mid-listing: end this reply here (the kernel
                    # asks again from the next offset); an error only if nothing was given.
                    if replied and exc.errno in (errno.EMFILE, errno.ENFILE):
                        return
                    raise
                replied = True
                attrs = self._attrs(entry.node, entry.st, entry.ino, entry.nlink)
                if not pyfuse3.readdir_reply(token, entry.name, attrs, index + 1):
                    if entry.node is not None:
                        self.inodes.maybe_drop(entry.node)
                    return
                if entry.node is not None:
                    self.inodes.ref(entry.node)

    async def releasedir(self, fh):
        with self._errors("releasedir"):
            self.ov.release(fh)

    # --- xattrs -------------------------------------------------------------------------

    async def getxattr(self, inode, name, ctx):
        with self._errors("getxattr"):
            return self.ov.getxattr(self._node(inode), os.fsdecode(name))

    async def listxattr(self, inode, ctx):
        with self._errors("listxattr"):
            return [os.fsencode(n) for n in self.ov.listxattr(self._node(inode), _caller(ctx))]


# Descriptors kept free of nodes: open files, the trace sink's clients, trio's and pyfuse3's
# own (the directory fd cache is counted apart).
FD_HEADROOM = 1024
# How long a lookup waits for the kernel's FORGETs when nodes have no descriptor left.
FD_WAIT = 2.0


def node_fd_cap(fd_limit: int, cache: int) -> int:
    """Live nodes allowed at most, whatever the budget: past it a new node is refused with
    EMFILE, so that listings, open files and the server's own descriptors never run out."""
    return max(32, fd_limit - cache - min(FD_HEADROOM, fd_limit // 8))


def clamp_node_budget(max_nodes: int, fd_limit: int, dirfds=None) -> int:
    """The node budget that fits in *fd_limit* descriptors (every node holds one).

    The directory fd cache is shrunk to an eighth of the limit at most; another eighth (at
    most FD_HEADROOM) stays free for open files and the server's own; the nodes get three
    quarters of the rest, since the table overshoots its budget by up to a quarter before
    the kernel's FORGETs come (``_shed``). *max_nodes* 0 (no budget) becomes that much.
    Directories are never dropped by the budget: a tree with more live directories than
    descriptors gets EMFILE for lookups beyond them (docs/performance.md)."""
    if dirfds is not None:
        dirfds.capacity = max(16, min(dirfds.capacity, fd_limit // 8))
        cache = dirfds.capacity
    else:
        cache = min(2048, fd_limit // 8)
    room = fd_limit - cache - min(FD_HEADROOM, fd_limit // 8)
    fit = max(64, room * 3 // 4)
    budget = fit if max_nodes <= 0 else min(max_nodes, fit)
    if budget != max_nodes:
        log.info(
            "node budget %d (asked: %s): RLIMIT_NOFILE is %d and every node holds a "
            "descriptor (%d kept for the directory fd cache, %d for open files)",
            budget,
            max_nodes or "none",
            fd_limit,
            cache,
            min(FD_HEADROOM, fd_limit // 8),
        )
    else:
        log.debug("node budget %d, RLIMIT_NOFILE %d", budget, fd_limit)
    return budget
