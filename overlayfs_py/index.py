"""The kernel's inodes index (``-o index=on``): ``<workdir>/index``, keyed by origin handles.

What the kernel does (fs/overlayfs: namei.c ovl_lookup_index, ovl_verify_index,
ovl_get_index_name; copy_up.c ovl_do_copy_up, ovl_link_up; util.c ovl_set_nlink_*,
ovl_cleanup_index; super.c ovl_get_indexdir; readdir.c ovl_indexdir_cleanup), and so this
module:

* at mount: the upper root's ``overlay.origin`` is the first lower layer's root handle
  (written on the first mount, verified on later ones: another lower is ESTALE, the mount
  fails); ``<workdir>/index`` is made and its ``overlay.upper`` is the upper root's handle
  (flag 4: an upper handle), verified the same way; then the index is cleaned: leftovers
  named ``#...`` go, an entry whose ``overlay.origin`` is not its name is stale and goes, a
  non-directory entry that no other name links any more and whose overlay nlink is 0 (or
  whose origin cannot be decoded) is an orphan and goes; whiteouts and directory entries
  stay (they are nfs_export's);
* a copy-up of a lower non-directory with more than one link is built, with an origin
  record, and linked at ``index/<hex of the origin record>`` (``U+<n-1>`` in
  ``overlay.nlink``), then linked at its name (``L+..`` before, ``U+..`` after); a copy-up
  of another name of the same lower inode finds the entry and only links it;
* a lookup of a lower non-directory with an index entry is served by that entry (same
  type; a whiteout or another type is EIO), an upper one whose origin has an entry that is
  the same inode is "indexed": both report the lower st_ino and the overlay nlink kept in
  ``overlay.nlink`` (``U+d``: the upper inode's links + d, ``L+d``: the lower's + d);
* a removal of the last name (overlay nlink 0) removes the index entry.

``nlink_of`` and the helpers are pure functions of what is on disk: no state survives a
restart that the kernel would not find there too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

from . import _sys
from .errors import PyoverlayError
from .whiteout import ORIGIN_HEADER, XattrNames, encode_origin, is_whiteout_kind

log = logging.getLogger(__name__)

INDEX_SUBDIR = b"index"
#: struct ovl_fb flags: the handle is of an upper object (OVL_FH_FLAG_PATH_UPPER)
FLAG_PATH_UPPER = 4
_NULL_UUID = b"\0" * 16


class IndexFailed(PyoverlayError):
    """A mount the kernel refuses with index=on (one line)."""


def encode_fh(fd: int, uuid: bytes | None, upper: bool = False) -> bytes | None:
    """The kernel's record of the object of *fd* (ovl_encode_real_fh): None if its
    filesystem has no file handles."""
    fh = _sys.name_to_handle(fd)
    if fh is None:
        return None
    rec = bytearray(encode_origin(fh[0], fh[1], uuid))
    if upper:
        rec[3] |= FLAG_PATH_UPPER
    return bytes(rec)


def same_fh(a: bytes | None, b: bytes | None) -> bool:
    """Two records of one object: equal, the UUID aside where one of them has none (the
    kernel writes null UUIDs with uuid=null/off; pyoverlay writes the filesystem's)."""
    if a is None or b is None or len(a) != len(b) or len(a) < ORIGIN_HEADER:
        return False
    if a == b:
        return True
    ua, ub = a[5:ORIGIN_HEADER], b[5:ORIGIN_HEADER]
    return (ua == _NULL_UUID or ub == _NULL_UUID) and a[:5] == b[:5] and a[ORIGIN_HEADER:] == b[ORIGIN_HEADER:]


def index_name(record: bytes) -> bytes:
    """The index entry's name of an origin record (ovl_get_index_name_fh: hex)."""
    return record.hex().encode()


def parse_nlink(raw: bytes | None) -> tuple[str, int] | None:
    """``overlay.nlink`` (``U+d``, ``L-d``...) -> (U|L, d); None when absent or malformed."""
    if raw is None or len(raw) < 3 or raw[:1] not in (b"U", b"L") or raw[1:2] not in (b"+", b"-"):
        return None
    try:
        return raw[:1].decode(), int(raw[1:].decode("ascii"))
    except ValueError:
        return None


def nlink_of(raw: bytes | None, upper_nlink: int, lower_nlink: int | None, fallback: int) -> int:
    """ovl_get_nlink: the overlay nlink an indexed inode reports; *fallback* where the kernel
    falls back (a lower with one link, no or a bad xattr, a result below 1)."""
    if lower_nlink is not None and lower_nlink == 1:
        return fallback
    parsed = parse_nlink(raw)
    if parsed is None:
        return fallback
    kind, diff = parsed
    if kind == "L":
        if lower_nlink is None:
            return fallback
        n = lower_nlink + diff
    else:
        n = upper_nlink + diff
    return n if n > 0 else fallback


def nlink_value(kind: str, diff: int) -> bytes:
    """The ``overlay.nlink`` text (the kernel's "%c%+i")."""
    return f"{kind}{diff:+d}".encode()


class Index:
    """The index dir of a mounted overlay (an O_PATH fd of ``<workdir>/index``)."""

    def __init__(self, fd: int, names: XattrNames) -> None:
        self.fd = fd
        self.names = names
        # the upper inodes known to be indexed (st_dev, st_ino) -> their lower's link count
        # (the kernel's OVL_INDEX flag): they report the overlay nlink (nlink_of)
        self.indexed: dict[tuple[int, int], int] = {}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def entry(self, name: bytes, mode: int) -> os.stat_result | None:
        """The entry *name* for an origin of type *mode*: None when there is none; EIO when
        it is a whiteout or another type (ovl_lookup_index: "bad index found")."""
        try:
            st = _sys.lstat_at(self.fd, name)
        except FileNotFoundError:
            return None
        if is_whiteout_kind(st.st_mode, st.st_rdev) or stat.S_IFMT(st.st_mode) != stat.S_IFMT(mode):
            log.warning("bad index found (index=index/%s, ftype=%o)", os.fsdecode(name), stat.S_IFMT(st.st_mode))
            raise OSError(errno.EIO, "bad index entry")
        return st

    def open(self, name: bytes) -> int:
        return _sys.open_node(self.fd, name)

    def get_nlink(self, fd: int) -> bytes | None:
        return _sys.getxattr_at(fd, None, self.names.nlink)

    def set_nlink(self, fd: int, kind: str, diff: int) -> None:
        os.setxattr(_sys.proc_path(fd), self.names.nlink, nlink_value(kind, diff), follow_symlinks=True)

    def remove(self, name: bytes, ino: int) -> bool:
        """ovl_cleanup_index without nfs_export: the entry goes (only if it is inode *ino*)."""
        try:
            st = _sys.lstat_at(self.fd, name)
        except FileNotFoundError:
            return False
        if st.st_ino != ino:
            return False
        os.unlink(name, dir_fd=self.fd)
        return True


# --- at mount ------------------------------------------------------------------------------


def _open_root(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _verify_set(fd: int, attr: str, want: bytes, set_it: bool) -> str | None:
    """ovl_verify_set_fh: None if *attr* of *fd* is *want* (written when absent and
    *set_it*); else why not (the kernel's ESTALE)."""
    path = _sys.proc_path(fd)
    try:
        have = os.getxattr(path, attr)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            return exc.strerror
        if not set_it:
            return "no record"
        os.setxattr(path, attr, want)
        return None
    return None if same_fh(have, want) else "another object"


def prepare(workdir_fd: int, upper: str, lowers: list[str], names: XattrNames, fs_uuid, work_mode: int) -> int:
    """ovl_get_indexdir, before the mount: returns an O_PATH fd of ``<workdir>/index``.
    *fs_uuid(fd)*: the UUID an origin record names for an object of fd's filesystem.
    IndexFailed (one line) where the kernel refuses the mount."""
    lower = lowers[0]
    ufd = _open_root(upper)
    try:
        lfd = _open_root(lower)
        try:
            lrec = encode_fh(lfd, fs_uuid(lfd))
        finally:
            os.close(lfd)
        urec = encode_fh(ufd, fs_uuid(ufd), upper=True)
        if lrec is None or urec is None:
            raise IndexFailed("index=on needs file handles on every layer's filesystem")
        why = _verify_set(ufd, names.origin, lrec, True)
        if why is not None:
            raise IndexFailed(
                f"cannot mount with index=on: the upper layer '{upper}' was used over another lower layer than"
                f" '{lower}' (its overlay.origin names {why}; the kernel refuses it too: failed to verify upper"
                " root origin, Stale file handle); mount it over its own lower layers, or with -o index=off"
            )
        with contextlib.suppress(FileExistsError):
            os.mkdir(INDEX_SUBDIR, work_mode, dir_fd=workdir_fd)
        ifd = os.open(INDEX_SUBDIR, _sys.DIR_FLAGS, dir_fd=workdir_fd)
        try:
            st = os.fstat(ifd)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                raise IndexFailed(
                    f"index dir '{os.fsdecode(INDEX_SUBDIR)}' of the workdir is not the mounter's directory"
                )
            # older kernels kept the upper's handle in overlay.origin of the index dir
            old = _sys.getxattr_at(ifd, None, names.origin)
            why = None if old is None else ("another upper" if not same_fh(old, urec) else None)
            if why is None:
                why = _verify_set(ifd, names.upper, urec, True)
            if why is not None:
                raise IndexFailed(
                    f"cannot mount with index=on: the workdir's index belongs to another upper layer than '{upper}'"
                    " (the kernel refuses it too: failed to verify index dir 'upper' xattr, Stale file handle);"
                    " delete the index dir or mount with -o index=off"
                )
            cleanup(ifd, names, lowers)
        except BaseException:
            os.close(ifd)
            raise
        return ifd
    finally:
        os.close(ufd)


def _decode_nlink(rec: bytes, lowers: list[str], mode: int | None = None) -> int | None:
    """The link count of the lower object an origin record names (ovl_check_origin_fh):
    decoded on each lower filesystem; None when none decodes it, or (*mode*: the index
    entry's) when it is of another type ("invalid origin"): stale."""
    from .whiteout import decode_origin

    fh = decode_origin(rec)
    if fh is None:
        return None
    for path in lowers:
        try:
            mfd = _open_root(path)
        except OSError:
            continue
        try:
            fd = _sys.open_by_handle(mfd, fh[0], fh[1])
        except OSError:
            continue
        finally:
            os.close(mfd)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if mode is not None and stat.S_IFMT(st.st_mode) != stat.S_IFMT(mode):
            return None
        return st.st_nlink
    return None


def cleanup(ifd: int, names: XattrNames, lowers: list[str]) -> list[tuple[bytes, str]]:
    """ovl_indexdir_cleanup (without nfs_export): returns what was removed and why.
    IndexFailed where the kernel aborts the mount (an entry it cannot make sense of)."""
    done: list[tuple[bytes, str]] = []
    for name, _kind in _sys.listdir_fd(ifd):
        if name.startswith(b"#"):  # a leftover of an index create or cleanup
            _sys.remove_tree_at(ifd, name)
            done.append((name, "leftover"))
            continue
        st = _sys.lstat_at(ifd, name)
        try:
            rec = bytes.fromhex(name.decode("ascii"))
        except ValueError:
            rec = b""
        if len(rec) < ORIGIN_HEADER or rec[0] != 0 or rec[1] != 0xFB or rec[2] != len(rec):
            raise IndexFailed(
                f"failed index dir cleanup: bad index entry name 'index/{os.fsdecode(name)}' (the kernel refuses"
                " the mount too); delete the index dir or mount with -o index=off"
            )
        if is_whiteout_kind(st.st_mode, st.st_rdev) or stat.S_ISDIR(st.st_mode):
            continue  # nfs_export's entries: kept
        origin = _sys.getxattr_at(ifd, name, names.origin)
        if origin is None:
            raise IndexFailed(
                f"failed index dir cleanup: index entry 'index/{os.fsdecode(name)}' has no origin record (the"
                " kernel refuses the mount too); delete the index dir or mount with -o index=off"
            )
        if not same_fh(origin, rec):
            os.unlink(name, dir_fd=ifd)
            done.append((name, "stale"))
            continue
        if st.st_nlink == 1:
            lower_nlink = _decode_nlink(rec, lowers, st.st_mode)
            if lower_nlink is None:
                os.unlink(name, dir_fd=ifd)
                done.append((name, "stale"))
                continue
            raw = _sys.getxattr_at(ifd, name, names.nlink)
            if nlink_of(raw, st.st_nlink, lower_nlink, 0) == 0:
                log.warning("orphan index entry (index/%s, nlink=%d)", os.fsdecode(name), st.st_nlink)
                os.unlink(name, dir_fd=ifd)
                done.append((name, "orphan"))
    return done
