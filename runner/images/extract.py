"""Extract one layer tar into a directory in the kernel's overlay format (safely).

The conversion (OCI image spec, "Representing Changes"; the kernel's
Documentation/filesystems/overlayfs.rst):

* ``DIR/.wh.NAME`` (a whiteout) becomes ``DIR/NAME``, a character device 0/0;
* ``DIR/.wh..wh..opq`` (an opaque marker) becomes the xattr ``overlay.opaque="y"`` on DIR;
* other ``.wh..wh.*`` names (aufs bookkeeping) are skipped;
* a whiteout only hides what lies *below* the layer: when the layer has both ``.wh.X``
  and X (either order), X stays, and if X is a directory it becomes opaque;
* every other entry is created as it is: owners, modes (setuid/setgid/sticky too), mtimes
  (nanoseconds from a PAX ``mtime``), symlink targets, hard links, device nodes, FIFOs,
  and PAX ``SCHILY.xattr.*`` xattrs. A user's ``trusted.overlay.X`` xattr is stored escaped
  (``trusted.overlay.overlay.X``), so a layer can never set overlay metadata itself;
* a later entry replaces an earlier one of the same name (a directory over a directory
  only updates its metadata), as tar does.

The layer is untrusted. Refused with an :class:`ImageError` (the caller discards the
half-made directory): absolute names, ``..`` components, an entry below a symlink or a
non-directory, a hard link to something not (yet) in the layer, to a directory, or to a
symlink pointing out of the layer, a whiteout of ``.``/``..``, unknown entry types.
Nothing is ever resolved through a symlink: directories are reached with
``openat2(RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH)`` and every object is created with ``*at``
calls and ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import sys
import tarfile

from overlayfs_py import _sys
from overlayfs_py.whiteout import XattrNames, is_char_whiteout, make_whiteout

from .core import ImageError
from .tarformat import OPAQUE, WH, escapes, mtime_ns, split_name, xattrs_of

_OPEN_DIR = _sys.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def extract(stream, dest: str, names: XattrNames) -> None:
    """Extract the (uncompressed) layer tar read from *stream* into the directory *dest*."""
    root = os.open(dest, _OPEN_DIR)
    try:
        ex = _Extractor(root, names)
        with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20, encoding="utf-8", errors="surrogateescape") as tf:
            for m in tf:
                ex.entry(tf, m)
        ex.finish()
    finally:
        os.close(root)


class _Extractor:
    def __init__(self, root: int, names: XattrNames) -> None:
        self.root = root
        self.names = names
        self.as_root = os.geteuid() == 0
        self.dirs: dict[bytes, tarfile.TarInfo] = {}  # mode and mtime applied at the end
        self.skipped_xattrs = 0

    # ---- paths ---------------------------------------------------------------------

    def _dir(self, parts: list[bytes], name: str, create: bool = True) -> int:
        """An O_PATH fd of the directory *parts*; missing ones are made (0755) if *create*."""
        try:
            return _sys.openat2(self.root, b"/".join(parts) or b".", _OPEN_DIR)
        except OSError as e:
            if e.errno != errno.ENOENT or not create:
                raise ImageError(f"layer entry {name!r}: {self._why(parts, e)}") from None
        fd = os.dup(self.root)
        try:
            for p in parts:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(p, 0o755, dir_fd=fd)
                try:
                    nfd = os.open(p, _OPEN_DIR, dir_fd=fd)
                except OSError as e:
                    raise ImageError(f"layer entry {name!r}: {self._why(parts, e)}") from None
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _why(self, parts: list[bytes], e: OSError) -> str:
        """Why the directory *parts* cannot be reached."""
        for i in range(1, len(parts) + 1):
            try:
                st = os.stat(b"/".join(parts[:i]), dir_fd=self.root, follow_symlinks=False)
            except OSError:
                return f"{os.fsdecode(b'/'.join(parts[:i]))!r} is not in the layer"
            if stat.S_ISLNK(st.st_mode):
                return "its path goes through a symlink (refused)"
            if not stat.S_ISDIR(st.st_mode):
                return "its path goes through a non-directory"
        return e.strerror or str(e)

    @staticmethod
    def _lstat(pfd: int, base: bytes) -> os.stat_result | None:
        try:
            return os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove(self, pfd: int, base: bytes, st: os.stat_result | None) -> None:
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(base, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)

    # ---- entries -------------------------------------------------------------------

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = split_name(m.name)
        if not parts:
            if not m.isdir():
                raise ImageError(f"layer entry {m.name!r}: the layer root must be a directory")
            self._meta(self.root, None, m)
            self.dirs[b""] = m
            return
        pfd = self._dir(parts[:-1], m.name)
        try:
            self._entry(tf, m, parts, pfd)
        except OSError as e:
            raise ImageError(f"layer entry {m.name!r}: {e.strerror}") from None
        finally:
            os.close(pfd)

    def _entry(self, tf, m: tarfile.TarInfo, parts: list[bytes], pfd: int) -> None:
        base = parts[-1]
        if base.startswith(WH):
            return self._whiteout(m, base, pfd)
        st = self._lstat(pfd, base)
        whited = st is not None and is_char_whiteout(st)
        if m.isdir():
            if st is None or not stat.S_ISDIR(st.st_mode):
                self._remove(pfd, base, st)
                os.mkdir(base, 0o700, dir_fd=pfd)
            if whited:  # .wh.X then X/ in one layer: X is new, nothing below shows through
                self._set_opaque(pfd, base)
            self._meta(pfd, base, m)
            self.dirs[b"/".join(parts)] = m
            return
        if m.islnk():
            return self._hardlink(m, pfd, base, st)
        self._remove(pfd, base, st)
        if m.isreg():
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                src = tf.extractfile(m)
                while data := src.read(1 << 20):
                    _write_all(fd, data)
            except BaseException:
                os.close(fd)
                raise
            self._meta(pfd, base, m, fd, times=True)
        elif m.issym():
            os.symlink(m.linkname, base, dir_fd=pfd)
            self._meta(pfd, base, m, times=True)
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            if kind != stat.S_IFIFO and not self.as_root:
                raise ImageError(f"layer entry {m.name!r}: device nodes need root")
            os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            self._meta(pfd, base, m, times=True)
        else:
            raise ImageError(f"layer entry {m.name!r}: unsupported tar entry type {m.type!r}")

    def _whiteout(self, m: tarfile.TarInfo, base: bytes, pfd: int) -> None:
        if base == OPAQUE:
            return self._set_opaque(pfd, None)
        if base.startswith(WH + WH):
            return  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs)
        target = base[len(WH) :]
        if target in (b"", b".", b".."):
            raise ImageError(f"layer entry {m.name!r}: whiteout of {os.fsdecode(target)!r} refused")
        st = self._lstat(pfd, target)
        if st is not None:  # X and .wh.X in one layer: X stays (see the module docstring)
            if stat.S_ISDIR(st.st_mode):
                self._set_opaque(pfd, target)
            return
        make_whiteout(pfd, target)
        path = _sys.proc_path(pfd, target)
        if self.as_root:
            os.chown(path, m.uid, m.gid, follow_symlinks=False)
        os.utime(path, ns=(mtime_ns(m),) * 2, follow_symlinks=False)

    def _hardlink(self, m: tarfile.TarInfo, pfd: int, base: bytes, st) -> None:
        tparts = split_name(m.linkname, "hard link target")
        if not tparts:
            raise ImageError(f"layer entry {m.name!r}: hard link to the layer root refused")
        tfd = self._dir(tparts[:-1], m.name, create=False)
        try:
            tst = self._lstat(tfd, tparts[-1])
            if tst is None or is_char_whiteout(tst):
                raise ImageError(f"layer entry {m.name!r}: hard link target {m.linkname!r} is not in the layer (yet)")
            if stat.S_ISDIR(tst.st_mode):
                raise ImageError(f"layer entry {m.name!r}: hard link to a directory refused")
            if stat.S_ISLNK(tst.st_mode) and escapes(tparts[:-1], os.readlink(tparts[-1], dir_fd=tfd)):
                raise ImageError(f"layer entry {m.name!r}: hard link to a symlink pointing out of the layer refused")
            if st is not None and (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                return
            self._remove(pfd, base, st)
            os.link(tparts[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    # ---- metadata ------------------------------------------------------------------

    def _meta(
        self, pfd: int, base: bytes | None, m: tarfile.TarInfo, fd: int | None = None, times: bool = False
    ) -> None:
        """Owner, then mode (chown clears setuid), xattrs, times (directories: mode and times
        in :meth:`finish`); closes *fd*. Without *fd* the object is reached as
        ``/proc/self/fd/<parent>/<base>`` without following a symlink at the end (the
        parent itself when *base* is None)."""
        path = _sys.proc_path(pfd, base)
        # an fd is the object itself (follow_symlinks must stay True with one)
        target: int | bytes = fd if fd is not None else path
        follow = fd is not None or base is None
        try:
            if self.as_root:
                os.chown(target, m.uid, m.gid, follow_symlinks=follow)
            if not m.issym() and not m.isdir():
                os.chmod(target, stat.S_IMODE(m.mode))  # a device or file we just made
            for name, value in xattrs_of(m).items():
                self._setxattr(target, follow, name, value)
            if times:
                ns = mtime_ns(m)
                os.utime(target, ns=(ns, ns), follow_symlinks=follow)
        finally:
            if fd is not None:
                os.close(fd)

    def _setxattr(self, target: int | bytes, follow: bool, name: str, value: bytes) -> None:
        try:
            os.setxattr(target, self.names.to_real(name), value, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
                raise
            self.skipped_xattrs += 1

    def _set_opaque(self, pfd: int, base: bytes | None) -> None:
        os.setxattr(_sys.proc_path(pfd, base), self.names.opaque, b"y", follow_symlinks=base is None)

    def finish(self) -> None:
        """Directory modes and mtimes, deepest first (creating children changed the mtimes)."""
        for rel in sorted(self.dirs, key=lambda p: -p.count(b"/") - (p != b"")):
            m = self.dirs[rel]
            try:
                fd = _sys.openat2(self.root, rel or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # replaced by a later entry
            try:
                os.chmod(fd, stat.S_IMODE(m.mode))
                ns = mtime_ns(m)
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)
        if self.skipped_xattrs:
            print(f"pyoverlay: warning: {self.skipped_xattrs} xattrs of the layer could not be set", file=sys.stderr)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
