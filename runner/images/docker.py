"""Docker's overlay2 image store, read the way dockerd reads it. Read only.

    image/overlay2/repositories.json            {"Repositories": {repo: {"repo:tag": "sha256:<id>",
                                                                         "repo@sha256:<manifest>": ...}}}
    image/overlay2/imagedb/content/sha256/<id>  the image config; sha256(file bytes) == <id>
    image/overlay2/layerdb/sha256/<chain>/      diff ("sha256:<diff id>"), cache-id, size, parent
    overlay2/<cache-id>/diff                    the layer's files (kernel overlay format)

The chain id of the bottom layer is its diff id; above it
``chain[n] = "sha256:" + sha256(f"{chain[n-1]} {diff[n]}")``.

Every file is opened beneath the store root with ``openat2(RESOLVE_NO_SYMLINKS |
RESOLVE_BENEATH)``: a symlink anywhere inside the store (there is none in a store
dockerd wrote, ``overlay2/l/`` aside, which is never used here) is refused, never
followed. Nothing is written and nothing is cached between calls, so any number of
readers (and a running dockerd, which replaces files by rename) can share a store.
"""

from __future__ import annotations

import builtins  # DockerStore.list shadows list in the class body
import errno
import hashlib
import json
import os
import re
import stat

from overlayfs_py import _sys

from .core import Image, ImageError, NotFound, docker_root, parse_reference

IMAGE_DIR = "image/overlay2"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CACHE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_RESOLVE = _sys.RESOLVE_NO_SYMLINKS | _sys.RESOLVE_BENEATH | _sys.RESOLVE_NO_MAGICLINKS
_MAX_FILE = 64 << 20


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Docker's chain ids of a layer stack given bottom first (``rootfs.diff_ids``)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def familiar_name(name: str) -> str:
    """The short form Docker keys repositories.json with: ``docker.io/library/busybox``
    and ``library/busybox`` are ``busybox``; ``docker.io/x/y`` is ``x/y``."""
    for prefix in ("docker.io/", "index.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name.startswith("library/") and name.count("/") == 1:
        name = name[len("library/") :]
    return name


class _Tree:
    """Files beneath one directory, reached without following any symlink."""

    def __init__(self, root: str):
        self.root = root
        try:
            self.fd = os.open(root, _sys.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"cannot open the Docker store {root}: {e.strerror}") from None

    def __enter__(self) -> _Tree:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _open(self, rel: str, flags: int) -> int | None:
        """An fd, or None if *rel* does not exist; ImageError for a symlink or worse."""
        try:
            return _sys.openat2(self.fd, os.fsencode(rel), flags | os.O_CLOEXEC | os.O_NOFOLLOW, resolve=_RESOLVE)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            if e.errno == errno.ELOOP:
                raise ImageError(f"damaged Docker store: {self.path(rel)}: a symlink on the way (refused)") from None
            raise ImageError(f"cannot read {self.path(rel)}: {e.strerror}") from None

    def read(self, rel: str) -> bytes | None:
        """The bytes of the regular file *rel* (None if missing)."""
        fd = self._open(rel, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang us
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_FILE:
                raise ImageError(
                    f"damaged Docker store: {self.path(rel)} is not a regular file of at most {_MAX_FILE} bytes"
                )
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def need(self, rel: str) -> bytes:
        data = self.read(rel)
        if data is None:
            raise ImageError(f"damaged Docker store: {self.path(rel)} is missing")
        return data

    def is_dir(self, rel: str) -> bool:
        fd = self._open(rel, _sys.O_PATH | os.O_DIRECTORY)
        if fd is None:
            return False
        os.close(fd)
        return True

    def listdir(self, rel: str) -> list[str]:
        fd = self._open(rel, os.O_RDONLY | os.O_DIRECTORY)
        if fd is None:
            return []
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)


class DockerStore:
    """The images of one Docker data root (``--data-root``, default /var/lib/docker)."""

    source = "docker"

    def __init__(self, root: str | None = None):
        self.root = os.path.realpath(docker_root(root))
        self.problems: list[str] = []  # damaged images skipped by the last list()

    def __repr__(self) -> str:
        return f"DockerStore({self.root!r})"

    # --- public ---------------------------------------------------------------------------

    def list(self) -> list[Image]:
        """Every tagged image, and untagged ones no other image is built on (what
        ``docker images`` shows). A damaged image is skipped and noted in ``problems``."""
        self.problems = []
        out = []
        with _Tree(self.root) as t:
            repos = self._repositories(t)
            ids = self._image_ids(t)
            parents = {self._parent(t, i) for i in ids}
            for hexid in ids:
                names = _names_of(repos, hexid)
                if not names and hexid in parents:
                    continue
                try:
                    out.append(self._load(t, hexid, names))
                except ImageError as e:
                    self.problems.append(str(e))
            for hexid in sorted(set(repos.values()) - set(ids)):
                self.problems.append(
                    f"damaged Docker store: {', '.join(_names_of(repos, hexid))} "
                    f"-> {t.path(_config_rel(hexid))} is missing"
                )
        return sorted(out, key=lambda i: (not i.names, i.names, i.id))

    def resolve(self, ref: str) -> Image:
        """The image *ref* names, resolved as dockerd does: the name (familiar form, tag
        ``latest`` by default, or ``@sha256:`` digest) in repositories.json first, then
        the full image id or a unique prefix of it."""
        r = parse_reference(ref)
        with _Tree(self.root) as t:
            repos = self._repositories(t)
            if r.name is not None:
                name = familiar_name(r.name)
                key = f"{name}@{r.digest}" if r.digest else f"{name}:{r.tag}"
                if key in repos:
                    return self._load(t, repos[key], _names_of(repos, repos[key]))
            if r.id_prefix is not None:
                found = [i for i in self._image_ids(t) if i.startswith(r.id_prefix)]
                if len(found) > 1:
                    shown = ", ".join(i[:12] for i in found[:5]) + (", ..." if len(found) > 5 else "")
                    raise ImageError(
                        f"ambiguous image id prefix {r.id_prefix!r}: {len(found)} images in {self.root} ({shown})"
                    )
                if found:
                    return self._load(t, found[0], _names_of(repos, found[0]))
        raise NotFound(f"no such image: {r} in the Docker store {self.root}")

    # --- reading --------------------------------------------------------------------------

    def _repositories(self, t: _Tree) -> dict[str, str]:
        """``"name:tag"`` / ``"name@sha256:..."`` -> image id hex, from repositories.json."""
        rel = f"{IMAGE_DIR}/repositories.json"
        data = t.read(rel)
        if data is None:
            return {}
        try:
            repos = json.loads(data).get("Repositories") or {}
            flat = {k: v for refs in repos.values() for k, v in refs.items()}
        except (ValueError, AttributeError, TypeError) as e:
            raise ImageError(f"damaged Docker store: {t.path(rel)}: not Docker's JSON ({e})") from None
        for k, v in flat.items():
            if not isinstance(v, str) or not _DIGEST.match(v):
                raise ImageError(f"damaged Docker store: {t.path(rel)}: {k!r} maps to {v!r}, not an image id")
        return {k: v.removeprefix("sha256:") for k, v in flat.items()}

    def _image_ids(self, t: _Tree) -> builtins.list[str]:
        return [n for n in t.listdir(f"{IMAGE_DIR}/imagedb/content/sha256") if _HEX64.match(n)]

    def _parent(self, t: _Tree, hexid: str) -> str | None:
        try:
            data = t.read(f"{IMAGE_DIR}/imagedb/metadata/sha256/{hexid}/parent")
        except ImageError:
            return None
        return data.decode(errors="replace").strip().removeprefix("sha256:") if data else None

    def _load(self, t: _Tree, hexid: str, names: builtins.list[str]) -> Image:
        """The image with config ``imagedb/content/sha256/<hexid>``, its layers checked."""
        rel = _config_rel(hexid)
        data = t.need(rel)
        got = hashlib.sha256(data).hexdigest()
        if got != hexid:
            raise ImageError(f"damaged Docker store: {t.path(rel)}: its sha256 is {got[:12]}..., not its name")
        try:
            config = json.loads(data)
            rootfs = config["rootfs"]
            diff_ids = list(rootfs["diff_ids"] or [])
        except (ValueError, KeyError, TypeError) as e:
            raise ImageError(f"damaged Docker store: {t.path(rel)}: not an image config ({e})") from None
        if rootfs.get("type") != "layers" or not all(isinstance(d, str) and _DIGEST.match(d) for d in diff_ids):
            raise ImageError(f"damaged Docker store: {t.path(rel)}: bad rootfs.diff_ids")
        layers, size = [], 0
        for chain, diff in zip(chain_ids(diff_ids), diff_ids, strict=True):
            diff_dir, layer_size = self._layer(t, chain, diff)
            layers.append(os.path.join(self.root, diff_dir))
            size += layer_size
        return Image(
            id=f"sha256:{hexid}",
            names=names,
            layers=layers[::-1],
            config=config,
            source="docker",
            size=size,
            diff_ids=diff_ids,
        )

    def _layer(self, t: _Tree, chain: str, diff: str) -> tuple[str, int]:
        """``overlay2/<cache-id>/diff`` (relative to the root) and the size of one layer."""
        ldir = f"{IMAGE_DIR}/layerdb/sha256/{chain.removeprefix('sha256:')}"
        stored = t.need(f"{ldir}/diff").decode(errors="replace").strip()
        if stored != diff:
            raise ImageError(
                f"damaged Docker store: {t.path(ldir + '/diff')} says {stored[:19]}..., the image config {diff[:19]}..."
            )
        cache_id = t.need(f"{ldir}/cache-id").decode(errors="replace").strip()
        if not _CACHE_ID.match(cache_id):
            raise ImageError(f"damaged Docker store: {t.path(ldir + '/cache-id')}: bad cache id {cache_id[:80]!r}")
        diff_dir = f"overlay2/{cache_id}/diff"
        if not t.is_dir(diff_dir):
            raise ImageError(
                f"damaged Docker store: {t.path(diff_dir)} (layer {chain[:19]}...) is missing or not a directory"
            )
        try:
            size = int((t.read(f"{ldir}/size") or b"0").strip() or 0)
        except ValueError:
            size = 0
        return diff_dir, size


def _config_rel(hexid: str) -> str:
    return f"{IMAGE_DIR}/imagedb/content/sha256/{hexid}"


def _names_of(repos: dict[str, str], hexid: str) -> list[str]:
    """The tags of an image; a ``name@digest`` only for a repository it has no tag in."""
    tags = [k for k, v in repos.items() if v == hexid and "@" not in k]
    tagged = {k.rsplit(":", 1)[0] for k in tags}
    return tags + [k for k, v in repos.items() if v == hexid and "@" in k and k.split("@", 1)[0] not in tagged]
