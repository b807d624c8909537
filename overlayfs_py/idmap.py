"""Ownership rules of a mount: uid/gid mapping and the override xattr. Pure (no FUSE, no I/O
but reading the kernel's overflow id once).

Vocabulary (docs/rootless.md, "Uid and gid mapping"):

* A file's STORED owner is the owner recorded in its layer: the override xattr
  ``user.containers.override_stat`` when the layer honours overrides, else the inode's
  uid/gid on disk.
* Its PRESENTED owner is what the mount reports (getattr, lookup, readdirplus, create):
  the stored ids through the mount's maps.

A map is a tuple of ranges ``(stored, presented, count)``: stored id ``stored + i`` is
presented as ``presented + i`` (0 <= i < count). The spelling is fuse-overlayfs's
``uidmapping=S:P:N[:S:P:N...]``, and so is the direction (its ``find_mapping``: the first
field is the id on disk, the second the one reported to the kernel; the same as a line of
``/proc/PID/uid_map``, container id first). A stored id outside every range is presented
as the overflow id; a presented id outside every range has no stored counterpart (the
request fails with EINVAL, as the kernel fails a chown to an id its user namespace does
not map). An empty map is the identity.

The override value is fuse-overlayfs's format ``UID:GID:MODE`` (decimal ids, octal
permission bits; ``override_mode`` in its utils.c reads it with ``"%d:%d:%o"``). It is
written as containers/storage writes it, ``"%d:%d:0%o"`` with ``mode & 07777``; extra
trailing fields are ignored on reading, as sscanf does.
"""

from __future__ import annotations

import itertools
import stat

from .errors import PyoverlayError

OVERRIDE_XATTR = "user.containers.override_stat"
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no change" to chown: never an owner
DEFAULT_OVERFLOW = 65534

Range = tuple[int, int, int]  # (stored, presented, count)


class IdMapError(PyoverlayError, ValueError):
    """A bad map spec; ``str()`` is one line naming the spec."""


def overflow_id(kind: str = "uid") -> int:
    """The kernel's overflow id (/proc/sys/fs/overflowuid or overflowgid), 65534 by default."""
    try:
        with open(f"/proc/sys/fs/overflow{kind}") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_OVERFLOW


def _number(text: str, what: str, spec: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise IdMapError(f"{what} {spec!r}: {text!r} is not a number")
    return int(text)


def parse_ranges(spec: str, what: str = "uidmap") -> tuple[Range, ...]:
    """``"S:P:N[:S:P:N...]"`` -> ranges, checked (see :func:`check_ranges`)."""
    fields = spec.split(":")
    if spec == "" or len(fields) % 3:
        raise IdMapError(f"{what} {spec!r}: expected STORED:PRESENTED:COUNT[:STORED:PRESENTED:COUNT...]")
    nums = [_number(f, what, spec) for f in fields]
    ranges = tuple((nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3))
    check_ranges(ranges, what, spec)
    return ranges


def check_ranges(ranges, what: str = "uidmap", spec: str | None = None) -> None:
    """Counts are positive, ids stay within 0..2^32-2 ((uid_t)-1 is not an id), and no two
    ranges overlap on either side (each id then has at most one counterpart)."""
    label = f"{what} {spec!r}" if spec is not None else what
    for s, p, n in ranges:
        if n <= 0:
            raise IdMapError(f"{label}: count must be at least 1 in {s}:{p}:{n}")
        if s < 0 or p < 0 or s + n - 1 > MAX_ID or p + n - 1 > MAX_ID:
            raise IdMapError(f"{label}: {s}:{p}:{n} goes beyond id {MAX_ID} (ids are 32-bit, -1 is reserved)")
    for side, name in ((0, "stored"), (1, "presented")):
        spans = sorted((r[side], r[side] + r[2]) for r in ranges)
        for (_a0, a1), (b0, _b1) in itertools.pairwise(spans):
            if b0 < a1:
                raise IdMapError(f"{label}: {name} ranges overlap at id {b0}")


class IdMap:
    """One direction-aware map (uids or gids)."""

    __slots__ = ("ranges", "overflow", "identity")

    def __init__(self, ranges=(), overflow: int = DEFAULT_OVERFLOW) -> None:
        self.ranges = tuple(tuple(r) for r in ranges)
        check_ranges(self.ranges)
        self.overflow = overflow
        self.identity = not self.ranges

    def present(self, stored: int) -> int:
        """The id the mount reports for a stored id (the overflow id when unmapped)."""
        if self.identity:
            return stored
        for s, p, n in self.ranges:
            if s <= stored < s + n:
                return p + (stored - s)
        return self.overflow

    def store(self, presented: int) -> int | None:
        """The stored id of a presented one (from a request), or None when it has none."""
        if self.identity:
            return presented
        for s, p, n in self.ranges:
            if p <= presented < p + n:
                return s + (presented - p)
        return None


def encode_override(uid: int, gid: int, mode: int) -> bytes:
    """The override value: ``UID:GID:0MODE`` (permission bits only, octal)."""
    return b"%d:%d:0%o" % (uid, gid, stat.S_IMODE(mode))


def decode_override(raw: bytes | None) -> tuple[int, int, int] | None:
    """(uid, gid, permission bits) from an override value, or None if absent or malformed."""
    if not raw:
        return None
    try:
        fields = raw.rstrip(b"\0").decode("ascii").strip().split(":")
        if len(fields) < 3 or not all(f.isdigit() for f in fields[:3]):
            return None
        uid, gid, mode = int(fields[0]), int(fields[1]), int(fields[2], 8)
    except (UnicodeDecodeError, ValueError):
        return None
    if uid > MAX_ID or gid > MAX_ID:
        return None
    return uid, gid, stat.S_IMODE(mode)


def carries_override(mode: int) -> bool:
    """Only directories and regular files carry an override (``user.*`` xattrs are refused
    on symlinks and special files; fuse-overlayfs reads it only on these two as well)."""
    return stat.S_ISDIR(mode) or stat.S_ISREG(mode)
