"""Merged directory listings, kept across ``opendir`` calls until the namespace changes.

Listing a merged directory costs a ``getdents`` per layer plus whiteout checks, and
each entry of a READDIRPLUS reply an ``lstat``. The lower layers never change while
mounted and the upper one only through this server, so a listing stays right until
the server itself creates, removes, renames or copies up something; then every
listing is dropped (simple and safe: changes are rare next to reads). The ``lstat``
results of lower non-directories are kept too -- they cannot change.

Bounded: at most ``max_entries`` names in all, least recently used dirs go first.
"""

from __future__ import annotations

import collections
import os


class Listing:
    __slots__ = ("names", "real", "lower_st")

    def __init__(self, names: list, real: bool) -> None:
        self.names = names  # [(name, layer listing it)], "." and ".." first
        self.real = real  # served raw by a single layer (whiteouts listed)
        self.lower_st: dict[bytes, os.stat_result] = {}  # lower non-dirs seen by readdir


class ListingCache:
    def __init__(self, max_entries: int = 20000) -> None:
        self.max_entries = max_entries
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
