"""Building pyfuse3 ``EntryAttributes`` whose st_ino differs from the FUSE node id.

FUSE keeps the node id (``fuse_entry_param.ino``) and the inode number reported by
stat and readdir (``fuse_entry_param.attr.st_ino``) apart, and overlay needs them
apart: two lower names of one hard-link set are two overlay inodes (a copy-up breaks
the link) that report the same st_ino, exactly as the kernel's overlay does. pyfuse3's
``st_ino`` setter writes both fields. At import we locate ``attr.st_ino`` inside the
object by a probe and verify it; if the probe fails, node id and st_ino stay tied and
``SEPARATE_INO`` is False (nothing else changes).
"""

from __future__ import annotations

import ctypes
import logging
import struct

import pyfuse3

log = logging.getLogger(__name__)


def _probe() -> int | None:
    e = pyfuse3.EntryAttributes()
    marks = (0x5A5A_0102_0304_0506, 0x6B6B_1112_1314_1516)
    for mark in marks:
        e.st_ino = mark
        raw = ctypes.string_at(id(e), 256)
        packed = struct.pack("=Q", mark)
        first = raw.find(packed)
        second = raw.find(packed, first + 8)
        if first < 0 or second < 0 or raw.find(packed, second + 8) >= 0:
            return None
        offset = second
    # Writing at the offset must change what readdir/getattr see, not the node id.
    e.st_ino = 7
    ctypes.c_uint64.from_address(id(e) + offset).value = 9
    raw = ctypes.string_at(id(e), 256)
    if e.st_ino != 7 or raw[offset : offset + 8] != struct.pack("=Q", 9):
        return None
    return offset


_ATTR_INO_OFFSET = _probe()
SEPARATE_INO = _ATTR_INO_OFFSET is not None
if not SEPARATE_INO:  # pragma: no cover - depends on the pyfuse3 build
    log.warning("pyfuse3 layout not recognised: st_ino will equal the FUSE node id")


def set_st_ino(entry: pyfuse3.EntryAttributes, node_id: int, st_ino: int) -> None:
    """Set the node id (0 = no inode for the kernel) and, where possible, a separate st_ino."""
    entry.st_ino = node_id
    if _ATTR_INO_OFFSET is not None:
        ctypes.c_uint64.from_address(id(entry) + _ATTR_INO_OFFSET).value = st_ino
