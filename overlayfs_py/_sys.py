"""The syscall edge: every call that touches a layer directory goes through here.

Paths inside a layer are *never* resolved by following symlinks. A directory is
reached with ``openat2(2)`` and ``RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH |
RESOLVE_NO_XDEV`` relative to the layer's root fd, and the last component is
always handled with ``AT_SYMLINK_NOFOLLOW`` / ``O_NOFOLLOW``. A layer is
untrusted input: a symlink in it is data to return, not a path to walk.

Functions raise plain :class:`OSError`; callers decide what an errno means.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from . import _syscalls

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_openat2 = _syscalls.number("openat2")
SYS_renameat2 = _syscalls.number("renameat2")

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

O_PATH = getattr(os, "O_PATH", 0o10000000)
DIR_FLAGS = O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RESOLVE = RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: bytes, flags: int, mode: int = 0, resolve: int = _RESOLVE) -> int:
    """``openat2(2)``: open *path* beneath *dir_fd* without following any symlink."""
    how = _OpenHow(flags, mode, resolve)
    while True:
        fd = _libc.syscall(SYS_openat2, dir_fd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR and err != errno.EAGAIN:
            raise OSError(err, os.strerror(err), os.fsdecode(path))


def open_dir(dir_fd: int, relpath: bytes) -> int:
    """An ``O_PATH`` fd for the directory *relpath* (b"" is *dir_fd* itself) inside a layer."""
    return openat2(dir_fd, relpath or b".", DIR_FLAGS)


def open_beneath(dir_fd: int, relpath: bytes, flags: int, mode: int = 0) -> int:
    """Open a file beneath *dir_fd*, never following a symlink on the way or at the end."""
    return openat2(dir_fd, relpath, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


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
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


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


def raise_nofile_limit() -> None:
    """Use the hard RLIMIT_NOFILE: a server caches directory fds."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


PR_SET_PDEATHSIG = 1


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """``prctl(2)`` with integer arguments; OSError on failure."""
    res = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                      ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
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
            try:
                os.close(fd)
            except OSError:
                pass


# --- fd-only operations on one object (copy-up temporaries, the workdir) -----------------

O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utime_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """``utimensat(fd, "", times, AT_EMPTY_PATH)``: the times of the object *fd* refers to
    (an O_PATH fd too, a symlink's included; None leaves that time as it is)."""
    def ts(ns):
        return _Timespec(0, UTIME_OMIT) if ns is None else _Timespec(*divmod(ns, 1_000_000_000))
    times = (_Timespec * 2)(ts(atime_ns), ts(mtime_ns))
    if _libc.utimensat(fd, b"", times, AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def chmod_fd(fd: int, mode: int) -> None:
    """chmod of the object *fd* refers to (O_PATH fds too: through its magic link, which
    leads to the fd's own inode whatever its name is now). Not for symlinks."""
    os.chmod(proc_path(fd), mode)


def reopen(fd: int, flags: int) -> int:
    """A new open file description of the object an (O_PATH) fd refers to, through its magic
    link: the same inode, never a name looked up again."""
    return os.open(proc_path(fd), flags | os.O_CLOEXEC)


def link_fd(fd: int, new_dir: int, new_name: bytes) -> None:
    """Give the object *fd* refers to (an O_TMPFILE file) the name *new_name* in *new_dir*:
    ``linkat(AT_FDCWD, "/proc/self/fd/N", new_dir, new_name, AT_SYMLINK_FOLLOW)``, as open(2)
    shows for O_TMPFILE (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH). Fails with EEXIST
    when the name exists (never replaces)."""
    os.link(proc_path(fd), new_name, dst_dir_fd=new_dir, follow_symlinks=True)


def remove_tree_at(dir_fd: int, name: bytes) -> None:
    """Remove *name* in *dir_fd* and, for a directory, everything below it, without following
    a symlink and without opening anything but directories (O_PATH), so a FIFO or device
    planted in the tree is only unlinked."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not (st.st_mode & 0o170000 == 0o040000):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = openat2(dir_fd, name, DIR_FLAGS)
    try:
        for child, _kind in listdir_fd(fd):
            remove_tree_at(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def readlink_fd(fd: int) -> bytes:
    """The target of the symlink an ``O_PATH | O_NOFOLLOW`` fd refers to:
    ``readlinkat(fd, "")`` (the magic link's own readlink would give its path instead)."""
    return os.readlink(b"", dir_fd=fd)
