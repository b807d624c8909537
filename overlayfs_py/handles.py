"""Open file and directory handles: ``fh -> OpenFile | DirHandle``.

The table stores them and, after a copy-up, points the open files of the node at its
new upper object (``follow_copy_up``); ``Overlay`` decides what an fd points at when
opening (``open_real``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass

from . import _sys
from .inodes import Node
from .layers import Layer
from .trace import Request

# Open flags passed on to the real file (O_DIRECT, O_NOATIME, O_CREAT... are not).
OPEN_PASS = os.O_ACCMODE | os.O_APPEND | os.O_SYNC | os.O_DSYNC | os.O_TRUNC | os.O_NONBLOCK


def open_real(node: Node, flags: int) -> int:
    """Open the node's own object through its fd (never its name: a FIFO or device put
    there since is never opened). The kernel sends no OPEN for special files (it opens
    them itself), so a node opened here is a regular file; anything else is opened
    non-blocking, never waiting for a FIFO's other end."""
    if not stat.S_ISREG(node.mode):
        flags |= os.O_NONBLOCK
    data = node.lowerdata
    if data is not None:  # a metacopy file: its data is read from the file below
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.EIO, "a metacopy file opened for writing before its data copy-up")
        return _open_lowerdata(data, flags)
    # Like the kernel's ovl_open_realfile: real files are opened with O_NOATIME, so
    # reading through the overlay does not touch a lower file's atime.
    try:
        return _sys.reopen(node.fd, flags | os.O_NOATIME)
    except PermissionError:
        return _sys.reopen(node.fd, flags)


def _open_lowerdata(data: tuple[Layer, bytes], flags: int) -> int:
    """The data file of a metacopy file (layer, path), opened for reading beneath its layer
    (never following a symlink), with O_NOATIME where allowed (ovl_open_realfile)."""
    layer, path = data
    try:
        return _sys.open_beneath(layer.fd, path, flags | os.O_NOATIME)
    except PermissionError:
        return _sys.open_beneath(layer.fd, path, flags)


class OpenFile:
    """An open regular file: its real fd (*fd* -1: opened on first use, for an open the
    kernel serves through a passthrough backing file already bound to the node, where the
    server may never need one), the node and the open flags."""

    __slots__ = ("_fd", "node", "flags", "unused_copy_up")

    def __init__(
        self, fd: int, node: Node, flags: int, unused_copy_up: tuple[Request | None, int] | None = None
    ) -> None:
        self._fd = fd
        self.node = node
        self.flags = flags
        # (who opened it, size) while a copy-up made for this open has not been used:
        # cleared by a write or truncate; still set at release -> a copy_up_unused event
        self.unused_copy_up = unused_copy_up

    @property
    def fd(self) -> int:
        """The real fd, opened now if it was not yet (the node's object as it is now)."""
        if self._fd < 0:
            self._fd = open_real(self.node, self.flags & OPEN_PASS & ~os.O_TRUNC)
        return self._fd

    @property
    def opened(self) -> bool:
        return self._fd >= 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


@dataclass(eq=False)
class DirHandle:
    node: Node
    # The merged listing, built on the first readdir at offset 0 and kept while the handle
    # is open, so entries changed meanwhile are not seen (the kernel's readdir cache does the same).
    names: list[tuple[bytes, Layer]] | None = None  # [(name, layer listing it)]
    real: bool = False  # served by a single layer: listed raw, whiteouts included
    lower_st: dict[bytes, os.stat_result] | None = None  # the shared listing's lstat results of lower non-dirs


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
        out = []
        for fh in self._open_by_node.get(node.id, ()):
            h = self._handles[fh]
            assert isinstance(h, OpenFile)
            out.append(h)
        return out

    def fhs_of(self, node: Node) -> set[int]:
        """The handles of the files open on *node*."""
        return self._open_by_node.get(node.id, set())

    def follow_copy_up(self, node: Node) -> None:
        """After a copy-up, files opened read-only on the lower object read the upper one
        (the kernel shows the new data to such fds too, see docs/semantics.md)."""
        if node.is_dir:
            return
        for h in self.files_of(node):
            if not h.opened:  # opened on first use: it will open the upper object then
                continue
            try:
                fd = open_real(node, h.flags & OPEN_PASS & ~os.O_TRUNC)
            except OSError:
                continue
            os.dup2(fd, h.fd, inheritable=False)
            os.close(fd)

    def __len__(self) -> int:
        return len(self._handles)

    def close_all(self) -> None:
        for fh in list(self._handles):
            h = self.pop(fh)
            if isinstance(h, OpenFile):
                with contextlib.suppress(OSError):
                    h.close()
