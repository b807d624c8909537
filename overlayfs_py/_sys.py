"""The syscall edge: every call that touches a layer directory goes through here.

Paths inside a layer are *never* resolved by following symlinks. A directory is
reached with ``openat2(2)`` and ``RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH |
RESOLVE_NO_XDEV`` relative to the layer's root fd, and the last component is
always handled with ``AT_SYMLINK_NOFOLLOW`` / ``O_NOFOLLOW``. A layer is
untrusted input: a symlink in it is data to return, not a path to walk.

A tree may be deeper than one path walk can go (PATH_MAX, 4096 bytes with the NUL): a
longer path is walked in pieces, each one openat2 call under the same rules from the
directory the piece before reached (``openat2`` below), so depth has no limit.

Functions raise plain :class:`OSError`; callers decide what an errno means.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterable

from . import _syscalls

# the process's own symbols (libc among them): ctypes.util.find_library would run
# ``ldconfig -p`` at import, a few ms on every start (docs/performance.md, Startup)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_openat2 = _syscalls.number("openat2")
SYS_renameat2 = _syscalls.number("renameat2")
SYS_open_tree = _syscalls.number("open_tree")
SYS_mount_setattr = _syscalls.number("mount_setattr")
SYS_getdents64 = _syscalls.number("getdents64")

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

O_PATH = getattr(os, "O_PATH", 0o10000000)
DIR_FLAGS = O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RESOLVE_IN_ROOT = 0x10
_RESOLVE = RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS
_PIECEWISE = RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH  # a walk that may be cut at any "/"

PATH_MAX = 4096  # the kernel's limit for one path argument, the NUL included


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: bytes, flags: int, mode: int = 0, resolve: int = _RESOLVE) -> int:
    """``openat2(2)``: open *path* beneath *dir_fd* without following any symlink.

    A *path* of PATH_MAX bytes or more (a deep tree) is opened piece by piece when the
    walk follows no symlink and stays beneath its start (*resolve* has RESOLVE_BENEATH and
    RESOLVE_NO_SYMLINKS): the same walk, component for component, in calls the kernel
    accepts. Otherwise the kernel's ENAMETOOLONG stands."""
    if len(path) >= PATH_MAX and resolve & _PIECEWISE == _PIECEWISE and not resolve & RESOLVE_IN_ROOT:
        return _openat2_pieces(dir_fd, path, flags, mode, resolve)
    how = _OpenHow(flags, mode, resolve)
    while True:
        fd = _libc.syscall(SYS_openat2, dir_fd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR and err != errno.EAGAIN:
            raise OSError(err, os.strerror(err), os.fsdecode(path))


def path_pieces(path: bytes, limit: int = PATH_MAX - 1) -> list[bytes]:
    """*path* cut at "/" into pieces of at most *limit* bytes (a single component longer
    than that stays whole: the kernel answers ENAMETOOLONG for it)."""
    pieces = []
    start, n = 0, len(path)
    while n - start > limit:
        cut = path.rfind(b"/", start + 1, start + limit + 1)
        if cut < 0:
            cut = path.find(b"/", start + limit + 1)
            if cut < 0:
                break
        pieces.append(path[start:cut])
        start = cut + 1
    pieces.append(path[start:])
    return pieces


def _openat2_pieces(dir_fd: int, path: bytes, flags: int, mode: int, resolve: int) -> int:
    """``openat2`` of a path too long for one call: every piece but the last opened as a
    directory (O_PATH, O_NOFOLLOW) under *resolve*, from the fd the piece before gave."""
    pieces = path_pieces(path)
    fd, owned = dir_fd, -1
    try:
        for piece in pieces[:-1]:
            nfd = openat2(fd, piece, DIR_FLAGS, 0, resolve)
            if owned >= 0:
                os.close(owned)
            fd = owned = nfd
        return openat2(fd, pieces[-1], flags, mode, resolve)
    finally:
        if owned >= 0:
            os.close(owned)


def open_dir(dir_fd: int, relpath: bytes) -> int:
    """An ``O_PATH`` fd for the directory *relpath* (b"" is *dir_fd* itself) inside a layer."""
    return openat2(dir_fd, relpath or b".", DIR_FLAGS)


def open_beneath(dir_fd: int, relpath: bytes, flags: int, mode: int = 0) -> int:
    """Open a file beneath *dir_fd*, never following a symlink on the way or at the end."""
    return openat2(dir_fd, relpath, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def raw_dotdot_ino(dir_fd: int) -> int | None:
    """The ``d_ino`` the directory *dir_fd* (any fd, O_PATH too) lists for ``..``, as its
    filesystem's readdir gives it: at a mount root it is not the inode ``lstat("..")``
    reaches (that is the mountpoint's parent, on another filesystem). None: not found, or
    the directory cannot be read."""
    import struct

    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        buf = ctypes.create_string_buffer(32768)
        while True:
            n = _libc.syscall(SYS_getdents64, fd, buf, len(buf))
            if n <= 0:
                return None
            raw = buf.raw[:n]
            off = 0
            while off < n:
                d_ino, _off, reclen = struct.unpack_from("=QqH", raw, off)
                if raw[off + 19 : off + 22] == b"..\0":
                    return int(d_ino)
                off += reclen
    finally:
        os.close(fd)


def proc_path(fd: int, name: bytes | None = None) -> bytes:
    """``/proc/self/fd/N[/name]``: lets xattr calls reach an O_PATH fd (or a child of it)
    without a path walk through the layer. Only the magic link itself is followed."""
    p = b"/proc/self/fd/%d" % fd
    return p + b"/" + name if name else p


def _xpath(fd: int, name: bytes | None) -> tuple[bytes, bool]:
    # For the fd's own object the magic link must be followed; for a child it must not.
    return proc_path(fd, name), name is None


def getxattr_at(dir_fd: int, name: bytes | None, attr: str) -> bytes | None:
    """The xattr *attr* of *name* in *dir_fd* (or of the dir itself), or None if absent/unsupported."""
    try:
        p, follow = _xpath(dir_fd, name)
        return os.getxattr(p, attr, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
            return None
        raise


def listxattr_at(dir_fd: int, name: bytes | None) -> list[str]:
    try:
        p, follow = _xpath(dir_fd, name)
        return os.listxattr(p, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise


def readlink_at(dir_fd: int, name: bytes) -> bytes:
    return os.readlink(name, dir_fd=dir_fd)


def listdir_fd(dir_fd: int) -> list[tuple[bytes, int]]:
    """Names and d_type-derived ``S_IFMT`` bits (0 when unknown) of a directory given as an O_PATH fd."""
    fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        out = []
        with os.scandir(fd) as it:
            for e in it:
                name = os.fsencode(e.name)
                try:
                    if e.is_dir(follow_symlinks=False):
                        kind = 0o040000
                    elif e.is_symlink():
                        kind = 0o120000
                    elif e.is_file(follow_symlinks=False):
                        kind = 0o100000
                    else:
                        kind = 0
                except OSError:
                    kind = 0
                out.append((name, kind))
        return out
    finally:
        os.close(fd)


def renameat2(olddir: int, oldname: bytes, newdir: int, newname: bytes, flags: int = 0) -> None:
    while True:
        r = _libc.syscall(SYS_renameat2, olddir, oldname, newdir, newname, flags)
        if r == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err), os.fsdecode(newname))


# --- file handles (the kernel's trusted.overlay.origin encoding) ------------------------


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]


AT_EMPTY_PATH = 0x1000


def name_to_handle(fd: int) -> tuple[int, bytes] | None:
    """``name_to_handle_at(fd, "", AT_EMPTY_PATH)``: (handle_type, handle bytes), or None if the
    filesystem cannot encode file handles."""
    fh = _FileHandle()
    fh.handle_bytes = 128
    mount_id = ctypes.c_int()
    r = _libc.name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), AT_EMPTY_PATH)
    if r != 0:
        return None
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes) -> int:
    """``open_by_handle_at(mount_fd, handle, O_PATH)`` (needs CAP_DAC_READ_SEARCH)."""
    fh = _FileHandle()
    fh.handle_bytes = len(handle)
    fh.handle_type = handle_type
    ctypes.memmove(fh.f_handle, handle, len(handle))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), O_PATH | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def getxattr_raw(dir_fd: int, name: bytes | None, attr: str) -> bytes:
    p, follow = _xpath(dir_fd, name)
    return os.getxattr(p, attr, follow_symlinks=follow)


FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]})


def fs_uuid(fd: int) -> bytes | None:
    """The filesystem UUID the kernel uses for overlay origin records (16 bytes), if known."""
    import fcntl

    buf = bytearray(17)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf)
    except OSError:
        return None
    n = buf[0]
    return bytes(buf[1 : 1 + n]) if n else None


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE as far as this process may (every node holds an fd): the soft
    limit to the hard one, and as root the hard one to ``/proc/sys/fs/nr_open``. Returns
    the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
        if hard == resource.RLIM_INFINITY or nr_open > hard:
            want = nr_open  # only root (CAP_SYS_RESOURCE) may raise the hard limit
    except (OSError, ValueError):
        pass
    for target in ((want, want), (hard, hard)):
        if target[0] <= soft and target[1] <= hard:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


CAP_SYS_RESOURCE = 24


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def lower_effective_cap(cap: int) -> bool:
    """Take *cap* out of this thread's effective set (it stays permitted), as the kernel's
    overlay does with CAP_SYS_RESOURCE in the mounter's credentials it acts with ("never
    override disk quota limits or use reserved space"). Threads started later inherit it:
    call it before any. True if the capability was effective."""
    hdr = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capget: {os.strerror(e)}")
    word, bit = divmod(cap, 32)
    if not data[word].effective & (1 << bit):
        return False
    data[word].effective &= ~(1 << bit) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")
    return True


# --- a node's own fd ---------------------------------------------------------------------
# Every node holds an O_PATH|O_NOFOLLOW fd of the real object serving it; an operation on
# an existing object goes through that fd (an *at(fd, "", AT_EMPTY_PATH) call, or the
# /proc/self/fd/N magic link, whose following stops at the object itself: a symlink's
# fd reaches the symlink, never its target). A name is never resolved again for it.

AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
NODE_FLAGS = O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
UTIME_OMIT = (1 << 30) - 2

_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(r: int, what: bytes | str | None = None) -> None:
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(what) if what is not None else None)


def open_node(dir_fd: int, name: bytes) -> int:
    """The node fd of *name* (one component) in *dir_fd*: O_PATH, never following a symlink."""
    return os.open(name, NODE_FLAGS, dir_fd=dir_fd)


def reopen(fd: int, flags: int) -> int:
    """Open the very object of O_PATH *fd* (through its magic link: no name is looked up,
    so an object put at its name since is never reached). The caller has checked its type:
    a node fd of a regular file stays one."""
    return os.open(proc_path(fd), (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)) | os.O_CLOEXEC)


OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR__ATIME = 0x70


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def reopen_noatime(fd: int, flags: int) -> int:
    """``reopen`` through a private, detached bind mount of just that object mounted
    ``noatime``: reads through the file (and every file the kernel opens on its path, such
    as FUSE passthrough's backing files, which take the FUSE file's flags and not this
    file's ``O_NOATIME``) never touch its atime. Needs CAP_SYS_ADMIN; the mount goes away
    with the last file opened through it."""
    tree = _libc.syscall(SYS_open_tree, fd, b"", OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH)
    if tree < 0:
        _check(-1, "open_tree")
    try:
        attr = _MountAttr(MOUNT_ATTR_NOATIME, MOUNT_ATTR__ATIME, 0, 0)
        r = _libc.syscall(SYS_mount_setattr, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr))
        _check(int(r), "mount_setattr")
        return reopen(tree, flags)
    finally:
        os.close(tree)


def noatime_clone(dir_fd: int) -> int:
    """A private, detached clone of the mount at *dir_fd* (a layer root), mounted
    ``noatime``: an fd on its root (not O_PATH: ``open_by_handle_at`` wants a real file).
    Files opened through it by handle (``reopen_in``) never touch their atime. Needs
    CAP_SYS_ADMIN; the clone goes with the last file opened through it."""
    tree = _libc.syscall(SYS_open_tree, dir_fd, b"", OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH)
    if tree < 0:
        _check(-1, "open_tree")
    try:
        attr = _MountAttr(MOUNT_ATTR_NOATIME, MOUNT_ATTR__ATIME, 0, 0)
        r = _libc.syscall(SYS_mount_setattr, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr))
        _check(int(r), "mount_setattr")
        return reopen(tree, os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(tree)


def reopen_in(mount_fd: int, fd: int, flags: int) -> int:
    """The object of *fd* opened again through the mount of *mount_fd* (``noatime_clone``),
    by its file handle: no name is looked up. OSError (ESTALE) if the handle does not lead
    to that very object there (another filesystem below the layer root, say)."""
    handle = name_to_handle(fd)
    if handle is None:
        raise OSError(errno.EOPNOTSUPP, "no file handle")
    pfd = open_by_handle(mount_fd, *handle)
    try:
        a, b = os.fstat(pfd), os.fstat(fd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise OSError(errno.ESTALE, "the handle led to another object")
        return reopen(pfd, flags)
    finally:
        os.close(pfd)


def fchmod_fd(fd: int, mode: int) -> None:
    """chmod of the object of O_PATH *fd* (fchmod refuses O_PATH fds, fchmodat has no
    AT_EMPTY_PATH before fchmodat2): through the magic link, which stops at the object."""
    os.chmod(proc_path(fd), mode)


def futimens_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """``utimensat(fd, "", times, AT_EMPTY_PATH)``; None leaves that time alone."""

    def ts(ns):
        return _Timespec(0, UTIME_OMIT) if ns is None else _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)

    times = (_Timespec * 2)(ts(atime_ns), ts(mtime_ns))
    r = _libc.utimensat(fd, b"", times, AT_EMPTY_PATH)
    if r != 0 and ctypes.get_errno() == errno.EINVAL:  # a kernel before 5.8: the magic link
        cur = os.fstat(fd)
        os.utime(
            proc_path(fd),
            ns=(cur.st_atime_ns if atime_ns is None else atime_ns, cur.st_mtime_ns if mtime_ns is None else mtime_ns),
        )
        return
    _check(r)


def readlink_fd(fd: int) -> bytes:
    """``readlinkat(fd, "")`` of an O_PATH fd of a symlink."""
    return os.readlink(b"", dir_fd=fd)


def link_fd(fd: int, dir_fd: int, name: bytes) -> None:
    """A new name *name* in *dir_fd* for the object of *fd*: ``linkat`` of its magic link
    with AT_SYMLINK_FOLLOW (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH)."""
    _check(_libc.linkat(AT_FDCWD, proc_path(fd), dir_fd, name, AT_SYMLINK_FOLLOW), name)


def fd_xattr_path(fd: int) -> tuple[bytes, bool]:
    """(path, follow) for an xattr call on the object of O_PATH *fd* (the magic link)."""
    return proc_path(fd), True


PR_SET_PDEATHSIG = 1


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """``prctl(2)`` with integer arguments; OSError on failure."""
    res = _libc.prctl(
        ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)
    )
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl: {os.strerror(err)}")
    return res


def set_parent_death_signal(sig: int) -> None:
    """``PR_SET_PDEATHSIG``: *sig* is sent to this process when its parent (thread) dies."""
    prctl(PR_SET_PDEATHSIG, sig)


def close_fds_except(*keep: int | None) -> None:
    """Close every fd above stderr but *keep*: a forked process that will not exec
    (a server, an init) must not hold its parent's pipes open."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


# --- fd-only operations on one object (copy-up temporaries, the workdir) -----------------

O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


def remove_tree_at(dir_fd: int, name: bytes) -> None:
    """Remove *name* in *dir_fd* and, for a directory, everything below it, without following
    a symlink and without opening anything but directories (O_PATH), so a FIFO or device
    planted in the tree is only unlinked. Any depth: no recursion, one directory fd open at
    a time; going back up reopens the parent beneath *dir_fd* (``openat2``)."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    path = [name]  # the directory being emptied, from dir_fd
    fd = openat2(dir_fd, name, DIR_FLAGS)
    try:
        todo = [[child for child, _kind in listdir_fd(fd)]]  # names left, per level of path
        while True:
            if todo[-1]:
                child = todo[-1].pop()
                if stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                    nfd = openat2(fd, child, DIR_FLAGS)
                    os.close(fd)
                    fd = nfd
                    path.append(child)
                    todo.append([c for c, _kind in listdir_fd(fd)])
                else:
                    os.unlink(child, dir_fd=fd)
                continue
            os.close(fd)  # empty now: remove it from its parent
            fd = -1
            last = path.pop()
            todo.pop()
            if not path:
                os.rmdir(last, dir_fd=dir_fd)
                return
            fd = openat2(dir_fd, b"/".join(path), DIR_FLAGS)
            os.rmdir(last, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


# --- mounts (the direct FUSE engine's mount(2) and umount2(2)) ---------------------------

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_NOATIME = 1024
MNT_DETACH = 2

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """``mount(2)``; OSError (with *target*) on failure."""
    r = _libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype), flags, os.fsencode(data))
    _check(r, target)


def umount2(target: str, flags: int = 0) -> None:
    """``umount2(2)``; OSError (with *target*) on failure."""
    _check(_libc.umount2(os.fsencode(target), flags), target)


# --- data operations on an open file (fallocate, copy_file_range, lseek) ----------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
#: the modes passed on to the real file (the kernel's FUSE module sends only some of them)
FALLOC_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
FALLOC_MODES |= FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)

_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with any *mode* (``os.posix_fallocate`` knows only mode 0, and
    glibc's falls back to writing zeros where the file system says EOPNOTSUPP)."""
    if mode & ~FALLOC_MODES:
        raise OSError(errno.EOPNOTSUPP, "unsupported fallocate mode")
    while True:
        if _libc.fallocate(fd, mode, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def copy_range(src: int, off_in: int, dst: int, off_out: int, length: int) -> int:
    """``copy_file_range(2)`` between two open files at explicit offsets (their file
    positions untouched); the real files may sit on two file systems: where the kernel
    refuses (EXDEV, EOPNOTSUPP, EINVAL across types) the bytes are copied by hand."""
    try:
        return os.copy_file_range(src, dst, length, off_in, off_out)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    done = 0
    while done < length:
        chunk = os.pread(src, min(length - done, 1 << 20), off_in + done)
        if not chunk:
            break
        done += os.pwrite(dst, chunk, off_out + done)
    return done


class _SigSet(ctypes.Structure):
    _fields_ = [("val", ctypes.c_ulong * 16)]  # the C library's sigset_t: 1024 bits


def signalfd(signals: Iterable[int]) -> int:
    """``signalfd(2)``: an fd (non-blocking, close-on-exec) that is readable while one of
    *signals* is pending. The signals must be blocked; nothing needs to read the fd (a
    signal it reports stays pending for whoever takes it later)."""
    mask = _SigSet()
    for sig in signals:
        mask.val[(sig - 1) // 64] |= 1 << ((sig - 1) % 64)
    fd = _libc.signalfd(-1, ctypes.byref(mask), os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "signalfd")
    return fd
