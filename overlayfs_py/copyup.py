"""Copy-up: bring a lower object into the upper layer, atomically, through the workdir.

The object is built where no other user can reach it and only then given its real name
in upper, so a crash never leaves a partial object under its real name: a regular file
as an unnamed ``O_TMPFILE`` file on the upper's filesystem, linked into place (the
kernel's ``ovl_copy_up_tmpfile``); a directory, symlink or special file under a
temporary name in ``<workdir>/work``, renamed into place with RENAME_NOREPLACE (leftovers
there are removed at the next mount; with ``-o index=on`` that directory is
``<workdir>/index``, as the kernel's). Every step after creating the temporary acts on an
fd of it (mode, owner, xattrs, origin record, times), and everything read from the
source comes from one O_PATH fd of the lower object opened without following symlinks
(a regular file's reopened for reading through its magic link): no name is looked up
twice (workdir.py has the rules for ``work/``). Ancestors are copied up first. Large data is copied with
``copy_file_range`` in a worker thread so the trio loop keeps serving others, and
concurrent openers of one file wait for a single copy-up (a per-node ``trio.Lock``);
a small file that no task is copying up can be copied without awaiting at all
(``copy_up_now``: an engine's inline open, no task and no lock).

With ``-o metacopy=on`` a regular file copied up for anything but writing its data (chmod,
chown, utimes, xattrs, rename, link) gets its metadata only, as the kernel's metacopy
copy-up: the ``O_TMPFILE`` file is truncated to the source's size (no data blocks),
carries an empty ``overlay.metacopy`` and is linked into place; ``Node.lowerdata`` keeps
reading the data file below. The first ``data=True`` copy-up (an open for writing, a
truncation) copies the data into that upper file in place and removes the xattr last, so a
crash halfway leaves the metacopy file as it was (the kernel's
ovl_copy_up_meta_inode_data). With ``index=on`` too, the index entry of a hard-linked lower
file copied up so is such a metacopy file, and every name linked to it shares its data
copy-up.

With ``index=on`` a link, rename or unlink of a lower name of a hard-linked lower file copies
that name up through the index first (``link_up_indexed``: under the node's lock, large data
in a worker thread, so the write path awaits it before its own bookkeeping).

This module is the only writer of ``Node.layer`` / ``Node.dirs`` after lookup, and moves a
copied-up node's fd to its upper object. ``CopyUp`` receives everything it uses in its
constructor: the layer stack, the inode table, the ``Work`` of ``work/``, the tracer, the
mount's ``Owners``, and two callbacks: ``on_copied_up(node, ino_changed)`` (the listings
and open files follow) and ``on_attr_changed(node id)`` (attributes a node reports changed
behind the kernel's back: a copied-up node's st_ino, its parent's size; the engine drops
the kernel's cached attributes). A read-only overlay has no ``CopyUp``:
:func:`writable` turns its absence into EROFS.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import _sys
from .idmap import OVERRIDE_XATTR
from .inodes import InodeTable, Node, real_key
from .layers import Layer, LayerStack
from .ownership import Owners
from .trace import Tracer, display
from .whiteout import XattrNames, encode_origin, set_impure
from .workdir import Work

if TYPE_CHECKING:
    from .index import Index

if TYPE_CHECKING:  # trio is imported when first used (the server starts serving before)
    import trio

log = logging.getLogger(__name__)

THREAD_THRESHOLD = 1 << 20  # copy data in a worker thread above this size
CAPS_XATTR = "security.capability"


def copy_data(src: int, dst: int, size: int, sync: bool = True) -> int:
    """Copy *size* bytes from *src* to *dst* in the kernel (reflink where the fs can), then
    fsync *dst* (not with ``volatile``). Blocking: large files go through a worker thread."""
    done = _copy(src, dst, size)
    if sync:
        os.fsync(dst)
    return done


def _copy(src: int, dst: int, size: int) -> int:
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, done, done)
            if n == 0:
                break
            done += n
        return done
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while done < size:  # fall back to a plain copy
        buf = os.pread(src, min(1 << 20, size - done), done)
        if not buf:
            break
        os.pwrite(dst, buf, done)
        done += len(buf)
    return done


def _nothing(_arg: Any) -> None:
    return None


def _nothing2(_arg: Any, _arg2: Any) -> None:
    return None


def writable(copyup: CopyUp | None) -> CopyUp:
    """The copy-up of a writable overlay; EROFS for a read-only one (no upper, ``-o ro``)."""
    if copyup is None:
        raise OSError(errno.EROFS, "read-only overlay")
    return copyup


class CopyUp:
    """Every copy-up into the upper layer (temporaries in ``work/`` through *work*)."""

    def __init__(
        self,
        stack: LayerStack,
        names: XattrNames,
        inodes: InodeTable,
        work: Work,
        tracer: Tracer,
        owners: Owners,
        *,
        sync: bool = True,
        metacopy: bool = False,
        on_copied_up: Callable[[Node, bool], None] = _nothing2,
        on_attr_changed: Callable[[int], None] = _nothing,
        index: Index | None = None,
    ) -> None:
        if stack.upper is None:
            raise ValueError("a copy-up needs an upper layer")
        self.trace = tracer
        self.stack = stack
        self.upper: Layer = stack.upper
        self.names = names
        self.inodes = inodes
        self.work = work  # temporaries in work/: names, creation, install, discard
        self.owners = owners
        self._locks: dict[int, trio.Lock] = {}
        self._limiter: trio.CapacityLimiter | None = None  # made on first use, in trio
        self.sync = sync  # False with -o volatile: copies are not fsync'ed (the kernel's ovl_should_sync)
        self.on_copied_up = on_copied_up  # (node, its st_ino changed) right after it became upper
        self.on_attr_changed = on_attr_changed  # a node id whose reported attributes changed
        self.index = index  # index=on: <workdir>/index (index.py), else None
        # -o metacopy=on: a regular file copied up for anything but writing its data gets
        # its metadata only (the kernel's ovl_need_meta_copy_up); ``data=True`` copy-ups
        # (an open for writing, a truncation) copy the data too
        self.metacopy = metacopy

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """At most two data copies in worker threads at a time."""
        if self._limiter is None:
            import trio

            self._limiter = trio.CapacityLimiter(2)
        return self._limiter

    async def copy_up(self, node: Node, reason: str, data: bool = False) -> bool:
        """``ensure_upper`` for an existing object. A lower object no name leads to any more
        (unlinked or renamed over while open) cannot be copied up: its name is taken by a
        whiteout or another object, and the kernel fails the same way (EEXIST). *data*: the
        caller writes the file's data (an open for writing, a truncation): a metacopy file
        gets its data too (``metacopy=on``; otherwise every copy-up copies the data)."""
        if not node.layer.is_upper and not self.inodes.reachable(node):
            raise OSError(errno.EEXIST, "the object's name was removed or replaced")
        return await self.ensure_upper(node, reason, data)

    def upper_dir(self, node: Node, reason: str) -> int:
        """The upper dir fd of directory *node* (its own fd: the directory itself, never
        whatever sits at its name now), copying it (and its ancestors) up first. A removed
        directory takes no new entries (ENOENT, as the kernel's dead directory)."""
        if node.dead:
            raise OSError(errno.ENOENT, "directory was removed")
        self.ensure_upper_dir_sync(node, reason)
        if node.fd < 0:
            raise OSError(errno.EBADF, "no upper object")
        return node.fd

    async def ensure_upper(self, node: Node, reason: str, data: bool = False) -> bool:
        """Make *node* an upper object (with its data, if *data*: see ``copy_up``). Returns
        True if this call copied it (or its data) up. *reason* says why, for the trace
        (open-for-write, chmod, rename, ...).

        The lower ancestors go first, top down, in a loop: a chain may be deeper than
        Python's recursion limit (a tree deeper than PATH_MAX)."""
        if node.layer.is_upper and not (data and node.lowerdata is not None):
            return False
        chain = []
        n = node.parent
        while n is not None and not n.layer.is_upper:
            chain.append(n)
            n = n.parent
        for d in reversed(chain):
            await self._ensure_one(d, "parent")
        return await self._ensure_one(node, reason, data)

    def _done(self, node: Node, data: bool) -> bool:
        """Whether *node* needs no (more) copy-up: upper, with its data when *data*."""
        return node.layer.is_upper and not (data and node.lowerdata is not None)

    async def _ensure_one(self, node: Node, reason: str, data: bool = False) -> bool:
        """Copy up *node* alone, under its lock (its parent is upper by now)."""
        if self._done(node, data):
            return False
        lock = self._lock_of(node)
        try:
            async with lock:
                if self._done(node, data):  # another task finished it while we waited
                    return False
                if node.layer.is_upper:  # a metacopy file: its data (ovl_copy_up_meta_inode_data)
                    await self._copy_up_data(node, reason)
                    return True
                if node.parent is not None and not node.parent.layer.is_upper:
                    await self.ensure_upper(node.parent, "parent")  # moved meanwhile
                if node.is_dir:
                    self._traced(node, reason, self._copy_up_dir)
                elif await self.copy_up_indexed_async(node, reason, data):
                    if data and node.lowerdata is not None:  # linked up to a metacopy index entry
                        await self._copy_up_data(node, reason)
                else:
                    await self._copy_up_nondir(node, reason, data)
                return True
        finally:
            self._unlock(node, lock)

    def _lock_of(self, node: Node) -> trio.Lock:
        """The per-node lock of copy-ups (made on first use, dropped by ``_unlock``)."""
        import trio

        lock = self._locks.get(node.id)
        if lock is None:
            lock = self._locks[node.id] = trio.Lock()
        return lock

    def _unlock(self, node: Node, lock: trio.Lock) -> None:
        if not lock.locked() and lock.statistics().tasks_waiting == 0 and self._locks.get(node.id) is lock:
            self._locks.pop(node.id, None)

    def copy_up_now(self, node: Node, reason: str, data: bool = False) -> bool | None:
        """``copy_up`` without awaiting, for an engine's inline path: a regular file of at
        most ``THREAD_THRESHOLD`` bytes that no task is copying up (its lock is free), with
        its ancestors (``ensure_upper_dir_sync``). Nothing else runs meanwhile, so the lock
        is not needed. None, having done nothing: it must go through ``copy_up`` (a larger
        file, another kind of object, a copy-up of it in progress, a source that cannot be
        opened: ``copy_up`` then fails and traces it). *data*: as ``copy_up``'s."""
        if self._done(node, data):
            return False
        if node.id in self._locks or not stat.S_ISREG(node.mode):
            return None
        if node.layer.is_upper:  # a metacopy file's data
            try:
                if self.stack.lstat(*node.lowerdata).st_size > THREAD_THRESHOLD:  # type: ignore[misc]
                    return None
            except OSError:
                return None
            self._copy_up_data_now(node, reason)
            return True
        if not self.inodes.reachable(node):
            raise OSError(errno.EEXIST, "the object's name was removed or replaced")
        if self.index is not None:
            try:
                sfd, st = self._open_source(node)
            except OSError:
                return None
            os.close(sfd)
            if st.st_nlink > 1 and st.st_size > THREAD_THRESHOLD and not self._meta_only(node, data):
                return None  # a large indexed copy: ``copy_up`` copies it in a worker thread
            if self.copy_up_indexed(node, reason, data=data):
                if data and node.lowerdata is not None:  # linked up to a metacopy index entry
                    return self.copy_up_now(node, reason, data)  # its data (or None: a task's)
                return True
        meta = self._meta_only(node, data)
        try:
            sfd, st = self._open_source(node)
        except OSError:
            return None  # ``copy_up`` fails the same way, and traces it
        if not stat.S_ISREG(st.st_mode) or (st.st_size > THREAD_THRESHOLD and not meta):
            os.close(sfd)
            return None
        try:
            src = self._readable(sfd)
        except OSError:
            return None
        try:
            if node.parent is not None:
                self.ensure_upper_dir_sync(node.parent, "parent")
            ev = self._traced_start(node, reason, st, meta)
            try:
                if meta:
                    self._copy_up_meta(node, src, st)
                else:
                    self._copy_up_file_now(node, src, st)
            except BaseException as exc:
                self._traced_end(ev, exc)
                raise
            self._traced_end(ev, None)
            return True
        finally:
            os.close(src)

    def _meta_only(self, node: Node, data: bool) -> bool:
        """Whether a copy-up of lower *node* copies its metadata only (the kernel's
        ovl_need_meta_copy_up: metacopy=on, a regular file, not for writing its data)."""
        return self.metacopy and not data and stat.S_ISREG(node.mode)

    def ensure_upper_dir_sync(self, node: Node, reason: str) -> None:
        """Copy up a directory chain (no data, so no await is needed)."""
        chain = []
        n: Node | None = node
        while n is not None and not n.layer.is_upper:
            chain.append(n)
            n = n.parent
        for d in reversed(chain):
            self._traced(d, reason if d is node else "parent", self._copy_up_dir)

    # --- trace events ---------------------------------------------------------------------------

    def _traced_start(
        self, node: Node, reason: str, st: os.stat_result | None = None, meta: bool = False
    ) -> dict[str, Any]:
        """Emit copy_up_start (*st*: the source's fstat, if the caller has it; *meta*: a
        metadata-only copy-up, 0 bytes); returns what copy_up_done/failed will need."""
        if st is None and not node.is_dir:
            try:
                st = self._lower_at(node)[2]
            except OSError:
                st = None
        size = st.st_size if st is not None and stat.S_ISREG(st.st_mode) and not meta else 0
        ev: dict[str, Any] = {
            "path": display(node.relpath()),
            "layer": node.layer.label,
            "size": size,
            "reason": reason,
        }
        if meta:
            ev["metadata"] = True
        self.trace.emit("copy_up_start", **ev)
        ev["t0"] = time.monotonic()
        return ev

    def _traced_end(self, ev: dict[str, Any], exc: BaseException | None) -> None:
        t0 = ev.pop("t0")
        if exc is None:
            self.trace.emit(
                "copy_up_done", **ev, bytes=ev["size"], duration_ms=round((time.monotonic() - t0) * 1000, 3)
            )
        else:
            err = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else type(exc).__name__
            self.trace.emit("copy_up_failed", **ev, error=err)

    def _traced(self, node: Node, reason: str, copy: Callable[[Node], None]) -> None:
        ev = self._traced_start(node, reason)
        try:
            copy(node)
        except BaseException as exc:
            self._traced_end(ev, exc)
            raise
        self._traced_end(ev, None)

    def _lower_at(self, node: Node) -> tuple[int, bytes, os.stat_result]:
        prel, _, name = node.path_in(node.layer).rpartition(b"/")
        dfd = self.stack.dir_fd(node.layer, prel)
        return dfd, name, _sys.lstat_at(dfd, name)

    def _open_source(self, node: Node) -> tuple[int, os.stat_result]:
        """An O_PATH fd of the lower object (never following a symlink, beneath its layer)
        and its fstat: everything the copy reads about the source comes from this fd."""
        prel, _, name = node.path_in(node.layer).rpartition(b"/")
        dfd = self.stack.dir_fd(node.layer, prel)
        fd = _sys.open_beneath(dfd, name, _sys.O_PATH)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode) != node.is_dir:  # the lower changed under the mount
                raise OSError(errno.ESTALE, "lower object changed type", display(node.relpath()))
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    @staticmethod
    def _readable(sfd: int) -> int:
        """The regular file of O_PATH *sfd* opened for reading (the inode fstat'ed, not the
        name again); *sfd* is closed either way."""
        try:
            return _sys.reopen(sfd, os.O_RDONLY)
        finally:
            os.close(sfd)

    def _finish_meta(
        self,
        tfd: int,
        sfd: int,
        st: os.stat_result,
        layer: Layer | None = None,
        opened: bool = False,
        indexed: bool = False,
    ) -> os.stat_result:
        """Mode, stored owner, xattrs, origin and times on the temporary *tfd*, read from the
        source *sfd* (whose fstat is *st*); both are fds this copy-up holds, reached through
        their magic links only (a name in work/ or in the lower is never looked up again).
        The stored owner (and mode) of the source in *layer* carries over: chown, or the
        override xattr when the server cannot chown (ownership.Owners.set_owner keeps the
        set-id bits). *opened*: both are open files, not O_PATH fds (a regular file's copy):
        the xattr calls and the chmod then take the fds themselves. Returns the fstat of
        *tfd* before its times were set."""
        src_path = _sys.proc_path(sfd)
        dst_path = _sys.proc_path(tfd)
        src: bytes | int = sfd if opened else src_path
        dst: bytes | int = tfd if opened else dst_path
        uid, gid, mode = self.owners.stored(src_path, True, st, layer)
        if opened:
            os.fchmod(tfd, stat.S_IMODE(mode))
        elif not stat.S_ISLNK(st.st_mode):
            _sys.fchmod_fd(tfd, stat.S_IMODE(mode))
        tst = os.fstat(tfd)
        self.owners.set_owner(dst_path, True, uid, gid, fresh=True, st=tst)
        for attr in self._xattr_names(src):
            try:
                value = os.getxattr(src, attr)
                os.setxattr(dst, attr, value)
            except OSError as exc:  # like the kernel, skip what the upper fs refuses
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.ENODATA, errno.EINVAL):
                    raise
        # No origin when the copy-up breaks a lower hard link (ovl_copy_up_metadata); an
        # indexed copy keeps the link, and has one (ovl_do_copy_up: to_index).
        if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1 or indexed:
            fh = _sys.name_to_handle(sfd)
            if fh is not None:
                try:
                    os.setxattr(dst, self.names.origin, encode_origin(fh[0], fh[1], self._uuid_of(layer)))
                except OSError as exc:
                    if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                        raise
        _sys.futimens_fd(tfd, st.st_atime_ns, st.st_mtime_ns)
        return tst

    def _uuid_of(self, layer: Layer | None) -> bytes | None:
        """The UUID an origin record names: that of the source's filesystem (the kernel's
        ovl_encode_real_fh), which differs per lower on several filesystems; null with
        ``-o uuid=off`` (LayerStack.origin_uuid)."""
        if layer is None:
            if not self.stack.lowers:
                return None
            layer = self.stack.lowers[0]
        return self.stack.origin_uuid(layer)

    def _xattr_names(self, src: bytes | int) -> list[str]:
        """Names to carry up from *src* (an fd's magic link, followed to the fd's object, or
        an open fd)."""
        try:
            names = os.listxattr(src)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return []
            raise
        # The overlay's own records of the lower layer are not carried up; escaped
        # user names (overlay.overlay.X) are.
        return [n for n in names if self.names.to_user(n) is not None and n != OVERRIDE_XATTR]

    def _install(self, node: Node, tmp: bytes | None, tfd: int, lower_st: os.stat_result, tst: os.stat_result) -> None:
        """Give the temporary (work/<tmp>, or the unnamed file *tfd* when *tmp* is None; its
        fstat *tst*) its real name in upper, never replacing one; then (only then) the node
        is upper."""
        rel = node.relpath()
        prel, _, name = rel.rpartition(b"/")
        pfd = self.stack.dir_fd(self.upper, prel)
        pst = os.fstat(pfd)
        self.work.install(tmp, tfd, pfd, name)
        set_impure(pfd, self.names)  # the parent may now hold an object with an origin
        # A copy-up changes nothing in the merged view: give the parent its times back
        # (the kernel does the same: ovl_set_timestamps on the upper parent).
        _sys.futimens_fd(pfd, pst.st_atime_ns, pst.st_mtime_ns)
        # The link moved the parent's ctime (and may have grown it by a block): the kernel's
        # cached attributes of the parent go, as the kernel's overlay shows the new ctime at
        # once; its cached listing stays (the entry kept its name, type and d_ino).
        old_layer = node.layer
        ino_changed = False
        node.layer = self.upper
        if node.is_dir:
            node.dirs = (self.upper,) + node.dirs
        else:
            # the object installed (*tfd*'s), whatever the name in upper holds by now
            self.inodes.rekey(node, real_key(tst.st_dev, tst.st_ino))
            if lower_st.st_nlink > 1:
                # The copy-up broke a lower hard link: the kernel then reports the upper inode.
                node.ino = tst.st_ino
                ino_changed = True
        log.debug("copied up %r from %s", rel, old_layer.label)
        self._refresh_fd(node)
        if ino_changed:
            self.on_attr_changed(node.id)
        if node.parent is not None:
            self.on_attr_changed(node.parent.id)
        self.on_copied_up(node, ino_changed)

    def _refresh_fd(self, node: Node) -> None:
        """Point the node's fd at its new upper object, opened in the upper parent's fd (the
        parent was copied up first) and checked to be that object. A node must never keep
        its lower fd once upper (a change through it would reach the lower layer): if no
        fd can be had, it gets none and its operations fail (EBADF)."""
        parent = node.parent
        pfd = (
            parent.fd
            if parent is not None and parent.layer.is_upper
            else self.stack.dir_fd(self.upper, parent.relpath() if parent is not None else b"")
        )
        for attempt in range(2):
            try:
                fd = _sys.open_node(pfd, node.name)
                break
            except OSError as exc:
                if attempt or exc.errno not in (errno.EMFILE, errno.ENFILE):
                    self.inodes.set_fd(node, -1)
                    log.error("copy-up of %r: cannot open the upper object: %s", node, exc)
                    return
                self.inodes.set_fd(node, -1)  # frees a descriptor for the retry
        fst = os.fstat(fd)
        ok = stat.S_IFMT(fst.st_mode) == stat.S_IFMT(node.mode) and (
            node.key is None or (fst.st_dev, fst.st_ino) == node.key[1:]
        )
        if not ok:
            os.close(fd)
            fd = -1
            log.error("copy-up of %r: the upper object changed under the server", node)
        self.inodes.set_fd(node, fd)

    def _copy_up_dir(self, node: Node) -> None:
        sfd, st = self._open_source(node)
        try:
            self._copy_up_special(node, sfd, st, None)
        finally:
            os.close(sfd)

    def _copy_up_special(self, node: Node, sfd: int, st: os.stat_result, target: bytes | None) -> None:
        """A directory, symlink or special file: made by name in work/, then used only
        through an O_PATH fd checked to be what was made."""
        tmp, tfd, tst = self.work.create(st, target)
        try:
            try:
                self._finish_meta(tfd, sfd, st, node.layer)
            except BaseException:
                self.work.discard(tmp, tst)
                raise
            self._install(node, tmp, tfd, st, tst)
        finally:
            os.close(tfd)

    async def _copy_up_nondir(self, node: Node, reason: str, data: bool = False) -> None:
        """A non-directory, traced (copy_up_start once its source is open)."""
        meta = self._meta_only(node, data)
        try:
            fd, st = self._open_source(node)
            if stat.S_ISREG(st.st_mode):
                fd = self._readable(fd)  # the copy reads everything through this one
        except BaseException as exc:
            self._traced_end(self._traced_start(node, reason, meta=meta), exc)
            raise
        meta = meta and stat.S_ISREG(st.st_mode)
        ev = self._traced_start(node, reason, st, meta)
        try:
            try:
                if meta:
                    self._copy_up_meta(node, fd, st)
                elif stat.S_ISREG(st.st_mode):
                    await self._copy_up_file(node, fd, st)
                else:
                    target = _sys.readlink_fd(fd) if stat.S_ISLNK(st.st_mode) else None
                    self._copy_up_special(node, fd, st, target)
            finally:
                os.close(fd)
        except BaseException as exc:
            self._traced_end(ev, exc)
            raise
        self._traced_end(ev, None)

    async def _copy_up_file(self, node: Node, src: int, st: os.stat_result) -> None:
        """A regular file (*src*: its source open for reading, ``_readable``); data
        over ``THREAD_THRESHOLD`` bytes is copied in a worker thread. A lower metacopy file
        (made by the kernel in a middle layer) has its data read from its data file."""
        if st.st_size <= THREAD_THRESHOLD:
            self._copy_up_file_now(node, src, st)
            return
        tmp, dst = self._file_temporary()
        try:
            try:
                await self._copy_data_threaded(node, src, dst, st.st_size)
            except BaseException:
                self._discard_file(tmp, dst)
                raise
            self._finish_file(node, tmp, dst, src, st)
        finally:
            os.close(dst)

    async def _copy_data_threaded(self, node: Node, src: int, dst: int, size: int) -> None:
        """*size* bytes of *src*'s data (its data file's, for a lower metacopy file) to
        *dst*, in a worker thread: the server answers other requests meanwhile."""
        import trio

        dsrc = self._data_source(node, src)
        try:
            await trio.to_thread.run_sync(copy_data, dsrc, dst, size, self.sync, limiter=self.limiter)
        finally:
            if dsrc != src:
                os.close(dsrc)

    def _copy_up_file_now(self, node: Node, src: int, st: os.stat_result) -> None:
        """``_copy_up_file`` of small data, all in this thread (no await)."""
        tmp, dst = self._file_temporary()
        try:
            try:
                dsrc = self._data_source(node, src)
                try:
                    copy_data(dsrc, dst, st.st_size, self.sync)
                finally:
                    if dsrc != src:
                        os.close(dsrc)
            except BaseException:
                self._discard_file(tmp, dst)
                raise
            self._finish_file(node, tmp, dst, src, st)
        finally:
            os.close(dst)

    def _data_source(self, node: Node, src: int) -> int:
        """Where the data of *node* is read: *src* (its own object, open), or its data file
        opened for reading when it is a metacopy file."""
        data = node.lowerdata
        if data is None:
            return src
        return _sys.open_beneath(data[0].fd, data[1], os.O_RDONLY)

    # --- metacopy (-o metacopy=on) ----------------------------------------------------------------

    def _copy_up_meta(self, node: Node, src: int, st: os.stat_result) -> None:
        """A regular file's metadata only (the kernel's metacopy copy-up): an O_TMPFILE file
        (or one in work/) of the source's size with no data (sparse: ovl_set_size), its mode,
        owner, xattrs, origin and times, and an empty ``overlay.metacopy`` (no fs-verity
        digest: ovl_set_metacopy_xattr), linked into place. Its data is still read from the
        file below (``Node.lowerdata``: the source's, or the source itself) until
        ``_copy_up_data``."""
        lowerdata = node.lowerdata or (node.layer, node.path_in(node.layer))
        tmp, dst = self._file_temporary()
        try:
            try:
                os.ftruncate(dst, st.st_size)
                tst = self._finish_meta(dst, src, st, node.layer, opened=True)
                # no fsync: as the kernel, only data copy-ups are synced with metacopy=on
                # ("we want to avoid fsync on all meta copyup that will hurt performance
                # of workloads such as chown -R"; ovl_copy_up_one's metadata_fsync)
                os.setxattr(dst, self.names.metacopy, b"")
            except BaseException:
                self._discard_file(tmp, dst)
                raise
            old = node.lowerdata
            node.lowerdata = lowerdata  # before the node is upper: its readers follow it
            try:
                self._install(node, tmp, dst, st, tst)
            except BaseException:
                if not node.layer.is_upper:
                    node.lowerdata = old
                raise
        finally:
            os.close(dst)

    async def _copy_up_data(self, node: Node, reason: str) -> None:
        """The data of metacopy file *node* (upper), traced as its own copy-up: large data
        in a worker thread."""
        import trio

        with self._data_copy(node, reason) as (dsrc, dst, size):
            if size > THREAD_THRESHOLD:
                await trio.to_thread.run_sync(copy_data, dsrc, dst, size, self.sync, limiter=self.limiter)
            else:
                copy_data(dsrc, dst, size, self.sync)

    def _copy_up_data_now(self, node: Node, reason: str) -> None:
        """``_copy_up_data`` of small data, in this thread."""
        with self._data_copy(node, reason) as (dsrc, dst, size):
            copy_data(dsrc, dst, size, self.sync)

    @contextlib.contextmanager
    def _data_copy(self, node: Node, reason: str) -> Iterator[tuple[int, int, int]]:
        """A metacopy file's data copy-up around the copy itself (the body: (source fd,
        destination fd, size)): opened and traced before, finished (``overlay.metacopy``
        removed) after a body that did not fail, the fds closed, the trace's end event
        with the failure if any."""
        ev, dst, dsrc, kept = self._data_start(node, reason)
        try:
            try:
                yield dsrc, dst, kept[0].st_size
                self._data_finish(node, dst, kept)
            finally:
                os.close(dst)
                os.close(dsrc)
        except BaseException as exc:
            self._traced_end(ev, exc)
            raise
        self._traced_end(ev, None)

    def _data_start(
        self, node: Node, reason: str
    ) -> tuple[dict[str, Any], int, int, tuple[os.stat_result, bytes | None]]:
        """Open both ends of a metacopy file's data copy-up: the upper file itself for
        writing (the kernel copies into it in place: until ``overlay.metacopy`` goes, its
        data is never read, so a crash halfway leaves the metacopy file as it was) and the
        data file for reading. (trace event, dst fd, src fd, (dst's fstat, its
        security.capability))."""
        data = node.lowerdata
        assert data is not None
        dsrc = _sys.open_beneath(data[0].fd, data[1], os.O_RDONLY)
        try:
            dst = _sys.reopen(node.fd, os.O_WRONLY)
        except BaseException:
            os.close(dsrc)
            raise
        dst_st = os.fstat(dst)
        ev = self._traced_start(node, reason, os.fstat(dsrc))
        ev["size"] = dst_st.st_size
        ev["layer"] = data[0].label  # where the data comes from
        ev["data_only"] = True  # the metadata was copied up before
        return ev, dst, dsrc, (dst_st, _sys.getxattr_at(dst, None, CAPS_XATTR))

    def _data_finish(self, node: Node, dst: int, kept: tuple[os.stat_result, bytes | None]) -> None:
        """The data is in (and synced): remove ``overlay.metacopy``, the commit point; the
        node's readers now read the upper file."""
        before, caps = kept
        # Writing the data dropped security.capability (and set-id bits without
        # CAP_FSETID): restored, as the kernel's ovl_copy_up_meta_inode_data does
        if caps is not None and _sys.getxattr_at(dst, None, CAPS_XATTR) is None:
            os.setxattr(dst, CAPS_XATTR, caps)
        if os.fstat(dst).st_mode != before.st_mode:
            os.fchmod(dst, stat.S_IMODE(before.st_mode))
        os.removexattr(dst, self.names.metacopy)
        _sys.futimens_fd(dst, before.st_atime_ns, before.st_mtime_ns)  # the copy itself changes no times
        if self.sync:
            os.fsync(dst)
        node.lowerdata = None
        self.on_attr_changed(node.id)
        self.on_copied_up(node, False)

    def _file_temporary(self) -> tuple[bytes | None, int]:
        """Where a regular file's copy is built: an O_TMPFILE file (no name in work/ at all,
        as the kernel's ovl_copy_up_tmpfile), linked into place by ``_install``; where the
        upper's filesystem has no O_TMPFILE, a file made O_CREAT|O_EXCL in work/ and renamed.
        (name in work/ or None, O_RDWR fd)."""
        dst = self.work.tmpfile()
        if dst is None:
            return self.work.create_file()
        return None, dst

    def _discard_file(self, tmp: bytes | None, dst: int) -> None:
        if tmp is not None:
            self.work.discard(tmp, os.fstat(dst))

    def _finish_file(self, node: Node, tmp: bytes | None, dst: int, src: int, st: os.stat_result) -> None:
        """Metadata of the copied (and synced) data *dst*, read from *src*, then its name."""
        try:
            tst = self._finish_meta(dst, src, st, node.layer, opened=True)
        except BaseException:
            self._discard_file(tmp, dst)
            raise
        old = node.lowerdata
        node.lowerdata = None  # a lower metacopy file: its data is in the copy now
        try:
            self._install(node, tmp, dst, st, tst)
        except BaseException:
            if not node.layer.is_upper:
                node.lowerdata = old
            raise

    # --- index=on (index.py): hard-linked lower files -------------------------------------------

    def copy_up_indexed(
        self, node: Node, reason: str, parent: Node | None = None, name: bytes | None = None, data: bool = False
    ) -> bool:
        """The kernel's copy-up of a lower non-directory with more than one link, with
        ``index=on`` (ovl_do_copy_up with to_index, then ovl_link_up): built with an origin
        record and linked at ``index/<hex of the record>`` (unless another name of the
        inode put it there already), then linked at the name (*parent*/*name*, by default
        the node's own). With ``metacopy=on`` and not *data* (a chmod, chown, utimes,
        xattr, link, rename or unlink: ovl_need_meta_copy_up), the entry is a metacopy file
        (metadata only; ``Node.lowerdata`` is the lower file) as the kernel makes it.
        Blocking (data is copied in this thread: an engine's inline path, for small files
        and metadata-only copies; ``copy_up_indexed_async`` copies large data in a worker
        thread). False, having done nothing: not such a file (the plain copy-up applies)."""
        plan = self._index_plan(node, parent, name)
        if plan is None:
            return False
        parent, name, layer, sfd, st, iname, lowerdata = plan
        meta = self._meta_only(node, data) and stat.S_ISREG(st.st_mode)
        try:
            if self._index_missing(iname, st):
                with self._traced_index_build(node, reason, st, meta, iname):
                    self._copy_to_index(node, sfd, st, layer, iname, meta)
            self._link_up(node, parent, name, iname, st, lowerdata)
        finally:
            os.close(sfd)
        return True

    @contextlib.contextmanager
    def _traced_index_build(self, node: Node, reason: str, st: os.stat_result, meta: bool, iname: bytes):
        """The trace's start and end of building an index entry around the block (its
        error, if it raises): shared by the inline and the threaded indexed copy-up."""
        ev = self._traced_start(node, reason, st, meta)
        ev["index"] = iname.decode()
        try:
            yield
        except BaseException as exc:
            self._traced_end(ev, exc)
            raise
        self._traced_end(ev, None)

    async def copy_up_indexed_async(
        self, node: Node, reason: str, data: bool = False, parent: Node | None = None, name: bytes | None = None
    ) -> bool:
        """``copy_up_indexed`` with its data copied in a worker thread when it is large
        (over ``THREAD_THRESHOLD``), as other copy-ups. The caller holds the node's lock
        (``_ensure_one``, ``link_up_indexed``). Should another name of the inode be copied
        up meanwhile (a removal through it), its index entry wins and this copy is dropped.
        Without *parent*/*name*: the node's own name, wherever it is after the copy."""
        own = parent is None or name is None
        plan = self._index_plan(node, parent, name)
        if plan is None:
            return False
        parent, name, layer, sfd, st, iname, lowerdata = plan
        meta = self._meta_only(node, data) and stat.S_ISREG(st.st_mode)
        try:
            if self._index_missing(iname, st):
                with self._traced_index_build(node, reason, st, meta, iname):
                    if not meta and stat.S_ISREG(st.st_mode) and st.st_size > THREAD_THRESHOLD:
                        await self._copy_to_index_threaded(node, sfd, st, layer, iname)
                    else:
                        self._copy_to_index(node, sfd, st, layer, iname, meta)
            if own and node.parent is not None:  # where the node is now (a rename may have moved it)
                parent, name = node.parent, node.name
            self._link_up(node, parent, name, iname, st, lowerdata)
        finally:
            os.close(sfd)
        return True

    def index_copy_waits(self, node: Node, parent: Node, name: bytes) -> bool:
        """Whether the indexed copy-up of *name* in *parent* (a lower name of hard-linked
        *node*, for a link, rename or unlink) may wait: a task is copying the node up (its
        lock is taken), or its index entry is still to be built with more than
        ``THREAD_THRESHOLD`` bytes of data. Then ``link_up_indexed`` serves it in a task;
        otherwise ``copy_up_indexed`` may (no await). Looks only."""
        if node.id in self._locks:
            return True
        if self.index is None or node.is_dir:
            return False
        hit = self.lower_hit(parent, name)
        if hit is None or not stat.S_ISREG(hit[1].st_mode) or hit[1].st_nlink <= 1:
            return False
        # (an index entry may exist already: the task then only links it)
        return not self._meta_only(node, False) and hit[1].st_size > THREAD_THRESHOLD

    async def link_up_indexed(self, node: Node, reason: str, parent: Node, name: bytes) -> bool:
        """The write path's indexed copy-up of *name* in *parent* (ovl_copy_up of the dentry
        a link, rename or unlink names: ovl_nlink_start), under the node's lock (one copy-up
        of an inode at a time; another name's copy-up that finished meanwhile left its
        index entry, which this one then only links). The data of a large file is copied in
        a worker thread: the server serves other requests meanwhile. False, having done
        nothing: not such a name any more (gone, or taken by another object meanwhile: the
        caller looks it up again)."""
        lock = self._lock_of(node)
        try:
            async with lock:
                pfd = self.upper_dir(parent, "parent")
                try:
                    cur = _sys.lstat_at(pfd, name)
                except FileNotFoundError:
                    cur = None
                if cur is not None:  # linked up meanwhile, or another object's name now
                    return False
                return await self.copy_up_indexed_async(node, reason, False, parent, name)
        finally:
            self._unlock(node, lock)

    def _index_plan(
        self, node: Node, parent: Node | None, name: bytes | None
    ) -> tuple[Node, bytes, Layer, int, os.stat_result, bytes, tuple[Layer, bytes]] | None:
        """(parent, name, lower layer, O_PATH fd of the lower object, its fstat, index entry
        name, where its data is: (layer, path)) of an indexed copy-up of *name* in *parent*
        (default: the node's own), with the parent copied up; None: not a lower
        non-directory with several links."""
        index = self.index
        if index is None or node.is_dir:
            return None
        if parent is None or name is None:
            parent, name = node.parent, node.name
        if parent is None:
            return None
        hit = self.lower_hit(parent, name)
        if hit is None or stat.S_ISDIR(hit[1].st_mode) or hit[1].st_nlink <= 1:
            return None
        layer, _lst, lpath = hit
        lowerdata = node.lowerdata or (layer, lpath)  # (a lower metacopy file: its data below)
        prel, _, lname = lpath.rpartition(b"/")
        sfd = _sys.open_beneath(self.stack.dir_fd(layer, prel), lname, _sys.O_PATH)
        try:
            st = os.fstat(sfd)
            if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
                os.close(sfd)
                return None
            from .index import encode_fh, index_name

            rec = encode_fh(sfd, self._uuid_of(layer))
            if rec is None:
                os.close(sfd)
                return None
            self.ensure_upper_dir_sync(parent, "parent")
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(sfd)
            raise
        return parent, name, layer, sfd, st, index_name(rec), lowerdata

    def _index_missing(self, iname: bytes, st: os.stat_result) -> bool:
        assert self.index is not None
        return self.index.entry(iname, st.st_mode) is None

    async def _copy_to_index_threaded(
        self, node: Node, sfd: int, st: os.stat_result, layer: Layer, iname: bytes
    ) -> None:
        """``_copy_to_index`` of a large regular file: the data in a worker thread (read from
        the data file of a lower metacopy file)."""
        src = _sys.reopen(sfd, os.O_RDONLY)
        try:
            tmp, dst = self._file_temporary()
            try:
                try:
                    await self._copy_data_threaded(node, src, dst, st.st_size)
                    self._finish_meta(dst, src, st, layer, opened=True, indexed=True)
                except BaseException:
                    self._discard_file(tmp, dst)
                    raise
                self._install_index(tmp, dst, iname, st)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _install_index(self, tmp: bytes | None, fd: int, iname: bytes, st: os.stat_result) -> None:
        """Link the built copy at index/<iname> with its ``overlay.nlink`` (``U+<links-1>``).
        An entry made meanwhile (another name's copy-up) wins: this copy is dropped."""
        index = self.index
        assert index is not None
        try:
            self.work.install(tmp, fd, index.fd, iname)
        except FileExistsError:
            return
        if stat.S_ISLNK(st.st_mode):  # no user xattrs on a symlink: the kernel writes trusted ones only
            with contextlib.suppress(OSError):
                index.set_nlink(fd, "U", st.st_nlink - 1)
        else:
            index.set_nlink(fd, "U", st.st_nlink - 1)

    def lower_hit(self, parent: Node, name: bytes) -> tuple[Layer, os.stat_result, bytes] | None:
        """The lower object *name* in *parent* (the first lower hit), if any."""
        lowers = [(layer, p) for layer, p in parent.layer_dirs() if not layer.is_upper]
        if not lowers:
            return None
        hits = self.stack.resolve(lowers, name)
        if not hits or hits[0].layer.is_upper:
            return None
        return hits[0].layer, hits[0].st, hits[0].path

    def _copy_to_index(
        self, node: Node, sfd: int, st: os.stat_result, layer: Layer, iname: bytes, meta: bool = False
    ) -> None:
        """ovl_copy_up_tmpfile/_workdir to the index dir: the copy, its metadata and origin,
        linked at index/<iname>, then its ``overlay.nlink`` (``U+<links-1>``). *meta*: a
        regular file's metadata only (``_copy_up_meta``'s file: sparse, no fsync, an empty
        ``overlay.metacopy``), the kernel's metacopy index entry."""
        if stat.S_ISREG(st.st_mode):
            src = _sys.reopen(sfd, os.O_RDONLY)
            try:
                tmp, dst = self._file_temporary()
                try:
                    try:
                        if meta:
                            os.ftruncate(dst, st.st_size)
                        else:
                            dsrc = self._data_source(node, src)
                            try:
                                copy_data(dsrc, dst, st.st_size, self.sync)
                            finally:
                                if dsrc != src:
                                    os.close(dsrc)
                        self._finish_meta(dst, src, st, layer, opened=True, indexed=True)
                        if meta:
                            os.setxattr(dst, self.names.metacopy, b"")
                    except BaseException:
                        self._discard_file(tmp, dst)
                        raise
                    self._install_index(tmp, dst, iname, st)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            return
        target = _sys.readlink_fd(sfd) if stat.S_ISLNK(st.st_mode) else None
        tmp2, tfd, tst = self.work.create(st, target)
        try:
            try:
                self._finish_meta(tfd, sfd, st, layer, indexed=True)
            except BaseException:
                self.work.discard(tmp2, tst)
                raise
            self._install_index(tmp2, tfd, iname, st)
        finally:
            os.close(tfd)

    def overlay_nlink(self, fd: int, lower_nlink: int | None) -> int:
        """The overlay nlink of the indexed inode of *fd* (ovl_get_nlink)."""
        from .index import nlink_of

        assert self.index is not None
        upper_nlink = os.fstat(fd).st_nlink
        return nlink_of(self.index.get_nlink(fd), upper_nlink, lower_nlink, upper_nlink)

    def _link_up(
        self,
        node: Node,
        parent: Node,
        name: bytes,
        iname: bytes,
        lst: os.stat_result,
        lowerdata: tuple[Layer, bytes] | None = None,
    ) -> None:
        """ovl_link_up: the index entry linked at *name* in *parent*'s upper dir (the parent
        impure, ``L+d`` before, ``U+d`` after, the parent's times kept); the node is upper.
        A metacopy entry's data stays *lowerdata* (the lower file) until its data copy-up."""
        index = self.index
        assert index is not None
        ifd = index.open(iname)
        try:
            pfd = parent.fd
            overlay = self.overlay_nlink(ifd, lst.st_nlink)
            set_impure(pfd, self.names)
            index.set_nlink(ifd, "L", overlay - lst.st_nlink)
            pst = os.fstat(pfd)
            ist = os.fstat(ifd)
            try:
                cur = _sys.lstat_at(pfd, name)
            except FileNotFoundError:
                cur = None
            if cur is None or (cur.st_dev, cur.st_ino) != (ist.st_dev, ist.st_ino):
                _sys.link_fd(ifd, pfd, name)  # EEXIST if another object took the name
                _sys.futimens_fd(pfd, pst.st_atime_ns, pst.st_mtime_ns)
            tst = os.fstat(ifd)
            index.set_nlink(ifd, "U", overlay - tst.st_nlink)
            index.indexed[(tst.st_dev, tst.st_ino)] = lst.st_nlink
            self.trace.emit("index_link", path=display(_child_path(parent, name)), index=iname.decode(), nlink=overlay)
            if not node.layer.is_upper:
                if (
                    node.lowerdata is None
                    and lowerdata is not None
                    and _sys.getxattr_at(ifd, None, self.names.metacopy) is not None
                ):
                    node.lowerdata = lowerdata  # before the node is upper: its readers follow it
                node.layer = self.upper
                self.inodes.rekey(node, real_key(tst.st_dev, tst.st_ino))
            self.inodes.set_primary(node, parent, name)
            self.inodes.pinned.discard(node.id)
            log.debug("linked up %r from index/%s", name, iname)
            nfd = _sys.open_node(pfd, name)
            fst = os.fstat(nfd)
            if (fst.st_dev, fst.st_ino) != (tst.st_dev, tst.st_ino):  # never expected: we just linked it
                os.close(nfd)
                raise OSError(errno.EIO, "the linked index entry changed under the server")
            self.inodes.set_fd(node, nfd)
        finally:
            os.close(ifd)
        self.on_attr_changed(node.id)
        self.on_attr_changed(parent.id)
        self.on_copied_up(node, False)


def _child_path(parent: Node, name: bytes) -> bytes:
    prel = parent.relpath()
    return prel + b"/" + name if prel else name
