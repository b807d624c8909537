"""The node budget: how many nodes the server keeps, and how many of their fds.

Beyond a budget the kernel is asked to drop the oldest file entries (its FORGETs then free
the nodes), so memory stays bounded on any walk. Node fds are a cache inside the inode
table (``InodeTable.fd_cap``, least recently used given up first), sized here to what
RLIMIT_NOFILE leaves; when descriptors run out anyway, some directories are dropped too.
The policy is the engine's business only in one respect: how the kernel is told to drop
an entry. That is the ``drop_entries`` callback (a FUSE engine sends notify_inval_entry
for each); everything else is here, engine-independent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .inodes import InodeTable
from .layers import DirFdCache

log = logging.getLogger(__name__)

# Descriptors kept free of nodes: open files, the trace sink's clients, trio's and pyfuse3's
# own (the directory fd cache is counted apart): an eighth of the limit, between these.
FD_HEADROOM = 1024
FD_HEADROOM_MIN = 64
# How long a lookup waits for the kernel's FORGETs when nodes have no descriptor left.
FD_WAIT = 2.0

DropEntries = Callable[[list[tuple[int, bytes]]], None]


def node_fd_cap(fd_limit: int, cache: int) -> int:
    """Node fds held at most (the inode table gives the least recently used up beyond it),
    so that listings, open files and the server's own descriptors never run out: never
    more than the limit leaves beside the directory fd cache and the headroom."""
    return max(16, fd_limit - cache - max(FD_HEADROOM_MIN, min(FD_HEADROOM, fd_limit // 8)))


def clamp_node_budget(max_nodes: int, fd_limit: int, dirfds: DirFdCache | None = None) -> int:
    """The node budget for *fd_limit* descriptors, and the directory fd cache's size.

    The budget is *max_nodes* (0: none): nodes do not each need a descriptor, their fds
    being a cache (``node_fd_cap``). The directory fd cache is shrunk to an eighth of the
    limit at most, so that node fds, open files and the server's own keep the rest."""
    if dirfds is not None:
        dirfds.capacity = max(16, min(dirfds.capacity, fd_limit // 8))
        cache = dirfds.capacity
    else:
        cache = min(2048, fd_limit // 8)
    log.debug(
        "node budget %s, RLIMIT_NOFILE %d: %d node fds held at most, %d in the directory fd cache",
        max_nodes or "none",
        fd_limit,
        node_fd_cap(fd_limit, cache),
        cache,
    )
    return max_nodes


def _no_drops(drops: list[tuple[int, bytes]]) -> None:
    return None


class NodeBudget:
    """Keeps the inode table near its budget by asking the kernel to drop entries
    (*drop_entries*, the engine's): ``check`` after requests that make nodes,
    ``out_of_fds`` when a node could not get its descriptor."""

    def __init__(self, inodes: InodeTable, max_nodes: int, drop_entries: DropEntries = _no_drops) -> None:
        self.inodes = inodes
        self.max_nodes = max_nodes
        self.drop_entries = drop_entries
        self._shed_at = max_nodes
        self._last_emergency = 0.0

    def check(self) -> None:
        """After a lookup or a listing: over the budget, shed; back under it, watch again."""
        if not self.max_nodes:
            return
        n = len(self.inodes)
        if n > self._shed_at:
            self._shed()
        elif n < self.max_nodes:
            self._shed_at = self.max_nodes  # the kernel's FORGETs came: watch the budget again

    def _shed(self) -> None:
        """Over the node budget: ask the kernel (asynchronously: never from inside a
        request) to drop the oldest file entries down to 80 % of it; their FORGETs free
        the nodes. Not again before the table has grown by another 20 %."""
        keep = self.max_nodes * 4 // 5
        drops = self.inodes.shed(keep)
        self.drop_entries(drops)
        self._shed_at = max(self.max_nodes, len(self.inodes) + self.max_nodes - keep)
        log.info(
            "node budget %d: %d live nodes, asked the kernel to drop %d entries",
            self.max_nodes,
            len(self.inodes),
            len(drops),
        )

    def out_of_fds(self) -> None:
        """A node could not get its fd: ask the kernel to drop file entries beyond 80 % of
        the budget and, since directories can fill the descriptors on their own, some
        directories with no live children too (at most once a second)."""
        keep = self.max_nodes * 4 // 5
        drops = self.inodes.shed(keep)  # each file node is offered once: cheap to repeat
        now = time.monotonic()
        if now - self._last_emergency >= 1.0:
            self._last_emergency = now
            drops += self.inodes.shed_dirs(max(16, len(self.inodes) - len(drops) - keep))
        if not drops:
            return
        self.drop_entries(drops)
        log.warning(
            "out of descriptors: %d live nodes, asked the kernel to drop %d entries", len(self.inodes), len(drops)
        )
