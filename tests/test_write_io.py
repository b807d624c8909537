"""Data I/O through a writable mount, compared with the kernel overlay:
write / pwrite past EOF, truncate, fsync / fdatasync, O_APPEND, O_DIRECT,
shared writable mmap + msync, fallocate, copy_file_range, EBADF cases, and
flock / POSIX locks between two processes (semantics.md rows 33, 61, 71).
"""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from helpers.stacks import BIG, T0, F
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


def _layers():
    l1 = {"top": F(b"top\n", mtime_ns=T0)}
    l2 = {
        "w": F(b"0123456789" * 10, mtime_ns=T0),
        "tr": F(b"truncate me\n" * 10, mtime_ns=T0),
        "sync": F(b"sync\n", mtime_ns=T0),
        "app": F(b"start\n", mtime_ns=T0),
        "direct": BIG(3 * 4096, seed=7, mtime_ns=T0),
        "mm": BIG(2 * 4096 + 100, seed=8, mtime_ns=T0),
        "fa": F(b"fallocate\n", mtime_ns=T0),
        "src": BIG(100_000, seed=9, mtime_ns=T0),
        "lock": F(b"lock me\n", mtime_ns=T0),
        "plock": F(b"posix lock me\n", mtime_ns=T0),
        "ro": F(b"read only fd\n", mtime_ns=T0),
    }
    return [l1, l2]


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _write_ops(m):
    fd = os.open(m / "w", os.O_RDWR)
    try:
        out = [os.pwrite(fd, b"AB", 3), os.pwrite(fd, b"tail", 200), os.pread(fd, 300, 0), os.fstat(fd).st_size]
        os.lseek(fd, 0, os.SEEK_SET)
        out.append(os.write(fd, b"xyz"))
        out.append(os.lseek(fd, 0, os.SEEK_CUR))
        out.append(os.write(fd, b"\0" * (1 << 20)))  # 1 MiB in one call
        out.append(os.fstat(fd).st_size)
        return out
    finally:
        os.close(fd)


def _truncate_ops(m):
    out = [os.truncate(m / "tr", 7), os.stat(m / "tr").st_size, _read(m / "tr")]
    fd = os.open(m / "tr", os.O_WRONLY)
    try:
        os.ftruncate(fd, 5000)
        out.append(os.fstat(fd).st_size)
        os.ftruncate(fd, 3)
    finally:
        os.close(fd)
    out.append(_read(m / "tr"))
    return out


def _sync_ops(m):
    fd = os.open(m / "sync", os.O_RDWR)
    try:
        os.write(fd, b"SYNC")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    fd = os.open(m / "newsync", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"new and synced\n")
        os.fdatasync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return [_read(m / "sync"), _read(m / "newsync")]


def _append_ops(m):
    a = os.open(m / "app", os.O_WRONLY | os.O_APPEND)
    b = os.open(m / "app", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(a, b"a1\n")
        os.write(b, b"b1\n")
        os.lseek(a, 0, os.SEEK_SET)
        os.write(a, b"a2\n")  # O_APPEND ignores the offset
        pos = os.lseek(a, 0, os.SEEK_CUR)
    finally:
        os.close(a)
        os.close(b)
    return [pos, _read(m / "app")]


def _direct_ops(m):
    buf = mmap.mmap(-1, 2 * 4096)
    buf.write(b"D" * 4096 + b"E" * 4096)
    rbuf = mmap.mmap(-1, 3 * 4096)
    fd = os.open(m / "direct", os.O_RDWR | os.O_DIRECT)
    try:
        n = os.pwrite(fd, buf, 4096)
        r = os.preadv(fd, [rbuf], 0)
    finally:
        os.close(fd)
    fd = os.open(m / "newdirect", os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
    try:
        n2 = os.pwrite(fd, buf, 0)
    finally:
        os.close(fd)
    return [n, r, bytes(rbuf), n2, _read(m / "direct"), _read(m / "newdirect")]


def _mmap_ops(m):
    fd = os.open(m / "mm", os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            mm[0:5] = b"MMAP!"
            mm[4096 + 10 : 4096 + 13] = b"XYZ"
            mm[-3:] = b"END"
            mm.flush()  # msync(MS_SYNC)
        finally:
            mm.close()
    finally:
        os.close(fd)
    return _read(m / "mm")


def _fallocate_ops(m):
    fd = os.open(m / "fa", os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 20000)
        return [os.fstat(fd).st_size, _read(m / "fa")]
    finally:
        os.close(fd)


def _copy_range_ops(m):
    s = os.open(m / "src", os.O_RDONLY)
    d = os.open(m / "dst", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        total = 0
        while total < 100_000:
            n = os.copy_file_range(s, d, 100_000 - total)
            if n == 0:
                break
            total += n
    finally:
        os.close(s)
        os.close(d)
    return [total, _read(m / "dst") == _read(m / "src")]


def _ebadf_ops(m):
    out = []
    fd = os.open(m / "ro", os.O_RDONLY)
    try:
        try:
            os.write(fd, b"x")
            out.append("wrote")
        except OSError as e:
            out.append(e.errno)
    finally:
        os.close(fd)
    fd = os.open(m / "newwo", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        try:
            os.read(fd, 1)
            out.append("read")
        except OSError as e:
            out.append(e.errno)
    finally:
        os.close(fd)
    return out


def _try_flock(name, op):
    fd = os.open(name, os.O_RDWR)
    try:
        fcntl.flock(fd, op)
        return "locked"
    finally:
        os.close(fd)


def _try_lockf(name, op):
    fd = os.open(name, os.O_RDWR)
    try:
        fcntl.lockf(fd, op)
        return "locked"
    finally:
        os.close(fd)


def _lock_ops(m, rec):
    fd = os.open(m / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        rec.child(
            "flock: second process LOCK_EX|LOCK_NB while held",
            lambda: _try_flock("lock", fcntl.LOCK_EX | fcntl.LOCK_NB),
            cwd=m,
        )
        rec.child(
            "flock: second process LOCK_SH|LOCK_NB while held",
            lambda: _try_flock("lock", fcntl.LOCK_SH | fcntl.LOCK_NB),
            cwd=m,
        )
        fcntl.flock(fd, fcntl.LOCK_UN)
        rec.child(
            "flock: second process LOCK_EX|LOCK_NB after unlock",
            lambda: _try_flock("lock", fcntl.LOCK_EX | fcntl.LOCK_NB),
            cwd=m,
        )
    finally:
        os.close(fd)
    fd = os.open(m / "plock", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 5, 0)  # bytes 0..4
        rec.child(
            "posix: second process overlapping LOCK_EX|LOCK_NB",
            lambda: _try_lockf("plock", fcntl.LOCK_EX | fcntl.LOCK_NB),
            cwd=m,
        )
        rec.child(
            "posix: second process disjoint range",
            lambda: (
                _l := os.open("plock", os.O_RDWR),
                fcntl.lockf(_l, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 5),
                os.close(_l),
            )[-1],
            cwd=m,
        )
        fcntl.lockf(fd, fcntl.LOCK_UN, 5, 0)
        rec.child(
            "posix: second process after unlock", lambda: _try_lockf("plock", fcntl.LOCK_EX | fcntl.LOCK_NB), cwd=m
        )
    finally:
        os.close(fd)


def _ops(m, rec):
    rec.do("write/pwrite", _write_ops, m)
    rec.do("truncate/ftruncate", _truncate_ops, m)
    rec.do("fsync/fdatasync", _sync_ops, m)
    rec.do("O_APPEND", _append_ops, m)
    rec.do("O_DIRECT", _direct_ops, m)
    rec.do("mmap MAP_SHARED + msync", _mmap_ops, m)
    rec.do("fallocate", _fallocate_ops, m)
    rec.do("copy_file_range", _copy_range_ops, m)
    rec.do("EBADF", _ebadf_ops, m)
    _lock_ops(m, rec)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("io"), _layers(), _ops)


def _check(run, labels, paths):
    run.assert_results(*labels)
    run.assert_view(*paths)
    run.assert_upper(*paths)


def test_write_and_pwrite(run):
    k = run.k.results["write/pwrite"]
    assert k[:2] == [2, 4] and k[3] == 204 and k[4:] == [3, 3, 1 << 20, (1 << 20) + 3]
    _check(run, ["write/pwrite"], ["w"])


def test_truncate(run):
    assert run.k.results["truncate/ftruncate"][-1] == b"tru"
    _check(run, ["truncate/ftruncate"], ["tr"])


def test_fsync_fdatasync(run):
    _check(run, ["fsync/fdatasync"], ["sync", "newsync"])


def test_o_append(run):
    assert run.k.results["O_APPEND"][1] == b"start\na1\nb1\na2\n"
    _check(run, ["O_APPEND"], ["app"])


def test_o_direct(run):
    k = run.k.results["O_DIRECT"]
    assert k[0] == 8192 and k[1] == 3 * 4096 and k[3] == 8192
    _check(run, ["O_DIRECT"], ["direct", "newdirect"])


def test_shared_mmap_msync(run):
    _check(run, ["mmap MAP_SHARED + msync"], ["mm"])


def test_fallocate(run):
    assert run.k.results["fallocate"][0] == 20000
    _check(run, ["fallocate"], ["fa"])


def test_copy_file_range(run):
    assert run.k.results["copy_file_range"] == [100_000, True]
    _check(run, ["copy_file_range"], ["src", "dst"])


def test_ebadf(run):
    import errno

    assert run.k.results["EBADF"] == [errno.EBADF, errno.EBADF]
    _check(run, ["EBADF"], ["ro", "newwo"])


def test_flock_between_processes(run):
    k = run.k.results
    assert k["flock: second process LOCK_EX|LOCK_NB while held"] == "ERR:EAGAIN"  # EWOULDBLOCK
    assert k["flock: second process LOCK_EX|LOCK_NB after unlock"] == "locked"
    run.assert_results(*[lb for lb in k if lb.startswith("flock:")])


def test_posix_locks_between_processes(run):
    k = run.k.results
    assert k["posix: second process overlapping LOCK_EX|LOCK_NB"] in ("ERR:EAGAIN", "ERR:EACCES")
    assert k["posix: second process disjoint range"] == "OK"
    assert k["posix: second process after unlock"] == "locked"
    run.assert_results(*[lb for lb in k if lb.startswith("posix:")])


def test_whole_tree_and_workdir(run):
    run.assert_all()
