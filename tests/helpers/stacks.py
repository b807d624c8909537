"""Layer-stack builders.

A *layer spec* is a mapping ``path -> Node`` (paths relative, "/"-separated,
``str`` or ``bytes``); missing parent directories are created as plain 0755
dirs.  Nodes are made with the small constructors below::

    build_layer(root, {
        "d": D(mode=0o750, uid=1000, xattrs={"user.k": b"v"}),
        "d/f": F(b"data", mtime_ns=T0),
        "d/wo": WH(),                      # char 0/0 whiteout
        "x": XWH(),                        # zero-size file + trusted.overlay.whiteout
        "od": OPQ(),                       # dir with trusted.overlay.opaque=y
        "s": L("../etc"), "h": H("d/f"), "p": FIFO(), "n": CHR(1, 3),
    })

Everything is created with ``*at`` calls relative to directory fds, one path
component at a time, so paths longer than PATH_MAX work.  Metadata is applied
after all objects exist: chown, chmod, xattrs, then times (so a dir's mtime is
not disturbed by its children being created later).

A *stack* is a list of built lower layers (top first) plus optionally a
prepared upper dir; ``STACKS`` maps names to builder functions
``builder(base_dir) -> Stack``.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

# deterministic timestamps (ns precision on purpose)
T0 = 1_600_000_000_123_456_789
T1 = 1_650_000_000_987_654_321
T2 = 1_500_000_000_000_000_001
T_UPPER = 1_700_000_000_555_555_555  # mtime given to fresh empty uppers

PATH_MAX = 4096
NAME_MAX = 255


# --------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------


@dataclass
class Node:
    kind: str  # file dir symlink hardlink fifo chr blk sock
    data: bytes = b""
    target: bytes | None = None  # symlink target / hardlink source path
    mode: int | None = None  # permission bits (incl. suid/sgid/sticky)
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None
    xattrs: dict = field(default_factory=dict)
    rdev: tuple | None = None
    size: int | None = None  # files: truncate to this size (sparse tail)
    chunks: list = field(default_factory=list)  # files: [(offset, bytes)] (sparse)


def _b(x) -> bytes:
    return x if isinstance(x, bytes) else os.fsencode(x)


def _xa(xattrs) -> dict:
    return {k: _b(v) for k, v in (xattrs or {}).items()}


def F(data=b"", *, xattrs=None, **kw) -> Node:
    return Node("file", data=_b(data), xattrs=_xa(xattrs), **kw)


def BIG(size: int, seed: int = 0, **kw) -> Node:
    """A regular file of ``size`` deterministic pseudo-random bytes."""
    return F(random.Random(seed).randbytes(size), **kw)


def SPARSE(size: int, chunks, **kw) -> Node:
    return Node("file", size=size, chunks=[(o, _b(d)) for o, d in chunks], xattrs=_xa(kw.pop("xattrs", None)), **kw)


def D(*, xattrs=None, **kw) -> Node:
    return Node("dir", xattrs=_xa(xattrs), **kw)


def L(target, *, xattrs=None, **kw) -> Node:
    return Node("symlink", target=_b(target), xattrs=_xa(xattrs), **kw)


def H(source) -> Node:
    """Hard link to ``source`` (a path in the same layer)."""
    return Node("hardlink", target=_b(source))


def FIFO(**kw) -> Node:
    kw["xattrs"] = _xa(kw.get("xattrs"))
    return Node("fifo", **kw)


def CHR(major: int, minor: int, **kw) -> Node:
    kw["xattrs"] = _xa(kw.get("xattrs"))
    return Node("chr", rdev=(major, minor), **kw)


def BLK(major: int, minor: int, **kw) -> Node:
    kw["xattrs"] = _xa(kw.get("xattrs"))
    return Node("blk", rdev=(major, minor), **kw)


def SOCK(**kw) -> Node:
    kw["xattrs"] = _xa(kw.get("xattrs"))
    return Node("sock", **kw)


def WH(**kw) -> Node:
    """A kernel-style whiteout: char device 0/0, mode 000."""
    kw.setdefault("mode", 0)
    return CHR(0, 0, **kw)


def XWH(ns: str = "trusted", **kw) -> Node:
    """An xattr whiteout: zero-size regular file with ``<ns>.overlay.whiteout``."""
    xattrs = dict(kw.pop("xattrs", None) or {})
    xattrs[f"{ns}.overlay.whiteout"] = b""
    return F(b"", xattrs=xattrs, **kw)


def OPQ(ns: str = "trusted", value=b"y", **kw) -> Node:
    """A directory with ``<ns>.overlay.opaque=<value>`` (``y`` opaque, ``x``
    = merge dir that contains xattr whiteouts)."""
    xattrs = dict(kw.pop("xattrs", None) or {})
    xattrs[f"{ns}.overlay.opaque"] = _b(value)
    return D(xattrs=xattrs, **kw)


_DEFAULT_MODE = {"file": 0o644, "dir": 0o755, "fifo": 0o644, "chr": 0o644, "blk": 0o644, "sock": 0o755}


# --------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------


def _split(path: bytes) -> list[bytes]:
    parts = [p for p in path.split(b"/") if p]
    if not parts or any(p in (b".", b"..") for p in parts):
        raise ValueError(f"bad layer path {path!r}")
    return parts


class _Dirs:
    """Opens (and creates) directories component by component; caches fds."""

    def __init__(self, rootfd: int):
        self.fds = {(): rootfd}

    def get(self, comps: tuple) -> int:
        if comps in self.fds:
            return self.fds[comps]
        if len(self.fds) > 256:  # bound the number of open fds
            self.close()
        # deepest cached ancestor, then walk down (iteratively: paths may be
        # thousands of levels deep)
        i = len(comps)
        while comps[:i] not in self.fds:
            i -= 1
        fd = self.fds[comps[:i]]
        for j in range(i, len(comps)):
            name = comps[j]
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            self.fds[comps[: j + 1]] = fd
            if len(self.fds) > 4096:
                raise RuntimeError("too deep")
        return fd

    def close(self):
        for k, fd in self.fds.items():
            if k:
                os.close(fd)
        self.fds = {(): self.fds[()]}


def _proc(dfd: int, name: bytes) -> bytes:
    return b"/proc/self/fd/%d/%s" % (dfd, name)


def build_layer(root, spec) -> Path:
    """Create ``spec`` (mapping path -> Node) under ``root`` (created if needed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    items = [(tuple(_split(_b(p))), n) for p, n in (spec.items() if isinstance(spec, dict) else spec)]
    # parents before children; hard links after everything else
    items.sort(key=lambda it: (it[1].kind == "hardlink", len(it[0])))
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    dirs = _Dirs(rootfd)
    try:
        for comps, n in items:
            parent = dirs.get(comps[:-1])
            name = comps[-1]
            k = n.kind
            if k == "dir":
                dirs.get(comps)
            elif k == "file":
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent)
                try:
                    if n.data:
                        view = memoryview(n.data)
                        while view:
                            view = view[os.write(fd, view) :]
                    for off, chunk in n.chunks:
                        os.pwrite(fd, chunk, off)
                    if n.size is not None:
                        os.ftruncate(fd, n.size)
                finally:
                    os.close(fd)
            elif k == "symlink":
                os.symlink(n.target, name, dir_fd=parent)
            elif k == "hardlink":
                src = tuple(_split(n.target))
                os.link(src[-1], name, src_dir_fd=dirs.get(src[:-1]), dst_dir_fd=parent, follow_symlinks=False)
            elif k in ("fifo", "chr", "blk", "sock"):
                fmt = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "sock": stat.S_IFSOCK}[k]
                dev = os.makedev(*n.rdev) if n.rdev else 0
                os.mknod(name, fmt | 0o600, dev, dir_fd=parent)
            else:
                raise ValueError(f"unknown node kind {k!r}")
        # metadata: owner, mode, xattrs, then times
        for comps, n in items:
            if n.kind == "hardlink":
                continue
            parent = dirs.get(comps[:-1])
            name = comps[-1]
            if n.uid is not None or n.gid is not None:
                os.chown(
                    name,
                    -1 if n.uid is None else n.uid,
                    -1 if n.gid is None else n.gid,
                    dir_fd=parent,
                    follow_symlinks=False,
                )
            if n.kind != "symlink":
                mode = n.mode if n.mode is not None else _DEFAULT_MODE[n.kind]
                os.chmod(name, mode, dir_fd=parent)
            for xn, xv in n.xattrs.items():
                os.setxattr(_proc(parent, name), xn, xv, follow_symlinks=False)
        for comps, n in sorted(items, key=lambda it: -len(it[0])):
            if n.kind == "hardlink" or (n.mtime_ns is None and n.atime_ns is None):
                continue
            parent = dirs.get(comps[:-1])
            m = n.mtime_ns if n.mtime_ns is not None else n.atime_ns
            a = n.atime_ns if n.atime_ns is not None else m
            os.utime(comps[-1], ns=(a, m), dir_fd=parent, follow_symlinks=False)
    finally:
        dirs.close()
        os.close(rootfd)
    return root


def set_root_attrs(root, *, mode=None, uid=None, gid=None, mtime_ns=None, xattrs=None):
    root = os.fspath(root)
    if uid is not None or gid is not None:
        os.chown(root, -1 if uid is None else uid, -1 if gid is None else gid)
    if mode is not None:
        os.chmod(root, mode)
    for k, v in (xattrs or {}).items():
        os.setxattr(root, k, _b(v))
    if mtime_ns is not None:
        os.utime(root, ns=(mtime_ns, mtime_ns))


def make_many_files(dirpath, names) -> None:
    """Create many empty files fast (os.open/close relative to one dir fd)."""
    os.makedirs(dirpath, exist_ok=True)
    dfd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        for n in names:
            os.close(os.open(n, flags, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------
# stacks
# --------------------------------------------------------------------------


@dataclass
class Stack:
    name: str
    lowers: list  # Paths, top lower first
    upper: Path | None = None  # prepared upper content (mode "upper")
    options: list = field(default_factory=list)  # e.g. ["userxattr"]
    description: str = ""
    modes_override: list | None = None
    notes: dict = field(default_factory=dict)  # paths of interest for tests

    @property
    def modes(self) -> list[str]:
        """``ro``: lowers only (kernel needs >= 2); ``rw``: fresh EMPTY upper +
        workdir per mount; ``upper``: the prepared upper (shared sequentially,
        never by two live mounts)."""
        if self.modes_override is not None:
            return list(self.modes_override)
        if self.upper is not None:
            return ["upper"]
        return (["ro"] if len(self.lowers) >= 2 else []) + ["rw"]


def _layers(base: Path, n: int) -> list[Path]:
    return [base / f"l{i + 1}" for i in range(n)]


def stack_precedence(base: Path) -> Stack:
    l1, l2, l3 = _layers(base, 3)
    build_layer(
        l1,
        {
            "same": F(b"top\n", mode=0o640, uid=1000, gid=1001, mtime_ns=T0),
            "d/a": F(b"l1 a\n", mtime_ns=T1),
            "d/only1": F(b"only in l1\n"),
            "d": D(mode=0o755, mtime_ns=T0),
        },
    )
    build_layer(
        l2,
        {
            "same": F(b"middle layer content\n", mode=0o600, mtime_ns=T1),
            "same2": F(b"mid2\n", mode=0o604, uid=2000, mtime_ns=T2),
            "d/a": F(b"l2 a (hidden)\n"),
            "d/b": F(b"l2 b\n", mode=0o444),
            "d/only2": F(b"only in l2\n"),
            "onlymid": F(b"only in the middle\n"),
            "d": D(mode=0o700, uid=3000, mtime_ns=T2),
        },
    )
    build_layer(
        l3,
        {
            "same": F(b"bottom\n"),
            "same2": F(b"bottom2\n"),
            "same3": F(b"bottom3\n", mtime_ns=T0),
            "d/a": F(b"l3 a\n"),
            "d/b": F(b"l3 b\n"),
            "d/c": F(b"l3 c\n"),
            "d/deep/x": F(b"deep only in l3\n"),
            "onlybot": F(b""),
            "e/f": F(b"e only in bottom\n"),
        },
    )
    return Stack("precedence", [l1, l2, l3], description="same names in 2-3 layers: topmost wins, dirs merge")


def stack_type_conflicts(base: Path) -> Stack:
    l1, l2, l3 = _layers(base, 3)
    build_layer(
        l1,
        {
            "file_over_dir": F(b"file wins\n"),
            "dir_over_file/x": F(b"x\n"),
            "symlink_over_dir": L("file_over_dir"),
            "dir_over_symlink/y": F(b"y\n"),
            "fifo_over_file": FIFO(),
            "file_over_fifo": F(b"f\n"),
            "chr_over_dir": CHR(1, 3),
            "dir_over_chr/z": F(b"z\n"),
            "f_d_f": F(b"top f\n"),
            "d_f_d/top": F(b"top of d_f_d\n"),
            "symlink_over_file": L("/nonexistent"),
            "dir_over_dir_over_file/a": F(b"a\n"),
        },
    )
    build_layer(
        l2,
        {
            "file_over_dir/sub/y": F(b"hidden\n"),
            "dir_over_file": F(b"hidden file\n"),
            "symlink_over_dir/z": F(b"hidden\n"),
            "dir_over_symlink": L("/etc"),
            "fifo_over_file": F(b"hidden\n"),
            "file_over_fifo": FIFO(),
            "chr_over_dir/q": F(b"hidden\n"),
            "dir_over_chr": CHR(1, 5),
            "f_d_f/k": F(b"hidden\n"),
            "d_f_d": F(b"file in the middle stops the merge\n"),
            "symlink_over_file": F(b"hidden\n"),
            "dir_over_dir_over_file/b": F(b"b\n"),
        },
    )
    build_layer(
        l3,
        {
            "f_d_f": F(b"bottom f\n"),
            "d_f_d/hidden_below": F(b"must not show\n"),
            "dir_over_dir_over_file": F(b"hidden by two dirs\n"),
        },
    )
    return Stack("type_conflicts", [l1, l2, l3], description="file/dir/symlink/special over each other")


def stack_merged_dir_attrs(base: Path) -> Stack:
    l1, l2, l3 = _layers(base, 3)
    build_layer(
        l1,
        {
            "md": D(mode=0o750, uid=1000, gid=1000, mtime_ns=T0, xattrs={"user.layer": b"1", "trusted.layer": b"t1"}),
            "md/a": F(b"a1\n"),
            "sticky": D(mode=0o1777, mtime_ns=T1),
            "sgid": D(mode=0o2755, gid=100),
            "suid_file": F(b"#!/bin/sh\n", mode=0o4755, uid=1000),
            "sgid_file": F(b"x", mode=0o2711, gid=50),
            "noperm": D(mode=0o000),
            "noperm/f": F(b"x", mode=0o000),
        },
    )
    build_layer(
        l2,
        {
            "md": D(mode=0o700, uid=2000, gid=2000, mtime_ns=T1, xattrs={"user.layer": b"2", "user.only2": b"o2"}),
            "md/b": F(b"b2\n"),
            "md/sub": D(mode=0o711, uid=4000, mtime_ns=T2, xattrs={"user.sub": b"2"}),
            "md/sub/s2": F(b"s2\n"),
            "sticky": D(mode=0o755),
            "sticky/f": F(b"f\n"),
            "sgid": D(mode=0o700),
            "noperm/g": F(b"g\n", mode=0o400),
        },
    )
    build_layer(
        l3,
        {
            "md": D(mode=0o755, mtime_ns=T2, xattrs={"user.layer": b"3"}),
            "md/c": F(b"c3\n"),
            "md/sub": D(mode=0o777, xattrs={"user.sub": b"3"}),
            "md/sub/s3": F(b"s3\n"),
        },
    )
    set_root_attrs(l1, mode=0o751, mtime_ns=T1, xattrs={"user.rootattr": b"l1"})
    set_root_attrs(l2, mode=0o700, uid=5, mtime_ns=T2, xattrs={"user.rootattr": b"l2"})
    return Stack(
        "merged_dir_attrs", [l1, l2, l3], description="merged dirs take mode/owner/times/xattrs from the topmost dir"
    )


def stack_char_whiteouts(base: Path) -> Stack:
    l1, l2, l3 = _layers(base, 3)
    build_layer(
        l1,
        {
            "wh_file": WH(),
            "wh_dir": WH(),
            "wh_nothing_below": WH(),
            "d/wh_in_merged": WH(),
            "d/kept1": F(b"k1\n"),
            "pure1/visible": F(b"v\n"),
            "pure1/wh_in_pure": WH(),  # dir only in l1: listed, ENOENT
            "resurrect": F(b"file above a whiteout\n"),
            "revive/new": F(b"new content\n"),  # dir above a whiteout: not merged below
            "wh_of_wh": WH(),
        },
    )
    build_layer(
        l2,
        {
            "wh_file": F(b"hidden\n"),
            "wh_dir": F(b"hidden too\n"),
            "mid_wh": WH(),
            "d/wh_in_merged": F(b"hidden\n"),
            "d/kept2": F(b"k2\n"),
            "d/mid_dir_wh": WH(),
            "d2/x": WH(),
            "d2/y": F(b"y2\n"),
            "resurrect": WH(),
            "revive": WH(),
            "wh_of_wh": WH(),
            "pure2/wh_alone": WH(),  # dir only in l2
            "pure2/f": F(b"f\n"),
        },
    )
    build_layer(
        l3,
        {
            "wh_dir/inner/file": F(b"hidden below a whiteout\n"),
            "mid_wh": F(b"hidden by the middle whiteout\n"),
            "d/mid_dir_wh/z": F(b"hidden\n"),
            "d/kept3": F(b"k3\n"),
            "d2/x": F(b"hidden\n"),
            "d2/z": F(b"z3\n"),
            "resurrect": F(b"old\n"),
            "revive/old": F(b"old content must stay hidden\n"),
            "wh_of_wh": F(b"hidden\n"),
        },
    )
    return Stack(
        "char_whiteouts", [l1, l2, l3], description="char 0/0 whiteouts in top and middle lowers, incl. of dirs"
    )


def stack_opaque_dirs(base: Path) -> Stack:
    l1, l2, l3 = _layers(base, 3)
    build_layer(
        l1,
        {
            "od/top": F(b"from l1\n"),
            "od/sub/t": F(b"t1\n"),
            "od_top": OPQ(),
            "od_top/a": F(b"a\n"),
            "opq_file": F(b"opaque xattr on a file\n", xattrs={"trusted.overlay.opaque": b"y"}),
            "opq_bad": OPQ(value=b"n"),
            "opq_bad/l1": F(b"1\n"),
            "opq_empty": OPQ(value=b""),
            "opq_empty/e1": F(b"e1\n"),
        },
    )
    build_layer(
        l2,
        {
            "od": OPQ(mode=0o700, mtime_ns=T0),
            "od/mid": F(b"from l2\n"),
            "od2": OPQ(),
            "od2/m": F(b"m\n"),
            "od3": OPQ(),
            "od3/x": WH(),  # whiteout inside an opaque dir: listed, ENOENT
            "od3/y": F(b"y\n"),
            "od_top/b": F(b"hidden\n"),
            "opq_file": F(b"hidden\n"),
            "opq_bad/l2": F(b"2\n"),
            "opq_empty/e2": F(b"e2\n"),
        },
    )
    build_layer(
        l3,
        {
            "od/hidden": F(b"hidden by the opaque middle dir\n"),
            "od/sub/hidden_sub": F(b"hidden\n"),
            "od2/hidden": F(b"hidden\n"),
            "od3/x": F(b"hidden\n"),
            "od_bottom": OPQ(),
            "od_bottom/v": F(b"opaque in the bottom layer has no effect\n"),
            "od_top/c": F(b"hidden\n"),
        },
    )
    return Stack(
        "opaque_dirs",
        [l1, l2, l3],
        description="trusted.overlay.opaque=y dirs in middle/top/bottom lowers",
        notes={"private_xattr_paths": ["od", "od2", "od3", "od_top", "od_bottom", "opq_file", "opq_bad", "opq_empty"]},
    )


def _xwh_layers(ns: str, l1: Path, l2: Path, l3: Path) -> None:
    build_layer(
        l1,
        {
            "xd": OPQ(ns, b"x"),
            "xd/gone": XWH(ns),
            "xd/gone_dir": XWH(ns),
            "xd/newfile": F(b"new\n"),
            "xd/not_a_whiteout": F(b"has data\n", xattrs={f"{ns}.overlay.whiteout": b""}),
            "nx/gone": XWH(ns),  # parent not opaque=x
            "nx/top": F(b"t\n"),
            "xonly": OPQ(ns, b"x"),
            "xonly/gone": XWH(ns),  # dir only in l1
            "xonly/f": F(b"f\n"),
            "rootgone": XWH(ns),
            "mx/top": F(b"top\n"),
            "yd": OPQ(ns, b"y"),
            "yd/a": F(b"a\n"),
            "chr_wh": WH(),
        },
    )
    build_layer(
        l2,
        {
            "xd/gone": F(b"hidden by an xattr whiteout\n"),
            "xd/gone_dir/inner": F(b"hidden\n"),
            "xd/keep": F(b"keep\n"),
            "xd/not_a_whiteout": F(b"hidden\n"),
            "nx/gone": F(b"hidden\n"),
            "nx/keep": F(b"k\n"),
            "rootgone": F(b"hidden\n"),
            "mx": OPQ(ns, b"x"),
            "mx/gone": XWH(ns),
            "mx/mid": F(b"mid\n"),
            "yd/hidden": F(b"hidden\n"),
            "chr_wh": F(b"hidden by a char whiteout\n"),
        },
    )
    build_layer(
        l3,
        {
            "mx/gone": F(b"hidden by the middle xattr whiteout\n"),
            "mx/bottom": F(b"b\n"),
            "xd/bottom": F(b"b\n"),
        },
    )


def stack_xattr_whiteouts(base: Path) -> Stack:
    l1, l2, l3 = _layers(base, 3)
    _xwh_layers("trusted", l1, l2, l3)
    return Stack(
        "xattr_whiteouts",
        [l1, l2, l3],
        description="trusted.overlay.whiteout files, opaque=x dirs",
        notes={"private_xattr_paths": ["xd", "xd/not_a_whiteout", "nx", "xonly", "mx", "yd"]},
    )


def stack_xattr_whiteouts_userxattr(base: Path) -> Stack:
    l1, l2, l3 = _layers(base, 3)
    _xwh_layers("user", l1, l2, l3)
    # under userxattr, trusted.overlay.* is NOT overlay metadata
    build_layer(
        l1,
        {
            "tyd": OPQ("trusted", b"y"),
            "tyd/a": F(b"a\n"),
            "twh": XWH("trusted"),
            "esc": F(
                b"escaped user.overlay.overlay.* xattr\n",
                xattrs={
                    "user.overlay.overlay.esc": b"v",
                    "user.plain": b"p",
                    "trusted.overlay.overlay.t": b"not escaped here",
                },
            ),
        },
    )
    build_layer(l2, {"tyd/b": F(b"not hidden under userxattr\n"), "twh": F(b"not hidden under userxattr\n")})
    return Stack(
        "xattr_whiteouts_userxattr",
        [l1, l2, l3],
        options=["userxattr"],
        description="user.overlay.* whiteouts/opaque with -o userxattr",
        notes={"private_xattr_paths": ["xd", "xd/not_a_whiteout", "nx", "xonly", "mx", "yd", "tyd", "esc"]},
    )


def stack_xattrs(base: Path) -> Stack:
    l1, l2 = _layers(base, 2)
    many = {f"user.k{i:03d}": b"v%d" % i for i in range(60)}
    build_layer(
        l1,
        {
            "f": F(
                b"f\n",
                xattrs={
                    "user.a": b"1",
                    "user.empty": b"",
                    "trusted.t": b"tv",
                    "user.bin": bytes(range(256)) * 4,
                    "trusted.overlay.overlay.esc": b"escaped",
                    "trusted.overlay.overlay.overlay.x": b"double",
                    "user.overlay.opaque": b"y",
                    "trusted.overlayfoo": b"not private",
                },
            ),
            "many": F(b"m\n", xattrs=many),
            "d": D(xattrs={"user.d": b"top", "trusted.d": b"td", "trusted.overlay.overlay.d": b"esc-d"}),
            "d/x": F(b"x\n"),
            "s": L("f", xattrs={"trusted.sym": b"on a symlink", "trusted.overlay.overlay.s": b"esc-s"}),
            "p": FIFO(xattrs={"trusted.fifo": b"on a fifo"}),
            "c": CHR(1, 3, xattrs={"trusted.dev": b"on a device"}),
            "big": F(b"b", xattrs={"user.big": bytes(4000)}),
        },
    )
    build_layer(
        l2,
        {
            "f": F(b"hidden\n", xattrs={"user.lower": b"must not show"}),
            "d": D(xattrs={"user.d": b"bottom", "user.bottom_only": b"must not show"}),
            "d/y": F(b"y\n", xattrs={"user.y": b"y"}),
            "plain": F(b"no xattrs\n"),
        },
    )
    return Stack(
        "xattrs",
        [l1, l2],
        description="user.*, trusted.*, escaped trusted.overlay.overlay.*",
        notes={"private_xattr_paths": ["f", "d", "s"]},
    )


def stack_hardlinks(base: Path) -> Stack:
    l1, l2 = _layers(base, 2)
    build_layer(
        l2,
        {
            "h1": F(b"three names\n"),
            "h2": H("h1"),
            "sub/h3": H("h1"),
            "hs1": F(b"one name shadowed by l1\n"),
            "hs2": H("hs1"),
            "hw1": F(b"one name whited out\n"),
            "hw2": H("hw1"),
            "e1": F(b""),
            "e2": H("e1"),
            "sym": L("h1"),
            "sym2": H("sym"),
            "fifo1": FIFO(),
            "fifo2": H("fifo1"),
        },
    )
    build_layer(
        l1,
        {
            "hs2": F(b"l1 shadows hs2\n"),
            "hw2": WH(),
            "t1": F(b"top layer pair\n"),
            "dir/t2": H("t1"),
        },
    )
    return Stack(
        "hardlinks",
        [l1, l2],
        description="hard-linked lower files",
        notes={"groups": [["h1", "h2", "sub/h3"], ["e1", "e2"], ["sym", "sym2"], ["fifo1", "fifo2"], ["dir/t2", "t1"]]},
    )


def stack_symlinks(base: Path) -> Stack:
    l1, l2 = _layers(base, 2)
    build_layer(
        l1,
        {
            "abs_etc": L("/etc"),
            "abs_passwd": L("/etc/passwd"),
            "rel": L("d/target"),
            "escape": L("../../../../outside/of/the/layer"),
            "dangling": L("nonexistent"),
            "loop": L("loop"),
            "chain_a": L("chain_b"),
            "chain_b": L("d/target"),
            "to_lower_dir": L("lowerdir"),
            "odd_target": L(b"sp ace/new\nline/\xff\xfe"),
            "long_target": L(b"x" * 4095),
            "owned": L("owned-target", uid=1000, gid=1000, mtime_ns=T0),
            "d/target": F(b"target\n"),
            "dot": L("."),
            "empty_dir_link": L("d/"),
        },
    )
    build_layer(
        l2,
        {
            "lowerdir/f": F(b"in l2\n"),
            "rel": F(b"hidden\n"),
            "d/other": L("../abs_etc"),
        },
    )
    return Stack("symlinks", [l1, l2], description="absolute/relative/dangling/escaping symlinks (never followed)")


def _deep_file(dir_char: bytes, comp_len: int, file_char: bytes, total: int):
    """(dir components, file name) with len("/".join(dirs + [file])) == total
    and every component <= NAME_MAX bytes."""
    dirs: list[bytes] = []
    while True:
        used = sum(len(c) + 1 for c in dirs)
        rest = total - used
        if rest <= NAME_MAX:
            break
        if rest - (comp_len + 1) < 1:
            comp_len = rest - NAME_MAX - 1 if rest - NAME_MAX - 1 > 0 else comp_len // 2
        dirs.append(dir_char * comp_len)
    return dirs, file_char * rest


def stack_deep_paths(base: Path) -> Stack:
    l1, l2 = _layers(base, 2)
    # deepest relative paths are exactly PATH_MAX - 1 = 4095 bytes long
    ldirs, lname = _deep_file(b"L", 250, b"f", PATH_MAX - 1)  # ~16 levels
    sdirs, sname = _deep_file(b"s", 1, b"g", PATH_MAX - 1)  # ~2000 levels
    lp, sp = b"/".join(ldirs), b"/".join(sdirs)
    lfile1, sfile1 = lp + b"/" + lname, sp + b"/" + sname
    assert len(lfile1) == len(sfile1) == PATH_MAX - 1
    build_layer(
        l1,
        {
            lfile1: F(b"deepest file in l1\n"),
            lp + b"/top_only": F(b"t\n"),
            sfile1: F(b"deepest short-component file in l1\n"),
            sp + b"/wh": WH(),
        },
    )
    build_layer(
        l2,
        {
            lp + b"/bottom_only": F(b"b\n"),
            lfile1: F(b"hidden\n"),
            sp + b"/wh": F(b"hidden\n"),
            sp + b"/b": F(b"b\n"),
            b"/".join(ldirs[:5]) + b"/side": F(b"side\n"),
        },
    )
    return Stack(
        "deep_paths",
        [l1, l2],
        description="paths of PATH_MAX-1 bytes, merged at every level",
        notes={"deep_files": [os.fsdecode(lfile1), os.fsdecode(sfile1)]},
    )


def stack_long_names(base: Path) -> Stack:
    l1, l2 = _layers(base, 2)

    def n255(c: bytes) -> bytes:
        return c * NAME_MAX

    build_layer(
        l1,
        {
            n255(b"f"): F(b"255-byte name\n"),
            n255(b"d") + b"/" + n255(b"i"): F(b"inner\n"),
            n255(b"s"): L(b"t" * 4095),
            n255(b"w"): WH(),
            n255(b"p"): FIFO(),
            (b"\xc3\xa9" * 127) + b"e": F(b"multibyte 255-byte name\n"),
        },
    )
    build_layer(
        l2,
        {
            n255(b"d") + b"/" + n255(b"j"): F(b"from l2\n"),
            n255(b"w"): F(b"hidden\n"),
            n255(b"f"): F(b"hidden\n"),
        },
    )
    return Stack("long_names", [l1, l2], description="names of exactly 255 bytes")


ODD_NAMES = [
    b"sp ace",
    b"new\nline",
    b"tab\tname",
    b"\xff\xfenon-utf8",
    b"-dash",
    "ünïcödé".encode(),
    b"\x01ctrl",
    b"back\\slash",
    b".wh.foo",
    b".wh..wh..opq",
    b"...",
    b".hidden",
    b"*?[glob]",
    b"quote'\"",
    b"trailing ",
    b"colon:name",
    b"comma,name",
    b"=eq",
    b"\x7f",
]


def stack_odd_names(base: Path) -> Stack:
    l1, l2 = _layers(base, 2)
    s1, s2 = {}, {}
    for i, n in enumerate(ODD_NAMES):
        s1[n] = F(b"l1 %d\n" % i)
        s2[b"dir " + n + b"/" + n] = F(b"l2 nested %d\n" % i)
        s1[b"dir " + n + b"/top"] = F(b"t\n")
    s2[b"\xff\xfenon-utf8"] = F(b"hidden\n")
    s2[b"wh \xff"] = F(b"hidden\n")
    s1[b"wh \xff"] = WH()
    s1[b"link\nname"] = L(b"new\nline")
    build_layer(l1, s1)
    build_layer(l2, s2)
    return Stack("odd_names", [l1, l2], description="non-UTF8, spaces, newlines, .wh.* (ordinary names for the kernel)")


BIG_DIR_TOTAL = 100_000


def stack_big_dir(base: Path) -> Stack:
    l1, l2 = _layers(base, 2)
    # l1: 0..59999, l2: 40000..99999 (20k overlap), plus 100 whiteouts in l1
    make_many_files(l1 / "big", (b"e%06d" % i for i in range(0, 60_000)))
    make_many_files(l2 / "big", (b"e%06d" % i for i in range(40_000, BIG_DIR_TOTAL)))
    bfd = os.open(l1 / "big", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(BIG_DIR_TOTAL - 100, BIG_DIR_TOTAL):
            os.mknod(b"e%06d" % i, stat.S_IFCHR, os.makedev(0, 0), dir_fd=bfd)
    finally:
        os.close(bfd)
    build_layer(l1, {"small": F(b"s\n")})
    return Stack(
        "big_dir", [l1, l2], modes_override=["ro"], description="a directory with 100k entries split over two layers"
    )


def stack_medium_dir(base: Path) -> Stack:
    """5000 names in one merged dir (several getdents calls per listing)."""
    l1, l2 = _layers(base, 2)
    make_many_files(l1 / "m", (b"name-%05d-%s" % (i, b"x" * (i % 40)) for i in range(0, 3000)))
    make_many_files(l2 / "m", (b"name-%05d-%s" % (i, b"x" * (i % 40)) for i in range(2000, 5000)))
    mfd = os.open(l1 / "m", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(4950, 5000):
            os.mknod(b"name-%05d-%s" % (i, b"x" * (i % 40)), stat.S_IFCHR, os.makedev(0, 0), dir_fd=mfd)
    finally:
        os.close(mfd)
    return Stack(
        "medium_dir", [l1, l2], description="5000 entries merged from two layers", notes={"dir": "m", "count": 4950}
    )


def stack_files_and_specials(base: Path) -> Stack:
    l1, l2 = _layers(base, 2)
    build_layer(
        l1,
        {
            "empty": F(b""),
            "one": F(b"1"),
            "page": BIG(4096, seed=1),
            "big": BIG(4 * 1024 * 1024 + 17, seed=2),
            "sparse": SPARSE(
                16 * 1024 * 1024, [(0, b"head"), (8 * 1024 * 1024, b"middle"), (16 * 1024 * 1024 - 4, b"tail")]
            ),
            "sparse_hole_only": SPARSE(1024 * 1024, []),
            "fifo": FIFO(mode=0o600),
            "null": CHR(1, 3, mode=0o666),
            "zero": CHR(1, 5),
            "blk": BLK(7, 0, mode=0o660, gid=6),
            "sock": SOCK(),
            "mode0": F(b"no permissions\n", mode=0),
            "mode7777": F(b"all bits\n", mode=0o7777),
            "owned": F(b"owned\n", uid=65534, gid=65534, mtime_ns=T2),
        },
    )
    build_layer(
        l2,
        {
            "big2": BIG(3 * 1024 * 1024 + 1, seed=3),
            "empty": F(b"hidden non-empty file\n"),
            "fifo": F(b"hidden\n"),
            "dev_in_l2": CHR(10, 229),
        },
    )
    return Stack(
        "files_and_specials",
        [l1, l2],
        description="empty, large, sparse files; fifo, char, block, socket",
        notes={"large_files": ["big", "big2", "sparse", "page"]},
    )


def stack_single_lower(base: Path) -> Stack:
    (l1,) = _layers(base, 1)
    build_layer(
        l1,
        {
            "f": F(b"f\n", mtime_ns=T0),
            "d/g": F(b"g\n"),
            "d/sub/h": F(b"h\n"),
            "d/wh": WH(),
            "od": OPQ(),
            "od/x": F(b"x\n"),
            "s": L("d/g"),
        },
    )
    set_root_attrs(l1, mode=0o700, mtime_ns=T1)
    return Stack("single_lower", [l1], description="one lower + fresh upper")


# ---- stacks whose layers were written by a KERNEL overlay ----------------


def _base_lowers_for_kernel_ops(b1: Path, b2: Path) -> None:
    build_layer(
        b1,
        {
            "cd/c1": F(b"c1\n"),
            "merged_rm/m1": F(b"m1\n"),
            "both": F(b"b1\n"),
        },
    )
    build_layer(
        b2,
        {
            "f": F(b"f\n"),
            "both": F(b"b2\n"),
            "d/g": F(b"g\n"),
            "d/sub/s": F(b"s\n"),
            "rmr/x/y": F(b"y\n"),
            "rmr/z": F(b"z\n"),
            "merged_rm/m2": F(b"m2\n"),
            "cd/c2": F(b"c2\n"),
            "h1": F(b"linked\n"),
            "h2": H("h1"),
            "mv": F(b"to be renamed\n"),
            "keep/k": F(b"k\n"),
            "emptyme/a": F(b"a\n"),
            "emptyme/b": F(b"b\n"),
            "rmdir_me": D(),
            "xa": F(b"xattr target\n"),
            "trunc": F(b"to be truncated\n"),
        },
    )


def kernel_ops(m: Path) -> None:
    """Typical changes done through a kernel overlay mounted at ``m``."""
    os.unlink(m / "f")  # whiteout
    os.unlink(m / "both")  # whiteout over two lowers
    shutil.rmtree(m / "rmr")  # whiteout of a dir
    os.mkdir(m / "rmr")  # ... and a new opaque dir over it
    (m / "rmr" / "new").write_bytes(b"new\n")
    shutil.rmtree(m / "merged_rm")  # rm -r of a merged dir, then mkdir
    os.mkdir(m / "merged_rm")
    os.rmdir(m / "rmdir_me")
    os.chmod(m / "d" / "g", 0o600)  # copy-up (origin), parent copied up
    os.chmod(m / "cd", 0o700)  # dir copy-up of a merged dir
    with open(m / "h1", "ab") as f:  # copy-up of one name of a link set
        f.write(b"appended\n")
    os.rename(m / "mv", m / "mv2")  # copy-up + whiteout at the old name
    os.mkdir(m / "newd")
    (m / "newd" / "n").write_bytes(b"n\n")
    (m / "keep" / "newfile").write_bytes(b"")  # parent dir copied up (impure)
    os.mkfifo(m / "fifo")
    os.symlink("d/g", m / "newlink")
    os.link(m / "d" / "sub" / "s", m / "slink")  # copy-up + upper hard link
    os.unlink(m / "emptyme" / "a")  # a merged dir holding only whiteouts
    os.unlink(m / "emptyme" / "b")
    os.setxattr(m / "xa", "user.added", b"via overlay")
    os.truncate(m / "trunc", 3)


def _kernel_upper(base: Path, b1: Path, b2: Path, name: str, options=()) -> Path:
    from .mounts import KernelOverlay  # local import: mounts imports nothing from here

    ku = base / name
    ku.mkdir()
    with KernelOverlay(
        [b1, b2], base / (name + "-mnt"), upper=ku, workdir=base / (name + "-work"), options=options
    ) as k:
        kernel_ops(k.path)
    return ku


def stack_kernel_upper_as_lower(base: Path) -> Stack:
    top, b1, b2 = base / "top", base / "b1", base / "b2"
    _base_lowers_for_kernel_ops(b1, b2)
    ku = _kernel_upper(base, b1, b2, "ku")
    build_layer(
        top,
        {
            "keep/top": F(b"from the new top layer\n"),
            "rmr/top": F(b"top over an opaque middle dir\n"),
            "newd/n": F(b"overrides\n"),
        },
    )
    return Stack(
        "kernel_upper_as_lower", [top, ku, b1, b2], description="an upper written by the kernel used as a MIDDLE lower"
    )


def stack_kernel_upper_alone(base: Path) -> Stack:
    top, b1, b2 = base / "top", base / "b1", base / "b2"
    _base_lowers_for_kernel_ops(b1, b2)
    ku = _kernel_upper(base, b1, b2, "ku")
    build_layer(top, {"t": F(b"t\n")})
    # ku as the bottom lower: its whiteouts and origin-carrying dirs have no
    # lower counterpart any more
    return Stack(
        "kernel_upper_alone", [top, ku], description="a kernel-written upper as the bottom lower, without its lowers"
    )


def stack_kernel_upper_userxattr_as_lower(base: Path) -> Stack:
    top, b1, b2 = base / "top", base / "b1", base / "b2"
    _base_lowers_for_kernel_ops(b1, b2)
    ku = _kernel_upper(base, b1, b2, "ku", options=["userxattr"])
    build_layer(top, {"rmr/top": F(b"t\n")})
    return Stack(
        "kernel_upper_userxattr_as_lower",
        [top, ku, b1, b2],
        options=["userxattr"],
        description="a userxattr kernel upper (user.overlay.*) as a middle lower",
    )


def prime_upper(stack: Stack, base: Path) -> None:
    """Mount the stack once with the kernel and walk it, then unmount.

    The kernel lazily WRITES to an upper during lookups (observed on 6.18: a
    merge dir in upper without ``trusted.overlay.origin`` gets an origin
    xattr, and its parent gets ``trusted.overlay.impure=y``), and what it
    reports on that first walk differs from later mounts (d_ino != st_ino).
    Priming brings the upper to the kernel's steady state before any
    comparison."""
    from .mounts import KernelOverlay
    from .snapshot import snapshot

    with KernelOverlay(
        stack.lowers, base / "prime-mnt", upper=stack.upper, workdir=base / "prime-work", options=stack.options
    ) as k:
        snapshot(k.path)
    # the raw upper as the kernel left it, to detect later writes by anyone
    stack.notes["pristine_upper"] = snapshot(stack.upper)


def stack_kernel_upper(base: Path) -> Stack:
    b1, b2 = base / "b1", base / "b2"
    _base_lowers_for_kernel_ops(b1, b2)
    ku = _kernel_upper(base, b1, b2, "ku")
    stack = Stack(
        "kernel_upper", [b1, b2], upper=ku, description="upper content written by the kernel, mounted as upper"
    )
    prime_upper(stack, base)
    return stack


def stack_kernel_upper_userxattr(base: Path) -> Stack:
    b1, b2 = base / "b1", base / "b2"
    _base_lowers_for_kernel_ops(b1, b2)
    ku = _kernel_upper(base, b1, b2, "ku", options=["userxattr"])
    stack = Stack(
        "kernel_upper_userxattr",
        [b1, b2],
        upper=ku,
        options=["userxattr"],
        description="upper written by the kernel with -o userxattr, mounted as upper",
    )
    prime_upper(stack, base)
    return stack


def stack_handmade_upper(base: Path) -> Stack:
    l1, l2 = _layers(base, 2)
    up = base / "upper"
    build_layer(
        l1,
        {
            "f": F(b"lower f\n"),
            "d/a": F(b"a\n"),
            "d/b": F(b"b\n"),
            "od/hidden": F(b"hidden\n"),
            "xd/gone": F(b"hidden by an upper xattr whiteout\n"),
            "xd/keep": F(b"keep\n"),
            "file_over": D(),
            "file_over/x": F(b"x\n"),
        },
    )
    build_layer(l2, {"d/c": F(b"c\n"), "wd/inner": F(b"i\n")})
    build_layer(
        up,
        {
            "f": F(b"upper f\n", mode=0o600),
            "d/a": WH(),
            "d/u": F(b"u\n"),
            "od": OPQ(),
            "od/new": F(b"n\n"),
            "od/wh_inside": WH(),
            "xd": OPQ(value=b"x"),
            "xd/gone": XWH(),
            "wd": WH(),
            "file_over": F(b"file over a lower dir\n"),
            "esc": F(b"e\n", xattrs={"trusted.overlay.overlay.k": b"v", "user.u": b"u"}),
            "pure_upper/z": F(b"z\n"),
            "pure_upper/wh_nothing": WH(),
        },
    )
    stack = Stack(
        "handmade_upper",
        [l1, l2],
        upper=up,
        description="hand-made upper: whiteouts, opaque=y/x dirs, escaped xattrs",
        notes={"private_xattr_paths": ["od", "xd", "esc", "."]},
    )
    prime_upper(stack, base)
    return stack


STACKS = {
    "precedence": stack_precedence,
    "type_conflicts": stack_type_conflicts,
    "merged_dir_attrs": stack_merged_dir_attrs,
    "char_whiteouts": stack_char_whiteouts,
    "opaque_dirs": stack_opaque_dirs,
    "xattr_whiteouts": stack_xattr_whiteouts,
    "xattr_whiteouts_userxattr": stack_xattr_whiteouts_userxattr,
    "xattrs": stack_xattrs,
    "hardlinks": stack_hardlinks,
    "symlinks": stack_symlinks,
    "deep_paths": stack_deep_paths,
    "long_names": stack_long_names,
    "odd_names": stack_odd_names,
    "big_dir": stack_big_dir,
    "medium_dir": stack_medium_dir,
    "files_and_specials": stack_files_and_specials,
    "single_lower": stack_single_lower,
    "kernel_upper_as_lower": stack_kernel_upper_as_lower,
    "kernel_upper_alone": stack_kernel_upper_alone,
    "kernel_upper_userxattr_as_lower": stack_kernel_upper_userxattr_as_lower,
    "kernel_upper": stack_kernel_upper,
    "kernel_upper_userxattr": stack_kernel_upper_userxattr,
    "handmade_upper": stack_handmade_upper,
}

#: stacks whose tests are marked slow (still part of the suite)
SLOW_STACKS = {"big_dir"}


def build_stack(name: str, base) -> Stack:
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    stack = STACKS[name](base)
    assert stack.modes == STACK_MODES[name], (name, stack.modes, STACK_MODES[name])
    return stack


#: the mount modes each stack is tested in (static, for test parametrization;
#: ``build_stack`` checks it against ``Stack.modes``)
STACK_MODES = {
    name: (
        ["upper"]
        if name in ("kernel_upper", "kernel_upper_userxattr", "handmade_upper")
        else ["rw"]
        if name == "single_lower"
        else ["ro"]
        if name == "big_dir"
        else ["ro", "rw"]
    )
    for name in STACKS
}
