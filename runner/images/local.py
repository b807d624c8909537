"""The local image store: an OCI image layout plus one unpacked directory per layer.

::

    <root>/oci-layout                {"imageLayoutVersion": "1.0.0"}
    <root>/index.json                OCI image index; one manifest descriptor per name, annotated
                                     org.opencontainers.image.ref.name = "name:tag"
                                     (a descriptor without it: an untagged image)
    <root>/blobs/sha256/<hex>        configs, manifests and layer blobs as imported
    <root>/layers/<diff id hex>/     the layer unpacked in the kernel's overlay format (char 0/0
                                     whiteouts, overlay.opaque="y"), shared by every image using it
    <root>/tmp/                      work in progress of the writer; emptied by the next writer
    <root>/.lock                     writers hold an exclusive flock on it

The store is the user's own and closed to everyone else, as docker keeps
/var/lib/docker: its root is created 0700 (a store the user owns that others may read
is made 0700 when opened; one owned by someone else or writable by others is refused).
Layer directories keep the modes of the image (``/tmp`` in a layer is 1777): it is the
closed root that keeps other host users out of them (issue 13 item 5).

Rules that make readers lock-free: a writer takes the lock, builds everything in
``tmp/`` and renames it into place (blobs and layers are never modified once in place;
``index.json`` is replaced by rename), layers and blobs before the index that refers to
them. A killed writer leaves at most unreferenced files in ``tmp/`` (removed by the next
writer) or a complete, verified, unreferenced layer (reused by the next import).

An image's id is the digest of its config (as Docker's). Several manifests may share a
config (the same image imported with gzip and with zstd layers): they are one image.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import uuid

from .core import Image, ImageError, NotFound, parse_reference
from .streams import MEDIA_TAR, MEDIA_TYPES, force_rmtree, fsync_dir, hex_of, is_digest, sha256_digest
from .unpack import unpack

REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA = "application/vnd.oci.image.index.v1+json"
_libc = ctypes.CDLL(None, use_errno=True)


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class LocalStore:
    def __init__(self, root: str) -> None:
        self.root = root
        self.problems: list[str] = []
        self._checked = False

    def _private(self, create: bool) -> bool:
        """Check (and create, with *create*) the store root: the user's own, 0700 (an
        existing one others could only read is made so). False: no store yet."""
        from overlayfs_py.state import StateDirError, private_dir

        from ..state import data_root

        if self._checked:
            return True
        if not create and not os.path.lexists(self.root):
            return False
        try:
            if os.path.dirname(os.path.abspath(self.root)) == data_root() and (create or os.path.lexists(data_root())):
                private_dir(data_root(), "data dir")
            private_dir(self.root, "local image store")
        except StateDirError as e:
            raise ImageError(str(e)) from None
        self._checked = True
        return True

    # ---- reading (no lock) ------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", hex_of(digest))

    def layer_dir(self, diff_id: str) -> str:
        return os.path.join(self.root, "layers", hex_of(diff_id))

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"local image store {self.root} is damaged: blob {digest}: {e.strerror}") from None
        if sha256_digest(data) != digest:
            raise ImageError(f"local image store {self.root} is damaged: blob {digest} has another digest")
        return data

    def read_json(self, digest: str) -> dict:
        try:
            doc = json.loads(self.read_blob(digest))
        except ValueError:
            raise ImageError(f"local image store {self.root}: blob {digest} is not JSON") from None
        if not isinstance(doc, dict):
            raise ImageError(f"local image store {self.root}: blob {digest} is not a JSON object")
        return doc

    def _config_digest(self, manifest: dict, digest: str) -> str:
        cfg = manifest.get("config")
        if not isinstance(cfg, dict) or not is_digest(cfg.get("digest")):
            raise ImageError(f"local image store {self.root} is damaged: manifest {digest} has no config digest")
        return cfg["digest"]

    def index(self) -> list[dict]:
        if not self._private(create=False):
            return []
        try:
            with open(os.path.join(self.root, "index.json"), "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise ImageError(f"local image store {self.root}: unreadable index.json ({e})") from None
        manifests = data.get("manifests") if isinstance(data, dict) else 0
        if not isinstance(manifests, list | None):
            raise ImageError(f"local image store {self.root}: index.json is not an OCI image index")
        return [d for d in manifests or [] if isinstance(d, dict) and is_digest(d.get("digest"))]

    def config_of(self, manifest_digest: str) -> str:
        return self._config_digest(self.read_json(manifest_digest), manifest_digest)

    def _groups(self) -> dict[str, tuple[str, list[str]]]:
        """config digest -> (manifest digest, names), in index order (a later, named
        manifest wins)."""
        out: dict[str, tuple[str, list[str]]] = {}
        for d in self.index():
            cfg = self.config_of(d["digest"])
            name = (d.get("annotations") or {}).get(REF_NAME)
            manifest, names = out.get(cfg, (d["digest"], []))
            if name:
                manifest = d["digest"]
                if name not in names:
                    names.append(name)
            out[cfg] = (manifest, names)
        return out

    def image(self, manifest_digest: str, names: list[str]) -> Image:
        manifest = self.read_json(manifest_digest)
        cfg_digest = self._config_digest(manifest, manifest_digest)
        config = self.read_json(cfg_digest)
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        layers = [self.layer_dir(d) for d in reversed(diff_ids)]
        for d, path in zip(reversed(diff_ids), layers, strict=True):
            if not os.path.isdir(path):
                raise ImageError(
                    f"local image store {self.root} is damaged: layer {d} of "
                    f"{names[0] if names else cfg_digest} is missing"
                )
        size = sum(int(desc.get("size") or 0) for desc in manifest.get("layers") or [])
        return Image(
            id=cfg_digest, names=list(names), layers=layers, config=config, source="local", size=size, diff_ids=diff_ids
        )

    def list(self) -> list[Image]:
        """Every image; a damaged one is left out and described in :attr:`problems`."""
        out = []
        for m, names in self._groups().values():
            try:
                out.append(self.image(m, names))
            except ImageError as e:
                self.problems.append(str(e))
        return out

    def resolve(self, ref: str) -> Image:
        r = parse_reference(ref)
        groups = self._groups()
        if r.name is not None:
            want = f"{r.name}:{r.tag}" if r.tag else None
            for cfg, (m, names) in groups.items():
                if want in names or r.digest in (cfg, m):
                    return self.image(m, names)
        if r.id_prefix is not None:
            hits = [cfg for cfg in groups if cfg[7:].startswith(r.id_prefix)]
            if len(hits) > 1:
                raise ImageError(f"image id prefix {r.id_prefix} is ambiguous ({len(hits)} images)")
            if hits:
                return self.image(*groups[hits[0]])
        raise NotFound(f"no such image in the local store: {ref}")

    def descriptor_for(self, diff_id: str) -> dict | None:
        """The layer blob descriptor some manifest in the store uses for *diff_id*."""
        for m, _ in self._groups().values():
            manifest = self.read_json(m)
            ids = self.read_json(self._config_digest(manifest, m)).get("rootfs", {}).get("diff_ids") or []
            descs = manifest.get("layers") or []
            if len(ids) != len(descs):
                continue  # a damaged manifest pairs nothing reliably
            for d, desc in zip(ids, descs, strict=True):
                if d == diff_id and os.path.exists(self.blob_path(desc["digest"])):
                    return {k: desc[k] for k in ("mediaType", "digest", "size")}
        return None

    @contextlib.contextmanager
    def writer(self):
        """The only way to change the store: ``with store.writer() as w: ...``."""
        self._private(create=True)
        for d in ("blobs", "blobs/sha256", "layers"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(self.root, d), 0o700)
        fd = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            w = Writer(self)
            try:
                yield w
            finally:
                force_rmtree(w.tmp)
                os.makedirs(w.tmp, mode=0o700, exist_ok=True)
        finally:
            os.close(fd)


class Writer:
    """Changes to a :class:`LocalStore`, made while holding its lock."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.tmp = os.path.join(store.root, "tmp")
        force_rmtree(self.tmp)  # leftovers of a killed writer
        os.makedirs(self.tmp, mode=0o700, exist_ok=True)
        path = os.path.join(store.root, "oci-layout")
        if not os.path.exists(path):
            self._install(dumps({"imageLayoutVersion": "1.0.0"}), path)

    def mktemp(self, what: str) -> str:
        return os.path.join(self.tmp, f"{what}-{uuid.uuid4().hex[:12]}")

    def _install(self, data: bytes, dest: str) -> None:
        tmp = self.mktemp("file")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(os.path.dirname(dest))

    def put_blob(self, data: bytes) -> dict:
        digest = sha256_digest(data)
        if not os.path.exists(self.store.blob_path(digest)):
            self._install(data, self.store.blob_path(digest))
        return {"digest": digest, "size": len(data)}

    def has_layer(self, diff_id: str) -> bool:
        return os.path.isdir(self.store.layer_dir(diff_id))

    def needs_read(self, diff_id: str, digest: str | None = None) -> bool:
        """False when :meth:`add_layer` would not read the blob (layer and blob are stored)."""
        return not (self.has_layer(diff_id) and os.path.exists(self.store.blob_path(digest or diff_id)))

    def add_layer(
        self,
        f,
        *,
        diff_id: str,
        digest: str | None = None,
        media_type: str | None = None,
        size: int | None = None,
        label: str = "layer",
    ) -> tuple[dict, bool]:
        """Store the layer blob read from *f*: ``(descriptor, unpacked now)``. A diff id
        already present is not unpacked again (nor read, when its blob is there too)."""
        have = self.has_layer(diff_id)
        blob = digest or diff_id  # no digest given (docker save legacy): an uncompressed tar
        if have and os.path.exists(self.store.blob_path(blob)):
            return {
                "mediaType": media_type or MEDIA_TAR,
                "digest": blob,
                "size": os.path.getsize(self.store.blob_path(blob)),
            }, False
        tmp_blob, dest = self.mktemp("blob"), None if have else self.mktemp("layer")
        with open(tmp_blob, "wb") as out:
            u = unpack(f, dest, digest=digest, diff_id=diff_id, tee=out, size=size, label=label)
            out.flush()
            os.fsync(out.fileno())
        self._commit_files(dest)
        os.replace(tmp_blob, self.store.blob_path(u.digest))
        if dest is not None:
            os.rename(dest, self.store.layer_dir(u.diff_id))
        fsync_dir(os.path.dirname(self.store.blob_path(u.digest)))
        fsync_dir(os.path.dirname(self.store.layer_dir(u.diff_id)))
        return {"mediaType": media_type or MEDIA_TYPES[u.compression], "digest": u.digest, "size": u.size}, not have

    @staticmethod
    def _commit_files(dest: str | None) -> None:
        """Flush the new layer's files before it becomes visible (syncfs of the store)."""
        if dest is None:
            return
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _libc.syncfs(fd)
        finally:
            os.close(fd)

    def add_image(self, config: bytes, layers: list[dict], names: list[str], manifest: bytes | None = None) -> Image:
        """Store the config, the manifest (*manifest* as given, else a new OCI one) and
        point *names* at it; return the image."""
        cfg = self.put_blob(config)
        if manifest is None:
            manifest = dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": MANIFEST_MEDIA,
                    "config": {"mediaType": CONFIG_MEDIA, **cfg},
                    "layers": layers,
                }
            )
        desc = {"mediaType": json.loads(manifest).get("mediaType") or MANIFEST_MEDIA, **self.put_blob(manifest)}
        self.tag(desc, names)
        return self.store.image(desc["digest"], names)

    def tag(self, desc: dict, names: list[str]) -> None:
        """Point each of *names* at the manifest *desc* (moving it from another image). An
        image left without names stays in the index, untagged, unless its config is
        still reachable through another entry."""
        old = self.store.index()
        keep = [d for d in old if _name(d) not in names and not (d["digest"] == desc["digest"] and not _name(d))]
        keep += [{**desc, "annotations": {REF_NAME: n}} for n in names]
        if not any(d["digest"] == desc["digest"] for d in keep):
            keep.append(dict(desc))
        configs = {self.store.config_of(d["digest"]) for d in keep}
        for d in old:
            if d["digest"] not in {k["digest"] for k in keep} and self.store.config_of(d["digest"]) not in configs:
                keep.append({k: v for k, v in d.items() if k != "annotations"})
                configs.add(self.store.config_of(d["digest"]))
        index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA, "manifests": keep}
        self._install(json.dumps(index, indent=1).encode(), os.path.join(self.store.root, "index.json"))

    def untag(self, name: str) -> bool:
        """Remove the name *name* (False: no image has it). The image keeps its other names,
        or stays as an untagged image."""
        old = self.store.index()
        hit = [d for d in old if _name(d) == name]
        if not hit:
            return False
        keep = [d for d in old if _name(d) != name]
        cfg = self.store.config_of(hit[0]["digest"])
        if not any(self.store.config_of(d["digest"]) == cfg for d in keep):
            keep.append({k: v for k, v in hit[0].items() if k != "annotations"})
        self._write_index(keep)
        return True

    def remove_image(self, config_digest: str, keep_layers: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        """Remove the image *config_digest* (all its names) and the blobs and layer
        directories no other image uses (nor *keep_layers*: layer dirs containers use).
        Returns the diff ids of the layer directories removed."""
        old = self.store.index()
        keep = [d for d in old if self.store.config_of(d["digest"]) != config_digest]
        if len(keep) == len(old):
            return []
        self._write_index(keep)
        used_blobs: set[str] = set()
        used_layers: set[str] = set()
        for d in keep:
            used_blobs.add(d["digest"])
            with contextlib.suppress(ImageError):
                manifest = self.store.read_json(d["digest"])
                cfg = self.store._config_digest(manifest, d["digest"])
                used_blobs.add(cfg)
                used_blobs.update(x["digest"] for x in manifest.get("layers") or [] if is_digest(x.get("digest")))
                ids = (self.store.read_json(cfg).get("rootfs") or {}).get("diff_ids") or []
                used_layers.update(i for i in ids if is_digest(i))
        gone: list[str] = []
        for d in old:
            if d in keep:
                continue
            with contextlib.suppress(ImageError):
                manifest = self.store.read_json(d["digest"])
                cfg = self.store._config_digest(manifest, d["digest"])
                ids = (self.store.read_json(cfg).get("rootfs") or {}).get("diff_ids") or []
                blobs = [d["digest"], cfg, *(x.get("digest") for x in manifest.get("layers") or [])]
                for layer in ids:
                    path = self.store.layer_dir(layer) if is_digest(layer) else None
                    if path and layer not in used_layers and path not in keep_layers and os.path.isdir(path):
                        tmp = self.mktemp("gone")
                        os.rename(path, tmp)  # out of sight at once; removed with tmp/
                        gone.append(layer)
                for b in blobs:
                    if is_digest(b) and b not in used_blobs:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.store.blob_path(b))
        return gone

    def _write_index(self, manifests: list[dict]) -> None:
        index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA, "manifests": manifests}
        self._install(json.dumps(index, indent=1).encode(), os.path.join(self.store.root, "index.json"))


def _name(desc: dict) -> str | None:
    return (desc.get("annotations") or {}).get(REF_NAME)
