"""What an upper layer changed, in ``docker diff`` form (A added, C changed, D deleted).

Pure: reads the layer directories only (no FUSE, no mount). The rules are moby's
``changes()`` for the overlay2 driver (pkg/archive/changes.go, ``overlayDeletedFile``),
applied while walking the upper layer top-down:

* a whiteout (a char device 0/0, or a zero-size regular file carrying
  ``overlay.whiteout`` in a directory marked ``overlay.opaque=x``) is ``D path``;
* a directory marked ``overlay.opaque=y`` whose path exists in the lower view is
  ``D path`` (it replaced the lower directory); what it holds is still compared with
  the lower view at the same paths, as moby does (a file re-created there is ``C``);
* otherwise a path that exists in the lower view is ``C path``, except a directory over a
  directory with the same size, mode and mtime (moby's ``sameFsTime``: equal, or the same
  second with either side at 0 ns), which is not reported;
* otherwise ``A path``;
* for each A or D, the parent directory is reported as C once, unless it was reported
  already (every directory walked and not skipped as unchanged counts) or is the root.

Differences from moby, on purpose:

* the *lower view* is the merged view of the lower layers alone, computed with
  :class:`~overlayfs_py.layers.LayerStack` component by component, so whiteouts and
  opaque directories in the lowers count and no symlink in a layer is followed; moby
  ``os.Stat``\\s the path in each lower directory separately (following symlinks, and
  seeing names a higher lower layer has whited out);
* moby reports every opaque directory as deleted; here one that has nothing below it in
  the lower view (e.g. a new directory renamed into a merged one) is an ordinary A;
* a directory renamed by redirect (``overlay.redirect``, ``redirect_dir=on``; moby diffs
  such uppers naively, merged view against lower view) is reported as a new directory in
  full: ``A`` (or, over a lower directory at its new path, ``D`` as an opaque one) and every
  object of its merged content (its lower content included, read through
  :mod:`.merged`) ``A``, or ``C`` where the lower view has that path; its old path is
  ``D`` by its whiteout, as any;
* moby knows only ``trusted.overlay.``; an upper written with ``userxattr`` (its private
  xattrs are ``user.overlay.*``) is read with that prefix.

With *aufs* (``--aufs-whiteouts``; a live mount's record turns it on when the mount does),
AUFS markers count as fuse-overlayfs reads them: in the lower layers through the
``LayerStack``; in the upper, a ``.wh.NAME`` is ``D NAME`` and a ``.wh..wh..opq`` makes its
directory opaque (never reported themselves).

``ignore_identical`` additionally leaves out C entries for regular files whose content,
mode, uid and gid equal the lower view's file (copied up, e.g. by ``touch``, but
unchanged) -- never a file below an opaque directory: that one is new, whatever it holds.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import NamedTuple

from . import _sys, merged
from .layers import Layer, LayerStack
from .whiteout import (
    TRUSTED_PREFIX,
    USER_PREFIX,
    XattrNames,
    aufs_hidden,
    aufs_opaque_at,
    has_xwhiteouts,
    is_aufs_marker,
    is_opaque,
    is_whiteout_at,
)

_CHUNK = 1 << 20


class Change(NamedTuple):
    """One line of ``docker diff``: *kind* is "A", "C" or "D"; *path* starts with "/"."""

    kind: str
    path: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def detect_userxattr(upper: str) -> bool | None:
    """Whether *upper* was written with ``-o userxattr``: the first private xattr found
    (root first, then breadth-first) decides; None when there is none at all."""
    root = os.open(upper, _sys.DIR_FLAGS)
    try:
        queue: list[bytes] = [b""]
        while queue:
            rel = queue.pop(0)
            dfd = _sys.open_dir(root, rel) if rel else os.dup(root)
            try:
                if rel == b"":
                    found = _private_prefix(_sys.listxattr_at(dfd, None))
                    if found:
                        return found == USER_PREFIX
                for name, kind in sorted(_sys.listdir_fd(dfd)):
                    found = _private_prefix(_sys.listxattr_at(dfd, name))
                    if found:
                        return found == USER_PREFIX
                    if kind == stat.S_IFDIR:
                        queue.append(rel + b"/" + name if rel else name)
            finally:
                os.close(dfd)
    finally:
        os.close(root)
    return None


def _private_prefix(names: list[str]) -> str | None:
    for n in names:
        for prefix in (TRUSTED_PREFIX, USER_PREFIX):
            if n.startswith(prefix):
                return prefix
    return None


def diff(
    upper: str,
    lowers: Sequence[str],
    *,
    userxattr: bool | None = None,
    ignore_identical: bool = False,
    aufs: bool = False,
) -> list[Change]:
    """The changes *upper* makes over *lowers* (top lower first), sorted by path.

    *userxattr* None: detected from the upper's xattrs (``trusted.overlay.`` when none).
    *aufs*: honour AUFS ``.wh.`` markers (module doc).
    """
    if userxattr is None:
        userxattr = bool(detect_userxattr(upper))
    names = XattrNames(USER_PREFIX if userxattr else TRUSTED_PREFIX)
    stack = LayerStack(tuple(lowers), None, names, aufs=aufs) if lowers else None
    if stack is not None:
        stack.metacopy = True  # metacopy files in the lowers (the kernel's) are followed
    walk = _Walk(upper, stack, names, ignore_identical, aufs)
    walk.lowers = tuple(lowers)
    try:
        return walk.run()
    finally:
        if stack is not None:
            stack.close()
        if walk.full is not None:
            walk.full.close()


Dirs = list[tuple[Layer, bytes]]  # a directory of the lower view: (layer, path in it), top first


class _Walk:
    """One pre-order walk of the upper layer, carrying each directory's lower-view dirs."""

    def __init__(
        self, upper: str, stack: LayerStack | None, names: XattrNames, ignore_identical: bool, aufs: bool = False
    ) -> None:
        self.upper = upper
        self.aufs = aufs
        self.stack = stack
        self.names = names
        self.ignore_identical = ignore_identical
        self.opaque_dirs: set[bytes] = set()  # opaque dirs that replaced a lower dir
        self.changes: list[Change] = []
        self.changed_dirs: set[bytes] = set()
        self.lowers: tuple[str, ...] = ()
        self.full: LayerStack | None = None  # upper over lowers: a redirected dir's content
        self.indexed: dict[bytes, bytes] = {}  # index=on: origin record -> an indexed copy's path

    def run(self) -> list[Change]:
        self.root = os.open(self.upper, _sys.DIR_FLAGS)
        try:
            todo: list[tuple[bytes, Dirs | None]] = [(b"", self._root_dirs())]
            while todo:
                rel, lower_dirs = todo.pop()
                todo.extend(reversed(self._dir(rel, lower_dirs)))
            if self.indexed and self.lowers:  # index=on: names served by an indexed copy
                self.full = self.full or merged.full_stack(self.upper, self.lowers, self.names, self.aufs)
                for lower_path, _up in merged.index_served(self.full, self.indexed):
                    self._record("C", lower_path, False)
        finally:
            os.close(self.root)
        return sorted(self.changes, key=lambda c: os.fsencode(c.path))

    def _root_dirs(self) -> Dirs | None:
        if self.stack is None:
            return None
        dirs: Dirs = []
        for i, layer in enumerate(self.stack.lowers):  # the roots merge until an opaque one
            dirs.append((layer, b""))
            if i < len(self.stack.lowers) - 1 and (
                is_opaque(_sys.getxattr_at(layer.fd, None, self.names.opaque))
                or (self.aufs and aufs_opaque_at(layer.fd, None))
            ):
                break
        self.stack.root_lowers = tuple(layer for layer, _ in dirs)
        return dirs

    def _dir(self, rel: bytes, lower_dirs: Dirs | None) -> list[tuple[bytes, Dirs | None]]:
        """Judge every entry of the upper directory *rel*; return its subdirectories."""
        dfd = _sys.open_dir(self.root, rel) if rel else os.dup(self.root)
        try:
            xwhiteouts = has_xwhiteouts(_sys.getxattr_at(dfd, None, self.names.opaque))
            subdirs = []
            for name, _kind in sorted(_sys.listdir_fd(dfd)):
                if self.aufs and is_aufs_marker(name):
                    hidden = aufs_hidden(name)  # None: the opaque marker (its directory is judged opaque)
                    if hidden is not None:
                        self._record("D", rel + b"/" + hidden if rel else hidden, False)
                    continue
                path = rel + b"/" + name if rel else name
                st = _sys.lstat_at(dfd, name)
                hits = self.stack.resolve(lower_dirs, name) if lower_dirs and self.stack is not None else []
                if (
                    stat.S_ISDIR(st.st_mode)
                    and self.stack is not None
                    and _sys.getxattr_at(dfd, name, self.names.redirect) is not None
                    and not self._is_opaque(dfd, name)
                ):
                    self._redirected(path, st, hits)
                    continue
                self._entry(dfd, name, path, st, hits, xwhiteouts)
                if stat.S_ISDIR(st.st_mode):
                    lower_dir = hits and stat.S_ISDIR(hits[0].st.st_mode)
                    subdirs.append((path, [(h.layer, h.path) for h in hits] if lower_dir else None))
            return subdirs
        finally:
            os.close(dfd)

    def _entry(self, dfd: int, name: bytes, path: bytes, st: os.stat_result, hits: list, xwhiteouts: bool) -> None:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and _sys.getxattr_at(dfd, name, self.names.nlink):
            origin = _sys.getxattr_at(dfd, name, self.names.origin)
            if origin is not None:
                self.indexed.setdefault(origin, path)
        if self._is_whiteout(dfd, name, st, xwhiteouts):
            kind = "D"
        elif hits and stat.S_ISDIR(st.st_mode) and self._is_opaque(dfd, name):
            kind = "D"
            self.opaque_dirs.add(path)
        elif hits:
            low = hits[0].st
            if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(low.st_mode) and _same_dir(st, low):
                return  # unchanged directory: not recorded, so a child's A/D reports it
            if self.ignore_identical and not self._below_opaque(path) and self._identical(path, st, hits[0]):
                kind = ""
            else:
                kind = "C"
        else:
            kind = "A"
        self._record(kind, path, stat.S_ISDIR(st.st_mode))

    def _redirected(self, path: bytes, st: os.stat_result, hits: list) -> None:
        """A directory renamed by redirect: new, with its whole merged content (module doc)."""
        if self.full is None:
            self.full = merged.full_stack(self.upper, self.lowers, self.names, self.aufs)
            self.full.metacopy = True
        dirs = merged.dirs_of(self.full, path)
        lower_dir = bool(hits) and stat.S_ISDIR(hits[0].st.st_mode)
        if hits:
            self.opaque_dirs.add(path)  # like an opaque dir over a lower one: nothing merges
        self._record("D" if hits else "A", path, True)
        if dirs is None:
            return
        todo = [(path, dirs, [(h.layer, h.path) for h in hits] if lower_dir else None)]
        while todo:
            rel, mdirs, ldirs = todo.pop()
            for name, mhits in merged.entries(self.full, mdirs):
                child = rel + b"/" + name
                lhits = self.stack.resolve(ldirs, name) if ldirs and self.stack is not None else []
                is_dir = stat.S_ISDIR(mhits[0].st.st_mode)
                self._record("C" if lhits else "A", child, is_dir)
                if is_dir:
                    low = [(h.layer, h.path) for h in lhits] if lhits and stat.S_ISDIR(lhits[0].st.st_mode) else None
                    todo.append((child, [(h.layer, h.path) for h in mhits], low))

    def _record(self, kind: str, path: bytes, is_dir: bool) -> None:
        if is_dir:
            self.changed_dirs.add(path)
        if kind in ("A", "D"):
            parent = path.rpartition(b"/")[0]
            if parent and parent not in self.changed_dirs:
                self.changes.append(Change("C", "/" + os.fsdecode(parent)))
                self.changed_dirs.add(parent)
        if kind:
            self.changes.append(Change(kind, "/" + os.fsdecode(path)))

    def _is_opaque(self, dfd: int, name: bytes) -> bool:
        return is_opaque(_sys.getxattr_at(dfd, name, self.names.opaque)) or (self.aufs and aufs_opaque_at(dfd, name))

    def _is_whiteout(self, dfd: int, name: bytes, st: os.stat_result, xwhiteouts: bool) -> bool:
        return is_whiteout_at(dfd, name, st, self.names, xattr=xwhiteouts)

    def _below_opaque(self, path: bytes) -> bool:
        parent = path.rpartition(b"/")[0]
        while parent:
            if parent in self.opaque_dirs:
                return True
            parent = parent.rpartition(b"/")[0]
        return False

    def _identical(self, path: bytes, st: os.stat_result, hit) -> bool:
        """A regular file equal to the lower view's in content, mode, uid and gid."""
        low = hit.st
        if not (stat.S_ISREG(st.st_mode) and stat.S_ISREG(low.st_mode)):
            return False
        if (st.st_mode, st.st_uid, st.st_gid, st.st_size) != (low.st_mode, low.st_uid, low.st_gid, low.st_size):
            return False
        if _sys.getxattr_at(self.root, path, self.names.metacopy) is not None:
            # a metacopy file (metacopy=on): its data is the lower file's at its path, unless
            # it was renamed (a redirect): then it is reported
            return _sys.getxattr_at(self.root, path, self.names.redirect) is None
        a = _sys.open_beneath(self.root, path, os.O_RDONLY)
        try:
            b = _sys.open_beneath(hit.layer.fd, hit.path, os.O_RDONLY)
            try:
                return _same_content(a, b)
            finally:
                os.close(b)
        finally:
            os.close(a)


def _same_dir(a: os.stat_result, b: os.stat_result) -> bool:
    """moby: same size, same mode, and ``sameFsTime`` mtimes."""
    if a.st_size != b.st_size or a.st_mode != b.st_mode:
        return False
    if a.st_mtime_ns == b.st_mtime_ns:
        return True
    (sa, na), (sb, nb) = divmod(a.st_mtime_ns, 10**9), divmod(b.st_mtime_ns, 10**9)
    return sa == sb and (na == 0 or nb == 0)


def _same_content(a: int, b: int) -> bool:
    while True:
        x, y = _read_full(a), _read_full(b)
        if x != y:
            return False
        if not x:
            return True


def _read_full(fd: int) -> bytes:
    """Up to ``_CHUNK`` bytes; fewer only at end of file."""
    parts, n = [], 0
    while n < _CHUNK:
        data = os.read(fd, _CHUNK - n)
        if not data:
            break
        parts.append(data)
        n += len(data)
    return b"".join(parts)
