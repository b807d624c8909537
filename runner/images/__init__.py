"""Images: where a container's lower layers come from.

Two sources, one interface (:class:`Image`, ``list()``, ``resolve(ref)``):

* the local store (:mod:`runner.images.local`): images imported from ``docker save``
  archives and OCI layouts, and images made by ``pyoverlay commit``; an OCI image
  layout plus one unpacked directory per layer, under ``$PYOVERLAY_IMAGES_DIR``
  (default ``<data dir>/images``);
* a Docker image store (:mod:`runner.images.docker`), read exactly as Docker does:
  ``image/overlay2/repositories.json`` -> image id -> ``imagedb`` config
  (``rootfs.diff_ids``) -> chain ids -> ``layerdb/sha256/<chain>/cache-id`` ->
  ``overlay2/<cache-id>/diff``. ``--docker-root`` (default
  ``$PYOVERLAY_DOCKER_ROOT`` or ``/var/lib/docker``). Read only.

A reference is ``NAME``, ``NAME:TAG`` (``latest`` by default), ``NAME@sha256:...``, an
image id (``sha256:<hex>`` or ``<hex>``) or a unique prefix of one (at least 4 hex
digits). :func:`resolve` asks the local store first, then Docker's.
"""

from __future__ import annotations

import os

from .core import Image, ImageError, ImageSource, NotFound, Reference, docker_root, local_root, parse_reference

__all__ = [
    "Image",
    "ImageError",
    "ImageSource",
    "NotFound",
    "Reference",
    "docker_root",
    "local_root",
    "parse_reference",
    "resolve",
    "sources",
]


def sources(docker: str | None = None) -> list[ImageSource]:
    """The configured image sources, local first."""
    from .docker import DockerStore
    from .local import LocalStore

    out: list[ImageSource] = [LocalStore(local_root())]
    root = docker_root(docker)
    if os.path.isdir(os.path.join(root, "image", "overlay2")):
        out.append(DockerStore(root))
    return out


def resolve(ref: str, docker: str | None = None) -> Image:
    """The image *ref* names, from the first source that has it."""
    for src in sources(docker):
        try:
            return src.resolve(ref)
        except NotFound:
            continue
    where = " or ".join(f"{type(s).__name__}({s.root})" for s in sources(docker))
    raise ImageError(f"no such image: {ref} (looked in {where})")
