"""The filesystem core on tmp dirs, wired exactly as a mount wires it
(``mount.build_overlay``), with no FUSE and no kernel: for in-process tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from overlayfs_py.config import MountConfig
from overlayfs_py.core import Core
from overlayfs_py.mount import build_overlay
from overlayfs_py.workdir import WorkDir


def build_core(
    lowers: list[Path],
    upper: Path | None = None,
    workdir: Path | None = None,
    *,
    userxattr: bool | None = None,
    read_only: bool = False,
    drop_entries: Callable[[list[tuple[int, bytes]]], None] | None = None,
    attr_changed: Callable[[int], None] | None = None,
    listing_changed: Callable[[int], None] | None = None,
    **options: object,
) -> Core:
    """The core of an overlay of *lowers* (top first) and *upper*; a writable one prepares
    *workdir* as a mount does. *userxattr* None: ``user.overlay.*`` unless root (as the
    planning step decides). *drop_entries*, *attr_changed*, *listing_changed*: the engine's
    callbacks (a test records them). Call ``destroy()`` on the result."""
    hooks: dict[str, Callable] = {}
    if drop_entries is not None:
        hooks["drop_entries"] = drop_entries
    if attr_changed is not None:
        hooks["attr_changed"] = attr_changed
    if listing_changed is not None:
        hooks["listing_changed"] = listing_changed
    if userxattr is None:
        userxattr = os.geteuid() != 0
    cfg = MountConfig(
        lowerdirs=tuple(str(p) for p in lowers),
        upperdir=str(upper) if upper is not None else None,
        workdir=str(workdir) if workdir is not None else None,
        mountpoint="/nonexistent-in-process",
        userxattr=userxattr,
        read_only=read_only,
        **options,  # type: ignore[arg-type]
    )
    wd = WorkDir.prepare(cfg.workdir, volatile=cfg.volatile) if cfg.workdir and not cfg.read_only else None
    try:
        return build_overlay(cfg, wd, **hooks)
    finally:
        if wd is not None:
            wd.close()  # the core holds its own work/ fd, as after a mount
