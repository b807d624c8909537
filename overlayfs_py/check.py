"""``pyoverlay check``: find (and with ``repair`` fix) what is wrong in an upper layer and
its workdir while nothing has them mounted. The kernel's counterpart is ``fsck.overlay``
(overlayfs-progs); this follows what it checks where it applies, plus what pyoverlay
itself writes. Pure reading and writing of layer directories, no FUSE.

What is checked (every name below is one ``Problem.kind``; docs/mounting.md, "Checking an
upper layer", says what each means and what the repair does):

* ``work-orphan``: an entry of ``<workdir>/work`` (a temporary of an interrupted mount;
  the kernel and pyoverlay empty ``work/`` at mount). Repair: removed. A whiteout there is
  not one: the kernel keeps one in ``work/`` and makes every whiteout a link to it. With
  ``index=on`` the index dir is the work dir: its ``#`` names are such temporaries too.
* ``volatile``: ``work/incompat/volatile`` (the upper of a crashed volatile mount may be
  incomplete; both refuse to mount it). Left for the user.
* ``index-orphan``: an entry of ``<workdir>/index`` no upper file links any more (a link
  count of 1) or a whiteout there (what the kernel's index cleanup removes). Repair: removed.
* ``record-bad``: ``<workdir>/pyoverlay.json`` unreadable or malformed (the mount refuses
  it). Repair: removed (the mount then goes by the upper's xattrs, as without a record).
* ``redirect-malformed``: an ``overlay.redirect`` the kernel rejects (empty, a relative one
  with a ``/``, an empty, ``.`` or ``..`` component): the kernel fails the lookup (EINVAL;
  EACCES for a ``.``/``..`` component).
  ``redirect-dangling``: a redirect to no lower directory (the kernel shows the directory
  alone). Repair of both: the xattr removed and, where a lower directory of the same name
  would now merge in, the directory made opaque (what the mount shows stays the same).
* ``redirect-uncovered``: the place a redirect was renamed from has nothing in the upper,
  so the lower directory shows twice (the kernel fails the second with ESTALE). Repair: a
  whiteout there (fsck.overlay's "Missing whiteout"), when its parent is in the upper.
  ``redirect-duplicate``: two redirects, or a redirect and a merged directory, reach the
  same lower directory. Left (which one is wrong is not known; fsck.overlay asks).
* ``redirect-ignored``, ``opaque-bad``, ``whiteout-xattr-bad``: an ``overlay.redirect`` on a
  non-directory (but a metacopy file: ``metacopy=on``, where it leads to the file's data),
  an ``overlay.opaque`` other than ``y``/``x`` or on a non-directory, an ``overlay.whiteout``
  on anything but an empty regular file: ignored by the kernel. Repair: the xattr removed.
* ``whiteout-orphan``: a whiteout whose name no lower layer has below it (fsck.overlay's
  orphan whiteout; the kernel lists it raw in a directory of the upper alone). Repair: removed.
* ``origin-malformed`` (not a ``struct ovl_fb``), ``origin-dangling`` (a file handle no lower
  filesystem decodes), ``origin-wrong-type`` (decodes to another file type): ignored by the
  kernel for a non-directory. Repair: the xattr removed; on a directory only while it holds
  no whiteout (an origin makes the kernel hide whiteouts in a directory of the upper alone).
* ``override-bad``: a ``user.containers.override_stat`` that does not parse (the disk owner
  is shown instead). Repair: removed; on the layer root (its presence makes the mount honour
  overrides) rewritten with the disk owner and mode, which is what is shown.

Xattrs named like the other namespace's private ones (``trusted.overlay.*`` in an upper
written with ``userxattr``, or the reverse) are only noted: they are private to no mount of
this upper and may be a user's own.

The private xattr namespace is chosen as the mount chooses it (userxattr.py): the
workdir's record, else the first private xattr in the upper, else the caller's privilege.
Every directory is opened relative to its parent's fd, never following a symlink (O_PATH,
O_NOFOLLOW, openat2 RESOLVE_BENEATH|NO_SYMLINKS): the layers are untrusted input.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from . import _sys
from .errors import PyoverlayError
from .idmap import OVERRIDE_XATTR, carries_override, decode_override, encode_override
from .layers import Hit, Layer, LayerStack, join
from .whiteout import (
    TRUSTED_PREFIX,
    USER_PREFIX,
    XattrNames,
    decode_origin,
    is_char_whiteout,
    is_opaque,
    make_whiteout,
    may_be_xwhiteout,
    prefix_for,
)

WORK = b"work"
INDEX = b"index"
VOLATILE = b"incompat"
RECORD = b"pyoverlay.json"
NAME_MAX = 255

#: exit statuses, fsck(8)'s: 0 clean, 1 problems found and all repaired, 4 problems left
#: (found without --repair, or not repairable), 8 an operational error (mounted, unreadable)
EXIT_CLEAN, EXIT_REPAIRED, EXIT_LEFT, EXIT_ERROR = 0, 1, 4, 8


class CheckError(PyoverlayError):
    """The check cannot run (one line; fsck's operational error)."""

    exit_code = EXIT_ERROR


@dataclass
class Problem:
    kind: str
    path: str  # "/a/b" in the upper, or "work/NAME", "index/NAME", "pyoverlay.json" in the workdir
    detail: str
    repair: str | None = None  # what --repair does; None: nothing safe to do
    repaired: bool = False
    error: str | None = None  # why a repair failed

    def __str__(self) -> str:
        state = ""
        if self.repaired:
            state = f" [repaired: {self.repair}]"
        elif self.error:
            state = f" [not repaired: {self.error}]"
        elif self.repair is None:
            state = " [cannot be repaired safely]"
        return f"{self.kind} {self.path}: {self.detail}{state}"


@dataclass
class Report:
    upper: str
    workdir: str
    lowers: list[str] | None
    userxattr: bool
    problems: list[Problem] = field(default_factory=list)  # found (and with repair, what was done)
    left: list[Problem] = field(default_factory=list)  # still there after the repair
    notes: list[str] = field(default_factory=list)

    def exit_status(self) -> int:
        if not self.problems:
            return EXIT_CLEAN
        return EXIT_LEFT if self.left else EXIT_REPAIRED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.exit_status()
        return d


# --- redirect values -----------------------------------------------------------------------


def redirect_problem(value: bytes) -> str | None:
    """Why the kernel rejects a redirect value (None: it takes it). Its rules
    (ovl_get_redirect_xattr): not empty; relative: no ``/``; absolute: no empty component;
    and lookup takes no ``.``/``..`` component nor one longer than NAME_MAX."""
    value = value.split(b"\0", 1)[0]
    if not value:
        return "empty"
    if value.startswith(b"/"):
        parts = value[1:].split(b"/")
        if any(p == b"" for p in parts):
            return "an empty component"
    else:
        if b"/" in value:
            return "a relative redirect with a '/'"
        parts = [value]
    for p in parts:
        if p in (b".", b".."):
            return f"a {p.decode()!r} component"
        if len(p) > NAME_MAX:
            return "a component longer than 255 bytes"
    return None


def _show(rel: bytes) -> str:
    return "/" + os.fsdecode(rel)


# --- the scan ---------------------------------------------------------------------------


class _Scan:
    def __init__(self, upper_fd: int, work_fd: int | None, stack: LayerStack, report: Report, fds: list[int]) -> None:
        self.keep_fds = fds  # fds the fixes use, closed with the pass
        self.upper_fd = upper_fd
        self.work_fd = work_fd
        self.stack = stack
        self.upper = stack.upper
        assert self.upper is not None
        self.names = stack.names
        self.other = TRUSTED_PREFIX if self.names.prefix == USER_PREFIX else USER_PREFIX
        self.report = report
        self.know_lowers = report.lowers is not None
        self.redirect_targets: dict[tuple[int, bytes], bytes] = {}
        self.decode_ok = True
        self.fixes: list[tuple[Problem, Callable[[], object]]] = []

    def add(self, kind: str, path: str, detail: str, repair: str | None = None, fix=None) -> None:
        p = Problem(kind, path, detail, repair if fix is not None else None)
        self.report.problems.append(p)
        if fix is not None:
            self.fixes.append((p, fix))

    # the workdir ---------------------------------------------------------------------

    def workdir(self, wd_fd: int) -> None:
        try:
            from .userxattr import _load

            data = _load(os.fsdecode(RECORD), wd_fd)
            if not isinstance(data, dict) or not isinstance(data.get("userxattr", False), bool):
                raise ValueError("not {'userxattr': true|false}")
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            self.add(
                "record-bad",
                os.fsdecode(RECORD),
                f"the workdir's namespace record is unusable ({exc}); the mount refuses it",
                "removed (the mount then goes by the upper's xattrs)",
                lambda: os.unlink(RECORD, dir_fd=wd_fd),
            )
        if self.work_fd is not None:
            for name, _kind in sorted(_sys.listdir_fd(self.work_fd)):
                shown = "work/" + os.fsdecode(name)
                if _kind == 0 and is_char_whiteout(_sys.lstat_at(self.work_fd, name)):
                    continue  # the kernel's shared whiteout (upper whiteouts are links to it)
                if name == VOLATILE and self._volatile(name):
                    self.add("volatile", shown, "a volatile mount's marker: the upper may be incomplete after a crash")
                    continue
                self.add(
                    "work-orphan",
                    shown,
                    "left by an interrupted mount",
                    "removed",
                    lambda n=name: _sys.remove_tree_at(self.work_fd, n),
                )
        try:
            ifd = _sys.openat2(wd_fd, INDEX, _sys.DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return
        self.keep_fds.append(ifd)
        self.index(ifd)

    def _volatile(self, name: bytes) -> bool:
        if self.work_fd is None:
            return False
        try:
            fd = _sys.openat2(self.work_fd, name + b"/volatile", _sys.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        os.close(fd)
        return True

    def index(self, ifd: int) -> None:
        for name, _kind in sorted(_sys.listdir_fd(ifd)):
            st = _sys.lstat_at(ifd, name)
            shown = "index/" + os.fsdecode(name)
            if name.startswith(b"#"):  # index=on: the index dir is also the work dir (workdir.py)
                if is_char_whiteout(st):
                    continue  # the kernel's shared whiteout, as in work/
                self.add(
                    "work-orphan",
                    shown,
                    "left by an interrupted mount (with index=on, temporaries are built in index/)",
                    "removed",
                    lambda n=name: _sys.remove_tree_at(ifd, n),
                )
                continue
            if stat.S_ISDIR(st.st_mode):
                continue  # a directory's index entry (nfs_export): not judged here
            if not is_char_whiteout(st) and st.st_nlink == 1 and self._index_serves(ifd, name, st.st_mode):
                continue  # index=on: it still serves lower names (their overlay nlink is above 0)
            if is_char_whiteout(st) or st.st_nlink == 1:
                what = "a whiteout" if is_char_whiteout(st) else "no upper file links it any more"
                self.add("index-orphan", shown, what, "removed", lambda n=name: os.unlink(n, dir_fd=ifd))

    def _index_serves(self, ifd: int, name: bytes, mode: int) -> bool:
        """An index entry no upper name links that the kernel keeps (ovl_verify_index): its
        name is its origin record, that lower inode still has several links and the
        entry's ``overlay.nlink`` gives an overlay nlink above 0 (lower names it serves)."""
        if not self.know_lowers:
            return False
        from .index import _decode_nlink, nlink_of, same_fh

        try:
            rec = bytes.fromhex(name.decode("ascii"))
        except ValueError:
            return False
        if not same_fh(_sys.getxattr_at(ifd, name, self.names.origin), rec):
            return False
        lower_nlink = _decode_nlink(rec, [layer.path for layer in self.stack.lowers], mode)
        if lower_nlink is None:
            return False
        return nlink_of(_sys.getxattr_at(ifd, name, self.names.nlink), 1, lower_nlink, 0) > 0

    # the upper ---------------------------------------------------------------------------

    def run(self) -> None:
        """Walk the upper depth first, holding one O_PATH fd per level, each opened relative
        to its parent's; a directory's fd stays open past the walk only if a fix needs it."""
        self.stack.merge_root()
        root_lowers = [(low, b"") for low in self.stack.root_lowers]
        self.entry_xattrs(self.upper_fd, None, b"", os.fstat(self.upper_fd), [], is_root=True)
        walk: list[tuple[int, bool, Iterator]] = []
        try:
            self._enter(walk, self.upper_fd, b"", b".", root_lowers)
            while walk:
                fd, owned, entries = walk[-1]
                nxt = next(entries, None)
                if nxt is None:
                    walk.pop()
                    if owned:
                        os.close(fd)
                    continue
                self._enter(walk, fd, *nxt)
        finally:
            for fd, owned, _entries in walk:
                if owned:
                    os.close(fd)

    def _enter(self, walk: list, parent: int, path: bytes, name: bytes, lows) -> None:
        try:
            fd = _sys.openat2(parent, name, _sys.DIR_FLAGS)
        except OSError as exc:
            self.report.notes.append(f"{_show(path)} not checked: {exc.strerror}")
            return
        before = len(self.fixes)
        try:
            entries = self.directory(path, fd, lows)
        except OSError as exc:  # unreadable (EACCES, say): noted, the rest is checked
            self.report.notes.append(f"{_show(path)} not checked: {exc.strerror}")
            if len(self.fixes) == before:
                os.close(fd)
            else:
                self.keep_fds.append(fd)
            return
        except BaseException:
            os.close(fd)
            raise
        owned = len(self.fixes) == before
        if not owned:
            self.keep_fds.append(fd)  # a fix acts through it: closed with the pass
        walk.append((fd, owned, iter(entries)))

    def directory(self, rel: bytes, dfd: int, lower_dirs: list[tuple[Layer, bytes]] | None):
        """Judge every entry of the upper directory *rel* (fd *dfd*); return its subdirectories
        as (path, name, their lower directories)."""
        upper = self.upper
        assert upper is not None
        out = []
        for name, _kind in sorted(_sys.listdir_fd(dfd)):
            path = join(rel, name)
            try:
                st = _sys.lstat_at(dfd, name)
            except FileNotFoundError:
                continue
            self.entry_xattrs(dfd, name, path, st, lower_dirs)
            if stat.S_ISDIR(st.st_mode):
                # lower_dirs None: not known (a lower layer could not be read above here)
                hits = None if lower_dirs is None else self._resolve([(upper, rel), *lower_dirs], name)
                lows = None if hits is None else [(h.layer, h.path) for h in hits if not h.layer.is_upper]
                self.redirect(dfd, name, rel, path, hits)
                out.append((path, name, lows))
        return out

    def _resolve(self, parents, name: bytes) -> list[Hit] | None:
        """What the layers have at *name* below *parents* (LayerStack.resolve); None when a
        lower layer cannot be read there (a malformed redirect leading out of a layer:
        EXDEV, a path too long: ENAMETOOLONG): then nothing is judged by it."""
        try:
            return self.stack.resolve(parents, name)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return []
            self.report.notes.append(
                f"{os.fsdecode(name)!r} not looked up in the lower layers: {exc.strerror} (not judged)"
            )
            return None

    def _lower_has(self, lower_dirs, name: bytes) -> bool:
        """Whether a lower layer has *name* (True when that cannot be told: not an orphan)."""
        if lower_dirs is None:
            return True
        if not lower_dirs:
            return False
        hits = self._resolve(lower_dirs, name)
        return hits is None or bool(hits)

    def entry_xattrs(self, dfd: int, name: bytes | None, path: bytes, st: os.stat_result, lower_dirs, is_root=False):
        shown = _show(path)
        names = self.names
        try:
            attrs = _sys.listxattr_at(dfd, name)
        except OSError as exc:
            self.report.notes.append(f"{shown}: cannot list its xattrs: {exc.strerror}")
            attrs = []
        is_dir = stat.S_ISDIR(st.st_mode)

        def get(attr: str) -> bytes | None:
            return _sys.getxattr_at(dfd, name, attr)

        def remover(attr: str):
            return lambda: os.removexattr(_sys.proc_path(dfd, name), attr, follow_symlinks=name is None)

        foreign = sorted(a for a in attrs if a.startswith(self.other))
        if foreign:  # a user's own xattr, or written in the other form: a note, not a problem
            self.report.notes.append(
                f"{shown}: {', '.join(foreign)}: not private in this upper (it uses {names.prefix}*)"
            )
        # whiteouts
        if not is_root and is_char_whiteout(st):
            if self.know_lowers and not self._lower_has(lower_dirs, name or b""):
                self.add(
                    "whiteout-orphan",
                    shown,
                    "a whiteout of a name no lower layer has",
                    "removed",
                    lambda: os.unlink(name or b"", dir_fd=dfd),
                )
            return
        if names.whiteout in attrs:
            if not may_be_xwhiteout(st):
                self.add(
                    "whiteout-xattr-bad",
                    shown,
                    f"{names.whiteout} on {_kind_of(st)} (only an empty regular file can be a whiteout): ignored",
                    "xattr removed",
                    remover(names.whiteout),
                )
            elif self.know_lowers and not is_root and not self._lower_has(lower_dirs, name or b""):
                self.add(
                    "whiteout-orphan",
                    shown,
                    "an xattr whiteout of a name no lower layer has",
                    "removed",
                    lambda: os.unlink(name or b"", dir_fd=dfd),
                )
                return
        if names.opaque in attrs:
            value = get(names.opaque)
            if not is_dir or value not in (b"y", b"x"):
                what = f"on {_kind_of(st)}" if not is_dir else f"value {value!r} (want 'y', or 'x')"
                self.add("opaque-bad", shown, f"{names.opaque} {what}: ignored", "xattr removed", remover(names.opaque))
        if names.redirect in attrs and not is_dir and names.metacopy not in attrs:
            self.add(
                "redirect-ignored",
                shown,
                f"{names.redirect} on {_kind_of(st)}: ignored",
                "xattr removed",
                remover(names.redirect),
            )
        if names.origin in attrs:
            self.origin(dfd, name, shown, st, get(names.origin) or b"", remover(names.origin))
        if OVERRIDE_XATTR in attrs and carries_override(st.st_mode):
            raw = get(OVERRIDE_XATTR)
            if decode_override(raw) is None:
                if is_root:  # its presence turns overrides on for the layer: keep one, the shown owner
                    fix, what = (
                        lambda: os.setxattr(
                            _sys.proc_path(dfd, None), OVERRIDE_XATTR, encode_override(st.st_uid, st.st_gid, st.st_mode)
                        ),
                        "rewritten with the owner and mode on disk (what is shown)",
                    )
                else:
                    fix, what = remover(OVERRIDE_XATTR), "removed (the owner on disk is what is shown)"
                self.add(
                    "override-bad",
                    shown,
                    f"{OVERRIDE_XATTR} {raw!r} does not parse as UID:GID:MODE (ignored: the disk owner is shown)",
                    what,
                    fix,
                )

    # origins -----------------------------------------------------------------------------

    def origin(self, dfd: int, name: bytes | None, shown: str, st: os.stat_result, raw: bytes, remove) -> None:
        is_dir = stat.S_ISDIR(st.st_mode)
        fix = remove
        repair = "xattr removed"
        kept = ""
        if is_dir and name is not None and self._holds_whiteouts(dfd, name):
            fix = None  # the origin makes the kernel hide these whiteouts: keep it
            kept = "; kept while the directory holds whiteouts (it makes the kernel hide them)"
        parsed = decode_origin(raw)
        if parsed is None:
            what = f"{self.names.origin} is not an origin record (ignored){kept}"
            self.add("origin-malformed", shown, what, repair, fix)
            return
        if not self.know_lowers or not self.decode_ok:
            return
        found = self._decode(*parsed)
        if found is None:
            if self.decode_ok:
                what = f"its file handle decodes in no lower layer (ignored){kept}"
                self.add("origin-dangling", shown, what, repair, fix)
            return
        if stat.S_IFMT(found.st_mode) != stat.S_IFMT(st.st_mode):
            self.add(
                "origin-wrong-type",
                shown,
                f"its origin is {_kind_of(found)}, it is {_kind_of(st)} (the origin is ignored){kept}",
                repair,
                fix,
            )

    def _holds_whiteouts(self, dfd: int, name: bytes) -> bool:
        try:
            fd = _sys.openat2(dfd, name, _sys.DIR_FLAGS)
        except OSError:
            return False
        try:
            for child, kind in _sys.listdir_fd(fd):
                if kind == 0 and is_char_whiteout(_sys.lstat_at(fd, child)):
                    return True
        finally:
            os.close(fd)
        return False

    def _decode(self, handle_type: int, handle: bytes) -> os.stat_result | None:
        seen: set[int] = set()
        for low in self.stack.lowers:
            if low.dev in seen:
                continue
            seen.add(low.dev)
            try:  # open_by_handle_at wants a real (not O_PATH) fd on the filesystem
                mfd = _sys.reopen(low.fd, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    fd = _sys.open_by_handle(mfd, handle_type, handle)
                finally:
                    os.close(mfd)
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    self.decode_ok = False
                    self.report.notes.append("origins not decoded: that needs CAP_DAC_READ_SEARCH (root)")
                    return None
                continue
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        return None

    # redirects ---------------------------------------------------------------------------

    def redirect(self, dfd: int, name: bytes, rel: bytes, path: bytes, hits: list[Hit] | None) -> None:
        value = _sys.getxattr_at(dfd, name, self.names.redirect)
        if value is None:
            return
        shown = _show(path)
        why = redirect_problem(value)
        fix = self._drop_redirect(dfd, name, rel, path)
        what = "xattr removed (the directory made opaque where a lower one of its name would merge in)"
        if why is not None:
            self.add(
                "redirect-malformed",
                shown,
                f"{self.names.redirect} {value!r}: {why} (the kernel fails its lookup)",
                what,
                fix,
            )
            return
        if self.names.prefix == USER_PREFIX:
            self.report.notes.append(
                f"{shown}: a kernel overlay with userxattr follows no redirect (EPERM); pyoverlay does"
            )
        if not self.know_lowers or hits is None:
            return
        lows = [h for h in hits if not h.layer.is_upper]
        if not lows:
            self.add(
                "redirect-dangling",
                shown,
                f"{self.names.redirect} {value!r} reaches no lower directory (the directory is shown alone)",
                what,
                fix,
            )
            return
        top = lows[0]
        key = (top.layer.index, top.path)
        if key in self.redirect_targets:
            other = _show(self.redirect_targets[key])
            self.add("redirect-duplicate", shown, f"{other} is redirected to the same lower directory too")
            return
        self.redirect_targets[key] = path
        value = value.split(b"\0", 1)[0]
        source = value.strip(b"/") if value.startswith(b"/") else join(rel, value)
        self._covered(source, shown, value)

    def _covered(self, source: bytes, shown: str, value: bytes) -> None:
        """Whether the upper hides the redirect's source (where the directory was renamed from)."""
        parts = source.split(b"/")
        fd = os.dup(self.upper_fd)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                try:
                    st = _sys.lstat_at(fd, part)
                except FileNotFoundError:
                    if last:
                        pfd = os.dup(fd)

                        def fix(pfd=pfd, part=part) -> None:
                            make_whiteout(pfd, part)

                        self.add(
                            "redirect-uncovered",
                            shown,
                            f"nothing in the upper at {_show(source)}, where {value!r} came from:"
                            " the lower directory shows twice (the kernel: ESTALE)",
                            f"whiteout made at {_show(source)}",
                            fix,
                        )
                        self.keep_fds.append(pfd)
                    else:
                        self.add(
                            "redirect-uncovered",
                            shown,
                            f"nothing in the upper at {_show(source)}, where {value!r} came from:"
                            " the lower directory shows twice (the kernel: ESTALE)",
                        )
                    return
                if not stat.S_ISDIR(st.st_mode) or is_opaque(_sys.getxattr_at(fd, part, self.names.opaque)):
                    return  # a whiteout, a file or an opaque directory hides it
                if last:
                    if _sys.getxattr_at(fd, part, self.names.redirect) is None:
                        self.add(
                            "redirect-duplicate",
                            shown,
                            f"{_show(source)} in the upper merges with the same lower directory",
                        )
                    return
                nfd = _sys.openat2(fd, part, _sys.DIR_FLAGS)
                os.close(fd)
                fd = nfd
        finally:
            os.close(fd)

    def _drop_redirect(self, dfd: int, name: bytes, rel: bytes, path: bytes):
        pfd = os.dup(dfd)
        self.keep_fds.append(pfd)

        def fix() -> None:
            os.removexattr(_sys.proc_path(pfd, name), self.names.redirect, follow_symlinks=False)
            parent_lows = self._parent_lowers(rel)
            if parent_lows is None or (parent_lows and self._lower_dir(parent_lows, name)):
                os.setxattr(_sys.proc_path(pfd, name), self.names.opaque, b"y", follow_symlinks=False)

        return fix

    def _parent_lowers(self, rel: bytes) -> list[tuple[Layer, bytes]] | None:
        """The lower directories of the upper directory *rel*, found again from the root
        (None: not known)."""
        upper = self.upper
        assert upper is not None
        self.stack.merge_root()
        dirs: list[tuple[Layer, bytes]] = [(upper, b""), *((low, b"") for low in self.stack.root_lowers)]
        for part in rel.split(b"/") if rel else []:
            hits = self._resolve(dirs, part)
            if hits is None:
                return None
            dirs = [(h.layer, h.path) for h in hits if stat.S_ISDIR(h.st.st_mode)]
        return [(layer, p) for layer, p in dirs if not layer.is_upper]

    def _lower_dir(self, lows, name: bytes) -> bool:
        """Whether a lower directory *name* merges in (True when that cannot be told)."""
        hits = self._resolve(lows, name)
        return hits is None or (bool(hits) and stat.S_ISDIR(hits[0].st.st_mode))


def _kind_of(st: os.stat_result) -> str:
    m = st.st_mode
    for test, word in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file" if st.st_size else "an empty regular file"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(m):
            return word
    return "a whiteout" if is_char_whiteout(st) else "a character device"


# --- the entry points ---------------------------------------------------------------------


def _open_layer(path: str, what: str) -> int:
    try:
        return os.open(path, _sys.DIR_FLAGS)
    except FileNotFoundError:
        raise CheckError(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CheckError(f"{what} '{path}' is not a directory (a symlink is not followed)") from None
        raise CheckError(f"cannot open {what} '{path}': {exc.strerror}") from None


class _Pass:
    """One scan's report, the fixes it found, and what they need open (``close``)."""

    def __init__(self, report: Report, fixes: list, fds: list[int], stack: LayerStack | None) -> None:
        self.report, self.fixes, self.fds, self.stack = report, fixes, fds, stack

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.stack = None


def scan(upper: str, workdir: str, lowers: list[str] | None, userxattr: bool) -> _Pass:
    """One pass over *upper* and *workdir* with *lowers* (top first; None: not known, so
    whiteouts, redirects and origins are not judged against them). The caller closes it."""
    report = Report(upper, workdir, lowers, userxattr)
    if lowers is None:
        report.notes.append("lower layers not known (give --lower): whiteouts, redirects and origins not judged")
    names = XattrNames.for_userxattr(userxattr)
    fds: list[int] = []
    done = _Pass(report, [], fds, None)
    try:
        upper_fd = _open_layer(upper, "upper layer")
        fds.append(upper_fd)
        wd_fd = _open_layer(workdir, "workdir")
        fds.append(wd_fd)
        work_fd: int | None = None
        try:
            work_fd = _sys.openat2(wd_fd, WORK, _sys.DIR_FLAGS)
            fds.append(work_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CheckError(f"cannot open '{workdir}/work': {exc.strerror}") from None
        for low in lowers or []:
            os.close(_open_layer(low, "lower layer"))
        done.stack = LayerStack(tuple(lowers or ()), upper, names)
        s = _Scan(upper_fd, work_fd, done.stack, report, fds)
        s.workdir(wd_fd)
        s.run()
        done.fixes = s.fixes
    except BaseException:
        done.close()
        raise
    return done


def check(
    upper: str, workdir: str, lowers: list[str] | None, *, userxattr: bool, repair: bool = False, rounds: int = 4
) -> Report:
    """Check (and with *repair*, fix what is safe to fix in) *upper* and *workdir*.

    With *repair*: fix, then scan again (a fix may uncover another problem: a redirect
    removed may leave whiteouts below it orphans), up to *rounds* times. ``problems`` is
    everything found (with what was done), ``left`` what the last scan still finds."""
    first: Report | None = None
    for _ in range(rounds if repair else 1):
        p = scan(upper, workdir, lowers, userxattr)
        try:
            report = p.report
            if first is None:
                first = report
            else:  # a later round: what the earlier fixes uncovered or made fixable
                for q, _fix in p.fixes:
                    same = [i for i, o in enumerate(first.problems) if (o.kind, o.path) == (q.kind, q.path)]
                    if same and not first.problems[same[0]].repaired:
                        first.problems[same[0]] = q  # left before, fixable now
                    else:
                        first.problems.append(q)
            first.left, first.notes = report.problems, report.notes
            if not repair or not p.fixes:
                return first
            failed = False
            for q, fix in p.fixes:
                try:
                    fix()
                    q.repaired = True
                except OSError as exc:
                    q.error = exc.strerror or str(exc)
                    failed = True
            if failed:
                break  # a scan again would find it again: report it as left
        finally:
            p.close()
    assert first is not None
    p = scan(upper, workdir, lowers, userxattr)
    p.close()
    first.left, first.notes = p.report.problems, p.report.notes
    return first


# --- what decides the namespace, and whether the layers are in use -------------------------


def choose_userxattr(upper: str, workdir: str, requested: bool | None) -> bool:
    """The private xattr namespace, chosen as the mount chooses it (userxattr.py)."""
    from .diff import detect_userxattr
    from .privilege import privileged
    from .userxattr import RECORD as REC
    from .userxattr import _load

    recorded = None
    try:
        data = _load(os.path.join(workdir, REC))
        value = data.get("userxattr") if isinstance(data, dict) else None
        recorded = value if isinstance(value, bool) else None
    except (OSError, ValueError):
        pass  # reported as record-bad by the scan
    if recorded is None:
        try:
            recorded = detect_userxattr(upper)
        except OSError:
            recorded = None
    if requested is not None and recorded is not None and requested != recorded:
        raise CheckError(
            f"upper layer '{upper}' has {prefix_for(recorded)}* private xattrs:"
            f" --{'no' if not requested else ''}userxattr conflicts with it (drop the option)"
        )
    value = requested if requested is not None else recorded
    if value is None:
        value = not privileged()
    if not value and not privileged():
        raise CheckError(
            f"upper layer '{upper}' uses trusted.overlay.* private xattrs, which only root"
            " (CAP_SYS_ADMIN in the initial user namespace) can read: run the check as root"
        )
    return value


def _mountinfo_paths(super_options: str) -> dict[str, str]:
    from .mountinfo import unescape

    out = {}
    for opt in super_options.split(","):
        key, sep, value = opt.partition("=")
        if sep and key in ("upperdir", "workdir"):
            out[key] = unescape(value)
    return out


def in_use(upper: str, workdir: str) -> str | None:
    """What has *upper* or *workdir* mounted (a live pyoverlay mount, or a kernel overlay in
    this mount namespace), or None."""
    from . import mountinfo, state

    up, wd = os.path.realpath(upper), os.path.realpath(workdir)
    try:
        recs = state.records()
    except (OSError, PyoverlayError):
        recs = []
    for rec in recs:
        cfg = rec.get("config") or {}
        for key, mine in (("upperdir", up), ("workdir", wd)):
            if cfg.get(key) and os.path.realpath(cfg[key]) == mine:
                return f"the pyoverlay mount at {rec.get('mountpoint')} (pid {rec.get('pid')})"
    for m in mountinfo.mounts():
        if m.fstype != "overlay":
            continue
        for key, value in _mountinfo_paths(m.super_options).items():
            if os.path.realpath(value) == (up if key == "upperdir" else wd):
                return f"the kernel overlay at {m.mountpoint}"
    return None
