"""The layer tar format (OCI image spec "Representing Changes", Docker's archives): names,
whiteout markers, PAX records. Shared by the reader (:mod:`.unpack`) and the writer
(:mod:`.layertar`).

* member names are relative (``etc/motd``, directories may end in ``/``, a leading ``./``
  is allowed); ``..`` components and absolute names are refused on reading;
* ``.wh.NAME`` deletes NAME of the layers below; ``.wh..wh..opq`` in a directory hides
  everything the layers below have in it; other ``.wh..wh.*`` names are aufs bookkeeping;
* xattrs travel as PAX records ``SCHILY.xattr.<name>`` (binary values are kept byte for
  byte: tarfile decodes them with surrogateescape);
* mtimes: the ustar field holds whole seconds; a PAX ``mtime`` record
  (``<sec>.<9 digits>``) carries nanoseconds.
"""

from __future__ import annotations

import os
import posixpath
import tarfile

from overlayfs_py import whiteout

from .core import ImageError

# the marker names (".wh.", ".wh..wh..opq"), whose one home is whiteout.py: a mount with
# -o aufs_whiteouts=on reads the same names in its layers
WH = whiteout.AUFS_PREFIX
OPAQUE = whiteout.AUFS_OPAQUE
XATTR = "SCHILY.xattr."


def split_name(name: str, what: str = "entry") -> list[bytes]:
    """The components of a member name (or hard link target), refusing absolute paths and ``..``."""
    b = os.fsencode(name)
    if b.startswith(b"/"):
        raise ImageError(f"layer {what} {name!r}: absolute path refused")
    parts = [p for p in b.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ImageError(f"layer {what} {name!r}: '..' component refused")
    return parts


def escapes(dir_parts: list[bytes], target: bytes) -> bool:
    """Whether a symlink with *target* in directory *dir_parts* points out of the layer:
    absolute, or climbing above the layer root."""
    if target.startswith(b"/"):
        return True
    return posixpath.normpath(posixpath.join(b"/".join(dir_parts) or b".", target)).startswith(b"..")


def mtime_ns(m: tarfile.TarInfo) -> int:
    """The entry's mtime in ns: exact from a PAX ``mtime`` record, else whole seconds."""
    pax = m.pax_headers.get("mtime")
    if pax:
        sec, _, frac = pax.partition(".")
        try:
            sign = -1 if sec.startswith("-") else 1
            return int(sec) * 10**9 + sign * int((frac + "000000000")[:9])
        except ValueError:
            pass
    return int(m.mtime) * 10**9


def set_mtime(info: tarfile.TarInfo, ns: int) -> None:
    """Whole seconds in the header; a PAX ``mtime`` record only when there are nanoseconds."""
    sec, frac = divmod(ns, 10**9)
    info.mtime = sec
    if frac:
        info.pax_headers = {**info.pax_headers, "mtime": f"{sec}.{frac:09d}"}  # typed a Mapping


def xattrs_of(m: tarfile.TarInfo) -> dict[str, bytes]:
    return {
        k[len(XATTR) :]: v.encode("utf-8", "surrogateescape") for k, v in m.pax_headers.items() if k.startswith(XATTR)
    }


def set_xattr(info: tarfile.TarInfo, name: str, value: bytes) -> None:
    info.pax_headers = {**info.pax_headers, XATTR + name: value.decode("utf-8", "surrogateescape")}
