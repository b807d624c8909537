"""The merged tree of an upper and its lowers, read from the layer directories (no mount).

A directory renamed by redirect (``overlay.redirect``, ``redirect_dir=on``) has its lower
content elsewhere in the lower layers; a layer tar or a ``docker diff`` has no such
notion, so they write or report that directory in full: its merged content, as a mount
shows it (docs/semantics.md, "redirect_dir"). This module gives that content, with the
precedence of :class:`~overlayfs_py.layers.LayerStack` (whiteouts, opaque directories,
redirects followed), used by diff.py and the runner's layer tar writer.
"""

from __future__ import annotations

from collections.abc import Sequence

from .layers import Hit, Layer, LayerStack
from .whiteout import XattrNames

Dirs = list[tuple[Layer, bytes]]


def full_stack(upper: str, lowers: Sequence[str], names: XattrNames, aufs: bool = False) -> LayerStack:
    """A stack of *upper* over *lowers* whose root merges as a mount's does."""
    stack = LayerStack(tuple(lowers), upper, names, aufs=aufs)
    stack.merge_root()
    stack.metacopy = True  # metacopy files are followed to their data (metacopy=on)
    return stack


def root_dirs(stack: LayerStack) -> Dirs:
    return [(layer, b"") for layer in stack.merge_root()]


def dirs_of(stack: LayerStack, rel: bytes) -> Dirs | None:
    """The merged directory *rel* as (layer, path in layer), top first; None when it is not
    a directory of the merged view."""
    dirs = root_dirs(stack)
    for part in (p for p in rel.split(b"/") if p):
        hits = stack.resolve(dirs, part)
        if not hits or not _is_dir(hits[0]):
            return None
        dirs = [(h.layer, h.path) for h in hits]
    return dirs


def entries(stack: LayerStack, dirs: Dirs) -> list[tuple[bytes, list[Hit]]]:
    """The names of the merged directory *dirs*, sorted, each with its hits (top first)."""
    out = []
    for name, _layer in stack.list_merged(dirs, True):
        hits = stack.resolve(dirs, name)
        if hits:
            out.append((name, hits))
    return sorted(out, key=lambda e: e[0])


def _is_dir(hit: Hit) -> bool:
    import stat

    return stat.S_ISDIR(hit.st.st_mode)


def index_served(stack: LayerStack, indexed: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """index=on: the lower names an ``index=on`` mount shows as an indexed upper copy though
    no upper name links them (index.py: a lookup of such a name is served by the copy's
    index entry). *indexed*: origin record -> an upper path of the indexed copy (an upper
    file with ``overlay.nlink``). Returns (lower path, upper path) pairs, sorted: each
    lower non-directory of the origin's inode that the merged view of *stack* (the upper
    over its lowers) still takes from that lower layer. Walks the lower layers (only
    called when the upper has indexed copies)."""
    import os
    import stat

    from . import _sys
    from .index import encode_fh

    if not indexed:
        return []
    out: list[tuple[bytes, bytes]] = []
    for layer in stack.lowers:
        uuid = stack.fs_uuid(layer)
        todo = [b""]
        while todo:
            rel = todo.pop()
            try:
                dfd = _sys.open_dir(layer.fd, rel) if rel else os.dup(layer.fd)
            except OSError:
                continue
            try:
                for name, _kind in _sys.listdir_fd(dfd):
                    st = _sys.lstat_at(dfd, name)
                    path = rel + b"/" + name if rel else name
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(path)
                        continue
                    if st.st_nlink <= 1:
                        continue
                    fd = _sys.open_node(dfd, name)
                    try:
                        rec = encode_fh(fd, uuid)
                    finally:
                        os.close(fd)
                    up = indexed.get(rec) if rec is not None else None
                    if up is None:
                        continue
                    parent, _, base = path.rpartition(b"/")
                    dirs = dirs_of(stack, parent)
                    hits = stack.resolve(dirs, base) if dirs is not None else []
                    if hits and hits[0].layer is layer and hits[0].path == path:
                        out.append((path, up))
            finally:
                os.close(dfd)
    return sorted(out)
