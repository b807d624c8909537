"""The ``pyoverlay`` command: the filesystem's, the runner's and the image store's commands
in one group.

This is the only module that knows all three. The filesystem (:mod:`overlayfs_py`) never
imports the runner; here its commands (mount, umount, trace, diff, explain) receive the
runner's container and image look-ups (:func:`runner.cli.resolvers`) as the click
context's ``obj``, and the runner's (run, ps, exec, ...) and the image store's commands
(images, import, commit) are added beside them. ``python -m pyoverlay_cli`` is the same
command; ``python -m overlayfs_py`` is the filesystem's commands alone.

Nothing of the runner is imported until a command needs it: ``pyoverlay mount`` and
``umount`` start in a few tens of ms (docs/performance.md, Startup). The look-ups import
``runner.cli`` when first called, the runner's commands are registered when first asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from overlayfs_py.cli import new_group
from overlayfs_py.resolvers import ContainerView, Resolvers


def _find_container(ref: str) -> ContainerView | None:
    from runner.cli import resolvers

    return resolvers().find_container(ref)


def _all_containers() -> Sequence[ContainerView]:
    from runner.cli import resolvers

    return resolvers().all_containers()


def _find_image(ref: str, docker_root: str | None) -> list[str]:
    from runner.cli import resolvers

    find = resolvers().find_image
    assert find is not None
    return find(ref, docker_root)


def _register_runner(group: click.Group) -> None:
    from runner.cli import register

    register(group)


def _register_images(group: click.Group) -> None:
    from runner.images.cli import register

    register(group)


def _register_store(group: click.Group) -> None:
    from runner.images.store_cli import register

    register(group)


def _register_api(group: click.Group) -> None:
    from runner.api.cli import register

    register(group)


main = new_group(
    Resolvers(find_container=_find_container, all_containers=_all_containers, find_image=_find_image),
    more=(_register_runner, _register_images, _register_store, _register_api),
)

__all__ = ["main"]
