"""The image model the sources share: :class:`Image`, references, the errors and where
the stores are. The sources (local.py, docker.py) and the archive code import it from
here; ``runner.images`` re-exports it beside :func:`~runner.images.sources` and
:func:`~runner.images.resolve`, which know the sources (so no module of this package
imports the package itself: no import circle).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Protocol

from overlayfs_py.errors import PyoverlayError


class ImageError(PyoverlayError):
    """One line, for the user: not found, ambiguous, a damaged store, a refused archive."""


class NotFound(ImageError):
    """This source has no such image (the next source is asked)."""


class ImageSource(Protocol):
    """The one interface of the sources (the local store, a Docker store)."""

    root: str

    def list(self) -> list[Image]: ...

    def resolve(self, ref: str) -> Image: ...


@dataclass
class Image:
    id: str  # "sha256:<64 hex>": the digest of the image config
    names: list[str]  # ["busybox:latest", ...] (may be empty)
    layers: list[str]  # unpacked layer dirs, TOP FIRST (ready for lowerdir)
    config: dict  # the image config JSON (keys "config", "rootfs", "history", ...)
    source: str  # "local" | "docker"
    size: int = 0  # bytes of layer content, best effort
    diff_ids: list[str] = field(default_factory=list)  # bottom first, as in rootfs.diff_ids

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]

    def run_config(self) -> dict:
        """The parts of the image config ``run`` uses: Cmd, Entrypoint, Env, WorkingDir, User,
        ExposedPorts (``-P``)."""
        c = self.config.get("config") or self.config.get("container_config") or {}
        return {
            "Cmd": c.get("Cmd") or [],
            "Entrypoint": c.get("Entrypoint") or [],
            "Env": c.get("Env") or [],
            "WorkingDir": c.get("WorkingDir") or "",
            "User": c.get("User") or "",
            "ExposedPorts": c.get("ExposedPorts") or {},
        }


_HEX = re.compile(r"^(sha256:)?([0-9a-f]{4,64})$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    name: str | None = None  # "busybox", "library/busybox", "localhost:5000/x/y"
    tag: str | None = None  # "latest" when a name is given without tag or digest
    digest: str | None = None  # "sha256:<hex>" after '@'
    id_prefix: str | None = None  # hex (no "sha256:") when the reference may be an id

    def __str__(self) -> str:
        if self.name is None:
            return f"sha256:{self.id_prefix}"
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"


def parse_reference(ref: str) -> Reference:
    """Docker's spelling. A bare hex string of 4..64 digits may be an id (prefix) or a
    name; both are tried (``id_prefix`` and ``name`` set)."""
    if not ref or ref != ref.strip() or any(c.isspace() for c in ref):
        raise ImageError(f"invalid image reference {ref!r}")
    m = _HEX.match(ref)
    if m and (m.group(1) or len(m.group(2)) == 64):
        return Reference(id_prefix=m.group(2))
    name, digest = ref, None
    if "@" in ref:
        name, digest = ref.split("@", 1)
        if not _DIGEST.match(digest):
            raise ImageError(f"invalid digest in image reference {ref!r}")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not re.match(r"^[\w][\w.-]{0,127}$", tag):
            raise ImageError(f"invalid tag in image reference {ref!r}")
    if not re.match(r"^[a-z0-9]+([._/:-][a-z0-9]+)*$", name):
        raise ImageError(f"invalid image name in reference {ref!r} (lower case letters, digits, . _ - /)")
    if digest is None and tag is None:
        tag = "latest"
    return Reference(name=name, tag=tag, digest=digest, id_prefix=m.group(2) if m else None)


def local_root() -> str:
    d = os.environ.get("PYOVERLAY_IMAGES_DIR")
    if d:
        return d
    from ..state import data_root

    return os.path.join(data_root(), "images")


def docker_root(given: str | None = None) -> str:
    return given or os.environ.get("PYOVERLAY_DOCKER_ROOT") or "/var/lib/docker"
