"""The write path: namespace changes, attribute changes, xattrs, data.

Every change lands in the upper layer; lower layers are never written. Rules follow the
kernel (fs/overlayfs/dir.c, inode.c, xattrs.c) with its default options: a name removed
while a lower layer still has it leaves a char 0/0 whiteout; a name re-created over a
whiteout replaces it atomically (RENAME_EXCHANGE through the workdir), a directory made
that way is opaque; a directory with lower content cannot be renamed (EXDEV), unless the
mount has ``redirect_dir=on``: it is then copied up (metadata only) and renamed, and
records where its lower content is in ``overlay.redirect`` (the kernel's ovl_set_redirect).

``WritePath`` receives its collaborators in its constructor: the read side (``Overlay``,
for lookups), the layer stack, the inode table, the handle table, the listings, the
copy-up (None: read-only, every change fails EROFS), the owners, the tracer and the
``Work`` of ``work/``, where whiteouts and objects created over a whiteout are built.
The on-disk encodings (whiteout, opaque) come from ``whiteout.py``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from . import _sys
from .copyup import CopyUp, writable
from .dircache import ListingCache
from .handles import OPEN_PASS, DirHandle, HandleTable, OpenFile
from .idmap import OVERRIDE_XATTR
from .inodes import InodeTable, Node, real_key
from .layers import Layer, LayerStack
from .overlay import NAME_MAX, Caller, Overlay
from .ownership import Owners
from .trace import Tracer, display
from .whiteout import (
    XattrNames,
    aufs_marker_for,
    has_origin,
    is_aufs_marker,
    is_whiteout_at,
    is_whiteout_kind,
    set_impure,
    set_opaque,
)
from .workdir import Work

log = logging.getLogger(__name__)

#: fallocate and copy_file_range ranges up to this many bytes are served inline by an
#: engine (a thread hand-off costs more than they do); larger ones in a thread
INLINE_MAX = 1 << 20


class WritePath:
    """Every change to the merged filesystem."""

    def __init__(
        self,
        view: Overlay,
        stack: LayerStack,
        inodes: InodeTable,
        handles: HandleTable,
        listings: ListingCache,
        copyup: CopyUp | None,
        owners: Owners,
        names: XattrNames,
        tracer: Tracer,
        work: Work | None,
        *,
        volatile: bool = False,
        redirect_dir: bool = False,
        redirect_max: int = 256,
    ) -> None:
        if (copyup is None) != (work is None):
            raise ValueError("a writable overlay needs both its copy-up and its work/")
        self.view = view
        self.stack = stack
        self.inodes = inodes
        self.handles = handles
        self.listings = listings
        self._copyup = copyup
        self.owners = owners
        self.names = names
        self.trace = tracer
        self._work = work
        self.volatile = volatile  # -o volatile: fsync is a no-op (the kernel's ovl_fsync)
        # -o redirect_dir=on: directories with lower content are renamed (features.py)
        self.redirect_dir = redirect_dir
        self.redirect_max = redirect_max  # the module's redirect_max: longer absolute ones: EXDEV

    # --- helpers ----------------------------------------------------------------------------

    @property
    def copy(self) -> CopyUp:
        """The copy-up; EROFS on a read-only overlay."""
        return writable(self._copyup)

    @property
    def work(self) -> Work:
        if self._work is None:
            raise OSError(errno.EROFS, "read-only overlay")
        return self._work

    @property
    def upper(self) -> Layer:
        return self.copy.upper

    def _lower_has(self, parent: Node, name: bytes) -> bool:
        """Whether a lower layer below *parent*'s upper still shows *name* (a whiteout is needed)."""
        lowers = [(layer, p) for layer, p in parent.layer_dirs() if not layer.is_upper]
        return bool(lowers) and bool(self.stack.resolve(lowers, name))

    def _upper_entry(self, pfd: int, name: bytes) -> os.stat_result | None:
        try:
            return _sys.lstat_at(pfd, name)
        except FileNotFoundError:
            return None

    def _is_upper_whiteout(self, pfd: int, name: bytes, st: os.stat_result | None) -> bool:
        return st is not None and is_whiteout_at(pfd, name, st, self.names)

    def _exists(self, parent: Node, name: bytes) -> Node | None:
        try:
            node, _ = self.view.lookup(parent, name)
            return node
        except FileNotFoundError:
            return None

    def _owner(self, pfd: int, caller: Caller) -> tuple[int | None, int | None]:
        """The stored owner of a new object: the caller's (presented) ids mapped back (EINVAL
        when unmapped); in a setgid directory, the directory's stored group."""
        uid, gid = self.owners.store_ids(caller.uid, caller.gid)
        pst = os.fstat(pfd)
        if pst.st_mode & stat.S_ISGID:
            gid = self.owners.stored(_sys.proc_path(pfd), True, pst, self.upper)[1]
        return uid, gid

    def _chown_keep_mode(
        self, dfd: int, name: bytes, uid: int | None, gid: int | None, made: int | None = None
    ) -> None:
        """Give a new object its stored owner (chown, or the override xattr when the server
        cannot chown); the set-id bits its creator chose stay. Done on an fd of the object
        (its magic link, followed to the object only), never on its name again: *made*, an
        fd its maker kept open (a created file), else an O_PATH fd opened here."""
        if made is not None:
            self.owners.set_owner(*_sys.fd_xattr_path(made), uid, gid, fresh=True, st=os.fstat(made))
            return
        fd = _sys.open_node(dfd, name)
        try:
            self.owners.set_owner(*_sys.fd_xattr_path(fd), uid, gid, fresh=True, st=os.fstat(fd))
        finally:
            os.close(fd)

    def _place_new(
        self,
        parent: Node,
        name: bytes,
        make: Callable[[int, bytes], None],
        caller: Caller | None,
        opaque: bool = False,
        made: Callable[[], int | None] | None = None,
    ) -> tuple[Node, os.stat_result]:
        """Create a new object with ``make(dir_fd, name)`` in upper, over a whiteout if there is one.

        The object is given to *caller* (None: a hard link, which keeps its inode's owner).
        *made*: the fd ``make`` left open on the object, if any (its owner is set through it)."""
        copy, work = self.copy, self.work
        self.listings.changed()
        if len(name) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if self.stack.aufs:
            self._check_not_marker(name)
        if self._exists(parent, name) is not None:
            raise OSError(errno.EEXIST, "exists")
        pfd = copy.upper_dir(parent, "create")
        owner = self._owner(pfd, caller) if caller is not None else None
        ust = self._upper_entry(pfd, name)
        path = display(_child(parent, name))
        if self._is_upper_whiteout(pfd, name, ust):
            # Build it in work/, swap it with the whiteout, then drop the whiteout.
            wfd = work.fd
            tmp = work.make(make)
            try:
                if owner is not None:
                    self._chown_keep_mode(wfd, tmp, *owner, made() if made is not None else None)
                tst = _sys.lstat_at(wfd, tmp)
                if stat.S_ISDIR(tst.st_mode) and os.fstat(pfd).st_mode & stat.S_ISGID:
                    # made in work/, it did not inherit the parent's setgid bit as mkdir there
                    # would: chmod on an fd of that very directory (never a name in work/)
                    dfd = _sys.open_node(wfd, tmp)
                    try:
                        dst = os.fstat(dfd)
                        if not stat.S_ISDIR(dst.st_mode) or dst.st_ino != tst.st_ino:
                            raise OSError(errno.ESTALE, "work/ changed under the server")
                        _sys.fchmod_fd(dfd, stat.S_IMODE(dst.st_mode) | stat.S_ISGID)
                    finally:
                        os.close(dfd)
                if opaque:
                    self._make_opaque(wfd, tmp, path)
            except BaseException:
                work.discard(tmp)
                raise
            work.swap_with_whiteout(tmp, pfd, name)
            self.trace.emit("whiteout_remove", path=path)
        elif ust is not None:
            raise OSError(errno.EEXIST, "exists in upper")
        else:
            make(pfd, name)
            if owner is not None:
                self._chown_keep_mode(pfd, name, *owner, made() if made is not None else None)
            if opaque and (self.redirect_dir or self.copy.index is not None) and parent.is_merged:
                # ovl_create_upper: a new directory in a merged one is made opaque ("just an
                # optimization") unless the mount allows offline changes to the lowers
                # (ovl_allow_offline_changes: none of redirect_dir=on, index, metacopy, ...)
                with contextlib.suppress(OSError):
                    self._make_opaque(pfd, name, path)
            if self.stack.aufs:
                self._drop_upper_marker(pfd, name, opaque, path)
        self.stack.dirfds.forget_one(copy.upper, _child(parent, name))
        node, st = self.view.made(parent, name, copy.upper, pfd, new=caller is not None)
        self.trace.emit("create", path=path, kind="link" if caller is None else _kind(st.st_mode))
        return node, st

    def _peer_changed(self, node: Node | None) -> None:
        """*node*'s real object changed (attributes, data, link count): the kernel's cached
        attributes of its peer (the other node of a real inode whose names report two
        st_ino, ``InodeTable.peer``) go, as the kernel's overlay shows the real inode's."""
        if node is not None and node.key is not None:
            peer = self.inodes.peer(node)
            if peer is not None:
                self.copy.on_attr_changed(peer.id)

    def _check_not_marker(self, name: bytes) -> None:
        """With AUFS whiteouts on, a ``.wh.`` name cannot be made through the mount (EINVAL,
        as fuse-overlayfs's create): it would be a marker, not a file."""
        if is_aufs_marker(name):
            raise OSError(errno.EINVAL, "a .wh. name is a whiteout marker (-o aufs_whiteouts)")

    def _drop_upper_marker(self, pfd: int, name: bytes, opaque: bool, path: str) -> None:
        """*name* was just made in the upper directory *pfd*: a marker ``.wh.NAME`` there
        goes (fuse-overlayfs's delete_whiteout); a new directory that replaced one is made
        opaque first, as over a whiteout, so that what the marker hid stays hidden."""
        marker = aufs_marker_for(name)
        if len(marker) > NAME_MAX or self._upper_entry(pfd, marker) is None:
            return
        if opaque:
            self._make_opaque(pfd, name, path)
        try:
            os.unlink(marker, dir_fd=pfd)
        except FileNotFoundError:
            pass
        self.trace.emit("whiteout_remove", path=path)

    # --- namespace ----------------------------------------------------------------------------

    def create(
        self, parent: Node, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[Node, os.stat_result, int]:
        """A new regular file, open with *flags* (only the parent chain may be copied up:
        directories, no data, so nothing here waits)."""
        box: dict[str, int] = {}

        def make(dfd: int, n: bytes) -> None:
            fd = os.open(
                n,
                (flags & OPEN_PASS) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                stat.S_IMODE(mode) & ~caller.umask,
                dir_fd=dfd,
            )
            box["fd"] = fd

        try:
            node, st = self._place_new(parent, name, make, caller, made=lambda: box.get("fd"))
        except BaseException:
            if "fd" in box:
                os.close(box["fd"])
            raise
        return node, st, self.handles.add(OpenFile(box["fd"], node, flags))

    def mkdir(self, parent: Node, name: bytes, mode: int, caller: Caller) -> tuple[Node, os.stat_result]:
        return self._place_new(
            parent,
            name,
            lambda dfd, n: os.mkdir(n, stat.S_IMODE(mode) & ~caller.umask, dir_fd=dfd),
            caller,
            opaque=True,
        )

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, caller: Caller) -> tuple[Node, os.stat_result]:
        if is_whiteout_kind(mode, rdev):
            raise OSError(errno.EPERM, "a whiteout cannot be created through the overlay")
        perm = stat.S_IMODE(mode) & ~caller.umask
        return self._place_new(
            parent, name, lambda dfd, n: os.mknod(n, stat.S_IFMT(mode) | perm, rdev, dir_fd=dfd), caller
        )

    def symlink(self, parent: Node, name: bytes, target: bytes, caller: Caller) -> tuple[Node, os.stat_result]:
        return self._place_new(parent, name, lambda dfd, n: os.symlink(target, n, dir_fd=dfd), caller)

    async def link(self, node: Node, parent: Node, name: bytes, caller: Caller) -> tuple[Node, os.stat_result]:
        copy = self.copy
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        await copy.copy_up(node, "link")
        if copy.index is not None and node.parent is not None:
            self._index_start(node, node.parent, node.name, "link")  # ovl_link: ovl_nlink_start(old)
        if node.lowerdata is not None:
            # ovl_link -> ovl_set_link_redirect: the new name finds the data through an
            # absolute redirect (unless the file has one already)
            value = self._redirect_for(node, False)
            if value is not None:
                if len(value) > self.redirect_max:
                    raise OSError(errno.EXDEV, "redirect too long")
                os.setxattr(_sys.proc_path(node.fd), self.names.redirect, value, follow_symlinks=True)

        def make(dfd: int, n: bytes) -> None:
            _sys.link_fd(node.fd, dfd, n)  # the node's own inode, never its name

        out = self._place_new(parent, name, make, None)
        self.inodes.named(node)  # an O_TMPFILE file's first name
        if has_origin(node.fd, self.names):  # ovl_link: the new parent may be pure
            set_impure(parent.fd, self.names)
        self._peer_changed(node)
        if out[0] is not node:  # the new name found the other node of the inode
            self._peer_changed(out[0])
        return out

    def tmpfile(self, parent: Node, mode: int, flags: int, caller: Caller) -> tuple[Node, os.stat_result, int]:
        """open(dir, O_TMPFILE): an unnamed file in the upper directory of *parent* (copied
        up first), as the kernel's ovl_tmpfile makes it; ``link`` may name it later (unless
        O_EXCL). Returns its node (unnamed: see ``InodeTable.add_unnamed``), stat and handle."""
        copy = self.copy
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        pfd = copy.upper_dir(parent, "create")
        owner = self._owner(pfd, caller)
        want = (flags & OPEN_PASS & ~os.O_TRUNC) | (flags & os.O_EXCL) | _sys.O_TMPFILE | os.O_CLOEXEC
        fd = os.open(b".", want, stat.S_IMODE(mode) & ~caller.umask, dir_fd=pfd)
        try:
            nfd = _sys.reopen(fd, _sys.O_PATH)  # the node's O_PATH fd of that very file
            try:
                st = os.fstat(fd)
                self.owners.set_owner(*_sys.fd_xattr_path(nfd), *owner, fresh=True, st=st)
                st = os.fstat(fd)
                # the st_ino a lookup of its name will report (Overlay._st_ino: an upper
                # object without an origin shows its own), so the link finds this node
                key = real_key(st.st_dev, st.st_ino)
                node = self.inodes.add_unnamed(parent, st.st_mode, self.upper, st.st_ino, key, nfd)
            except BaseException:
                os.close(nfd)
                raise
        except BaseException:
            os.close(fd)
            raise
        return node, st, self.handles.add(OpenFile(fd, node, flags))

    def _remove_real(self, dfd: int, name: bytes, is_dir: bool) -> None:
        """Remove an upper object; a directory may still hold whiteouts (nothing else)."""
        if is_dir:
            self._clear_whiteouts(dfd, name)
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)

    def _make_opaque(self, dfd: int, name: bytes | None, path: str) -> None:
        """Mark directory *name* in *dfd* opaque (name None: *dfd* is the directory's own fd,
        reached through its magic link; a name is never followed)."""
        if set_opaque(dfd, name, self.names):
            self.trace.emit("opaque_dir", path=path)

    def _clear_whiteouts(self, dfd_parent: int, name: bytes) -> None:
        """Remove the whiteouts left in an upper dir that is about to go (it holds nothing else)."""
        fd = _sys.open_beneath(dfd_parent, name, _sys.O_PATH | os.O_DIRECTORY)
        try:
            for child, kind in _sys.listdir_fd(fd):
                if self.stack.aufs and is_aufs_marker(child) and kind != stat.S_IFDIR:
                    os.unlink(child, dir_fd=fd)  # a marker (fuse-overlayfs's empty_dir drops them)
                elif is_whiteout_at(fd, child, _sys.lstat_at(fd, child), None):  # an upper dir: char 0/0 only
                    os.unlink(child, dir_fd=fd)
        finally:
            os.close(fd)

    # --- index=on: the overlay nlink of indexed inodes (ovl_nlink_start/end) -------------------

    def _index_start(self, node: Node, parent: Node, name: bytes, reason: str) -> bool:
        """ovl_nlink_start for *name* in *parent* (a name of *node*) before an operation that
        changes its link count: a lower name of a hard-linked lower inode is copied up
        through the index first (the kernel's way of having an inode to keep the count on),
        then the overlay nlink is stored relative to the upper inode's (``U+d``). True if
        the node is indexed (``_index_end`` applies)."""
        copy = self.copy
        index = copy.index
        if index is None or node.is_dir or not self._index_name_up(node, parent, name, reason):
            return False
        fst = os.fstat(node.fd)
        lower_nlink = index.indexed.get((fst.st_dev, fst.st_ino))
        if lower_nlink is None:
            return False
        overlay = copy.overlay_nlink(node.fd, lower_nlink)
        index.set_nlink(node.fd, "U", overlay - fst.st_nlink)
        return True

    def _index_linked(self, node: Node, parent: Node, name: bytes) -> bool:
        """Whether *name* in *parent* (a name of non-directory *node*) is in the upper layer
        as the node's own upper object (linked up already, or an upper file)."""
        if not parent.layer.is_upper or parent.fd < 0 or node.fd < 0:
            return False
        ust = self._upper_entry(parent.fd, name)
        if ust is None:
            return False
        fst = os.fstat(node.fd)
        return (ust.st_dev, ust.st_ino) == (fst.st_dev, fst.st_ino)

    def _index_pending(self, parent: Node, name: bytes) -> Node | None:
        """index=on: the node of *name* in *parent* when that name still has to be copied up
        through the index (a lower name of a hard-linked lower non-directory, not linked up
        yet); None otherwise (no such name, a directory, an upper name...)."""
        copy = self._copyup
        if copy is None or copy.index is None:
            return None
        node = self._exists(parent, name)
        if node is None or node.is_dir or self._index_linked(node, parent, name):
            return None
        hit = copy.lower_hit(parent, name)
        if hit is None or stat.S_ISDIR(hit[1].st_mode) or hit[1].st_nlink <= 1:
            return None
        return node

    def index_waits(self, names: list[tuple[Node, bytes]]) -> bool:
        """Whether the indexed copy-up of one of *names* (``(parent, name)``: the names an
        unlink or rename changes) may wait: a large data copy, or a task copying that inode
        up. An engine then serves the request in a task (``remove_async``); otherwise the
        inline ``remove`` copies what is needed at once (metadata, small data)."""
        copy = self._copyup
        if copy is None or copy.index is None:
            return False
        for parent, name in names:
            node = self._index_pending(parent, name)
            if node is not None and copy.index_copy_waits(node, parent, name):
                return True
        return False

    async def _index_names_up(self, names: list[tuple[Node, bytes]], reason: str) -> bool:
        """index=on: the names an operation changes copied up through the index first (the
        kernel's ovl_copy_up of the dentry it names, ovl_nlink_start), each under its
        node's lock, a large file's data in a worker thread (``CopyUp.link_up_indexed``), so
        that the server serves others meanwhile. Returns whether anything was awaited (the
        caller then looks its names up again: they may have changed meanwhile)."""
        copy = self._copyup
        if copy is None or copy.index is None:
            return False
        waited = False
        for _ in range(64):  # each pass copies or finds linked; a name changing under it tries again
            again = False
            for parent, name in names:
                node = self._index_pending(parent, name)
                if node is None:
                    continue
                waited = True
                await copy.link_up_indexed(node, reason, parent, name)
                again = True
            if not again:
                break
        return waited

    async def remove_async(self, parent: Node, name: bytes, is_dir: bool) -> None:
        """``remove``, the indexed copy-up of the name it removes awaited first (large data
        in a worker thread: see ``index_waits``); ``remove`` then finds it linked up."""
        if not is_dir:
            await self._index_names_up([(parent, name)], "remove")
        self.remove(parent, name, is_dir)

    def _index_name_up(self, node: Node, parent: Node, name: bytes, reason: str) -> bool:
        """index=on: *name* in *parent*, a name of *node*, in the upper layer: a lower name of
        a hard-linked lower inode is copied up through the index (or linked to its entry),
        as the kernel copies up the dentry the operation names. False: no upper object is
        there for it (not such a file: the caller's plain copy-up applies)."""
        copy = self.copy
        if copy.index is None or node.is_dir:
            return False
        pfd = copy.upper_dir(parent, reason)
        ust = self._upper_entry(pfd, name)
        fst = os.fstat(node.fd) if node.fd >= 0 else None
        if ust is not None and fst is not None and (ust.st_dev, ust.st_ino) == (fst.st_dev, fst.st_ino):
            return True
        return copy.copy_up_indexed(node, reason, parent, name)

    def _index_end(self, node: Node, path: bytes) -> None:
        """ovl_nlink_end: an indexed inode whose overlay nlink dropped to 0 loses its index
        entry (ovl_cleanup_index; with another upper link left, the kernel's "cleanup linked
        index" instead: the count is set to the upper links less the index entry)."""
        from .index import index_name, parse_nlink

        index = self.copy.index
        assert index is not None
        fd = node.fd
        if fd < 0:
            return
        st = os.fstat(fd)
        parsed = parse_nlink(index.get_nlink(fd))
        if parsed is None or parsed[0] != "U" or st.st_nlink + parsed[1] > 0:
            return
        if st.st_nlink != 1:
            log.warning("cleanup linked index (%r, nlink=%d)", node, st.st_nlink)
            index.set_nlink(fd, "U", -1)
            return
        raw = _sys.getxattr_at(fd, None, self.names.origin)
        if raw is None:
            return
        iname = index_name(raw)
        if index.remove(iname, st.st_ino):
            index.indexed.pop((st.st_dev, st.st_ino), None)
            self.trace.emit("index_remove", path=display(path), index=iname.decode())

    def remove(self, parent: Node, name: bytes, is_dir: bool) -> None:
        """unlink (is_dir False) or rmdir (True)."""
        copy, work = self.copy, self.work
        self.listings.changed()
        node, st = self.view.lookup(parent, name)
        if is_dir:
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if not self.stack.is_empty_dir(node.layer_dirs()):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
        elif node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        indexed = self._index_start(node, parent, name, "remove")
        need_whiteout = self._lower_has(parent, name)
        pfd = copy.upper_dir(parent, "remove")
        rel = node.relpath()
        in_upper = node.layer.is_upper
        if need_whiteout:
            old = work.whiteout(pfd, name, replace=in_upper)
            if old is not None:  # the old upper object now sits in work/ under that name
                self._remove_real(work.fd, old, is_dir)
            self.trace.emit("whiteout_create", path=display(rel))
        elif in_upper:
            self._remove_real(pfd, name, is_dir)
        if is_dir:
            self.stack.dirfds.forget(copy.upper, rel)
        elif in_upper:
            self._peer_changed(node)  # one link fewer
        self.inodes.detach(parent, name)
        if indexed:
            self._index_end(node, _child(parent, name))

    async def rename(self, parent: Node, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        copy = self.copy
        self.listings.changed()
        if flags & ~(_sys.RENAME_NOREPLACE | _sys.RENAME_EXCHANGE) or (
            flags & _sys.RENAME_NOREPLACE and flags & _sys.RENAME_EXCHANGE
        ):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        src, _ = self.view.lookup(parent, name)
        dst = self._exists(newparent, newname)
        if len(newname) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if self.stack.aufs:
            self._check_not_marker(newname)
        if src is dst:
            return
        exchange = bool(flags & _sys.RENAME_EXCHANGE)
        dst_pure = False
        if flags & _sys.RENAME_NOREPLACE and dst is not None:
            raise OSError(errno.EEXIST, "target exists")
        if exchange and dst is None:
            raise OSError(errno.ENOENT, "no target to exchange with")
        # A directory with lower content (ovl_type_merge_or_lower) moves only with
        # redirect_dir=on (ovl_can_move); else EXDEV, and `mv` copies.
        redirected: list[Node] = []
        for n in (src, dst if exchange else None):
            if n is not None and n.is_dir and (n.is_merged or not n.layer.is_upper):
                if self.redirect_dir:
                    redirected.append(n)
                    continue
                self.trace.emit(
                    "rename_exdev",
                    path=display(n.relpath()),
                    target=display(_child(newparent if n is src else parent, newname if n is src else name)),
                )
                raise OSError(errno.EXDEV, "directory has lower content")
        if dst is not None and not exchange:
            if src.is_dir and not dst.is_dir:
                raise OSError(errno.ENOTDIR, "target is not a directory")
            if not src.is_dir and dst.is_dir:
                raise OSError(errno.EISDIR, "target is a directory")
            # A target with lower content must be empty in the merged view; a pure-upper
            # one is left to the real rename (after the opaque marking below, as the kernel).
            dst_pure = dst.layer.is_upper and not dst.is_merged
            if dst.is_dir and not dst_pure and not self.stack.is_empty_dir(dst.layer_dirs()):
                raise OSError(errno.ENOTEMPTY, "target not empty")
        if copy.index is not None:  # the names the rename is about are the ones copied up
            names = [(parent, name)] + ([(newparent, newname)] if dst is not None else [])
            if await self._index_names_up(names, "rename") and (
                self._exists(parent, name) is not src or self._exists(newparent, newname) is not dst
            ):
                # a name changed while its copy-up was awaited: the rename starts over
                return await self.rename(parent, name, newparent, newname, flags)
            self._index_name_up(src, parent, name, "rename")
            if exchange and dst is not None:
                self._index_name_up(dst, newparent, newname, "rename")
        dst_indexed = dst is not None and not exchange and self._index_start(dst, newparent, newname, "rename")
        await copy.ensure_upper(src, "rename")
        if exchange:
            assert dst is not None
            await copy.ensure_upper(dst, "rename")
        # a metacopy file (its data below) is renamed by redirect too: ovl_rename's
        # ovl_set_redirect for ovl_type_merge_or_lower (a non-dir without upper data)
        for n in (src, dst if exchange else None):
            if n is not None and not n.is_dir and n.lowerdata is not None:
                redirected.append(n)
        opfd = copy.upper_dir(parent, "rename")
        old_needs_wo = not exchange and self._lower_has(parent, name)
        npfd = copy.upper_dir(newparent, "rename")
        opfd = parent.fd  # already upper: copying newparent up cannot have moved it
        # ovl_set_redirect, before the rename (a crash leaves a redirect that names the
        # directory's own lower place: harmless)
        redirects: dict[int, bytes] = {}
        for n in redirected:
            value = self._redirect_for(n, parent is newparent)
            if value is not None:
                if len(value) > self.redirect_max:  # ovl_get_redirect: userspace moves it
                    self.trace.emit("rename_exdev", path=display(n.relpath()), target=os.fsdecode(value))
                    raise OSError(errno.EXDEV, "redirect too long")
                try:
                    os.setxattr(_sys.proc_path(n.fd), self.names.redirect, value, follow_symlinks=True)
                except OSError as exc:  # the kernel falls back to EXDEV (a copy by mv)
                    raise OSError(errno.EXDEV, f"cannot set the redirect: {exc.strerror}") from None
                redirects[n.id] = value
        nst = self._upper_entry(npfd, newname)
        # ovl_rename's flags: the old name keeps a whiteout when a lower still has it
        # (RENAME_WHITEOUT, or by swapping with a whiteout already at the new name); a
        # directory cannot replace a whiteout, so it swaps with it and the whiteout goes.
        real_flags = _sys.RENAME_EXCHANGE if exchange else 0
        cleanup_whiteout = False
        if not exchange:
            new_is_whiteout = self._is_upper_whiteout(npfd, newname, nst)
            if old_needs_wo:
                real_flags = _sys.RENAME_EXCHANGE if new_is_whiteout else _sys.RENAME_WHITEOUT
            elif src.is_dir and new_is_whiteout:
                real_flags, cleanup_whiteout = _sys.RENAME_EXCHANGE, True
        # ovl_rename: a (pure-upper) directory that lands in a merged directory is made
        # opaque, so that lower content of its new name can never merge into it.
        old_path, new_path = display(_child(parent, name)), display(_child(newparent, newname))
        # (a directory with lower content gets its redirect instead)
        if src.is_dir and newparent.is_merged and src not in redirected:
            self._make_opaque(src.fd, None, new_path)  # the directory itself, via its fd
        if exchange and dst is not None and dst.is_dir and parent.is_merged and dst not in redirected:
            self._make_opaque(dst.fd, None, old_path)
        if not exchange and nst is not None and stat.S_ISDIR(nst.st_mode) and not dst_pure:
            self._clear_whiteouts(npfd, newname)  # the upper part of an empty merged dir
        _sys.renameat2(opfd, name, npfd, newname, real_flags)
        if cleanup_whiteout:
            os.unlink(name, dir_fd=opfd)
        if self.stack.aufs and not exchange:
            self._drop_upper_marker(npfd, newname, False, new_path)
        # redirect: the overlay.redirect written on the renamed directory (redirect_dir=on),
        # where its lower content still is; null when none was written
        extra: dict[str, Any] = {"redirect": os.fsdecode(redirects[src.id]) if src.id in redirects else None}
        if exchange and dst is not None and dst.id in redirects:
            extra["target_redirect"] = os.fsdecode(redirects[dst.id])
        self.trace.emit("rename", path=old_path, target=new_path, exchange=exchange, **extra)
        if parent is not newparent:  # ovl_rename: an object with an origin into another dir
            if has_origin(src.fd, self.names):
                set_impure(npfd, self.names)
            if exchange and dst is not None and has_origin(dst.fd, self.names):
                set_impure(opfd, self.names)
        if real_flags == _sys.RENAME_WHITEOUT:
            self.trace.emit("whiteout_create", path=old_path)
        elif not exchange and real_flags == _sys.RENAME_EXCHANGE:  # a whiteout was at the new name
            self.trace.emit("whiteout_remove", path=new_path)
            if not cleanup_whiteout:
                self.trace.emit("whiteout_create", path=old_path)
        old_rel = src.relpath()
        if src.is_dir:
            self.stack.dirfds.forget(copy.upper, old_rel)
        if dst is not None and dst.is_dir:
            self.stack.dirfds.forget(copy.upper, dst.relpath())
        for n in redirected:  # known objects below it keep their lower paths
            _pin_lower_paths(n)
        self.inodes.move(src, parent, name, newparent, newname, exchange=dst if exchange else None)
        if dst is not None and not exchange and not dst.is_dir:
            self._peer_changed(dst)  # one link fewer
        if dst_indexed:
            assert dst is not None
            self._index_end(dst, _child(newparent, newname))

    def _upper_redirect(self, node: Node) -> bytes | None:
        if not node.layer.is_upper or node.parent is None:
            return None
        return _sys.getxattr_at(node.fd, None, self.names.redirect)

    def _lower_hardlinked(self, node: Node) -> bool:
        """A non-directory whose lower file has several links: its redirect is absolute even
        within its directory, as its upper links may be in several (the kernel's
        ovl_need_absolute_redirect)."""
        if node.is_dir or node.lowerdata is None:
            return False
        try:
            return self.stack.lstat(*node.lowerdata).st_nlink > 1
        except OSError:
            return False

    def _redirect_for(self, node: Node, samedir: bool) -> bytes | None:
        """The ``overlay.redirect`` the kernel writes on directory *node* (already copied up)
        renamed within its parent (*samedir*) or elsewhere; None: its redirect stays
        (ovl_set_redirect). Same parent: the old name (relative); else the absolute path of
        its lower content, built from each ancestor's redirect or name up to the root or an
        absolute redirect (ovl_get_redirect)."""
        current = self._upper_redirect(node)
        absolute = not samedir or self._lower_hardlinked(node)  # ovl_need_absolute_redirect
        if current and (not absolute or current.startswith(b"/")):
            return None
        if not absolute:
            return node.name
        parts: list[bytes] = []
        n: Node | None = node
        while n is not None and n.parent is not None:
            part = self._upper_redirect(n) or n.name
            parts.append(part)
            if part.startswith(b"/"):
                break
            n = n.parent
        path = b"/".join(reversed(parts))
        return path if path.startswith(b"/") else b"/" + path

    # --- attributes and data ------------------------------------------------------------------

    def setattr_waits(self, node: Node, changes: dict[str, Any]) -> bool:
        """Whether ``setattr`` of *changes* may wait (a copy-up of file data, a truncation):
        an engine then serves it in a task; otherwise ``setattr_now`` answers at once."""
        return "size" in changes or not node.layer.is_upper

    def setattr_copying_now(self, node: Node, changes: dict[str, Any]) -> bool:
        """For an engine's inline path, when ``setattr_waits``: with ``metacopy=on``, copy
        up the metadata of a lower regular file without awaiting (no data to copy:
        ``CopyUp.copy_up_now``), so that ``setattr_now`` can follow. False, having done
        nothing, when that cannot be done so (then ``setattr`` in a task)."""
        copy = self._copyup
        if copy is None or not copy.metacopy or "size" in changes or node.layer.is_upper:
            return False
        if not stat.S_ISREG(node.mode):
            return False
        return copy.copy_up_now(node, _setattr_reason(changes)) is not None

    async def setattr(self, node: Node, changes: dict[str, Any], fh: int | None) -> os.stat_result:
        """Every change goes to the node's own object through its fd: an object renamed
        over or unlinked while open is changed itself (the kernel's overlay does the
        same), never what its name leads to now, and a symlink is never followed."""
        # a truncation needs the data of a metacopy file (ovl_setattr: ovl_copy_up_with_data)
        await self.copy.copy_up(node, _setattr_reason(changes), data="size" in changes)
        return self.setattr_now(node, changes, fh)

    def setattr_now(self, node: Node, changes: dict[str, Any], fh: int | None) -> os.stat_result:
        """``setattr`` of a node already in the upper layer (after its copy-up)."""
        if not node.layer.is_upper:
            raise OSError(errno.EIO, "setattr_now of an object not copied up")
        fd = node.fd
        if fd < 0:
            raise OSError(errno.EBADF, "no upper object")
        path, follow = _sys.fd_xattr_path(fd)  # the magic link: followed to the object only
        for other in self.handles.files_of(node):  # a copy-up made for an open was needed
            other.unused_copy_up = None
        if "size" in changes:
            h = self.handles[fh] if fh is not None else None
            if isinstance(h, OpenFile) and h.node is node and (h.flags & os.O_ACCMODE) != os.O_RDONLY:
                os.ftruncate(h.fd, changes["size"])
            else:
                if node.is_dir:
                    raise OSError(errno.EISDIR, "is a directory")
                if not stat.S_ISREG(node.mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                wfd = _sys.reopen(fd, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.ftruncate(wfd, changes["size"])
                finally:
                    os.close(wfd)
        if "uid" in changes or "gid" in changes:  # presented ids: to stored ones (EINVAL if unmapped)
            uid, gid = self.owners.store_ids(changes.get("uid"), changes.get("gid"))
            self.owners.set_owner(path, follow, uid, gid)
        if "mode" in changes:
            _sys.fchmod_fd(fd, stat.S_IMODE(changes["mode"]))
            self.owners.after_chmod(path, follow, changes["mode"])
        if "atime_ns" in changes or "mtime_ns" in changes:
            _sys.futimens_fd(fd, changes.get("atime_ns"), changes.get("mtime_ns"))
        self._peer_changed(node)
        return self.view.getattr(node)

    def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        h = self.handles[fh]
        assert isinstance(h, OpenFile)
        if h.unused_copy_up is not None:
            h.unused_copy_up = None
        n = os.write(h.fd, data) if h.flags & os.O_APPEND else os.pwrite(h.fd, data, offset)
        self._peer_changed(h.node)  # its size and mtime
        return n

    def _data_handle(self, fh: int) -> OpenFile:
        h = self.handles[fh]
        if not isinstance(h, OpenFile):
            raise OSError(errno.EBADF, "not an open file")
        return h

    def fallocate_now(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with any mode on the handle's real file. A handle that may write
        was copied up when it was opened (as for a write), so this is always an upper
        file; a read-only one fails EBADF on the real fd, as the kernel's does. Blocks:
        for ranges up to ``INLINE_MAX`` (an engine awaits ``fallocate`` for larger ones)."""
        h = self._data_handle(fh)
        h.unused_copy_up = None
        _sys.fallocate(h.fd, mode, offset, length)
        self._peer_changed(h.node)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """``fallocate_now`` in a thread: preallocating or zeroing a large range (on a slow
        disk, say) must not stall other requests."""
        import trio  # first used here: see copyup.py

        await trio.to_thread.run_sync(self.fallocate_now, fh, mode, offset, length)

    def copy_file_range_now(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int, flags: int) -> int:
        """copy_file_range(2) between two handles of this mount: the source may be a lower
        file opened read-only, the destination is an upper one (opened for writing, so
        copied up). Both real files are used at explicit offsets. Blocks: for lengths up
        to ``INLINE_MAX`` (an engine awaits ``copy_file_range`` for longer ones)."""
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range takes no flags")
        src, dst = self._data_handle(fh_in), self._data_handle(fh_out)
        dst.unused_copy_up = None
        n = _sys.copy_range(src.fd, off_in, dst.fd, off_out, length)
        self._peer_changed(dst.node)
        return n

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int, flags: int) -> int:
        """``copy_file_range_now`` in a thread: a large copy must not stall other requests."""
        import trio  # first used here: see copyup.py

        return await trio.to_thread.run_sync(self.copy_file_range_now, fh_in, off_in, fh_out, off_out, length, flags)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """In a worker thread: syncing a large dirty file takes seconds, and other requests
        go on meanwhile (the kernel keeps the file, so its handle, until fsync returns)."""
        import trio

        h = self.handles[fh]
        if isinstance(h, OpenFile) and not self.volatile:  # volatile: fsync is a no-op, as ovl_fsync
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, h.fd)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """fsync of a directory: the upper directory is synced, in a worker thread, as the
        kernel's ``ovl_dir_fsync`` does (a program that fsyncs a directory after creating
        or renaming in it wants the entry durable); nothing for a directory with no upper
        part, nor with ``-o volatile``."""
        import trio

        h = self.handles[fh]
        if not isinstance(h, DirHandle) or self.volatile:
            return
        node = h.node
        if not node.layer.is_upper or node.fd < 0:
            return
        fd = _sys.reopen(node.fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        finally:
            os.close(fd)

    # --- xattrs -------------------------------------------------------------------------------

    async def setxattr(self, node: Node, name: str, value: bytes, flags: int = 0) -> None:
        """Copy up, then set: a flagged set (XATTR_CREATE/XATTR_REPLACE) that fails does so
        after the copy-up, as the kernel's ovl_xattr_set."""
        copy = self.copy
        if name == OVERRIDE_XATTR:
            raise OSError(errno.EPERM, "the stored owner is set by chown, not by its xattr")
        await copy.copy_up(node, "setxattr")
        for h in self.handles.files_of(node):
            h.unused_copy_up = None
        p, follow = _sys.fd_xattr_path(node.fd)
        os.setxattr(p, self.names.to_real(name), value, flags, follow_symlinks=follow)
        self._peer_changed(node)

    async def removexattr(self, node: Node, name: str) -> None:
        copy = self.copy
        self.view.getxattr(node, name)  # ENODATA before any copy-up, as the kernel does
        await copy.copy_up(node, "removexattr")
        for h in self.handles.files_of(node):
            h.unused_copy_up = None
        p, follow = _sys.fd_xattr_path(node.fd)
        os.removexattr(p, self.names.to_real(name), follow_symlinks=follow)
        self._peer_changed(node)


def _pin_lower_paths(node: Node) -> None:
    """Before *node* (a directory with lower content) is renamed by redirect: every known
    object below it that a lower layer serves keeps its lower path (its relpath changes)."""
    todo = list((node.children or {}).values())
    while todo:
        n = todo.pop()
        lowers = [x for x in (n.layer, *n.dirs) if not x.is_upper]
        if n.lpaths is None and lowers:
            old = n.relpath()
            n.lpaths = {x.index: old for x in lowers}
        todo.extend((n.children or {}).values())


def _child(parent: Node, name: bytes) -> bytes:
    rel = parent.relpath()
    return rel + b"/" + name if rel else name


_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "other")


def _setattr_reason(changes: dict[str, Any]) -> str:
    for key, reason in (
        ("size", "truncate"),
        ("uid", "chown"),
        ("gid", "chown"),
        ("mode", "chmod"),
        ("atime_ns", "utimes"),
        ("mtime_ns", "utimes"),
    ):
        if key in changes:
            return reason
    return "setattr"
