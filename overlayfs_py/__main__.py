"""``python -m overlayfs_py``: the filesystem's commands alone (mount, umount, trace, diff,
explain on paths). The ``pyoverlay`` command, with the runner's and the image store's
commands, is ``python -m pyoverlay_cli``."""

from .cli import main

main()
