"""Byte streams of layer blobs: digests while reading, decompression by magic bytes, progress.

A layer blob is read exactly once, front to back (``docker save`` tars and OCI blobs may
be huge): :class:`Digesting` hashes (and optionally copies) the bytes as they pass,
:func:`decompress` picks gzip or zstd from the first bytes (anything else is taken as a
plain tar), and :class:`Progress` draws a one-line text bar on stderr.

Two digests per layer, as in the OCI image spec: the *blob digest* is the sha256 of the
bytes as stored (compressed; the manifest's layer digest), the *diff id* is the sha256 of
the uncompressed tar (the config's ``rootfs.diff_ids``). For an uncompressed layer they
are the same.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import sys
import time
from typing import BinaryIO, Protocol, TypeGuard, cast

from .core import ImageError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PROGRESS_MIN = 8 << 20  # layers above this size get a progress bar (on a tty)
CHUNK = 1 << 20

MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPES = {"": MEDIA_TAR, "gzip": MEDIA_TAR + "+gzip", "zstd": MEDIA_TAR + "+zstd"}


class Readable(Protocol):
    """What a blob is read through: ``read(n)``, front to back."""

    def read(self, n: int = -1, /) -> bytes: ...


#: a decompressed layer stream (a file object: tarfile and gzip take it as one)
LayerStream = io.BufferedIOBase | BinaryIO


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Progress:
    """``label [#####.....]  42%  12.0/28.5 MiB`` redrawn in place, at most 10 times a second.
    Does nothing unless the total is above :data:`PROGRESS_MIN` and stderr is a terminal."""

    def __init__(self, label: str, total: int | None, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.total = total or 0
        self.on = self.total > PROGRESS_MIN and self.stream.isatty()
        self.last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        if not self.on or (not final and time.monotonic() - self.last < 0.1):
            return
        self.last = time.monotonic()
        frac = min(done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac:4.0%} {done / 2**20:.1f}/{self.total / 2**20:.1f} MiB")
        if final:
            self.stream.write("\n")
        self.stream.flush()

    def abort(self) -> None:
        if self.on and self.last:
            self.stream.write("\n")
            self.stream.flush()


class Digesting:
    """A reader that hashes every byte it passes on; *tee* gets a copy of them."""

    def __init__(self, f: Readable, tee: BinaryIO | None = None, progress: Progress | None = None) -> None:
        self.f = f
        self.tee = tee
        self.progress = progress
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n if n is not None and n >= 0 else CHUNK)
        if data:
            self.hash.update(data)
            self.count += len(data)
            if self.tee is not None:
                self.tee.write(data)
            if self.progress is not None:
                self.progress.update(self.count)
        return data

    def drain(self) -> None:
        """Read to the end (trailing padding counts for the digest too)."""
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _Peeked(io.BufferedIOBase):
    """Puts the magic bytes back in front of the stream they were read from: a read-only,
    non-seekable file object (as a pipe's)."""

    def __init__(self, head: bytes, f: Readable) -> None:
        super().__init__()
        self.head = head
        self.f = f

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1, /) -> bytes:
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.f.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.f.read(-1 if n is None else n)


def _read_exact(f: Readable, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = f.read(n - len(out))
        if not data:
            break
        out += data
    return out


def decompress(f: Readable) -> tuple[str, LayerStream]:
    """``(kind, reader)``: kind "" (plain tar), "gzip" or "zstd", from the magic bytes."""
    head = _read_exact(f, 4)
    src = _Peeked(head, f)
    if head.startswith(GZIP_MAGIC):
        return "gzip", gzip.GzipFile(fileobj=src, mode="rb")
    if head.startswith(ZSTD_MAGIC):
        import zstandard

        # zstandard's stub asks for IO[bytes]; stream_reader calls read() only
        return "zstd", zstandard.ZstdDecompressor().stream_reader(cast(BinaryIO, src), read_across_frames=True)
    if head[:3] in (b"BZh", b"\xfd7z"):
        raise ImageError("unsupported layer compression (bzip2/xz); only gzip and zstd are read")
    return "", src


def check(what: str, want: str | None, got: str) -> None:
    if want is not None and want != got:
        raise ImageError(f"{what} digest mismatch: expected {want}, got {got}")


def is_digest(s: object) -> TypeGuard[str]:
    return (
        isinstance(s, str) and s.startswith("sha256:") and len(s) == 71 and all(c in "0123456789abcdef" for c in s[7:])
    )


def hex_of(digest: object) -> str:
    if not is_digest(digest):
        raise ImageError(f"not a sha256 digest: {digest!r}")
    return digest[7:]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def force_rmtree(path: str) -> None:
    """``rm -rf`` that also gets through directories a layer made read-only (non-root)."""

    def retry(func, p, _exc):
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, onerror=retry)
            else:
                func(p)
        except OSError:
            pass

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=retry)
