"""Open file and directory handles: ``fh -> OpenFile | DirHandle``.

The table only stores; ``Overlay`` decides what an fd points at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .inodes import Node


@dataclass(eq=False)
class OpenFile:
    fd: int
    node: Node
    flags: int
    # (who opened it, size) while a copy-up made for this open has not been used:
    # cleared by a write or truncate; still set at release -> a copy_up_unused event
    unused_copy_up: tuple | None = None


@dataclass(eq=False)
class DirHandle:
    node: Node
    # The merged listing, built on the first readdir at offset 0 and kept while the handle
    # is open, so entries changed meanwhile are not seen (the kernel's readdir cache does the same).
    names: list | None = None  # [(name, layer listing it)]
    real: bool = False  # served by a single layer: listed raw, whiteouts included
    lower_st: dict | None = None  # the shared listing's lstat results of lower non-dirs


class HandleTable:
    def __init__(self) -> None:
        self._next = 1
        self._handles: dict[int, OpenFile | DirHandle] = {}
        self._open_by_node: dict[int, set[int]] = {}

    def add(self, h: OpenFile | DirHandle) -> int:
        fh = self._next
        self._next += 1
        self._handles[fh] = h
        if isinstance(h, OpenFile):
            self._open_by_node.setdefault(h.node.id, set()).add(fh)
        return fh

    def __getitem__(self, fh: int) -> OpenFile | DirHandle:
        return self._handles[fh]

    def pop(self, fh: int) -> OpenFile | DirHandle | None:
        h = self._handles.pop(fh, None)
        if isinstance(h, OpenFile):
            fhs = self._open_by_node.get(h.node.id)
            if fhs is not None:
                fhs.discard(fh)
                if not fhs:
                    del self._open_by_node[h.node.id]
        return h

    def files_of(self, node: Node) -> list[OpenFile]:
        return [self._handles[fh] for fh in self._open_by_node.get(node.id, ())]  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._handles)

    def close_all(self) -> None:
        for fh in list(self._handles):
            h = self.pop(fh)
            if isinstance(h, OpenFile):
                try:
                    os.close(h.fd)
                except OSError:
                    pass
