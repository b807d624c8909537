"""The ``pyoverlay`` command: the filesystem's, the runner's and the image store's commands
in one group.

This is the only module that knows all three. The filesystem (:mod:`overlayfs_py`) never
imports the runner; here its commands (mount, umount, trace, diff, explain) receive the
runner's container and image look-ups (:func:`runner.cli.resolvers`) as the click
context's ``obj``, and the runner's (run, ps, exec, ...) and the image store's commands
(images, import, commit) are added beside them. ``python -m pyoverlay_cli`` is the same
command; ``python -m overlayfs_py`` is the filesystem's commands alone.
"""

from __future__ import annotations

from overlayfs_py.cli import new_group
from runner.cli import register as register_runner
from runner.cli import resolvers
from runner.images.cli import register as register_images
from runner.images.store_cli import register as register_store

main = new_group(resolvers())
register_runner(main)
register_images(main)
register_store(main)

__all__ = ["main"]
