"""Image endpoints of ``pyoverlay serve`` (``docker images``, ``import``, ``load``, ``save``,
``tag``, ``rmi``, ``image inspect``, ``history``, ``image prune``) on pyoverlay's local
image store (:mod:`runner.images.local`: the store ``pyoverlay images``/``import``/
``commit`` use, so the CLI and the service see the same images).

Docker's own image store (``/var/lib/docker``, read only) is not served here: the API
manages the images it can change. There is no registry access: a pull answers 501.

Uploaded tarballs (import, load) are untrusted: they are spooled to a private temporary
directory under the data dir and read by the store's importers, which refuse anything
that could escape a layer directory (:mod:`runner.images.extract`), device nodes as an
ordinary user included.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import hashlib
import json
import os
import platform
import tarfile
import tempfile
import time
from typing import Any, cast

from ..images import ImageError, local_root
from ..images.core import Image, parse_reference
from ..images.local import LocalStore, dumps
from ..images.streams import MEDIA_TAR, decompress, sha256_digest
from . import changes as changes_
from . import events
from .records import parse_filters
from .server import ApiError, ChunkWriter, Request, Router

router = Router()

#: docker import's ``--change`` instructions


# --- the store -------------------------------------------------------------------------------


def store() -> LocalStore:
    return LocalStore(local_root())


def all_images() -> list[Image]:
    try:
        return store().list()
    except ImageError as e:
        raise ApiError(500, str(e)) from None


def find(ref: str) -> Image:
    """The local image *ref* names (name[:tag], id, id prefix, name@digest); 404 as dockerd."""
    from ..images import NotFound

    try:
        parse_reference(ref)
    except ImageError:
        raise ApiError(404, f"No such image: {ref}") from None
    r = parse_reference(ref)
    try:
        # a bare hex string may be an id prefix or a name: the store tries both
        return store().resolve(ref if r.id_prefix is not None else _familiar(ref))
    except NotFound:
        raise ApiError(404, f"No such image: {ref}") from None
    except ImageError as e:
        raise ApiError(500, str(e)) from None


def _familiar(ref: str) -> str:
    """``docker.io/library/busybox:1`` -> ``busybox:1`` (how the store keeps names)."""
    from ..images.docker import familiar_name

    r = parse_reference(ref)
    if r.name is None:
        return ref
    name = familiar_name(r.name)
    if r.digest:
        return f"{name}@{r.digest}"
    return f"{name}:{r.tag}"


def _created(img: Image) -> int:
    return _unix(img.config.get("created"))


def _unix(created: Any) -> int:
    if not isinstance(created, str) or not created:
        return 0
    s = created.rstrip("Z")
    if "." in s:
        head, frac = s.split(".", 1)
        s = head + "." + frac[:6]
    try:
        return int(datetime.datetime.fromisoformat(s).replace(tzinfo=datetime.UTC).timestamp())
    except ValueError:
        return 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _containers_using(img: Image) -> list[dict]:
    """Container records made from *img* (any status)."""
    from .. import state

    try:
        recs = state.all_records()
    except state.StateError:
        return []
    return [r for r in recs if isinstance(r.get("image"), dict) and r["image"].get("id") == img.id]


def _layers_in_use() -> set[str]:
    """Layer directories some container stacks (they must not be removed under it)."""
    from .. import state

    try:
        recs = state.all_records()
    except state.StateError:
        return set()
    return {p for r in recs for p in (r.get("layers") or []) if isinstance(p, str)}


def _manifest_desc(st: LocalStore, img: Image) -> dict:
    for d in st.index():
        if st.config_of(d["digest"]) == img.id:
            return {k: d[k] for k in ("mediaType", "digest", "size") if k in d}
    raise ApiError(404, f"No such image: {img.id}")


def _bool_filter(values: list[str], key: str) -> bool | None:
    if not values:
        return None
    v = values[-1].lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise ApiError(400, f"invalid filter '{key}={values[-1]}'")


def _until(v: str) -> float:
    """A time filter: unix seconds, RFC 3339, or a duration (``10m``, ``24h``) before now."""
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", v)
    if m:
        mult = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[m.group(2)]
        return time.time() - float(m.group(1)) * mult
    with contextlib.suppress(ValueError):
        return float(v)
    t = _unix(v)
    if t:
        return t
    raise ApiError(400, f"invalid filter 'until={v}'")


# --- GET /images/json ------------------------------------------------------------------------


def _summary(img: Image) -> dict:
    cfg = img.config.get("config") or {}
    return {
        "Id": img.id,
        "ParentId": "",
        "RepoTags": list(img.names) or ["<none>:<none>"],
        "RepoDigests": [] if img.names else ["<none>@<none>"],
        "Created": _created(img),
        "Size": img.size,
        "VirtualSize": img.size,
        "SharedSize": -1,
        "Labels": cfg.get("Labels") or {},
        "Containers": -1,
    }


@router.route("GET", "/images/json")
def list_images(req: Request) -> None:
    f = parse_filters(req, ("dangling", "reference", "before", "since", "label"))
    imgs = all_images()
    dangling = _bool_filter(f.get("dangling", []), "dangling")
    if dangling is not None:
        imgs = [i for i in imgs if (not i.names) == dangling]
    if f.get("reference"):
        pats = f["reference"]

        def named(i: Image) -> list[str]:
            keep = []
            for n in i.names:
                repo = n.rsplit(":", 1)[0]
                if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(repo, p) for p in pats):
                    keep.append(n)
            return keep

        out = []
        for i in imgs:
            hit = named(i)
            if hit:
                i.names = hit  # dockerd shows only the names that matched
                out.append(i)
        imgs = out
    for key, cmp in (("before", lambda c, t: c < t), ("since", lambda c, t: c > t)):
        for ref in f.get(key, []):
            t = _created(find(ref))
            imgs = [i for i in imgs if cmp(_created(i), t)]
    for lab in f.get("label", []):
        k, eq, v = lab.partition("=")
        imgs = [
            i
            for i in imgs
            if k in ((i.config.get("config") or {}).get("Labels") or {})
            and (not eq or ((i.config.get("config") or {}).get("Labels") or {})[k] == v)
        ]
    req.json(sorted((_summary(i) for i in imgs), key=lambda s: -s["Created"]))


# --- GET /images/{name}/json, history ------------------------------------------------------------


def _run_config(img: Image) -> dict:
    c = dict(img.config.get("config") or {})
    base = {
        "Hostname": "",
        "Domainname": "",
        "User": "",
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,
        "OpenStdin": False,
        "StdinOnce": False,
        "Env": None,
        "Cmd": None,
        "Image": "",
        "Volumes": None,
        "WorkingDir": "",
        "Entrypoint": None,
        "OnBuild": None,
        "Labels": None,
    }
    base.update(c)
    return base


@router.route("GET", "/images/{name:path}/json")
def inspect_image(req: Request) -> None:
    img = find(req.params["name"])
    cfg = img.config
    req.json(
        {
            "Id": img.id,
            "RepoTags": list(img.names),
            "RepoDigests": [],
            "Parent": "",
            "Comment": _history_comment(img),
            "Created": cfg.get("created") or "",
            "Container": cfg.get("container") or "",
            "ContainerConfig": _run_config(img) if cfg.get("container_config") is None else cfg["container_config"],
            "DockerVersion": cfg.get("docker_version") or "",
            "Author": cfg.get("author") or "",
            "Config": _run_config(img),
            "Architecture": cfg.get("architecture") or "",
            "Os": cfg.get("os") or "linux",
            "Size": img.size,
            "VirtualSize": img.size,
            "GraphDriver": {
                "Name": "pyoverlay",
                "Data": {"LowerDir": ":".join(img.layers)} if img.layers else {},
            },
            "RootFS": {"Type": "layers", "Layers": list(img.diff_ids)},
            "Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
        }
    )


def _history_comment(img: Image) -> str:
    hist = img.config.get("history") or []
    return (hist[-1].get("comment") or "") if hist and isinstance(hist[-1], dict) else ""


@router.route("GET", "/images/{name:path}/history")
def history(req: Request) -> None:
    img = find(req.params["name"])
    st = store()
    sizes: list[int] = []
    with contextlib.suppress(ApiError, ImageError):
        manifest = st.read_json(_manifest_desc(st, img)["digest"])
        sizes = [int(d.get("size") or 0) for d in manifest.get("layers") or []]
    hist = [h for h in img.config.get("history") or [] if isinstance(h, dict)]
    if not hist:  # no history: one entry per layer
        hist = [{"created": img.config.get("created")} for _ in img.diff_ids]
    out = []
    layer = 0
    for h in hist:
        size = 0
        if not h.get("empty_layer"):
            size = sizes[layer] if layer < len(sizes) else 0
            layer += 1
        out.append(
            {
                "Id": "<missing>",
                "Created": _unix(h.get("created")),
                "CreatedBy": h.get("created_by") or "",
                "Tags": None,
                "Size": size,
                "Comment": h.get("comment") or "",
            }
        )
    out.reverse()
    if out:
        out[0]["Id"] = img.id
        out[0]["Tags"] = list(img.names) or None
    req.json(out)


# --- tag, rmi, prune --------------------------------------------------------------------------


@router.route("POST", "/images/{name:path}/tag")
def tag(req: Request) -> None:
    from ..images.commit import new_name

    img = find(req.params["name"])
    repo = req.arg("repo") or ""
    t = req.arg("tag") or ""
    if not repo:
        raise ApiError(400, "repository name must have at least one component")
    try:
        name = new_name(f"{repo}:{t}" if t else repo)
    except ImageError as e:
        raise ApiError(400, str(e)) from None
    st = store()
    with st.writer() as w:
        w.tag(_manifest_desc(st, img), [name])
    events.publish("image", "tag", img.id, {"name": name})
    req.empty(201)


def _delete(img: Image, ref: str, force: bool, prune: bool, by_name: str | None) -> list[dict]:
    """dockerd's image delete: untag *by_name* (a name reference), or delete the image
    (an id reference), with dockerd's conflicts."""
    users = _containers_using(img)
    running = [r for r in users if _status(r) == "running"]
    short = img.short_id
    out: list[dict] = []
    st = store()
    if by_name is not None:
        if by_name not in img.names:
            raise ApiError(404, f"No such image: {ref}")
        if len(img.names) == 1 and users and not force:
            raise ApiError(
                409,
                f'conflict: unable to remove repository reference "{ref}" (must force) - container '
                f"{users[0]['id'][:12]} is using its referenced image {short}",
            )
        with st.writer() as w:
            w.untag(by_name)
        events.publish("image", "untag", img.id, {"name": by_name})
        out.append({"Untagged": by_name})
        if len(img.names) > 1 or users:
            return out
    else:
        if running:
            raise ApiError(
                409,
                f"conflict: unable to delete {short} (cannot be forced) - image is being used by running "
                f"container {running[0]['id'][:12]}",
            )
        if users and not force:
            raise ApiError(
                409,
                f"conflict: unable to delete {short} (must be forced) - image is being used by stopped "
                f"container {users[0]['id'][:12]}",
            )
        if len(img.names) > 1 and not force:
            raise ApiError(
                409,
                f"conflict: unable to delete {short} (must be forced) - image is referenced in multiple repositories",
            )
        with st.writer() as w:
            for n in img.names:
                w.untag(n)
                events.publish("image", "untag", img.id, {"name": n})
                out.append({"Untagged": n})
        if users:  # forced: the stopped containers keep the image's layers (untagged only)
            return out
    with st.writer() as w:
        gone = w.remove_image(img.id, _layers_in_use())
    events.publish("image", "delete", img.id, {"name": img.id})
    out.append({"Deleted": img.id})
    out += [{"Deleted": d} for d in gone if d != img.id]
    del prune  # no parent images in pyoverlay's store: noprune changes nothing
    return out


def _status(rec: dict) -> str:
    from .. import state

    return state.status(rec)


@router.route("DELETE", "/images/{name:path}")
def remove(req: Request) -> None:
    ref = req.params["name"]
    img = find(ref)
    r = parse_reference(ref)
    by_name = None
    if r.name is not None and r.digest is None and not (r.id_prefix and img.id[7:].startswith(r.id_prefix)):
        by_name = _familiar(ref)
    req.json(_delete(img, ref, req.flag("force"), not req.flag("noprune"), by_name))


@router.route("POST", "/images/prune")
def prune(req: Request) -> None:
    f = parse_filters(req, ("dangling", "until", "label", "label!"))
    dangling_only = _bool_filter(f.get("dangling", []), "dangling")
    dangling_only = True if dangling_only is None else dangling_only
    until = min((_until(v) for v in f.get("until", [])), default=None)
    deleted: list[dict] = []
    reclaimed = 0
    used = {r["image"].get("id") for r in _all_records() if isinstance(r.get("image"), dict)}
    for img in all_images():
        if img.id in used or (dangling_only and img.names):
            continue
        if until is not None and _created(img) >= until:
            continue
        labels = (img.config.get("config") or {}).get("Labels") or {}
        if not all(_label_match(labels, lab) for lab in f.get("label", [])):
            continue
        if any(_label_match(labels, lab) for lab in f.get("label!", [])):
            continue
        st = store()
        with st.writer() as w:
            for n in img.names:
                w.untag(n)
                deleted.append({"Untagged": n})
            gone = w.remove_image(img.id, _layers_in_use())
        events.publish("image", "delete", img.id, {"name": img.id})
        deleted.append({"Deleted": img.id})
        deleted += [{"Deleted": d} for d in gone]
        reclaimed += img.size
    events.publish("image", "prune", "", {"reclaimed": str(reclaimed)})
    req.json({"ImagesDeleted": deleted or None, "SpaceReclaimed": reclaimed})


def _label_match(labels: dict, lab: str) -> bool:
    k, eq, v = lab.partition("=")
    return k in labels and (not eq or labels[k] == v)


def _all_records() -> list[dict]:
    from .. import state

    try:
        return state.all_records()
    except state.StateError:
        return []


# --- uploads: import and load ----------------------------------------------------------------


@contextlib.contextmanager
def _spooled(req: Request):
    """The request body in a private temporary file (under the data dir: 0700, the user's)."""
    from ..state import private_data_root

    with tempfile.TemporaryDirectory(prefix="api-upload-", dir=private_data_root()) as d:
        path = os.path.join(d, "body")
        with open(path, "wb") as f:
            for chunk in req.body_chunks():
                f.write(chunk)
        yield path


def _json_line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\r\n"


@router.route("POST", "/images/create")
def create(req: Request) -> None:
    if req.arg("fromImage"):
        raise ApiError(
            501,
            f"pyoverlay serve has no registry access (cannot pull {req.arg('fromImage')}):"
            " use docker load or docker import",
        )
    src = req.arg("fromSrc")
    if src is None:
        raise ApiError(400, "fromImage or fromSrc is required")
    if src != "-":
        raise ApiError(501, f"pyoverlay serve imports from the request body only (fromSrc=-), not from {src}")
    name = None
    repo = req.arg("repo") or ""
    if repo:
        from ..images.commit import new_name

        t = req.arg("tag") or ""
        try:
            name = new_name(f"{repo}:{t}" if t and ":" not in repo.rsplit("/", 1)[-1] else repo)
        except ImageError as e:
            raise ApiError(400, str(e)) from None
    changes = req.query.get("changes", [])
    config_part = changes_.apply({}, changes)
    message = req.arg("message") or ""
    with _spooled(req) as path:
        img = _import_rootfs(path, name, config_part, message)
    events.publish("image", "import", img.id, {"name": name or img.id})
    req.stream_start("application/json")
    req.stream_write(_json_line({"status": img.id}))


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _import_rootfs(path: str, name: str | None, cfg: dict, message: str) -> Image:
    """A new one-layer image from the rootfs tarball *path* (plain, gzip or zstd)."""
    from ..images.unpack import unpack

    st = store()
    with open(path, "rb") as f:
        try:
            u = unpack(f, None, label="imported tarball")  # the digests first
        except ImageError as e:
            raise ApiError(400, str(e)) from None
    now = _now()
    hist: dict[str, Any] = {"created": now, "created_by": "", "comment": message or "Imported from -"}
    config = {
        "architecture": _arch(),
        "os": "linux",
        "created": now,
        "comment": message or "Imported from -",
        "config": cfg,
        "history": [hist],
        "rootfs": {"type": "layers", "diff_ids": [u.diff_id]},
    }
    try:
        with st.writer() as w, open(path, "rb") as f:
            desc, _ = w.add_layer(f, diff_id=u.diff_id, digest=u.digest, size=u.size, label="imported tarball")
            return w.add_image(dumps(config), [desc], [name] if name else [])
    except ImageError as e:
        raise ApiError(400, str(e)) from None


@router.route("POST", "/images/load")
def load(req: Request) -> None:
    from ..images.store_cli import import_archive

    quiet = req.flag("quiet")
    with _spooled(req) as path:
        lines: list[dict] = []

        def log(msg: str) -> None:
            short, _, rest = msg.partition(" ")
            lines.append({"status": "Loading layer", "id": short, "progressDetail": {}, "progress": rest})

        try:
            imgs = import_archive(path, store(), log=log)
        except ImageError as e:
            raise ApiError(400, str(e)) from None
    req.stream_start("application/json")
    if not quiet:
        for ln in lines:
            req.stream_write(_json_line(ln))
    for img in imgs:
        events.publish("image", "load", img.id, {"name": img.names[0] if img.names else img.id})
        for n in img.names:
            req.stream_write(_json_line({"stream": f"Loaded image: {n}\n"}))
        if not img.names:
            req.stream_write(_json_line({"stream": f"Loaded image ID: {img.id}\n"}))


# --- save: docker save archives ---------------------------------------------------------------


@router.route("GET", "/images/{name:path}/get")
def save_one(req: Request) -> None:
    _save(req, [req.params["name"]])


@router.route("GET", "/images/get")
def save_many(req: Request) -> None:
    names = req.query.get("names", [])
    if not names:
        raise ApiError(400, "no images to save: give names=")
    _save(req, names)


def _save(req: Request, refs: list[str]) -> None:
    """A docker-save archive (the format docker 20.10 writes and every docker loads:
    ``manifest.json``, ``repositories``, ``<id>.json`` configs, ``<v1 id>/layer.tar``)."""
    st = store()
    picked: dict[str, tuple[Image, list[str]]] = {}
    for ref in refs:
        img = find(ref)
        entry = picked.setdefault(img.id, (img, []))
        r = parse_reference(ref)
        if r.name is not None and r.digest is None and not (r.id_prefix and img.id[7:].startswith(r.id_prefix)):
            n = _familiar(ref)
            if n not in entry[1]:
                entry[1].append(n)
        else:  # by id: all its names, as docker save does
            entry[1].extend(n for n in img.names if n not in entry[1])
    # every layer's uncompressed tar must be known before the stream starts (errors are
    # answered as errors, not as a broken archive)
    plans = []
    for img, names in picked.values():
        manifest = st.read_json(_manifest_desc(st, img)["digest"])
        descs = manifest.get("layers") or []
        if len(descs) != len(img.diff_ids):
            raise ApiError(500, f"image {img.short_id}: its manifest and config disagree on the layers")
        plans.append((img, names, descs))
    req.stream_start("application/x-tar")
    out = ChunkWriter(req)
    manifest_json: list[dict] = []
    repositories: dict[str, dict[str, str]] = {}
    written: set[str] = set()
    with (
        tempfile.TemporaryDirectory(prefix="api-save-", dir=_private_tmp()) as tmpd,
        tarfile.open(fileobj=cast(Any, out), mode="w|", format=tarfile.PAX_FORMAT) as tf,
    ):
        mtime = int(time.time())
        for img, names, descs in plans:
            config = st.read_blob(img.id)
            cfg_name = f"{img.id[7:]}.json"
            if cfg_name not in written:
                _add_bytes(tf, cfg_name, config, mtime)
                written.add(cfg_name)
            parent = ""
            layer_paths = []
            for diff_id, desc in zip(img.diff_ids, descs, strict=True):
                v1 = hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
                if v1 not in written:
                    _add_dir(tf, v1, mtime)
                    _add_bytes(tf, f"{v1}/VERSION", b"1.0", mtime)
                    v1json = {"id": v1, "created": "1970-01-01T00:00:00Z"}
                    if parent:
                        v1json["parent"] = parent
                    _add_bytes(tf, f"{v1}/json", dumps(v1json), mtime)
                    _add_layer(tf, st, f"{v1}/layer.tar", desc, diff_id, tmpd, mtime)
                    written.add(v1)
                layer_paths.append(f"{v1}/layer.tar")
                parent = v1
            manifest_json.append({"Config": cfg_name, "RepoTags": names or None, "Layers": layer_paths})
            for n in names:
                repo, _, t = n.rpartition(":")
                repositories.setdefault(repo, {})[t] = parent
        _add_bytes(tf, "manifest.json", json.dumps(manifest_json).encode(), mtime)
        if repositories:
            _add_bytes(tf, "repositories", json.dumps(repositories).encode(), mtime)
    out.flush()
    for img, _names, _ in plans:
        events.publish("image", "save", img.id, {"name": img.names[0] if img.names else img.id})


def _private_tmp() -> str:
    from ..state import private_data_root

    return private_data_root()


def _add_dir(tf: tarfile.TarFile, name: str, mtime: int) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    ti.mtime = mtime
    tf.addfile(ti)


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    import io

    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    ti.mtime = mtime
    tf.addfile(ti, io.BytesIO(data))


def _add_layer(tf: tarfile.TarFile, st: LocalStore, name: str, desc: dict, diff_id: str, tmpd: str, mtime: int) -> None:
    """The layer's uncompressed tar (its digest is the diff id: checked)."""
    blob = st.blob_path(desc["digest"])
    if desc["digest"] == diff_id or desc.get("mediaType") == MEDIA_TAR:
        src, size = blob, os.path.getsize(blob)
    else:  # compressed in the store: decompressed to a temporary file first (its size)
        src = os.path.join(tmpd, "layer.tar")
        with open(blob, "rb") as f, open(src, "wb") as out:
            _kind, raw = decompress(f)
            while chunk := raw.read(1 << 20):
                out.write(chunk)
        size = os.path.getsize(src)
    h = hashlib.sha256()
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = mtime
    with open(src, "rb") as f:
        tf.addfile(ti, _Hashing(f, h))
    if "sha256:" + h.hexdigest() != diff_id:
        raise ImageError(f"layer {diff_id}: the stored blob does not match its diff id (damaged store)")


class _Hashing:
    def __init__(self, f, h) -> None:
        self.f, self.h = f, h

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


__all__ = ["find", "router", "sha256_digest"]
