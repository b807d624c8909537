"""The on-disk encoding of OverlayFS metadata: whiteouts, opaque dirs, private xattrs.

Pure rules over stat results and xattr values, plus thin readers on top of ``_sys``.
The names follow the kernel: private xattrs live under ``trusted.overlay.`` (or
``user.overlay.`` with ``-o userxattr``); a user's own ``trusted.overlay.X`` is
stored escaped as ``trusted.overlay.overlay.X``.
"""

from __future__ import annotations

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


def is_char_whiteout(st: os.stat_result) -> bool:
    """The classic whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def may_be_xwhiteout(st: os.stat_result) -> bool:
    """A zero-size regular file: the only shape an xattr whiteout can have."""
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def is_whiteout_at(dir_fd: int, name: bytes, st: os.stat_result, names: XattrNames) -> bool:
    """Lookup's whiteout test. The kernel honours an xattr whiteout on lookup in any
    directory (ovl_path_is_whiteout), with or without the parent's ``opaque=x`` marker."""
    if is_char_whiteout(st):
        return True
    if may_be_xwhiteout(st):
        return _sys.getxattr_at(dir_fd, name, names.whiteout) is not None
    return False


def opaque_value(dir_fd: int, name: bytes | None, names: XattrNames) -> bytes | None:
    """The ``overlay.opaque`` value of a directory (b"y" opaque, b"x" holds xattr whiteouts)."""
    return _sys.getxattr_at(dir_fd, name, names.opaque)


def is_opaque(value: bytes | None) -> bool:
    return value == b"y"


def has_xwhiteouts(value: bytes | None) -> bool:
    return value == b"x"
