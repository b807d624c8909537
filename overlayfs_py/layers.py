"""The layer stack: which layer serves a name, and what a merged directory lists.

``LayerStack`` is opened once at mount and never changes shape. It owns the root fds
of the layers and a bounded cache of directory fds inside them; it never writes.
Precedence follows the kernel (fs/overlayfs/namei.c, ovl_lookup): walk the layers
from the top; a whiteout ends the walk with "not found"; a non-directory is the
answer and hides everything below; directories merge until an opaque one (or a
non-directory below a directory) ends the merge. A metacopy file (``overlay.metacopy``,
-o metacopy=on) is the answer too, and the walk goes on below it for its data file
(``Hit.data``: the kernel's lowerdata).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from . import _sys
from .whiteout import (
    AUFS_PREFIX,
    XattrNames,
    aufs_markers,
    aufs_opaque_at,
    aufs_whiteout_at,
    has_xwhiteouts,
    is_aufs_marker,
    is_opaque,
    is_whiteout_at,
    metacopy_at,
    opaque_value,
    redirect_at,
)

log = logging.getLogger(__name__)

XINO_SHIFT = 56  # xino=off, layers on several filesystems: the layer's fs index goes in the high bits
NULL_UUID = bytes(16)


@dataclass(eq=False)
class Layer:
    """One layer directory. ``index`` 0 is the topmost layer (the upper one, when there is one)."""

    index: int
    path: str
    fd: int  # O_PATH fd of the layer root, open for the life of the mount
    dev: int
    is_upper: bool
    fsid: int = 0  # index of this layer's filesystem among the stack's distinct filesystems
    label: str = ""  # 'upper', 'lower1' (the top lower), 'lower2', ...


@dataclass
class Hit:
    """A name found in one layer, at *path* inside it (redirects make it differ from the merged path)."""

    layer: Layer
    st: os.stat_result
    path: bytes
    # a metacopy file (``overlay.metacopy``): the regular file below that holds its data
    # (the kernel's "lowerdata"); None for every other object
    data: Hit | None = None


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class DirFdCache:
    """A bounded LRU of O_PATH fds for directories inside layers, keyed by (layer index, relpath).

    A miss is one ``openat2`` from the layer root; a path too long for one walk (PATH_MAX)
    is opened from its parent's fd when that is cached, else in pieces (``_sys.openat2``).
    Returned fds are only valid until the next call into the cache: use them at once.
    """

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._fds: collections.OrderedDict[tuple[int, bytes], int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._fds)

    def get(self, layer: Layer, relpath: bytes) -> int:
        if not relpath:
            return layer.fd
        key = (layer.index, relpath)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        if len(relpath) < _sys.PATH_MAX:
            fd = _sys.open_dir(layer.fd, relpath)  # one walk from the layer root
        else:
            # deeper than one walk may go: one component from the parent when its fd is
            # here (the usual case, a tree walked downwards), else piece by piece
            parent, _, name = relpath.rpartition(b"/")
            pfd = self._fds.get((layer.index, parent))
            fd = _sys.open_dir(layer.fd if pfd is None else pfd, relpath if pfd is None else name)
        self._fds[key] = fd
        if len(self._fds) > self.capacity:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def forget_one(self, layer: Layer, relpath: bytes) -> None:
        """Drop the cached fd for *relpath* alone (a new object took a name that held none:
        nothing below it can be cached). O(1), where ``forget`` scans the whole cache."""
        fd = self._fds.pop((layer.index, relpath), None)
        if fd is not None:
            os.close(fd)

    def forget(self, layer: Layer, relpath: bytes) -> None:
        """Drop cached fds for *relpath* and everything below it (after a rename/rmdir in *layer*)."""
        prefix = relpath + b"/"
        for key in [k for k in self._fds if k[0] == layer.index and (k[1] == relpath or k[1].startswith(prefix))]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class LayerStack:
    """The ordered layers of one mount: ``layers[0]`` is the upper (if any), then the lowers top to bottom."""

    def __init__(
        self,
        lowerdirs: tuple[str, ...] | list[str],
        upperdir: str | None,
        names: XattrNames,
        init_layer: bool = False,
        aufs: bool = False,
        xino: str = "off",
        index: bool = False,
        offline_changes: bool = True,
    ) -> None:
        """*init_layer*: the top lower is a runner's init layer: label it ``init`` and
        number the image's layers from ``lower1`` below it. *aufs*: honour AUFS-style
        ``.wh.`` markers in every layer (``-o aufs_whiteouts=on``; whiteout.py). *xino*:
        ``-o xino=on|off|auto`` (see :meth:`_kernel_xino`). *index*: ``index=on``.
        *offline_changes*: the kernel's ovl_allow_offline_changes (with an upper): False when
        the mount uses a feature that follows lower inodes of upper non-directories
        (``metacopy``, ``redirect_dir=on``, ``index``): then a null UUID is no bad UUID."""
        self.index = index
        self.names = names
        self.aufs = aufs
        self._uuids: dict[int, bytes | None] = {}  # layer index -> its filesystem's UUID
        self.layers: list[Layer] = []
        paths = ([upperdir] if upperdir else []) + list(lowerdirs)
        devs: list[int] = []
        try:
            for i, p in enumerate(paths):
                fd = os.open(p, _sys.DIR_FLAGS)
                st = os.fstat(fd)
                if st.st_dev not in devs:
                    devs.append(st.st_dev)
                is_upper = i == 0 and upperdir is not None
                n = (i if upperdir else i + 1) - (1 if init_layer else 0)
                label = "upper" if is_upper else ("init" if n == 0 else f"lower{n}")
                self.layers.append(Layer(i, p, fd, st.st_dev, is_upper, devs.index(st.st_dev), label))
        except OSError:
            self.close()
            raise
        self.upper: Layer | None = self.layers[0] if upperdir else None
        self.lowers = [layer for layer in self.layers if not layer.is_upper]
        self.samefs = len(devs) == 1
        # the kernel's xino numbering: bits taken from the top of st_ino (0: not in use)
        self.xino_bits = 0
        self.kernel_fsid: dict[int, int] = {}  # layer index -> the kernel's fsid (ofs->fs[])
        self.bad_uuid_layers: frozenset[int] = frozenset()  # layer indices (see _kernel_xino)
        self.offline_changes = offline_changes
        if not self.samefs:
            self._kernel_xino(xino)
        self.dirfds = DirFdCache()
        self.root_lowers: tuple[Layer, ...] = tuple(self.lowers)  # narrowed by an opaque lower root
        # redirect_dir=nofollow (features.py): a lookup that would follow a redirect into a
        # lower layer fails with EPERM, as the kernel's ovl_lookup ("refusing to follow")
        self.follow_redirects = True
        # -o uuid= as settled at mount (uuidmode.settle): with "off" origin records carry
        # and match a null UUID; overlay_uuid: the overlay's own (null: none)
        self.uuid_mode = "auto"
        self.overlay_uuid = NULL_UUID
        # -o metacopy=on: a metacopy file's data is looked up below it; off: a lookup that
        # meets one is EPERM, as the kernel's ("refusing to follow metacopy origin")
        self.metacopy = False

    def close(self) -> None:
        if hasattr(self, "dirfds"):
            self.dirfds.close()
        for layer in self.layers:
            os.close(layer.fd)
        self.layers = []

    def merge_root(self) -> tuple[Layer, ...]:
        """The layers the merged root is made of: every layer down to the first opaque one
        (the kernel checks the opaque xattr on each layer root except the last). Narrows
        ``root_lowers`` (where absolute redirects continue) to them."""
        dirs: list[Layer] = []
        for i, layer in enumerate(self.layers):
            dirs.append(layer)
            if i < len(self.layers) - 1 and (
                is_opaque(opaque_value(layer.fd, None, self.names)) or (self.aufs and aufs_opaque_at(layer.fd, None))
            ):
                break
        self.root_lowers = tuple(layer for layer in dirs if not layer.is_upper)
        return tuple(dirs)

    def _kernel_xino(self, mode: str) -> None:
        """Number the filesystems and choose the xino bits as the kernel does
        (fs/overlayfs/super.c, ovl_get_layers and ovl_get_fsid): fsid 0 is the upper's
        filesystem (reserved even without an upper), each other filesystem gets the next
        fsid in the order the lowers are given, and ``ilog2(numfs - 1) + 2`` high bits are
        taken (numfs counts fsid 0).

        With an upper, a lower filesystem other than the upper's is marked "bad uuid"
        (ovl_lower_uuid_ok) when its UUID is null (not with ``xino=on``) or that of an
        earlier lower filesystem (then both are): origin records are never followed into
        it (``bad_uuid_layers``, ovl_check_origin_fh), and ``xino=auto`` falls back to off,
        as it does when a lower cannot decode file handles (ovl_lower_dir). ``xino=off``
        numbers nothing (pyoverlay's own numbering) but marks the same filesystems."""
        upper = self.upper
        fs_devs: list[int] = [upper.dev if upper is not None else -1]
        uuids: list[bytes] = [(self.fs_uuid(upper) or NULL_UUID) if upper is not None else NULL_UUID]
        is_lower = [False]
        bad = [False]
        fsids: dict[int, int] = {}
        for layer in self.lowers:
            if layer.dev in fs_devs:
                fsid = fs_devs.index(layer.dev)
            else:
                fsid = len(fs_devs)
                uuid = (self.fs_uuid(layer) or NULL_UUID) if upper is not None else NULL_UUID
                is_bad = False
                if upper is not None:
                    # ovl_allow_offline_changes(): no index, metacopy, redirect_dir=on,
                    # and xino != on
                    if self.offline_changes and not self.index and mode != "on" and uuid == NULL_UUID:
                        is_bad = True
                    else:
                        for i in range(len(fs_devs)):
                            if is_lower[i] and uuids[i] == uuid:
                                bad[i] = is_bad = True
                                break
                fs_devs.append(layer.dev)
                uuids.append(uuid)
                is_lower.append(False)
                bad.append(is_bad)
            is_lower[fsid] = True
            fsids[layer.index] = fsid
        self.bad_uuid_layers = frozenset(i for i, f in fsids.items() if f and bad[f])
        if mode == "off":
            return
        if mode == "auto" and upper is not None and (any(bad) or not self._lowers_decode_handles()):
            return
        self.kernel_fsid = fsids
        self.xino_bits = (len(fs_devs) - 1).bit_length() - 1 + 2

    def _lowers_decode_handles(self) -> bool:
        """Whether the kernel could decode file handles on every lower (ovl_can_decode_fh):
        the mounter holds CAP_DAC_READ_SEARCH (root in the initial user namespace) and each
        lower filesystem encodes decodable handles (name_to_handle_at succeeds)."""
        from .privilege import initial_userns

        if os.geteuid() != 0 or not initial_userns():
            return False
        return all(_sys.name_to_handle(layer.fd) is not None for layer in self.lowers)

    def origin_in(self, layer: Layer, record_uuid: bytes) -> bool:
        """Whether an origin record naming *record_uuid* may lead into *layer*, as the kernel
        decodes it (ovl_check_origin_fh, ovl_decode_real_fh): not into a filesystem marked
        "bad uuid", and only into one with the record's UUID (where the layer's is known).
        With ``uuid=off`` only a record with a null UUID, into any layer (they are all on
        one filesystem then)."""
        if self.uuid_mode == "off":
            return record_uuid == NULL_UUID
        if layer.index in self.bad_uuid_layers:
            return False
        own = self.fs_uuid(layer)
        return own is None or own == record_uuid

    def origin_uuid(self, layer: Layer) -> bytes:
        """The UUID an origin record of an object of *layer* carries (ovl_encode_real_fh):
        its filesystem's, null with ``uuid=off`` (or when the filesystem has none)."""
        if self.uuid_mode == "off":
            return NULL_UUID
        return self.fs_uuid(layer) or NULL_UUID

    def fs_uuid(self, layer: Layer) -> bytes | None:
        """The UUID of *layer*'s filesystem (FS_IOC_GETFSUUID), None when it has none."""
        if layer.index not in self._uuids:
            self._uuids[layer.index] = self._fs_uuid(layer)
        return self._uuids[layer.index]

    @staticmethod
    def _fs_uuid(layer: Layer) -> bytes | None:
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=layer.fd)
        except OSError:
            return None
        try:
            return _sys.fs_uuid(fd)
        finally:
            os.close(fd)

    def xino(self, layer: Layer, ino: int) -> int:
        """The st_ino the overlay reports for inode *ino* of *layer*.

        With the kernel's xino (``xino=on|auto``, layers on several filesystems;
        ovl_map_dev_ino, ovl_remap_lower_ino): the layer's fsid shifted to
        ``64 - xino_bits + 1``; an inode number that already uses the top ``xino_bits``
        bits is reported as it is (the kernel then reports the layer's own st_dev,
        which a FUSE mount cannot). Otherwise (``xino=off``): pyoverlay's own
        numbering, the layer's filesystem index in bits 56+."""
        if self.xino_bits:
            shift = 64 - self.xino_bits
            if ino >> shift:
                return ino
            return ino | (self.kernel_fsid.get(layer.index, 0) << (shift + 1))
        if self.samefs or layer.fsid == 0:
            return ino
        return (layer.fsid << XINO_SHIFT) | (ino & ((1 << XINO_SHIFT) - 1))

    # --- reading one layer ----------------------------------------------------------------

    def dir_fd(self, layer: Layer, relpath: bytes) -> int:
        return self.dirfds.get(layer, relpath)

    def lstat(self, layer: Layer, relpath: bytes) -> os.stat_result:
        """lstat of the object at *relpath* in *layer* (relpath b"" is the layer root)."""
        if not relpath:
            return os.fstat(layer.fd)
        parent, _, name = relpath.rpartition(b"/")
        return _sys.lstat_at(self.dir_fd(layer, parent), name)

    def getxattr(self, layer: Layer, relpath: bytes, attr: str) -> bytes | None:
        if not relpath:
            return _sys.getxattr_at(layer.fd, None, attr)
        parent, _, name = relpath.rpartition(b"/")
        return _sys.getxattr_at(self.dir_fd(layer, parent), name, attr)

    # --- precedence -----------------------------------------------------------------------

    def resolve(self, parents: Sequence[tuple[Layer, bytes]], name: bytes) -> list[Hit]:
        """Find *name* in a merged directory given as its (layer, path in layer) pairs, top first.

        Returns [] when the name does not exist (or is whited out), a single Hit for a
        non-directory, and one Hit per contributing layer (top first) for a directory.
        A directory's ``overlay.redirect`` changes where the layers below it are looked
        at (the kernel follows redirects by default): a relative one names a sibling, an
        absolute one a path from the root of each lower layer below.
        """
        if self.aufs:
            return self._resolve_aufs(parents, name)
        hits: list[Hit] = []
        cands = [(layer, join(ppath, name)) for layer, ppath in parents]
        i = 0
        while i < len(cands):
            layer, path = cands[i]
            pdir, _, base = path.rpartition(b"/")
            try:
                dfd = self.dir_fd(layer, pdir)
                st = _sys.lstat_at(dfd, base)
            except (FileNotFoundError, NotADirectoryError):
                i += 1
                continue
            if not stat.S_ISDIR(st.st_mode):
                if not hits and not is_whiteout_at(dfd, base, st, self.names):
                    hits.append(self._nondir_hit(cands, i, dfd, base, st))
                break  # a whiteout or a non-directory ends the walk (and a dir merge)
            hits.append(Hit(layer, st, path))
            if layer.index == self.layers[-1].index or is_opaque(opaque_value(dfd, base, self.names)):
                break
            self._follow_redirect(cands, i, layer, dfd, base)
            i += 1
        return hits

    def _nondir_hit(self, cands: list[tuple[Layer, bytes]], i: int, dfd: int, base: bytes, st: os.stat_result) -> Hit:
        """The hit of the non-directory found at ``cands[i]`` (*base* in *dfd*, lstat *st*);
        a metacopy file carries the hit of its data file (``Hit.data``)."""
        layer, path = cands[i]
        hit = Hit(layer, st, path)
        if metacopy_at(dfd, base, st, self.names):
            hit.data = self._lowerdata(cands[i + 1 :], layer, dfd, base)
        return hit

    def _lowerdata(self, rest: list[tuple[Layer, bytes]], layer: Layer, dfd: int, base: bytes) -> Hit:
        """The data file of the metacopy file *base* in *dfd* of *layer*, as the kernel's
        ovl_lookup finds it: in the layers below (*rest*), at the path its
        ``overlay.redirect`` names (relative: a sibling; absolute: from the lower roots), past
        further metacopy files (each redirecting again), until a regular file without the
        xattr. A whiteout, nothing, or another kind of object: EIO ("metacopy with no lower
        data found"); with ``metacopy=off`` anything found below: EPERM ("refusing to follow
        metacopy origin")."""
        no_data = "metacopy with no lower data found"
        while True:
            redirect = _sys.getxattr_at(dfd, base, self.names.redirect)
            if redirect:
                rest = self._redirected(rest, layer, redirect)
            for j, (low, lpath) in enumerate(rest):
                pdir, _, lbase = lpath.rpartition(b"/")
                try:
                    ldfd = self.dir_fd(low, pdir)
                    lst = _sys.lstat_at(ldfd, lbase)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if not stat.S_ISDIR(lst.st_mode) and is_whiteout_at(ldfd, lbase, lst, self.names):
                    raise OSError(errno.EIO, no_data)
                if not self.metacopy:
                    raise PermissionError(errno.EPERM, "refusing to follow metacopy origin (metacopy=off)")
                if not stat.S_ISREG(lst.st_mode):
                    raise OSError(errno.EIO, no_data)
                if not metacopy_at(ldfd, lbase, lst, self.names):
                    return Hit(low, lst, lpath)
                layer, dfd, base, rest = low, ldfd, lbase, rest[j + 1 :]  # another metacopy file
                break
            else:
                raise OSError(errno.EIO, no_data)

    def _follow_redirect(self, cands: list[tuple[Layer, bytes]], i: int, layer: Layer, dfd: int, base: bytes) -> None:
        """A directory hit at ``cands[i]`` with ``overlay.redirect``: the layers below are
        looked at where it says (an absolute redirect continues in the root's lower layers
        even where the parent has none left: ovl_lookup switches to the root's lower
        stack); with ``redirect_dir=nofollow`` that is EPERM, as the kernel's lookup."""
        redirect = redirect_at(dfd, base, self.names)
        if redirect:
            cands[i + 1 :] = self._redirected(cands[i + 1 :], layer, redirect)
            if cands[i + 1 :] and not self.follow_redirects:
                raise PermissionError(errno.EPERM, "refusing to follow a redirect (redirect_dir=nofollow)")

    def _resolve_aufs(self, parents: Sequence[tuple[Layer, bytes]], name: bytes) -> list[Hit]:
        """``resolve`` with AUFS markers (fuse-overlayfs's do_lookup_file and load_dir): a
        ``.wh.NAME`` in a layer hides NAME there and below, and ends a directory merge; a
        ``.wh..wh..opq`` makes a directory opaque; a marker name itself is never found.

        A marker is looked for only once a layer has NAME: in the layers above it that
        did not (the ones since the previous hit) and in that layer itself, so a name no
        layer has costs nothing more than without the option."""
        if is_aufs_marker(name):
            return []
        hits: list[Hit] = []
        missed: list[tuple[Layer, bytes]] = []  # (layer, parent dir) without NAME since the last hit
        cands = [(layer, join(ppath, name)) for layer, ppath in parents]
        i = 0
        while i < len(cands):
            layer, path = cands[i]
            pdir, _, base = path.rpartition(b"/")
            try:
                dfd = self.dir_fd(layer, pdir)
            except (FileNotFoundError, NotADirectoryError):
                i += 1  # no such directory in this layer (a redirect's target): no NAME, no marker
                continue
            try:
                st = _sys.lstat_at(dfd, base)
            except (FileNotFoundError, NotADirectoryError):
                missed.append((layer, pdir))
                i += 1
                continue
            if self._aufs_whited_out(missed, base) or aufs_whiteout_at(self.dir_fd(layer, pdir), base):
                break  # hidden here (nothing found yet) or the merge ends here
            missed.clear()
            dfd = self.dir_fd(layer, pdir)
            if not stat.S_ISDIR(st.st_mode):
                if not hits and not is_whiteout_at(dfd, base, st, self.names):
                    hits.append(self._nondir_hit(cands, i, dfd, base, st))
                break
            hits.append(Hit(layer, st, path))
            if (
                layer.index == self.layers[-1].index
                or is_opaque(opaque_value(dfd, base, self.names))
                or aufs_opaque_at(dfd, base)
            ):
                break
            self._follow_redirect(cands, i, layer, dfd, base)
            i += 1
        return hits

    def _aufs_whited_out(self, missed: list[tuple[Layer, bytes]], name: bytes) -> bool:
        """Whether one of the *missed* layer directories (top first) holds ``.wh.NAME``."""
        for layer, pdir in missed:
            try:
                if aufs_whiteout_at(self.dir_fd(layer, pdir), name):
                    return True
            except (FileNotFoundError, NotADirectoryError):  # gone meanwhile
                continue
        return False

    def _redirected(self, rest: list[tuple[Layer, bytes]], layer: Layer, redirect: bytes) -> list[tuple[Layer, bytes]]:
        """Where the layers below *layer* are looked at after *redirect*. An absolute one
        is walked from the root's lower layers below *layer* component by component, as
        the kernel's ovl_lookup_layer does: a directory on the way with its own redirect
        (another mount's rename, in a middle layer) moves the layers below it too."""
        if redirect.startswith(b"/"):
            parts = [p for p in redirect.split(b"/") if p]
            dirs = [(low, b"") for low in self.root_lowers if low.index > layer.index]
            if not parts:
                return []
            for part in parts[:-1]:
                if not dirs:
                    return []
                dirs = [(h.layer, h.path) for h in self.resolve(dirs, part) if stat.S_ISDIR(h.st.st_mode)]
            return [(low, join(p, parts[-1])) for low, p in dirs]
        return [(low, join(p.rpartition(b"/")[0], redirect)) for low, p in rest]

    def real_dir_filters_whiteouts(self, layer: Layer, relpath: bytes) -> bool:
        """Whether a directory served by one layer alone still hides whiteouts in readdir.

        The kernel iterates such a directory raw (whiteouts listed), unless it carries an
        origin record (it was copied up and may hold whiteouts: ovl_get_inode, OVL_WHITEOUTS).
        The root is always filtered.
        """
        if not relpath:
            return True
        return self.getxattr(layer, relpath, self.names.origin) is not None

    def list_merged(
        self, dirs: Sequence[tuple[Layer, bytes]], filter_whiteouts: bool, xwhiteouts: bool = True
    ) -> list[tuple[bytes, Layer]]:
        """The names of a merged directory, each once with the layer listing it, top layer first.

        With *filter_whiteouts* (a merged dir), whiteouts are neither listed nor let the
        names they cover through; a zero-size file with the whiteout xattr counts as a
        whiteout only in a lower directory marked ``opaque=x`` (as the kernel's readdir does),
        and never without *xwhiteouts*: the kernel's emptiness check (``ovl_check_empty_dir``
        for rmdir and rename over a directory) tests only char 0/0 whiteouts, so there an
        xattr whiteout is an entry (see ``is_empty_dir``).
        """
        seen: set[bytes] = set()
        out: list[tuple[bytes, Layer]] = []
        for layer, path in dirs:
            dfd = self.dir_fd(layer, path)
            check_x = (
                filter_whiteouts
                and xwhiteouts
                and not layer.is_upper
                and has_xwhiteouts(opaque_value(dfd, None, self.names))
            )
            names = _sys.listdir_fd(dfd)
            if self.aufs:  # markers: never listed; what they hide is not listed from here down
                hidden, _ = aufs_markers(names)
                seen |= hidden
                names = [(n, k) for n, k in names if not n.startswith(AUFS_PREFIX)]
            for name, kind in names:
                if name in seen:
                    continue
                seen.add(name)
                if (
                    filter_whiteouts
                    and kind in (0, stat.S_IFREG)
                    and self._is_listing_whiteout(dfd, name, kind, check_x)
                ):
                    continue
                out.append((name, layer))
        return out

    def is_empty_dir(self, dirs: Sequence[tuple[Layer, bytes]]) -> bool:
        """Whether rmdir (or a rename over it) finds the merged directory of *dirs* empty.

        As the kernel's ``ovl_check_empty_dir``: char 0/0 whiteouts do not count (nor do the
        names they hide), but a lower xattr whiteout does, also in an ``opaque=x`` directory
        whose readdir hides it. The kernel's ``ovl_dir_read_merged`` only flags such files
        (``check_xwhiteout``) for its readdir (``ovl_iterate``) to test; the emptiness check
        sees a regular file. So a directory that lists empty may still give ``ENOTEMPTY``
        (issue 17, item 2; docs/semantics.md, "Whiteouts").
        """
        return not self.list_merged(dirs, True, xwhiteouts=False)

    def _is_listing_whiteout(self, dfd: int, name: bytes, kind: int, check_x: bool) -> bool:
        if kind == stat.S_IFREG and not check_x:
            return False
        try:
            st = _sys.lstat_at(dfd, name)
        except FileNotFoundError:
            return True
        return is_whiteout_at(dfd, name, st, self.names, xattr=check_x)

    def statvfs(self) -> os.statvfs_result:
        """statfs of the mount: the upper filesystem's, or the top lower's for a read-only stack."""
        return os.statvfs(self.layers[0].fd)
