"""Which namespace holds the overlay's private xattrs: ``trusted.overlay.*`` or
``user.overlay.*`` (the kernel's ``-o userxattr``), chosen and recorded per upper layer.

Only CAP_SYS_ADMIN in the initial user namespace may use ``trusted.*`` (privilege.py), so
a mount by anyone else uses ``user.overlay.*`` without being asked. Once an upper layer has
been written in one form it must be read in that form, so the form is *recorded*:

* in ``<workdir>/pyoverlay.json`` (``{"userxattr": true}``), written at every read-write
  mount; the kernel leaves entries of the workdir other than ``work/`` and ``index/``
  alone (checked on Linux 6.18), so the record survives kernel mounts of the same layers;
* without a record, the upper's existing private xattrs decide (diff.detect_userxattr:
  the first one found); an upper without any is fresh.

``plan(cfg)`` is the planning step between parsing (config.py, pure) and the fork of the
server: it asks privilege.py, reads the record and may scan the upper, and returns the
configuration with ``userxattr`` decided. ``pyoverlay mount`` calls it, and
``mount.start_background`` for a configuration that arrives undecided (the runner's);
the server only checks that it was done.

Rules (``choose``): a recorded form wins when no form is asked for; asking for the other
one (``-o userxattr`` / ``-o nouserxattr``) is an error; so is ``trusted.*`` asked for or
recorded when the mounter is not privileged (it could neither read nor write them).
Otherwise: ``user.*`` when asked for or when not privileged, else ``trusted.*``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat

from .config import ConfigError, MountConfig, resolve_features
from .whiteout import prefix_for

RECORD = "pyoverlay.json"


def option(userxattr: bool) -> str:
    return "userxattr" if userxattr else "nouserxattr"


def choose(
    requested: bool | None, recorded: bool | None, privileged: bool, *, upper: str = "", where: str = ""
) -> bool:
    """The form to use (True: ``user.overlay.*``). Pure; raises ConfigError on a conflict.
    *upper* and *where* (how the form was recorded) only word the messages."""
    if recorded is not None:
        if requested is not None and requested != recorded:
            raise ConfigError(
                f"upper layer '{upper}' has {prefix_for(recorded)}* private xattrs ({where}):"
                f" -o {option(requested)} conflicts with it (drop the option)"
            )
        if not recorded and not privileged:
            raise ConfigError(
                f"upper layer '{upper}' has trusted.overlay.* private xattrs ({where}), which only"
                " root (CAP_SYS_ADMIN in the initial user namespace) can use: mount it as root"
            )
        return recorded
    if requested is False and not privileged:
        raise ConfigError(
            "-o nouserxattr (trusted.overlay.* private xattrs) needs root (CAP_SYS_ADMIN in the"
            " initial user namespace): drop it, pyoverlay then uses user.overlay.*"
        )
    return True if requested else not privileged


def recorded(cfg: MountConfig) -> tuple[bool | None, str]:
    """The form the upper layer of *cfg* was written with, and how that is known."""
    if cfg.upperdir is None:
        return None, ""
    if cfg.workdir is not None:
        path = os.path.join(cfg.workdir, RECORD)
        try:
            data = _load(path)
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read '{path}': {exc}") from None
        value = data.get("userxattr") if isinstance(data, dict) else "?"
        if isinstance(value, bool):
            return value, f"recorded in '{path}'"
        if value is not None:
            raise ConfigError(f"'{path}' has a bad userxattr record (want true or false): remove it")
    from .diff import detect_userxattr

    try:
        found = detect_userxattr(cfg.upperdir)
    except OSError:
        return None, ""  # validation reports an unreadable upper
    return found, "found on its files"


MAX_RECORD = 1 << 16  # a record is a few bytes; never read more than this of one


def _load(path: str, dir_fd: int | None = None):
    """The record's JSON: *path* (relative to *dir_fd* if given). Neither a symlink in its
    place is followed (ELOOP) nor anything but a regular file read (a FIFO or a device
    planted there would block or do harm: EINVAL)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return json.loads(f.read(MAX_RECORD))


def resolve(cfg: MountConfig, privileged: bool) -> MountConfig:
    """*cfg* with ``userxattr`` decided (True/False, never None)."""
    rec, where = recorded(cfg)
    value = choose(cfg.userxattr, rec, privileged, upper=cfg.upperdir or "", where=where)
    cfg = cfg if value is cfg.userxattr else dataclasses.replace(cfg, userxattr=value)
    return resolve_features(cfg)  # the redirect mode depends on the namespace


def plan(cfg: MountConfig) -> MountConfig:
    """The planning step: *cfg* (parsed and validated) with the private xattr namespace
    decided for this process (its privilege, the workdir's record, the upper's xattrs).
    Raises ConfigError on a conflict. Run it once, before forking the server."""
    from .privilege import privileged

    return resolve(cfg, privileged())


def record(cfg: MountConfig, dir_fd: int | None = None) -> None:
    """Write the form of a read-write mount into its workdir (atomically; other keys are kept).
    *dir_fd*: the workdir, opened and checked by the server (workdir.WorkDir); every name is
    then relative to it and never followed. Without it the workdir path is opened here."""
    if cfg.workdir is None or cfg.read_only:
        return
    if dir_fd is not None:
        _record_at(dir_fd, bool(cfg.userxattr))
        return
    fd = os.open(cfg.workdir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _record_at(fd, bool(cfg.userxattr))
    finally:
        os.close(fd)


def _record_at(dir_fd: int, value: bool) -> None:
    data: dict = {}
    try:
        data = _load(RECORD, dir_fd)
    except (OSError, ValueError):
        pass
    if not isinstance(data, dict):
        data = {}
    if data.get("userxattr") is value:
        return
    data["userxattr"] = value
    tmp = f"{RECORD}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)  # a leftover of a crashed server with this pid
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(tmp, flags, 0o644, dir_fd=dir_fd), "w") as f:
        json.dump(data, f)
        f.write("\n")
    os.replace(tmp, RECORD, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
