"""The workdir and its ``work/`` directory, held by fds the server has checked.

``work/`` is where objects are built before they get their real name in the upper layer
(copy-up, whiteouts, a create over a whiteout). Whoever can change entries of ``work/``
while the server works there can make the server act on something else: so ``work/`` and
the workdir must be the server's own, as the kernel's are (it creates ``work/`` with the
mounter's credentials). ``WorkDir.prepare`` refuses anything else with one line, checking
the opened fds (fstat), never a path looked up again; from then on both are used only
through those fds.

``Work`` owns ``work/`` for every user of it (the copy-up and the write path alike):
temporary names, creating a temporary and checking that the fd it then uses is what was
created, installing it (``renameat2`` with ``RENAME_NOREPLACE``, or ``linkat`` of an
``O_TMPFILE`` file, which has no name in ``work/`` at all, as the kernel's
``ovl_copy_up_tmpfile``), swapping a new object with a whiteout (``RENAME_EXCHANGE``),
putting a whiteout in place of a removed name, and discarding a temporary by a name
checked against the object's identity. ``WorkDir.work()`` hands one out.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Callable

from . import _sys
from .errors import PyoverlayError
from .whiteout import make_whiteout

WORK_SUBDIR = b"work"  # like the kernel: <workdir>/work holds objects being built
VOLATILE = b"incompat/volatile"  # in work/: made by a volatile mount, refused by any later one


class WorkdirError(PyoverlayError):
    """A workdir the server must not use (one line)."""


def _open_dir_nofollow(dir_fd: int, name: bytes, what: str, shown: str) -> int:
    """An O_PATH fd of the directory *name* in *dir_fd* (the last component is not followed)."""
    try:
        fd = os.open(name, _sys.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise WorkdirError(f"{what} '{shown}' does not exist") from None
    except OSError as exc:
        raise WorkdirError(f"cannot open {what} '{shown}': {exc.strerror}") from None
    st = os.fstat(fd)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise WorkdirError(
            f"{what} '{shown}' is {kind}: give a directory"
            + (" (remove it, the mount makes it)" if what == "work dir" else "")
        )
    return fd


def _check_owner(fd: int, what: str, shown: str) -> None:
    st = os.fstat(fd)
    euid = os.geteuid()
    if st.st_uid != euid:
        raise WorkdirError(
            f"{what} '{shown}' belongs to uid {st.st_uid}, not to the mounting user (uid {euid}):"
            " only the mounter may write in it; give a workdir the mounting user owns"
            " (the upper layer may stay another user's)"
        )


class WorkDir:
    """``<workdir>`` (``fd``) and ``<workdir>/work`` (``work_fd``), both O_PATH, both checked
    to be directories owned by the server's effective user."""

    def __init__(self, path: str, fd: int, work_fd: int) -> None:
        self.path = path
        self.fd = fd
        self.work_fd = work_fd
        self.index_fd = -1  # <workdir>/index with index=on (index.prepare), else -1

    @classmethod
    def prepare(cls, path: str, *, volatile: bool = False) -> WorkDir:
        """Open (creating if missing) the workdir and its ``work/``, refuse either if it is not
        the server's own directory (a symlink, not a directory, another user's), refuse a
        volatile marker, then empty ``work/`` of an interrupted mount's leftovers (the kernel
        does the same) and, with *volatile*, leave the kernel's marker."""
        # mode 000 like the kernel's; a server without root needs access itself: 0700
        work_mode = 0o000 if os.geteuid() == 0 else 0o700
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise WorkdirError(f"cannot create workdir '{path}': {exc.strerror}") from None
        wfd = _open_dir_nofollow(_AT_FDCWD, os.fsencode(path), "workdir", path)
        work = os.path.join(path, os.fsdecode(WORK_SUBDIR))
        try:
            _check_owner(wfd, "workdir", path)
            with contextlib.suppress(FileExistsError):
                os.mkdir(WORK_SUBDIR, work_mode, dir_fd=wfd)
            kfd = _open_dir_nofollow(wfd, WORK_SUBDIR, "work dir", work)
        except BaseException:
            os.close(wfd)
            raise
        try:
            _check_owner(kfd, "work dir", work)
            try:
                _sys.openat2(
                    kfd,
                    VOLATILE,
                    _sys.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                    resolve=_sys.RESOLVE_NO_SYMLINKS | _sys.RESOLVE_BENEATH,
                )
                marked = True
            except FileNotFoundError:
                marked = False
            except OSError:
                marked = True  # something is there (a symlink, a file as a directory)
            if marked:
                # the kernel refuses it too ("overlay with incompat feature 'volatile' cannot be
                # mounted"): after a volatile mount the upper may be incomplete
                raise WorkdirError(
                    f"{work}/{VOLATILE.decode()} exists: the upper was used by a 'volatile'"
                    f" mount and may be incomplete after a crash; remove {work}/incompat"
                    " to mount it anyway"
                )
            _sys.fchmod_fd(kfd, work_mode)
            for name, _kind in _sys.listdir_fd(kfd):
                _sys.remove_tree_at(kfd, name)
            if volatile:  # the kernel's marker, so that no later mount trusts this upper blindly
                _make_marker(kfd, work_mode)
        except BaseException:
            os.close(kfd)
            os.close(wfd)
            raise
        return cls(path, wfd, kfd)

    def work(self) -> Work:
        """A ``Work`` on its own dup of the ``work/`` fd (the overlay outlives this object,
        which the server closes once mounted); ``Work.close`` closes it. With ``index=on``
        the index dir is that directory, as the kernel's (ovl_get_indexdir: "index dir will
        act also as workdir"): temporaries and whiteouts are made in ``index/`` under
        ``#`` names, which the index cleanup at mount (the kernel's or pyoverlay's)
        removes after a crash."""
        return Work(os.dup(self.index_fd if self.index_fd >= 0 else self.work_fd))

    def close(self) -> None:
        for fd in (self.work_fd, self.fd, self.index_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.index_fd = -1


_AT_FDCWD = -100


def _make_marker(work_fd: int, mode: int) -> None:
    """``work/incompat/volatile/dirty``, every step relative to the fd made just before."""
    fd = work_fd
    opened = []
    try:
        for part in VOLATILE.split(b"/"):
            os.mkdir(part, mode, dir_fd=fd)
            fd = _sys.openat2(fd, part, _sys.DIR_FLAGS)
            opened.append(fd)
        os.close(
            os.open(
                b"dirty", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o600, dir_fd=fd
            )
        )
    finally:
        for o in opened:
            os.close(o)


class Replaced(OSError):
    """A temporary in work/ is not the object the server made (never expected: work/ is the
    server's own)."""


class Work:
    """``work/`` (an O_PATH fd this object owns: ``close`` closes it)."""

    def __init__(self, work_fd: int) -> None:
        self.fd = work_fd
        self._seq = itertools.count(1)
        self.tmpfile_ok = True  # O_TMPFILE until the upper's filesystem refuses it

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def tmpname(self) -> bytes:
        return b"#%x" % next(self._seq)

    def make(self, make: Callable[[int, bytes], None]) -> bytes:
        """A new object built by ``make(work fd, name)`` under a fresh name; returns the name."""
        name = self.tmpname()
        make(self.fd, name)
        return name

    def swap_with_whiteout(self, name: bytes, new_dir: int, new_name: bytes) -> None:
        """Put work/<name> in place of the whiteout *new_name* in *new_dir* atomically
        (``RENAME_EXCHANGE``), then drop the whiteout, which the exchange left in work/.
        On failure work/<name> is discarded."""
        try:
            _sys.renameat2(self.fd, name, new_dir, new_name, _sys.RENAME_EXCHANGE)
        except BaseException:
            self.discard(name)
            raise
        if not stat.S_ISDIR(_sys.lstat_at(self.fd, name).st_mode):  # the whiteout (checked by the caller)
            os.unlink(name, dir_fd=self.fd)

    def whiteout(self, new_dir: int, new_name: bytes, replace: bool) -> bytes | None:
        """Put a whiteout at *new_name* in *new_dir*, made in work/ and renamed into place:
        over nothing (``RENAME_NOREPLACE``), or (*replace*) in exchange for the upper object
        there, which is then left in work/ under the returned name for the caller to remove."""
        name = self.tmpname()
        make_whiteout(self.fd, name)
        try:
            flags = _sys.RENAME_EXCHANGE if replace else _sys.RENAME_NOREPLACE
            _sys.renameat2(self.fd, name, new_dir, new_name, flags)
        except BaseException:
            self.discard(name)
            raise
        return name if replace else None

    def tmpfile(self) -> int | None:
        """An unnamed regular file (O_TMPFILE, mode 0600, O_RDWR) on the upper's filesystem,
        or None where the filesystem has no O_TMPFILE."""
        if not self.tmpfile_ok:
            return None
        try:
            return os.open(b".", _sys.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self.tmpfile_ok = False
            return None

    def create_file(self) -> tuple[bytes, int]:
        """A new named regular file in work/: (name, O_RDWR fd). O_CREAT|O_EXCL: the fd is the
        file this call made (no symlink is followed, nothing existing is opened)."""
        name = self.tmpname()
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        return name, fd

    def create(self, st: os.stat_result, target: bytes | None = None) -> tuple[bytes, int, os.stat_result]:
        """A new directory, symlink (to *target*) or special file of *st*'s type in work/:
        (name, O_PATH fd, its fstat). The fd is opened without following and checked to be
        what was made (type, owner, link count, device, symlink target) before any use."""
        name = self.tmpname()
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=self.fd)
        elif fmt == stat.S_IFLNK:
            if target is None:
                raise ValueError("a symlink needs its target")
            os.symlink(target, name, dir_fd=self.fd)
        else:  # fifo, socket, char or block device: the same type, no data
            os.mknod(name, fmt | 0o600, st.st_rdev, dir_fd=self.fd)
        try:
            fd = _sys.open_beneath(self.fd, name, _sys.O_PATH)
        except BaseException:
            self.discard(name)
            raise
        try:
            tst = os.fstat(fd)
            ok = (
                stat.S_IFMT(tst.st_mode) == fmt
                and tst.st_uid == os.geteuid()
                and tst.st_nlink == (2 if fmt == stat.S_IFDIR else 1)
                and (fmt not in (stat.S_IFCHR, stat.S_IFBLK) or tst.st_rdev == st.st_rdev)
                and (fmt != stat.S_IFLNK or _sys.readlink_fd(fd) == target)
            )
            if not ok:
                raise Replaced(errno.EIO, "a copy-up temporary was replaced", os.fsdecode(name))
        except BaseException:
            os.close(fd)
            raise
        return name, fd, tst

    def install(self, name: bytes | None, fd: int, new_dir: int, new_name: bytes) -> None:
        """Give the temporary its real name *new_name* in *new_dir*, never replacing anything
        there (EEXIST): ``renameat2(RENAME_NOREPLACE)`` of work/<name>, or ``linkat`` of an
        unnamed file (*name* None). On failure the temporary is gone (the caller closes *fd*)."""
        try:
            if name is None:
                _sys.link_fd(fd, new_dir, new_name)
            else:
                # the name must still be the object the server built (never expected otherwise:
                # work/ is the server's own; this keeps a swapped entry out of the upper)
                cur, st = _sys.lstat_at(self.fd, name), os.fstat(fd)
                if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                    raise Replaced(errno.EIO, "a copy-up temporary was replaced", os.fsdecode(name))
                _sys.renameat2(self.fd, name, new_dir, new_name, _sys.RENAME_NOREPLACE)
        except BaseException:
            if name is not None:
                self.discard(name, os.fstat(fd))
            raise
        if name is not None:
            # and what now has the real name is that object (else a swap won the race between
            # the check and the rename: fail rather than call a stranger's object ours)
            cur = _sys.lstat_at(new_dir, new_name)
            if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                raise Replaced(errno.EIO, "a copy-up temporary was replaced", os.fsdecode(new_name))

    def discard(self, name: bytes, st: os.stat_result | None = None) -> None:
        """Remove the temporary work/<name> (if *st* is given: only if the name is still that
        object; a directory must be empty, as one the caller made). The name is not followed."""
        try:
            cur = _sys.lstat_at(self.fd, name)
        except FileNotFoundError:
            return
        if st is not None and (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
            return
        if stat.S_ISDIR(cur.st_mode):
            os.rmdir(name, dir_fd=self.fd)
        else:
            os.unlink(name, dir_fd=self.fd)
