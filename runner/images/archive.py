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

A compressed archive (``.tar.gz``, ``.tar.zst``) is read from the decompressor, front to
back, never copied: a first pass lists the members and keeps the small ones (the JSON
documents) in memory, a second pass hands the layer blobs to the unpacker in the order
they are stored (:meth:`Archive.layers`). Only an input that cannot be read twice (a pipe)
is first decompressed into the store's ``tmp/``.

Every JSON document is checked for its shape (an object, a list of objects, strings where
strings belong) before use: anything else is a one-line :class:`ImageError`.

Names are stored in Docker's short form (``docker.io/library/busybox:1`` -> ``busybox:1``).
Paths taken from the archive's JSON never leave the archive: in a directory they are
opened with ``openat2(RESOLVE_BENEATH)``, in a tar they are looked up lexically.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import posixpath
import re
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass, field

from overlayfs_py import _sys

from .core import ImageError, parse_reference
from .streams import decompress, hex_of, sha256_digest

_MAX_JSON = 64 << 20
_SMALL = 1 << 20  # members up to this size are kept from the listing pass...
_SMALL_TOTAL = 256 << 20  # ...up to this much in all (then they are read again when asked for)
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


@dataclass
class LayerRef:
    path: str  # inside the archive
    diff_id: str  # from the config
    digest: str | None = None  # blob digest (None: legacy, the tar as is)
    media_type: str | None = None
    size: int | None = None


@dataclass
class ArchiveImage:
    config: bytes
    layers: list[LayerRef]  # bottom first
    names: list[str] = field(default_factory=list)
    manifest: bytes | None = None  # the OCI manifest as found (None: legacy)

    @property
    def id(self) -> str:
        return sha256_digest(self.config)


class _DirSource:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, _sys.DIR_FLAGS)

    def open(self, rel: str):
        fd = _sys.openat2(
            self.fd,
            os.fsencode(rel),
            os.O_RDONLY | os.O_CLOEXEC,
            resolve=_sys.RESOLVE_BENEATH | _sys.RESOLVE_NO_MAGICLINKS,
        )
        f = os.fdopen(fd, "rb")
        return f, os.fstat(fd).st_size

    def layers(self, rels: list[str]):
        for rel in rels:
            f, size = self.open(rel)
            with f:
                yield rel, f, size

    def close(self) -> None:
        os.close(self.fd)


class _TarSource:
    def __init__(self, path: str) -> None:
        try:
            # held open for the source's lifetime; close() closes it
            self.tf = tarfile.open(path, "r:", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
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

    def layers(self, rels: list[str]):
        """``(rel, file, size)`` for each of *rels* (random access: in the order given)."""
        for rel in rels:
            f, size = self.open(rel)
            with f:
                yield rel, f, size

    def close(self) -> None:
        self.tf.close()


class _StreamTarSource(_TarSource):
    """A compressed tar, read sequentially from its decompressor: a listing pass that keeps
    the small members (JSON) in memory, then one pass per :meth:`layers` call that hands
    out the wanted members in archive order. A member asked for by :meth:`open` that was
    not kept (a large JSON document) costs one more pass, up to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.members: dict[str, tarfile.TarInfo] = {}
        self.kept: dict[str, bytes] = {}
        total = 0
        try:
            with self._stream() as tf:
                for m in tf:
                    name = _norm(m.name)
                    self.members[name] = m
                    if m.isreg() and m.size <= _SMALL and total + m.size <= _SMALL_TOTAL:
                        self.kept[name] = tf.extractfile(m).read()
                        total += m.size
        except Exception as e:  # noqa: BLE001 - a damaged stream, whatever the decompressor
            if not _read_error(e):
                raise
            raise ImageError(f"{path}: not an image archive (tar) or directory: {e}") from None
        if not self.members:
            raise ImageError(f"{path}: not an image archive (tar) or directory: empty")

    @contextlib.contextmanager
    def _stream(self):
        with open(self.path, "rb") as raw:
            _, reader = decompress(raw)
            with tarfile.open(fileobj=reader, mode="r|", encoding="utf-8", errors="surrogateescape") as tf:
                yield tf

    def open(self, rel: str):
        m = self._member(rel)
        if not m.isreg():
            raise ImageError(f"archive member {rel!r} is not a file")
        name = _norm(m.name)
        if name in self.kept:
            return io.BytesIO(self.kept[name]), m.size
        if m.size > _MAX_JSON:
            raise ImageError(f"{self.path}: {rel}: too large to be read out of order")
        try:
            with self._stream() as tf:
                for cur in tf:
                    if _norm(cur.name) == name and cur.isreg():
                        return io.BytesIO(tf.extractfile(cur).read()), m.size
        except Exception as e:  # noqa: BLE001
            if not _read_error(e):
                raise
            raise ImageError(f"{self.path}: cannot read the archive: {e}") from None
        raise FileNotFoundError(2, "not in the archive", rel)

    def layers(self, rels: list[str]):
        """``(rel, file, size)`` for each of *rels*, in the order the archive stores them;
        the files are read from the decompressor as they pass (one pass)."""
        by_member: dict[str, list[str]] = {}
        for rel in rels:
            m = self._member(rel)
            if not m.isreg():
                raise ImageError(f"archive member {rel!r} is not a file")
            by_member.setdefault(_norm(m.name), []).append(rel)
        left = dict(by_member)
        for name in [n for n in left if n in self.kept]:
            for rel in left.pop(name):
                yield rel, io.BytesIO(self.kept[name]), len(self.kept[name])
        if not left:
            return
        with self._stream() as tf:
            it = iter(tf)
            while left:
                try:
                    cur = next(it, None)
                except Exception as e:  # noqa: BLE001
                    if not _read_error(e):
                        raise
                    raise ImageError(f"{self.path}: cannot read the archive: {e}") from None
                if cur is None:
                    break
                name = _norm(cur.name)
                if name in left and cur.isreg():
                    for rel in left.pop(name):
                        yield rel, tf.extractfile(cur), cur.size
        if left:
            raise ImageError(f"{self.path}: {next(iter(left))}: changed while it was read")

    def close(self) -> None:
        self.kept.clear()


def _read_error(e: BaseException) -> bool:
    """An error of a damaged or truncated (compressed) tar stream."""
    return isinstance(e, (tarfile.TarError, OSError, EOFError, zlib.error)) or type(e).__name__ == "ZstdError"


def _norm(name: str) -> str:
    n = posixpath.normpath("/" + name).lstrip("/")
    return n


@contextlib.contextmanager
def open_archive(path: str, tmpdir: str):
    """An :class:`Archive` for *path* (a directory or a tar file). A compressed tar is read
    from its decompressor (:class:`_StreamTarSource`); only one that cannot be read twice
    (a pipe, a device) is first decompressed into *tmpdir*."""
    tmp = None
    src: _DirSource | _TarSource
    if os.path.isdir(path):
        src = _DirSource(path)
    else:
        try:
            with open(path, "rb") as f:
                regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
                kind, reader = decompress(f)
                if kind and not regular:
                    tmp = os.path.join(tmpdir, "archive.tar")
                    with open(tmp, "wb") as out:
                        shutil.copyfileobj(reader, out, 1 << 20)
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e}") from None
        src = _StreamTarSource(path) if kind and regular else _TarSource(tmp or path)
    try:
        yield Archive(src, path)
    finally:
        src.close()
        if tmp:
            os.unlink(tmp)


class Archive:
    def __init__(self, src: _DirSource | _TarSource, path: str) -> None:
        self.src = src
        self.path = path

    def open(self, rel: str):
        """``(file, size)`` of a member; ImageError if it is missing."""
        try:
            return self.src.open(rel)
        except OSError as e:
            raise ImageError(f"{self.path}: {rel}: {e.strerror or e}") from None

    def layers(self, rels: list[str]):
        """``(rel, file, size)`` for each of *rels*: read each file before taking the next
        (a compressed archive hands them out in its own order, from one pass)."""
        try:
            yield from self.src.layers(rels)
        except OSError as e:
            raise ImageError(f"{self.path}: {e.filename or ''}: {e.strerror or e}") from None

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
        raise ImageError(
            f"{self.path}: neither a docker save archive (manifest.json) nor an OCI image layout (index.json)"
        )

    # ---- docker save, legacy --------------------------------------------------------

    def _legacy(self) -> list[ArchiveImage]:
        out = []
        for e in self._manifest_json():
            cfg_path = e.get("Config") or ""
            if not cfg_path:
                raise ImageError(f'{self.path}: manifest.json: an entry without a "Config"')
            m = re.search(r"([0-9a-f]{64})(\.json)?$", cfg_path)
            config = self.read(cfg_path, "sha256:" + m.group(1) if m else None)
            diff_ids = _diff_ids(config, cfg_path)
            paths = e.get("Layers") or []
            if len(paths) != len(diff_ids):
                raise ImageError(f"{self.path}: {cfg_path}: {len(paths)} layers but {len(diff_ids)} diff ids")
            out.append(
                ArchiveImage(
                    config,
                    [LayerRef(p, d) for p, d in zip(paths, diff_ids, strict=True)],
                    _names(e.get("RepoTags") or []),
                )
            )
        return out

    def _manifest_json(self) -> list[dict]:
        """manifest.json: a list of objects with string ``Config``, lists of strings
        ``RepoTags`` and ``Layers`` (each may be absent or null)."""
        doc = self.json("manifest.json")
        where = f"{self.path}: manifest.json"
        if not isinstance(doc, list):
            raise ImageError(f"{where} is not a list")
        for i, e in enumerate(doc):
            _obj(e, f"{where}: entry {i}")
            _opt_str(e.get("Config"), f"{where}: entry {i}: Config")
            _str_list(e.get("RepoTags"), f"{where}: entry {i}: RepoTags")
            _str_list(e.get("Layers"), f"{where}: entry {i}: Layers")
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
        index = _obj(self.json("index.json"), f"{self.path}: index.json")
        for desc in _obj_list(index.get("manifests"), f"{self.path}: index.json: manifests"):
            self._walk(desc, _desc_names(desc), tags, found, 0)
        return list(found.values())

    def _blob(self, digest: str) -> str:
        return "blobs/sha256/" + hex_of(digest)

    def _walk(self, desc: dict, names: list[str], tags: dict, found: dict, depth: int) -> None:
        digest = desc.get("digest") or ""
        if not isinstance(digest, str):
            raise ImageError(f"{self.path}: a descriptor's digest is not a string: {digest!r}"[:200])
        if desc.get("annotations") is not None:
            _obj(desc["annotations"], f"{self.path}: the annotations of descriptor {digest}")
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
            children = _obj_list(doc["manifests"], f"{self.path}: image index {digest}: manifests")
            for child in _pick_platform(children, self.path):
                self._walk(child, names + _desc_names(child), tags, found, depth + 1)
            return
        where = f"{self.path}: manifest {digest}"
        cfg = _obj(doc.get("config") or {}, f"{where}: config")
        cfg_digest = cfg.get("digest") or ""
        if not isinstance(cfg_digest, str):
            raise ImageError(f"{where}: config: the digest is not a string")
        config = self.read(self._blob(cfg_digest), cfg_digest)
        diff_ids = _diff_ids(config, digest)
        blobs = _obj_list(doc.get("layers"), f"{where}: layers")
        for i, b in enumerate(blobs):
            hex_of(b.get("digest"))
            _opt_str(b.get("mediaType"), f"{where}: layer {i}: mediaType")
            size = b.get("size")
            if size is not None and (type(size) is not int or size < 0):
                raise ImageError(f"{where}: layer {i}: size is not a byte count")
        if len(blobs) != len(diff_ids):
            raise ImageError(f"{self.path}: manifest {digest}: {len(blobs)} layers but {len(diff_ids)} diff ids")
        layers = [
            LayerRef(self._blob(b.get("digest") or ""), d, b["digest"], b.get("mediaType"), b.get("size"))
            for b, d in zip(blobs, diff_ids, strict=True)
        ]
        names = tags.get(cfg["digest"]) or names
        img = found.setdefault(digest, ArchiveImage(config, layers, [], raw))
        img.names += [n for n in names if n not in img.names]


def _obj(doc, where: str) -> dict:
    if not isinstance(doc, dict):
        raise ImageError(f"{where} is not a JSON object (got {type(doc).__name__})")
    return doc


def _obj_list(v, where: str) -> list[dict]:
    """A list of objects (absent or null: empty)."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise ImageError(f"{where} is not a list (got {type(v).__name__})")
    for i, e in enumerate(v):
        _obj(e, f"{where}[{i}]")
    return v


def _str_list(v, where: str) -> None:
    if v is None:
        return
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ImageError(f"{where} is not a list of strings")


def _opt_str(v, where: str) -> None:
    if v is not None and not isinstance(v, str):
        raise ImageError(f"{where} is not a string (got {type(v).__name__})")


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
        if not isinstance(ref, str):
            continue
        try:
            r = parse_reference(ref)
        except ImageError:
            continue
        if r.name and r.tag and r.digest is None:
            out.append(f"{familiar_name(r.name)}:{r.tag}")
    return out


def _desc_names(desc: dict) -> list[str]:
    ann = desc.get("annotations")
    ann = ann if isinstance(ann, dict) else {}
    full = ann.get("io.containerd.image.name")
    full = full if isinstance(full, str) else None
    ref = ann.get("org.opencontainers.image.ref.name")
    ref = ref if isinstance(ref, str) else ""
    if not full and (":" in ref or "/" in ref):
        full = ref
    return _names([full]) if full else []


def _pick_platform(manifests: list[dict], where: str) -> list[dict]:
    arch = _ARCH.get(platform.machine(), platform.machine())

    def field(m: dict, key: str) -> dict:
        v = m.get(key)
        return v if isinstance(v, dict) else {}

    images = [
        m for m in manifests if field(m, "annotations").get("vnd.docker.reference.type") != "attestation-manifest"
    ]
    if len(images) == 1:
        return images
    hits = [
        m
        for m in images
        if field(m, "platform").get("os") == "linux" and field(m, "platform").get("architecture") == arch
    ]
    if not hits:
        raise ImageError(f"{where}: no image for linux/{arch} in an image index")
    return hits[:1]
