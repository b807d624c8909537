"""Snapshots of a mounted tree, walked WITHOUT following symlinks.

``snapshot(root)`` returns a plain dict::

    {
      "entries":   {relpath: {attribute: value, ...}},   # "." is the root
      "hardlinks": [(path, path, ...), ...],            # non-dirs sharing st_ino
      "problems":  [str, ...],                          # self-consistency problems
    }

Every directory is read with ``readdir(3)`` (via ctypes, so ``.``/``..``, d_ino
and d_type are visible) and every listed name is ``lstat``-ed relative to the
directory's fd (``*at`` calls only, so paths longer than PATH_MAX work).  A
name that readdir lists but ``lstat`` answers with ENOENT (the kernel overlay
does that for whiteouts in non-merged directories) is recorded with type
``listed-but-missing``; any other error is recorded as ``error:ERRNO``.

``diff_snapshots(a, b)`` returns a readable list of differences.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import stat
import sys

__all__ = [
    "snapshot",
    "diff_snapshots",
    "format_diff",
    "raw_readdir",
    "DT_NAMES",
]

# --------------------------------------------------------------------------
# raw readdir through libc (os.scandir hides "." and "..")
# --------------------------------------------------------------------------

DT_NAMES = {
    0: "unknown",
    1: "fifo",
    2: "chr",
    4: "dir",
    6: "blk",
    8: "file",
    10: "symlink",
    12: "sock",
    14: "wht",
}


class _Dirent64(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fdopendir.argtypes = [ctypes.c_int]
_libc.fdopendir.restype = ctypes.c_void_p
_readdir = getattr(_libc, "readdir64", None) or _libc.readdir
_readdir.argtypes = [ctypes.c_void_p]
_readdir.restype = ctypes.POINTER(_Dirent64)
_libc.closedir.argtypes = [ctypes.c_void_p]
_libc.closedir.restype = ctypes.c_int


def raw_readdir(dirfd: int) -> list[tuple[bytes, int, int]]:
    """All entries of the directory open at ``dirfd`` (not consumed), in
    readdir order, as ``(name_bytes, d_ino, d_type)``, including ``.``/``..``."""
    fd = os.dup(dirfd)
    os.lseek(fd, 0, os.SEEK_SET)
    dirp = _libc.fdopendir(fd)
    if not dirp:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, os.strerror(e))
    out = []
    try:
        while True:
            ctypes.set_errno(0)
            ent = _readdir(dirp)
            if not ent:
                e = ctypes.get_errno()
                if e:
                    raise OSError(e, os.strerror(e))
                break
            d = ent.contents
            out.append((d.d_name, d.d_ino, d.d_type))
    finally:
        _libc.closedir(dirp)  # closes fd
    return out


# --------------------------------------------------------------------------
# snapshot
# --------------------------------------------------------------------------

_TYPES = [
    (stat.S_ISDIR, "dir"),
    (stat.S_ISREG, "file"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISCHR, "chr"),
    (stat.S_ISBLK, "blk"),
    (stat.S_ISSOCK, "sock"),
]

_DT_FOR_TYPE = {"dir": 4, "file": 8, "symlink": 10, "fifo": 1, "chr": 2, "blk": 6, "sock": 12}


def _ftype(mode: int) -> str:
    for test, name in _TYPES:
        if test(mode):
            return name
    return "unknown"


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


def _xattrs(path, follow: bool, ignore_prefixes) -> dict | str:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as e:
        return "error:" + _errname(e)
    out = {}
    for n in sorted(names):
        if any(n.startswith(p) for p in ignore_prefixes):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=follow)
        except OSError as e:
            out[n] = "error:" + _errname(e)
    if len(set(names)) != len(names):
        out["<duplicate names in listxattr>"] = repr(sorted(names))
    return out


def _sha256_at(dirfd: int, name: bytes) -> str:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dirfd)
    except OSError as e:
        return "error:open:" + _errname(e)
    h = hashlib.sha256()
    try:
        while True:
            try:
                buf = os.read(fd, 1 << 20)
            except OSError as e:
                return "error:read:" + _errname(e)
            if not buf:
                break
            h.update(buf)
    finally:
        os.close(fd)
    return h.hexdigest()


def _stat_record(st: os.stat_result, root_dev: int) -> dict:
    t = _ftype(st.st_mode)
    rec = {
        "type": t,
        "mode": st.st_mode,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "nlink": st.st_nlink,
        "ino": st.st_ino,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "blocks": st.st_blocks,
        "blksize": st.st_blksize,
        "dev_is_root_dev": st.st_dev == root_dev,
    }
    if t != "dir":
        rec["size"] = st.st_size
    if t in ("chr", "blk"):
        rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return rec


def _join(parent: str, name: bytes) -> str:
    n = os.fsdecode(name)
    return n if parent == "." else parent + "/" + n


def snapshot(root, *, content: bool = True, xattrs: bool = True, ignore_xattr_prefixes=("security.",)) -> dict:
    """Walk the tree at ``root`` (no symlink following) and return a snapshot
    dict (see the module docstring)."""
    entries: dict[str, dict] = {}
    problems: list[str] = []
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 20000))
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rst = os.fstat(rootfd)
        rec = _stat_record(rst, rst.st_dev)
        if xattrs:
            rec["xattrs"] = _xattrs(rootfd, True, ignore_xattr_prefixes)
        entries["."] = rec
        _walk_dir(rootfd, ".", rst, rst.st_dev, entries, problems, content, xattrs, ignore_xattr_prefixes)
    finally:
        os.close(rootfd)
        sys.setrecursionlimit(old_limit)

    groups: dict[int, list[str]] = {}
    for p, r in entries.items():
        if r["type"] not in ("dir", "listed-but-missing") and "ino" in r:
            groups.setdefault(r["ino"], []).append(p)
    hardlinks = sorted(tuple(sorted(v)) for v in groups.values() if len(v) > 1)
    return {"entries": entries, "hardlinks": hardlinks, "problems": problems}


def _walk_dir(dfd, rel, dst, root_dev, entries, problems, content, xattrs, ignore):
    try:
        listing = raw_readdir(dfd)
    except OSError as e:
        entries[rel]["readdir"] = "error:" + _errname(e)
        return
    names = [n for n, _, _ in listing]
    dots = {n: ino for n, ino, _ in listing if n in (b".", b"..")}
    rec = entries[rel]
    # d_ino of "." and ".." (None = not listed); compared with the kernel by a
    # dedicated test (the kernel's ".." d_ino has quirks, see test_read_view)
    rec["dot_d_ino"] = dots.get(b".")
    rec["dotdot_d_ino"] = dots.get(b"..")
    if names.count(b".") != 1 or names.count(b"..") != 1:
        problems.append(
            f"{rel!r}: readdir lists '.' x{names.count(b'.')} and '..' x{names.count(b'..')} (want exactly once each)"
        )
    if b"." in dots and dots[b"."] != dst.st_ino:
        problems.append(f"{rel!r}: d_ino of '.' is {dots[b'.']} but st_ino is {dst.st_ino}")
    seen = set()
    for name, d_ino, d_type in listing:
        if name in (b".", b".."):
            continue
        if name in seen:
            problems.append(f"{rel!r}: readdir lists {os.fsdecode(name)!r} more than once")
            continue
        seen.add(name)
        path = _join(rel, name)
        try:
            st = os.lstat(name, dir_fd=dfd)
        except OSError as e:
            t = "listed-but-missing" if e.errno == errno.ENOENT else "error:" + _errname(e)
            entries[path] = {"type": t, "d_ino": d_ino, "d_type": DT_NAMES.get(d_type, d_type)}
            continue
        r = _stat_record(st, root_dev)
        r["d_ino"] = d_ino
        r["d_type"] = DT_NAMES.get(d_type, d_type)
        if d_ino != st.st_ino:
            problems.append(f"{path!r}: d_ino {d_ino} != st_ino {st.st_ino}")
        if d_type != 0 and _DT_FOR_TYPE.get(r["type"]) != d_type:
            problems.append(f"{path!r}: d_type {DT_NAMES.get(d_type, d_type)} but lstat says {r['type']}")
        t = r["type"]
        if t == "symlink":
            try:
                r["target"] = os.readlink(name, dir_fd=dfd)
            except OSError as e:
                r["target"] = "error:" + _errname(e)
        elif t == "file" and content:
            r["sha256"] = _sha256_at(dfd, name)
        if xattrs:
            r["xattrs"] = _xattrs(b"/proc/self/fd/%d/" % dfd + name, False, ignore)
        entries[path] = r
        if t == "dir":
            try:
                cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError as e:
                r["readdir"] = "error:open:" + _errname(e)
                continue
            try:
                _walk_dir(cfd, path, st, root_dev, entries, problems, content, xattrs, ignore)
            finally:
                os.close(cfd)


# --------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------


def _short(p: str, limit: int = 120) -> str:
    r = repr(p)
    if len(r) > limit:
        r = r[: limit // 2] + f"...<{len(r)} chars>..." + r[-limit // 2 :]
    return r


def _fmt(key, v):
    if key == "mode" and isinstance(v, int):
        return f"{v:#o}"
    if isinstance(v, bytes) and len(v) > 80:
        return repr(v[:40]) + f"...<{len(v)} bytes>"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt(None, x)}" for k, x in v.items()) + "}"
    return repr(v)


def diff_snapshots(
    a: dict, b: dict, *, a_name: str = "expected", b_name: str = "actual", ignore_keys=(), limit: int = 60
) -> list[str]:
    """Differences between two snapshots as readable lines (at most ``limit``
    lines plus a summary line).  ``a`` is the oracle (kernel)."""
    out: list[str] = []
    ea, eb = a["entries"], b["entries"]
    only_a = sorted(set(ea) - set(eb))
    only_b = sorted(set(eb) - set(ea))
    for p in only_a:
        out.append(f"only in {a_name}: {_short(p)} ({ea[p].get('type')})")
    for p in only_b:
        out.append(f"only in {b_name}: {_short(p)} ({eb[p].get('type')})")
    for p in sorted(set(ea) & set(eb)):
        ra, rb = ea[p], eb[p]
        for k in sorted(set(ra) | set(rb)):
            if k in ignore_keys:
                continue
            va, vb = ra.get(k, "<absent>"), rb.get(k, "<absent>")
            if va == vb:
                continue
            if k == "xattrs" and isinstance(va, dict) and isinstance(vb, dict):
                for xn in sorted(set(va) | set(vb)):
                    xa, xb = va.get(xn, "<absent>"), vb.get(xn, "<absent>")
                    if xa != xb:
                        out.append(f"{_short(p)}: xattr {xn!r}: {a_name}={_fmt(None, xa)} {b_name}={_fmt(None, xb)}")
                continue
            out.append(f"{_short(p)}: {k}: {a_name}={_fmt(k, va)} {b_name}={_fmt(k, vb)}")
    if a["hardlinks"] != b["hardlinks"]:
        ha, hb = set(a["hardlinks"]), set(b["hardlinks"])
        for g in sorted(ha - hb):
            out.append(f"hard-link group only in {a_name}: {[_short(x, 60) for x in g]}")
        for g in sorted(hb - ha):
            out.append(f"hard-link group only in {b_name}: {[_short(x, 60) for x in g]}")
    pa, pb = set(a["problems"]), set(b["problems"])
    for pr in sorted(pb - pa):
        out.append(f"problem only in {b_name}: {pr}")
    for pr in sorted(pa - pb):
        out.append(f"problem only in {a_name}: {pr}")
    if len(out) > limit:
        n = len(out)
        out = out[:limit] + [f"... and {n - limit} more differences"]
    return out


def format_diff(lines: list[str], header: str = "") -> str:
    return (header + "\n" if header else "") + "\n".join("  " + line for line in lines)
