"""Seeded random-operation differential test of the write path.

Per seed (``PYOVERLAY_SEED=1,2,...`` or the fixed list below): a kernel
mount and a subject mount of two identical, separately built 3-lower stacks
(with whiteouts, opaque dirs, merged dirs, hard links, symlinks, a fifo) are
mounted side by side and get the same ~300 random operations (create,
write, append, truncate, unlink, mkdir, rmdir, rename of files and dirs,
symlink, link, chmod, chown, utime, setxattr user.*, mkfifo), plus ops aimed at
what the optional features change: renames of directories with lower content
(``redirect_dir=on``), chmod/chown/utimes/setxattr of lower files not copied up yet
(``metacopy=on``) and hard links of lower files (``index=on``).  Operations
are drawn from the KERNEL mount's current tree, so both sides always get
the same sequence.  Each case runs with a set of mount options (``OPTION_SETS``);
a set pyoverlay's config still refuses is skipped with the refusal as the reason,
so it runs by itself once the feature lands.  Checked:

1. every operation's result / errno (the first mismatch is reported with its
   index and the operation), and the views at checkpoints and at the end;
2. after unmount: the uppers (normalized) and the workdirs; then the
   subject-written upper mounted by the KERNEL must show the kernel-written
   view;
3. the subject remounting its own upper must show that view again.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat
import tempfile

import pytest

from helpers.snapshot import diff_snapshots, format_diff
from helpers.stacks import FIFO, OPQ, T0, T1, T2, WH, XWH, D, F, H, L
from helpers.writeops import Side, errname, run_start, subject_label, workdir_problems
from overlayfs_py.config import ConfigError, build_config

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

N_OPS = int(os.environ.get("PYOVERLAY_RANDOM_OPS", "300"))
CHECKPOINT = 50
SEEDS = [int(s) for s in os.environ["PYOVERLAY_SEED"].split(",")] if os.environ.get("PYOVERLAY_SEED") else [1, 2, 3]

NAMES = [
    "a",
    "b",
    "c",
    "d",
    "x",
    "y",
    "z",
    "m",
    "od",
    "wd",
    "hidden",
    "gone",
    "new",
    "n1",
    "n2",
    "s",
    "p",
    "h1",
    "h2",
    "k",
]
MODES = [0o644, 0o600, 0o755, 0o700, 0o444, 0o2755, 0o1777, 0o000, 0o640]
TIMES = [T0, T1, T2, 1_000_000_000_000_000_000]


def _layers():
    l3 = {
        "a/x": F(b"a/x from l3\n", mtime_ns=T0),
        "a/y": F(b"a/y hidden by l2's whiteout\n"),
        "b/z": F(b"b/z from l3, hidden by l1\n"),
        "c": F(b"c from l3\n", uid=1234, gid=5678, mtime_ns=T1, xattrs={"user.k0": b"l3"}),
        "od/hidden": F(b"hidden by the opaque dir in l2\n"),
        "wd/w": F(b"wd is whited out in l2\n"),
        "h1": F(b"hard-linked pair\n", mtime_ns=T0),
        "h2": H("h1"),
        "d/d/d/deep": F(b"deep\n", mtime_ns=T2),
        "d": D(mode=0o750, uid=1234, mtime_ns=T1),
        "xd/gone": F(b"hidden by l2's xattr whiteout\n"),
        "xd/k": F(b"xd/k from l3\n"),
    }
    l2 = {
        "a/y": WH(),
        "a/m": F(b"a/m from l2\n", mode=0o600, mtime_ns=T1),
        "od": OPQ(mtime_ns=T0),
        "od/v": F(b"od/v visible\n"),
        "wd": WH(),
        "b": D(mode=0o750, mtime_ns=T2),
        "b/q": F(b"b/q from l2\n"),
        "p": FIFO(mode=0o644),
        "s": L("c", mtime_ns=T0),
        "d/d/m": F(b"merged deep\n"),
        "xd": OPQ(value=b"x", mtime_ns=T1),  # holds an xattr whiteout (rmdir: ENOTEMPTY)
        "xd/gone": XWH(),
    }
    l1 = {
        "a/t": F(b"a/t from l1\n", mtime_ns=T2),
        "b/z": F(b"b/z from l1\n", uid=1000, gid=1000),
        "e/f": F(b"e/f only in l1\n", xattrs={"user.k1": b"e"}),
        "gone": WH(),
        "od/top": F(b"od/top from l1\n"),
        "n": L("a/x"),
    }
    return [l1, l2, l3]


# --------------------------------------------------------------------------
# op generation (from the kernel's tree) and application
# --------------------------------------------------------------------------


def _tree(root) -> dict[str, str]:
    """relpath -> type ("dir", "file", "symlink", "fifo", ...), never
    following symlinks; the root is ""."""
    out = {"": "dir"}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                try:
                    mode = e.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue  # listed but missing (whiteout in a pure dir)
                t = (
                    "dir"
                    if stat.S_ISDIR(mode)
                    else "file"
                    if stat.S_ISREG(mode)
                    else "symlink"
                    if stat.S_ISLNK(mode)
                    else "fifo"
                    if stat.S_ISFIFO(mode)
                    else "other"
                )
                out[r] = t
                if t == "dir":
                    stack.append(r)
    return out


def _gen(rng: random.Random, tree: dict[str, str], upper=None):
    """One random op on *tree* (the kernel mount's). *upper*: the kernel's upper layer,
    to aim ops at objects that are still lower-only (no name of theirs in it)."""
    paths = sorted(p for p in tree if p)
    dirs = sorted(p for p, t in tree.items() if t == "dir")
    files = [p for p in paths if tree[p] == "file"]
    nondirs = [p for p in paths if tree[p] != "dir"]
    subdirs = [d for d in dirs if d]

    def lower_only(pool):
        return [p for p in pool if upper is None or not os.path.lexists(os.path.join(upper, p))]

    def new_in_any_dir():
        d = rng.choice(dirs)
        return f"{d}/{rng.choice(NAMES)}" if d else rng.choice(NAMES)

    roll = rng.random()
    if roll < 0.25:  # the ops the optional features change, aimed at lower objects
        if roll < 0.08:  # redirect_dir: rename a directory with lower content
            pool = lower_only(subdirs) or subdirs
            if pool:
                return ("rename", rng.choice(pool), new_in_any_dir())
        pool = lower_only(files) or files or nondirs
        if not pool:
            return ("mkdir", new_in_any_dir(), 0o755)
        p = rng.choice(pool)
        if roll < 0.12:  # metacopy: metadata of a lower file
            return ("chmod", p, rng.choice(MODES))
        if roll < 0.15:
            return ("lchown", p, rng.choice([0, 1000, 1234]), rng.choice([0, 1000, 5678]))
        if roll < 0.18:
            return ("lutime", p, rng.choice(TIMES), rng.choice(TIMES))
        if roll < 0.21:
            return ("setxattr", p, f"user.k{rng.randrange(3)}", rng.randbytes(rng.randrange(1, 40)))
        # index: a new hard link of a lower file (h1/h2 are a lower hard-link pair)
        return ("link", p, new_in_any_dir())

    def new():
        d = rng.choice(dirs)
        n = rng.choice(NAMES)
        return f"{d}/{n}" if d else n

    def some(pool, p_new=0.15):
        if not pool or rng.random() < p_new:
            return new()
        return rng.choice(pool)

    kind = rng.choices(
        [
            "create",
            "write",
            "append",
            "truncate",
            "unlink",
            "mkdir",
            "rmdir",
            "rename_file",
            "rename_dir",
            "symlink",
            "link",
            "chmod",
            "chown",
            "utime",
            "setxattr",
            "mkfifo",
        ],
        weights=[10, 8, 6, 5, 8, 7, 5, 8, 5, 4, 5, 5, 4, 4, 5, 3],
    )[0]
    if kind == "create":
        p = some(files, 0.6)
        flags = ["O_CREAT"]
        if tree.get(p, "file") != "file" or rng.random() < 0.3:
            flags.append("O_EXCL")
        if rng.random() < 0.3:
            flags.append("O_TRUNC")
        return ("create", p, tuple(flags), rng.choice(MODES), rng.randbytes(rng.randrange(3000)))
    if kind in ("write", "append"):
        return (kind, some(files, 0.05), rng.randrange(5000), rng.randbytes(rng.randrange(1, 3000)))
    if kind == "truncate":
        return ("truncate", some(files, 0.05), rng.randrange(5000))
    if kind == "unlink":
        return ("unlink", some(nondirs if rng.random() < 0.9 else paths, 0.1))
    if kind == "mkdir":
        return ("mkdir", new() if rng.random() < 0.85 else some(paths), rng.choice(MODES[:4]))
    if kind == "rmdir":
        return ("rmdir", some(subdirs, 0.05))
    if kind == "rename_file":
        src = some(nondirs, 0.05)
        dst = some(nondirs, 0.6) if rng.random() < 0.5 else new()
        return ("rename", src, dst)
    if kind == "rename_dir":
        src = some(subdirs, 0.05)
        dst = new() if rng.random() < 0.7 else some(subdirs, 0.1)
        return ("rename", src, dst)
    if kind == "symlink":
        return ("symlink", rng.choice(NAMES + ["a/x", "b", "nowhere"]), new())
    if kind == "link":
        return ("link", some(nondirs, 0.05), new())
    if kind == "chmod":
        return ("chmod", some([p for p in paths if tree[p] != "symlink"] + [""], 0.05), rng.choice(MODES))
    if kind == "chown":
        return ("lchown", some(paths, 0.05), rng.choice([0, 1000, 1234, -1]), rng.choice([0, 1000, 5678, -1]))
    if kind == "utime":
        return ("lutime", some(paths, 0.05), rng.choice(TIMES), rng.choice(TIMES))
    if kind == "setxattr":
        if rng.random() < 0.2:
            return ("removexattr", some(paths, 0.05), f"user.k{rng.randrange(3)}")
        return ("setxattr", some(paths, 0.05), f"user.k{rng.randrange(3)}", rng.randbytes(rng.randrange(1, 40)))
    return ("mkfifo", new(), rng.choice(MODES[:4]))


def _apply(m, op):
    kind, path = op[0], op[1]
    p = os.path.join(m, path) if path else str(m)
    try:
        if kind == "create":
            flags = os.O_WRONLY | os.O_NONBLOCK
            for f in op[2]:
                flags |= getattr(os, f)
            fd = os.open(p, flags, op[3])
            try:
                n = os.write(fd, op[4]) if op[4] else 0
            finally:
                os.close(fd)
            return f"OK:{n}"
        if kind in ("write", "append"):
            flags = os.O_WRONLY | os.O_NONBLOCK | (os.O_APPEND if kind == "append" else 0)
            fd = os.open(p, flags)
            try:
                n = os.pwrite(fd, op[3], op[2]) if kind == "write" else os.write(fd, op[3])
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            return f"OK:{n}:{size}"
        if kind == "truncate":
            os.truncate(p, op[2])
        elif kind == "unlink":
            os.unlink(p)
        elif kind == "mkdir":
            os.mkdir(p, op[2])
        elif kind == "rmdir":
            os.rmdir(p)
        elif kind == "rename":
            os.rename(p, os.path.join(m, op[2]))
        elif kind == "symlink":
            os.symlink(path, os.path.join(m, op[2]))
        elif kind == "link":
            os.link(p, os.path.join(m, op[2]), follow_symlinks=False)
        elif kind == "chmod":
            os.chmod(p, op[2])
        elif kind == "lchown":
            os.chown(p, op[2], op[3], follow_symlinks=False)
        elif kind == "lutime":
            os.utime(p, ns=(op[2], op[3]), follow_symlinks=False)
        elif kind == "setxattr":
            os.setxattr(p, op[2], op[3], follow_symlinks=False)
        elif kind == "removexattr":
            os.removexattr(p, op[2], follow_symlinks=False)
        elif kind == "mkfifo":
            os.mkfifo(p, op[2])
        else:
            raise ValueError(op)
        return "OK"
    except OSError as e:
        return errname(e)


def _show(op) -> str:
    return repr(tuple(x if not isinstance(x, bytes) or len(x) < 20 else f"<{len(x)} bytes>" for x in op))


def _diff(a, b, an, bn, limit=40):
    return diff_snapshots(a, b, a_name=an, b_name=bn, limit=limit)


def _refused(options) -> str | None:
    """Why pyoverlay's config refuses the option set (None: it mounts with it): the
    feature cases skip themselves until config.py accepts their options."""
    if not options:
        return None
    with tempfile.TemporaryDirectory() as d:
        for sub in ("l", "u", "m"):
            os.mkdir(os.path.join(d, sub))
        try:
            build_config(os.path.join(d, "l"), os.path.join(d, "u"), os.path.join(d, "m"), options=[",".join(options)])
        except ConfigError as exc:
            return str(exc)
    return None


# --------------------------------------------------------------------------

#: the option sets the random ops run with, each with its seeds: the defaults; userxattr;
#: redirect_dir=on (directories with lower content renamed by redirect, then everything else
#: on top of them); every feature that changes the upper's format, together
#: (the feature sets get three more seeds by default: a run takes about a second)
FEATURE_SEEDS = SEEDS if os.environ.get("PYOVERLAY_SEED") else SEEDS + [4, 5, 6]
OPTION_SETS: list[tuple[tuple[str, ...], list[int]]] = [
    ((), SEEDS),
    (("userxattr",), SEEDS[-1:]),
    (("redirect_dir=on",), FEATURE_SEEDS),
    # metacopy=on: chmod, chown, utimes, xattrs, renames and links of lower files copy up
    # their metadata only; later writes and truncations copy the data
    (("metacopy=on",), SEEDS),
    (("redirect_dir=on", "metacopy=on", "index=on"), FEATURE_SEEDS),
]
# index=on (root only: file handles): hard links of the lowers copied up through the index
if os.geteuid() == 0:
    OPTION_SETS += [(("index=on",), SEEDS), (("index=on", "redirect_dir=on"), SEEDS[:1])]
CASES = [(seed, options, N_OPS) for options, seeds in OPTION_SETS for seed in seeds]
if not os.environ.get("PYOVERLAY_SEED"):
    # the userxattr hard-link corner (docs/semantics.md, "Namespace changes"): a fifo copied
    # up without an origin record, hard-linked and changed through both of its nodes
    CASES.append((130, ("userxattr",), max(N_OPS, 600)))
    # a longer run of each feature set: renames by redirect on top of renames by redirect
    CASES.append((7, ("redirect_dir=on",), max(N_OPS, 1000)))
    CASES.append((7, ("redirect_dir=on", "metacopy=on", "index=on"), max(N_OPS, 1000)))


@pytest.mark.parametrize(
    "seed,options,n_ops",
    CASES,
    ids=[f"{s}{'-' + ','.join(o) if o else ''}{'' if n == N_OPS else f'-{n}'}" for s, o, n in CASES],
)
def test_random_ops(tmp_path, seed, options, n_ops):
    """With ``-o userxattr`` both sides keep their private xattrs under user.overlay.*."""
    why = _refused(options)
    if why is not None:
        pytest.skip(f"metacopy/index refused: {why}")
    sname = subject_label()
    t0 = run_start()
    ks = Side(tmp_path / "kernel", _layers(), t0, options)
    ss = Side(tmp_path / "subject", _layers(), t0, options)
    rng = random.Random(seed)
    mismatches = []
    checkpoint_diff = None
    with contextlib.ExitStack() as es:
        km = es.enter_context(ks.mount("kernel"))
        sm = es.enter_context(ss.mount("subject"))
        for i in range(n_ops):
            op = _gen(rng, _tree(km.path), ks.upper)
            kr = _apply(km.path, op)
            sr = _apply(sm.path, op)
            if kr != sr:
                mismatches.append(f"op #{i} {_show(op)}: kernel={kr} {sname}={sr}")
            if checkpoint_diff is None and not mismatches and (i + 1) % CHECKPOINT == 0:
                d = _diff(ks.view(km), ss.view(sm), "kernel", sname)
                if d:
                    checkpoint_diff = (
                        f"views diverged between op #{i + 1 - CHECKPOINT} and op #{i} (all op results equal so far):",
                        d,
                    )
        sm.check_alive()
        kview, sview = ks.view(km), ss.view(sm)
    final = _diff(kview, sview, "kernel", sname)
    if mismatches:
        pytest.fail(
            f"seed {seed}: {len(mismatches)} of {n_ops} ops differ; first "
            f"mismatch: {mismatches[0]}\n"
            + format_diff(mismatches[1:10], "next ones:")
            + "\n"
            + format_diff(final[:20], "view differences at the end:"),
            pytrace=False,
        )
    if checkpoint_diff:
        pytest.fail(f"seed {seed}: " + format_diff(checkpoint_diff[1], checkpoint_diff[0]), pytrace=False)
    assert not final, format_diff(final, f"seed {seed}: final views differ:")

    # after unmount: uppers and workdirs. With index=on the upper names linked to an index
    # entry may differ: a chmod, write or setxattr through a name of a hard-link set links
    # that name up in the kernel, the node's first name in pyoverlay (FUSE gives no name;
    # docs/semantics.md, "Index"); the views (and the cross mounts below) are the same.
    indexed = "index=on" in options
    kup, sup = ks.upper_snapshot(), ss.upper_snapshot()
    d = [] if indexed else _diff(kup, sup, "kernel-upper", f"{sname}-upper")
    assert not d, format_diff(d, f"seed {seed}: upper layers differ after unmount:")
    assert not workdir_problems(ks.workdir), workdir_problems(ks.workdir)
    assert not workdir_problems(ss.workdir), f"{sname}: {workdir_problems(ss.workdir)}"

    # The oracle for what is on disk is the kernel's fresh mount of its own upper, not its
    # live view: within a mount, the kernel keeps the lower st_ino of an object copied up
    # without an origin record (userxattr: a fifo or symlink) under its first name and
    # reports the upper one for hard links found later; a fresh mount reports the upper
    # one for every name (docs/semantics.md, "Namespace changes").
    # (index=on: the workdir holds the index, which serves names not linked up: kept)
    with ks.mount("kernel", workdir=None if indexed else ks.fresh_workdir()) as m:
        k_again = ks.view(m)

    # the subject-written upper, mounted by the kernel
    with ss.mount("kernel", workdir=None if indexed else ss.fresh_workdir()) as m:
        k_of_s = ss.view(m)
    d = _diff(k_again, k_of_s, "kernel-written (kernel view)", f"{sname}-written (kernel view)")
    assert not d, format_diff(d, f"seed {seed}: the kernel reads the {sname}-written upper differently from its own:")

    # and remounted by the subject again
    with ss.mount("subject") as m:
        again = ss.view(m)
    d = _diff(k_again, again, "kernel after remount", f"{sname} after remount")
    assert not d, format_diff(d, f"seed {seed}: {sname} remount shows a different view:")
