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

The kernel's other rules, kept here for the features still refused by config.py
(``metacopy``, ``index``, ``nfs_export``, ``verity``), in ovl_fs_params_verify's order:
verity needs metacopy (an explicit metacopy=off conflicts); metacopy needs
``redirect_dir=on`` (both explicit: conflict; an explicit redirect_dir turns metacopy
off; else redirect_dir becomes on); nfs_export needs index (explicit index=off: conflict
or nfs_export off); nfs_export excludes metacopy; userxattr excludes an explicit
metacopy=on and verity. A mount without an upper layer treats ``follow`` as ``on``
(nothing is created there).
"""

from __future__ import annotations

import dataclasses
import os

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


def effective_redirect(asked: str, userxattr: bool, *, params_dir: str = PARAMS_DIR) -> str:
    """The redirect mode of a mount that asked for *asked* ("" = not given), the kernel's
    way (ovl_parse_param, ovl_fs_params_verify). Raises where the kernel
    refuses the mount (EINVAL): FeatureConflict (config.resolve_features makes it a
    ConfigError)."""
    if asked and asked not in REDIRECT_CHOICES:
        raise FeatureConflict(f"invalid value '{asked}' for redirect_dir (expected {'|'.join(REDIRECT_CHOICES)})")
    mode = asked or redirect_default(params_dir)
    if mode == "off":
        mode = "follow" if _yes(module_param("redirect_always_follow", "Y", params_dir)) else "nofollow"
    if userxattr:
        if asked and mode != "nofollow":
            raise FeatureConflict(
                f"conflicting options: userxattr,redirect_dir={asked} (the kernel refuses them too:"
                " with userxattr redirects are neither created nor followed; use redirect_dir=nofollow)"
            )
        mode = "nofollow"
    return mode


def resolve(cfg):
    """*cfg* (a MountConfig whose ``userxattr`` is decided) with its features resolved: the
    effective ``redirect_dir``. Idempotent; a cfg whose userxattr is still None is returned
    as is (userxattr.plan resolves it). FeatureConflict: use config.resolve_features."""
    if cfg.userxattr is None:
        return cfg
    mode = effective_redirect(cfg.redirect_dir, bool(cfg.userxattr))
    if mode == cfg.redirect_dir:
        return cfg
    return dataclasses.replace(cfg, redirect_dir=mode)


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
