"""Differential harness for the WRITE path: the same operations on a kernel
overlay mount and on a mount of the implementation under test, each over its
OWN, separately built but identical layer stack, then three comparisons:

(a) every operation's result (return value, or errno name);
(b) the merged view (``snapshot``), normalized so that two separately built
    stacks compare equal: inode numbers become tokens (``lower1:path`` for an
    inode of a lower layer, ``upper-root``, ``ino@PATH`` for any other inode
    = named after the first path, in sorted order, that reports it), so a new
    object's st_ino is compared only through equality relations, while a
    copied-up lower file must still report its lower inode; ctime is dropped
    and any time stamp at or after the start of the run becomes
    ``<recent>`` (the layers get deterministic times when they are built);
    st_blocks is dropped (it counts ext4's external xattr blocks, so it
    depends on the size of the private origin xattr);
(c) the UPPER layer on disk after unmount (``snapshot`` of the raw dir): the
    same normalization, plus (in the trusted.* and, for userxattr mounts, user.*
    namespace): ``overlay.origin`` values become ``<present>``, ``overlay.impure``
    is dropped, so is ``overlay.uuid`` on the upper root; char 0/0 whiteouts lose ino
    and nlink (the kernel hard-links all its whiteouts to one shared inode)
    and leave the hard-link groups; everything else (type, mode, uid/gid,
    size, sha256, symlink target, rdev, ``trusted.overlay.opaque``, escaped
    ``trusted.overlay.overlay.*``, user.*, mtime) is compared exactly;
and the workdir: after unmount it must hold only ``work/``, and ``work/`` may
hold nothing but char 0/0 whiteouts (observed: the kernel leaves its shared
whiteout inode ``work/#<hex>`` behind after unmount; anything else -- temp
files, half copies, dirs -- is a leak).

Typical use::

    def ops(m: Path, rec: Recorder):
        rec.do("chmod f", os.chmod, m / "f", 0o600)

    run = run_pair(tmp_path, LAYERS, ops)        # kernel first, then subject
    run.assert_results("chmod f")
    run.assert_view("f")
    run.assert_upper("f")
    run.assert_workdirs()
"""

from __future__ import annotations

import ast
import contextlib
import copy
import ctypes
import errno
import itertools
import os
import re
import select
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from overlayfs_py import _syscalls
from overlayfs_py._sys import RENAME_EXCHANGE as RENAME_EXCHANGE
from overlayfs_py._sys import RENAME_NOREPLACE as RENAME_NOREPLACE
from overlayfs_py._sys import RENAME_WHITEOUT as RENAME_WHITEOUT

from . import mounts
from .snapshot import diff_snapshots, format_diff, snapshot
from .stacks import T_UPPER, build_layer, set_root_attrs

#: deterministic atime/mtime given to every built object that got no
#: explicit time (parent dirs, layer roots, ...)
T_BUILD = 1_400_000_000_111_111_111

#: file systems stamp times from a coarse clock that lags ``time.time_ns()``
#: by up to a few ms: a run's "start" is taken this much before now
START_SLACK_NS = 2_000_000_000


def run_start() -> int:
    """The ``t_start`` of a run: every time stamp at or after it is
    ``<recent>``; objects built after it without an explicit time get
    ``T_BUILD``."""
    return time.time_ns() - START_SLACK_NS


RECENT = "<recent>"
PRESENT = "<present>"

AT_FDCWD = -100
SYS_renameat2 = _syscalls.number("renameat2")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def renameat2(src, dst, flags: int) -> None:
    r = _libc.syscall(
        ctypes.c_long(SYS_renameat2),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(src)),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(dst)),
        ctypes.c_uint(flags),
    )
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(src))


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


# --------------------------------------------------------------------------
# building layers
# --------------------------------------------------------------------------


#: paths at least this long are reached one component at a time (``open_rel``)
_LONG_PATH = 3000


def open_rel(root, rel: str, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> int:
    """An fd of ``root/rel`` (a directory on the way is never a symlink followed: the
    layers are built by the tests); a path too long for one call (a deep tree, longer
    than PATH_MAX) is walked one component at a time."""
    full = os.path.join(root, rel) if rel else os.fspath(root)
    if len(full) < _LONG_PATH:
        return os.open(full, flags | os.O_CLOEXEC)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    comps = rel.split("/")
    try:
        for i, comp in enumerate(comps):
            last = i == len(comps) - 1
            nfd = os.open(
                comp, (flags if last else os.O_PATH | os.O_DIRECTORY) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def walk_nofollow(root):
    """(relpath, lstat) of every object below ``root``, children after
    their dir, never following (nor resolving) a symlink: following one
    would update its atime. Works at any depth (``open_rel``)."""
    stack = [""]
    while stack:
        rel = stack.pop()
        fd = open_rel(root, rel)
        try:
            with os.scandir(fd) as it:
                for e in it:
                    r = os.path.join(rel, e.name) if rel else e.name
                    yield r, e.stat(follow_symlinks=False)
                    if e.is_dir(follow_symlinks=False):
                        stack.append(r)
        finally:
            os.close(fd)


def _fix_times(root: Path, cutoff_ns: int, value_ns: int = T_BUILD) -> None:
    """Give every object under ``root`` (and root) whose mtime is at or after
    ``cutoff_ns`` (= not set explicitly by the spec) the time ``value_ns``,
    children before parents."""
    items = sorted(walk_nofollow(root), key=lambda it: -it[0].count(os.sep))
    for rel, st in items:
        if st.st_mtime_ns < cutoff_ns:
            continue
        full = os.path.join(root, rel)
        if len(full) < _LONG_PATH:
            os.utime(full, ns=(value_ns, value_ns), follow_symlinks=False)
        else:
            parent, _, name = rel.rpartition("/")
            pfd = open_rel(root, parent, os.O_PATH | os.O_DIRECTORY)
            try:
                os.utime(name, ns=(value_ns, value_ns), dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(pfd)
    st = os.lstat(root)
    if st.st_mtime_ns >= cutoff_ns:
        os.utime(root, ns=(value_ns, value_ns))


def build_layers(base: Path, layers, cutoff_ns: int) -> list[Path]:
    """Build ``layers`` (list of specs, TOP lower first; a spec is a dict
    for ``build_layer`` or a callable ``f(root)``) under ``base/l1..lN``."""
    out = []
    for i, spec in enumerate(layers):
        root = base / f"l{i + 1}"
        root.mkdir(parents=True)
        if callable(spec):
            spec(root)
        else:
            build_layer(root, spec)
        _fix_times(root, cutoff_ns)
        out.append(root)
    return out


def inode_map(lowers: list[Path]) -> dict[int, str]:
    """st_ino -> ``lowerN:path`` for every object of the lower layers (first
    layer, then sorted path, wins for hard links)."""
    m: dict[int, str] = {}
    for i, root in enumerate(lowers):
        items = [(".", os.lstat(root).st_ino)]
        items += [(rel, st.st_ino) for rel, st in walk_nofollow(root)]
        for rel, ino in sorted(items):
            m.setdefault(ino, f"lower{i + 1}:{rel}")
    return m


# --------------------------------------------------------------------------
# normalization
# --------------------------------------------------------------------------


def norm_time(ns, t_start: int):
    if isinstance(ns, int) and ns >= t_start:
        return RECENT
    return ns


_INO_KEYS = ("ino", "d_ino", "dot_d_ino", "dotdot_d_ino")


def _tokenize(snap: dict, known: dict[int, str]) -> dict[int, str]:
    tokens = dict(known)
    for p in sorted(snap["entries"]):
        ino = snap["entries"][p].get("ino")
        if isinstance(ino, int) and ino not in tokens:
            tokens[ino] = f"ino@{p}"
    return tokens


def _sub_problem_numbers(problems, tokens):
    def rep(m):
        n = int(m.group(0))
        return tokens.get(n, m.group(0))

    return sorted(re.sub(r"\b\d{4,}\b", rep, p) for p in problems)


def normalize_view(snap: dict, known_inos: dict[int, str], t_start: int) -> dict:
    """Normalize a snapshot of a MOUNT (see the module docstring)."""
    snap = copy.deepcopy(snap)
    tokens = _tokenize(snap, known_inos)
    for rec in snap["entries"].values():
        for k in _INO_KEYS:
            if isinstance(rec.get(k), int):
                rec[k] = tokens.get(rec[k], "foreign")
        rec.pop("ctime_ns", None)
        rec.pop("blocks", None)
        if "mtime_ns" in rec:
            rec["mtime_ns"] = norm_time(rec["mtime_ns"], t_start)
    snap["problems"] = _sub_problem_numbers(snap["problems"], tokens)
    return snap


def _is_whiteout(rec) -> bool:
    return rec.get("type") == "chr" and rec.get("rdev") == (0, 0)


def normalize_upper(snap: dict, t_start: int) -> dict:
    """Normalize a snapshot of a raw UPPER dir (see the module docstring)."""
    snap = copy.deepcopy(snap)
    tokens = _tokenize(snap, {snap["entries"]["."]["ino"]: "upper-root"})
    whiteouts = set()
    for p, rec in snap["entries"].items():
        for k in ("d_ino", "dot_d_ino", "dotdot_d_ino", "ctime_ns", "blocks"):
            rec.pop(k, None)
        if _is_whiteout(rec):
            whiteouts.add(p)
            rec.pop("ino", None)
            rec.pop("nlink", None)
        elif isinstance(rec.get("ino"), int):
            rec["ino"] = tokens[rec["ino"]]
        if "mtime_ns" in rec:
            rec["mtime_ns"] = norm_time(rec["mtime_ns"], t_start)
        x = rec.get("xattrs")
        if isinstance(x, dict):
            for ns in ("trusted.overlay.", "user.overlay."):  # userxattr mounts use user.*
                x.pop(ns + "impure", None)
                if ns + "origin" in x:
                    x[ns + "origin"] = PRESENT
                if p == ".":
                    x.pop(ns + "uuid", None)
    groups = []
    for g in snap["hardlinks"]:
        g = tuple(x for x in g if x not in whiteouts)
        if len(g) > 1:
            groups.append(g)
    snap["hardlinks"] = sorted(groups)
    snap["problems"] = _sub_problem_numbers(snap["problems"], tokens)
    return snap


def pick(snap: dict, paths) -> dict:
    """The part of a snapshot about ``paths`` (each with everything below it;
    "." means the root entry only)."""
    paths = list(paths)

    def hit(p):
        return any(p == x or (x != "." and p.startswith(x + "/")) for x in paths)

    return {
        "entries": {p: r for p, r in snap["entries"].items() if hit(p)},
        "hardlinks": [g for g in snap["hardlinks"] if any(hit(x) for x in g)],
        "problems": [pr for pr in snap["problems"] if any(repr(x) in pr for x in paths)],
    }


def fix_kernel_stale_d_ino(snap: dict) -> dict:
    """Kernel quirk (6.18, observed): after ``link(lower_file, D/new)`` into a
    pure-upper dir D that is ``impure`` and whose readdir "impure cache"
    exists, readdir keeps reporting new's UPPER inode as d_ino while stat
    reports the origin's (lower) st_ino -- ovl_link does not bump D's cache
    version -- until the next change with an origin or cache eviction.  It
    depends on readdir history and memory pressure, so it is no oracle: on
    KERNEL views, a d_ino != st_ino is replaced by st_ino (the consistent
    answer, which the subject must give) and its problem line dropped."""
    snap = copy.deepcopy(snap)
    stale = []
    for p, rec in snap["entries"].items():
        if isinstance(rec.get("d_ino"), int) and isinstance(rec.get("ino"), int) and rec["d_ino"] != rec["ino"]:
            rec["d_ino"] = rec["ino"]
            stale.append(p)
    if stale:
        prefixes = tuple(f"{p!r}: d_ino " for p in stale)
        snap["problems"] = [pr for pr in snap["problems"] if not pr.startswith(prefixes)]
        snap.setdefault("kernel_stale_d_ino", stale)
    return snap


def workdir_problems(workdir: Path) -> list[str]:
    """What is wrong with a workdir after unmount: it must hold only
    ``work/``, holding nothing but char 0/0 whiteouts (the kernel's shared
    whiteout), and pyoverlay's record of the xattr form (``pyoverlay.json``)."""
    out = []
    try:
        names = sorted(os.listdir(workdir))
    except OSError as e:
        return [f"cannot list workdir {workdir}: {errname(e)}"]
    # index/: the inodes index of an index=on mount (the kernel's and pyoverlay's alike)
    if [n for n in names if n not in ("pyoverlay.json", "index")] != ["work"]:
        out.append(f"workdir holds {names}, want only ['work'] (and index/ with index=on)")
    w = workdir / "work"
    if not w.is_dir() or w.is_symlink():
        return out + ["workdir/work is missing or not a directory"]
    for n in sorted(os.listdir(w)):
        st = os.lstat(w / n)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            continue
        kind = stat.filemode(st.st_mode)
        out.append(f"work/{n} left behind ({kind}, size {st.st_size})")
    return out


# --------------------------------------------------------------------------
# results of operations
# --------------------------------------------------------------------------

_FT = [
    (stat.S_ISDIR, "dir"),
    (stat.S_ISREG, "file"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISCHR, "chr"),
    (stat.S_ISBLK, "blk"),
    (stat.S_ISSOCK, "sock"),
]


def ftype(mode: int) -> str:
    for t, n in _FT:
        if t(mode):
            return n
    return "?"


def norm(v, t_start: int):
    """A comparable, ``repr``-able form of an operation's return value."""
    if v is None:
        return "OK"
    if isinstance(v, os.stat_result):
        t = ftype(v.st_mode)
        d = {
            "type": t,
            "mode": oct(stat.S_IMODE(v.st_mode)),
            "uid": v.st_uid,
            "gid": v.st_gid,
            "nlink": v.st_nlink,
            "mtime": norm_time(v.st_mtime_ns, t_start),
        }
        if t != "dir":
            d["size"] = v.st_size
        if t in ("chr", "blk"):
            d["rdev"] = (os.major(v.st_rdev), os.minor(v.st_rdev))
        return d
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        v = bytes(v)
        if len(v) > 256:
            import hashlib

            return f"<{len(v)} bytes sha256 {hashlib.sha256(v).hexdigest()[:16]}>"
        return v
    if isinstance(v, dict):
        return {str(k): norm(x, t_start) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [norm(x, t_start) for x in v]
    return repr(v)


def stat_with_atime(p, t_start: int) -> dict:
    """lstat of ``p`` as ``norm`` gives it, plus the atime."""
    st = os.lstat(p)
    d = norm(st, t_start)
    d["atime"] = norm_time(st.st_atime_ns, t_start)
    return d


class Recorder:
    """Runs labelled operations and records each one's normalized result,
    ``"ERR:<ERRNO>"`` for an OSError."""

    def __init__(self, t_start: int):
        self.t_start = t_start
        self.results: dict[str, object] = {}

    def do(self, label: str, fn, *args, **kw):
        if label in self.results:
            raise ValueError(f"duplicate op label {label!r}")
        try:
            v = norm(fn(*args, **kw), self.t_start)
        except OSError as e:
            v = "ERR:" + errname(e)
        self.results[label] = v
        return v

    def child(self, label: str, fn, **kw):
        """``do`` in a forked child (see ``in_child``)."""
        if label in self.results:
            raise ValueError(f"duplicate op label {label!r}")
        v = in_child(fn, t_start=self.t_start, **kw)
        self.results[label] = v
        return v


def in_child(fn, *, uid=None, gid=None, umask=None, cwd=None, t_start: int = 0, timeout: float = 30.0):
    """Run ``fn()`` in a forked child, optionally after ``chdir(cwd)`` (done
    first, while still root: pytest's tmp dirs are 0700, so another user
    reaches the mount only through relative paths),
    ``setgroups([]) + setresgid(gid) + setresuid(uid)`` and ``umask``; return
    its normalized result (``"ERR:<ERRNO>"`` for an OSError).  The child is
    always reaped (killed after ``timeout``)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        data = b"'CHILD-FAILED'"
        try:
            os.close(r)
            if cwd is not None:
                os.chdir(cwd)
            if gid is not None:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
            if uid is not None:
                os.setresuid(uid, uid, uid)
            if umask is not None:
                os.umask(umask)
            try:
                res = norm(fn(), t_start)
            except OSError as e:
                res = "ERR:" + errname(e)
            data = repr(res).encode()
        except BaseException as e:  # noqa: BLE001
            data = repr("CHILD-EXCEPTION: " + repr(e)).encode()
        finally:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view) :]
            finally:
                os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                chunks = [repr("CHILD-TIMEOUT").encode()]
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return ast.literal_eval(b"".join(chunks).decode())


# --------------------------------------------------------------------------
# one side = one separately built stack (lowers + upper + workdir)
# --------------------------------------------------------------------------


class Side:
    """A stack built under ``root`` from ``layers``: lowers ``l1..lN`` (top
    first), an EMPTY ``upper`` (mode 0755 root:root, mtime T_UPPER) and a
    ``workdir``; mounts are made on fresh mountpoints under ``root``."""

    def __init__(self, root: Path, layers, t_start: int, options=()):
        self.root = Path(root)
        self.root.mkdir(parents=True)
        self.t_start = t_start
        self.options = list(options)
        self.lowers = build_layers(self.root, layers, t_start)
        self.upper = self.root / "upper"
        self.upper.mkdir()
        set_root_attrs(self.upper, mode=0o755, uid=0, gid=0, mtime_ns=T_UPPER)
        self.workdir = self.root / "workdir"
        self.workdir.mkdir()
        self._n = itertools.count(1)
        self.known_inos = inode_map(self.lowers)
        self.known_inos[os.lstat(self.upper).st_ino] = "upper-root"

    def fresh_workdir(self) -> Path:
        p = self.root / f"workdir-{next(self._n)}"
        p.mkdir()
        return p

    @contextlib.contextmanager
    def mount(self, impl: str, workdir: Path | None = None, watchdog=None):
        """Mount with ``impl`` ("kernel" or "subject"); always unmounted."""
        n = next(self._n)
        mnt = self.root / f"mnt{n}-{impl}"
        wd = workdir or self.workdir
        if impl == "kernel":
            cm = mounts.KernelOverlay(self.lowers, mnt, upper=self.upper, workdir=wd, options=self.options)
        else:
            cm = mounts.subject_mount(
                self.lowers,
                mnt,
                upper=self.upper,
                workdir=wd,
                options=self.options,
                log_path=self.root / f"mnt{n}-{impl}.log",
                watchdog=watchdog,
            )
        with cm as m:
            yield m

    def raw_view(self, m) -> dict:
        try:
            snap = snapshot(m.path)
        except OSError:
            m.check_alive()
            raise
        m.check_alive()
        if getattr(m, "kind", None) == "kernel":
            snap = fix_kernel_stale_d_ino(snap)
        return snap

    def view(self, m) -> dict:
        return normalize_view(self.raw_view(m), self.known_inos, self.t_start)

    def upper_snapshot(self) -> dict:
        return normalize_upper(snapshot(self.upper), self.t_start)

    def norm_view(self, raw: dict) -> dict:
        return normalize_view(raw, self.known_inos, self.t_start)


def subject_label() -> str:
    return mounts.subject_name()


# --------------------------------------------------------------------------
# the differential run
# --------------------------------------------------------------------------


@dataclass
class SideRun:
    impl: str
    side: Side
    results: dict = field(default_factory=dict)
    raw_view: dict | None = None
    view: dict | None = None
    upper: dict | None = None
    work_problems: list = field(default_factory=list)
    remount_diff: list | None = None
    remount_view: dict | None = None
    extra: dict = field(default_factory=dict)
    error: BaseException | None = None
    log: Path | None = None


def _run_side(sr: SideRun, ops, *, remount: bool, after=None) -> None:
    side = sr.side
    rec = Recorder(side.t_start)
    try:
        with side.mount(sr.impl) as m:
            sr.log = getattr(m, "log_path", None)
            ops(m.path, rec)
            sr.results = rec.results
            m.check_alive()
            sr.raw_view = side.raw_view(m)
            sr.view = side.norm_view(sr.raw_view)
            if after is not None:
                after(m.path, sr)
        sr.upper = side.upper_snapshot()
        sr.work_problems = workdir_problems(side.workdir)
        if remount:
            with side.mount(sr.impl) as m:
                again = side.raw_view(m)
                sr.remount_view = side.norm_view(again)
                sr.remount_diff = diff_snapshots(
                    sr.raw_view, again, a_name="before-unmount", b_name="after-remount", ignore_keys=("ctime_ns",)
                )
    except Exception as e:  # noqa: BLE001 - reported by the tests that need it
        sr.results = sr.results or rec.results
        sr.error = e


class PairRun:
    """Results of ``run_pair``; ``k`` is the kernel side, ``s`` the subject."""

    def __init__(self, k: SideRun, s: SideRun):
        self.k, self.s = k, s
        self.sname = subject_label()

    # -- access -----------------------------------------------------------
    def _need(self, sr: SideRun, what):
        if sr.error is not None:
            log = ""
            if sr.log and Path(sr.log).exists():
                log = "\n--- server log tail ---\n" + mounts._tail(sr.log, 40)
            raise AssertionError(
                f"{sr.impl} side failed before {what} could be compared: {sr.error!r}{log}"
            ) from sr.error

    def kupper(self, path: str) -> dict | None:
        self._need(self.k, "the upper")
        return self.k.upper["entries"].get(path)

    def kview(self, path: str) -> dict | None:
        self._need(self.k, "the view")
        return self.k.view["entries"].get(path)

    # -- comparisons --------------------------------------------------------
    def result_diff(self, labels=None) -> list[str]:
        labels = list(self.k.results) if labels is None else list(labels)
        out = []
        for lb in labels:
            kv = self.k.results.get(lb, "<not run>")
            sv = self.s.results.get(lb, "<not run>")
            if kv != sv:
                out.append(f"op {lb!r}: kernel={kv!r} {self.sname}={sv!r}")
        return out

    def assert_results(self, *labels):
        """Each op's result equals the kernel's (all ops if no labels)."""
        if self.k.error is not None and not self.k.results:
            self._need(self.k, "results")
        d = self.result_diff(labels or None)
        if not d and self.s.error is not None and not self.s.results:
            self._need(self.s, "results")
        assert not d, format_diff(d, "operation results differ from the kernel's:")

    def assert_view(self, *paths):
        """The merged view (of ``paths``, or all) equals the kernel's."""
        self._need(self.k, "the view")
        self._need(self.s, "the view")
        a, b = self.k.view, self.s.view
        if paths:
            a, b = pick(a, paths), pick(b, paths)
        d = diff_snapshots(a, b, a_name="kernel", b_name=self.sname)
        assert not d, format_diff(d, f"merged view {list(paths) or '(all)'} differs:")

    def assert_upper(self, *paths):
        """The upper dir after unmount (of ``paths``, or all) equals the kernel's."""
        self._need(self.k, "the upper")
        self._need(self.s, "the upper")
        a, b = self.k.upper, self.s.upper
        if paths:
            a, b = pick(a, paths), pick(b, paths)
        d = diff_snapshots(a, b, a_name="kernel-upper", b_name=f"{self.sname}-upper")
        assert not d, format_diff(d, f"upper layer {list(paths) or '(all)'} differs:")

    def assert_workdirs(self):
        self._need(self.k, "the workdir")
        self._need(self.s, "the workdir")
        assert not self.k.work_problems, f"kernel (oracle) workdir: {self.k.work_problems}"
        assert not self.s.work_problems, f"{self.sname} workdir after unmount: {self.s.work_problems}"

    def assert_remount_stable(self):
        """Each side's view after unmount + remount equals its view before
        (raw inode numbers included, ctime ignored), and the remounted views
        still agree."""
        self._need(self.k, "the remount")
        self._need(self.s, "the remount")
        assert self.k.remount_diff is not None, "run_pair(remount=True) needed"
        assert not self.k.remount_diff, format_diff(self.k.remount_diff, "KERNEL (oracle) not stable on remount:")
        assert not self.s.remount_diff, format_diff(
            self.s.remount_diff, f"{self.sname}: view after remount differs from before:"
        )
        d = diff_snapshots(self.k.remount_view, self.s.remount_view, a_name="kernel", b_name=self.sname)
        assert not d, format_diff(d, "views after remount differ:")

    def assert_all(self):
        self.assert_results()
        self.assert_view()
        self.assert_upper()
        self.assert_workdirs()


def run_pair(base: Path, layers, ops, *, remount: bool = False, options=(), after=None) -> PairRun:
    """Build ``layers`` twice (``base/kernel``, ``base/subject``), run
    ``ops(mountpoint, recorder)`` on a kernel mount of the first and on a
    subject mount of the second (one after the other), snapshot the views
    (``after(mountpoint, siderun)`` runs before unmount), unmount, snapshot
    the uppers, check the workdirs; optionally remount each with the same
    implementation.  Subject failures are stored and re-raised by the
    assertions that need the missing data."""
    t_start = run_start()
    ks = Side(Path(base) / "kernel", layers, t_start, options)
    ss = Side(Path(base) / "subject", layers, t_start, options)
    k = SideRun("kernel", ks)
    _run_side(k, ops, remount=remount, after=after)
    if k.error is not None:
        raise AssertionError(f"harness/oracle failure on the kernel side: {k.error!r}") from k.error
    s = SideRun("subject", ss)
    _run_side(s, ops, remount=remount, after=after)
    return PairRun(k, s)
