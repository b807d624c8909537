"""Read image archives: ``docker save`` output and OCI image layouts, as a directory or
as a tar file (which may itself be gzip- or zstd-compressed).

Formats understood:

* **docker save, legacy** (Docker < 25): ``manifest.json`` = ``[{"Config": "<id>.json",
  "RepoTags": ["name:tag"], "Layers": ["<v1id>/layer.tar", ...bottom first]}]``;
  the config's sha256 is the image id (checked), its ``rootfs.diff_ids`` are the digests
  of the (uncompressed) layer tars (checked while unpacking). ``<v1id>/layer.tar`` may be
  a symlink to another image's ``layer.tar`` (resolved inside the archive only);
  ``repositories`` and ``<v1id>/json`` are not needed.
* **OCI image layout** (also what Docker >= 25 saves, next to a compatible
  ``manifest.json``): ``oci-layout``, ``index.json`` -> manifest (or a nested image index:
  the descriptor for this host's linux platform is taken) -> config and layer blobs under
  ``blobs/sha256/<hex>``; every blob is checked against its digest. Names come from
  ``manifest.json`` ``RepoTags`` when present, else from the annotations
  ``io.containerd.image.name`` or ``org.opencontainers.image.ref.name`` (when the latter is
  a full ``name:tag``; a bare tag names nothing).

Names are stored in Docker's short form (``docker.io/library/busybox:1`` -> ``busybox:1``).
Paths taken from the archive's JSON never leave the archive: in a directory they are
opened with ``openat2(RESOLVE_BENEATH)``, in a tar they are looked up lexically.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import posixpath
import re
import shutil
import tarfile
from dataclasses import dataclass, field

from overlayfs_py import _sys

from . import ImageError, parse_reference
from .streams import decompress, hex_of, sha256_digest

_MAX_JSON = 64 << 20
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


@dataclass
class LayerRef:
    path: str                   # inside the archive
    diff_id: str                # from the config
    digest: str | None = None   # blob digest (None: legacy, the tar as is)
    media_type: str | None = None
    size: int | None = None


@dataclass
class ArchiveImage:
    config: bytes
    layers: list[LayerRef]      # bottom first
    names: list[str] = field(default_factory=list)
    manifest: bytes | None = None   # the OCI manifest as found (None: legacy)

    @property
    def id(self) -> str:
        return sha256_digest(self.config)


class _DirSource:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, _sys.DIR_FLAGS)

    def open(self, rel: str):
        fd = _sys.openat2(self.fd, os.fsencode(rel), os.O_RDONLY | os.O_CLOEXEC,
                          resolve=_sys.RESOLVE_BENEATH | _sys.RESOLVE_NO_MAGICLINKS)
        f = os.fdopen(fd, "rb")
        return f, os.fstat(fd).st_size

    def close(self) -> None:
        os.close(self.fd)


class _TarSource:
    def __init__(self, path: str) -> None:
        try:
            self.tf = tarfile.open(path, "r:", encoding="utf-8", errors="surrogateescape")
            self.members = {_norm(m.name): m for m in self.tf.getmembers()}
        except (tarfile.TarError, OSError) as e:
            raise ImageError(f"{path}: not an image archive (tar) or directory: {e}") from None

    def _member(self, rel: str, hops: int = 0) -> tarfile.TarInfo:
        name = _norm(rel)
        m = self.members.get(name)
        if m is None or hops > 16:
            raise FileNotFoundError(2, "not in the archive", rel)
        if m.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
            if m.linkname.startswith("/") or target.startswith(".."):
                raise ImageError(f"archive member {rel!r} is a symlink out of the archive")
            return self._member(target, hops + 1)
        if m.islnk():
            return self._member(m.linkname, hops + 1)
        return m

    def open(self, rel: str):
        m = self._member(rel)
        if not m.isreg():
            raise ImageError(f"archive member {rel!r} is not a file")
        return self.tf.extractfile(m), m.size

    def close(self) -> None:
        self.tf.close()


def _norm(name: str) -> str:
    n = posixpath.normpath("/" + name).lstrip("/")
    return n


@contextlib.contextmanager
def open_archive(path: str, tmpdir: str):
    """An :class:`Archive` for *path* (a directory or a tar file); a compressed tar is
    first decompressed into *tmpdir* (random access is needed: manifest.json comes last)."""
    tmp = None
    if os.path.isdir(path):
        src = _DirSource(path)
    else:
        try:
            with open(path, "rb") as f:
                kind, reader = decompress(f)
                if kind:
                    tmp = os.path.join(tmpdir, "archive.tar")
                    with open(tmp, "wb") as out:
                        shutil.copyfileobj(reader, out, 1 << 20)
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e}") from None
        src = _TarSource(tmp or path)
    try:
        yield Archive(src, path)
    finally:
        src.close()
        if tmp:
            os.unlink(tmp)


class Archive:
    def __init__(self, src, path: str) -> None:
        self.src = src
        self.path = path

    def open(self, rel: str):
        """``(file, size)`` of a member; ImageError if it is missing."""
        try:
            return self.src.open(rel)
        except OSError as e:
            raise ImageError(f"{self.path}: {rel}: {e.strerror or e}") from None

    def exists(self, rel: str) -> bool:
        try:
            self.src.open(rel)[0].close()
            return True
        except (OSError, ImageError):
            return False

    def read(self, rel: str, digest: str | None = None) -> bytes:
        f, size = self.open(rel)
        with f:
            if size > _MAX_JSON:
                raise ImageError(f"{self.path}: {rel} is too large for a JSON document")
            data = f.read()
        if digest is not None and sha256_digest(data) != digest:
            raise ImageError(f"{self.path}: {rel}: digest mismatch (expected {digest})")
        return data

    def json(self, rel: str, digest: str | None = None):
        try:
            return json.loads(self.read(rel, digest))
        except ValueError:
            raise ImageError(f"{self.path}: {rel} is not valid JSON") from None

    def images(self) -> list[ArchiveImage]:
        """Every image in the archive, in order."""
        if self.exists("index.json"):
            return self._oci()
        if self.exists("manifest.json"):
            return self._legacy()
        raise ImageError(f"{self.path}: neither a docker save archive (manifest.json) "
                         "nor an OCI image layout (index.json)")

    # ---- docker save, legacy --------------------------------------------------------

    def _legacy(self) -> list[ArchiveImage]:
        out = []
        for e in self._manifest_json():
            cfg_path = e.get("Config") or ""
            m = re.search(r"([0-9a-f]{64})(\.json)?$", cfg_path)
            config = self.read(cfg_path, "sha256:" + m.group(1) if m else None)
            diff_ids = _diff_ids(config, cfg_path)
            paths = e.get("Layers") or []
            if len(paths) != len(diff_ids):
                raise ImageError(f"{self.path}: {cfg_path}: {len(paths)} layers but {len(diff_ids)} diff ids")
            out.append(ArchiveImage(config, [LayerRef(p, d) for p, d in zip(paths, diff_ids)],
                                    _names(e.get("RepoTags") or [])))
        return out

    def _manifest_json(self) -> list[dict]:
        doc = self.json("manifest.json")
        if not isinstance(doc, list):
            raise ImageError(f"{self.path}: manifest.json is not a list")
        return doc

    # ---- OCI layout -----------------------------------------------------------------

    def _oci(self) -> list[ArchiveImage]:
        tags: dict[str, list[str]] = {}
        if self.exists("manifest.json"):  # docker save >= 25: RepoTags by config digest
            for e in self._manifest_json():
                m = re.match(r"^blobs/sha256/([0-9a-f]{64})$", e.get("Config") or "")
                if m:
                    tags["sha256:" + m.group(1)] = _names(e.get("RepoTags") or [])
        found: dict[str, ArchiveImage] = {}
        for desc in self.json("index.json").get("manifests") or []:
            self._walk(desc, _desc_names(desc), tags, found, 0)
        return list(found.values())

    def _blob(self, digest: str) -> str:
        return "blobs/sha256/" + hex_of(digest)

    def _walk(self, desc: dict, names: list[str], tags: dict, found: dict, depth: int) -> None:
        digest = desc.get("digest") or ""
        raw = self.read(self._blob(digest), digest)
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ImageError(f"{self.path}: blob {digest} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ImageError(f"{self.path}: blob {digest} is not a manifest or an index")
        if "manifests" in doc:  # an image index: this platform's manifest
            if depth > 4:
                raise ImageError(f"{self.path}: image indexes nested too deeply")
            for child in _pick_platform(doc["manifests"], self.path):
                self._walk(child, names + _desc_names(child), tags, found, depth + 1)
            return
        cfg = doc.get("config") or {}
        config = self.read(self._blob(cfg.get("digest") or ""), cfg.get("digest"))
        diff_ids = _diff_ids(config, digest)
        blobs = doc.get("layers") or []
        if len(blobs) != len(diff_ids):
            raise ImageError(f"{self.path}: manifest {digest}: {len(blobs)} layers but {len(diff_ids)} diff ids")
        layers = [LayerRef(self._blob(b.get("digest") or ""), d, b["digest"], b.get("mediaType"), b.get("size"))
                  for b, d in zip(blobs, diff_ids)]
        names = tags.get(cfg["digest"]) or names
        img = found.setdefault(digest, ArchiveImage(config, layers, [], raw))
        img.names += [n for n in names if n not in img.names]


def _diff_ids(config: bytes, where: str) -> list[str]:
    try:
        ids = json.loads(config)["rootfs"]["diff_ids"]
        for d in ids:
            hex_of(d)
        return list(ids)
    except (ValueError, KeyError, TypeError, ImageError):
        raise ImageError(f"image config {where}: no valid rootfs.diff_ids") from None


def _names(refs: list[str]) -> list[str]:
    """``name:tag`` in Docker's short form; anything else is dropped."""
    from .docker import familiar_name

    out = []
    for ref in refs:
        try:
            r = parse_reference(ref)
        except ImageError:
            continue
        if r.name and r.tag and r.digest is None:
            out.append(f"{familiar_name(r.name)}:{r.tag}")
    return out


def _desc_names(desc: dict) -> list[str]:
    ann = desc.get("annotations") or {}
    full = ann.get("io.containerd.image.name")
    ref = ann.get("org.opencontainers.image.ref.name") or ""
    if not full and (":" in ref or "/" in ref):
        full = ref
    return _names([full]) if full else []


def _pick_platform(manifests: list[dict], where: str) -> list[dict]:
    arch = _ARCH.get(platform.machine(), platform.machine())
    images = [m for m in manifests
              if (m.get("annotations") or {}).get("vnd.docker.reference.type") != "attestation-manifest"]
    if len(images) == 1:
        return images
    hits = [m for m in images if (m.get("platform") or {}).get("os") == "linux"
            and (m.get("platform") or {}).get("architecture") == arch]
    if not hits:
        raise ImageError(f"{where}: no image for linux/{arch} in an image index")
    return hits[:1]
