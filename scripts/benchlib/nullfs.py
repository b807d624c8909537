"""The floor of a pyfuse3 + trio server: a file system that does nothing.

One root directory with one 6-byte file ``f``; ``getxattr`` answers ENODATA, ``open``
and ``release`` do nothing, attributes and entries are cached for a day, FLUSH is
answered ENOSYS once (as pyoverlay does).  ``scripts/bench --transport`` times the same
requests on it and on pyoverlay: the difference is what pyoverlay's handlers cost, and
this server's distance to fuse-overlayfs is what pyfuse3's transport costs.

Run: ``python nullfs.py MOUNTPOINT READY_FD`` (writes "ok" to READY_FD once mounted;
serves until unmounted).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

DATA = b"hello\n"
DAY = 86400.0


class NullFs(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644)
        e.st_nlink = 2 if inode == pyfuse3.ROOT_INODE else 1
        e.st_size = 0 if inode == pyfuse3.ROOT_INODE else len(DATA)
        e.attr_timeout = e.entry_timeout = DAY
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == b"f":
            return await self.getattr(pyfuse3.ROOT_INODE + 1)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return DATA[off : off + size]

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh):
        pass


def main() -> int:
    mountpoint, ready = sys.argv[1], int(sys.argv[2])
    opts = set(pyfuse3.default_options) | {"fsname=nullfs", "subtype=pyfuse3-null"}
    pyfuse3.init(NullFs(), mountpoint, opts)
    os.write(ready, b"ok\n")
    os.close(ready)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
