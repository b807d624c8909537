"""Mount configuration: parse, normalise and validate, before any side effect.

This module owns :class:`MountConfig` and the rules that decide whether a
layer layout can be mounted.  It never creates, modifies or mounts anything:
it only reads (``stat``, ``listdir``, ``ismount``) to check the layout.  The
mounter creates the default workdir and does the mount.

Flow (bubblewrap's plan -> validate -> execute)::

    cfg = build_config("l1:l2", "upper", "merged")   # parse + validate (pure)
    # or: cfg = MountConfig(...); validate(cfg)
    cfg = userxattr.plan(cfg)                        # plan: the private xattr namespace
    mount.start_background(cfg)                      # execute

This module neither asks what the process may do (privilege.py) nor reads the layers'
xattrs or the workdir's record: choosing the private xattr namespace is the planning
step of userxattr.py, done once before the server is forked.

Every user error is a :class:`ConfigError` with a one-line message that names
the culprit path or option.  :func:`validate` collects *all* problems and
raises with the first one; the full list is in ``ConfigError.problems``.

Kernel facts this follows (docs/semantics.md section 1.1):

* ``lowerdir=A:B:C`` - A is the top lower layer; ``\\:`` is a literal colon
  and a backslash escapes the next character (kernel ``ovl_unescape``).
* The kernel allows at most 500 lower layers.
* workdir must be on the same filesystem as upperdir and the two must be
  separate subtrees.

Documented differences from the kernel:

* A read-only mount with a single lower layer is accepted (the kernel needs
  two lower layers when there is no upper layer).
* Data-only lower layers (``::``) are refused.
* ``redirect_dir`` takes the kernel's four modes (features.py: defaults from the module
  parameters, the rules between options), ``index=on|off`` too (index.py); ``metacopy``,
  ``nfs_export`` and ``verity`` are accepted only in their off/default spellings.
  ``xino=on|off|auto``, ``uuid=on|off|null|auto`` (uuidmode.py) and ``volatile`` are the
  kernel's.
* Layouts that hang or deadlock a FUSE overlay are refused up front: the
  mountpoint may not be, contain, or lie inside any layer or the workdir, and
  it must be an empty directory that is not already a mount point.
* A workdir without an upper layer is an error (the kernel ignores it).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import features
from .errors import PyoverlayError
from .features import REDIRECT_CHOICES
from .idmap import IdMapError, check_ranges, parse_ranges
from .whiteout import prefix_for

__all__ = [
    "MAX_LAYERS",
    "ConfigError",
    "MountConfig",
    "build_config",
    "default_workdir",
    "known_option",
    "parse_options",
    "split_lowerdir",
    "split_positional_lowers",
    "validate",
]

#: The kernel's limit on the number of lower layers (``OVL_MAX_STACK``).
MAX_LAYERS = 500

#: Suffix of the default workdir, which lives beside the upper layer.
WORKDIR_SUFFIX = ".pyoverlay-work"


class ConfigError(PyoverlayError):
    """A user error in the mount configuration (exit status 2, a usage error).

    ``str(exc)`` is a one-line, user-facing message naming the culprit path or
    option.  ``exc.problems`` lists every problem found (the message is the
    first of them); it has one element when only one problem was checked.
    """

    exit_code = 2

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems else [message]


@dataclass(frozen=True)
class MountConfig:
    """Everything needed to mount one overlay.  Pure data.

    Paths are absolute and normalised with :func:`os.path.realpath`
    (:func:`build_config` does that).  ``lowerdirs[0]`` is the TOP lower
    layer.  ``upperdir is None`` means a read-only mount; then ``workdir`` is
    None too and ``read_only`` is forced to True.  ``read_only`` may also be
    True with an upper layer (``-o ro``): the upper layer is then shown but
    never written.

    ``userxattr``: True stores private xattrs as ``user.overlay.*``, False as
    ``trusted.overlay.*``, None: not asked for, decided by the planning step
    (``userxattr.plan``: the upper's recorded form, else ``user.*`` unless privileged).  ``fuse_fd``: an open /dev/fuse
    fd a caller has already mounted on ``mountpoint`` (mount(2) with ``fd=N``, e.g.
    inside a user namespace); the server then serves it and neither mounts nor
    unmounts (``mountpoint`` stays the real path, for records and messages).
    """

    lowerdirs: tuple[str, ...]
    upperdir: str | None
    workdir: str | None
    mountpoint: str
    userxattr: bool | None = None  # None: chosen by userxattr.plan before the fork
    allow_other: bool = False
    default_permissions: bool = True
    read_only: bool = False
    debug: bool = False
    fsname: str = "pyoverlay"
    trace_file: str | None = None  # --trace FILE: every trace event as a JSON line
    container: str | None = None  # the container this mount is the root of (for the trace)
    fuse_fd: int | None = None  # serve this already-mounted /dev/fuse fd (no mount/unmount)
    # Ownership maps, ranges (stored, presented, count): a stored id S+i is shown as P+i
    # (fuse-overlayfs's uidmapping/gidmapping; docs/rootless.md, "Uid and gid mapping").
    uidmap: tuple[tuple[int, int, int], ...] = ()
    gidmap: tuple[tuple[int, int, int], ...] = ()
    volatile: bool = False  # -o volatile: copy-ups and fsync not synced (the kernel's)
    max_nodes: int = 200_000  # -o max_nodes=N: node budget (0: none); docs/performance.md
    engine: str = "direct"  # -o engine=pyfuse3|direct: who speaks FUSE (overlayfs_py/fuse/: direct)
    # -o passthrough=auto|on|off: FUSE passthrough of regular files (direct engine; auto: when
    # the kernel lets the server use it; docs/semantics.md, "FUSE passthrough")
    passthrough: str = "auto"
    # mount flags asked for by mount.fuse.pyoverlay's -o (mount(8), fstab): a subset of
    # MOUNT_FLAGS, applied to the FUSE mount by both engines (docs/mounting.md)
    mount_flags: tuple[str, ...] = ()
    # fuse-overlayfs's squash_to_uid=/squash_to_gid= (squash_to_root: 0, 0): every object is
    # shown with that owner (ownership.Owners; docs/mounting.md)
    squash_uid: int | None = None
    squash_gid: int | None = None
    # -o aufs_whiteouts=on|off: honour AUFS-style ``.wh.NAME`` / ``.wh..wh..opq`` markers in
    # every layer, as fuse-overlayfs does (off: they are plain files, as in the kernel overlay;
    # mount.fuse.pyoverlay turns it on; docs/semantics.md, "AUFS whiteouts")
    aufs_whiteouts: bool = False
    # -o redirect_dir=on|follow|nofollow|off: "" = not given (the module's default); once
    # userxattr is decided, features.resolve stores the effective mode (on|follow|nofollow):
    # on = rename directories with lower content by writing overlay.redirect
    redirect_dir: str = ""
    # -o xino=on|off|auto (None: the kernel's default, xino_default()); layers.LayerStack
    xino: str | None = None
    # -o uuid=on|off|null|auto ("": not given, the kernel's default auto); the mount settles
    # the effective mode from the layers and the upper root (uuidmode.settle)
    uuid: str = ""
    # -o index=on|off (None: not given, the module's ``index`` parameter); once userxattr is
    # decided, features.resolve stores the effective value (index.py; docs/semantics.md, "Index")
    index: bool | None = None
    # -o metacopy=on|off: "" = not given (the module's default); features.resolve stores the
    # effective value (on|off) once userxattr is decided: on = chmod, chown, utimes, xattrs,
    # renames and links of a lower regular file copy up its metadata only (copyup.py)
    metacopy: str = ""

    def __post_init__(self) -> None:
        # Accept any sequence but store an immutable tuple.
        if not isinstance(self.lowerdirs, tuple):
            object.__setattr__(self, "lowerdirs", tuple(self.lowerdirs))
        if not isinstance(self.mount_flags, tuple):
            object.__setattr__(self, "mount_flags", tuple(self.mount_flags))
        for name in ("uidmap", "gidmap"):  # lists (JSON, callers) become tuples of triples
            object.__setattr__(self, name, tuple(tuple(r) for r in getattr(self, name)))
        # Without an upper layer the mount can only be read-only.
        if self.upperdir is None and not self.read_only:
            object.__setattr__(self, "read_only", True)

    @property
    def xattr_prefix(self) -> str:
        """Namespace of overlay-private xattrs: ``user.overlay.`` or ``trusted.overlay.``."""
        return prefix_for(bool(self.userxattr))


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def _q(path: str) -> str:
    """Quote a path for a one-line message."""
    if path.isprintable():
        return f"'{path}'"
    return repr(path)  # escapes newlines and other control characters


def _unescape(value: str, what: str) -> str:
    """Kernel ``ovl_unescape``: a backslash makes the next character literal."""
    out: list[str] = []
    it = iter(value)
    for ch in it:
        if ch == "\\":
            nxt = next(it, None)
            if nxt is None:
                raise ConfigError(f"{what} {_q(value)} ends with a lone backslash")
            out.append(nxt)
        else:
            out.append(ch)
    return "".join(out)


def split_lowerdir(spec: str) -> list[str]:
    """Split a kernel-style lowerdir spec on ``:``, top layer first.

    ``\\:`` is a literal colon and ``\\\\`` a literal backslash; like the
    kernel, a backslash before any other character just makes that character
    literal.  Empty components (``a::b``, a leading or trailing ``:``) raise
    :class:`ConfigError`: data-only ``::`` layers are not supported.

    >>> split_lowerdir(r"a\\:b:c")
    ['a:b', 'c']
    """
    if spec == "":
        raise ConfigError("empty lowerdir: give at least one lower layer")
    try:
        parts = _split_escaped(spec, ":", unescape=True)
    except ValueError:
        raise ConfigError(f"lowerdir {_q(spec)} ends with a lone backslash") from None
    if any(p == "" for p in parts[1:-1]):
        raise ConfigError(f"empty lower layer in lowerdir {_q(spec)} (data-only '::' layers are not supported)")
    if parts[0] == "" or parts[-1] == "":
        raise ConfigError(f"empty lower layer in lowerdir {_q(spec)} (leading or trailing ':')")
    return parts


def split_positional_lowers(spec: str) -> list[str]:
    """Split the positional ``LOWER1[:LOWER2...]`` argument (``mount``, ``run``), top first.

    Unlike ``-o lowerdir=`` (the kernel's escapes, :func:`split_lowerdir`), a backslash is
    taken literally here: a directory named ``a\\b`` is just that. The one escape is ``\\:``
    for a colon inside a name; a name with a backslash right before a colon is given with
    ``-o lowerdir=`` instead. Empty components raise :class:`ConfigError`.

    >>> split_positional_lowers(r"a\\b:c\\:d")
    ['a\\\\b', 'c:d']
    """
    if spec == "":
        raise ConfigError("empty lower layer list: give at least one lower layer")
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(spec)
    while i < n:
        if spec.startswith("\\:", i):
            cur.append(":")
            i += 2
            continue
        if spec[i] == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(spec[i])
        i += 1
    parts.append("".join(cur))
    if any(p == "" for p in parts):
        raise ConfigError(f"empty lower layer in {_q(spec)} (leading, trailing or doubled ':')")
    return parts


def _split_options(opt: str) -> list[str]:
    """Split one ``-o`` string on unescaped commas (kernel ``ovl_next_opt``).

    Backslashes are kept: values are unescaped later, per option.
    """
    return _split_escaped(opt, ",", unescape=False)


def _split_escaped(text: str, sep: str, *, unescape: bool) -> list[str]:
    """Split *text* on *sep* where a backslash escapes the next character. With
    *unescape* the backslashes are removed (a trailing lone one: ValueError); without,
    escape pairs are kept as they are."""
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 < n:
                cur.append(text[i + 1] if unescape else text[i : i + 2])
                i += 2
                continue
            if unescape:
                raise ValueError("lone backslash")
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


# Options that carry a path or a name (value required).
_VALUE_KEYS = (
    "lowerdir",
    "upperdir",
    "workdir",
    "fsname",
    "uidmapping",
    "gidmapping",
    "max_nodes",
    "engine",
    "passthrough",
    "squash_to_uid",
    "squash_to_gid",
)
# Our boolean options.
_FLAG_KEYS = ("userxattr", "allow_other", "default_permissions", "volatile", "squash_to_root")
# The generic mount flags the FUSE mount carries (MountConfig.mount_flags; MOUNT_FLAGS), and the
# words that undo them: word -> the flag it sets (the word itself) or clears (the last one wins)
_FLAG_WORDS = {
    "nosuid": "nosuid", "suid": "nosuid", "nodev": "nodev", "dev": "nodev", "noexec": "noexec", "exec": "noexec",
    "noatime": "noatime", "atime": "noatime", "relatime": "noatime", "strictatime": "noatime",
}  # fmt: skip
# Kernel overlay options: value -> accepted (and ignored) or not supported.
_KERNEL_CHOICES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # key: (accepted values, known-but-unsupported values)
    "index": (frozenset({"on", "off"}), frozenset()),
    "xino": (frozenset({"on", "off", "auto"}), frozenset()),
    "metacopy": (frozenset({"on", "off"}), frozenset()),
    "nfs_export": (frozenset({"off"}), frozenset({"on"})),
    # the kernel's four modes (uuidmode.py): the overlay's own UUID (overlay.uuid on the
    # upper root) and the UUIDs of origin records
    "uuid": (frozenset({"on", "off", "null", "auto"}), frozenset()),
    "verity": (frozenset({"off"}), frozenset({"on", "require"})),
}

# Why a known kernel option value is refused, where "not done" is not the whole story.
_UNSUPPORTED_WHY = {
    # the kernel records the fs-verity digest of a metacopy file's lower data in
    # overlay.metacopy and checks it when the data is opened; pyoverlay neither records
    # nor checks digests (and a FUSE file has no fs-verity of its own to show)
    "verity": "option '{key}={value}' is not supported: pyoverlay neither records nor checks"
    " the fs-verity digests of metacopy files (verity=off only)",
    # a FUSE mount is exported through nfsd only with the FUSE export operations, which
    # pyoverlay does not implement (its node ids are not persistent file handles)
    "nfs_export": "option 'nfs_export=on' is not supported: a FUSE mount cannot be exported through"
    " the kernel's nfsd (pyoverlay implements no FUSE export operations); use index=on"
    " for hard links kept together",
}


def parse_options(opts: Iterable[str]) -> dict[str, str | bool]:
    """Parse ``-o`` strings (``'a=b,c,...'``) into a dict.

    Options are split on unescaped commas; empty items (``a,,b``) are skipped
    and a later option overrides an earlier one.  The result holds only the
    options that matter to pyoverlay:

    * ``squash_to_root`` -> True; ``squash_to_uid``, ``squash_to_gid`` -> the value
      (fuse-overlayfs's; checked by :func:`build_config`);
    * ``lowerdir`` -> the raw spec, still escaped (pass it to
      :func:`split_lowerdir`);
    * ``upperdir``, ``workdir``, ``fsname`` -> the value, unescaped like the
      kernel does (``\\,`` -> ``,``); ``uidmapping``, ``gidmapping`` likewise
      (fuse-overlayfs's ``S:P:N[:S:P:N...]``, parsed by :func:`build_config`);
    * ``ro`` -> True, ``rw`` -> ``'ro': False`` (the last one wins);
    * ``userxattr``, ``allow_other``, ``default_permissions`` -> True;
      ``nouserxattr`` -> ``'userxattr': False`` (the last one wins);
    * ``aufs_whiteouts=on|off`` -> True / False (the last one wins);
    * ``xino=on|off|auto`` -> the value (the kernel's inode numbering, layers.LayerStack).
    * ``uuid=on|off|null|auto`` -> the value (the kernel's UUID modes, uuidmode.py).

    * ``redirect_dir=on|follow|nofollow|off`` -> the value (features.resolve applies it).
    * ``index=on|off`` -> True / False (features.resolve applies it; index.py).
    * ``metacopy=on|off`` -> the value (features.resolve applies it with the kernel's rules).

    Accepted and ignored (not in the result): the kernel options
    ``nfs_export=off``, ``verity=off``;
    * the generic flags ``nosuid``, ``nodev``, ``noexec``, ``noatime`` -> ``'mount_flags'``, a
      tuple of those set (``suid``, ``dev``, ``exec``, ``atime``, ``relatime``, ``strictatime``
      clear them; the last word wins): the FUSE mount carries them (``MountConfig.mount_flags``).

    Raises:
        ConfigError: unknown option, a missing or unexpected value, an
            unsupported kernel feature (``metacopy=on``, ...).
    """
    result: dict[str, str | bool] = {}
    for opt in opts:
        for item in _split_options(opt):
            if item == "":
                continue
            key, eq, value = item.partition("=")
            has_value = bool(eq)
            if key in _VALUE_KEYS:
                if not has_value or value == "":
                    raise ConfigError(f"mount option '{key}' needs a value ({key}=...)")
                result[key] = value if key == "lowerdir" else _unescape(value, key)
            elif key == "nouserxattr":  # pyoverlay's: ask for trusted.overlay.* explicitly
                if has_value:
                    raise ConfigError(f"mount option '{key}' takes no value")
                result["userxattr"] = False
            elif key == "aufs_whiteouts":
                if value not in ("on", "off"):
                    raise ConfigError(
                        f"invalid value {_q(value)} for mount option 'aufs_whiteouts' (expected on|off)"
                        if has_value
                        else "mount option 'aufs_whiteouts' needs a value (aufs_whiteouts=on|off)"
                    )
                result["aufs_whiteouts"] = value == "on"
            elif key in ("ro", "rw"):
                if has_value:
                    raise ConfigError(f"mount option '{key}' takes no value")
                result["ro"] = key == "ro"
            elif key in _FLAG_KEYS:
                if has_value:
                    raise ConfigError(f"mount option '{key}' takes no value")
                result[key] = True
            elif key in _FLAG_WORDS:
                if has_value:
                    raise ConfigError(f"mount option '{key}' takes no value")
                flag = _FLAG_WORDS[key]
                flags = [f for f in result.get("mount_flags", ()) if f != flag]  # type: ignore[union-attr]
                result["mount_flags"] = tuple(flags + [flag] if key == flag else flags)  # type: ignore[assignment]
            elif key == "redirect_dir":  # the kernel's modes (features.py resolves them)
                if not has_value:
                    raise ConfigError(f"mount option '{key}' needs a value ({key}=on|follow|nofollow|off)")
                if value not in REDIRECT_CHOICES:
                    raise ConfigError(
                        f"invalid value {_q(value)} for mount option 'redirect_dir' (expected on|follow|nofollow|off)"
                    )
                result["redirect_dir"] = value
            elif key in _KERNEL_CHOICES:
                accepted, unsupported = _KERNEL_CHOICES[key]
                if not has_value:
                    raise ConfigError(f"mount option '{key}' needs a value ({key}=...)")
                if value in unsupported:
                    raise ConfigError(
                        _UNSUPPORTED_WHY.get(
                            key, "option '{key}={value}' is not supported (pyoverlay implements the kernel defaults)"
                        ).format(key=key, value=value)
                    )
                if value not in accepted:
                    choices = "|".join(sorted(accepted | unsupported))
                    raise ConfigError(f"invalid value {_q(value)} for mount option '{key}' (expected {choices})")
                if key in ("xino", "uuid", "metacopy"):
                    result[key] = value
                elif key == "index":
                    result["index"] = value == "on"
            else:
                raise ConfigError(f"unknown mount option {_q(key)}")
    return result


#: the generic mount flags the FUSE mount itself can carry (``MountConfig.mount_flags``)
MOUNT_FLAGS = ("nosuid", "nodev", "noexec", "noatime")


def known_option(key: str) -> bool:
    """Whether :func:`parse_options` knows the option *key* (its value is not checked)."""
    return (
        key in _VALUE_KEYS
        or key in _FLAG_KEYS
        or key in _FLAG_WORDS
        or key in _KERNEL_CHOICES
        or key in ("ro", "rw", "nouserxattr", "aufs_whiteouts", "redirect_dir")
    )


def default_workdir(upper: str) -> str:
    """The workdir used when none is given: beside UPPER, never inside it.

    ``/data/upper`` -> ``/data/.upper.pyoverlay-work``.  Being a sibling, it
    is on the same filesystem as UPPER unless UPPER itself is a mount point
    (:func:`validate` reports that case).  Only the path is computed.
    """
    upper = upper.rstrip("/") or "/"
    return os.path.join(os.path.dirname(upper), "." + os.path.basename(upper) + WORKDIR_SUFFIX)


def build_config(
    layers: str | Sequence[str] | None,
    upper: str | None,
    merged: str,
    *,
    workdir: str | None = None,
    options: Iterable[str] = (),
    debug: bool = False,
    trace_file: str | None = None,
    uidmap: Sequence[str] = (),
    gidmap: Sequence[str] = (),
) -> MountConfig:
    """Build and validate a :class:`MountConfig` from the command line.

    ``pyoverlay mount LOWER1[:LOWER2...] [UPPER] MERGED`` gives ``layers`` and
    ``upper``; ``pyoverlay mount -o lowerdir=..,upperdir=..,workdir=.. MERGED``
    gives them through ``options`` (``layers``/``upper`` are None).  Giving the
    lower layers (or the upper layer, or the workdir) both ways is an error.
    A positional ``layers`` string is split by :func:`split_positional_lowers` (a
    backslash is literal), ``-o lowerdir=`` by :func:`split_lowerdir` (the kernel's
    escapes); a sequence is taken as the list of layers (``--image``).

    ``-o ro`` with an upper layer keeps the upper layer and sets
    ``read_only``.  Without a workdir the default one beside the upper layer
    is used (:func:`default_workdir`); it may be missing, the mounter creates
    it.  Relative paths are resolved against the current directory.

    Raises:
        ConfigError: the first problem (all in ``exc.problems``).
    """
    opts = parse_options(options)

    o_lower = opts.get("lowerdir")
    if layers is not None and o_lower is not None:
        raise ConfigError("lower layers given twice: as an argument and as -o lowerdir")
    if layers is None and o_lower is None:
        raise ConfigError("no lower layer given (use LOWER1[:LOWER2...] or -o lowerdir=...)")
    if layers is None:
        assert isinstance(o_lower, str)
        parts = split_lowerdir(o_lower)
    elif isinstance(layers, str):
        parts = split_positional_lowers(layers)
    else:
        parts = list(layers)
        if not parts or any(not isinstance(p, str) or p == "" for p in parts):
            raise ConfigError("empty lower layer list")
    lowers = tuple(os.path.realpath(p) for p in parts)

    o_upper = opts.get("upperdir")
    if upper is not None and o_upper is not None:
        raise ConfigError("upper layer given twice: as an argument and as -o upperdir")
    up = upper if upper is not None else o_upper
    assert up is None or isinstance(up, str)
    if up == "":
        raise ConfigError("upper layer path is empty")

    o_work = opts.get("workdir")
    if workdir is not None and o_work is not None:
        raise ConfigError("workdir given twice: as --workdir and as -o workdir")
    work = workdir if workdir is not None else o_work
    assert work is None or isinstance(work, str)
    if work == "":
        raise ConfigError("workdir path is empty")

    if merged == "":
        raise ConfigError("mountpoint path is empty")

    upperdir = os.path.realpath(up) if up is not None else None
    workdir_defaulted = False
    if upperdir is None:
        if work is not None:
            raise ConfigError(f"workdir {_q(work)} given without an upper layer")
        wd: str | None = None
    elif work is None:
        wd = default_workdir(upperdir)
        workdir_defaulted = True
    else:
        wd = os.path.realpath(work)

    fsname = opts.get("fsname", "pyoverlay")
    assert isinstance(fsname, str)

    cfg = MountConfig(
        lowerdirs=lowers,
        upperdir=upperdir,
        workdir=wd,
        mountpoint=os.path.realpath(merged),
        userxattr=opts.get("userxattr"),  # type: ignore[arg-type]
        allow_other=bool(opts.get("allow_other", False)),
        default_permissions=bool(opts.get("default_permissions", True)),
        read_only=bool(opts.get("ro", False)) or upperdir is None,
        debug=debug,
        fsname=fsname,
        trace_file=check_trace_file(trace_file, os.path.realpath(merged)) if trace_file else None,
        uidmap=_idmap(opts.get("uidmapping"), uidmap, "uid"),
        gidmap=_idmap(opts.get("gidmapping"), gidmap, "gid"),
        max_nodes=_max_nodes(opts.get("max_nodes")),
        volatile=bool(opts.get("volatile", False)),
        engine=_engine(opts.get("engine")),
        passthrough=_passthrough(opts.get("passthrough"), opts.get("engine")),
        squash_uid=_squash(opts.get("squash_to_uid"), bool(opts.get("squash_to_root")), "squash_to_uid"),
        squash_gid=_squash(opts.get("squash_to_gid"), bool(opts.get("squash_to_root")), "squash_to_gid"),
        aufs_whiteouts=bool(opts.get("aufs_whiteouts", False)),
        xino=opts.get("xino"),  # type: ignore[arg-type]
        mount_flags=tuple(opts.get("mount_flags", ())),  # type: ignore[arg-type]
        redirect_dir=str(opts.get("redirect_dir", "")),
        uuid=str(opts.get("uuid", "")),
        index=opts.get("index"),  # type: ignore[arg-type]
        metacopy=str(opts.get("metacopy", "")),
    )
    validate(cfg, workdir_may_be_missing=workdir_defaulted)
    return resolve_features(cfg)  # when userxattr is known; else userxattr.plan does it


def resolve_features(cfg: MountConfig) -> MountConfig:
    """*cfg* with the kernel's feature rules applied (features.resolve: the effective
    ``redirect_dir``); ConfigError where the kernel refuses the options together."""
    try:
        return features.resolve(cfg)
    except features.FeatureConflict as exc:
        raise ConfigError(str(exc)) from None


def xino_default() -> str:
    """The kernel's xino when the options do not say (fs/overlayfs/params.c): ``auto`` if
    the overlay module's ``xino_auto`` parameter is Y, else ``off``."""
    try:
        with open("/sys/module/overlay/parameters/xino_auto") as f:
            return "auto" if f.read().strip() == "Y" else "off"
    except OSError:
        return "off"


ENGINES = ("pyfuse3", "direct")
#: the engine of mounts that do not say ``-o engine=`` (the runner's, mount.fuse.pyoverlay's ...)
ENGINE_ENV = "PYOVERLAY_ENGINE"


def _engine(option) -> str:
    """``-o engine=direct|pyfuse3``: pyoverlay's own FUSE engine (``overlayfs_py/fuse/``, the
    default) or libfuse through pyfuse3; without the option, ``$PYOVERLAY_ENGINE`` if set."""
    if option is None:
        env = os.environ.get(ENGINE_ENV)
        if not env:
            return MountConfig.engine
        if env not in ENGINES:
            raise ConfigError(f"{ENGINE_ENV} must be one of {', '.join(ENGINES)}, not {env!r}")
        return env
    if option not in ENGINES:
        raise ConfigError(f"mount option 'engine' must be one of {', '.join(ENGINES)}, not {option!r}")
    return str(option)


def _squash(option, to_root: bool, name: str) -> int | None:
    """``-o squash_to_uid=N`` / ``squash_to_gid=N`` (an id), else 0 with ``squash_to_root``."""
    if option is None:
        return 0 if to_root else None
    try:
        n = int(str(option), 10)
    except ValueError:
        n = -1
    if not 0 <= n < 2**32 - 1:
        raise ConfigError(f"mount option '{name}' must be a uid or gid (0 to 4294967294), not {option!r}")
    return n


PASSTHROUGH_MODES = ("auto", "on", "off")


def _passthrough(option, engine) -> str:
    """``-o passthrough=auto|on|off`` (the direct engine's; ``on`` with pyfuse3 is refused)."""
    if option is None:
        return MountConfig.passthrough
    if option not in PASSTHROUGH_MODES:
        raise ConfigError(f"mount option 'passthrough' must be one of {', '.join(PASSTHROUGH_MODES)}, not {option!r}")
    if option == "on" and _engine(engine) != "direct":
        raise ConfigError("mount option 'passthrough=on' needs 'engine=direct'")
    return str(option)


def _max_nodes(option) -> int:
    """``-o max_nodes=N``: how many nodes the server keeps before asking the kernel to drop
    the oldest file entries (0: no budget)."""
    if option is None:
        return MountConfig.max_nodes
    try:
        n = int(str(option), 10)
    except ValueError:
        n = -1
    if n < 0 or (0 < n < 1000):
        raise ConfigError(f"mount option 'max_nodes' must be 0 (no budget) or at least 1000, not {option!r}")
    return n


def _idmap(option, specs: Sequence[str], kind: str) -> tuple[tuple[int, int, int], ...]:
    """``-o {kind}mapping=S:P:N[:S:P:N...]`` and ``--{kind}map S:P:N`` (repeatable): one map."""
    try:
        ranges: list[tuple[int, int, int]] = []
        if option is not None:
            ranges += parse_ranges(str(option), f"{kind}mapping")
        for spec in specs:
            ranges += parse_ranges(spec, f"--{kind}map")
        check_ranges(ranges, f"{kind} map")
    except IdMapError as exc:
        raise ConfigError(str(exc)) from None
    return tuple(ranges)


def check_trace_file(path: str, mountpoint: str) -> str:
    """``--trace FILE``: its directory must exist, and it must not be inside the mount
    (the server would write to itself). Only the directory is resolved: a symlink at the
    name itself is refused, never followed (the server may be root, writing where a
    user could have planted one; the server opens the name with O_NOFOLLOW too)."""
    head, base = os.path.split(os.path.abspath(path))
    parent = os.path.realpath(head)
    if not os.path.isdir(parent):
        raise ConfigError(f"trace file {_q(path)}: directory {_q(parent)} does not exist")
    real = os.path.join(parent, base)
    if real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/"):
        raise ConfigError(f"trace file {_q(path)} is inside the mountpoint {_q(mountpoint)}")
    if os.path.islink(real):
        raise ConfigError(f"trace file {_q(path)} is a symbolic link")
    if os.path.isdir(real):
        raise ConfigError(f"trace file {_q(path)} is a directory")
    return real


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


@dataclass
class _Layer:
    role: str  # "lower layer", "upper layer", "workdir", "mountpoint"
    path: str  # as given in the config (used in messages)
    real: str  # realpath, for containment
    st: os.stat_result | None = None  # None when missing / inaccessible
    missing: bool = False  # ENOENT (or ENOTDIR on a parent)
    # (st_dev, st_ino) of the strict ancestors of `real`, nearest first.
    ancestors: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ident(self) -> tuple[int, int] | None:
        return (self.st.st_dev, self.st.st_ino) if self.st is not None else None

    def label(self) -> str:
        return f"{self.role} {_q(self.path)}"


def _stat(lay: _Layer, problems: list[str], *, may_be_missing: bool = False) -> None:
    """Stat a layer directory, recording missing / not-a-directory problems."""
    try:
        st = os.stat(lay.real)
    except FileNotFoundError:
        lay.missing = True
        if not may_be_missing:
            problems.append(f"{lay.label()} does not exist")
        return
    except NotADirectoryError:
        lay.missing = True
        problems.append(f"{lay.label()} is not a directory (a parent is not a directory)")
        return
    except OSError as e:
        hint = ""
        if e.errno == errno.ENOTCONN:
            hint = f" (a dead FUSE mount? try 'pyoverlay umount {lay.path}')"
        problems.append(f"{lay.label()} is not accessible: {os.strerror(e.errno or 0)}{hint}")
        return
    if not _isdir(st):
        problems.append(f"{lay.label()} is not a directory")
        return
    lay.st = st


def _isdir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


def _ancestors(real: str) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of every existing strict ancestor of a realpath."""
    out: list[tuple[int, int]] = []
    cur = real
    while True:
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
        try:
            st = os.stat(cur)
        except OSError:
            continue
        out.append((st.st_dev, st.st_ino))
    return out


def _inside(child: _Layer, parent: _Layer) -> bool:
    """True if `child` lies strictly inside `parent` (by path or by identity)."""
    if child.real != parent.real and os.path.commonpath([child.real, parent.real]) == parent.real:
        return True
    # Same directory reached through another path (bind mount).
    pid = parent.ident
    return pid is not None and pid in child.ancestors


def _same(a: _Layer, b: _Layer) -> bool:
    if a.real == b.real:
        return True
    return a.ident is not None and a.ident == b.ident


def _check_fuse_fd(fd: int, problems: list[str]) -> None:
    """``fuse_fd`` must be an open /dev/fuse descriptor (char device 10:229)."""
    try:
        st = os.fstat(fd)
    except (OSError, TypeError, ValueError):
        problems.append(f"fuse_fd {fd!r} is not an open file descriptor")
        return
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(10, 229):
        problems.append(f"fuse_fd {fd} is not an open /dev/fuse descriptor")


def validate(cfg: MountConfig, *, workdir_may_be_missing: bool = False) -> None:
    """Check a configuration before any side effect.

    All problems are collected; :class:`ConfigError` is raised with the first
    one and ``exc.problems`` holds them all.  Checks, in this order:

    1. at least one and at most :data:`MAX_LAYERS` lower layers; upperdir and
       workdir given together; a sane fsname;
    2. every lower layer, the upper layer and the workdir exist and are
       directories (with ``workdir_may_be_missing`` - the default workdir -
       a missing workdir is fine when its parent is a directory on the upper
       layer's filesystem);
    3. no directory used twice among lowers, upper and workdir (compared by
       realpath and by ``(st_dev, st_ino)``);
    4. upper/workdir not inside a lower, no lower inside upper/workdir,
       workdir and upper separate subtrees, workdir on upper's filesystem;
    5. the mountpoint exists, is a directory, is not a layer or the workdir,
       is not inside one and contains none; it is not already a mount point
       and it is empty (with ``fuse_fd`` it is mounted already: only the fd is
       checked, the mountpoint is never touched).

    Containment uses realpaths and path components (never a string prefix),
    plus the ancestors' identities to catch bind-mounted aliases.
    """
    problems: list[str] = []
    _check_shape(cfg, problems)
    lowers, upper, work, work_parent_st = _check_layers(cfg, problems, workdir_may_be_missing)
    distinct = _check_duplicates([*lowers, *(x for x in (upper, work) if x is not None)], problems)
    _check_nesting(lowers, upper, work, work_parent_st, problems)
    _check_mountpoint(cfg, distinct, problems)
    if problems:
        problems = list(dict.fromkeys(problems))  # drop repeats, keep order
        raise ConfigError(problems[0], problems)


def _check_shape(cfg: MountConfig, problems: list[str]) -> None:
    """Phase 1: counts and shape (nothing is read from disk)."""
    nlow = len(cfg.lowerdirs)
    if nlow == 0:
        if cfg.upperdir is None:
            problems.append("a read-only mount needs at least one lower layer")
        else:
            problems.append("no lower layer given: the kernel needs at least one lowerdir")
    elif nlow > MAX_LAYERS:
        problems.append(f"too many lower layers: {nlow} (the kernel allows {MAX_LAYERS})")
    if cfg.upperdir is not None and cfg.workdir is None:
        problems.append(f"upper layer {_q(cfg.upperdir)} needs a workdir")
    if cfg.upperdir is None and cfg.workdir is not None:
        problems.append(f"workdir {_q(cfg.workdir)} given without an upper layer")
    for kind, ranges in (("uid", cfg.uidmap), ("gid", cfg.gidmap)):
        try:
            check_ranges(ranges, f"{kind} map")
        except (IdMapError, TypeError, ValueError) as exc:
            problems.append(str(exc) if isinstance(exc, IdMapError) else f"{kind} map {ranges!r}: {exc}")
    if cfg.fsname == "" or "," in cfg.fsname or any(c.isspace() for c in cfg.fsname) or not cfg.fsname.isprintable():
        problems.append(f"fsname {_q(cfg.fsname)} must be a non-empty word without commas or whitespace")


def _check_layers(
    cfg: MountConfig, problems: list[str], workdir_may_be_missing: bool
) -> tuple[list[_Layer], _Layer | None, _Layer | None, os.stat_result | None]:
    """Phase 2: every layer and the workdir exist and are directories. Returns (lowers,
    upper, workdir, the stat of a missing default workdir's parent), their ancestors
    recorded for the containment checks."""
    lowers = [_Layer("lower layer", p, os.path.realpath(p)) for p in cfg.lowerdirs]
    for lay in lowers:
        _stat(lay, problems)
    upper: _Layer | None = None
    if cfg.upperdir is not None:
        upper = _Layer("upper layer", cfg.upperdir, os.path.realpath(cfg.upperdir))
        _stat(upper, problems)
    work: _Layer | None = None
    work_parent_st: os.stat_result | None = None
    if cfg.workdir is not None:
        work = _Layer("workdir", cfg.workdir, os.path.realpath(cfg.workdir))
        _stat(work, problems, may_be_missing=workdir_may_be_missing)
        if work.missing and workdir_may_be_missing:
            parent = os.path.dirname(work.real)
            try:
                work_parent_st = os.stat(parent)
            except OSError as e:
                problems.append(
                    f"workdir {_q(cfg.workdir)} cannot be created: parent {_q(parent)}: {os.strerror(e.errno or 0)}"
                )
            else:
                if not _isdir(work_parent_st):
                    problems.append(
                        f"workdir {_q(cfg.workdir)} cannot be created: parent {_q(parent)} is not a directory"
                    )
                    work_parent_st = None
    for lay in [*lowers, *(x for x in (upper, work) if x is not None)]:
        lay.ancestors = _ancestors(lay.real)
    return lowers, upper, work, work_parent_st


def _check_duplicates(layers: list[_Layer], problems: list[str]) -> list[_Layer]:
    """Phase 3: the same directory twice (by realpath and by identity). Returns the
    layers that are distinct."""
    seen: dict[object, _Layer] = {}
    distinct: list[_Layer] = []
    for lay in layers:
        keys: list[object] = [("path", lay.real)]
        if lay.ident is not None:
            keys.append(("ident", lay.ident))
        first = next((seen[k] for k in keys if k in seen), None)
        if first is not None:
            if first.role == lay.role and first.real == lay.real:
                problems.append(f"{lay.label()} is given twice")
            else:
                problems.append(f"{lay.label()} is the same directory as {first.label()}")
            continue
        distinct.append(lay)
        for k in keys:
            seen[k] = lay
    return distinct


def _check_nesting(
    lowers: list[_Layer],
    upper: _Layer | None,
    work: _Layer | None,
    work_parent_st: os.stat_result | None,
    problems: list[str],
) -> None:
    """Phase 4: nesting between lowers and upper/workdir, upper vs workdir, and the
    workdir on the upper's filesystem."""
    rw = [x for x in (upper, work) if x is not None]
    for a in rw:
        for low in lowers:
            if _same(a, low):
                continue  # already reported as a duplicate
            if _inside(a, low):
                problems.append(f"{a.label()} is inside {low.label()}")
            elif _inside(low, a):
                problems.append(f"{low.label()} is inside {a.label()}")
    if upper is not None and work is not None and not _same(upper, work):
        if _inside(work, upper):
            problems.append(f"{work.label()} is inside {upper.label()}")
        elif _inside(upper, work):
            problems.append(f"{upper.label()} is inside {work.label()}")
    if upper is not None and work is not None and upper.st is not None:
        wdev: int | None = None
        if work.st is not None:
            wdev = work.st.st_dev
        elif work_parent_st is not None:
            wdev = work_parent_st.st_dev
        if wdev is not None and wdev != upper.st.st_dev:
            if work.st is not None:
                problems.append(f"{work.label()} is not on the same filesystem as {upper.label()}")
            else:
                problems.append(
                    f"{work.label()} would not be on the same filesystem as {upper.label()}"
                    " (is the upper layer a mount point? pass --workdir)"
                )


def _check_mountpoint(cfg: MountConfig, distinct: list[_Layer], problems: list[str]) -> None:
    """Phase 5: the mountpoint (with ``fuse_fd`` only the fd: it is mounted already)."""
    mp_real = (
        os.path.realpath(cfg.mountpoint)
        if cfg.fuse_fd is None
        else os.path.join(os.path.realpath(os.path.dirname(cfg.mountpoint)), os.path.basename(cfg.mountpoint))
    )
    mp = _Layer("mountpoint", cfg.mountpoint, mp_real)
    if cfg.fuse_fd is None:
        _stat(mp, problems)
    else:  # already mounted by the caller: never stat it (nobody serves it yet)
        _check_fuse_fd(cfg.fuse_fd, problems)
    mp.ancestors = _ancestors(mp.real)
    for lay in distinct:
        if _same(mp, lay):
            problems.append(f"{mp.label()} is the same directory as {lay.label()}")
        elif _inside(mp, lay):
            problems.append(f"{mp.label()} is inside {lay.label()}")
        elif _inside(lay, mp):
            problems.append(f"{lay.label()} is inside {mp.label()}")
    if mp.st is not None:
        if os.path.ismount(mp.real):
            problems.append(f"{mp.label()} is already a mount point")
        else:
            try:
                with os.scandir(mp.real) as it:
                    nonempty = any(True for _ in it)
            except OSError as e:
                problems.append(f"{mp.label()} cannot be read: {os.strerror(e.errno or 0)}")
            else:
                if nonempty:
                    problems.append(f"{mp.label()} is not empty")
