"""``docker cp`` and ``docker export`` (docs/api.md, "Containers: ... export, cp").

Everything goes through the container's merged root, as its processes see it:

* a running container: its live mount (``rec["merged"]``, the FUSE mount its monitor
  made); a write lands in its upper layer and its copy-ups are traced like any;
* a stopped one: a private mount of the same layers (``pyoverlay mount`` of its lowers,
  upper and workdir on a directory of its own beneath the container's data dir),
  unmounted when the request ends: the same code as a live container.

Paths from the client are untrusted: every one is resolved from an fd on the container's
root with ``openat2(RESOLVE_IN_ROOT)``: ``..`` stops at the root and a symlink in the
container (``/tmp/x -> /etc``) is resolved inside it, never on the host. The last
component is taken as it is (a symlink is copied as a symlink, as dockerd does; the stat
header gives its target resolved in the container). Members of an uploaded tar are
untrusted too: a name that climbs out of the destination is refused, each member's parent
directory is resolved in the container's root the same way, and the member itself is
created with ``O_NOFOLLOW``/``*at`` calls relative to that directory's fd.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import errno
import io
import json
import logging
import os
import posixpath
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator

from overlayfs_py import _sys

from .. import state
from . import events
from .records import api_state, attrs, find, lowers_of
from .server import AnsweredElsewhere, ApiError, ChunkWriter, Request, Router

log = logging.getLogger(__name__)
router = Router()

_IN_ROOT = _sys.RESOLVE_IN_ROOT | _sys.RESOLVE_NO_MAGICLINKS | _sys.RESOLVE_NO_XDEV
_DIR_RD = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


# --- the container's root ----------------------------------------------------------------------


def _lock(cid: str) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(cid, threading.Lock())


def _pyoverlay() -> list[str]:
    return [sys.executable, "-m", "pyoverlay_cli"]


def _escape_layer(p: str) -> str:
    return p.replace(":", "\\:")


@contextlib.contextmanager
def container_root(rec: dict) -> Iterator[tuple[int, str]]:
    """``(fd, path)`` of the container's merged root: its live mount, or a private mount
    of its layers while it is not running (module doc). The fd is ``O_RDONLY`` on the
    directory; closed on exit."""
    if api_state(rec) == "dead":  # its monitor vanished: do its teardown first (control.py)
        from .. import control

        control.cleanup_dead(rec)
        rec = state.load(rec["id"]) or rec
    merged = rec.get("merged")
    if api_state(rec) == "running" and merged and state.mounts_under(merged):
        fd = os.open(merged, _DIR_RD | os.O_NOFOLLOW)
        try:
            yield fd, merged
        finally:
            os.close(fd)
        return
    if api_state(rec) == "running":  # a rootless container's mount is in its own namespaces only
        raise ApiError(
            501, "not implemented: cp and export of a running container whose root is not mounted on the host"
        )
    upper, workdir = rec.get("upper"), rec.get("workdir")
    if not upper or not workdir or not os.path.isdir(upper) or not rec.get("data_dir"):
        raise ApiError(409, f"container {rec['id'][:12]} has no root filesystem yet (never started)")
    with _lock(rec["id"]):
        data = state.container_dir(rec["id"])
        mnt = tempfile.mkdtemp(prefix=".api-root-", dir=data)
        argv = [*_pyoverlay(), "mount", "--workdir", workdir]
        rootless = rec.get("rootless")
        if isinstance(rootless, dict):
            for flag, key in (("--uidmap", "storage_uidmap"), ("--gidmap", "storage_gidmap")):
                for s, p, n in rootless.get(key) or []:
                    argv += [flag, f"{s}:{p}:{n}"]
        argv += [":".join(_escape_layer(p) for p in lowers_of(rec)), upper, mnt]
        r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        if r.returncode != 0:
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
            raise ApiError(500, f"cannot mount the root of {rec['id'][:12]}: {r.stderr.strip()}")
        try:
            fd = os.open(mnt, _DIR_RD | os.O_NOFOLLOW)
            try:
                yield fd, mnt
            finally:
                os.close(fd)
        finally:
            u = subprocess.run(
                [*_pyoverlay(), "umount", mnt], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
            )
            if u.returncode != 0:
                from overlayfs_py.unmount import try_unmount

                try_unmount(mnt, lazy=True)
            with contextlib.suppress(OSError):
                os.rmdir(mnt)


def _mount_on_host(rec: dict) -> bool:
    """Whether the root of running container *rec* is mounted where the service sees it
    (root's containers); a rootless container's mount exists only in its own namespaces."""
    merged = rec.get("merged")
    return bool(merged and state.mounts_under(merged))


@contextlib.contextmanager
def _root(req: Request, rec: dict, event: str) -> Iterator[int]:
    """The container's root fd for a handler's body, which must answer the request itself;
    then *event* is published. A running rootless container's mount is reachable only from
    inside its user namespace (FUSE refuses the processes of other namespaces, the
    service's included): the body then runs in a child of this thread that has joined the
    container's user and mount namespaces (``setns`` through its PID 1's pidfd: the child
    is root there, as the container's root, and its ``/`` is the container's root). The
    child answers on the connection; this thread waits for it, and the connection is
    closed after (``AnsweredElsewhere``)."""
    if api_state(rec) == "running" and not _mount_on_host(rec):
        yield from _root_in_child(req, rec, event)
        return
    with container_root(rec) as (root_fd, _p):
        yield root_fd
    events.publish("container", event, rec["id"], attrs(rec))


def _root_in_child(req: Request, rec: dict, event: str) -> Iterator[int]:
    from .. import _linux as L
    from .. import control

    _proc()  # opened before the fork: the host's /proc, for the child too
    pidfd = control.pid1_fd(rec)
    if pidfd is None:
        raise ApiError(409, f"Container {rec['id']} is not running")
    try:
        pid = os.fork()
    except BaseException:
        os.close(pidfd)
        raise
    if pid == 0:  # the child: one thread (setns into a user namespace needs that)
        code = 1
        req.close_after()  # the service closes the connection after the child's answer
        try:
            try:
                L.setns(pidfd, L.CLONE_NEWUSER | L.CLONE_NEWNS)
                root = os.open("/", _DIR_RD)  # setns(CLONE_NEWNS) made / the container's root
            except OSError as e:
                raise ApiError(500, f"cannot enter the namespaces of {rec['id'][:12]}: {e.strerror}") from None
            yield root
            req.stream_end()
            code = 0
        except ApiError as e:
            if not req.answered:
                req.error(e.status, e.message)
        except BaseException:  # noqa: BLE001 - the child answers what it can, then exits
            log.exception("%s in the namespaces of %s failed", event, rec["id"][:12])
            if not req.answered:
                with contextlib.suppress(BaseException):
                    req.error(500, "the copy inside the container failed")
        finally:
            with contextlib.suppress(BaseException):
                req.flush()
            os._exit(code)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        events.publish("container", event, rec["id"], attrs(rec))
    raise AnsweredElsewhere()


_proc_fd: int | None = None


def _proc() -> int:
    """A directory fd of the host's /proc (opened once): magic links of this process's fds
    (``self/fd/N`` relative to it) work also in a child that has joined a container's
    mount namespace, whose /proc is the container's pid namespace's."""
    global _proc_fd
    if _proc_fd is None:
        _proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _proc_fd


def _fd_path(fd: int) -> str:
    return os.readlink(f"self/fd/{fd}", dir_fd=_proc())


def _in_container(root_fd: int, fd: int) -> str:
    """The path in the container of what *fd* (opened beneath *root_fd*) is."""
    root, p = _fd_path(root_fd), _fd_path(fd)
    rel = os.path.relpath(p, root)
    return "/" if rel == "." else "/" + rel


def _split(path: str) -> tuple[str, str]:
    """dockerd's split of a container path: (directory, last component), the directory
    resolved later in the container's root. A path ending in "/" or "/." names the
    directory itself (its last component "" or ".")."""
    if not path:
        raise ApiError(400, "path is required")
    if "\0" in path:
        raise ApiError(400, "invalid path")
    if not path.startswith("/"):
        path = "/" + path
    if path.endswith("/."):
        return path[:-2] or "/", "."
    if path.endswith("/"):
        return path.rstrip("/") or "/", ""
    d, b = posixpath.split(path)
    return d or "/", b


def _open_in_root(root_fd: int, path: str, flags: int = _DIR_RD) -> int:
    """Open *path* (a container path) resolved in the container's root."""
    rel = path.lstrip("/") or "."
    return _sys.openat2(root_fd, os.fsencode(rel), flags | os.O_CLOEXEC, 0, _IN_ROOT)


def _not_found(path: str, rec: dict) -> ApiError:
    return ApiError(404, f"Could not find the file {path} in container {rec.get('name') or rec['id']}")


class _Target:
    """The object a container path names: its parent directory (an fd), its name there
    (None: the parent itself), its lstat."""

    def __init__(self, root_fd: int, path: str, rec: dict):
        d, base = _split(path)
        try:
            self.dir_fd = _open_in_root(root_fd, d)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise _not_found(path, rec) from None
            raise ApiError(500, f"{path}: {e.strerror}") from None
        self.name: str | None = base if base not in ("", ".") else None
        try:
            self.st = os.lstat(self.name, dir_fd=self.dir_fd) if self.name else os.fstat(self.dir_fd)
        except OSError:
            os.close(self.dir_fd)
            raise _not_found(path, rec) from None
        self.arcname = base if base else posixpath.basename(d.rstrip("/")) or "/"  # "/": names "/bin", as dockerd
        self.root_fd = root_fd
        self.path = path

    def close(self) -> None:
        os.close(self.dir_fd)

    def stat_header(self) -> str:
        """``X-Docker-Container-Path-Stat``: base64 of {name, size, mode, mtime, linkTarget}."""
        st = self.st
        link = ""
        if stat.S_ISLNK(st.st_mode) and self.name:
            link = self._link_target()
        name = self.name or posixpath.basename(_in_container(self.root_fd, self.dir_fd)) or "/"
        mtime = datetime.datetime.fromtimestamp(st.st_mtime, datetime.UTC).isoformat().replace("+00:00", "Z")
        obj = {"name": name, "size": st.st_size, "mode": go_mode(st.st_mode), "mtime": mtime, "linkTarget": link}
        return base64.b64encode(json.dumps(obj).encode()).decode()

    def _link_target(self) -> str:
        """The symlink's target resolved in the container (dockerd's linkTarget)."""
        assert self.name is not None
        here = _in_container(self.root_fd, self.dir_fd)
        full = posixpath.join(here, self.name)
        try:
            fd = _open_in_root(self.root_fd, full, _sys.O_PATH)
        except OSError:  # dangling: its target as written, made absolute in the container
            target = os.readlink(self.name, dir_fd=self.dir_fd)
            return posixpath.normpath(posixpath.join(here, target))
        try:
            return _in_container(self.root_fd, fd)
        finally:
            os.close(fd)


def go_mode(mode: int) -> int:
    """A unix st_mode as Go's os.FileMode (what the docker CLI decodes)."""
    out = stat.S_IMODE(mode) & 0o777
    fmt = stat.S_IFMT(mode)
    out |= {
        stat.S_IFDIR: 1 << 31,
        stat.S_IFLNK: 1 << 27,
        stat.S_IFIFO: 1 << 25,
        stat.S_IFSOCK: 1 << 24,
        stat.S_IFBLK: 1 << 26,
        stat.S_IFCHR: (1 << 26) | (1 << 21),
    }.get(fmt, 0)
    if mode & stat.S_ISUID:
        out |= 1 << 23
    if mode & stat.S_ISGID:
        out |= 1 << 22
    if mode & stat.S_ISVTX:
        out |= 1 << 20
    return out


# --- writing a tree as a tar ---------------------------------------------------------------------


class TreeTar:
    """Writes objects beneath directory fds to a tar: no symlink followed, no other
    filesystem entered, hard links within the tar kept as links."""

    def __init__(self, tf: tarfile.TarFile) -> None:
        self.tf = tf
        self.seen: dict[tuple[int, int], str] = {}

    def add(self, dir_fd: int, name: str | None, arcname: str, st: os.stat_result | None = None) -> None:
        """*name* in *dir_fd* (None: *dir_fd* itself) as *arcname*, and all below it."""
        todo: list[tuple[int, str | None, str, os.stat_result | None, bool]] = [(dir_fd, name, arcname, st, False)]
        dev = os.fstat(dir_fd).st_dev
        owned: list[int] = []
        try:
            while todo:
                dfd, n, arc, s, own = todo.pop()
                try:
                    self._one(dfd, n, arc, s, dev, todo, owned)
                finally:
                    if own:
                        os.close(dfd)
        finally:
            for fd in owned:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _info(self, arc: str, st: os.stat_result) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(arc)
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.mtime = int(st.st_mtime)
        ti.uname = ti.gname = ""
        return ti

    def _one(self, dfd, n, arc, s, dev, todo, owned) -> None:
        try:
            st = s if s is not None else (os.lstat(n, dir_fd=dfd) if n is not None else os.fstat(dfd))
        except FileNotFoundError:
            return  # gone meanwhile
        ti = self._info(arc, st)
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFDIR:
            ti.type = tarfile.DIRTYPE
            self.tf.addfile(ti)
            if st.st_dev != dev:
                return  # another filesystem mounted here: not entered
            try:
                sub = os.open(n, _DIR_RD | os.O_NOFOLLOW, dir_fd=dfd) if n is not None else os.dup(dfd)
            except OSError:
                return
            try:
                names = sorted(os.listdir(sub), reverse=True)
            except OSError:
                os.close(sub)
                return
            # the directory's fd is closed with its last child (pushed first, popped last)
            for i, child in enumerate(names):
                todo.append((sub, child, posixpath.join(arc, child), None, i == 0))
            if not names:
                os.close(sub)
            return
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in self.seen:
                ti.type, ti.linkname = tarfile.LNKTYPE, self.seen[key]
                self.tf.addfile(ti)
                return
            self.seen[key] = arc
        if fmt == stat.S_IFREG:
            try:
                fd = os.open(n, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                return
            with os.fdopen(fd, "rb") as f:
                st2 = os.fstat(fd)
                ti.size = st2.st_size
                self.tf.addfile(ti, _Exact(f, st2.st_size))
        elif fmt == stat.S_IFLNK:
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.readlink(n, dir_fd=dfd)
            self.tf.addfile(ti)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self.tf.addfile(ti)
        elif fmt == stat.S_IFIFO:
            ti.type = tarfile.FIFOTYPE
            self.tf.addfile(ti)
        # sockets have no tar form: left out, as dockerd does


class _Exact(io.RawIOBase):
    """Exactly *size* bytes of *f*: a file that shrank meanwhile is padded with zeros, one
    that grew is cut (a live container may write while it is copied)."""

    def __init__(self, f, size: int) -> None:
        super().__init__()
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n) or b""
        if not data:
            data = b"\0" * n
        self.left -= len(data)
        return data


def _tar_stream(req: Request):
    out = ChunkWriter(req)
    tf = tarfile.open(  # noqa: SIM115 - closed by the caller once the tree is written
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    )
    return tf, out


# --- export -----------------------------------------------------------------------------------------


@router.route("GET", "/containers/{id}/export")
def export(req: Request) -> None:
    rec = find(req.params["id"])
    with _root(req, rec, "export") as root_fd:
        req.stream_start("application/x-tar")
        tf, out = _tar_stream(req)
        tt = TreeTar(tf)
        for name in sorted(os.listdir(root_fd)):
            tt.add(root_fd, name, name)
        tf.close()
        out.flush()


# --- archive: GET, HEAD, PUT ---------------------------------------------------------------------


@router.route("GET", "/containers/{id}/archive")
def archive_get(req: Request) -> None:
    """``docker cp CTR:PATH`` (GET) and its stat (HEAD, routed here too: the same header,
    no body)."""
    rec = find(req.params["id"])
    path = req.arg("path") or ""
    with _root(req, rec, "archive-path") as root_fd:
        t = _Target(root_fd, path, rec)
        try:
            header = t.stat_header()
            req.stream_start("application/x-tar", headers={"X-Docker-Container-Path-Stat": header})
            if req.is_head:
                return
            tf, out = _tar_stream(req)
            TreeTar(tf).add(t.dir_fd, t.name, t.arcname, t.st if t.name else None)
            tf.close()
            out.flush()
        finally:
            t.close()


class _BodyReader(io.RawIOBase):
    """The request body as a file (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self.it = iter(chunks)
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            nxt = next(self.it, None)
            if nxt is None:
                return 0
            self.buf = nxt
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


@router.route("PUT", "/containers/{id}/archive")
def archive_put(req: Request) -> None:
    rec = find(req.params["id"])
    path = req.arg("path") or ""
    if (rec.get("spec") or {}).get("read_only"):
        raise ApiError(403, "container rootfs is marked read-only")
    no_overwrite = req.flag("noOverwriteDirNonDir")
    copy_uidgid = req.flag("copyUIDGID")
    with _root(req, rec, "extract-to-dir") as root_fd:
        d, base = _split(path)
        full = posixpath.join(d, base) if base else d
        try:
            dest_fd = _open_in_root(root_fd, full)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise _not_found(path, rec) from None
            if e.errno == errno.ENOTDIR:
                raise ApiError(400, "extraction point is not a directory") from None
            raise ApiError(500, f"{path}: {e.strerror}") from None
        try:
            dest = _in_container(root_fd, dest_fd)
        finally:
            os.close(dest_fd)
        try:
            body = io.BufferedReader(_BodyReader(iter(req.body_chunks())))
            tf = tarfile.open(fileobj=body, mode="r|*")  # noqa: SIM115 - closed below
        except tarfile.TarError as e:
            raise ApiError(400, f"not a tar archive: {e}") from None
        with tf:
            Extractor(root_fd, dest, no_overwrite, copy_uidgid).run(tf)
        req.empty(200)


class Extractor:
    """Unpacks an untrusted tar into *dest* (a directory of the container, by its path in
    the container) beneath *root_fd* (module doc)."""

    def __init__(self, root_fd: int, dest: str, no_overwrite_dir_non_dir: bool, copy_uidgid: bool) -> None:
        self.root_fd = root_fd
        self.dest = dest
        self.no_overwrite = no_overwrite_dir_non_dir
        self.copy_uidgid = copy_uidgid
        self.dir_times: list[tuple[str, int]] = []
        self.can_chown = os.geteuid() == 0

    def _owner(self, m: tarfile.TarInfo) -> tuple[int, int]:
        """The owner a member gets: its own with ``copyUIDGID`` (``docker cp -a``), else the
        container's root, as dockerd's extraction gives (its ``ChownOpts``)."""
        return (m.uid, m.gid) if self.copy_uidgid else (0, 0)

    def run(self, tf: tarfile.TarFile) -> None:
        try:
            for m in tf:
                self._member(tf, m)
        except tarfile.TarError as e:
            raise ApiError(400, f"invalid tar archive: {e}") from None
        for path, mtime in reversed(self.dir_times):
            with contextlib.suppress(OSError, ApiError):
                pfd, name = self._parent(path, create=False)
                try:
                    os.utime(name, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
                finally:
                    os.close(pfd)

    def _clean(self, name: str) -> str:
        """The member's path in the container; 400 for one that climbs out of dest."""
        n = posixpath.normpath(name).lstrip("/")
        if n == ".." or n.startswith("../"):
            raise ApiError(400, f"invalid tar member {name!r}: it is outside of {self.dest!r}")
        return posixpath.normpath(posixpath.join(self.dest, n))

    def _parent(self, path: str, create: bool) -> tuple[int, str]:
        """(fd of the parent directory, resolved in the container's root, its name)."""
        d, name = posixpath.split(path)
        rel = d.lstrip("/")
        if create and rel:  # missing parents are made 0755, as dockerd does
            cur = "/"
            for part in rel.split("/"):
                cur = posixpath.join(cur, part)
                try:
                    fd = _open_in_root(self.root_fd, cur)
                    os.close(fd)
                except FileNotFoundError:
                    pfd, pname = self._parent(cur, create=False)
                    try:
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(pname, 0o755, dir_fd=pfd)
                    finally:
                        os.close(pfd)
                except OSError as e:
                    raise ApiError(400, f"cannot extract into {cur}: {e.strerror}") from None
        try:
            return _open_in_root(self.root_fd, d), name
        except OSError as e:
            raise ApiError(400, f"cannot extract into {d}: {e.strerror}") from None

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        path = self._clean(m.name)
        if path == self.dest or path == "/":
            return  # the destination itself ("./"): left as it is
        pfd, name = self._parent(path, create=True)
        try:
            self._create(tf, m, pfd, name, path)
        finally:
            os.close(pfd)

    def _create(self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, name: str, path: str) -> None:
        try:
            old = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            old = None
        if old is not None:
            old_dir = stat.S_ISDIR(old.st_mode)
            if self.no_overwrite and old_dir != m.isdir():
                what = "directory" if old_dir else "non-directory"
                raise ApiError(
                    400, f"cannot overwrite {what} {path!r} with {'directory' if m.isdir() else 'non-directory'}"
                )
            if not (old_dir and m.isdir()):
                if old_dir:
                    state.rmtree_at(pfd, name)
                else:
                    os.unlink(name, dir_fd=pfd)
        mode = m.mode & 0o7777
        if m.isdir():
            if old is None or not stat.S_ISDIR(old.st_mode):
                os.mkdir(name, 0o700, dir_fd=pfd)
        elif m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            with os.fdopen(fd, "wb") as out:
                src = tf.extractfile(m)
                if src is not None:
                    shutil.copyfileobj(src, out, 1 << 20)
        elif m.issym():
            os.symlink(m.linkname, name, dir_fd=pfd)
        elif m.islnk():
            target = self._clean(m.linkname)
            tfd, tname = self._parent(target, create=False)
            try:
                os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except OSError as e:
                raise ApiError(400, f"hard link {m.name} -> {m.linkname}: {e.strerror}") from None
            finally:
                os.close(tfd)
            return  # the link shares its target's metadata
        elif m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            try:
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            except PermissionError:
                return  # as dockerd in a user namespace: devices are skipped
        else:
            return  # other types (GNU sparse, ...) are skipped
        self._metadata(m, pfd, name, path, mode)

    def _metadata(self, m: tarfile.TarInfo, pfd: int, name: str, path: str, mode: int) -> None:
        """Owner, mode and mtime of the object just made, through an O_PATH fd on it (never
        a name resolved again: the container may have replaced it with a symlink since)."""
        fd = os.open(name, _sys.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode) != m.issym():
                return  # replaced meanwhile: not ours to change
            mtime = int(m.mtime * 1e9)
            if stat.S_ISLNK(st.st_mode):
                if self.can_chown:
                    with contextlib.suppress(OSError):
                        os.chown(name, *self._owner(m), dir_fd=pfd, follow_symlinks=False)
                with contextlib.suppress(OSError):
                    os.utime(name, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)
                return
            via, proc = f"self/fd/{fd}", _proc()  # the inode itself (a magic link), not a path walk
            if self.can_chown:
                with contextlib.suppress(OSError):
                    os.chown(via, *self._owner(m), dir_fd=proc)
            os.chmod(via, mode, dir_fd=proc)  # after chown, which clears setuid bits
            if m.isdir():
                self.dir_times.append((path, mtime))
            else:
                os.utime(via, ns=(mtime, mtime), dir_fd=proc)
        finally:
            os.close(fd)
