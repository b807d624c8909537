"""``mount.fuse.pyoverlay``: pyoverlay with fuse-overlayfs's command line, for the programs
that run a mount program (containers/storage's ``mount_program``: podman, buildah, CRI-O) and
for mount(8) (``mount -t fuse.pyoverlay``, fstab; docs/mounting.md)::

    mount.fuse.pyoverlay [SOURCE] MERGED -o OPTS [-o OPTS ...] [-f] [-d] [-n] [-s] [-v]

containers/storage runs ``PROG -o lowerdir=L1:L2,upperdir=U,workdir=W,,volatile MERGED``;
mount(8) runs ``/sbin/mount.fuse.pyoverlay SOURCE MERGED -o OPTS`` (plus ``-n``, ``-s``,
``-v`` as it passes every helper). The options are the kernel's and fuse-overlayfs's
spellings: each item is either given to :func:`overlayfs_py.config.build_config` (pyoverlay's
own parser, as ``pyoverlay mount -o`` uses; ``nosuid``/``nodev``/``noexec``/``noatime``
among them: the mount's flags, ``MountConfig.mount_flags``), translated (``fsync=0`` is
``volatile``, ``debug`` is ``-d``), accepted and ignored (:data:`IGNORED`, each with the
reason in docs/mounting.md), or refused (:data:`REFUSED`: what pyoverlay cannot do). Empty items are
skipped. ``aufs_whiteouts=on`` is the default here (fuse-overlayfs honours ``.wh.NAME``
whiteouts in every layer, and containers/storage writes the layers it stores from a tar so);
``-o aufs_whiteouts=off`` turns it off. With ``-s`` (sloppy, mount(8)'s convention) an
unknown option is ignored with a warning instead of refused.

The mount itself is ``pyoverlay mount``'s path (plan, checks, then ``start_background``): the
helper returns once the mount is live; ``-f`` (or ``-d``, as with libfuse and fuse-overlayfs)
serves in the foreground. Errors are one line on stderr and exit status 1, and nothing is
mounted then. This module imports no click: it starts as fast as ``pyoverlay mount``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from .errors import PyoverlayError

PROG = "mount.fuse.pyoverlay"

USAGE = f"usage: {PROG} [SOURCE] MERGED -o lowerdir=L1[:L2...][,upperdir=U,workdir=W][,OPTS] [-f] [-d]"

#: accepted and ignored (docs/mounting.md says why for each): mount(8)'s own and generic
#: VFS flags the FUSE mount does not take from a helper, fstab-only words, and
#: fuse-overlayfs's tuning knobs that pyoverlay has no counterpart of
IGNORED_FLAGS = frozenset(
    {
        # mount(8) / fstab words (userspace options: mount(8) acts on them, not the fs)
        "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "_netdev",
        "nofail", "sync", "async", "dirsync", "lazytime", "nolazytime", "silent", "loud",
        "nosymfollow",
        # access-time flags other than noatime/relatime/strictatime/atime (config's _FLAG_WORDS)
        "diratime", "nodiratime", "norelatime", "nostrictatime",
        # libfuse's tuning flags fuse-overlayfs passes on (pyoverlay's engine has its own)
        "splice_read", "splice_write", "splice_move", "kernel_cache", "auto_cache", "big_writes",
        # fuse-overlayfs: its behaviour is pyoverlay's already
        "static_nlink",  # merged dirs report nlink 1, as the kernel overlay (and this option) do
        "noacl",  # pyoverlay never enables POSIX ACLs in FUSE (FUSE_POSIX_ACL is not asked for)
    }
)  # fmt: skip
#: options with a value that are accepted and ignored (any value, or only the listed ones)
IGNORED_VALUES: dict[str, frozenset[str] | None] = {
    "context": None,  # SELinux labels: none on a FUSE mount pyoverlay makes (fuse-overlayfs ignores it too)
    "fscontext": None,
    "defcontext": None,
    "rootcontext": None,
    "comment": None,  # fstab comments (mount(8)'s)
    "subtype": frozenset({"pyoverlay"}),
    "timeout": None,  # fuse-overlayfs's cache timeout: pyoverlay's engine keeps its own
    "threaded": None,  # fuse-overlayfs's thread model
    "fast_ino": None,  # fuse-overlayfs's inode-number shortcut (pyoverlay's st_ino is the kernel overlay's)
    "writeback": None,  # pyoverlay never uses the writeback cache
    "max_write": None,
    "max_read": None,
    "max_idle_threads": None,
    "noxattrs": frozenset({"0"}),
    "xattr_permissions": frozenset({"0"}),
    "plugins": frozenset({""}),
    "fsync": frozenset({"1"}),  # the default; fsync=0 is volatile (below)
}
#: fuse-overlayfs's options pyoverlay cannot do: a one-line error
REFUSED = {
    "xattr_permissions": "ownership and modes kept in xattrs",
    "noxattrs": "xattrs turned off",
    "plugins": "fuse-overlayfs's layer plugins",
    "allow_root": "allow_root (use allow_other)",
}


class HelperError(PyoverlayError):
    """A usage or option error: one line, exit status 1."""


@dataclass
class Call:
    """The parsed command line."""

    merged: str
    source: str | None = None
    options: list[str] = field(default_factory=list)  # items for build_config
    foreground: bool = False
    debug: bool = False
    verbose: bool = False
    sloppy: bool = False
    warnings: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Call:
    """``[SOURCE] MERGED -o OPTS ... [-f] [-d] [-n] [-s] [-v]`` in any order (mount(8) puts
    the options last, containers/storage first); ``-oOPTS`` and ``--debug`` as libfuse's."""
    positional: list[str] = []
    raw: list[str] = []
    flags = {"f": False, "d": False, "s": False, "v": False}
    i = 0
    args = list(argv)
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            positional += args[i:]
            break
        if a == "-o":
            if i >= len(args):
                raise HelperError("option -o needs a value")
            raw.append(args[i])
            i += 1
        elif a.startswith("-o"):
            raw.append(a[2:])
        elif a in ("-f", "--foreground"):
            flags["f"] = True
        elif a in ("-d", "--debug"):
            flags["d"] = True
        elif a in ("-n", "-s", "-v") or (a.startswith("-") and len(a) > 2 and set(a[1:]) <= set("fdnsv")):
            for ch in a[1:]:
                if ch != "n":  # -n: no /etc/mtab to write (there is none to write here)
                    flags[ch] = True
        elif a.startswith("-") and a != "-":
            raise HelperError(f"unknown argument {a!r}")
        else:
            positional.append(a)
    if len(positional) == 1:
        source, merged = None, positional[0]
    elif len(positional) == 2:
        source, merged = positional
    else:
        raise HelperError(USAGE if not positional else f"too many arguments: {' '.join(positional)}")
    call = Call(merged, source, foreground=flags["f"] or flags["d"], debug=flags["d"], verbose=flags["v"])
    call.sloppy = flags["s"]
    _options(call, raw)
    return call


def _options(call: Call, raw: list[str]) -> None:
    """Sort every ``-o`` item into *call* (see the module doc)."""
    from .config import _split_options, known_option

    for opt in raw:
        for item in _join_quoted(_split_options(opt)):
            if item == "":
                continue  # containers/storage's ",," (and mount(8)'s leading commas)
            key, eq, value = item.partition("=")
            if key == "debug" and not eq:
                call.debug = True
                call.foreground = True  # as libfuse's -d
            elif key == "fsync" and eq and value == "0":
                call.options.append("volatile")  # fuse-overlayfs: volatile is fsync=0
            elif key.startswith("x-") or (key in IGNORED_FLAGS and not eq) or (eq and _ignored_value(key, value)):
                pass
            elif key in REFUSED:
                raise HelperError(f"option {item!r} is not supported by pyoverlay ({REFUSED[key]})")
            elif key in IGNORED_VALUES:
                raise HelperError(f"invalid value for option {item!r}")
            elif not known_option(key):
                if not call.sloppy:
                    raise HelperError(f"unknown mount option {key!r}")
                call.warnings.append(f"ignoring unknown mount option {key!r} (-s)")
            else:
                call.options.append(item)


def _join_quoted(items: list[str]) -> list[str]:
    """containers/storage quotes SELinux labels, whose categories hold commas
    (``context="system_u:object_r:container_file_t:s0:c1,c2"``): the pieces of a quoted
    value are put back together."""
    out: list[str] = []
    open_quote = False
    for item in items:
        if open_quote:
            out[-1] += "," + item
            open_quote = item.count('"') % 2 == 0
        else:
            out.append(item)
            open_quote = item.count('"') % 2 == 1
    return out


def _ignored_value(key: str, value: str) -> bool:
    """``key=value`` is one of :data:`IGNORED_VALUES`' (any value, or one of those listed)."""
    if key not in IGNORED_VALUES:
        return False
    allowed = IGNORED_VALUES[key]
    return allowed is None or value in allowed


def _fsname(source: str | None) -> list[str]:
    """mount(8)'s SOURCE becomes the mount's source (fsname) when it is one word: ``mount -a``
    then sees the fstab line's mount as mounted already, and ``umount SOURCE`` finds it."""
    if not source or "," in source or "\\" in source or not source.isprintable() or any(c.isspace() for c in source):
        return []
    return [f"fsname={source}"]


def _fail(msg: object) -> NoReturn:
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()
    os._exit(1)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        print("Mounts a pyoverlay overlay as fuse-overlayfs would; see docs/mounting.md.")
        sys.exit(0)
    if args and args[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"{PROG} (pyoverlay {version('pyoverlay')})")
        sys.exit(0)
    try:
        call = parse_args(args)
    except HelperError as exc:
        _fail(exc)
    for w in call.warnings:
        sys.stderr.write(f"{PROG}: {w}\n")
    from .logs import one_line

    try:
        from .config import build_config
        from .privilege import check_fuse_access
        from .state import state_dir
        from .userxattr import plan

        opts = call.options
        keys = {o.partition("=")[0] for o in opts}
        if "upperdir" in keys and "workdir" not in keys:  # the kernel's and fuse-overlayfs's rule
            raise HelperError("upperdir needs a workdir (-o workdir=...)")
        if not any(o.startswith("fsname=") for o in opts):
            opts = _fsname(call.source) + opts
        # fuse-overlayfs honours AUFS whiteouts (.wh.NAME) in every layer, and containers/storage
        # writes the layers it stores from a tar so: on unless -o aufs_whiteouts=off (last wins)
        opts = ["aufs_whiteouts=on"] + opts
        cfg = build_config(None, None, call.merged, options=opts, debug=call.debug)
        cfg = plan(cfg)
        check_fuse_access(cfg)
        state_dir()
    except PyoverlayError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(one_line(exc))
    if call.verbose:
        sys.stderr.write(f"{PROG}: mounting {cfg.mountpoint} ({len(cfg.lowerdirs)} lower layers)\n")
    if call.foreground:
        from .logs import setup_logging
        from .mount import serve

        setup_logging(call.debug)
        try:
            rc = serve(cfg)
        except Exception as exc:
            _fail(f"cannot mount {cfg.mountpoint}: {one_line(exc)}")
        sys.exit(rc)
    from .mount import MountFailed, start_background

    try:
        start_background(cfg, debug=call.debug)
    except (MountFailed, PyoverlayError) as exc:
        _fail(f"cannot mount {cfg.mountpoint}: {exc}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
