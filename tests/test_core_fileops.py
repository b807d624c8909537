"""The core's data operations on open handles, in process (no FUSE, no kernel overlay):
fallocate in every mode (COLLAPSE_RANGE and INSERT_RANGE included, which the FUSE kernel
module never passes on), SEEK_DATA / SEEK_HOLE, copy_file_range from a lower file opened
read-only to an upper one. The mount-level comparison with the kernel overlay is
tests/test_write_fileops.py; these show the core itself serves them (the kernel falls back
to a splice copy when a FUSE server does not serve copy_file_range, so a mount alone
cannot tell).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from helpers.core import build_core
from overlayfs_py import _sys
from overlayfs_py.core import Core
from overlayfs_py.overlay import Caller

CALLER = Caller(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid(), umask=0o022)
KiB = 1024


@pytest.fixture
def core(tmp_path):
    lower, upper = tmp_path / "l1", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    (lower / "data").write_bytes(bytes(range(256)) * 256)  # 64 KiB
    with open(lower / "sparse", "wb") as f:
        f.write(b"a" * 4 * KiB)
        f.seek(512 * KiB)
        f.write(b"b" * 4 * KiB)
        f.truncate(1024 * KiB)
    c = build_core([lower], upper, tmp_path / "wd")
    try:
        yield c
    finally:
        c.destroy()


def _open(core: Core, name: str, flags: int) -> int:
    node, _ = core.view.lookup(core.view.inodes.root, name.encode())
    core.view.inodes.ref(node)
    return trio.run(core.view.open, node, flags, CALLER)


def _create(core: Core, name: str) -> int:
    _n, _st, fh = core.writes.create(core.view.inodes.root, name.encode(), 0o644, os.O_RDWR, CALLER)
    return fh


def _upper(tmp_path: Path, name: str) -> bytes:
    return (tmp_path / "upper" / name).read_bytes()


EXPECTED = {  # mode -> what the 64 KiB file becomes (fallocate at 8 KiB, 16 KiB long)
    _sys.FALLOC_FL_COLLAPSE_RANGE: lambda d: d[: 8 * KiB] + d[24 * KiB :],
    _sys.FALLOC_FL_INSERT_RANGE: lambda d: d[: 8 * KiB] + bytes(16 * KiB) + d[8 * KiB :],
    _sys.FALLOC_FL_PUNCH_HOLE | _sys.FALLOC_FL_KEEP_SIZE: lambda d: d[: 8 * KiB] + bytes(16 * KiB) + d[24 * KiB :],
    _sys.FALLOC_FL_ZERO_RANGE: lambda d: d[: 8 * KiB] + bytes(16 * KiB) + d[24 * KiB :],
    _sys.FALLOC_FL_KEEP_SIZE: lambda d: d,
    0: lambda d: d,
}


@pytest.mark.parametrize("mode", list(EXPECTED), ids=["collapse", "insert", "punch", "zero", "keep", "plain"])
def test_fallocate_every_mode_on_a_lower_file_copies_it_up(core, tmp_path, mode):
    before = (tmp_path / "l1" / "data").read_bytes()
    fh = _open(core, "data", os.O_RDWR)  # the open for writing copies up, as a write's
    try:
        trio.run(core.writes.fallocate, fh, mode, 8 * KiB, 16 * KiB)
    finally:
        core.view.release(fh)
    assert _upper(tmp_path, "data") == EXPECTED[mode](before)
    assert (tmp_path / "l1" / "data").read_bytes() == before  # the lower file is never written


def test_fallocate_on_a_read_only_handle_is_ebadf(core):
    fh = _open(core, "data", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            trio.run(core.writes.fallocate, fh, 0, 0, 4096)
        assert ei.value.errno == errno.EBADF
    finally:
        core.view.release(fh)


def test_fallocate_unknown_mode_is_eopnotsupp(core):
    fh = _create(core, "new")
    try:
        with pytest.raises(OSError) as ei:
            trio.run(core.writes.fallocate, fh, 0x400, 0, 4096)
        assert ei.value.errno == errno.EOPNOTSUPP
    finally:
        core.view.release(fh)


def test_seek_data_and_hole_on_a_lower_file(core):
    fh = _open(core, "sparse", os.O_RDONLY)
    try:
        ov = core.view
        assert ov.lseek(fh, 0, _sys.SEEK_DATA) == 0
        assert ov.lseek(fh, 0, _sys.SEEK_HOLE) == 4 * KiB
        assert ov.lseek(fh, 4 * KiB, _sys.SEEK_DATA) == 512 * KiB
        assert ov.lseek(fh, 512 * KiB, _sys.SEEK_HOLE) == 516 * KiB
        with pytest.raises(OSError) as ei:
            ov.lseek(fh, 516 * KiB, _sys.SEEK_DATA)
        assert ei.value.errno == errno.ENXIO
        with pytest.raises(OSError) as ei:
            ov.lseek(fh, 0, os.SEEK_END)  # the kernel answers the others itself
        assert ei.value.errno == errno.EINVAL
    finally:
        core.view.release(fh)


def test_copy_file_range_lower_to_upper(core, tmp_path):
    src = _open(core, "data", os.O_RDONLY)
    dst = _create(core, "copy")
    try:
        n = trio.run(core.writes.copy_file_range, src, 100, dst, 7, 30 * KiB, 0)
        assert n == 30 * KiB
        with pytest.raises(OSError) as ei:
            trio.run(core.writes.copy_file_range, src, 0, dst, 0, 10, 1)
        assert ei.value.errno == errno.EINVAL  # no flags are defined
    finally:
        core.view.release(src)
        core.view.release(dst)
    data = (tmp_path / "l1" / "data").read_bytes()
    assert _upper(tmp_path, "copy") == bytes(7) + data[100 : 100 + 30 * KiB]
    assert not (tmp_path / "upper" / "data").exists()  # the source stays lower


def test_copy_file_range_within_one_file_overlapping_is_einval(core):
    fh = _open(core, "data", os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            trio.run(core.writes.copy_file_range, fh, 0, fh, 100, 1000, 0)
        assert ei.value.errno == errno.EINVAL
        assert trio.run(core.writes.copy_file_range, fh, 0, fh, 8 * KiB, 4 * KiB, 0) == 4 * KiB
    finally:
        core.view.release(fh)


def test_copy_range_across_file_systems_copies_by_hand(tmp_path):
    """/dev/shm (tmpfs) to tmp_path: copy_file_range may refuse across file systems."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    src_path = shm / f"pyoverlay-test-{os.getpid()}"
    src_path.write_bytes(b"0123456789" * 1000)
    try:
        s = os.open(src_path, os.O_RDONLY)
        d = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            assert _sys.copy_range(s, 5, d, 3, 9000) == 9000
        finally:
            os.close(s)
            os.close(d)
    finally:
        src_path.unlink()
    assert (tmp_path / "dst").read_bytes() == bytes(3) + (b"0123456789" * 1000)[5:9005]


def test_tmpfile_is_unnamed_until_a_link_names_it(core, tmp_path):
    (tmp_path / "l1" / "dir").mkdir()
    inodes = core.view.inodes
    parent, _ = core.view.lookup(inodes.root, b"dir")
    inodes.ref(parent)
    node, st, fh = core.writes.tmpfile(parent, 0o100666, os.O_RDWR, CALLER)
    inodes.ref(node)
    try:
        assert st.st_nlink == 0 and st.st_mode & 0o777 == 0o644  # the caller's umask
        assert (tmp_path / "upper" / "dir").is_dir() and os.listdir(tmp_path / "upper" / "dir") == []
        assert not inodes.reachable(node) and inodes.get(node.id) is node
        core.writes.write(fh, 0, b"unnamed")
        named, _ = trio.run(core.writes.link, node, parent, b"name", CALLER)
        assert named is node and inodes.reachable(node) and node.name == b"name" and not node.aliases
        assert core.view.lookup(parent, b"name")[0] is node
    finally:
        core.view.release(fh)
    assert (tmp_path / "upper" / "dir" / "name").read_bytes() == b"unnamed"
    assert not (tmp_path / "l1" / "dir" / "name").exists()


def test_tmpfile_never_named_leaves_nothing(core, tmp_path):
    inodes = core.view.inodes
    node, _st, fh = core.writes.tmpfile(inodes.root, 0o100600, os.O_WRONLY | os.O_EXCL, CALLER)
    inodes.ref(node)
    core.view.release(fh)
    inodes.forget(node.id, 1)
    assert inodes.get(node.id) is None
    assert sorted(os.listdir(tmp_path / "upper")) == []


def test_tmpfile_on_a_read_only_overlay_is_erofs(tmp_path):
    lower = tmp_path / "lo"
    lower.mkdir()
    c = build_core([lower], read_only=True)
    try:
        with pytest.raises(OSError) as ei:
            c.writes.tmpfile(c.view.inodes.root, 0o100600, os.O_RDWR, CALLER)
        assert ei.value.errno == errno.EROFS
    finally:
        c.destroy()
