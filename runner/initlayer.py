"""The init layer: mount points the image lacks, supplied without touching the upper layer.

A container needs ``/proc``, ``/dev``, ``/sys``, ``/etc/hostname``, ``/etc/hosts``,
``/etc/resolv.conf`` and every volume target to exist before it can mount on them.
Creating them through the merged mount would write into the upper layer (and show up
in ``pyoverlay diff`` and the trace). Docker's answer is an extra read-only layer
between the image and the container layer (``<id>-init``); this is ours: it becomes
the top lower layer of the container's mount.

The image is read through :class:`overlayfs_py.layers.LayerStack`, so its whiteouts,
opaque directories and redirects count and no symlink in a layer is ever followed.
Only what is missing is created. A directory that exists in the image but must hold
a new mount point is created here with the image's mode, owner and times, so the
merged view of it is unchanged.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from overlayfs_py.layers import LayerStack
from overlayfs_py.whiteout import XattrNames

from .errors import RunnerError

#: What every container mounts on (kind "dir" or "file").
BASE_MOUNTPOINTS = (
    ("proc", "dir"),
    ("dev", "dir"),
    ("sys", "dir"),
    ("etc/hostname", "file"),
    ("etc/hosts", "file"),
    ("etc/resolv.conf", "file"),
)


class InitLayerError(RunnerError):
    pass


@dataclass(frozen=True)
class Needed:
    path: str  # relative to the root, no leading slash
    kind: str  # "dir" | "file"
    required: bool  # False: skip quietly when the image blocks it (e.g. /etc is a file)


def _lookup(stack: LayerStack, path: str):
    """Walk *path* in the merged view. Returns (stats of each existing component,
    index of the first missing one or None, blocked) where *blocked* means a
    component that must be a directory is something else (a symlink, a file)."""
    parents = [(stack.layers[0], b"")] if stack.upper else []
    parents += [(layer, b"") for layer in stack.root_lowers]
    found: list[os.stat_result] = []
    comps = path.split("/")
    for i, name in enumerate(comps):
        hits = stack.resolve(parents, os.fsencode(name))
        if not hits:
            return found, i, False
        found.append(hits[0].st)
        if i < len(comps) - 1 and not stat.S_ISDIR(hits[0].st.st_mode):
            return found, None, True
        parents = [(h.layer, h.path) for h in hits]
    return found, None, False


@dataclass(frozen=True)
class InitPlan:
    """What the init layer must hold, found by reading the image (nothing created yet)."""

    usable: tuple[str, ...]  # paths of the Needed that exist or will be created
    todo: tuple[tuple[Needed, tuple[os.stat_result, ...], int], ...]  # (need, found, first missing)

    def create(self, init_dir: str, new_owner: tuple[int, int] | None = None) -> None:
        """Create *init_dir* with what :attr:`todo` lists.

        Rootless (*new_owner* given: the stored owner of what the image lacks, the one the
        container sees as root): an owner the user cannot ``chown`` to is recorded in the
        override xattr (``user.containers.override_stat``) the server reads."""
        os.makedirs(init_dir, mode=0o755, exist_ok=True)
        root_fd = os.open(init_dir, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for need, found, missing in self.todo:
                _create(root_fd, need, list(found), missing, new_owner)
        finally:
            os.close(root_fd)


def plan(layers: tuple[str, ...], upper: str | None, userxattr: bool, needed: list[Needed]) -> InitPlan:
    """Look up *needed* in the merged view of *layers* (+ *upper*, an existing one) and
    say what is missing; InitLayerError when a required path cannot be provided (a parent
    in the image is not a directory). Reads only."""
    stack = LayerStack(layers, upper, XattrNames.for_userxattr(userxattr))
    usable, todo = [], []
    try:
        for need in needed:
            found, missing, blocked = _lookup(stack, need.path)
            if blocked:
                if need.required:
                    raise InitLayerError(f"cannot mount on /{need.path}: a parent in the image is not a directory")
                continue
            usable.append(need.path)
            if missing is not None:
                todo.append((need, tuple(found), missing))
    finally:
        stack.close()
    return InitPlan(tuple(usable), tuple(todo))


#: the most of an image file :func:`read_files` reads (an /etc/passwd is far smaller)
READ_LIMIT = 4 << 20


def read_files(layers: tuple[str, ...], upper: str | None, userxattr: bool, paths: list[str]) -> dict[str, str | None]:
    """The text of each of *paths* (relative, e.g. ``etc/passwd``) in the merged view of
    *layers* (+ *upper*): "" when it does not exist, None when it cannot be told without
    the container (a symlink, not a regular file, too big, unreadable). Reads only; a
    symlink is never followed."""
    from overlayfs_py import _sys

    stack = LayerStack(layers, upper, XattrNames.for_userxattr(userxattr))
    out: dict[str, str | None] = {}
    try:
        for path in paths:
            parents = [(stack.layers[0], b"")] if stack.upper else []
            parents += [(layer, b"") for layer in stack.root_lowers]
            comps = path.split("/")
            text: str | None = ""
            for i, name in enumerate(comps):
                hits = stack.resolve(parents, os.fsencode(name))
                if not hits:
                    break  # missing: read as empty, as PID 1 does
                last = i == len(comps) - 1
                if not last:
                    if not stat.S_ISDIR(hits[0].st.st_mode):
                        text = None if stat.S_ISLNK(hits[0].st.st_mode) else ""
                        break
                    parents = [(h.layer, h.path) for h in hits]
                    continue
                hit = hits[0]
                if not stat.S_ISREG(hit.st.st_mode) or hit.st.st_size > READ_LIMIT:
                    text = None
                    break
                try:
                    fd = _sys.openat2(
                        hit.layer.fd,
                        hit.path,
                        os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0,
                        _sys.RESOLVE_NO_SYMLINKS | _sys.RESOLVE_BENEATH,
                    )
                    with open(fd, "rb") as f:
                        text = f.read(READ_LIMIT).decode(errors="replace")
                except OSError:
                    text = None
            out[path] = text
    finally:
        stack.close()
    return out


def build(
    init_dir: str,
    layers: tuple[str, ...],
    upper: str | None,
    userxattr: bool,
    needed: list[Needed],
    new_owner: tuple[int, int] | None = None,
) -> list[str]:
    """:func:`plan` then :meth:`InitPlan.create`: create *init_dir* with what *needed*
    lacks in the merged view of *layers* (+ *upper*). Returns the paths of *needed* that
    could be provided or already exist."""
    p = plan(layers, upper, userxattr, needed)
    p.create(init_dir, new_owner)
    return list(p.usable)


def _own(root_fd: int, dfd: int, name: str, uid: int, gid: int, mode: int) -> None:
    """chown, or (rootless, not permitted) the override xattr with the intended owner. A
    layer honours overrides when its root carries one too (fuse-overlayfs's rule): the
    root then records its own disk owner, as the server marks an upper layer."""
    try:
        os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
        return
    except PermissionError:
        st = os.lstat(name, dir_fd=dfd)
        if (st.st_uid, st.st_gid) == (uid, gid):
            return
    from overlayfs_py.idmap import OVERRIDE_XATTR, encode_override

    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        os.setxattr(fd, OVERRIDE_XATTR, encode_override(uid, gid, mode))
    finally:
        os.close(fd)
    try:
        os.getxattr(root_fd, OVERRIDE_XATTR)
    except OSError:
        rst = os.fstat(root_fd)
        os.setxattr(root_fd, OVERRIDE_XATTR, encode_override(rst.st_uid, rst.st_gid, rst.st_mode))


def _create(
    root_fd: int, need: Needed, found: list[os.stat_result], missing: int, new_owner: tuple[int, int] | None = None
) -> None:
    comps = need.path.split("/")
    dfd = os.dup(root_fd)
    try:
        for i, name in enumerate(comps):
            last = i == len(comps) - 1
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                st = None
            if st is None:
                if last and need.kind == "file":
                    fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dfd)
                    os.close(fd)
                else:
                    os.mkdir(name, 0o755, dir_fd=dfd)
                if i < missing:  # exists in the image: look the same as it does there
                    img = found[i]
                    _own(root_fd, dfd, name, img.st_uid, img.st_gid, img.st_mode)
                    os.chmod(name, stat.S_IMODE(img.st_mode), dir_fd=dfd)
                elif new_owner is not None:
                    mode = 0o644 if last and need.kind == "file" else 0o755
                    _own(root_fd, dfd, name, *new_owner, mode)
            if last:
                break
            nfd = os.open(name, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
    finally:
        os.close(dfd)
    # times last (creating children changed them), deepest first
    for i in range(min(missing, len(comps)) - 1, -1, -1):
        img = found[i]
        os.utime("/".join(comps[: i + 1]), ns=(img.st_atime_ns, img.st_mtime_ns), dir_fd=root_fd, follow_symlinks=False)
