"""FUSE passthrough in the direct engine (``-o passthrough=auto|on|off``, overlayfs_py/fuse/
passthrough.py; docs/semantics.md, "FUSE passthrough"), compared with the kernel overlay.

* Data through passthrough (reads, writes, O_APPEND, shared writable mmap, truncate of an
  open file, fsync, sizes and times after writes) and the copy-up cases (two writers, an
  O_TRUNC open, a rename then an open, a read-only fd open before a copy-up): every result
  and the view and upper layer after them equal the kernel's, with passthrough and without
  it (``off``: the page cache of plain opens, FOPEN_KEEP_CACHE).
* The one pinned divergence: a read-only fd opened on a lower file before its copy-up
  reads the lower file through passthrough (the kernel's follows the copy-up);
  ``passthrough=off`` follows it, as the kernel.
* Proof that passthrough serves the data: a stopped server still answers reads of a file
  opened before it stopped; with ``off`` the read waits for the server
  (fusectl's ``waiting`` counts it).
* A node the node budget drops while a passthrough file of it is open.
* Configuration: the option's values, ``on`` refused in one line where it cannot work.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import mounts
from helpers.stacks import BIG, T0, F, build_layer, make_many_files
from helpers.writeops import run_pair
from overlayfs_py.fuse.passthrough import why_not_possible

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

needs_passthrough = pytest.mark.skipif(
    os.geteuid() != 0 or why_not_possible() is not None, reason=f"no FUSE passthrough here: {why_not_possible()}"
)


@pytest.fixture
def direct(monkeypatch):
    """Every pyoverlay mount of the test on the direct engine; returns a setter of the
    passthrough mode of the subject's mounts (the kernel side gets no such option)."""
    monkeypatch.setenv(mounts.ENGINE_ENV, "direct")

    def mode(value: str) -> None:
        monkeypatch.setenv(mounts.PASSTHROUGH_ENV, value)

    return mode


def _layers():
    l1 = {"top": F(b"top\n", mtime_ns=T0)}
    l2 = {
        "seq": BIG(3 * (1 << 20) + 123, seed=1, mtime_ns=T0),
        "w": F(b"0123456789" * 10, mtime_ns=T0),
        "app": F(b"start\n", mtime_ns=T0),
        "mm": BIG(2 * 4096 + 100, seed=2, mtime_ns=T0),
        "tr": F(b"truncate me\n" * 10, mtime_ns=T0),
        "sync": F(b"sync\n", mtime_ns=T0),
        "two": F(b"two writers\n", mtime_ns=T0),
        "otr": F(b"o_trunc\n" * 4, mtime_ns=T0),
        "ren": F(b"rename me\n", mtime_ns=T0),
        "ro": F(b"read only first\n", mtime_ns=T0),
        "rocache": F(b"cached before the copy-up\n", mtime_ns=T0),
        "lazy": BIG(3 * 4096, seed=3, mtime_ns=T0),
    }
    return [l1, l2]


def _pread_all(fd: int, size: int = 1 << 24) -> bytes:
    return os.pread(fd, size, 0)


def _data_ops(m: Path, rec) -> None:
    # reads: sequential (whole file, in 128 KiB pieces) and random 4 KiB
    def seq():
        fd = os.open(m / "seq", os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, 128 * 1024):
                chunks.append(chunk)
            data = b"".join(chunks)
            return len(data), hash(data), [os.pread(fd, 4096, off)[:8] for off in (0, 4095, 1 << 20, 3 << 20)]
        finally:
            os.close(fd)

    rec.do("seq read", seq)

    def write_then_stat():
        before = os.stat(m / "w")
        fd = os.open(m / "w", os.O_RDWR)
        try:
            out = [os.pwrite(fd, b"AB", 3), os.pwrite(fd, b"tail", 200), os.fstat(fd).st_size, os.stat(m / "w").st_size]
            after = os.stat(m / "w")
            out += [after.st_mtime_ns > before.st_mtime_ns, after.st_ctime_ns >= before.st_ctime_ns]
            out.append(_pread_all(fd))
            return out
        finally:
            os.close(fd)

    rec.do("write, then size and mtime", write_then_stat)
    rec.do("stat after close", lambda: (os.stat(m / "w").st_size, os.stat(m / "w").st_mtime_ns > T0))

    def append():
        fd = os.open(m / "app", os.O_WRONLY | os.O_APPEND)
        try:
            return [os.write(fd, b"more\n"), os.write(fd, b"again\n"), os.fstat(fd).st_size]
        finally:
            os.close(fd)

    rec.do("O_APPEND", append)
    rec.do("after O_APPEND", lambda: (m / "app").read_bytes())

    def mmap_shared():
        fd = os.open(m / "mm", os.O_RDWR)
        try:
            with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                mm[10:14] = b"MMAP"
                mm[4096:4100] = b"PAGE"
                mm.flush()
            return [os.pread(fd, 20, 0), os.pread(fd, 8, 4096), os.fstat(fd).st_size]
        finally:
            os.close(fd)

    rec.do("mmap MAP_SHARED", mmap_shared)
    rec.do("after mmap (new open)", lambda: (m / "mm").read_bytes()[:20])

    def truncate_open():
        fd = os.open(m / "tr", os.O_RDWR)
        try:
            out = [os.pread(fd, 5, 0)]
            os.truncate(m / "tr", 7)  # by path, the file open
            out += [os.fstat(fd).st_size, os.pread(fd, 100, 0)]
            os.ftruncate(fd, 3)
            out += [os.stat(m / "tr").st_size, os.pread(fd, 100, 0)]
            os.pwrite(fd, b"XY", 10)
            out += [os.fstat(fd).st_size, os.pread(fd, 100, 0)]
            return out
        finally:
            os.close(fd)

    rec.do("truncate while open", truncate_open)

    def fsync():
        fd = os.open(m / "sync", os.O_RDWR)
        try:
            os.write(fd, b"SYNC")
            os.fsync(fd)
            os.fdatasync(fd)
            return _pread_all(fd)
        finally:
            os.close(fd)

    rec.do("fsync", fsync)

    def two_writers():
        a = os.open(m / "two", os.O_RDWR)
        b = os.open(m / "two", os.O_RDWR)
        try:
            os.pwrite(a, b"AAA", 0)
            out = [_pread_all(b)]
            os.pwrite(b, b"BB", 1)
            out += [_pread_all(a), os.fstat(a).st_size]
            return out
        finally:
            os.close(a)
            os.close(b)

    rec.do("two writers", two_writers)

    def o_trunc():
        fd = os.open(m / "otr", os.O_RDWR | os.O_TRUNC)
        try:
            return [os.fstat(fd).st_size, os.write(fd, b"new"), _pread_all(fd)]
        finally:
            os.close(fd)

    rec.do("O_TRUNC open", o_trunc)

    def rename_then_open():
        ro = os.open(m / "ren", os.O_RDONLY)
        try:
            os.rename(m / "ren", m / "renamed")
            fd = os.open(m / "renamed", os.O_RDWR)
            try:
                os.pwrite(fd, b"RENAMED", 0)
                return [_pread_all(fd), (m / "renamed").read_bytes(), os.fstat(fd).st_size]
            finally:
                os.close(fd)
        finally:
            os.close(ro)

    rec.do("rename, then open", rename_then_open)

    def ro_before_copy_up():
        # what matches the kernel here; the first fd's reads are test_ro_fd_before_copy_up
        ro = os.open(m / "ro", os.O_RDONLY)
        try:
            first = os.pread(ro, 100, 0)
            fd = os.open(m / "ro", os.O_RDWR)
            try:
                os.pwrite(fd, b"WRITTEN", 0)
                again = os.open(m / "ro", os.O_RDONLY)
                try:
                    return [first, _pread_all(fd), _pread_all(again), os.stat(m / "ro").st_size]
                finally:
                    os.close(again)
            finally:
                os.close(fd)
        finally:
            os.close(ro)

    def reopened():
        # the second open of each finds the node's backing file bound already: the server
        # opens its own real file only when a request needs it (lseek, fsync, fallocate)
        out = []
        for flags in (os.O_RDONLY, os.O_RDONLY, os.O_RDWR, os.O_RDWR):
            fd = os.open(m / "lazy", flags)
            try:
                out += [os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 4096, os.SEEK_DATA), os.pread(fd, 8, 4096)]
                os.fsync(fd)
                if flags == os.O_RDWR:
                    os.posix_fallocate(fd, 0, 5 * 4096)
                    out += [os.fstat(fd).st_size, os.lseek(fd, 0, os.SEEK_HOLE)]
            finally:
                os.close(fd)
        return out

    rec.do("reopened: lseek, fsync, fallocate", reopened)

    rec.do("ro fd, then a writer", ro_before_copy_up)
    rec.do("after the writer", lambda: (m / "ro").read_bytes())


@needs_passthrough
@pytest.mark.parametrize("mode", ["on", "off"])
def test_data_and_copy_up_match_kernel(tmp_path, direct, mode):
    direct(mode)
    run = run_pair(tmp_path, _layers(), _data_ops)
    run.assert_results()
    run.assert_view()
    run.assert_upper()
    run.assert_workdirs()


def _ro_fd_then_write(m: Path, rec) -> None:
    ro = os.open(m / "rocache", os.O_RDONLY)
    try:
        rec.do("first read", os.pread, ro, 100, 0)
        fd = os.open(m / "rocache", os.O_RDWR)
        try:
            os.pwrite(fd, b"CHANGED", 0)
            rec.do("read through the fd opened before", os.pread, ro, 100, 0)
            rec.do("fstat of the fd opened before", lambda: os.fstat(ro).st_size)
        finally:
            os.close(fd)
    finally:
        os.close(ro)


@needs_passthrough
def test_ro_fd_before_copy_up(tmp_path, direct):
    """The divergence passthrough keeps (docs/semantics.md): the kernel's fd follows the
    copy-up; the passthrough fd reads the lower file it was opened on. With
    ``passthrough=off`` (the page cache kept across opens) it follows, as the kernel's."""
    old, new = b"cached before the copy-up\n", b"CHANGEDbefore the copy-up\n"
    direct("on")
    run = run_pair(tmp_path / "on", _layers(), _ro_fd_then_write)
    assert run.k.results["read through the fd opened before"] == new
    assert run.s.results["read through the fd opened before"] == old
    run.assert_results("first read", "fstat of the fd opened before")
    run.assert_view()
    run.assert_upper()
    direct("off")
    run = run_pair(tmp_path / "off", _layers(), _ro_fd_then_write)
    run.assert_results()
    assert run.s.results["read through the fd opened before"] == new


# --- proof that the kernel serves the data ---------------------------------------------------


def _waiting(mountpoint: Path) -> int:
    """Requests of the mount's FUSE connection waiting for the server (fusectl)."""
    minor = os.minor(os.stat(mountpoint).st_dev)
    return int(Path(f"/sys/fs/fuse/connections/{minor}/waiting").read_text())


_READER = """
import os, sys
fd = int(sys.argv[1])
data = os.pread(fd, 1 << 22, 0)
sys.stdout.write(str(len(data)))
"""


def _read_with_server_stopped(tmp_path: Path, mode: str) -> tuple[str, int]:
    """Open a lower file, stop the server, read the file in a child; returns what the child
    read and how many requests were waiting for the server meanwhile."""
    lower = build_layer(tmp_path / "lower", {"f": BIG(3 << 20, seed=5)})
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    upper.mkdir()
    work.mkdir()
    opts = ["engine=direct", f"passthrough={mode}"]
    with mounts.PyoverlayMount([lower], mnt, upper, work, options=opts) as m:
        fd = os.open(mnt / "f", os.O_RDONLY)
        assert m.proc is not None
        os.kill(m.proc.pid, signal.SIGSTOP)
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", _READER, str(fd)], pass_fds=(fd,), stdout=subprocess.PIPE, text=True
            )
            waiting = 0
            while child.poll() is None and waiting == 0:  # until it ends or waits for the server
                time.sleep(0.01)
                waiting = _waiting(mnt)
        finally:
            os.kill(m.proc.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=60)
        os.close(fd)
    return out, waiting


@needs_passthrough
def test_passthrough_reads_need_no_server(tmp_path):
    out, waiting = _read_with_server_stopped(tmp_path, "on")
    assert (out, waiting) == (str(3 << 20), 0)


@needs_passthrough
def test_passthrough_off_reads_through_the_server(tmp_path):
    out, waiting = _read_with_server_stopped(tmp_path, "off")
    assert waiting >= 1 and out == str(3 << 20)


@needs_passthrough
def test_passthrough_reads_leave_the_lower_atime(tmp_path):
    """Reading a lower file does not change its atime (semantics.md, "Reading"): the
    kernel opens passthrough backing files with the FUSE file's flags, not the O_NOATIME
    of the server's real files."""
    old = 1_000_000_000
    lower = build_layer(tmp_path / "lower", {"f": BIG(1 << 20, seed=3, atime_ns=old * 10**9)})
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    upper.mkdir()
    work.mkdir()
    with mounts.PyoverlayMount([lower], mnt, upper, work, options=["engine=direct", "passthrough=on"]):
        for _ in range(2):  # the second open reuses the node's registered backing file
            assert len((mnt / "f").read_bytes()) == 1 << 20
    assert os.stat(lower / "f").st_atime_ns == old * 10**9


@needs_passthrough
def test_layer_on_a_stacked_filesystem_falls_back(tmp_path):
    """A lower layer on an overlay mount cannot back passthrough files (the kernel's
    stacking depth: ELOOP): its files get plain opens, and passthrough files already open
    on upper files go on being opened with passthrough (a plain open of an inode bound to a
    backing file fails with EIO)."""
    base = build_layer(tmp_path / "base", {"low": F(b"from a stacked layer\n")})
    (tmp_path / "ku").mkdir()
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    upper.mkdir()
    work.mkdir()
    with mounts.KernelOverlay([base], tmp_path / "stacked", tmp_path / "ku", tmp_path / "kw") as stacked:
        opts = ["engine=direct", "passthrough=on"]
        with mounts.PyoverlayMount([stacked.path], mnt, upper, work, options=opts):
            fd = os.open(mnt / "new", os.O_RDWR | os.O_CREAT, 0o644)  # on ext4: passthrough
            try:
                os.write(fd, b"upper file\n")
                assert (mnt / "low").read_bytes() == b"from a stacked layer\n"  # plain
                assert (mnt / "new").read_bytes() == b"upper file\n"  # while fd is open
                os.pwrite(fd, b"UPPER", 0)
            finally:
                os.close(fd)
            assert (mnt / "new").read_bytes() == b"UPPER file\n"
            with open(mnt / "low", "r+b") as f:  # copy-up to ext4, a plain open now
                f.write(b"FROM")
            assert (mnt / "low").read_bytes() == b"FROM a stacked layer\n"


# --- the node budget --------------------------------------------------------------------------


@needs_passthrough
def test_node_dropped_by_the_budget_while_open(tmp_path):
    """A walk past ``max_nodes`` makes the kernel drop entries (the open file's among them:
    its inode stays while open); the passthrough fd goes on reading and writing, and a new
    open of the name (a new node) sees the data written."""
    lower = build_layer(tmp_path / "lower", {"keep": F(b"keep me\n")})
    (lower / "d").mkdir()
    make_many_files(lower / "d", [f"f{i:04d}" for i in range(2500)])
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    upper.mkdir()
    work.mkdir()
    with mounts.PyoverlayMount([lower], mnt, upper, work, options=["engine=direct", "max_nodes=1000"]):
        fd = os.open(mnt / "keep", os.O_RDWR)
        try:
            for _ in range(2):
                for name in os.listdir(mnt / "d"):
                    os.stat(mnt / "d" / name)
            os.pwrite(fd, b"KEEP", 0)
            assert os.pread(fd, 100, 0) == b"KEEP me\n"
            assert (mnt / "keep").read_bytes() == b"KEEP me\n"
        finally:
            os.close(fd)
        assert (mnt / "keep").read_bytes() == b"KEEP me\n"
    assert (upper / "keep").read_bytes() == b"KEEP me\n"


# --- configuration ----------------------------------------------------------------------------


def test_passthrough_option_values():
    from overlayfs_py.config import ConfigError, MountConfig, _passthrough

    assert MountConfig.passthrough == "auto" and _passthrough(None, None) == "auto"
    assert _passthrough("off", None) == "off" and _passthrough("on", "direct") == "on"
    with pytest.raises(ConfigError, match="one of auto, on, off"):
        _passthrough("yes", "direct")
    with pytest.raises(ConfigError, match="needs 'engine=direct'"):
        _passthrough("on", "pyfuse3")


def test_passthrough_on_refused_in_a_user_namespace(tmp_path):
    """``on`` where the kernel would refuse the backing ioctl: one line, non-zero exit, and
    nothing mounted."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    argv = mounts.pyoverlay_argv([lower], mnt, upper, work, ["engine=direct", "passthrough=on"])
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", *argv],
        cwd=mounts.REPO_ROOT,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "passthrough=on" in lines[0] and "user namespace" in lines[0], r.stderr
    assert not mounts.is_mounted(mnt)


# --- INIT and the ioctl numbers (no kernel) ----------------------------------------------------


def test_backing_ioctl_numbers_match_fuse_h():
    from overlayfs_py.fuse import passthrough as pt

    # include/uapi/linux/fuse.h: FUSE_DEV_IOC_BACKING_OPEN _IOW(229, 1, struct fuse_backing_map),
    # FUSE_DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)
    assert pt.BACKING_MAP.size == 16
    assert (pt.BACKING_OPEN, pt.BACKING_CLOSE) == (0x4010E501, 0x4004E502)


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_init_asks_for_passthrough_unless_off(mode):
    from overlayfs_py.fuse import proto as p
    from overlayfs_py.fuse.passthrough import Passthrough
    from overlayfs_py.fuse.session import PASSTHROUGH_STACK_DEPTH, Session

    class _Ops:
        sync: dict = {}
        asyncs: dict = {}
        passthrough = Passthrough(mode)

    class _Tracer:
        def emit(self, *a, **k):
            pass

    r, w = os.pipe()
    try:
        s = Session(w, _Ops(), _Tracer())  # type: ignore[arg-type]
        offered = p.ASYNC_READ | p.MAX_PAGES | p.INIT_EXT | p.PASSTHROUGH
        body = p.INIT_IN.pack(7, 45, 131072, offered & 0xFFFF_FFFF, offered >> 32) + bytes(44)
        head = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), p.INIT, 3, 1, 0, 0, 1, 0, 0)
        assert s._handle(memoryview(head + body))
        raw = os.read(r, 4096)
        *_, flags, _bg, _ct, _mw, _gran, _pages, _al, flags2, depth, _timeout = p.INIT_OUT.unpack_from(raw, 16)
        asked = mode == "on" or (mode == "auto" and why_not_possible() is None)
        assert bool(flags2 << 32 & p.PASSTHROUGH) == asked and bool(flags & p.INIT_EXT)
        assert depth == (PASSTHROUGH_STACK_DEPTH if asked else 0)
        assert _Ops.passthrough.active == asked
    finally:
        os.close(r)
        os.close(w)
