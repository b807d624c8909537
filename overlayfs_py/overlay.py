"""OverlayFS semantics of the read side, one method per operation, free of FUSE types.

Methods take nodes and plain values, return plain values (``Node``, ``os.stat_result``,
ints, bytes) and raise ``OSError``; an engine (``fs.py`` for pyfuse3) turns that into
replies. ``Overlay`` resolves names to nodes, lists directories, reads attributes, data and
xattrs, and opens files (an open for writing copies up first). The write path is
``write.WritePath``, a separate class that uses this one for lookups. Both receive their
collaborators (layer stack, inode table, handle table, listings, owners, tracer, copy-up)
in their constructors; ``mount.build_overlay`` wires them together.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from . import _sys, trace
from .copyup import CopyUp, writable
from .dircache import Listing, ListingCache
from .handles import OPEN_PASS, DirHandle, HandleTable, OpenFile, open_real
from .idmap import OVERRIDE_XATTR, carries_override
from .index import Index
from .inodes import DEAD, InodeTable, Node, real_key, split_key
from .layers import Hit, Layer, LayerStack
from .ownership import Owners
from .privilege import initial_userns, process_privileged
from .trace import Tracer, display
from .whiteout import XattrNames, decode_origin, is_whiteout_at, metacopy_at

log = logging.getLogger(__name__)

NAME_MAX = 255


@dataclass(frozen=True)
class Caller:
    """Who made a request (from the engine's request context)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


def may_list_trusted(caller: Caller) -> bool:
    """Whether *caller* is shown ``trusted.*`` names: with CAP_SYS_ADMIN in the initial user
    namespace, as the kernel's ``ovl_can_list`` (and ext4) decide; by uid 0 when the caller's
    process cannot be asked (outside this server's pid namespace, or gone)."""
    allowed = process_privileged(caller.pid)
    return caller.uid == 0 if allowed is None else allowed


@dataclass
class Entry:
    """A directory entry for readdir: the node (None when the kernel must not get one) and attrs."""

    name: bytes
    node: Node | None
    st: os.stat_result
    ino: int
    nlink: int


def new_inode_table(stack: LayerStack, fd_cap: int = 1 << 62) -> InodeTable:
    """The inode table of *stack*: its root merges ``stack.merge_root()`` and holds a dup of
    the top layer's fd; at most *fd_cap* other node fds are held at once."""

    def opener(node: Node) -> int:
        """A node's object opened again at its name in its layer (never followed)."""
        path = node.path_in(node.layer)
        if not path:
            return os.dup(node.layer.fd)
        pdir, _, name = path.rpartition(b"/")
        return _sys.open_node(stack.dir_fd(node.layer, pdir), name)

    top = stack.layers[0]
    root_st = os.fstat(top.fd)
    return InodeTable(
        top,
        stack.merge_root(),
        root_st.st_mode,
        stack.xino(top, root_st.st_ino),
        root_fd=os.dup(top.fd),
        fd_cap=fd_cap,
        opener=opener,
    )


def _nothing() -> None:
    return None


_STAT_FIELDS = tuple(n for n in dir(os.stat_result) if n.startswith("st_"))


def with_blocks(st: os.stat_result, blocks: int) -> os.stat_result:
    """*st* reporting *blocks* (a metacopy file: its data file's st_blocks, as ovl_getattr)."""
    if st.st_blocks == blocks:
        return st
    extra = {n: getattr(st, n) for n in _STAT_FIELDS}
    extra["st_blocks"] = blocks
    return os.stat_result(tuple(st), extra)


def _open_reason(flags: int) -> str:
    """Why an open copies up, for the trace."""
    return "truncate" if flags & os.O_TRUNC else "open-for-write"


class Overlay:
    """The merged filesystem's read side: lookups, attributes, listings, data, xattrs."""

    def __init__(
        self,
        stack: LayerStack,
        names: XattrNames,
        inodes: InodeTable,
        handles: HandleTable,
        listings: ListingCache,
        owners: Owners,
        tracer: Tracer,
        copyup: CopyUp | None = None,
        *,
        on_out_of_fds: Callable[[], None] = _nothing,
        index: Index | None = None,
    ) -> None:
        """*copyup*: None for a read-only overlay. *on_out_of_fds*: called when a node
        cannot get its descriptor (the node budget asks the kernel to drop entries)."""
        self.stack = stack
        self.names = names
        self.inodes = inodes
        self.handles = handles
        self.listings = listings
        self.owners = owners
        self.trace = tracer
        self._copyup = copyup
        # index=on (index.py): the workdir's index, also on a read-only mount with an upper
        self.index = index if index is not None else (copyup.index if copyup is not None else None)
        self._on_out_of_fds = on_out_of_fds
        # open_by_handle_at needs CAP_DAC_READ_SEARCH in the initial user namespace
        self._can_open_by_handle = os.geteuid() == 0 and initial_userns()
        self._warned_fds = False

    @property
    def writable(self) -> CopyUp:
        """The copy-up of a writable overlay; OSError EROFS on a read-only one."""
        return writable(self._copyup)

    def destroy(self) -> None:
        self.handles.close_all()
        self.inodes.close()
        self.stack.close()
        if self.index is not None:
            self.index.close()

    # --- identity -------------------------------------------------------------------------

    def _st_ino(self, parent: Node, name: bytes, hits: list[Hit]) -> int:
        """The st_ino the kernel reports (fs/overlayfs/inode.c, ovl_getattr, same-fs case):
        the topmost object's inode, except that an upper object with a lower origin reports
        the origin's: a merged dir its first lower dir, a copied-up file its lower file
        (unless that file has other hard links, whose copy-up broke the link)."""
        top = hits[0]
        if not top.layer.is_upper:
            return self.stack.xino(top.layer, top.st.st_ino)
        if stat.S_ISDIR(top.st.st_mode):
            if len(hits) > 1:
                return self.stack.xino(hits[1].layer, hits[1].st.st_ino)
            return top.st.st_ino
        origin = self._origin_of(parent, name)
        if origin is not None and origin[1].st_nlink == 1:
            return self.stack.xino(origin[0], origin[1].st_ino)
        if origin is not None and self._indexed_upper(parent, name, top, origin[1]):
            return self.stack.xino(origin[0], origin[1].st_ino)  # ovl_getattr: OVL_INDEX
        return top.st.st_ino

    def _indexed_upper(self, parent: Node, name: bytes, top: Hit, origin_st: os.stat_result) -> bool:
        """index=on: whether the upper non-directory *top* is its origin's index entry
        (ovl_lookup_index with an upper: the entry must be that inode); if so it is
        recorded as indexed (its overlay nlink is kept in ``overlay.nlink``)."""
        index = self.index
        if index is None:
            return False
        from .index import index_name

        pfd = parent.fd if parent.layer.is_upper and parent.fd >= 0 else None
        if pfd is None:
            return False
        raw = _sys.getxattr_at(pfd, name, self.names.origin)
        if raw is None:
            return False
        try:
            ist = _sys.lstat_at(index.fd, index_name(raw))
        except OSError:
            return False
        if (ist.st_dev, ist.st_ino) != (top.st.st_dev, top.st.st_ino):
            return False
        index.indexed[(ist.st_dev, ist.st_ino)] = origin_st.st_nlink
        return True

    def _index_entry(self, top: Hit) -> tuple[int, os.stat_result] | None:
        """index=on, a lower non-directory with several links: its index entry (an O_PATH fd
        and its lstat), which serves it (ovl_lookup_index without an upper); None when it
        has none; EIO for a whiteout or another type there (the kernel's "bad index")."""
        index = self.index
        assert index is not None
        from .index import encode_fh, index_name

        fd = _sys.open_beneath(top.layer.fd, top.path, _sys.O_PATH)
        try:
            rec = encode_fh(fd, self.stack.fs_uuid(top.layer))
        finally:
            os.close(fd)
        if rec is None:
            return None
        iname = index_name(rec)
        ist = index.entry(iname, top.st.st_mode)
        if ist is None:
            return None
        ifd = index.open(iname)
        fst = os.fstat(ifd)
        if (fst.st_dev, fst.st_ino) != (ist.st_dev, ist.st_ino):
            os.close(ifd)
            raise OSError(errno.ESTALE, "the index entry changed during its lookup")
        index.indexed[(fst.st_dev, fst.st_ino)] = top.st.st_nlink
        return ifd, fst

    def _is_metacopy(self, fd: int) -> bool:
        """Whether the file of *fd* carries ``overlay.metacopy`` (its data is below it)."""
        try:
            os.getxattr(_sys.proc_path(fd), self.names.metacopy)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                return False
            raise
        return True

    def _origin_of(self, parent: Node, name: bytes) -> tuple[Layer, os.stat_result] | None:
        """The lower object an upper non-directory was copied up from, via its origin record."""
        upper = self.stack.upper
        assert upper is not None
        # the parent serves an upper child, so its own fd is its upper directory
        pfd = parent.fd if parent.layer.is_upper and parent.fd >= 0 else self.stack.dir_fd(upper, parent.relpath())
        raw = _sys.getxattr_at(pfd, name, self.names.origin)
        if raw is None:
            return None
        fh = decode_origin(raw)
        if fh is None:
            return None
        htype, handle = fh
        record_uuid = raw[5:21]
        # The common case: the origin still sits at the same path in a lower layer.
        for hit in self.stack.resolve(parent.layer_dirs()[1:], name)[:1]:
            if stat.S_ISDIR(hit.st.st_mode) or not self.stack.origin_in(hit.layer, record_uuid):
                break
            try:
                fd = _sys.open_beneath(hit.layer.fd, hit.path, _sys.O_PATH)
            except OSError:
                break
            try:
                if _sys.name_to_handle(fd) == (htype, handle):
                    return hit.layer, hit.st
            finally:
                os.close(fd)
        # Renamed since: decode the handle on each lower filesystem (needs CAP_DAC_READ_SEARCH),
        # only on those whose UUID is the record's, as the kernel (ovl_check_origin_fh): a
        # handle of one filesystem may decode to another object on another.
        if self._can_open_by_handle:
            for layer in self.stack.lowers:
                if not self.stack.origin_in(layer, record_uuid):
                    continue
                try:
                    # open_by_handle_at wants a real (not O_PATH) fd on the filesystem.
                    mfd = os.open(_sys.proc_path(layer.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        fd = _sys.open_by_handle(mfd, htype, handle)
                    finally:
                        os.close(mfd)
                except OSError:
                    continue
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                if st.st_dev == layer.dev:
                    return layer, st
        return None

    # --- lookup ---------------------------------------------------------------------------

    def lookup(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """Resolve *name* in *parent*; the returned node is not yet referenced (call ``inodes.ref``)."""
        if len(name) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if parent.key is DEAD:  # removed while a process holds it: empty, like the kernel's
            raise OSError(errno.ENOENT, "directory was removed")
        hits = self.stack.resolve(parent.layer_dirs(), name)
        if not hits:
            raise OSError(errno.ENOENT, "no such entry")
        top = hits[0]
        node = self._node_for(parent, name, hits)
        if self.index is not None and not node.is_dir and node.layer is not top.layer or node.id in self.inodes.pinned:
            return node, self.getattr(node)  # served by its index entry: its attributes
        if top.data is not None:  # a metacopy file: the blocks of its data (ovl_getattr)
            return node, with_blocks(top.st, top.data.st.st_blocks)
        return node, top.st

    def made(self, parent: Node, name: bytes, layer: Layer, pfd: int, new: bool = False) -> tuple[Node, os.stat_result]:
        """``lookup`` of an object the write path has just made at *name* in *layer*'s
        directory *pfd* of *parent* (the upper one): a lookup would find it there and look
        no further (a non-directory ends the walk; a new directory has nothing below it: its
        name was free in the merged view, or it replaced a whiteout and was made opaque),
        so the layers below are not asked again. *new*: a new object (not a new name of
        one): it has no origin record, so it reports its own st_ino."""
        st = _sys.lstat_at(pfd, name)
        if metacopy_at(pfd, name, st, self.names):  # a new name of a metacopy file: its data below
            return self.lookup(parent, name)
        ppath = parent.path_in(layer)
        hit = Hit(layer, st, ppath + b"/" + name if ppath else name)
        return self._node_for(parent, name, [hit], ino=st.st_ino if new else None), st

    def _same_data(self, lowerdata: tuple[Layer, bytes] | None, top: Hit) -> bool:
        """Whether a node's data file (``Node.lowerdata``) is the one *top* (a hit of one of
        its names) reads: the same place, or, for a name of a hard-linked lower file (index=on:
        its metacopy index entry linked at several names), the same lower inode by another
        name."""
        data = top.data
        if lowerdata is None or data is None:
            return lowerdata is None and data is None
        if (lowerdata[0], lowerdata[1]) == (data.layer, data.path):
            return True
        if lowerdata[0] is not data.layer or data.st.st_nlink <= 1:
            return False
        try:
            st = self.stack.lstat(*lowerdata)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (data.st.st_dev, data.st.st_ino)

    def _node_for(
        self, parent: Node, name: bytes, hits: list[Hit], prel: bytes | None = None, ino: int | None = None
    ) -> Node:
        """The node for *name* in *parent* found as *hits*; *prel*: the parent's relpath, if
        the caller has it; *ino*: the st_ino it reports, if the caller knows it."""
        top = hits[0]
        mode = top.st.st_mode
        is_dir = stat.S_ISDIR(mode)
        dirs = tuple(h.layer for h in hits) if is_dir else ()
        existing = parent.child(name)
        data = (top.data.layer, top.data.path) if top.data is not None else None
        if (
            existing is not None
            and existing.layer is top.layer
            and existing.dirs == dirs
            and self._same_data(existing.lowerdata, top)
            and stat.S_IFMT(existing.mode) == stat.S_IFMT(mode)
            and self._same_object(existing, top)
        ):
            existing.mode = mode
            return existing
        key = None
        if ino is None:
            ino = self._st_ino(parent, name, hits)
        # index=on: the names of a hard-linked lower inode are one node (ovl_hash_bylower),
        # served by the inode's index entry once it has one
        lower_links = self.index is not None and not is_dir and not top.layer.is_upper and top.st.st_nlink > 1
        if lower_links:
            served = self._index_entry(top)
            if served is not None:
                ifd, ist = served
                key = real_key(ist.st_dev, ist.st_ino)
                shared = self.inodes.by_key(key)
                if shared is not None:
                    os.close(ifd)
                    if shared is not existing:
                        self.inodes.add_alias(shared, parent, name)
                    return shared
                try:
                    node = self.inodes.add(parent, name, ist.st_mode, top.layer, dirs, ino, key, ifd)
                except BaseException:
                    os.close(ifd)
                    raise
                self.inodes.pinned.add(node.id)
                if stat.S_ISREG(ist.st_mode) and self._is_metacopy(ifd):
                    # a metacopy index entry (the kernel's, with metacopy=on): its data is
                    # the lower file it serves (ovl_lookup_index keeps the lower as lowerdata)
                    if not self.stack.metacopy:
                        raise OSError(errno.EPERM, "refusing to follow a metacopy index entry (metacopy=off)")
                    node.lowerdata = (top.layer, top.path)
                return node
        if not is_dir and (top.layer.is_upper or self.stack.upper is None or lower_links):
            # One inode for every name of a real inode, as the kernel hashes by it, unless
            # the names report different st_ino: the kernel then has two overlay inodes too
            # (an upper object copied up without an origin record, as with userxattr on a
            # symlink or fifo, keeps its lower st_ino only under its first name; the names
            # found later report the upper st_ino and share the second one). The second
            # node is keyed ``split_key``; ``InodeTable.peer`` finds one from the other.
            key = real_key(top.st.st_dev, top.st.st_ino)
            free = None
            for k in (key, split_key(key)):
                shared = self.inodes.by_key(k)
                if shared is None or shared is existing:
                    free = k if free is None else free
                elif shared is not existing and shared.ino == ino and self._same_data(shared.lowerdata, top):
                    self.inodes.add_alias(shared, parent, name)
                    shared.mode = mode
                    if top.layer.is_upper and not shared.layer.is_upper and shared.id in self.inodes.pinned:
                        # index=on: a node served by its index entry (a lower name looked up
                        # first) and an upper name linked to that entry: the inode is upper,
                        # as after a link-up (CopyUp._link_up), and this name leads to it
                        shared.layer = top.layer
                        self.inodes.set_primary(shared, parent, name)
                        self.inodes.pinned.discard(shared.id)
                    return shared
            key = free
        # The first hit is in the parent's own layer at the parent's own path (no redirect
        # applies before a first hit): open it in the parent's own fd, no path walk.
        pfd = parent.fd if top.layer is parent.layer and parent.fd >= 0 else None
        fd = self._node_fd(top.layer, top.path, top.st, pfd, name)
        try:
            node = self.inodes.add(parent, name, mode, top.layer, dirs, ino, key, fd)
        except BaseException:
            os.close(fd)
            raise
        if data is not None:
            node.lowerdata = data
        rel = None
        for h in hits:
            if not h.layer.is_upper:
                if rel is None:
                    if prel is None:
                        prel = parent.relpath()
                    rel = prel + b"/" + name if prel else name
                if h.path != rel:  # a redirect: remember where it really is
                    node.lpaths = {x.layer.index: x.path for x in hits if not x.layer.is_upper}
                    break
        return node

    def _node_fd(
        self, layer: Layer, path: bytes, st: os.stat_result, pfd: int | None = None, name: bytes | None = None
    ) -> int:
        """A new node's fd: O_PATH|O_NOFOLLOW of the object at *path* in *layer* (or of *name*
        in directory fd *pfd*), which must be the object the lookup found (*st*); ESTALE if
        the name changed in between."""
        if not path:
            fd = os.dup(layer.fd)
        else:
            if pfd is None or name is None:
                pdir, _, name = path.rpartition(b"/")
                pfd = self.stack.dir_fd(layer, pdir)
            try:
                fd = _sys.open_node(pfd, name)
            except OSError as exc:
                # out of descriptors (the table's cap is above what is left): give some
                # node fds up and try once more
                if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self.inodes.evict(64):
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        self._out_of_fds()
                    raise
                fd = _sys.open_node(pfd, name)
        fst = os.fstat(fd)
        if fst.st_ino != st.st_ino or fst.st_dev != st.st_dev or stat.S_IFMT(fst.st_mode) != stat.S_IFMT(st.st_mode):
            os.close(fd)
            raise OSError(errno.ESTALE, "the object changed during its lookup")
        return fd

    def _out_of_fds(self) -> None:
        if not self._warned_fds:
            self._warned_fds = True
            log.warning(
                "out of file descriptors (%d live nodes, %d node fds held, none could be given up): "
                "lookups fail with EMFILE until the kernel forgets some (see docs/performance.md)",
                len(self.inodes),
                self.inodes.held,
            )
        self._on_out_of_fds()

    def _same_object(self, node: Node, top: Hit) -> bool:
        """Whether an existing node still serves the object *top* found. Lower layers never
        change; an upper non-directory is known by its inode (its key). A node left without
        an fd (a failed copy-up refresh) is replaced."""
        if node.fd < 0:
            return False
        if not top.layer.is_upper or node.is_dir:
            return True
        if node.key is not None:
            return node.key[1] == top.st.st_dev and node.key[2] == top.st.st_ino
        try:
            fst = os.fstat(node.fd)
        except OSError:
            return False
        return fst.st_ino == top.st.st_ino and fst.st_dev == top.st.st_dev

    # --- attributes -----------------------------------------------------------------------

    def getattr(self, node: Node) -> os.stat_result:
        """fstat of the node's own fd: its object even when unlinked or renamed over. A
        metacopy file reports the st_blocks of its data file (the kernel's ovl_getattr)."""
        st = os.fstat(node.fd)
        node.mode = st.st_mode
        data = node.lowerdata
        if data is not None:
            return with_blocks(st, self.stack.lstat(*data).st_blocks)
        return st

    def presented_owner(self, node: Node | None, st: os.stat_result) -> tuple[int, int, int]:
        """(uid, gid, mode) a reply shows for *node* (lstat *st*): its stored owner (the
        override, where its layer honours one) through the mount's maps."""
        if node is None or node.fd < 0 or not (self.owners.honours(node.layer) and carries_override(st.st_mode)):
            return self.owners.presented(None, False, st, None)
        return self.owners.presented(*_sys.fd_xattr_path(node.fd), st, node.layer)

    def nlink(self, node: Node, st: os.stat_result) -> int:
        # ovl_getattr: "nlink=1 seems to pacify 'find' and other utilities" for merge dirs.
        if node.is_dir and node.is_merged:
            return 1
        index = self.index
        if index is not None and not node.is_dir:
            lower_nlink = index.indexed.get((st.st_dev, st.st_ino))
            if lower_nlink is not None and node.fd >= 0:  # indexed: the overlay nlink (ovl_get_nlink)
                from .index import nlink_of

                return nlink_of(index.get_nlink(node.fd), st.st_nlink, lower_nlink, st.st_nlink)
        return st.st_nlink

    # --- reading --------------------------------------------------------------------------

    def readlink(self, node: Node) -> bytes:
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        return _sys.readlink_fd(node.fd)

    @staticmethod
    def _open_writes(node: Node, flags: int) -> bool:
        """The kernel's ovl_open_need_copy_up: write access or O_TRUNC, not a special file."""
        return ((flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)) and (
            stat.S_ISREG(node.mode) or stat.S_ISLNK(node.mode)
        )

    def open_copies_up(self, node: Node, flags: int) -> bool:
        """Whether opening *node* with *flags* may copy it up (may await): an object not in
        the upper layer yet, or a metacopy file (its data), opened for writing."""
        return (not node.layer.is_upper or node.lowerdata is not None) and self._open_writes(node, flags)

    async def open(self, node: Node, flags: int, caller: Caller) -> int:
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if not self.open_copies_up(node, flags):
            return self.open_now(node, flags)
        copied = await self.writable.copy_up(node, _open_reason(flags), data=True)
        return self._open_copied(node, flags, copied)

    def open_copying_now(self, node: Node, flags: int) -> int | None:
        """``open`` of an object it copies up, without awaiting (``CopyUp.copy_up_now``: a
        small regular file no task is copying up); None, having done nothing, when it
        cannot be done so: then ``open``."""
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        copied = self.writable.copy_up_now(node, _open_reason(flags), data=True)
        if copied is None:
            return None
        return self._open_copied(node, flags, copied)

    def _open_copied(self, node: Node, flags: int, copied: bool) -> int:
        fd = open_real(node, flags & OPEN_PASS)
        h = OpenFile(fd, node, flags)
        if copied and not flags & os.O_TRUNC:  # watch for a copy-up nobody needed
            h.unused_copy_up = (trace.current(), os.fstat(fd).st_size)
        return self.handles.add(h)

    def open_now(self, node: Node, flags: int, lazy: bool = False) -> int:
        """``open`` when it needs no copy-up (read-only and no O_TRUNC, or a special file,
        or an object already upper): never awaits, so an engine calls it inline. *lazy*:
        the real file is opened on first use only (an engine whose kernel reads and writes
        a backing file itself may never need it)."""
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        if self._copyup is None and self._open_writes(node, flags):
            raise OSError(errno.EROFS, "read-only overlay")
        fd = -1 if lazy and not flags & os.O_TRUNC else open_real(node, flags & OPEN_PASS)
        return self.handles.add(OpenFile(fd, node, flags))

    def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self.handles[fh]
        assert isinstance(h, OpenFile)
        return os.pread(h.fd, size, offset)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE on the real file (the kernel's ovl_llseek asks the real
        file too): a sparse file's holes show through, in any layer. The handle's own fd
        position is never used for data (pread/pwrite), so moving it does no harm."""
        h = self.handles[fh]
        if not isinstance(h, OpenFile):
            raise OSError(errno.EBADF, "not an open file")
        if whence not in (_sys.SEEK_DATA, _sys.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE reach the server")
        return os.lseek(h.fd, offset, whence)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        if isinstance(h, OpenFile):
            h.close()
            if h.unused_copy_up is not None:  # opened for write, closed unchanged
                who, size = h.unused_copy_up
                self.trace.emit("copy_up_unused", who=who, path=display(h.node.relpath()), bytes=size)

    # --- directories ----------------------------------------------------------------------

    def opendir(self, node: Node) -> int:
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return self.handles.add(DirHandle(node))

    def _listing(self, h: DirHandle) -> list[tuple[bytes, Layer]]:
        node = h.node
        if node.dead:
            return [(b".", node.layer), (b"..", node.layer)]
        if node.is_merged:
            filter_wo = True
        else:
            filter_wo = self.stack.real_dir_filters_whiteouts(node.layer, node.path_in(node.layer))
        h.real = not filter_wo
        return [(b".", node.layer), (b"..", node.layer)] + self.stack.list_merged(node.layer_dirs(), filter_wo)

    def listing(self, fh: int, start: int):
        """``readdir`` for one reply: out of fds for new nodes mid-listing (EMFILE/ENFILE)
        ends the reply where it is, and the kernel asks again from the next offset; an
        error only when nothing was given yet. Both engines answer READDIR from this."""
        entries = self.readdir(fh, start)
        given = False
        while True:
            try:
                item = next(entries)
            except StopIteration:
                return
            except OSError as exc:
                if given and exc.errno in (errno.EMFILE, errno.ENFILE):
                    return
                raise
            given = True
            yield item

    def readdir(self, fh: int, start: int):
        """Yield ``(index, Entry)`` from position *start*; the listing is taken at start 0
        (from the listing cache while nothing changed, else merged anew)."""
        h = self.handles[fh]
        assert isinstance(h, DirHandle)
        if start == 0 or h.names is None:
            listing = self.listings.get(h.node.id)
            if listing is None:
                names = self._listing(h)
                listing = Listing(names, h.real)
                self.listings.put(h.node.id, listing)
            h.names, h.real, h.lower_st = listing.names, listing.real, listing.lower_st
        node = h.node
        for i in range(start, len(h.names)):
            name, layer = h.names[i]
            if name == b".":
                st = self.getattr(node)
                yield i, Entry(name, None, st, node.ino, self.nlink(node, st))
            elif name == b"..":
                yield i, self._dotdot(node, h.real)
            else:
                entry = self._dir_entry(node, name, layer, h.lower_st)
                if entry is not None:
                    yield i, entry

    def _dotdot(self, node: Node, real: bool) -> Entry:
        """``..`` as the kernel lists it (ovl_iterate_real, ovl_cache_update): a raw-listed
        directory whose parent is merged, or a merge-listed one whose parent is an upper
        directory with a lower part (an origin: not the root), shows the overlay parent's
        st_ino; otherwise the raw ``..`` entry of the topmost layer shows through (always so
        for the root), with xino remapped by the layer of the raw-listed directory itself
        or by the topmost layer of the merge-listed one's parent (none for an upper one)."""
        parent = node.parent
        if parent is not None and (
            parent.is_merged if real else (parent.parent is not None and parent.layer.is_upper and parent.is_merged)
        ):
            st = self.getattr(parent)
            return Entry(b"..", None, st, parent.ino, self.nlink(parent, st))
        dfd = self.stack.dir_fd(node.layer, node.path_in(node.layer))
        st = _sys.lstat_at(dfd, b"..")
        ino = st.st_ino
        if parent is None:  # a layer root may be a mount root: its own filesystem's ``..``
            ino = _sys.raw_dotdot_ino(dfd) or ino
        remap = node.layer if real or parent is None else parent.layer
        return Entry(b"..", None, st, self.stack.xino(remap, ino), st.st_nlink)

    def _dir_entry(self, parent: Node, name: bytes, layer: Layer, lower_st: dict | None = None) -> Entry | None:
        fast = self._listed_nondir(parent, name, layer, lower_st)
        if fast is not None:
            return fast
        try:
            child, st = self.lookup(parent, name)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return self._nodeless_entry(parent, name, layer)
            if exc.errno in (errno.EPERM, errno.EIO) and not self._readdir_looks_up(parent, layer):
                # a metacopy file that cannot be followed (metacopy=off, no data below):
                # the kernel lists it with its own d_ino, not looking it up (ovl_calc_d_ino)
                return self._nodeless_entry(parent, name, layer)
            if exc.errno != errno.ENOENT:
                raise
            # Listed but not found: a whiteout the kernel's readdir shows too (in a raw
            # listing, or an xattr whiteout outside an opaque=x dir). It gets no node.
            try:
                st = _sys.lstat_at(self.stack.dir_fd(layer, parent.path_in(layer)), name)
            except FileNotFoundError:
                return None  # vanished meanwhile
            return Entry(name, None, st, self.stack.xino(layer, st.st_ino), st.st_nlink)
        return Entry(name, child, st, child.ino, self.nlink(child, st))

    def _listed_nondir(self, parent: Node, name: bytes, layer: Layer, lower_st: dict | None) -> Entry | None:
        """The fast path of a listing: the merge already found *name* topmost in *layer*
        and not whited out, so a non-directory there is the answer (a full lookup would
        stat every layer again). Directories, whiteouts and possible xattr whiteouts
        (the kernel's readdir/lookup quirks) take the full lookup: None."""
        ppath = parent.path_in(layer)
        st = lower_st.get(name) if lower_st is not None else None
        if st is None:
            try:
                dfd = self.stack.dir_fd(layer, ppath)
                st = _sys.lstat_at(dfd, name)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISDIR(st.st_mode) or is_whiteout_at(dfd, name, st, self.names):
                return None
            try:
                if metacopy_at(dfd, name, st, self.names):
                    return None  # its data file is found by a full lookup
            except OSError:
                return None  # a malformed record: the full lookup fails the kernel's way
            if lower_st is not None and not layer.is_upper:
                lower_st[name] = st  # a lower object never changes while mounted
        # without a redirect above it, ppath is the parent's relpath: _node_for need not walk it again
        try:
            node = self._node_for(
                parent,
                name,
                [Hit(layer, st, ppath + b"/" + name if ppath else name)],
                prel=ppath if parent.lpaths is None else None,
            )
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return self._nodeless_entry(parent, name, layer)
            raise
        if self.index is not None and node.layer is not layer or node.id in self.inodes.pinned:
            st = self.getattr(node)  # index=on: served by its index entry (or its upper link)
        return Entry(name, node, st, node.ino, self.nlink(node, st))

    def _readdir_looks_up(self, parent: Node, layer: Layer) -> bool:
        """Whether the kernel's readdir of *parent* looks up an entry listed by *layer*
        (ovl_calc_d_ino): with xino, or an upper entry of an impure directory. A failed
        lookup there fails the listing (ovl_cache_update), elsewhere the entry is listed."""
        if self.stack.xino_bits:
            return True
        if not layer.is_upper:
            return False
        return _sys.getxattr_at(self.stack.dir_fd(layer, parent.path_in(layer)), None, self.names.impure) is not None

    def _nodeless_entry(self, parent: Node, name: bytes, layer: Layer) -> Entry | None:
        """Out of descriptors for a new node: the entry is listed without one (READDIRPLUS
        then gives the kernel no inode; a later lookup makes it). Its d_ino is the layer
        object's own (not the origin's an upper copy reports)."""
        try:
            st = _sys.lstat_at(self.stack.dir_fd(layer, parent.path_in(layer)), name)
        except FileNotFoundError:
            return None
        return Entry(name, None, st, self.stack.xino(layer, st.st_ino), st.st_nlink)

    # --- xattrs -----------------------------------------------------------------------------

    def getxattr(self, node: Node, name: str) -> bytes:
        if name == OVERRIDE_XATTR:  # the stored owner is the overlay's, never the user's
            raise OSError(errno.ENODATA, "reserved")
        real = self.names.to_real(name)
        return _sys.getxattr_raw(node.fd, None, real)  # the node's own object, via its fd

    def listxattr(self, node: Node, caller: Caller) -> list[str]:
        out = []
        trusted: bool | None = None
        for real in _sys.listxattr_at(node.fd, None):
            shown = self.names.to_user(real)
            if shown is None or shown == OVERRIDE_XATTR:
                continue
            if shown.startswith("trusted."):
                if trusted is None:
                    trusted = may_list_trusted(caller)
                if not trusted:
                    continue
            out.append(shown)
        return out

    def statfs(self) -> os.statvfs_result:
        return self.stack.statvfs()
