"""The kernel's optional overlay features: their defaults and the rules between them.

The kernel reads a feature's default from its module parameters
(``/sys/module/overlay/parameters/*``, fs/overlayfs/params.c) when the mount does not name
it, then resolves the dependencies between the features in ``ovl_fs_params_verify``. This
module does both, in one place, for the features pyoverlay implements:

* ``redirect_dir=on|follow|nofollow|off`` (``MountConfig.redirect_dir``): ``on`` creates
  redirects (a directory with lower content is renamed, not refused with EXDEV) and
  follows them; ``follow`` follows, never creates; ``nofollow`` neither; ``off`` is
  ``follow`` when the module's ``redirect_always_follow`` is Y, else ``nofollow``
  (the kernel's ``Opt_redirect_dir``). Without the option: ``on`` when the module's
  ``redirect_dir`` is Y, else ``follow``/``nofollow`` by ``redirect_always_follow``
  (``ovl_redirect_mode_def``).
* userxattr: an explicit ``redirect_dir`` other than ``nofollow`` is refused ("conflicting
  options", the kernel's EINVAL); without one the mode is ``nofollow``.
* ``metacopy=on|off`` (``MountConfig.metacopy``, resolved to ``on``/``off`` by
  :func:`resolve`): ``on`` copies up the metadata only of a lower regular file changed by
  anything but a write of its data (copyup.py) and follows metacopy files to their data
  (layers.py); ``off`` refuses to follow them (EPERM). Without the option: the module's
  ``metacopy`` parameter. ``metacopy=on`` turns ``redirect_dir`` on; userxattr refuses it.
* ``index=on|off`` (``MountConfig.index``): default from the module's ``index``; off
  without an upper layer (a read-only mount with one keeps it), and where the kernel could
  not decode file handles (:func:`can_index`: not root in the initial user namespace, a layer's filesystem
  without handles), as the kernel falls back. index.py keeps the index (the kernel's
  ``<workdir>/index``): a copy-up of a hard-linked lower file goes there first and is then
  linked at its name, so the links stay together; mount-time checks (``overlay.origin`` on
  the upper root, ``overlay.upper`` on the index dir) and cleanup are the kernel's.
  ``nfs_export=on`` is refused by config.py: a FUSE mount is not exportable through the
  kernel's nfsd export operations.

The kernel's other rules, for the features still refused by config.py
(``nfs_export``, ``verity``), are code too (:func:`verify`, checked against the
kernel's mounts), in ovl_fs_params_verify's order: verity needs metacopy (an explicit
metacopy=off conflicts); metacopy needs ``redirect_dir=on`` (both explicit: conflict; an
explicit redirect_dir turns metacopy off; else redirect_dir becomes on); nfs_export needs
index (explicit index=off: conflict or nfs_export off); nfs_export excludes metacopy; userxattr excludes an explicit
metacopy=on and verity. A mount without an upper layer treats ``follow`` as ``on``
(nothing is created there).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .errors import PyoverlayError

#: the values of ``-o redirect_dir=`` (the kernel's ovl_parameter_redirect_dir)
REDIRECT_CHOICES = ("on", "follow", "nofollow", "off")
#: where the kernel's module parameters are
PARAMS_DIR = "/sys/module/overlay/parameters"
#: the kernel's default of ``redirect_max`` (an absolute redirect longer is EXDEV)
REDIRECT_MAX_DEFAULT = 256


class FeatureConflict(PyoverlayError):
    """Options the kernel refuses together (its EINVAL); the message is one line (a usage
    error, exit status 2, as ConfigError)."""

    exit_code = 2


def module_param(name: str, default: str, params_dir: str = PARAMS_DIR) -> str:
    """A module parameter of the overlay module (its text, stripped); *default* when the
    module is not loaded or the parameter is unknown (an older kernel)."""
    try:
        with open(os.path.join(params_dir, name), encoding="ascii", errors="replace") as f:
            return f.read(64).strip()
    except OSError:
        return default


def _yes(value: str) -> bool:
    return value in ("Y", "y", "1")


def redirect_default(params_dir: str = PARAMS_DIR) -> str:
    """The kernel's ``ovl_redirect_mode_def``: on (redirect_dir=Y), else follow or nofollow
    by redirect_always_follow (its Kconfig defaults: N and Y)."""
    if _yes(module_param("redirect_dir", "N", params_dir)):
        return "on"
    return "follow" if _yes(module_param("redirect_always_follow", "Y", params_dir)) else "nofollow"


def redirect_max(params_dir: str = PARAMS_DIR) -> int:
    """The module's ``redirect_max``: the longest absolute redirect written."""
    try:
        return max(1, int(module_param("redirect_max", str(REDIRECT_MAX_DEFAULT), params_dir)))
    except ValueError:
        return REDIRECT_MAX_DEFAULT


@dataclass(frozen=True)
class Asked:
    """What a mount asked for; None: the option was not given (the module's default)."""

    redirect_dir: str | None = None  # on|follow|nofollow|off
    metacopy: bool | None = None
    index: bool | None = None
    nfs_export: bool | None = None
    verity: str | None = None  # off|on|require
    userxattr: bool = False
    upper: bool = True  # the mount has an upper layer


@dataclass(frozen=True)
class Resolved:
    """The features a mount ends up with (the kernel's ``struct ovl_config`` fields)."""

    redirect_dir: str  # on|follow|nofollow
    metacopy: bool
    index: bool
    nfs_export: bool
    verity: str


def defaults(params_dir: str = PARAMS_DIR) -> Resolved:
    """The module's defaults (ovl_init_fs_context): what a mount without options gets."""
    return Resolved(
        redirect_default(params_dir),
        _yes(module_param("metacopy", "N", params_dir)),
        _yes(module_param("index", "N", params_dir)),
        _yes(module_param("nfs_export", "N", params_dir)),
        "off",
    )


def verify(asked: Asked, *, params_dir: str = PARAMS_DIR) -> Resolved:
    """The kernel's option rules in one place: ovl_parse_param's (``redirect_dir=off`` is
    follow or nofollow by ``redirect_always_follow``) then ovl_fs_params_verify's, in its
    order. Raises FeatureConflict where the kernel refuses the mount (EINVAL).

    pyoverlay implements redirect_dir, metacopy and index (config.py refuses nfs_export
    and verity other than off), but every rule is here, checked against the kernel's
    mounts (tests/test_redirect_dir.py), for when those features come."""
    d = defaults(params_dir)
    if asked.redirect_dir is not None and asked.redirect_dir not in REDIRECT_CHOICES:
        raise FeatureConflict(f"invalid value '{asked.redirect_dir}' for redirect_dir")
    redirect = asked.redirect_dir or d.redirect_dir
    if redirect == "off":
        redirect = "follow" if _yes(module_param("redirect_always_follow", "Y", params_dir)) else "nofollow"
    set_redirect, set_metacopy = asked.redirect_dir is not None, asked.metacopy is not None
    set_index, set_nfs = asked.index is not None, asked.nfs_export is not None
    metacopy = d.metacopy if asked.metacopy is None else asked.metacopy
    index = d.index if asked.index is None else asked.index
    nfs_export = d.nfs_export if asked.nfs_export is None else asked.nfs_export
    verity = asked.verity or "off"

    def conflict(what: str) -> FeatureConflict:
        return FeatureConflict(f"conflicting options: {what} (the kernel refuses them too)")

    if not asked.upper:  # index is useless without an upper layer
        index, set_index = False, False
    if verity != "off" and not metacopy:  # verity -> metacopy
        if set_metacopy:
            raise conflict(f"metacopy=off,verity={verity}")
        metacopy = True
    if not asked.upper and redirect == "follow":  # "redirect_dir=on is only used for upper"
        redirect = "on"
    if metacopy and redirect != "on":  # metacopy -> redirect_dir=on
        if set_metacopy and set_redirect:
            raise conflict(f"metacopy=on,redirect_dir={redirect}")
        if verity != "off" and set_redirect:
            raise conflict(f"verity={verity},redirect_dir={redirect}")
        if set_redirect:
            metacopy = False
        else:
            redirect = "on"
    if nfs_export and not index:  # nfs_export -> index
        if not asked.upper and redirect != "nofollow":
            nfs_export = False
        elif set_nfs and set_index:
            raise conflict("nfs_export=on,index=off")
        elif set_index:
            nfs_export = False
        else:
            index = True
    if nfs_export and metacopy:  # nfs_export -> !metacopy
        if set_nfs and set_metacopy:
            raise conflict("nfs_export=on,metacopy=on")
        if set_metacopy or verity != "off":
            nfs_export = False
        else:
            metacopy = False
    if asked.userxattr:  # userxattr -> !redirect, !metacopy, !verity
        if set_redirect and redirect != "nofollow":
            raise FeatureConflict(
                f"conflicting options: userxattr,redirect_dir={asked.redirect_dir} (the kernel refuses them"
                " too: with userxattr redirects are neither created nor followed; use redirect_dir=nofollow)"
            )
        if metacopy and set_metacopy:
            raise conflict("userxattr,metacopy=on")
        if verity != "off":
            raise conflict(f"userxattr,verity={verity}")
        redirect, metacopy = "nofollow", False
    return Resolved(redirect, metacopy, index, nfs_export, verity)


def effective_redirect(asked: str, userxattr: bool, *, upper: bool = True, params_dir: str = PARAMS_DIR) -> str:
    """The redirect mode of a mount that asked for *asked* ("" = not given), the kernel's
    way (:func:`verify`). Raises FeatureConflict where the kernel refuses the mount
    (EINVAL; config.resolve_features makes it a ConfigError)."""
    asked_ = Asked(redirect_dir=asked or None, userxattr=userxattr, upper=upper)
    return verify(asked_, params_dir=params_dir).redirect_dir


def resolve(cfg):
    """*cfg* (a MountConfig whose ``userxattr`` is decided) with its features resolved: the
    effective ``redirect_dir``, ``metacopy`` (on|off) and ``index`` (a bool). Idempotent; a
    cfg whose userxattr is still None is returned as is (userxattr.plan resolves it).
    FeatureConflict: use config.resolve_features."""
    if cfg.userxattr is None:
        return cfg
    upper = cfg.upperdir is not None
    asked = Asked(
        redirect_dir=cfg.redirect_dir or None,
        metacopy={"on": True, "off": False}.get(cfg.metacopy),
        index=cfg.index,
        userxattr=bool(cfg.userxattr),
        upper=upper,
    )
    res = verify(asked)
    metacopy = "on" if res.metacopy else "off"
    index = res.index and cfg.workdir is not None and can_index(cfg)
    if res.redirect_dir == cfg.redirect_dir and metacopy == cfg.metacopy and index is cfg.index:
        return cfg
    return dataclasses.replace(cfg, redirect_dir=res.redirect_dir, metacopy=metacopy, index=index)


def can_index(cfg) -> bool:
    """Whether the kernel could keep an inodes index for *cfg* (ovl_can_decode_fh on every
    layer, fs/overlayfs/super.c): the mounter holds CAP_DAC_READ_SEARCH (root in the initial
    user namespace) and every layer's filesystem encodes file handles. Where it cannot, the
    kernel falls back to ``index=off`` (a warning) and so does pyoverlay."""
    from . import _sys

    if os.geteuid() != 0 or not _initial_userns() or cfg.upperdir is None:
        return False
    upper_dev = None
    lower_fs: dict[int, bytes] = {}  # st_dev -> UUID of each lower filesystem but the upper's
    for i, path in enumerate((cfg.upperdir, *cfg.lowerdirs)):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if _sys.name_to_handle(fd) is None:
                return False
            dev = os.fstat(fd).st_dev
            if i == 0:
                upper_dev = dev
            elif dev != upper_dev and dev not in lower_fs:
                lower_fs[dev] = _sys.fs_uuid(fd) or b"\0" * 16
        finally:
            os.close(fd)
    # ovl_lower_uuid_ok with index: two lower filesystems with one UUID (null included)
    # cannot be told apart by origin records: "falling back to ... index=off"
    return len(set(lower_fs.values())) == len(lower_fs)


def _initial_userns() -> bool:
    """Whether this process is in the initial user namespace (privilege.initial_userns,
    which this module cannot import: privilege imports config, which imports this)."""
    try:
        with open("/proc/self/uid_map") as f:
            lines = [line.split() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:  # a kernel without user namespaces
        return True
    return lines == [["0", "0", "4294967295"]]


def indexes(cfg) -> bool:
    """Whether a mount of *cfg* keeps the inodes index (``index=on``, resolved). A read-only
    mount with an upper uses it too (its index serves names), as the kernel's ``ro`` does."""
    return bool(cfg.index) and cfg.userxattr is not None and cfg.upperdir is not None and cfg.workdir is not None


def metacopy_default(params_dir: str = PARAMS_DIR) -> str:
    """The module's ``metacopy`` (on|off): what a mount that does not name it gets, before
    the rules between the options."""
    return "on" if _yes(module_param("metacopy", "N", params_dir)) else "off"


def metacopy(cfg) -> bool:
    """Whether a mount of *cfg* has metacopy on: metacopy files are followed (off: a lookup
    that meets one is EPERM) and, on a writable mount, made by metadata copy-ups."""
    if cfg.userxattr is None:
        return False
    return resolve(cfg).metacopy == "on"


def follows_redirects(cfg) -> bool:
    """Whether a mount of *cfg* follows redirects (nofollow: a lookup that would is EPERM)."""
    mode = cfg.redirect_dir if cfg.userxattr is not None else ""
    return (mode or effective_redirect("", bool(cfg.userxattr))) != "nofollow"


def creates_redirects(cfg) -> bool:
    """Whether a mount of *cfg* writes redirects (renames directories with lower content)."""
    if cfg.upperdir is None or cfg.read_only:
        return False
    mode = cfg.redirect_dir if cfg.userxattr is not None else ""
    return (mode or effective_redirect("", bool(cfg.userxattr))) == "on"
