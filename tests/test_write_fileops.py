"""fallocate (every mode), lseek SEEK_DATA / SEEK_HOLE and copy_file_range through a
writable mount, compared with the kernel overlay (issue 15; semantics.md, "Data operations").

fallocate on a lower file opens it for writing first, which copies it up (as a write
would); on a file made through the mount it acts on the upper file. SEEK_DATA / SEEK_HOLE
run on sparse lower files (read-only fds), sparse upper files and a sparse file copied up.
copy_file_range: lower -> upper, upper -> upper, within one file (overlapping: EINVAL as
the kernel), from a read-only fd opened before its file was copied up. O_TMPFILE in a
lower directory and in the root, named by linkat (AT_EMPTY_PATH and the /proc link), O_EXCL,
over a lower name and over its whiteout.

Only the direct engine serves them: pyfuse3 3.5 has no handler for fallocate, lseek or
tmpfile (the kernel then answers EOPNOTSUPP, treats the whole file as data, resp. fails
open(O_TMPFILE) with EOPNOTSUPP), so those checks are skipped there with that reason;
copy_file_range falls back to the kernel's splice copy there and is compared on both
engines. The FUSE kernel module itself refuses
FALLOC_FL_COLLAPSE_RANGE and FALLOC_FL_INSERT_RANGE before asking any server
(fs/fuse/file.c): that difference from the kernel overlay is asserted as such.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import threading

import pytest

from helpers import mounts
from helpers.stacks import BIG, SPARSE, T0, F
from helpers.writeops import run_pair
from overlayfs_py import _sys
from overlayfs_py.config import MountConfig

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

KiB = 1024
KEEP, PUNCH, ZERO = _sys.FALLOC_FL_KEEP_SIZE, _sys.FALLOC_FL_PUNCH_HOLE, _sys.FALLOC_FL_ZERO_RANGE
COLLAPSE, INSERT = _sys.FALLOC_FL_COLLAPSE_RANGE, _sys.FALLOC_FL_INSERT_RANGE

#: (label, mode, offset, length): each on a lower file and on an upper one
FALLOCATE_CASES = [
    ("alloc-extend", 0, 60 * KiB, 40 * KiB),
    ("keep-size", KEEP, 64 * KiB, 64 * KiB),
    ("punch-hole", PUNCH | KEEP, 4 * KiB, 8 * KiB),
    ("punch-unaligned", PUNCH | KEEP, 100, 5000),
    ("punch-without-keep", PUNCH, 4 * KiB, 8 * KiB),  # EOPNOTSUPP from the VFS, both
    ("zero-range", ZERO, 100, 20 * KiB),
    ("zero-range-extend", ZERO, 60 * KiB, 20 * KiB),
    ("zero-range-keep", ZERO | KEEP, 60 * KiB, 20 * KiB),
]
#: refused by the FUSE kernel module for every FUSE filesystem (never sent to a server)
FUSE_REFUSED = [
    ("collapse-range", COLLAPSE, 8 * KiB, 16 * KiB),
    ("insert-range", INSERT, 8 * KiB, 16 * KiB),
]

SIZE = 64 * KiB
SPARSE_SIZE = 1024 * KiB
SPARSE_CHUNKS = [(0, b"a" * 4 * KiB), (512 * KiB, b"b" * 8 * KiB)]


def engine() -> str:
    return os.environ.get(mounts.ENGINE_ENV) or MountConfig.engine


def _pyfuse3_skip(what: str) -> None:
    if engine() == "pyfuse3":
        pytest.skip(f"pyfuse3 3.5 has no {what} handler (semantics.md: only the direct engine serves it)")


def _layers():
    lower = {}
    for label, *_ in FALLOCATE_CASES + FUSE_REFUSED:
        lower[f"fa-{label}"] = BIG(SIZE, seed=len(label), mtime_ns=T0)
    lower["sparse"] = SPARSE(SPARSE_SIZE, SPARSE_CHUNKS, mtime_ns=T0)
    lower["sparse-cu"] = SPARSE(SPARSE_SIZE, SPARSE_CHUNKS, mtime_ns=T0)
    lower["src"] = BIG(300 * KiB, seed=11, mtime_ns=T0)
    lower["same"] = BIG(20 * KiB, seed=12, mtime_ns=T0)
    lower["follow"] = BIG(16 * KiB, seed=13, mtime_ns=T0)
    lower["td/f"] = F(b"lower file\n", mtime_ns=T0)
    lower["td/g"] = F(b"lower g\n", mtime_ns=T0)
    return [lower]


def _digest(fd: int) -> tuple[int, str]:
    st = os.fstat(fd)
    data = os.pread(fd, st.st_size + 1, 0)
    return st.st_size, hashlib.sha256(data).hexdigest()[:16]


def _extents(fd: int) -> list:
    """The data extents SEEK_DATA / SEEK_HOLE report, then what SEEK_DATA past the last says."""
    out: list = []
    off = 0
    size = os.fstat(fd).st_size
    while off < size:
        try:
            data = os.lseek(fd, off, _sys.SEEK_DATA)
        except OSError as exc:
            out.append(errno.errorcode[exc.errno])
            break
        hole = os.lseek(fd, data, _sys.SEEK_HOLE)
        out.append((data, hole))
        off = hole
    try:
        out.append(("past-end", os.lseek(fd, size + 1, _sys.SEEK_DATA)))
    except OSError as exc:
        out.append(("past-end", errno.errorcode[exc.errno]))
    out.append(("hole-at-0", os.lseek(fd, 0, _sys.SEEK_HOLE)))
    return out


def _fallocate(path, mode, offset, length, create=False):
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o644)
    try:
        if create:  # an upper file with data: the same bytes as its lower twin
            os.write(fd, BIG(SIZE, seed=99).data)
        try:
            _sys.fallocate(fd, mode, offset, length)
            res = "OK"
        except OSError as exc:
            res = "ERR:" + errno.errorcode[exc.errno]
        st = os.fstat(fd)
        return [res, *_digest(fd), st.st_blocks, _extents(fd)]
    finally:
        os.close(fd)


def _fallocate_readonly(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        _sys.fallocate(fd, KEEP, 0, 4096)
    finally:
        os.close(fd)


def _seek_lower(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return _extents(fd)
    finally:
        os.close(fd)


def _seek_upper(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.pwrite(fd, b"x" * 4 * KiB, 0)
        os.pwrite(fd, b"y" * 4 * KiB, 256 * KiB)
        os.ftruncate(fd, SPARSE_SIZE)
        return _extents(fd)
    finally:
        os.close(fd)


def _seek_copied_up(path):
    fd = os.open(path, os.O_RDWR)  # copies the sparse lower file up
    try:
        return _extents(fd)
    finally:
        os.close(fd)


def _copy(src_fd, dst_fd, count, off_in, off_out):
    total = 0
    while total < count:
        n = os.copy_file_range(src_fd, dst_fd, count - total, off_in + total, off_out + total)
        if n == 0:
            break
        total += n
    return total


def _copy_lower_to_upper(m):
    s = os.open(m / "src", os.O_RDONLY)
    d = os.open(m / "dst-lu", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        return [_copy(s, d, 250 * KiB, 10, 5), _copy(s, d, 100, 0, 400 * KiB), _digest(d)]
    finally:
        os.close(s)
        os.close(d)


def _copy_upper_to_upper(m):
    a = os.open(m / "up-a", os.O_CREAT | os.O_RDWR, 0o644)
    b = os.open(m / "up-b", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(a, BIG(70 * KiB, seed=5).data)
        os.write(b, b"keep me\n" * 10)
        return [_copy(a, b, 70 * KiB, 0, 40), _copy(a, b, 10, 70 * KiB, 0), _digest(b)]
    finally:
        os.close(a)
        os.close(b)


def _copy_same_file(m):
    fd = os.open(m / "same", os.O_RDWR)
    out: list = []
    try:
        for off_in, off_out, n in ((0, 500, 1000), (0, 10 * KiB, 4 * KiB), (8 * KiB, 0, 4 * KiB)):
            try:
                out.append(os.copy_file_range(fd, fd, n, off_in, off_out))
            except OSError as exc:
                out.append("ERR:" + errno.errorcode[exc.errno])
        out.append(_digest(fd))
        return out
    finally:
        os.close(fd)


def _copy_to_readonly(m):
    s = os.open(m / "src", os.O_RDONLY)
    d = os.open(m / "src", os.O_RDONLY)
    try:
        return os.copy_file_range(s, d, 10, 0, 0)
    finally:
        os.close(s)
        os.close(d)


def _copy_from_fd_opened_before_copy_up(m):
    ro = os.open(m / "follow", os.O_RDONLY)
    try:
        w = os.open(m / "follow", os.O_WRONLY)  # copies it up
        os.pwrite(w, b"NEW DATA", 0)
        os.close(w)
        d = os.open(m / "dst-follow", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            return [_copy(ro, d, 16 * KiB, 0, 0), _digest(d)]
        finally:
            os.close(d)
    finally:
        os.close(ro)


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, AT_EMPTY_PATH, AT_SYMLINK_FOLLOW = -100, 0x1000, 0x400


def _linkat(fd: int, path, how: str) -> None:
    """Name an O_TMPFILE file: linkat(fd, "", AT_EMPTY_PATH) or through its /proc link."""
    if how == "empty":
        r = _libc.linkat(fd, b"", AT_FDCWD, os.fsencode(path), AT_EMPTY_PATH)
    else:
        r = _libc.linkat(AT_FDCWD, b"/proc/self/fd/%d" % fd, AT_FDCWD, os.fsencode(path), AT_SYMLINK_FOLLOW)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(path))


def _tmpfile_link(m, d, name, how, mode=0o640):
    fd = os.open(m / d if d else m, os.O_TMPFILE | os.O_RDWR, mode)
    try:
        os.write(fd, b"made unnamed\n")
        before = os.fstat(fd)
        _linkat(fd, m / d / name, how)
        after = os.fstat(fd)
        named = os.stat(m / d / name)
        os.pwrite(fd, b"MADE", 0)  # the same file under its new name
        return [before.st_nlink, oct(before.st_mode), after.st_nlink, named.st_ino == before.st_ino]
    finally:
        os.close(fd)


def _tmpfile_rules(m):
    out: list = []
    fd = os.open(m / "td", os.O_TMPFILE | os.O_WRONLY | os.O_EXCL, 0o600)
    try:
        _linkat(fd, m / "td" / "excl", "empty")
        out.append("linked")
    except OSError as exc:
        out.append("ERR:" + errno.errorcode[exc.errno])
    finally:
        os.close(fd)
    fd = os.open(m / "td", os.O_TMPFILE | os.O_RDWR, 0o666)  # umask 022 applies
    try:
        os.ftruncate(fd, 5000)
        os.fchmod(fd, 0o604)
        out.append([oct(os.fstat(fd).st_mode), os.fstat(fd).st_size])
        try:
            _linkat(fd, m / "td" / "f", "empty")  # a lower name
            out.append("linked")
        except OSError as exc:
            out.append("ERR:" + errno.errorcode[exc.errno])
        os.unlink(m / "td" / "f")  # now a whiteout in upper: the link replaces it
        _linkat(fd, m / "td" / "f", "empty")
        out.append(sorted(os.listdir(m / "td")))
    finally:
        os.close(fd)
    fd = os.open(m, os.O_TMPFILE | os.O_RDWR, 0o600)  # never named: nothing is left
    os.write(fd, b"gone\n")
    os.close(fd)
    return out


def _ops(m, rec):
    rec.do("tmpfile in a lower dir, AT_EMPTY_PATH", _tmpfile_link, m, "td", "named-empty", "empty")
    rec.do("tmpfile in a lower dir, /proc link", _tmpfile_link, m, "td", "named-proc", "proc")
    rec.do("tmpfile in the root", _tmpfile_link, m, "", "root-tmp", "empty", 0o600)
    rec.do("tmpfile O_EXCL, mode, over a lower name", _tmpfile_rules, m)
    for label, mode, off, length in FALLOCATE_CASES + FUSE_REFUSED:
        rec.do(f"fallocate lower {label}", _fallocate, m / f"fa-{label}", mode, off, length)
        rec.do(f"fallocate upper {label}", _fallocate, m / f"new-{label}", mode, off, length, create=True)
    rec.do("fallocate read-only fd", _fallocate_readonly, m / "src")
    rec.do("seek lower sparse", _seek_lower, m / "sparse")
    rec.do("seek upper sparse", _seek_upper, m / "sparse-new")
    rec.do("seek copied-up sparse", _seek_copied_up, m / "sparse-cu")
    rec.do("copy lower->upper", _copy_lower_to_upper, m)
    rec.do("copy upper->upper", _copy_upper_to_upper, m)
    rec.do("copy same file", _copy_same_file, m)
    rec.do("copy to read-only fd", _copy_to_readonly, m)
    rec.do("copy from fd opened before copy-up", _copy_from_fd_opened_before_copy_up, m)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("fileops"), _layers(), _ops)


@pytest.mark.parametrize("where", ["lower", "upper"])
@pytest.mark.parametrize("case", FALLOCATE_CASES, ids=[c[0] for c in FALLOCATE_CASES])
def test_fallocate_modes(run, case, where):
    _pyfuse3_skip("fallocate")
    label = case[0]
    name = f"fa-{label}" if where == "lower" else f"new-{label}"
    k = run.k.results[f"fallocate {where} {label}"]
    assert k[0] == ("ERR:" + errno.errorcode[errno.EOPNOTSUPP] if label == "punch-without-keep" else "OK"), k
    run.assert_results(f"fallocate {where} {label}")
    run.assert_view(name)
    run.assert_upper(name)


@pytest.mark.parametrize("where", ["lower", "upper"])
@pytest.mark.parametrize("case", FUSE_REFUSED, ids=[c[0] for c in FUSE_REFUSED])
def test_fallocate_modes_fuse_refuses(run, case, where):
    """The kernel overlay collapses / inserts; every FUSE filesystem gets EOPNOTSUPP from
    the FUSE module, before its server is asked (pyoverlay's core would serve them).
    This fails once a kernel passes them on: then they belong to test_fallocate_modes."""
    label = case[0]
    name = f"fa-{label}" if where == "lower" else f"new-{label}"
    k = run.k.results[f"fallocate {where} {label}"]
    s = run.s.results[f"fallocate {where} {label}"]
    assert k[0] == "OK" and k[1] == SIZE + (16 * KiB if label == "insert-range" else -16 * KiB)
    assert s[0] == "ERR:" + errno.errorcode[errno.EOPNOTSUPP] and s[1] == SIZE, s
    # the file is unchanged, but copied up by its open for writing, as on the kernel
    assert run.kupper(name) is not None
    assert run.s.upper is not None and run.s.upper["entries"][name]["size"] == SIZE


def test_fallocate_needs_a_writable_fd(run):
    assert run.k.results["fallocate read-only fd"] == "ERR:EBADF"
    run.assert_results("fallocate read-only fd")


@pytest.mark.parametrize("label", ["seek lower sparse", "seek upper sparse", "seek copied-up sparse"])
def test_seek_data_and_hole(run, label):
    _pyfuse3_skip("lseek")
    k = run.k.results[label]
    if label != "seek copied-up sparse":  # the kernel's copy-up writes the holes out
        assert len(k) > 3, k  # holes were seen: the files really are sparse
    run.assert_results(label)


def test_seek_data_and_hole_files(run):
    _pyfuse3_skip("lseek")
    run.assert_view("sparse", "sparse-new", "sparse-cu")
    run.assert_upper("sparse-new", "sparse-cu")


def test_copy_file_range_lower_to_upper(run):
    k = run.k.results["copy lower->upper"]
    assert k[:2] == [250 * KiB, 100]
    run.assert_results("copy lower->upper")
    run.assert_view("src", "dst-lu")
    run.assert_upper("dst-lu")


def test_copy_file_range_upper_to_upper(run):
    assert run.k.results["copy upper->upper"][:2] == [70 * KiB, 0]
    run.assert_results("copy upper->upper")
    run.assert_view("up-a", "up-b")
    run.assert_upper("up-a", "up-b")


def test_copy_file_range_within_one_file(run):
    k = run.k.results["copy same file"]
    assert k[0] == "ERR:EINVAL" and k[1] == 4 * KiB and k[2] == 4 * KiB, k
    run.assert_results("copy same file")
    run.assert_view("same")
    run.assert_upper("same")


def test_copy_file_range_to_a_read_only_fd(run):
    assert run.k.results["copy to read-only fd"] == "ERR:EBADF"
    run.assert_results("copy to read-only fd")


def test_copy_file_range_from_an_fd_opened_before_copy_up(run):
    run.assert_results("copy from fd opened before copy-up")
    run.assert_view("follow", "dst-follow")
    run.assert_upper("follow", "dst-follow")


TMPFILE_LABELS = [
    "tmpfile in a lower dir, AT_EMPTY_PATH",
    "tmpfile in a lower dir, /proc link",
    "tmpfile in the root",
]


@pytest.mark.parametrize("label", TMPFILE_LABELS)
def test_o_tmpfile_and_linkat(run, label):
    _pyfuse3_skip("tmpfile")
    k = run.k.results[label]
    assert k[0] == 0 and k[2] == 1 and k[3] is True, k
    run.assert_results(label)


def test_o_tmpfile_rules(run):
    _pyfuse3_skip("tmpfile")
    k = run.k.results["tmpfile O_EXCL, mode, over a lower name"]
    assert k[0] == "ERR:ENOENT" and k[2] == "ERR:EEXIST", k
    run.assert_results("tmpfile O_EXCL, mode, over a lower name")


def test_o_tmpfile_files(run):
    _pyfuse3_skip("tmpfile")
    paths = ["td", "td/f", "td/g", "td/named-empty", "td/named-proc", "root-tmp"]
    run.assert_view(*paths)
    run.assert_upper(*paths)
    run.assert_workdirs()


def test_whole_tree_and_workdir(run):
    if engine() == "pyfuse3":
        pytest.skip("pyfuse3 3.5 serves no fallocate: the fallocated files differ (semantics.md)")
    refused = {f"{w}-{c[0]}" for c in FUSE_REFUSED for w in ("fa", "new")}
    run.assert_results(*[lb for lb in run.k.results if not any(lb.endswith(" " + c[0]) for c in FUSE_REFUSED)])
    paths = [p for p in run.k.view["entries"] if p not in refused]
    assert len(paths) > 20
    run.assert_view(*paths)
    run.assert_upper(*[p for p in run.k.upper["entries"] if p not in refused])
    run.assert_workdirs()


BIG_MB = int(os.environ.get("PYOVERLAY_CONCURRENCY_MB", "256"))


def test_large_copy_file_range_does_not_stall_other_requests(tmp_path, monkeypatch):
    """While one copy_file_range of BIG_MB MiB from a lower file runs (its destination
    grows in the upper layer), other requests through the mount are answered. Checked by
    what is observable, never by time (as tests/test_write_concurrency.py)."""
    if engine() == "pyfuse3":
        pytest.skip("pyfuse3 3.5 has no copy_file_range handler: the kernel copies by splice itself")
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "small").write_bytes(b"small file\n")
    chunk = os.urandom(1 << 20)
    with open(lower / "big", "wb") as f:
        for _ in range(BIG_MB):
            f.write(chunk)
    with mounts.PyoverlayMount([lower], mnt, upper, work, log_path=tmp_path / "server.log"):
        done = threading.Event()
        result: list = []

        def copier():
            try:
                s = os.open(mnt / "big", os.O_RDONLY)
                d = os.open(mnt / "copy", os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    result.append(os.copy_file_range(s, d, BIG_MB << 20, 0, 0))
                finally:
                    os.close(s)
                    os.close(d)
            except OSError as exc:  # pragma: no cover - reported below
                result.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=copier)
        t.start()
        try:
            while not done.is_set():  # started: the destination grows in the upper layer
                try:
                    if (upper / "copy").stat().st_size > 0:
                        break
                except FileNotFoundError:
                    pass
            assert not done.is_set(), "the copy finished before it could be observed"
            assert (mnt / "small").read_bytes() == b"small file\n"
            assert sorted(os.listdir(mnt)) == ["big", "copy", "small"]
            (mnt / "new").write_bytes(b"written meanwhile\n")
            still_copying = not done.is_set()
        finally:
            t.join()
        assert result == [BIG_MB << 20], result
        assert still_copying, "requests were only answered after the copy had finished"
    assert (upper / "copy").stat().st_size == BIG_MB << 20
    assert (upper / "new").read_bytes() == b"written meanwhile\n"
