"""``pyoverlay diff`` and ``pyoverlay explain``: looking at layers without a mount.

The work is in :mod:`overlayfs_py.diff` and :mod:`overlayfs_py.explain`; this module
finds the layers. A container is found through the container resolver the top-level
command passes (:mod:`overlayfs_py.resolvers`; the runner's), a live mount through its
record in :mod:`overlayfs_py.state`. Nothing here stats a path through a merged mount.
"""

from __future__ import annotations

import glob
import json
import os

import click

from . import state
from .errors import PyoverlayError, fail
from .resolvers import ContainerView, current


class InspectError(PyoverlayError):
    """A one-line user error (exit status 1 unless given)."""


def register(main: click.Group) -> None:
    main.add_command(diff_cmd)
    main.add_command(explain_cmd)


# --- finding layers ---------------------------------------------------------------------


def _container(ref: str) -> ContainerView | None:
    return current().find_container(ref)


def _container_layers(c: ContainerView) -> tuple[str, list[str], list[str]]:
    """(upper, lowers top first, labels upper first): the init layer is the top lower."""
    upper = c.upper
    if not upper:
        raise InspectError(f"container {c.name or c.id} has no upper layer yet")
    lowers = list(c.lowers)
    labels = ["upper"] + [f"lower{i + 1}" for i in range(len(lowers))]
    init = c.init_layer
    if init and os.path.isdir(init):
        lowers.insert(0, init)
        labels.insert(1, "init")
    return upper, lowers, labels


def _mount_records() -> list[dict]:
    out = []
    for p in sorted(glob.glob(os.path.join(state.state_dir(), "mount-*.json"))):
        try:
            with open(p) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            continue
    return out


def _lowers_of_upper(upper: str) -> tuple[list[str], bool | None]:
    """The lowers of a live mount or a container whose upper layer is *upper* (a realpath)."""
    for rec in _mount_records():
        cfg = rec.get("config") or {}
        if cfg.get("upperdir") and os.path.realpath(cfg["upperdir"]) == upper:
            return list(cfg.get("lowerdirs", [])), bool(cfg.get("userxattr"))
    for c in current().all_containers():
        if c.upper and os.path.realpath(c.upper) == upper:
            return _container_layers(c)[1], None
    raise InspectError(
        f"no mount or container uses {upper} as its upper layer: give its lower layers with --lower L1:L2...",
        exit_code=2,
    )


def _parse_lowers(spec: str) -> list[str]:
    """``--lower L1:L2...``, split as ``mount`` and ``run`` split their positional layers
    (a backslash is literal; ``\\:`` is a colon in a name)."""
    from .config import ConfigError, split_positional_lowers

    try:
        parts = split_positional_lowers(spec)
    except ConfigError as e:
        raise InspectError(str(e), exit_code=2) from None
    out = []
    for p in parts:
        if not os.path.isdir(p):
            raise InspectError(f"lower layer {p!r} is not a directory", exit_code=2)
        out.append(os.path.realpath(p))
    return out


def _no_touch_realpath(path: str) -> str:
    """The resolved path of *path* without stat'ing its last component (a mountpoint)."""
    a = os.path.abspath(path)
    head, tail = os.path.split(a)
    return os.path.join(os.path.realpath(head), tail) if tail else a


# --- diff -------------------------------------------------------------------------------


@click.command("diff")
@click.argument("target", metavar="UPPER|ID")
@click.option(
    "--lower",
    "lower",
    metavar="L1:L2...",
    help="The lower layers, top first (default: those of the mount or container using UPPER).",
)
@click.option("--ignore-identical", is_flag=True, help="Leave out files copied up but unchanged.")
@click.option(
    "--userxattr", is_flag=True, default=None, help="The upper's private xattrs are user.overlay.* (default: detected)."
)
@click.option(
    "--aufs-whiteouts/--no-aufs-whiteouts",
    "aufs",
    default=None,
    help="Honour AUFS .wh.NAME markers in the layers (default: as the live mount does; else off).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diff_cmd(target, lower, ignore_identical, userxattr, aufs, as_json):
    """What the upper layer UPPER (or container ID's) changed, as `docker diff` shows it:
    A added, C changed, D deleted. A live pyoverlay mountpoint stands for its upper layer."""
    from .diff import diff

    try:
        upper, lowers, xattr_mode = _diff_layers(target, lower)
        if aufs is None:
            aufs = _mount_aufs(upper)
        changes = diff(
            upper, lowers, userxattr=True if userxattr else xattr_mode, ignore_identical=ignore_identical, aufs=aufs
        )
    except InspectError as e:
        fail(e)
    except OSError as e:
        fail(f"cannot read the layers: {e}")
    if as_json:
        click.echo(json.dumps([{"kind": c.kind, "path": c.path} for c in changes]))
    else:
        for c in changes:
            click.echo(os.fsencode(str(c)) + b"\n", nl=False)


def _mount_aufs(upper: str) -> bool:
    """Whether the live mount whose upper layer is *upper* honours AUFS markers (its record)."""
    real = os.path.realpath(upper)
    for rec in _mount_records():
        cfg = rec.get("config") or {}
        if cfg.get("upperdir") and os.path.realpath(cfg["upperdir"]) == real:
            return bool(cfg.get("aufs_whiteouts"))
    return False


def bare_name(target: str) -> bool:
    """A word like ``web`` or an id is a container before it is a directory of the current
    directory (docker's commands take names); ``./web`` or ``/x/web`` is a path."""
    return "/" not in target and target not in (".", "..")


def _diff_layers(target: str, lower: str | None) -> tuple[str, list[str], bool | None]:
    rec = _container(target) if bare_name(target) else None
    if rec is not None:
        upper, lowers, _labels = _container_layers(rec)
        return upper, (_parse_lowers(lower) if lower is not None else lowers), None
    mount_rec = state.lookup(_no_touch_realpath(target))
    if mount_rec is not None:  # a live mountpoint: never walk it, take its layers
        cfg = mount_rec["config"]
        if not cfg.get("upperdir"):
            raise InspectError(f"{target} is a read-only mount: it has no upper layer", exit_code=2)
        lowers = _parse_lowers(lower) if lower is not None else list(cfg["lowerdirs"])
        return cfg["upperdir"], lowers, bool(cfg.get("userxattr"))
    if os.path.isdir(target):
        upper = os.path.realpath(target)
        if lower is not None:
            return upper, _parse_lowers(lower), None
        lowers, userxattr = _lowers_of_upper(upper)
        return upper, lowers, userxattr
    rec = _container(target)
    if rec is None:
        raise InspectError(f"{target}: no such directory or container")
    upper, lowers, _labels = _container_layers(rec)
    return upper, (_parse_lowers(lower) if lower is not None else lowers), None


# --- explain ----------------------------------------------------------------------------


@click.command("explain")
@click.argument("target", metavar="MERGED|ID")
@click.argument("path")
@click.option(
    "--aufs-whiteouts/--no-aufs-whiteouts",
    "aufs",
    default=None,
    help="Honour AUFS .wh.NAME markers in the layers (default: as the live mount does; else off).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def explain_cmd(target, path, aufs, as_json):
    """Why PATH looks the way it does in the mount MERGED (or container ID's root): which
    layer serves it, and what every other layer has there. Reads the layers, never the mount."""
    from .explain import explain, format_text

    try:
        upper, lowers, labels, userxattr, rec_aufs = _explain_layers(target)
        ex = explain(
            upper,
            lowers,
            path,
            labels=labels,
            userxattr=userxattr,
            aufs=rec_aufs if aufs is None else aufs,
            index=_index_dir(target),
        )
    except InspectError as e:
        fail(e)
    except OSError as e:
        fail(f"cannot read the layers: {e}")
    if as_json:
        click.echo(json.dumps(ex.to_dict(), indent=1))
    else:
        click.echo(os.fsencode(format_text(ex)) + b"\n", nl=False)


def _index_dir(target: str) -> str | None:
    """The ``<workdir>/index`` of a live pyoverlay mount with index=on, else None."""
    rec = state.lookup(_no_touch_realpath(target)) if not bare_name(target) else None
    cfg = rec["config"] if rec is not None else {}
    if not cfg.get("index") or not cfg.get("workdir"):
        return None
    return os.path.join(cfg["workdir"], "index")


def _explain_layers(target: str):
    """(upper, lowers, labels, userxattr, aufs) of a live pyoverlay mount or a container."""
    c = _container(target) if bare_name(target) else None
    if c is not None:
        return (*_container_layers(c), False, False)
    mp = _no_touch_realpath(target)
    rec = state.lookup(mp)
    if rec is not None:
        cfg = rec["config"]
        aufs = bool(cfg.get("aufs_whiteouts"))
        for c in current().all_containers():  # a container's root: label its init layer
            if c.merged and os.path.realpath(c.merged) == mp and c.upper:
                return (*_container_layers(c), False, aufs)
        return cfg.get("upperdir"), list(cfg["lowerdirs"]), None, bool(cfg.get("userxattr")), aufs
    c = _container(target)
    if c is None:
        raise InspectError(f"{target} is neither a pyoverlay mountpoint nor a container")
    return (*_container_layers(c), False, False)
