"""Read view of pyoverlay compared with the kernel's overlayfs (the oracle).

Every named stack (tests/helpers/stacks.py) is mounted by the kernel and by
pyoverlay with the same layers, in each of its modes:

* ``ro``    lowers only (read-only mount; the kernel needs >= 2 lowers),
* ``rw``    a fresh EMPTY upper + workdir per mount (never shared),
* ``upper`` the stack's prepared upper (kernel-written or hand-made, primed by
            one kernel mount), used by one mount at a time.

Snapshots (tests/helpers/snapshot.py) record, per path: type, mode, uid, gid,
size, nlink, st_ino, d_ino, d_type, mtime/ctime, blocks, blksize, rdev,
symlink target, sha256 of content, xattrs, whether st_dev is the root's, and
names that readdir lists but lstat cannot find ("listed-but-missing", what
the kernel does for whiteouts in non-merged dirs).  All layers are on one
filesystem, so pyoverlay must report the kernel's inode numbers exactly.
"""

from __future__ import annotations

import errno
import os

import pytest

from helpers import mounts
from helpers.snapshot import diff_snapshots, format_diff
from helpers.stacks import SLOW_STACKS, STACK_MODES

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

#: compared by test_dot_entries_match_kernel, not by the full-view test
DOT_KEYS = ("dot_d_ino", "dotdot_d_ino")

BIG_WATCHDOG = 1500.0


def _cases(stacks=None, modes=None):
    out = []
    for name, ms in STACK_MODES.items():
        if stacks is not None and name not in stacks:
            continue
        for mode in ms:
            if modes is not None and mode not in modes:
                continue
            marks = [pytest.mark.slow, pytest.mark.timeout(3000)] if name in SLOW_STACKS else []
            out.append(pytest.param(name, mode, id=f"{name}-{mode}", marks=marks))
    return out


ALL_CASES = _cases()


def _snaps(lab, name, mode):
    wd = BIG_WATCHDOG if name in SLOW_STACKS else None
    return lab.snapshots(name, mode, watchdog=wd)


def _subject():
    return mounts.subject_name()


def _children(snap) -> dict[str, set]:
    """dir path -> set of names listed by readdir (from a snapshot)."""
    out: dict[str, set] = {p: set() for p, r in snap["entries"].items() if r["type"] == "dir"}
    for p in snap["entries"]:
        if p == ".":
            continue
        parent, _, name = p.rpartition("/")
        out.setdefault(parent or ".", set()).add(name)
    return out


# --------------------------------------------------------------------------


@pytest.mark.parametrize("name,mode", ALL_CASES)
def test_view_matches_kernel(lab, name, mode):
    """Full read view (stat, st_ino, nlink, listings, whiteouts listed-but-
    missing, xattrs, contents, hard-link groups) equals the kernel's."""
    ks, ss = _snaps(lab, name, mode)
    diff = diff_snapshots(ks, ss, a_name="kernel", b_name=_subject(), ignore_keys=DOT_KEYS)
    assert not diff, format_diff(
        diff,
        f"stack {name!r} mode {mode!r}: {_subject()} differs from the kernel overlay "
        f"(kernel = oracle; {len(ks['entries'])} kernel entries):",
    )


@pytest.mark.parametrize("name,mode", ALL_CASES)
def test_readdir_lists_each_name_once_and_dots(lab, name, mode):
    """readdir: every name once, '.' and '..' present, no whiteouts or private
    entries in merged dirs (the listing of each dir equals the kernel's)."""
    ks, ss = _snaps(lab, name, mode)
    bad = [p for p in ss["problems"] if "more than once" in p or "'.' x" in p]
    kc, sc = _children(ks), _children(ss)
    for d in sorted(set(kc) | set(sc)):
        extra = sorted(sc.get(d, set()) - kc.get(d, set()))
        missing = sorted(kc.get(d, set()) - sc.get(d, set()))
        if extra:
            bad.append(f"{d!r}: listed by {_subject()} but not by the kernel: {extra[:10]}")
        if missing:
            bad.append(f"{d!r}: listed by the kernel but not by {_subject()}: {missing[:10]}")
    for p, r in ss["entries"].items():
        if r["type"] == "dir" and (r.get("dot_d_ino") is None or r.get("dotdot_d_ino") is None):
            bad.append(f"{p!r}: readdir lacks '.' or '..'")
    # the kernel never lists a name twice; keep that visible if it ever changes
    assert not [p for p in ks["problems"] if "more than once" in p], ks["problems"][:5]
    assert not bad, format_diff(bad[:60], f"{name} [{mode}] readdir problems:")


@pytest.mark.parametrize("name,mode", ALL_CASES)
def test_dot_entries_match_kernel(lab, name, mode):
    """d_ino of '.' and '..' in every directory equals the kernel's.

    Kernel facts (6.18, same-fs layers): '.' always has the dir's st_ino.
    '..' has the merged parent's st_ino in directories read straight from one
    layer, but in merged directories (and single-layer dirs that carry an
    overlay.origin xattr) it is the inode number of the parent *in the
    topmost layer that holds the directory* -- which differs from the merged
    parent's st_ino when that layer is not the parent's topmost layer.  For
    the root, '..' is the inode of the top layer dir's real parent."""
    ks, ss = _snaps(lab, name, mode)
    bad = []
    for p, kr in ks["entries"].items():
        if kr["type"] != "dir" or p not in ss["entries"]:
            continue
        sr = ss["entries"][p]
        parent = p.rpartition("/")[0] or "."
        ctx = {
            "dot_d_ino": f"the dir's st_ino: kernel={kr.get('ino')!r}",
            "dotdot_d_ino": (f"the merged parent's st_ino: kernel={ks['entries'][parent].get('ino')!r}")
            if p != "."
            else "root: want the inode of the top layer dir's real parent",
        }
        for k in DOT_KEYS:
            if kr.get(k) != sr.get(k):
                bad.append(f"{p!r}: {k}: kernel={kr.get(k)!r} {_subject()}={sr.get(k)!r} ({ctx[k]})")
    assert not bad, format_diff(bad[:60], f"{name} [{mode}]: '.'/'..' d_ino differ:")


@pytest.mark.parametrize("name,mode", ALL_CASES)
def test_d_ino_equals_st_ino(lab, name, mode):
    """readdir's d_ino equals lstat's st_ino for every listed name (where the
    kernel's does; the kernel is consistent on all stacks here)."""
    ks, ss = _snaps(lab, name, mode)
    kbad = {p for p in ks["problems"] if "d_ino" in p}
    sbad = [p for p in ss["problems"] if "d_ino" in p and p not in kbad]
    assert not sbad, format_diff(sbad[:60], f"{name} [{mode}]: d_ino != st_ino in {_subject()}:")


# --------------------------------------------------------------------------
# private xattrs

PRIVATE = ("opaque", "whiteout", "origin", "impure", "redirect", "metacopy", "nlink", "upper", "uuid", "protattr")


def _getxattr_results(view, paths, names):
    out = {}
    for p in paths:
        full = view.path / p if p != "." else view.path
        for n in names:
            try:
                out[(p, n)] = os.getxattr(full, n, follow_symlinks=False)
            except OSError as e:
                out[(p, n)] = errno.errorcode.get(e.errno, e.errno)
    view.check_alive()
    return out


PRIVATE_XATTR_CASES = _cases(stacks=[n for n in STACK_MODES if n not in SLOW_STACKS and n not in ("deep_paths",)])


@pytest.mark.parametrize("name,mode", PRIVATE_XATTR_CASES)
def test_overlay_private_xattrs_hidden(lab, name, mode):
    """getxattr of <ns>.overlay.{opaque,whiteout,origin,...} through the mount
    gives what the kernel gives (ENODATA: overlay metadata is never exposed;
    ns = trusted, or user with -o userxattr), for every entry of the stack."""
    stack = lab.stack(name)
    ks, _ = _snaps(lab, name, mode)
    paths = [p for p, r in ks["entries"].items() if r["type"] != "listed-but-missing"]
    ns = "user" if "userxattr" in stack.options else "trusted"
    names = [f"{ns}.overlay.{x}" for x in PRIVATE] + [f"{ns}.overlay.overlay.{x}" for x in ("opaque", "esc")]
    with lab.view(stack, mode, "kernel") as kv:
        kres = _getxattr_results(kv, paths, names)
    with lab.view(stack, mode, "subject") as sv:
        sres = _getxattr_results(sv, paths, names)
    # the kernel hides every private name (documenting the oracle)
    for (p, n), v in kres.items():
        if ".overlay.overlay." not in n:
            assert v == "ENODATA", f"kernel exposes {n} on {p!r}: {v!r}"
    bad = [
        f"{p!r} {n}: kernel={kres[(p, n)]!r} {_subject()}={sres[(p, n)]!r}"
        for (p, n) in kres
        if kres[(p, n)] != sres[(p, n)]
    ]
    assert not bad, format_diff(bad[:60], f"{name} [{mode}]: private xattr lookups differ:")


# --------------------------------------------------------------------------
# hard links, inode stability


@pytest.mark.parametrize("name,mode", _cases(stacks=["hardlinks"]))
def test_hardlinked_lower_files_share_ino(lab, name, mode):
    ks, ss = _snaps(lab, name, mode)
    stack = lab.stack(name)
    for snap, who in ((ks, "kernel"), (ss, _subject())):
        e = snap["entries"]
        for group in stack.notes["groups"]:
            inos = {p: e[p]["ino"] for p in group if p in e}
            assert len(inos) == len(group), f"{who}: names missing from {group}: {inos}"
            assert len(set(inos.values())) == 1, f"{who}: hard links differ in st_ino: {inos}"
            nl = {p: e[p]["nlink"] for p in group}
            assert len(set(nl.values())) == 1, f"{who}: nlink differs within {group}: {nl}"
        # names shadowed/whited out in l1 keep the lower file's real nlink
        assert e["hs1"]["nlink"] == 2 and e["hw1"]["nlink"] == 2, (who, e["hs1"], e["hw1"])
        assert e["h1"]["nlink"] == 3, (who, e["h1"])
    assert ks["hardlinks"] == ss["hardlinks"], (ks["hardlinks"], ss["hardlinks"])


REMOUNT_CASES = _cases(
    stacks=[
        "precedence",
        "hardlinks",
        "kernel_upper",
        "handmade_upper",
        "kernel_upper_userxattr",
        "kernel_upper_as_lower",
        "merged_dir_attrs",
        "char_whiteouts",
    ],
    modes=["ro", "upper"],
)


def _inos(snap):
    return {p: (r.get("ino"), r.get("d_ino")) for p, r in snap["entries"].items()}


@pytest.mark.parametrize("name,mode", REMOUNT_CASES)
def test_st_ino_stable_across_remount(lab, name, mode):
    stack = lab.stack(name)
    with lab.view(stack, mode, "subject") as v:
        first = _inos(v.snapshot(content=False, xattrs=False))
    with lab.view(stack, mode, "subject") as v:
        second = _inos(v.snapshot(content=False, xattrs=False))
    bad = [
        f"{p!r}: (st_ino, d_ino) first={first.get(p)} second={second.get(p)}"
        for p in sorted(set(first) | set(second))
        if first.get(p) != second.get(p)
    ]
    assert not bad, format_diff(bad[:60], f"{name} [{mode}]: inode numbers changed on remount:")
    ks, _ = _snaps(lab, name, mode)
    kin = _inos(ks)
    bad = [f"{p!r}: kernel={kin[p]} {_subject()}={first.get(p)}" for p in kin if kin[p] != first.get(p)]
    assert not bad, format_diff(bad[:60], f"{name} [{mode}]: inode numbers differ from kernel:")


# --------------------------------------------------------------------------
# the subject must not write to a prepared upper while only reading


@pytest.mark.parametrize("name,mode", _cases(stacks=["kernel_upper", "kernel_upper_userxattr", "handmade_upper"]))
def test_read_walk_does_not_modify_upper(lab, name, mode):
    """Reading the whole tree must not write to the upper dir.  Compared with
    the raw upper as left by the priming kernel mount (so a write by an
    earlier test's mount shows up here too)."""
    from helpers.snapshot import snapshot

    stack = lab.stack(name)
    pristine = stack.notes["pristine_upper"]
    with lab.view(stack, mode, "kernel") as kv:
        kv.snapshot()
    after_kernel = snapshot(stack.upper)
    # documents the oracle: a primed upper is not touched by a kernel walk
    kd = diff_snapshots(
        pristine, after_kernel, a_name="pristine", b_name="after kernel walk", ignore_keys=("ctime_ns",)
    )
    with lab.view(stack, mode, "subject") as sv:
        sv.snapshot()
    after = snapshot(stack.upper)
    d = diff_snapshots(pristine, after, a_name="pristine", b_name=f"after {_subject()} walk", ignore_keys=("ctime_ns",))
    assert not d, format_diff(d, f"{_subject()} modified the upper dir (during this or an earlier read-only walk):")
    assert not kd, format_diff(kd, "kernel modified the (primed) upper:")


# --------------------------------------------------------------------------
# file contents with random access


@pytest.mark.parametrize("name,mode", _cases(stacks=["files_and_specials"]))
def test_file_contents_random_access(lab, name, mode):
    import mmap

    stack = lab.stack(name)
    files = stack.notes["large_files"]
    sources = {}
    for f in files:
        for layer in stack.lowers:
            if (layer / f).exists():
                sources[f] = (layer / f).read_bytes()
                break

    def offsets(n):
        return sorted(
            {0, 1, 4095, 4096, 4097, 65535, 131072, 1 << 20, (1 << 20) + 3, n // 2, n - 4097, n - 1, n, n + 10} - {-1}
        )

    sizes = [1, 100, 4096, 65537, 131072, 1 << 20, 3 << 20]
    with lab.view(stack, mode, "subject") as v:
        bad = []
        for f, data in sources.items():
            fd = os.open(v.path / f, os.O_RDONLY)
            try:
                for off in offsets(len(data)):
                    if off < 0:
                        continue
                    for size in sizes:
                        got = os.pread(fd, size, off)
                        if got != data[off : off + size]:
                            bad.append(
                                f"{f}: pread({size}, {off}) returned {len(got)} bytes, "
                                f"content differs from the layer file"
                            )
                            break
                # sequential reads with an odd chunk size
                os.lseek(fd, 0, os.SEEK_SET)
                chunks = []
                while True:
                    b = os.read(fd, 65537)
                    if not b:
                        break
                    chunks.append(b)
                if b"".join(chunks) != data:
                    bad.append(f"{f}: sequential read differs")
                if data:
                    with mmap.mmap(fd, len(data), prot=mmap.PROT_READ) as mm:
                        if mm[:] != data:
                            bad.append(f"{f}: mmap content differs")
            finally:
                os.close(fd)
        v.check_alive()
    assert not bad, format_diff(bad[:40], f"{name} [{mode}] content problems:")


# --------------------------------------------------------------------------
# readdir positions: telldir/seekdir/rewinddir on a dir needing many getdents


def _dir_walk_with_seeks(path) -> dict:
    import ctypes

    from helpers.snapshot import _libc, _readdir

    _libc.opendir.argtypes = [ctypes.c_char_p]
    _libc.opendir.restype = ctypes.c_void_p
    _libc.telldir.argtypes = [ctypes.c_void_p]
    _libc.telldir.restype = ctypes.c_long
    _libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    _libc.rewinddir.argtypes = [ctypes.c_void_p]
    dirp = _libc.opendir(os.fsencode(str(path)))
    assert dirp, f"opendir({path}) failed: {os.strerror(ctypes.get_errno())}"

    def read(n=None):
        out = []
        while n is None or len(out) < n:
            ent = _readdir(dirp)
            if not ent:
                break
            out.append(ent.contents.d_name)
        return out

    try:
        first = read(1234)
        pos = _libc.telldir(dirp)
        after = read(25)
        _libc.seekdir(dirp, pos)
        again = read(25)
        rest = read()
        _libc.rewinddir(dirp)
        full = read()
    finally:
        _libc.closedir(dirp)
    return {"first": first, "after": after, "again": again, "rest": rest, "full": full}


@pytest.mark.parametrize("name,mode", _cases(stacks=["medium_dir"]))
def test_readdir_seekdir_and_rewind(lab, name, mode):
    """telldir/seekdir return to the same position, rewinddir restarts, and a
    full listing read through several getdents calls has no duplicates."""
    stack = lab.stack(name)
    results = {}
    for impl in ("kernel", "subject"):
        with lab.view(stack, mode, impl) as v:
            results[impl] = _dir_walk_with_seeks(v.path / stack.notes["dir"])
            v.check_alive()
    bad = []
    for impl, r in results.items():
        who = "kernel" if impl == "kernel" else _subject()
        if r["after"] != r["again"]:
            bad.append(f"{who}: after seekdir(telldir()) got {r['again'][:3]}... instead of {r['after'][:3]}...")
        once = r["first"] + r["after"] + r["rest"]
        for label, names in (("first pass", once), ("after rewinddir", r["full"])):
            dups = len(names) - len(set(names))
            if dups:
                bad.append(f"{who}: {label}: {dups} names listed more than once")
            want = stack.notes["count"] + 2
            if len(set(names)) != want:
                bad.append(f"{who}: {label}: {len(set(names))} distinct names, want {want}")
        if set(once) != set(r["full"]):
            bad.append(f"{who}: the listing after rewinddir differs from the first one")
    assert not bad, "\n".join(bad)
