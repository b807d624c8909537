"""Merged directory listings, kept across ``opendir`` calls until the namespace changes.

Listing a merged directory costs a ``getdents`` per layer plus whiteout checks, and
each entry of a READDIRPLUS reply an ``lstat``. The lower layers never change while
mounted and the upper one only through this server, so a listing stays right until
the server itself creates, removes, renames or copies up something; then every
listing is dropped (simple and safe: changes are rare next to reads). The ``lstat``
results of lower non-directories are kept too -- they cannot change.

Bounded: at most ``max_entries`` names in all, least recently used dirs go first.

The kernel keeps listings too when the engine lets it (the direct engine opens
directories with FOPEN_CACHE_DIR): it drops a directory's cached listing itself after
the creates, removals, renames and links it sends into that directory, but it cannot
see a listing change that the server makes as a side effect. Those go to *kernel_stale*
(the engine's: ``notify_inval_inode`` on the directory with its pages): a copy-up that
changes an entry (the parent's entry of a directory, or of a lower file with a second
hard link, which then reports another d_ino; a copied-up directory's own ``..`` and
whiteout filtering) and a directory moved to another parent (its ``..``). A file copied
up keeps its name, type and d_ino: its parent's listing stays right.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .inodes import Node


def _nothing(node_id: int) -> None:
    return None


class Listing:
    __slots__ = ("names", "real", "lower_st")

    def __init__(self, names: list, real: bool) -> None:
        self.names = names  # [(name, layer listing it)], "." and ".." first
        self.real = real  # served raw by a single layer (whiteouts listed)
        self.lower_st: dict[bytes, os.stat_result] = {}  # lower non-dirs seen by readdir


class ListingCache:
    def __init__(self, max_entries: int = 20000, kernel_stale: Callable[[int], None] = _nothing) -> None:
        """*kernel_stale(node id)*: the kernel's cached listing of that directory (if it
        keeps one) is no longer right."""
        self.max_entries = max_entries
        self.kernel_stale = kernel_stale
        self._lists: collections.OrderedDict[int, Listing] = collections.OrderedDict()
        self._total = 0

    def get(self, node_id: int) -> Listing | None:
        listing = self._lists.get(node_id)
        if listing is not None:
            self._lists.move_to_end(node_id)
        return listing

    def put(self, node_id: int, listing: Listing) -> None:
        old = self._lists.pop(node_id, None)
        if old is not None:
            self._total -= len(old.names)
        if len(listing.names) > self.max_entries:
            return
        self._lists[node_id] = listing
        self._total += len(listing.names)
        while self._total > self.max_entries:
            _, dropped = self._lists.popitem(last=False)
            self._total -= len(dropped.names)

    def changed(self) -> None:
        """Something was created, removed, renamed or copied up: forget every listing."""
        if self._lists:
            self._lists.clear()
            self._total = 0

    def copied_up(self, node: Node, ino_changed: bool = True) -> None:
        """*node* became upper: every listing here goes, and the kernel's listing of its
        parent when the entry changed there (a directory, or *ino_changed*: its d_ino, a
        broken lower hard link; a file copied up keeps its name, type and d_ino) and, for
        a directory, its own (``..``, whiteouts)."""
        self.changed()
        if node.parent is not None and (ino_changed or node.is_dir):
            self.kernel_stale(node.parent.id)
        if node.is_dir:
            self.kernel_stale(node.id)

    def moved(self, node: Node) -> None:
        """Directory *node* got another parent: its ``..`` entry changed (the kernel saw the
        rename in both parents, not in the directory itself)."""
        self.changed()
        if node.is_dir:
            self.kernel_stale(node.id)
