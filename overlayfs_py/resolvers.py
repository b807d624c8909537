"""What the filesystem's commands may ask of the layers above them: containers and images.

``pyoverlay diff``, ``explain`` and ``trace`` accept a container (name or id) where they
accept a mount, and ``pyoverlay mount --image REF`` takes its lower layers from an image.
Containers and images are the runner's; this package never imports it. The top-level
command (:mod:`pyoverlay_cli`) composes the commands and passes a :class:`Resolvers`
built by the runner (``runner.cli.resolvers``) as the click context's ``obj``; the
filesystem-only command (``python -m overlayfs_py``) has none: only paths are accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ContainerView:
    """What the filesystem's commands need to know of a container."""

    id: str
    name: str | None
    upper: str | None  # its upper layer (None before the monitor made it)
    lowers: tuple[str, ...]  # the image's layers, top first (the init layer is not one)
    init_layer: str | None  # the init layer, the top lower of the mount
    merged: str | None  # its root's mountpoint
    running: bool


def _no_container(ref: str) -> ContainerView | None:
    return None


def _no_containers() -> Sequence[ContainerView]:
    return ()


@dataclass(frozen=True)
class Resolvers:
    """``find_container(ref)``: the container a name, id or unique id prefix names, else
    None. ``all_containers()``: every container. ``find_image(ref, docker_root)``: the
    lower layers (top first) of an image, or a PyoverlayError; None: images are not known
    to this command."""

    find_container: Callable[[str], ContainerView | None] = _no_container
    all_containers: Callable[[], Sequence[ContainerView]] = _no_containers
    find_image: Callable[[str, str | None], list[str]] | None = field(default=None)


def current() -> Resolvers:
    """The resolvers of the running command (none outside the composed CLI)."""
    import click

    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(Resolvers) if ctx is not None else None
    return obj if obj is not None else Resolvers()
