"""The FUSE wire protocol (``include/uapi/linux/fuse.h``), as ``struct`` layouts.

Only what the engine uses; names follow the header (without the ``fuse_`` prefix).
Every layout is native byte order, as the kernel writes them.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
#: the highest minor this module knows the structures of (the reply's minor is the
#: lower of this and the kernel's)
KERNEL_MINOR_VERSION = 40
ROOT_ID = 1

# --- opcodes ----------------------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SYNCFS = 50
TMPFILE = 51
STATX = 52

# --- notification codes (in the error field of an out header with unique 0) -----------
#: opcode -> its fuse.h name in lower case (the debug log's words)
OPCODE_NAMES = {
    LOOKUP: "lookup",
    FORGET: "forget",
    GETATTR: "getattr",
    SETATTR: "setattr",
    READLINK: "readlink",
    SYMLINK: "symlink",
    MKNOD: "mknod",
    MKDIR: "mkdir",
    UNLINK: "unlink",
    RMDIR: "rmdir",
    RENAME: "rename",
    LINK: "link",
    OPEN: "open",
    READ: "read",
    WRITE: "write",
    STATFS: "statfs",
    RELEASE: "release",
    FSYNC: "fsync",
    SETXATTR: "setxattr",
    GETXATTR: "getxattr",
    LISTXATTR: "listxattr",
    REMOVEXATTR: "removexattr",
    FLUSH: "flush",
    INIT: "init",
    OPENDIR: "opendir",
    READDIR: "readdir",
    RELEASEDIR: "releasedir",
    FSYNCDIR: "fsyncdir",
    GETLK: "getlk",
    SETLK: "setlk",
    SETLKW: "setlkw",
    ACCESS: "access",
    CREATE: "create",
    INTERRUPT: "interrupt",
    BMAP: "bmap",
    DESTROY: "destroy",
    IOCTL: "ioctl",
    POLL: "poll",
    NOTIFY_REPLY: "notify_reply",
    BATCH_FORGET: "batch_forget",
    FALLOCATE: "fallocate",
    READDIRPLUS: "readdirplus",
    RENAME2: "rename2",
    LSEEK: "lseek",
    COPY_FILE_RANGE: "copy_file_range",
    SYNCFS: "syncfs",
    TMPFILE: "tmpfile",
    STATX: "statx",
}

NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

# --- INIT flags (flags, then flags2 = bits 32..63 with FUSE_INIT_EXT) -------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

# --- open reply flags -------------------------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# --- setattr valid bits -----------------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_CTIME = 1 << 10

GETATTR_FH = 1 << 0

# --- layouts ----------------------------------------------------------------------------
IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
# attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid
# rdev blksize flags
ATTR_FMT = "QQQQQQIIIIIIIIII"
ATTR = struct.Struct("=" + ATTR_FMT)
ENTRY_OUT = struct.Struct("=QQQQII" + ATTR_FMT)  # nodeid generation entry_valid attr_valid (nsecs) attr
ATTR_OUT = struct.Struct("=QII" + ATTR_FMT)  # attr_valid attr_valid_nsec dummy attr
INIT_IN = struct.Struct("=IIIII")  # major minor max_readahead flags flags2 (then unused[11])
INIT_IN_OLD = struct.Struct("=IIII")
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth request_timeout unused[11]
INIT_OUT = struct.Struct("=IIIIHHIIHHIIH22x")
GETATTR_IN = struct.Struct("=IIQ")  # getattr_flags dummy fh
# valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode
# unused4 uid gid unused5
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("=II")  # flags open_flags
OPEN_OUT = struct.Struct("=QIi")  # fh open_flags backing_id
CREATE_IN = struct.Struct("=IIII")  # flags mode umask open_flags
MKNOD_IN = struct.Struct("=IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("=II")  # mode umask
RENAME_IN = struct.Struct("=Q")  # newdir
RENAME2_IN = struct.Struct("=QII")  # newdir flags padding
LINK_IN = struct.Struct("=Q")  # oldnodeid
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("=QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("=II")  # size padding
RELEASE_IN = struct.Struct("=QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("=QIIQ")  # fh unused padding lock_owner
FSYNC_IN = struct.Struct("=QII")  # fh fsync_flags padding
SETXATTR_IN = struct.Struct("=II")  # size flags (without SETXATTR_EXT)
GETXATTR_IN = struct.Struct("=II")  # size padding
GETXATTR_OUT = struct.Struct("=II")  # size padding
ACCESS_IN = struct.Struct("=II")  # mask padding
FORGET_IN = struct.Struct("=Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("=II")  # count dummy
FORGET_ONE = struct.Struct("=QQ")  # nodeid nlookup
INTERRUPT_IN = struct.Struct("=Q")  # unique
# blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
STATFS_OUT = struct.Struct("=QQQQQIIII24x")
DIRENT = struct.Struct("=QQII")  # ino off namelen type (then the name, padded to 8)
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("=QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("=Q")  # offset
# fh_in off_in nodeid_out fh_out off_out len flags (the reply: WRITE_OUT)
COPY_FILE_RANGE_IN = struct.Struct("=QQQQQQQ")
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")  # ino off len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")  # parent namelen flags (then name and NUL)

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and ATTR.size == 88
assert ENTRY_OUT.size == 128 and ATTR_OUT.size == 104 and INIT_OUT.size == 64
assert SETATTR_IN.size == 88 and READ_IN.size == 40 and STATFS_OUT.size == 80
assert FALLOCATE_IN.size == 32 and LSEEK_IN.size == 24 and COPY_FILE_RANGE_IN.size == 56


def pack_attr_fields(
    ino: int, mode: int, nlink: int, uid: int, gid: int, rdev: int, size: int, blocks: int, blksize: int,
    atime_ns: int, mtime_ns: int, ctime_ns: int,
) -> tuple[int, ...]:  # fmt: skip
    """The ``fuse_attr`` fields in wire order (to be appended to ENTRY_OUT / ATTR_OUT)."""
    a_s, a_n = divmod(atime_ns, 1_000_000_000)
    m_s, m_n = divmod(mtime_ns, 1_000_000_000)
    c_s, c_n = divmod(ctime_ns, 1_000_000_000)
    return (
        ino, size, blocks, a_s & 0xFFFF_FFFF_FFFF_FFFF, m_s & 0xFFFF_FFFF_FFFF_FFFF, c_s & 0xFFFF_FFFF_FFFF_FFFF,
        a_n, m_n, c_n, mode, nlink, uid, gid, rdev & 0xFFFF_FFFF, blksize, 0,
    )  # fmt: skip


_DIRENT_BY_LEN: dict[int, struct.Struct] = {}


def _dirent_struct(namelen: int) -> struct.Struct:
    st = _DIRENT_BY_LEN[namelen] = struct.Struct(f"=QQII{namelen}s{-(DIRENT.size + namelen) % 8}x")
    return st


_DIRENTPLUS_BY_LEN: dict[int, struct.Struct] = {}


def _direntplus_struct(namelen: int) -> struct.Struct:
    st = _DIRENTPLUS_BY_LEN[namelen] = struct.Struct(f"=QQQQII{ATTR_FMT}QQII{namelen}s{-(DIRENT.size + namelen) % 8}x")
    return st


def direntplus(
    node_id: int, entry_valid: int, attr: tuple[int, ...], ino: int, off: int, typ: int, name: bytes
) -> bytes:
    """One ``fuse_direntplus``: the entry (``ENTRY_OUT``, *attr* from ``pack_attr_fields``,
    attributes valid as long as the entry) and its dirent, in one ``pack``."""
    n = len(name)
    st = _DIRENTPLUS_BY_LEN.get(n) or _direntplus_struct(n)
    return st.pack(node_id, 0, entry_valid, entry_valid, 0, 0, *attr, ino, off, n, typ, name)


def dirent(ino: int, off: int, typ: int, name: bytes) -> bytes:
    """One ``fuse_dirent`` with its name, padded to 8 bytes (one ``pack`` per entry: a
    layout per name length, made once)."""
    n = len(name)
    st = _DIRENT_BY_LEN.get(n) or _dirent_struct(n)
    return st.pack(ino, off, n, typ, name)


def out_header(unique: int, error: int, payload_len: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, error, unique)


def notify_inval_entry(parent: int, name: bytes) -> bytes:
    body = NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
    return out_header(0, NOTIFY_INVAL_ENTRY, len(body)) + body


def notify_inval_inode(node_id: int, off: int = -1, length: int = 0) -> bytes:
    body = NOTIFY_INVAL_INODE_OUT.pack(node_id, off, length)
    return out_header(0, NOTIFY_INVAL_INODE, len(body)) + body
