"""Write a layer directory in the kernel's overlay format (an upper, or any lower) as an
OCI layer tar: the inverse of :mod:`.unpack`.

* a whiteout (char device 0/0, or a zero-size file carrying ``overlay.whiteout``) becomes
  an empty regular file ``DIR/.wh.NAME`` (mode 0600, the whiteout's owner and mtime);
* a directory with ``overlay.opaque="y"`` becomes its own entry followed by an empty
  ``DIR/.wh..wh..opq`` (the directory's permission bits, owner and mtime);
* everything else is written as it is: directories, regular files (a second name of an
  inode already written in this layer becomes a hard link entry to the first name),
  symlinks (always as symlinks, never as hard links), character and block devices,
  FIFOs; sockets have no tar form and are left out (with a warning);
* owner (numeric; no user or group names), permission bits with setuid/setgid/sticky,
  mtime to the nanosecond (a PAX ``mtime`` record when not whole seconds), xattrs as PAX
  ``SCHILY.xattr.*``. The overlay's private xattrs (``trusted.overlay.*`` and
  ``user.overlay.*``: opaque, origin, impure, ...) are left out; a user's own
  ``overlay.X`` xattr, stored escaped as ``overlay.overlay.X``, is written as ``overlay.X``;
* the layer root is the first entry, ``./``, so the merged root keeps its mode and times;
* deterministic: entries in byte order of their names, depth first, a directory before
  its contents, PAX format, no atime/ctime, so the same tree gives the same digest.

A directory renamed by redirect (``overlay.redirect``, written with ``redirect_dir=on``)
has its lower content elsewhere in the lower layers, which a layer tar cannot say: given
the lower layers (*lowers*: a container's), it is written in full, as moby writes such an
upper: the directory, ``.wh..wh..opq`` (nothing a lower has at its new path merges in),
and its whole merged content (lower objects included, read through
:mod:`overlayfs_py.merged`); its old path has its whiteout already. A metacopy file (``overlay.metacopy``, written
with ``metacopy=on``: only its metadata was copied up) is written with the data of its data
file in the lower layers, as a mount reads it. Without the lower layers such uppers are
refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import tarfile
from collections.abc import Sequence
from typing import BinaryIO

from overlayfs_py import _sys, merged
from overlayfs_py.layers import LayerStack
from overlayfs_py.whiteout import TRUSTED_PREFIX, USER_PREFIX, XattrNames, is_whiteout_at
from overlayfs_py.whiteout import metacopy_at as is_metacopy

from .core import ImageError
from .tarformat import OPAQUE, WH, set_mtime, set_xattr


class _Counting(io.BufferedIOBase):
    """A write-only file that hashes and counts what goes through to *f*."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self.f = f
        self.hash = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data, /) -> int:
        self.hash.update(data)
        self.count += len(data)
        self.f.write(data)
        return len(data)

    def tell(self) -> int:
        return self.count


def write_layer(
    src: str, out: BinaryIO, names: XattrNames | None = None, lowers: Sequence[str] | None = None
) -> tuple[str, int]:
    """Write the layer directory *src* to *out* as a tar; returns ``(diff_id, bytes)``.
    *names*: the private xattr names of the layer (default: detected, ``trusted.``).
    *lowers*: the layers below *src* (top first), needed for directories renamed by
    redirect (module doc)."""
    if names is None:
        from overlayfs_py.diff import detect_userxattr

        names = XattrNames(USER_PREFIX if detect_userxattr(src) else TRUSTED_PREFIX)
    sink = _Counting(out)
    root = os.open(src, _sys.DIR_FLAGS)
    try:
        with tarfile.open(
            fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
        ) as tf:
            writer = _Writer(tf, root, names)
            try:
                if lowers is not None:
                    writer.full = merged.full_stack(src, lowers, names)
                    writer.full.metacopy = True  # metacopy files are written with their data
                writer.run()
            finally:
                if writer.full is not None:
                    writer.full.close()
    except OSError as e:
        raise ImageError(f"cannot read the layer {src}: {e}") from None
    finally:
        os.close(root)
    return "sha256:" + sink.hash.hexdigest(), sink.count


class _Writer:
    def __init__(self, tf: tarfile.TarFile, root: int, names: XattrNames) -> None:
        self.tf = tf
        self.root = root
        self.names = names
        self.seen: dict[tuple[int, int], str] = {}  # (dev, ino) -> first name, for hard links
        self.sockets = 0
        self.full: LayerStack | None = None  # the upper over its lowers: for redirected dirs
        # index=on: origin record -> the first upper path of an indexed copy (overlay.nlink)
        self.indexed: dict[bytes, bytes] = {}

    def run(self) -> None:
        self.tf.addfile(self._info(".", tarfile.DIRTYPE, os.fstat(self.root), self.root, None))
        stack = [(b"", os.dup(self.root))]
        names = [iter(sorted(n for n, _ in _sys.listdir_fd(self.root)))]
        try:
            while stack:  # pre-order: each directory's contents right after it
                rel, dfd = stack[-1]
                name = next(names[-1], None)
                if name is None:
                    os.close(dfd)
                    stack.pop()
                    names.pop()
                    continue
                sub = self._entry(dfd, rel, name)
                if sub is not None:
                    sfd = _sys.open_dir(dfd, name)
                    stack.append((sub, sfd))
                    names.append(iter(sorted(n for n, _ in _sys.listdir_fd(sfd))))
        finally:
            for _, fd in stack:
                os.close(fd)
        if self.indexed and self.full is not None:
            self._index_served()
        if self.sockets:
            print(
                f"pyoverlay: warning: {self.sockets} sockets left out of the layer (tar has no socket entries)",
                file=sys.stderr,
            )

    def _index_served(self) -> None:
        """index=on: the lower names of an indexed copy that no upper name links (the mount
        shows the copy there: merged.index_served) are hard links to it in the layer, after
        everything else (sorted)."""
        assert self.full is not None
        for lower_path, upper_path in merged.index_served(self.full, self.indexed):
            parent, _, base = upper_path.rpartition(b"/")
            pfd = _sys.open_dir(self.root, parent) if parent else os.dup(self.root)
            try:
                st = _sys.lstat_at(pfd, base)
            finally:
                os.close(pfd)
            info = self._bare(os.fsdecode(lower_path), tarfile.LNKTYPE, st, stat.S_IMODE(st.st_mode))
            info.linkname = self.seen.get((st.st_dev, st.st_ino), os.fsdecode(upper_path))
            self.tf.addfile(info)

    def _redirected(self, dfd: int, path: bytes, name: bytes, st: os.stat_result) -> None:
        """A directory renamed by redirect: itself, opaque, and its whole merged content."""
        shown = os.fsdecode(path)
        dirs = merged.dirs_of(self.full, path) if self.full is not None else None
        if dirs is None:
            raise ImageError(
                f"{shown}: a directory renamed by redirect (overlay redirect_dir=on); its content is in"
                " the lower layers, which are needed to write it as a layer tar (commit the container)"
            )
        self.tf.addfile(self._info(shown, tarfile.DIRTYPE, st, dfd, name, in_merged=True))
        self.tf.addfile(self._bare(_join(path, OPAQUE), tarfile.REGTYPE, st, st.st_mode & 0o777))
        assert self.full is not None
        full = self.full
        todo = [(path, iter(merged.entries(full, dirs)))]
        while todo:  # pre-order, as run()
            rel, it = todo[-1]
            nxt = next(it, None)
            if nxt is None:
                todo.pop()
                continue
            child, hits = nxt
            top = hits[0]
            pdfd = full.dir_fd(top.layer, top.path.rpartition(b"/")[0])
            if self._entry(pdfd, rel, child, in_merged=True) is not None:
                todo.append((_joinb(rel, child), iter(merged.entries(full, [(h.layer, h.path) for h in hits]))))

    def _entry(self, dfd: int, rel: bytes, name: bytes, in_merged: bool = False) -> bytes | None:
        """Write one entry; return its path when it is a directory to descend into.
        *in_merged*: an object of a redirected directory's merged content (any layer)."""
        path = rel + b"/" + name if rel else name
        st = _sys.lstat_at(dfd, name)
        if self._is_whiteout(dfd, name, st):
            info = self._bare(_join(rel, WH + name), tarfile.REGTYPE, st, 0o600)
            self.tf.addfile(info)
            return None
        mode = st.st_mode
        if stat.S_ISDIR(mode) and not in_merged and _sys.getxattr_at(dfd, name, self.names.redirect) is not None:
            self._redirected(dfd, path, name, st)
            return None  # written in full: not walked again
        if stat.S_ISDIR(mode):
            self.tf.addfile(self._info(os.fsdecode(path), tarfile.DIRTYPE, st, dfd, name, in_merged))
            if not in_merged and _sys.getxattr_at(dfd, name, self.names.opaque) == b"y":
                self.tf.addfile(self._bare(_join(path, OPAQUE), tarfile.REGTYPE, st, mode & 0o777))
            return path
        if stat.S_ISSOCK(mode):
            self.sockets += 1
            return None
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and not stat.S_ISLNK(mode) and key in self.seen:
            info = self._bare(os.fsdecode(path), tarfile.LNKTYPE, st, stat.S_IMODE(mode))
            info.linkname = self.seen[key]
            self.tf.addfile(info)
            return None
        self.seen[key] = os.fsdecode(path)
        if st.st_nlink > 1 and not in_merged and _sys.getxattr_at(dfd, name, self.names.nlink) is not None:
            origin = _sys.getxattr_at(dfd, name, self.names.origin)
            if origin is not None:
                self.indexed.setdefault(origin, path)
        if stat.S_ISREG(mode):
            info = self._info(os.fsdecode(path), tarfile.REGTYPE, st, dfd, name, in_merged)
            fd = self._data(dfd, rel, name, st)
            with os.fdopen(fd, "rb") as f:
                if os.fstat(fd).st_size != st.st_size:
                    raise ImageError(f"{os.fsdecode(path)} changed while being read")
                info.size = st.st_size
                self.tf.addfile(info, f)
            return None
        kind = {
            stat.S_IFLNK: tarfile.SYMTYPE,
            stat.S_IFCHR: tarfile.CHRTYPE,
            stat.S_IFBLK: tarfile.BLKTYPE,
            stat.S_IFIFO: tarfile.FIFOTYPE,
        }[stat.S_IFMT(mode)]
        info = self._info(os.fsdecode(path), kind, st, dfd, name, in_merged)
        if kind == tarfile.SYMTYPE:
            info.linkname = os.fsdecode(_sys.readlink_at(dfd, name))
        elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        self.tf.addfile(info)
        return None

    def _data(self, dfd: int, rel: bytes, name: bytes, st: os.stat_result) -> int:
        """The regular file *name* in *dfd* (merged path *rel*/*name*) opened for its data: a
        metacopy file's is its data file in the lower layers (the mount's lookup of it)."""
        if not is_metacopy(dfd, name, st, self.names):
            return _sys.open_beneath(dfd, name, os.O_RDONLY)
        assert self.full is not None  # _info refused the file without the lower layers
        dirs = merged.dirs_of(self.full, rel)
        hits = self.full.resolve(dirs, name) if dirs is not None else []
        data = hits[0].data if hits else None
        if data is None:
            raise ImageError(f"{_join(rel, name)}: a metacopy file whose data file is not in the lower layers")
        return _sys.open_beneath(data.layer.fd, data.path, os.O_RDONLY)

    def _is_whiteout(self, dfd: int, name: bytes, st: os.stat_result) -> bool:
        return is_whiteout_at(dfd, name, st, self.names)

    @staticmethod
    def _bare(name: str, kind: bytes, st: os.stat_result, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        set_mtime(info, st.st_mtime_ns)
        return info

    def _info(
        self, name: str, kind: bytes, st: os.stat_result, dfd: int, base: bytes | None, in_merged: bool = False
    ) -> tarfile.TarInfo:
        """A header with the object's owner, mode, mtime and (user-visible) xattrs. A
        redirect is private in a redirected directory's merged content (followed there)."""
        info = self._bare(name, kind, st, stat.S_IMODE(st.st_mode))
        for real in sorted(_sys.listxattr_at(dfd, base)):
            if in_merged and real == self.names.redirect:
                continue
            if real.startswith((self.names.prefix + "redirect", self.names.prefix + "metacopy")):
                if self.full is None:
                    raise ImageError(
                        f"{name}: the upper uses overlay {real} (redirect_dir/metacopy); its data is in the"
                        " lower layers, which are needed to write it as a layer tar (commit the container)"
                    )
                continue  # written in full (a redirected directory, a metacopy file's data)
            shown = self.names.to_user(real)
            if shown is None or (shown == real and shown.startswith((TRUSTED_PREFIX, USER_PREFIX))):
                continue  # private (of this overlay, or of the other namespace)
            value = _sys.getxattr_at(dfd, base, real)
            if value is not None:
                set_xattr(info, shown, value)
        return info


def _joinb(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _join(parent: bytes | str, name: bytes) -> str:
    parent = os.fsencode(parent)
    return os.fsdecode(parent + b"/" + name if parent else name)
