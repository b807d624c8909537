"""Nodes of the merged tree and the table that owns them.

A ``Node`` is one object the kernel knows by a FUSE node id. Node ids are ours
(a counter); the ``st_ino`` a node reports is computed separately, the kernel's way
(see ``Overlay._st_ino``). Identity follows the kernel's overlay inode hashing
(fs/overlayfs/inode.c, ovl_hash_bylower): directories and lower non-directories are
one node per merged path, so copying up one name of a lower hard-link set breaks the
link as the kernel does with index=off; upper non-directories (and, on a read-only
stack, lower ones) are one node per real inode, so hard links share page cache.

``InodeTable`` is the only writer of node identity and of ``lookups``, and the only owner
of node lifetime. Nodes live while the kernel holds a lookup reference or a child is
alive; ``forget`` drops them, so a walk of a million-entry tree keeps memory bounded.

Each node has ``fd``, an O_PATH|O_NOFOLLOW fd of the real object that serves it, opened
when the node is made (relative to its parent directory's fd in that layer, and checked to
be the object the lookup found) and moved to the upper object by a copy-up. Every
operation on an existing object goes through it, never through its name: a name renamed
over or unlinked while open keeps acting on its own inode, as the kernel's overlay does,
and a symlink or FIFO put at the name since is never reached.

The descriptors are a cache, not one per live node: RLIMIT_NOFILE may be far below the
number of nodes the kernel keeps (20,000 on some machines, where a warm walk of a larger
tree would otherwise thrash). The table holds at most ``fd_cap`` of them, least recently
used first out. A node that gives its fd up records what it was (device, inode, type and
file handle, which carries the inode's generation); when it is needed again it is opened
at the node's name, as the server knows it (every rename and removal goes through the
server), and used only if it is that same object: a name changed behind the server's back
gives EBADF (no fd), never another object. A node no name leads to any more (unlinked or
renamed over while in use) never gives its fd up: it is all that reaches its object.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import stat
import struct
from collections.abc import Callable, Iterator

from . import _sys
from .layers import Layer

log = logging.getLogger(__name__)

ROOT_ID = 1
# The key of a directory that was removed or replaced (a dead directory): nothing is found
# or made in it any more, whatever is at its old name now.
DEAD = ("dead",)
_MODES: dict[int, int] = {}
_CHUNK_BITS = 10  # the table's id map: a dict per 1,024 consecutive node ids
#: the name of a node no name leads to yet (an O_TMPFILE file): never a real name
UNNAMED = b"/"


# The record of an object whose node fd was given up: st_dev, st_ino, the S_IFMT bits,
# then (when the filesystem encodes them) the file handle's type and bytes, which carry
# the inode's generation. One bytes object of 64 bytes (ext4, xfs, tmpfs) where a tuple of
# ints, a tuple and bytes took about 270: most nodes of a large walk hold one
# (docs/performance.md, memory). A handle type above 254 takes 255 and 4 more bytes.
_RECORD = struct.Struct("=QQB")
_HANDLE_TYPE = struct.Struct("=i")


def object_record(fd: int, with_handle: bool = True) -> bytes:
    """What the object of *fd* is: device, inode, type and (if *with_handle* and the
    filesystem has them) its file handle. Equal records: the same object."""
    st = os.fstat(fd)
    record = _RECORD.pack(st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode) >> 12)
    if with_handle:
        handle = _sys.name_to_handle(fd)
        if handle is not None:
            htype, raw = handle
            kind = bytes((htype,)) if 0 <= htype < 255 else b"\xff" + _HANDLE_TYPE.pack(htype)
            record += kind + raw
    return record


def real_key(dev: int, ino: int) -> tuple:
    """The key of the node shared by the names of one real (upper) inode."""
    return ("real", dev, ino)


def split_key(key: tuple) -> tuple:
    """The key of a real inode's second node: the names that report another st_ino than
    the first node's (see ``Overlay._node_for``)."""
    return key[:3] + ("split",)


class Node:
    """One object of the merged tree.

    ``layer`` is the layer that serves the object (the topmost one); ``dirs`` are, for a
    directory, every layer that contributes to it (top first). Only the copy-up code
    may change ``layer``/``dirs`` of a live node.
    """

    # Twelve slots: 128 bytes a node (pymalloc rounds to 16). The table is a class
    # attribute (each table makes nodes of a subclass of its own, ``InodeTable._node``),
    # and the two rarely used containers share one slot (``_rare``).
    __slots__ = (
        "id",
        "parent",
        "name",
        "mode",
        "layer",
        "dirs",
        "ino",
        "lookups",
        "children",
        "_rare",
        "key",
        "_fd",
    )
    #: the table owning this node (None: a node made outside a table)
    table: InodeTable | None = None

    def __init__(
        self,
        node_id: int,
        parent: Node | None,
        name: bytes,
        mode: int,
        layer: Layer,
        dirs: tuple[Layer, ...],
        ino: int,
        fd: int = -1,
    ) -> None:
        self.id = node_id
        # O_PATH|O_NOFOLLOW fd of the real object serving this node (in ``layer``), held
        # while in the table's fd cache; once given up, the record of what the object was
        # (bytes, see ``object_record``: one small object instead of a tuple of five);
        # -1: neither (see ``fd``).
        self._fd: int | bytes = fd
        self.parent = parent
        self.name = name
        # S_IFMT bits (+ permission bits at lookup time; refreshed by getattr). Interned: a
        # tree has few distinct modes, and an int object per node is 32 bytes.
        self.mode = _MODES.setdefault(mode, mode)
        self.layer = layer
        self.dirs = dirs
        # The containers are made only when needed: a walk creates one node per entry, and
        # most are plain files (memory, docs/performance.md). ``_rare``: None, or
        # [lpaths, aliases, lowerdata] (see those properties).
        self._rare: list | None = None
        self.ino = ino  # the st_ino reported for this node
        self.lookups = 0
        self.children: dict[bytes, Node] | None = None
        self.key: tuple | None = None

    @property
    def lpaths(self) -> dict[int, bytes] | None:
        """Where the object sits inside a *lower* layer that serves it, when a redirect makes
        that differ from relpath() (layer index -> path); None: relpath() everywhere."""
        rare = self._rare
        return rare[0] if rare is not None else None

    @lpaths.setter
    def lpaths(self, value: dict[int, bytes] | None) -> None:
        self._set_rare(0, value)

    @property
    def aliases(self) -> list[tuple[Node, bytes]] | None:
        """Further (parent, name) links of a shared (hard-linked) inode."""
        rare = self._rare
        return rare[1] if rare is not None else None

    @aliases.setter
    def aliases(self, value: list[tuple[Node, bytes]] | None) -> None:
        self._set_rare(1, value)

    @property
    def lowerdata(self) -> tuple[Layer, bytes] | None:
        """A metacopy file (``overlay.metacopy``, -o metacopy=on): the layer and path of the
        regular file below that holds its data (the kernel's lowerdata), read for it until
        its data is copied up; None: the node's own object holds its data."""
        rare = self._rare
        return rare[2] if rare is not None else None

    @lowerdata.setter
    def lowerdata(self, value: tuple[Layer, bytes] | None) -> None:
        self._set_rare(2, value)

    def _set_rare(self, index: int, value: object) -> None:
        rare = self._rare
        if rare is None:
            if value is None:
                return
            rare = self._rare = [None, None, None]
        rare[index] = value
        if rare[0] is None and rare[1] is None and rare[2] is None:
            self._rare = None

    @property
    def fd(self) -> int:
        """The fd of the node's object: held, or opened again and checked to be that same
        object (-1 when that cannot be: its name no longer leads to it)."""
        fd = self._fd
        table = self.table
        if fd.__class__ is int:
            if fd >= 0 and table is not None:
                table.touch(self)
            return fd
        if table is None:
            return -1
        return table.reopen(self)

    @property
    def holds_fd(self) -> bool:
        fd = self._fd
        return fd.__class__ is int and fd >= 0

    @property
    def gone(self) -> bytes | None:
        """What the object was when its fd was given up (``object_record``), if it was."""
        fd = self._fd
        return fd if fd.__class__ is bytes else None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def dead(self) -> bool:
        return self.key is DEAD

    @property
    def is_merged(self) -> bool:
        return len(self.dirs) > 1

    def relpath(self) -> bytes:
        """The path of this node inside every layer (b"" for the root)."""
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    def path_in(self, layer: Layer) -> bytes:
        """The path of this object inside *layer* (one of ``layer`` / ``dirs``)."""
        if self.parent is None:
            return b""
        if not layer.is_upper and self.lpaths is not None:
            path = self.lpaths.get(layer.index)
            if path is not None:
                return path
        return self.relpath()

    def child(self, name: bytes) -> Node | None:
        children = self.children
        return children.get(name) if children else None

    def _link_child(self, name: bytes, node: Node) -> None:
        if self.children is None:
            self.children = {}
        self.children[name] = node

    def _unlink_child(self, name: bytes, node: Node | None = None) -> Node | None:
        """Remove *name* (only if it leads to *node*, when given); returns what was there."""
        children = self.children
        if not children:
            return None
        found = children.get(name)
        if found is None or (node is not None and found is not node):
            return None
        del children[name]
        if not children:
            self.children = None
        return found

    def layer_dirs(self) -> list[tuple[Layer, bytes]]:
        """(layer, path in layer) for every layer contributing to this directory, top first."""
        return [(layer, self.path_in(layer)) for layer in self.dirs]

    def __repr__(self) -> str:
        return f"<Node {self.id} {self.relpath()!r} {self.layer.label}>"


class InodeTable:
    """Owns every live ``Node``: id allocation, the name tree, lookup counts and forgetting."""

    def __init__(
        self,
        root_layer: Layer,
        root_dirs: tuple[Layer, ...],
        root_mode: int,
        root_ino: int,
        root_fd: int = -1,
        fd_cap: int = 1 << 62,
        opener: Callable[[Node], int] | None = None,
    ) -> None:
        """*fd_cap*: node fds held at most (the rest of RLIMIT_NOFILE is kept for listings,
        open files and the server's own); *opener*: opens a node's object at its name
        (O_PATH|O_NOFOLLOW; the table checks it is the object the node had)."""
        self._next_id = ROOT_ID + 1
        # The class of this table's nodes: their ``table`` is this one without a slot each.
        self._node: type[Node] = type("Node", (Node,), {"__slots__": (), "table": self})
        self.root = self._node(ROOT_ID, None, b"", root_mode, root_layer, root_dirs, root_ino, root_fd)
        self.root.lookups = 1  # the kernel never forgets the root
        # id -> node, in chunks of 1,024 consecutive ids (``_CHUNK_BITS``): ids only grow and
        # nodes come and go by the hundred thousand on a large walk, which kept one big dict
        # at 20 MiB (its table sized for three times what it held at its last resize) and
        # briefly 30 during a resize; the chunks hold about 36 bytes a node.
        self._chunks: dict[int, dict[int, Node]] = {ROOT_ID >> _CHUNK_BITS: {ROOT_ID: self.root}}
        self._count = 1
        self._by_key: dict[tuple, Node] = {}
        # Nodes holding an fd, least recently used first (the root is never given up).
        self._held: collections.OrderedDict[int, Node] = collections.OrderedDict()
        self.fd_cap = fd_cap
        self._opener = opener
        # nodes whose fd is not what their name in their layer leads to (index=on: a lower
        # name served by its index entry): never given up (evict)
        self.pinned: set[int] = set()
        # Ids of non-directory nodes, oldest first: the candidates of shed().
        self._age: collections.deque[int] = collections.deque()

    def __getitem__(self, node_id: int) -> Node:
        return self._chunks[node_id >> _CHUNK_BITS][node_id]

    def get(self, node_id: int) -> Node | None:
        chunk = self._chunks.get(node_id >> _CHUNK_BITS)
        return chunk.get(node_id) if chunk is not None else None

    def __len__(self) -> int:
        return self._count

    def _all(self) -> Iterator[Node]:
        for chunk in self._chunks.values():
            yield from chunk.values()

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._all()))

    def _remove(self, node_id: int) -> Node | None:
        chunk = self._chunks.get(node_id >> _CHUNK_BITS)
        node = chunk.pop(node_id, None) if chunk is not None else None
        if node is not None:
            self._count -= 1
            self.pinned.discard(node_id)
            if not chunk:
                del self._chunks[node_id >> _CHUNK_BITS]
        return node

    def reachable(self, node: Node) -> bool:
        """Whether *node* is still reached by a name (no ancestor was removed or replaced)."""
        while node.parent is not None:
            if node.parent.child(node.name) is not node:
                return False
            node = node.parent
        return True

    def close(self) -> None:
        """Close every node's fd (the mount is going away): each then has none (-1), and its
        ``fd`` stays -1 (a node with none never asks its table)."""
        for node in self._all():
            if node.holds_fd:
                with contextlib.suppress(OSError):
                    os.close(node._fd)  # type: ignore[arg-type]
            node._fd = -1
        self._held.clear()

    # --- the fd cache ---------------------------------------------------------------------

    @property
    def held(self) -> int:
        """How many node fds are held now."""
        return len(self._held)

    def touch(self, node: Node) -> None:
        if node.parent is not None:
            held = self._held
            if node.id in held:
                held.move_to_end(node.id)

    def _hold(self, node: Node, fd: int) -> None:
        node._fd = fd
        if node.parent is None:
            return  # the root: always held
        self._held[node.id] = node
        self._held.move_to_end(node.id)
        if len(self._held) > self.fd_cap:
            self.evict(len(self._held) - self.fd_cap)

    def _release(self, node: Node, record: bytes | None = None) -> None:
        """Close the node's fd (if held); *record*: what its object was (else it is -1)."""
        fd, node._fd = node._fd, record if record is not None else -1
        self._held.pop(node.id, None)
        if fd.__class__ is int and fd >= 0:
            os.close(fd)

    def evict(self, count: int = 1) -> int:
        """Give up the fds of up to *count* nodes, least recently used first, that a name
        still leads to (an unreachable node keeps its fd: nothing else reaches its object).
        Returns how many were given up."""
        done = 0
        held = self._held
        for _ in range(len(held)):
            if done >= count or not held:
                break
            node_id, node = next(iter(held.items()))
            if node.dead or not self.reachable(node) or node_id in self.pinned:
                held.move_to_end(node_id)  # kept: scanned again only after the others
                continue
            try:
                record = object_record(node._fd)  # type: ignore[arg-type]
            except OSError:
                self._release(node)
                continue
            self._release(node, record)
            done += 1
        return done

    def reopen(self, node: Node) -> int:
        """The fd of a node that gave its up: opened at its name and checked to be the same
        object (device, inode, type, file handle); -1 if it cannot be had that way."""
        gone = node.gone
        if self._opener is None or gone is None or node.dead or not self.reachable(node):
            return -1
        try:
            fd = self._opener(node)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self.evict(16):
                log.debug("%r: cannot open its object again: %s", node, exc)
                return -1
            try:
                fd = self._opener(node)
            except OSError:
                return -1
        try:
            same = object_record(fd, gone[_RECORD.size :] != b"") == gone
        except OSError:
            same = False
        if not same:
            os.close(fd)
            log.warning("%r: the object at its name is not the node's any more (changed outside the mount)", node)
            return -1
        self._hold(node, fd)
        return fd

    def by_key(self, key: tuple) -> Node | None:
        return self._by_key.get(key)

    def peer(self, node: Node) -> Node | None:
        """The other node of *node*'s real inode, if its names are split in two (they report
        two st_ino): a change to the object through one must drop the kernel's cached
        attributes of the other (the kernel's overlay stats the real inode every time)."""
        key = node.key
        if key is None or key[0] != "real":
            return None
        other = self._by_key.get(split_key(key) if len(key) == 3 else key[:3])
        return other if other is not node else None

    def add(
        self,
        parent: Node,
        name: bytes,
        mode: int,
        layer: Layer,
        dirs: tuple[Layer, ...],
        ino: int,
        key: tuple | None = None,
        fd: int = -1,
    ) -> Node:
        """A new node for *name* in *parent* (lookup count 0: call ``ref`` once the kernel has it).
        *fd*: the node's O_PATH fd of its real object; the table owns it from now on."""
        self.detach(parent, name)
        node = self._node(self._next_id, parent, name, mode, layer, dirs, ino)
        if fd >= 0:
            self._hold(node, fd)
        self._next_id += 1
        node.key = key
        if key is not None:
            self._by_key[key] = node
        chunk = self._chunks.get(node.id >> _CHUNK_BITS)
        if chunk is None:
            chunk = self._chunks[node.id >> _CHUNK_BITS] = {}
        chunk[node.id] = node
        self._count += 1
        parent._link_child(name, node)
        if not stat.S_ISDIR(mode):
            self._age.append(node.id)
        return node

    def shed(self, keep: int) -> list[tuple[int, bytes]]:
        """``(parent id, name)`` of the oldest non-directory nodes beyond *keep* live nodes.

        The kernel keeps every inode it learned of until memory gets short, and the server
        must keep a node for each; asking the kernel to drop these entries (FUSE
        notify_inval_entry) makes it FORGET them once unused, so the table stays near
        *keep* nodes. Each node is offered once; directories are never offered (dropping
        one prunes its subtree). Only cache is lost: a later lookup makes a new node
        with the same ``st_ino``."""
        out: list[tuple[int, bytes]] = []
        excess = self._count - keep
        age, get = self._age, self.get
        while excess > 0 and age:
            node = get(age.popleft())
            if node is None or node.parent is None or node.parent.child(node.name) is not node:
                continue  # gone already, or unlinked but open: nothing to drop
            out.append((node.parent.id, node.name))
            excess -= 1
        return out

    def shed_dirs(self, count: int) -> list[tuple[int, bytes]]:
        """``(parent id, name)`` of up to *count* directories with no live child node: what
        can still be given back when the server runs out of descriptors (every node holds
        one, and the budget never drops directories). Only cache is lost: the kernel
        forgets them once unused (a process inside one keeps it)."""
        out: list[tuple[int, bytes]] = []
        for node in self._all():
            if len(out) >= count:
                break
            if node.children or not node.is_dir or node.parent is None or node.parent.child(node.name) is not node:
                continue
            out.append((node.parent.id, node.name))
        return out

    def add_unnamed(self, parent: Node, mode: int, layer: Layer, ino: int, key: tuple | None, fd: int) -> Node:
        """A node no name leads to yet (an O_TMPFILE file made in *parent*): known by its id
        and its key only; unreachable, so its fd is never given up. A link names it."""
        node = self.add(parent, UNNAMED, mode, layer, (), ino, key, fd)
        parent._unlink_child(UNNAMED, node)
        return node

    def named(self, node: Node) -> None:
        """After a link gave an unnamed node a name (as an alias): that name is its own now."""
        if node.name == UNNAMED and node.aliases and node.parent is not None and node.parent.child(UNNAMED) is not node:
            node.parent, node.name = node.aliases.pop(0)
            node.aliases = node.aliases or None

    def set_primary(self, node: Node, parent: Node, name: bytes) -> None:
        """Make (*parent*, *name*), one of *node*'s names, its own (``relpath``): the name a
        copy-up linked in the upper layer (index=on, where the names are aliases)."""
        if node.parent is parent and node.name == name:
            return
        aliases = node.aliases or []
        if not any(p is parent and n == name for p, n in aliases):
            return
        rest = [(p, n) for p, n in aliases if not (p is parent and n == name)]
        if node.parent is not None:
            rest.insert(0, (node.parent, node.name))
        node.parent, node.name = parent, name
        node.aliases = rest or None

    def add_alias(self, node: Node, parent: Node, name: bytes) -> None:
        """Another name for a shared (hard-linked) node."""
        self.detach(parent, name)
        if node.aliases is None:
            node.aliases = []
        node.aliases.append((parent, name))
        parent._link_child(name, node)

    def detach(self, parent: Node, name: bytes) -> None:
        """Forget that *name* in *parent* leads to its current node (it was removed or replaced).

        The node itself stays alive while the kernel holds references to it.
        """
        node = parent._unlink_child(name)
        if node is None:
            return
        if node.parent is parent and node.name == name:
            if node.aliases:
                node.parent, node.name = node.aliases.pop(0)
            else:
                self._orphan(node)
        else:
            node.aliases = [(p, n) for (p, n) in node.aliases or () if not (p is parent and n == name)] or None
        self._maybe_drop(node)

    def unhash(self, node: Node) -> None:
        """Every name of *node* leads to a new node from the next lookup on (same object, same
        ``st_ino``); this one lives on for the kernel's open files of it (the direct engine's
        passthrough after a copy-up, docs/semantics.md)."""
        for parent, name in [(node.parent, node.name), *(node.aliases or ())]:
            if parent is not None and parent.child(name) is node:
                self.detach(parent, name)
        if node.key is not None and self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        node.key = None

    def _orphan(self, node: Node) -> None:
        # Keep ``parent`` so that relpath() of an unlinked-but-open node stays computable for
        # error messages; mark it unreachable by removing its key. Its fd still reaches its
        # object. A removed directory is marked dead: nothing is found or made in it (its
        # old name may lead to another directory now).
        if node.key is not None and self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        node.key = DEAD if node.is_dir else None

    def set_fd(self, node: Node, fd: int) -> None:
        """Give *node* a new fd of its real object (after a copy-up); the old one is closed.
        -1: none (the node's operations then fail with EBADF)."""
        if node._fd != fd:
            self._release(node)
        else:
            node._fd = -1  # no record any more, whatever fd is
        if fd >= 0:
            self._hold(node, fd)

    def ref(self, node: Node, n: int = 1) -> None:
        node.lookups += n

    def forget(self, node_id: int, n: int) -> None:
        node = self.get(node_id)
        if node is None or node.id == ROOT_ID:
            return
        node.lookups -= n
        if node.lookups < 0:
            log.error("lookup count of %r went negative", node)
            node.lookups = 0
        self._maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        self._maybe_drop(node)

    def _maybe_drop(self, start: Node) -> None:
        node: Node | None = start
        while node is not None and node.id != ROOT_ID and node.lookups == 0 and not node.children:
            if self._remove(node.id) is None:
                return
            parent = node.parent
            if parent is not None:
                parent._unlink_child(node.name, node)
            for p, n in node.aliases or ():
                if p._unlink_child(n, node) is not None:
                    self._maybe_drop(p)
            node.aliases = None
            if node.key is not None and self._by_key.get(node.key) is node:
                del self._by_key[node.key]
            self._release(node)  # its fd is -1 now: it never asks the table again
            node = parent

    def _relink(self, node: Node, old: tuple[Node, bytes], new: tuple[Node, bytes]) -> None:
        if node.parent is old[0] and node.name == old[1]:
            node.parent, node.name = new
        else:
            node.aliases = [new if (p is old[0] and n == old[1]) else (p, n) for (p, n) in node.aliases or ()]
        new[0]._link_child(new[1], node)

    def move(
        self, node: Node, parent: Node, name: bytes, newparent: Node, newname: bytes, exchange: Node | None = None
    ) -> None:
        """A rename: *node* now lives at (newparent, newname); with *exchange*, that node
        moves to (parent, name). A replaced target is detached (it lives on while open)."""
        for n in (node, exchange):  # lower paths are where they were, whatever the new name
            if n is not None and n.lpaths is None and any(not x.is_upper for x in (n.layer, *n.dirs)):
                old = n.relpath()
                n.lpaths = {x.index: old for x in (n.layer, *n.dirs) if not x.is_upper}
        if exchange is None:
            self.detach(newparent, newname)
            parent._unlink_child(name, node)
            self._relink(node, (parent, name), (newparent, newname))
            self._maybe_drop(parent)
        else:
            self._relink(node, (parent, name), (newparent, newname))
            self._relink(exchange, (newparent, newname), (parent, name))

    def rekey(self, node: Node, key: tuple | None) -> None:
        if node.key is not None and self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        node.key = key
        if key is not None:
            self._by_key[key] = node
