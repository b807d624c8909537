"""Copy-up and concurrency: a large copy-up does not stall other requests, and
concurrent openers of one lower file share a single copy-up.

These are pyoverlay-only properties (the kernel has no server loop to stall), so
there is no kernel side; they are checked by what is observable, never by time.
"""

from __future__ import annotations

import os
import threading

import pytest

from helpers import mounts

pytestmark = [pytest.mark.fuse]

CHUNK = 1 << 20
BIG_MB = int(os.environ.get("PYOVERLAY_CONCURRENCY_MB", "512"))


def _stack(tmp_path, big_mb=0):
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "d").mkdir()
    (lower / "d" / "small").write_bytes(b"small file\n")
    (lower / "shared").write_bytes(b"0" * 8192)
    if big_mb:
        buf = os.urandom(CHUNK)
        with open(lower / "big", "wb") as f:
            for _ in range(big_mb):
                f.write(buf)
    return lower, upper, work, mnt


def _work_entries(work):
    return os.listdir(work / "work")


def _copying(work, pid) -> bool:
    """A copy-up is in progress: an entry in work/, or (a regular file is built as an
    unnamed O_TMPFILE file there, as the kernel does) a server fd open on one."""
    if _work_entries(work):
        return True
    return mounts.holds_file_under(pid, str(work / "work") + "/")


def _other_requests_complete(mnt):
    """A lookup, a read, a readdir and a create+write through *mnt* (the test's stack)."""
    assert os.stat(mnt / "d" / "small").st_size == 11
    assert (mnt / "d" / "small").read_bytes() == b"small file\n"
    assert sorted(os.listdir(mnt / "d")) == ["small"]
    (mnt / "new").write_bytes(b"written meanwhile\n")


def test_large_copy_up_does_not_stall_other_requests(tmp_path):
    """While a 512 MiB copy-up is in progress (its temp object sits in work/), other
    processes' lookups, reads, readdirs and writes through the same mount complete."""
    lower, upper, work, mnt = _stack(tmp_path, BIG_MB)
    with mounts.PyoverlayMount([lower], mnt, upper, work, log_path=tmp_path / "server.log") as m:
        pid = m.proc.pid
        done = threading.Event()
        errors = []

        def opener():
            try:
                fd = os.open(mnt / "big", os.O_WRONLY)  # copy-up happens inside this open
                os.close(fd)
            except OSError as exc:  # pragma: no cover - reported below
                errors.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=opener)
        t.start()
        try:
            # wait until the copy-up has started: its object appears in work/
            while not _copying(work, pid) and not done.is_set():
                pass
            assert not done.is_set(), "the copy-up finished before it could be observed"
            _other_requests_complete(mnt)  # from this process, while the copy-up runs
            still_copying = _copying(work, pid) and not done.is_set()
        finally:
            t.join()
        assert not errors, errors
        assert still_copying, "requests were only answered after the copy-up had finished"
        assert (upper / "big").stat().st_size == BIG_MB * CHUNK
        assert (upper / "new").read_bytes() == b"written meanwhile\n"
        assert _work_entries(work) == []


def test_concurrent_openers_share_one_copy_up(tmp_path):
    """Eight threads open the same lower file for writing at once and each writes its own
    block: all opens succeed (a second copy-up would fail its RENAME_NOREPLACE) and every
    block lands in the one upper file."""
    lower, upper, work, mnt = _stack(tmp_path)
    n = 8
    barrier = threading.Barrier(n)
    errors = []

    def writer(i):
        try:
            barrier.wait()
            fd = os.open(mnt / "shared", os.O_WRONLY)
            try:
                os.pwrite(fd, bytes([ord("a") + i]) * 1024, i * 1024)
            finally:
                os.close(fd)
        except OSError as exc:
            errors.append(exc)

    with mounts.PyoverlayMount([lower], mnt, upper, work, log_path=tmp_path / "server.log"):
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        merged = (mnt / "shared").read_bytes()
    assert not errors, errors
    expected = b"".join(bytes([ord("a") + i]) * 1024 for i in range(n))
    assert merged == expected
    assert (upper / "shared").read_bytes() == expected
    assert (lower / "shared").read_bytes() == b"0" * 8192
    assert _work_entries(work) == []


def _server_syncing(pid) -> bool:
    """One of the server's threads is inside fsync(2) or fdatasync(2) (x86-64: 74, 75)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                if f.read().split(" ", 1)[0] in ("74", "75"):
                    return True
        except OSError:
            continue
    return False


def test_fsync_does_not_stall_other_requests(tmp_path):
    """While the server syncs a large dirty file for one process's fsync, other processes'
    lookups, reads, readdirs and writes through the same mount complete."""
    lower, upper, work, mnt = _stack(tmp_path)
    with mounts.PyoverlayMount([lower], mnt, upper, work, log_path=tmp_path / "server.log") as m:
        pid = m.proc.pid
        fd = os.open(mnt / "dirty", os.O_WRONLY | os.O_CREAT, 0o644)
        buf = os.urandom(CHUNK)
        for _ in range(BIG_MB):
            os.write(fd, buf)  # dirty pages of the upper file, in the server's page cache
        done = threading.Event()
        errors = []

        def syncer():
            try:
                os.fsync(fd)
            except OSError as exc:  # pragma: no cover - reported below
                errors.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=syncer)
        t.start()
        try:
            while not _server_syncing(pid) and not done.is_set():
                pass
            assert not done.is_set(), "the fsync finished before it could be observed"
            _other_requests_complete(mnt)
            still_syncing = _server_syncing(pid) and not done.is_set()
        finally:
            t.join()
            os.close(fd)
        assert not errors, errors
        assert still_syncing, "requests were only answered after the fsync had finished"
        assert (upper / "dirty").stat().st_size == BIG_MB * CHUNK
        assert (upper / "new").read_bytes() == b"written meanwhile\n"
