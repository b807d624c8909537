"""Stored and presented owners of one mount: the thin I/O around ``idmap``'s rules.

Which layers honour the override xattr is fuse-overlayfs's rule: a layer whose root
directory carries ``user.containers.override_stat`` (``direct_load_data_source``, its
STAT_OVERRIDE_CONTAINERS mode), here only if that root belongs to root or to the server's
own user (fuse-overlayfs believes any layer: a user could then show a set-uid root file
to a root mount of its upper). The first override written into the upper layer marks the
upper root with its own stored owner, so that layer honours overrides from then on, here
and under fuse-overlayfs alike.

With identity maps and no layer honouring overrides, nothing here runs per request
(``presenting`` is False and an engine keeps the disk's owners); it turns True the moment
the server marks the upper root (and calls ``on_presenting``, a constructor argument).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable

from . import _sys
from .idmap import OVERRIDE_XATTR, IdMap, carries_override, decode_override, encode_override, overflow_id
from .layers import Layer


def _target(path: bytes, follow: bool) -> tuple[bytes, bool]:
    """(path, follow) to use: only a bare /proc/self/fd/N magic link is followed (it reaches
    its fd's object itself, a symlink included); any other path is never followed, so a
    symlink is never followed to its target, whatever a caller asks."""
    if follow and not (path.startswith(b"/proc/self/fd/") and path[14:].isdigit()):
        return path, False
    return path, follow


class Owners:
    def __init__(
        self,
        uidmap: Iterable[tuple[int, int, int]] = (),
        gidmap: Iterable[tuple[int, int, int]] = (),
        layers: Iterable[Layer] = (),
        upper: Layer | None = None,
        euid: int | None = None,
        on_presenting: Callable[[], None] | None = None,
        squash: tuple[int | None, int | None] = (None, None),
    ) -> None:
        self.uids = IdMap(uidmap, overflow_id("uid"))
        self.gids = IdMap(gidmap, overflow_id("gid"))
        self.identity = self.uids.identity and self.gids.identity
        self.upper = upper
        self.euid, self.egid = os.geteuid() if euid is None else euid, os.getegid()
        self.override_layers: set[int] = {
            layer.index for layer in layers if self.trusts(layer) and _sys.getxattr_at(layer.fd, None, OVERRIDE_XATTR)
        }
        self.groups = {self.egid, *os.getgroups()}
        # fuse-overlayfs's squash_to_uid/squash_to_gid (squash_to_root: 0, 0): every object
        # shown with that owner, and a chown that fails is not an error (its do_fchown)
        self.squash_uid, self.squash_gid = squash
        self.squashing = squash != (None, None)
        self.on_presenting = on_presenting  # called once when presenting turns on at run time

    @property
    def presenting(self) -> bool:
        """Whether replies need more than the disk's uid/gid/mode."""
        return not self.identity or bool(self.override_layers) or self.squashing

    def trusts(self, layer: Layer) -> bool:
        """Whether the layer's overrides may be believed: its root belongs to root or to the
        server's own user. Whoever owns a layer can write any override into it (a file of
        theirs shown as a set-uid root one): a server honours only its own and root's."""
        return os.fstat(layer.fd).st_uid in (0, self.euid)

    def honours(self, layer: Layer) -> bool:
        return layer.index in self.override_layers

    # --- reading ---------------------------------------------------------------------------------

    def read_override(self, path: bytes, follow: bool) -> tuple[int, int, int] | None:
        try:
            path, follow = _target(path, follow)
            return decode_override(os.getxattr(path, OVERRIDE_XATTR, follow_symlinks=follow))
        except OSError:
            return None  # absent, unsupported, unreadable, or gone: the disk owner stands

    def stored(self, path: bytes, follow: bool, st: os.stat_result, layer: Layer | None) -> tuple[int, int, int]:
        """(uid, gid, mode) stored for the object at *path* in *layer* (whose lstat is *st*)."""
        if layer is not None and self.honours(layer) and carries_override(st.st_mode):
            ov = self.read_override(path, follow)
            if ov is not None:
                return ov[0], ov[1], stat.S_IFMT(st.st_mode) | ov[2]
        return st.st_uid, st.st_gid, st.st_mode

    def presented(
        self, path: bytes | None, follow: bool, st: os.stat_result, layer: Layer | None
    ) -> tuple[int, int, int]:
        """(uid, gid, mode) a reply shows (*path* None: no override is looked for)."""
        if path is None:
            uid, gid, mode = st.st_uid, st.st_gid, st.st_mode
        else:
            uid, gid, mode = self.stored(path, follow, st, layer)
        if self.squashing:
            return (
                self.uids.present(uid) if self.squash_uid is None else self.squash_uid,
                self.gids.present(gid) if self.squash_gid is None else self.squash_gid,
                mode,
            )
        return self.uids.present(uid), self.gids.present(gid), mode

    def store_ids(self, uid: int | None, gid: int | None) -> tuple[int | None, int | None]:
        """Presented ids of a request -> stored ids (None stays None); EINVAL when unmapped."""
        su = self.uids.store(uid) if uid is not None else None
        sg = self.gids.store(gid) if gid is not None else None
        if (uid is not None and su is None) or (gid is not None and sg is None):
            raise OSError(errno.EINVAL, "id not mapped by the mount's uidmap/gidmap")
        return su, sg

    # --- writing ---------------------------------------------------------------------------------

    def _can_chown(self, uid: int, gid: int) -> bool:
        return self.euid == 0 or (uid == self.euid and gid in self.groups)

    def set_owner(
        self,
        path: bytes,
        follow: bool,
        uid: int | None,
        gid: int | None,
        fresh: bool = False,
        st: os.stat_result | None = None,
    ) -> None:
        """Give the upper object at *path* (whose stat is *st*, if the caller has it) the
        stored owner (uid, gid) (None: keep that one).

        chown when the server can (then any override goes); otherwise the disk owner stays
        the server's and the override records the owner. A chown(2) through the mount is
        always passed on, even to the same owner: the kernel updates ctime and drops set-id
        bits then too. *fresh*: a new object (it has no override yet, a chown to the owner
        it has is skipped, and chown must not drop the set-id bits its creator chose).
        Squashing, a failure is ignored (fuse-overlayfs: the owners shown are the squash's)."""
        if self.squashing:
            try:
                self._set_owner(path, follow, uid, gid, fresh, st)
            except OSError:
                pass
            return
        self._set_owner(path, follow, uid, gid, fresh, st)

    def _set_owner(
        self,
        path: bytes,
        follow: bool,
        uid: int | None,
        gid: int | None,
        fresh: bool,
        st: os.stat_result | None,
    ) -> None:
        path, follow = _target(path, follow)
        if st is None:
            st = os.stat(path, follow_symlinks=follow)
        ov = None if fresh or not self.upper_honours() else self.read_override(path, follow)
        cur_uid, cur_gid, perm = ov if ov is not None else (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        uid = cur_uid if uid is None else uid
        gid = cur_gid if gid is None else gid
        if self._can_chown(uid, gid):
            try:
                chowned = not fresh or (st.st_uid, st.st_gid) != (uid, gid)
                if chowned:
                    os.chown(path, uid, gid, follow_symlinks=follow)
                if ov is not None:
                    os.removexattr(path, OVERRIDE_XATTR, follow_symlinks=follow)
                if not stat.S_ISLNK(st.st_mode) and (
                    perm != stat.S_IMODE(st.st_mode) or (chowned and fresh and perm & (stat.S_ISUID | stat.S_ISGID))
                ):
                    os.chmod(path, perm, follow_symlinks=follow)
                return
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EINVAL):  # EINVAL: an id our user namespace lacks
                    raise
        if ov is None and (st.st_uid, st.st_gid) == (uid, gid):
            return
        if not carries_override(st.st_mode):
            return  # a symlink or special file cannot carry a user.* xattr: it keeps its disk owner
        self.mark_upper()
        os.setxattr(path, OVERRIDE_XATTR, encode_override(uid, gid, perm), follow_symlinks=follow)

    def after_chmod(self, path: bytes, follow: bool, mode: int) -> None:
        """Keep an override's mode in step with a chmod of the disk inode."""
        if not self.upper_honours():
            return
        path, follow = _target(path, follow)
        ov = self.read_override(path, follow)
        if ov is not None and ov[2] != stat.S_IMODE(mode):
            os.setxattr(path, OVERRIDE_XATTR, encode_override(ov[0], ov[1], mode), follow_symlinks=follow)

    def upper_honours(self) -> bool:
        return self.upper is not None and self.honours(self.upper)

    def mark_upper(self) -> None:
        """Make the upper layer honour overrides: its root records its own (disk) owner."""
        if self.upper is None or self.upper_honours():
            return
        if not self.trusts(self.upper):  # a later mount would not believe it either
            raise OSError(errno.EPERM, "the upper belongs to another user: its overrides are not honoured")
        root = _sys.proc_path(self.upper.fd)
        st = os.stat(root)
        if _sys.getxattr_at(self.upper.fd, None, OVERRIDE_XATTR) is None:
            os.setxattr(root, OVERRIDE_XATTR, encode_override(st.st_uid, st.st_gid, st.st_mode))
        was = self.presenting
        self.override_layers.add(self.upper.index)
        if not was and self.on_presenting is not None:
            self.on_presenting()
