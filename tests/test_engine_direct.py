"""pyoverlay's own FUSE engine (``-o engine=direct``, overlayfs_py/fuse/).

* The protocol layouts (overlayfs_py/fuse/proto.py) against the sizes and offsets of the
  kernel's ``include/uapi/linux/fuse.h``; INIT negotiation and the answers of the request
  loop, on a pipe (no kernel).
* ``-o engine=`` and ``$PYOVERLAY_ENGINE`` in the configuration: the default is the direct
  engine; an unknown engine is refused in one line.
* The whole suite runs on each engine: scripts/test runs it once with the default engine and
  once with ``PYOVERLAY_ENGINE=pyfuse3`` (tests/helpers/mounts.py passes it to every mount).
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys

import pytest
import trio

from helpers import mounts
from overlayfs_py.fuse import proto as p
from overlayfs_py.fuse.session import MAX_WRITE, Session

# --- the protocol ---------------------------------------------------------------------------


def test_layout_sizes_match_fuse_h():
    sizes = {
        p.IN_HEADER: 40,
        p.OUT_HEADER: 16,
        p.ATTR: 88,
        p.ENTRY_OUT: 128,
        p.ATTR_OUT: 104,
        p.INIT_OUT: 64,
        p.SETATTR_IN: 88,
        p.OPEN_OUT: 16,
        p.CREATE_IN: 16,
        p.MKNOD_IN: 16,
        p.READ_IN: 40,
        p.WRITE_IN: 40,
        p.RELEASE_IN: 24,
        p.STATFS_OUT: 80,
        p.DIRENT: 24,
        p.NOTIFY_INVAL_INODE_OUT: 24,
        p.NOTIFY_INVAL_ENTRY_OUT: 16,
        p.FORGET_ONE: 16,
    }
    assert {s.format: s.size for s in sizes} == {s.format: n for s, n in sizes.items()}


def test_init_flag_bits():
    assert p.INIT_EXT == 1 << 30 and p.PASSTHROUGH == 1 << 37 and p.MAX_PAGES == 1 << 22
    assert p.DO_READDIRPLUS == 1 << 13 and p.FOPEN_PASSTHROUGH == 1 << 7 and p.FOPEN_NOFLUSH == 1 << 5


def test_attr_packing_splits_times():
    fields = p.pack_attr_fields(7, 0o100644, 1, 2, 3, 0, 10, 8, 4096, 1_500_000_001, 2_000_000_000, 5)
    raw = p.ATTR.pack(*fields)
    ino, size, blocks, atime, mtime, ctime, an, mn, cn, mode, nlink, uid, gid, rdev, blksize, flags = p.ATTR.unpack(raw)
    assert (ino, size, blocks, mode, nlink, uid, gid, blksize) == (7, 10, 8, 0o100644, 1, 2, 3, 4096)
    assert (atime, an, mtime, mn, ctime, cn) == (1, 500_000_001, 2, 0, 0, 5)
    # a time before 1970 (negative) wraps as the kernel's s64 in a u64 field
    before = p.ATTR.unpack(p.ATTR.pack(*p.pack_attr_fields(1, 0, 1, 0, 0, 0, 0, 0, 0, -1, 0, 0)))
    assert struct.unpack("=q", struct.pack("=Q", before[3]))[0] == -1 and before[6] == 999_999_999


def test_dirent_is_padded_to_8():
    for name in (b"a", b"abcdefgh", b"x" * 13):
        raw = p.dirent(5, 9, 4, name)
        assert len(raw) % 8 == 0
        assert p.DIRENT.unpack_from(raw) == (5, 9, len(name), 4)
        assert raw[24 : 24 + len(name)] == name


def test_notifications():
    raw = p.notify_inval_entry(12, b"name")
    length, code, unique = p.OUT_HEADER.unpack_from(raw)
    assert (length, code, unique) == (len(raw), p.NOTIFY_INVAL_ENTRY, 0)
    assert p.NOTIFY_INVAL_ENTRY_OUT.unpack_from(raw, 16) == (12, 4, 0)
    assert raw[32:] == b"name\0"
    raw = p.notify_inval_inode(3)
    assert p.OUT_HEADER.unpack_from(raw) == (40, p.NOTIFY_INVAL_INODE, 0)
    assert p.NOTIFY_INVAL_INODE_OUT.unpack_from(raw, 16) == (3, -1, 0)


class _NoOps:
    sync: dict = {}
    asyncs: dict = {}


class _Tracer:
    def emit(self, *a, **k):
        pass


def _request(opcode: int, unique: int, body: bytes = b"", nodeid: int = 1) -> memoryview:
    head = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 1, 0, 0)
    return memoryview(head + body)


def _session():
    r, w = os.pipe()
    return Session(w, _NoOps(), _Tracer()), r, w  # type: ignore[arg-type]


def test_init_negotiation_sets_init_ext_and_flags2():
    s, r, w = _session()
    try:
        offered = p.ASYNC_READ | p.DO_READDIRPLUS | p.MAX_PAGES | p.INIT_EXT | p.WRITEBACK_CACHE | p.POSIX_LOCKS
        body = p.INIT_IN.pack(7, 45, 131072, offered & 0xFFFF_FFFF, (offered | p.PASSTHROUGH) >> 32) + bytes(44)
        assert s._handle(_request(p.INIT, 9, body))
        raw = os.read(r, 4096)
        length, error, unique = p.OUT_HEADER.unpack_from(raw)
        assert (length, error, unique) == (16 + 64, 0, 9)
        major, minor, readahead, flags, _bg, _ct, max_write, gran, pages, _al, flags2, *_ = p.INIT_OUT.unpack_from(
            raw, 16
        )
        assert (major, minor, readahead, max_write, gran, pages) == (
            7,
            p.KERNEL_MINOR_VERSION,
            131072,
            MAX_WRITE,
            1,
            256,
        )
        assert flags & p.INIT_EXT and flags & p.DO_READDIRPLUS and flags & p.MAX_PAGES
        assert not flags & p.WRITEBACK_CACHE and not flags & p.POSIX_LOCKS  # not asked for
        assert flags2 == 0  # passthrough not asked for in this step
    finally:
        os.close(r)
        os.close(w)


def test_unknown_and_unneeded_opcodes_answer_enosys_and_destroy_ends():
    s, r, w = _session()
    try:
        for unique, opcode in ((1, 9999), (2, p.FLUSH), (3, p.BMAP), (4, p.GETLK)):
            assert s._handle(_request(opcode, unique, bytes(16)))
            assert p.OUT_HEADER.unpack(os.read(r, 4096)) == (16, -errno.ENOSYS, unique)
        assert s._handle(_request(p.INTERRUPT, 5, p.INTERRUPT_IN.pack(4)))  # no reply
        assert not s._handle(_request(p.DESTROY, 6))
        assert p.OUT_HEADER.unpack(os.read(r, 4096)) == (16, 0, 6)
    finally:
        os.close(r)
        os.close(w)


# --- configuration ------------------------------------------------------------------------


def test_engine_option_default_and_unknown(tmp_path, monkeypatch):
    from overlayfs_py.config import ENGINE_ENV, ConfigError, MountConfig, _engine

    monkeypatch.delenv(ENGINE_ENV, raising=False)
    assert MountConfig.engine == "direct" and _engine(None) == "direct" and _engine("pyfuse3") == "pyfuse3"
    monkeypatch.setenv(ENGINE_ENV, "pyfuse3")
    assert _engine(None) == "pyfuse3" and _engine("direct") == "direct"
    monkeypatch.setenv(ENGINE_ENV, "bogus")
    with pytest.raises(ConfigError, match=ENGINE_ENV):
        _engine(None)
    monkeypatch.delenv(ENGINE_ENV)
    with pytest.raises(ConfigError):
        _engine("bogus")
    lo, mnt = tmp_path / "lo", tmp_path / "mnt"
    lo.mkdir()
    mnt.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", "mount", "-o", "engine=bogus", str(lo), str(mnt)],
        capture_output=True,
        text=True,
        env=mounts.pyoverlay_env(),
        cwd=mounts.REPO_ROOT,
    )
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "engine" in r.stderr, r.stderr
    assert not mounts.is_mounted(mnt)


# --- on a real mount ------------------------------------------------------------------------


def _layers(tmp_path, data: bytes):
    """lower/upper/workdir/mountpoint, the lower holding ``f`` (*data*, ``user.k=v``)."""
    lo, up, wd, mnt = (tmp_path / n for n in ("lo", "up", "wd", "mnt"))
    for d in (lo, up, wd, mnt):
        d.mkdir()
    (lo / "f").write_bytes(data)
    os.setxattr(lo / "f", "user.k", b"v")
    return lo, up, wd, mnt


@pytest.mark.kernel
@pytest.mark.fuse
def test_direct_mount_serves_and_unmounts(tmp_path, monkeypatch):
    monkeypatch.setenv(mounts.ENGINE_ENV, "direct")
    lo, up, wd, mnt = _layers(tmp_path, b"lower\n")
    with mounts.PyoverlayMount([lo], mnt, up, wd, log_path=tmp_path / "log") as m:
        row = mounts.mount_entry(mnt)
        assert row is not None and row.fstype == "fuse.pyoverlay"
        assert os.getxattr(m.path / "f", "user.k") == b"v"
        with pytest.raises(OSError) as ei:
            os.getxattr(m.path / "f", "user.missing")
        assert ei.value.errno == errno.ENODATA  # not ENOSYS: the kernel would stop asking
        # ... and asks again after a miss
        assert os.getxattr(m.path / "f", "user.k") == b"v"
        fd = os.open(m.path / "f", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"more\n")
        os.close(fd)
        assert (m.path / "f").read_bytes() == b"lower\nmore\n"
        assert (up / "f").read_bytes() == b"lower\nmore\n"
    assert not mounts.is_mounted(mnt)
    # the direct engine served it (pyfuse3 would pass every check above too)
    assert "direct engine: INIT" in (tmp_path / "log").read_text()


@pytest.mark.kernel
@pytest.mark.fuse
def test_setxattr_create_and_replace_flags(tmp_path, monkeypatch):
    monkeypatch.setenv(mounts.ENGINE_ENV, "direct")
    lo, up, wd, mnt = _layers(tmp_path, b"x")
    with mounts.PyoverlayMount([lo], mnt, up, wd, log_path=tmp_path / "log") as m:
        f = m.path / "f"
        with pytest.raises(OSError) as ei:
            os.setxattr(f, "user.k", b"w", os.XATTR_CREATE)
        assert ei.value.errno == errno.EEXIST
        with pytest.raises(OSError) as ei:
            os.setxattr(f, "user.new", b"w", os.XATTR_REPLACE)
        assert ei.value.errno == errno.ENODATA
        os.setxattr(f, "user.k", b"w", os.XATTR_REPLACE)
        os.setxattr(f, "user.new", b"n", os.XATTR_CREATE)
        assert (os.getxattr(f, "user.k"), os.getxattr(f, "user.new")) == (b"w", b"n")
    assert "direct engine: INIT" in (tmp_path / "log").read_text()


class _AsyncOps:
    """One request served in a task (as CREATE or a write OPEN): it answers when released."""

    sync: dict = {}

    def __init__(self) -> None:
        self.asyncs = {p.CREATE: self.create}

    async def create(self, req) -> bytes:
        await trio.sleep(0)
        return b"done"


def test_a_spawned_request_task_keeps_the_loop_out_of_its_idle_poll():
    """The loop waits in poll(2) (IDLE_POLL_MS) only while no task of its own runs. A
    request handed to a task counts from the moment it is handed over: trio may resume the
    loop before the task's first step, and the kernel, waiting for that very reply, sends
    nothing to wake the poll (every CREATE or write OPEN took up to 20 ms)."""
    r, w = os.pipe()
    s = Session(w, _AsyncOps(), _Tracer())  # type: ignore[arg-type]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            s._nursery = nursery
            assert s._handle(_request(p.CREATE, 7, bytes(16)))
            assert s._tasks == 1  # what the loop's idle check reads, before the task ran
        assert s._tasks == 0
        assert os.read(r, 4096) == p.OUT_HEADER.pack(16 + 4, 0, 7) + b"done"

    try:
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)
