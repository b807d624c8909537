"""The kernel's ``-o uuid=on|off|null|auto``: the overlay's own UUID and the UUIDs that
origin records carry.

Kernel 6.18 (Documentation/filesystems/overlayfs.rst, "UUID and fsid"; params.c,
super.c ``ovl_fill_super``, util.c ``ovl_init_uuid_xattr``, namei.c ``ovl_encode_real_fh``
and ``ovl_decode_real_fh``), checked against its mounts by tests/test_uuid.py:

* ``null``: the overlay has no UUID of its own (statfs ``f_fsid`` is the upper
  filesystem's). Origin records carry the UUID of the source's filesystem and are
  followed only into a lower filesystem with that UUID.
* ``off``: as ``null``, but origin records carry a null UUID and only records with a null
  UUID are followed, on whatever filesystem the layers are now (a copy of the layers on
  another filesystem, a filesystem whose UUID changed). It needs every layer on one
  filesystem (with an upper layer, every lower on the upper's): otherwise the kernel
  falls back to ``null`` with a warning, and so does pyoverlay.
* ``on``: the overlay's UUID is read from ``overlay.uuid`` on the upper root, or generated
  and written there on the first mount: the kernel reports a persistent statfs ``f_fsid``
  derived from it (:func:`fsid`). Origin records as with ``null``. Without an upper layer
  the kernel falls back to ``null``.
* ``auto`` (the default): as ``on`` when the upper root has ``overlay.uuid`` (the mode
  stays ``auto``); becomes ``on`` when the upper is new (its root not marked
  ``overlay.impure``, which the first copy-up into the root or the first lookup of its
  merged subdirectories sets); ``null`` for an upper used before without one. Without an
  upper layer nothing is read or written.

Reading an ``overlay.uuid`` that is not 16 bytes, or failing to write one, falls back to
``null`` with a warning, the xattr left as it is (the kernel's ``fail:`` path). The
kernel writes ``overlay.uuid`` on a read-only mount (``-o ro``) with an upper layer too;
pyoverlay does the same.

What pyoverlay cannot do: a FUSE ``statfs`` reply has no ``f_fsid`` (the kernel's FUSE
reports 0 for every mount), so the persistent fsid the kernel derives from the UUID is
not seen through a pyoverlay mount; and a FUSE superblock has no ``s_uuid``
(``FS_IOC_GETFSUUID`` on the mount fails with ENOTTY). The UUID is kept on disk exactly as
the kernel keeps it, so a kernel mount of the same upper reports the same fsid as before.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import uuid as uuidlib

from . import _sys
from .whiteout import XattrNames

log = logging.getLogger(__name__)

#: the values of ``-o uuid=`` (the kernel's ovl_parameter_uuid)
UUID_MODES = ("on", "off", "null", "auto")
#: the kernel's default (``ovl_uuid_def``): auto, not a module parameter
UUID_DEFAULT = "auto"
NULL_UUID = bytes(16)


def asked(mode: str, *, upper: bool) -> str:
    """The mode a mount asking for *mode* ("" = not given) starts with (params.c,
    ``ovl_fs_params_verify``): ``on`` without an upper layer is ``null``."""
    mode = mode or UUID_DEFAULT
    if mode not in UUID_MODES:
        raise ValueError(f"invalid uuid mode {mode!r}")
    if mode == "on" and not upper:
        log.warning('option "uuid=on" requires an upper fs, falling back to uuid=null')
        return "null"
    return mode


def fsid(uuid: bytes) -> tuple[int, int]:
    """The statfs ``f_fsid`` the kernel reports for an overlay with UUID *uuid*
    (``uuid_to_fsid``): the two little-endian 64-bit halves xor'ed, as (val[0], val[1])."""
    a, b, c, d = struct.unpack("<4I", uuid)
    return a ^ c, b ^ d


def settle(stack, names: XattrNames, mode: str) -> tuple[str, bytes]:
    """The effective mode and the overlay's UUID (null when it has none) of a mount of
    *stack* that asked for *mode* ("" = not given), as ``ovl_fill_super`` settles them;
    writes ``overlay.uuid`` on the upper root where the kernel does. Records both on the
    stack (``stack.uuid_mode``, ``stack.overlay_uuid``), which origin records follow.
    Settling an effective mode again gives the same mode and UUID."""
    upper = stack.upper
    several_fs = upper is None or any(layer.dev != upper.dev for layer in stack.lowers)
    mode, uuid = _settle(upper.fd if upper is not None else None, several_fs, names, mode)
    stack.uuid_mode = mode
    stack.overlay_uuid = uuid
    return mode, uuid


def settle_config(cfg):
    """*cfg* (a MountConfig whose userxattr is decided) with its effective ``uuid`` mode,
    settled as the kernel does while mounting: the server calls it before the mount goes
    live, so ``overlay.uuid`` is on the upper root when ``pyoverlay mount`` returns (and
    the mount record shows the mode, as ``/proc/mounts`` does the kernel's)."""
    import dataclasses

    if cfg.upperdir is None:
        return dataclasses.replace(cfg, uuid=_settle(None, True, XattrNames(cfg.xattr_prefix), cfg.uuid)[0])
    fd = os.open(cfg.upperdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dev = os.fstat(fd).st_dev
        several_fs = any(os.stat(low).st_dev != dev for low in cfg.lowerdirs)
        mode = _settle(fd, several_fs, XattrNames(cfg.xattr_prefix), cfg.uuid)[0]
    finally:
        os.close(fd)
    return dataclasses.replace(cfg, uuid=mode)


def _settle(upper_fd: int | None, several_fs: bool, names: XattrNames, mode: str) -> tuple[str, bytes]:
    mode = asked(mode, upper=upper_fd is not None)
    if mode == "off" and several_fs:
        log.warning("The uuid=off requires a single fs for lower and upper, falling back to uuid=null")
        return "null", NULL_UUID
    if mode in ("on", "auto") and upper_fd is not None:
        return _init_uuid_xattr(upper_fd, names, mode)
    return mode, NULL_UUID


def _init_uuid_xattr(root_fd: int, names: XattrNames, mode: str) -> tuple[str, bytes]:
    """``ovl_init_uuid_xattr``: the UUID in ``overlay.uuid`` on the upper root (its O_PATH
    fd *root_fd*), else (``on``, or ``auto`` on a new upper) a new one written there."""
    path = _sys.proc_path(root_fd)
    name = names.prefix + "uuid"
    doing = "get"
    try:
        try:
            value = os.getxattr(path, name)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
        else:
            if len(value) == len(NULL_UUID):
                return mode, value  # auto stays auto (the kernel shows no uuid= then)
            raise OSError(errno.ERANGE if len(value) > len(NULL_UUID) else errno.EINVAL, "not a UUID")
        if mode == "auto":
            try:
                impure = os.getxattr(path, names.impure)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                mode = "on"  # the first mount of a new overlay: upgrade to uuid=on
            else:
                if impure:  # an overlay used before without one: downgrade to uuid=null
                    return "null", NULL_UUID
        uuid = uuidlib.uuid4().bytes  # the kernel's uuid_gen: a random (version 4) UUID
        doing = "set"
        os.setxattr(path, name, uuid)
        return mode, uuid
    except OSError as exc:
        log.warning(
            "failed to %s uuid (%s, %s); falling back to uuid=null", doing, name, os.strerror(exc.errno or errno.EIO)
        )
        return "null", NULL_UUID
