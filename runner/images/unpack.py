"""Unpack one layer blob (a tar, plain, gzip'd or zstd'd) into a new directory in the
kernel's overlay format, verifying its digests on the way.

The blob is read as a stream, once, front to back: its bytes are hashed (the *blob
digest*, the manifest's layer digest) and optionally copied (*tee*: the store keeps the
blob), decompressed according to their magic bytes, hashed again (the *diff id*, the
config's ``rootfs.diff_ids`` entry) and extracted by :func:`.extract.extract`, which
converts the OCI whiteouts to the kernel's and refuses anything that could escape the
directory. Bytes after the tar's end-of-archive marker are read too, so both digests
cover the whole blob. A digest mismatch, a refused entry, a damaged stream or Ctrl-C
removes the directory: there is never a half layer.

Layers above 8 MiB get a progress bar on stderr when it is a terminal.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from typing import BinaryIO, NamedTuple

from overlayfs_py.whiteout import TRUSTED_PREFIX, USER_PREFIX, XattrNames

from .core import ImageError
from .extract import extract
from .streams import Digesting, Progress, check, decompress, force_rmtree


class Unpacked(NamedTuple):
    digest: str  # sha256 of the blob as read
    diff_id: str  # sha256 of the uncompressed tar
    size: int  # bytes of the blob
    compression: str  # "", "gzip" or "zstd"


def default_names() -> XattrNames:
    """Root writes ``trusted.overlay.*``; anyone else ``user.overlay.*`` (mount with userxattr)."""
    return XattrNames(TRUSTED_PREFIX if os.geteuid() == 0 else USER_PREFIX)


def unpack(
    blob: BinaryIO,
    dest: str | None,
    *,
    digest: str | None = None,
    diff_id: str | None = None,
    names: XattrNames | None = None,
    tee: BinaryIO | None = None,
    size: int | None = None,
    label: str = "layer",
) -> Unpacked:
    """Read the layer blob *blob* to its end, extracting it into the new directory *dest*
    (None: only digests). *digest*/*diff_id*, when given, must match. *tee* receives a copy
    of the blob bytes. On any error *dest* is removed and :class:`ImageError` raised."""
    progress = Progress(label, size)
    outer = Digesting(blob, tee, progress)
    try:
        kind, raw = decompress(outer)
        inner = Digesting(raw)
        if dest is not None:
            os.mkdir(dest, 0o700)
            os.chmod(dest, 0o755)  # the root's mode unless the tar has a "./" entry
            extract(inner, dest, names or default_names())
        inner.drain()
        outer.drain()
        progress.update(outer.count, final=True)
        check("layer blob", digest, outer.digest)
        check("layer (uncompressed, diff id)", diff_id, inner.digest)
        return Unpacked(outer.digest, inner.digest, outer.count, kind)
    except BaseException as e:
        if dest is not None:
            force_rmtree(dest)
        progress.abort()
        if isinstance(e, ImageError):
            raise ImageError(f"{label}: {e}") from None
        if isinstance(e, (tarfile.TarError, EOFError, OSError, zlib.error)) or type(e).__name__ == "ZstdError":
            raise ImageError(f"{label}: cannot read the layer: {e}") from None
        raise
