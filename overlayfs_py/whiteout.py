"""The on-disk encoding of OverlayFS metadata, in one place: whiteouts (the test and
their creation), opaque directories, origin records, redirects and the private xattr
names.

Pure rules over stat results and xattr values, plus thin readers and writers on top of
``_sys``. The names follow the kernel: private xattrs live under ``trusted.overlay.`` (or
``user.overlay.`` with ``-o userxattr``); a user's own ``trusted.overlay.X`` is stored
escaped as ``trusted.overlay.overlay.X``. Every module that asks "is this a whiteout?"
(the lookup, the listing, the write path, ``diff``, the image store's layer tar and
extraction) asks :func:`is_whiteout_at` or :func:`is_char_whiteout`.
"""

from __future__ import annotations

import errno
import os
import stat

from . import _sys

TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."
ESCAPE = "overlay."


def prefix_for(userxattr: bool) -> str:
    """The private xattr prefix: ``user.overlay.`` with ``-o userxattr``, else ``trusted.overlay.``."""
    return USER_PREFIX if userxattr else TRUSTED_PREFIX


class XattrNames:
    """The private xattr names of one mount (``trusted.overlay.*`` or ``user.overlay.*``)."""

    @classmethod
    def for_userxattr(cls, userxattr: bool) -> XattrNames:
        return cls(prefix_for(userxattr))

    def __init__(self, prefix: str = TRUSTED_PREFIX) -> None:
        self.prefix = prefix
        self.opaque = prefix + "opaque"
        self.whiteout = prefix + "whiteout"
        self.origin = prefix + "origin"
        self.redirect = prefix + "redirect"
        self.impure = prefix + "impure"
        self.nlink = prefix + "nlink"  # index=on: the overlay nlink of an indexed inode
        self.upper = prefix + "upper"  # index=on: the upper root's handle, on the index dir
        self.metacopy = prefix + "metacopy"
        self.escaped_prefix = prefix + ESCAPE

    # The kernel hides every name under the private prefix and shows an escaped
    # ``overlay.overlay.X`` as ``overlay.X`` (Documentation/filesystems/overlayfs.rst,
    # "Nesting overlayfs mounts").
    def to_user(self, real: str) -> str | None:
        """How a real xattr name on a layer object is shown through the mount (None: hidden)."""
        if not real.startswith(self.prefix):
            return real
        if real.startswith(self.escaped_prefix):
            return self.prefix + real[len(self.escaped_prefix) :]
        return None

    def to_real(self, user: str) -> str:
        """The name under which a user's xattr is stored in a layer."""
        if user.startswith(self.prefix):
            return self.escaped_prefix + user[len(self.prefix) :]
        return user


def is_whiteout_kind(mode: int, rdev: int) -> bool:
    """Whether an object of *mode* and device *rdev* is the classic whiteout (char 0/0)."""
    return stat.S_ISCHR(mode) and rdev == 0


def is_char_whiteout(st: os.stat_result) -> bool:
    """The classic whiteout: a character device 0/0."""
    return is_whiteout_kind(st.st_mode, st.st_rdev)


def may_be_xwhiteout(st: os.stat_result) -> bool:
    """A zero-size regular file: the only shape an xattr whiteout can have."""
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def is_whiteout_at(dir_fd: int, name: bytes, st: os.stat_result, names: XattrNames | None, xattr: bool = True) -> bool:
    """The whiteout test: *name* in *dir_fd*, whose lstat is *st*, is a char 0/0 device or
    (with *xattr* and *names*) a zero-size regular file carrying ``overlay.whiteout``.

    Lookup honours an xattr whiteout in any directory (the kernel's ovl_path_is_whiteout,
    with or without the parent's ``opaque=x`` marker); readdir only in a lower directory
    marked ``opaque=x`` (the caller passes *xattr* accordingly)."""
    if is_char_whiteout(st):
        return True
    if xattr and names is not None and may_be_xwhiteout(st):
        return _sys.getxattr_at(dir_fd, name, names.whiteout) is not None
    return False


WHITEOUT_MODE = stat.S_IFCHR | 0o000  # the kernel's whiteout: a char device 0/0, mode 0


def make_whiteout(dir_fd: int, name: bytes) -> None:
    """Create the classic whiteout *name* in *dir_fd* (what ovl_whiteout makes)."""
    os.mknod(name, WHITEOUT_MODE, 0, dir_fd=dir_fd)


def opaque_value(dir_fd: int, name: bytes | None, names: XattrNames) -> bytes | None:
    """The ``overlay.opaque`` value of a directory (b"y" opaque, b"x" holds xattr whiteouts)."""
    return _sys.getxattr_at(dir_fd, name, names.opaque)


def is_opaque(value: bytes | None) -> bool:
    return value == b"y"


def set_opaque(dir_fd: int, name: bytes | None, names: XattrNames) -> bool:
    """Mark directory *name* in *dir_fd* opaque (name None: *dir_fd* is the directory's own
    fd, reached through its magic link; a name is never followed). False if it already was."""
    if is_opaque(opaque_value(dir_fd, name, names)):
        return False
    os.setxattr(_sys.proc_path(dir_fd, name), names.opaque, b"y", follow_symlinks=name is None)
    return True


def set_impure(dir_fd: int, names: XattrNames) -> bool:
    """Mark the upper directory *dir_fd* (its own fd) ``overlay.impure=y``, as the kernel's
    ``ovl_set_impure`` does when an object with an origin record may now be in it (a copy-up
    into it, a link or a move of such an object into it): the kernel's readdir of a pure
    upper directory then looks the entries' origins up for their ``d_ino``. pyoverlay never
    reads the mark (its ``d_ino`` always equals ``st_ino``); it writes it so that a kernel
    mounting its upper lists such a directory as it stats it. False if it already was, or
    the upper filesystem takes no such xattr (the kernel ignores that too)."""
    if _sys.getxattr_at(dir_fd, None, names.impure) is not None:
        return False
    try:
        os.setxattr(_sys.proc_path(dir_fd, None), names.impure, b"y", follow_symlinks=True)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True


def has_origin(fd: int, names: XattrNames) -> bool:
    """Whether the upper object of *fd* carries an origin record (the kernel's
    ``ovl_type_origin``)."""
    return _sys.getxattr_at(fd, None, names.origin) is not None


def has_xwhiteouts(value: bytes | None) -> bool:
    return value == b"x"


def redirect_at(dir_fd: int, name: bytes, names: XattrNames) -> bytes | None:
    """The ``overlay.redirect`` of directory *name* in *dir_fd*: where the layers below
    continue (relative: a sibling; absolute: a path from the lower roots)."""
    return _sys.getxattr_at(dir_fd, name, names.redirect)


# --- metacopy records (struct ovl_metacopy) ---------------------------------------------------

METACOPY_MIN = 4  # version, len, flags, digest_algo (OVL_METACOPY_MIN_SIZE)
METACOPY_MAX = 4 + 64  # with the largest fs-verity digest (OVL_METACOPY_MAX_SIZE)


def metacopy_at(dir_fd: int, name: bytes | None, st: os.stat_result, names: XattrNames) -> bool:
    """Whether regular file *name* in *dir_fd* (lstat *st*) is a metacopy file: its data is
    in a layer below (the kernel's ovl_check_metacopy_xattr). The kernel writes the xattr
    empty (no fs-verity digest); a value is ``struct ovl_metacopy`` (version 0, its own
    length, flags, digest algorithm, digest). A malformed one is EIO, as the kernel's."""
    if not stat.S_ISREG(st.st_mode):
        return False
    raw = _sys.getxattr_at(dir_fd, name, names.metacopy)
    if raw is None:
        return False
    if raw and not (METACOPY_MIN <= len(raw) <= METACOPY_MAX and raw[0] == 0 and raw[1] == len(raw)):
        raise OSError(errno.EIO, "invalid metacopy xattr")
    return True


# --- origin records (struct ovl_fb) ---------------------------------------------------------

ORIGIN_HEADER = 21  # version, magic, len, flags, type, 16-byte uuid


def decode_origin(raw: bytes) -> tuple[int, bytes] | None:
    """Parse the kernel's origin record (struct ovl_fb): version 0, magic 0xfb, len, flags,
    type, 16-byte uuid, then the file handle. Returns (handle type, handle bytes)."""
    if len(raw) < ORIGIN_HEADER or raw[0] != 0 or raw[1] != 0xFB or raw[2] != len(raw):
        return None
    return raw[4], raw[ORIGIN_HEADER:]


def encode_origin(handle_type: int, handle: bytes, uuid: bytes | None) -> bytes:
    """The kernel's origin record for a lower object (what ovl_encode_real_fh writes)."""
    u = (uuid or b"\0" * 16)[:16].ljust(16, b"\0")
    return bytes([0, 0xFB, ORIGIN_HEADER + len(handle), 0, handle_type]) + u + handle


# --- AUFS-style whiteouts (-o aufs_whiteouts=on) ---------------------------------------------
#
# containers/storage writes a layer it stores from a tar with the whiteouts of the tar (OCI
# image spec, "Whiteouts"): a deleted NAME is an empty file ``.wh.NAME`` beside it, an opaque
# directory holds ``.wh..wh..opq``. fuse-overlayfs honours them in every layer (main.c:
# do_lookup_file, load_dir, is_directory_opaque); the kernel shows them as plain files. With
# the option on, pyoverlay asks the rules below, and only them:
#
# * a name starting with ``.wh.`` is a marker: it is never listed, never found by a lookup
#   through the mount, and cannot be created through it (EINVAL, as fuse-overlayfs's create);
# * a marker ``.wh.NAME`` (any file type) in a directory of a layer hides NAME in that layer
#   and in every layer below (a directory merge ends at that layer);
# * a directory holding ``.wh..wh..opq`` is opaque, as with ``overlay.opaque=y``.
#
# What pyoverlay writes in the upper stays the kernel's format (char 0/0, ``overlay.opaque``);
# a marker already in the upper is removed when NAME is made there (fuse-overlayfs's
# delete_whiteout).

AUFS_PREFIX = b".wh."
AUFS_OPAQUE = b".wh..wh..opq"


def is_aufs_marker(name: bytes) -> bool:
    """Whether *name* is an AUFS marker name (``.wh.X``, ``.wh..wh..opq`` included)."""
    return name.startswith(AUFS_PREFIX)


def aufs_marker_for(name: bytes) -> bytes:
    """The marker name that hides *name*: ``.wh.NAME``."""
    return AUFS_PREFIX + name


def aufs_hidden(name: bytes) -> bytes | None:
    """The name a marker *name* hides (None: not a marker, or the opaque marker)."""
    if not name.startswith(AUFS_PREFIX) or name == AUFS_OPAQUE:
        return None
    return name[len(AUFS_PREFIX) :]


def _exists_at(dir_fd: int, name: bytes) -> bool:
    try:
        _sys.lstat_at(dir_fd, name)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # ".wh." made a valid name too long: no marker
            return False
        raise
    return True


def aufs_whiteout_at(dir_fd: int, name: bytes) -> bool:
    """Whether directory *dir_fd* holds the marker ``.wh.NAME`` (of any file type)."""
    return _exists_at(dir_fd, AUFS_PREFIX + name)


def aufs_opaque_at(dir_fd: int, name: bytes | None) -> bool:
    """Whether directory *name* in *dir_fd* (None: *dir_fd* itself) holds ``.wh..wh..opq``."""
    return _exists_at(dir_fd, AUFS_OPAQUE if name is None else name + b"/" + AUFS_OPAQUE)


def aufs_markers(names: list[tuple[bytes, int]]) -> tuple[set[bytes], bool]:
    """From one layer directory's listing: the names its markers hide, and whether it holds
    the opaque marker (no syscall: the names say it)."""
    hidden: set[bytes] = set()
    opaque = False
    for name, _kind in names:
        if name.startswith(AUFS_PREFIX):
            if name == AUFS_OPAQUE:
                opaque = True
            else:
                hidden.add(name[len(AUFS_PREFIX) :])
    return hidden, opaque
