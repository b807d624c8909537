"""``pyoverlay commit``: a container's upper layer as a layer tar, or as a new image.

The layer tar is the upper directory written by :func:`.layertar.write_layer` (whiteouts
as ``.wh.NAME``, opaque directories with ``.wh..wh..opq``, no overlay-private xattrs).

A new image (``--image NAME[:TAG]``) goes into the local store and is self-contained:

* its base is the parent image: ``--parent REF`` (local store or Docker's), else the
  image the container was started from (the record's ``"image"``). The new config is
  the parent's config with the new diff id appended to ``rootfs.diff_ids``, a history
  entry ``{"created_by": "pyoverlay commit"}`` and a new ``created`` time. A parent
  layer already in the store is shared; one that is not (a Docker store image) is
  written as a tar from its directory and stored, which gives it a new diff id (Docker's
  original tar bytes are not available), replacing the parent's in the new config;
* without a parent, a container's lower directories become the image's base layers
  (each tarred and stored like an upper; bottom first) and the config is new, with the
  container's command as ``Cmd``; an upper directory given alone makes a one-layer image.
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import sys

from .core import Image, ImageError, parse_reference
from .layertar import write_layer
from .local import LocalStore, dumps
from .streams import MEDIA_TAR

CREATED_BY = "pyoverlay commit"


def find_upper(target: str) -> tuple[str, dict | None]:
    """``(upper dir, container record or None)`` for an upper directory or a container."""
    if os.path.isdir(target):
        return os.path.realpath(target), None
    from .. import state

    try:
        rec = state.resolve(target)
    except state.StateError as e:
        raise ImageError(f"{e} (and no directory {target!r})") from None
    upper = rec.get("upper")
    if not upper or not os.path.isdir(upper):
        raise ImageError(f"container {rec.get('name') or rec['id']} has no upper layer (never started?)")
    if state.status(rec) == "running":
        print(
            f"pyoverlay: warning: {rec.get('name') or rec['id'][:12]} is running; "
            "files changing meanwhile may be captured half-written",
            file=sys.stderr,
        )
    return upper, rec


def container_lowers(rec: dict | None) -> list[str] | None:
    """The layers below a container's upper, top first, as its mount stacks them (the init
    layer over the image's); None without a container record."""
    if rec is None:
        return None
    init = rec.get("init_layer")
    return ([init] if init else []) + list(rec.get("layers") or [])


def write_tar(upper: str, output: str, rec: dict | None = None) -> tuple[str, int]:
    """The upper as a tar in *output* ("-": stdout), written whole or not at all. With the
    container's record, a directory renamed by redirect is written in full (layertar)."""
    lowers = container_lowers(rec)
    if output == "-":
        return write_layer(upper, sys.stdout.buffer, lowers=lowers)
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            res = write_layer(upper, f, lowers=lowers)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
        return res
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def new_name(ref: str) -> str:
    """``NAME[:TAG]`` as stored: Docker's short form, ``latest`` by default."""
    from .docker import familiar_name

    r = parse_reference(ref)
    if r.name is None or r.digest is not None:
        raise ImageError(f"a new image name is NAME[:TAG], not {ref!r}")
    return f"{familiar_name(r.name)}:{r.tag}"


def commit_image(
    upper: str,
    rec: dict | None,
    name: str | None,
    parent: Image | None,
    store: LocalStore,
    log=None,
    edit=None,
) -> Image:
    """Store the image "parent (or the container's lowers) + *upper*" as *name* (None:
    untagged, as ``docker commit CONTAINER`` without a repository). *edit*: called with the
    new config before it is stored (the API's ``--change``, ``--author``, ``--message``)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with store.writer() as w:
        descs, diff_ids = [], []

        def add_dir(path: str, what: str, lowers: list[str] | None = None) -> None:
            tmp = w.mktemp("tar")
            with open(tmp, "wb") as f:
                diff_id, size = write_layer(path, f, lowers=lowers)
            with open(tmp, "rb") as f:
                desc, fresh = w.add_layer(
                    f, diff_id=diff_id, digest=diff_id, media_type=MEDIA_TAR, size=size, label=what
                )
            os.unlink(tmp)
            log(f"{what}: {diff_id} ({'stored' if fresh else 'already present'})")
            descs.append(desc)
            diff_ids.append(diff_id)

        if parent is not None:
            config = copy.deepcopy(parent.config)
            history = list(config.get("history") or [])
            for d, path in zip(parent.diff_ids, reversed(parent.layers), strict=True):
                desc = store.descriptor_for(d) if w.has_layer(d) else None
                if desc is None:
                    add_dir(path, f"parent layer {d[:19]}")
                else:
                    descs.append(desc)
                    diff_ids.append(d)
        else:
            cmd = (rec or {}).get("command") or []
            config = {"architecture": _arch(), "os": "linux", "config": {"Cmd": cmd} if cmd else {}}
            history = []
            for path in reversed((rec or {}).get("layers") or []):
                add_dir(path, f"lower layer {path}")
                history.append({"created": now, "created_by": f"{CREATED_BY} (lower layer {path})"})
        add_dir(upper, "upper layer", container_lowers(rec))
        history.append({"created": now, "created_by": CREATED_BY})
        config.update(created=now, history=history, rootfs={"type": "layers", "diff_ids": diff_ids})
        if edit is not None:
            edit(config)
        return w.add_image(dumps(config), descs, [name] if name else [])


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)
