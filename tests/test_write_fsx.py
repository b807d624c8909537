"""An fsx-style file exerciser, differential: the same seeded random data operations on
one file of a kernel overlay mount and of a pyoverlay mount, side by side, with every
operation the kernel overlay supports (issue 17 item 3).

Debian 12 packages no ``fsx`` (xfstests is not in bookworm; ``apt-cache search fsx`` finds
only libfsxfs), so this is fsx's operation mix in Python: read, write (extending, past
EOF: holes), mapread, mapwrite, truncate up and down, fallocate (plain and KEEP_SIZE),
PUNCH_HOLE, ZERO_RANGE (plain and KEEP_SIZE), COLLAPSE_RANGE, INSERT_RANGE, copy_file_range
(from a lower file opened read-only, and within the file), SEEK_DATA / SEEK_HOLE (checked
for what they promise), fsync, close and reopen. The file starts in the lower layer: the first open for writing copies
it up. Each operation's result (bytes read, errno) is compared, and the whole file at
checkpoints and at the end, through the mounts and in the uppers after unmount.

As fsx does, an operation the subject refuses (EOPNOTSUPP) on a probe before the run is
left out for both sides; which ones that are is asserted: on the direct engine only
COLLAPSE_RANGE and INSERT_RANGE (the FUSE kernel module never passes them on: exactly what
fuse-overlayfs loses); on pyfuse3 3.5 the whole fallocate family (semantics.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import random

import pytest

from helpers import mounts
from helpers.stacks import BIG, T0
from helpers.writeops import Side, run_start, subject_label, workdir_problems
from overlayfs_py import _sys
from overlayfs_py.config import MountConfig

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

N_OPS = int(os.environ.get("PYOVERLAY_FSX_OPS", "2000"))
CHECKPOINT = 100
SEEDS = [int(s) for s in os.environ["PYOVERLAY_SEED"].split(",")] if os.environ.get("PYOVERLAY_SEED") else [1, 2, 3]
MAXLEN = 256 * 1024  # fsx's default -l
MAXOP = 64 * 1024  # fsx's default -o
BLOCK = 4096

FALLOC_OPS = {
    "fallocate": 0,
    "fallocate_keep": _sys.FALLOC_FL_KEEP_SIZE,
    "punch_hole": _sys.FALLOC_FL_PUNCH_HOLE | _sys.FALLOC_FL_KEEP_SIZE,
    "zero_range": _sys.FALLOC_FL_ZERO_RANGE,
    "zero_range_keep": _sys.FALLOC_FL_ZERO_RANGE | _sys.FALLOC_FL_KEEP_SIZE,
    "collapse_range": _sys.FALLOC_FL_COLLAPSE_RANGE,
    "insert_range": _sys.FALLOC_FL_INSERT_RANGE,
}
OPS = ["read", "write", "mapread", "mapwrite", "truncate", *FALLOC_OPS, "copy_range", "copy_self", "seek", "fsync"]
WEIGHTS = {"read": 4, "write": 4, "mapread": 2, "mapwrite": 2}
EXPECTED_REFUSED = {
    "direct": {"collapse_range", "insert_range"},
    "pyfuse3": set(FALLOC_OPS),
}


def engine() -> str:
    return os.environ.get(mounts.ENGINE_ENV) or MountConfig.engine


def _layers():
    return [{"file": BIG(100_000, seed=3, mtime_ns=T0), "src": BIG(MAXLEN, seed=4, mtime_ns=T0)}]


class Target:
    """The file under test on one mount (an O_RDWR fd, reopened now and then) and a
    read-only fd of the lower ``src`` for copy_file_range."""

    def __init__(self, root) -> None:
        self.root = root
        self.fd = os.open(root / "file", os.O_RDWR)
        self.src = os.open(root / "src", os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.src)

    def content(self) -> tuple[int, str]:
        size = os.fstat(self.fd).st_size
        return size, hashlib.sha256(os.pread(self.fd, size + 1, 0)).hexdigest()[:16]

    def apply(self, op: tuple):
        try:
            return self._apply(op)
        except OSError as exc:
            return "ERR:" + errno.errorcode.get(exc.errno, str(exc.errno))

    def _apply(self, op: tuple):
        name, off, length, data_seed = op
        fd = self.fd
        size = os.fstat(fd).st_size
        if name == "read":
            return hashlib.sha256(os.pread(fd, length, off)).hexdigest()[:12]
        if name == "write":
            return os.pwrite(fd, random.Random(data_seed).randbytes(length), off)
        if name in ("mapread", "mapwrite"):
            if size == 0:
                return "empty"
            off %= size
            length = max(1, min(length, size - off))
            start = off - off % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(fd, off + length - start, mmap.MAP_SHARED, offset=start) as mm:
                if name == "mapread":
                    return hashlib.sha256(mm[off - start : off - start + length]).hexdigest()[:12]
                mm[off - start : off - start + length] = random.Random(data_seed).randbytes(length)
                mm.flush()
                return length
        if name == "truncate":
            os.ftruncate(fd, off)
            return os.fstat(fd).st_size
        if name in FALLOC_OPS:
            if name in ("collapse_range", "insert_range"):  # block-aligned, inside the file
                off -= off % BLOCK
                length = max(BLOCK, length - length % BLOCK)
            _sys.fallocate(fd, FALLOC_OPS[name], off, length)
            return os.fstat(fd).st_size
        if name == "copy_range":
            return os.copy_file_range(self.src, fd, length, off % MAXLEN, data_seed % MAXLEN)
        if name == "copy_self":
            return os.copy_file_range(fd, fd, length, off, data_seed % MAXLEN)
        if name == "seek":
            return self._seek_check(fd, off, size)
        if name == "fsync":
            os.fsync(fd)
            os.close(fd)  # and close/reopen, as fsx -c does
            self.fd = os.open(self.root / "file", os.O_RDWR)
            return "ok"
        raise AssertionError(name)

    @staticmethod
    def _seek_check(fd: int, off: int, size: int):
        """What SEEK_DATA / SEEK_HOLE promise, not their exact answers: a file system may
        report an unwritten extent as data while pages of it are cached, and the page
        caches of the two mounts differ. The skipped range reads as zeros; ENXIO at EOF."""
        out = []
        for whence in (_sys.SEEK_DATA, _sys.SEEK_HOLE):
            try:
                pos = os.lseek(fd, off, whence)
            except OSError as exc:
                if exc.errno == errno.ENXIO and whence == _sys.SEEK_DATA and off < size:
                    # no data after *off*: the rest must read as zeros
                    out.append("data skipped" if os.pread(fd, size - off, off).strip(b"\0") else "ok")
                else:
                    out.append(errno.errorcode[exc.errno])
                continue
            if not off <= pos <= size:
                out.append(f"{pos} outside [{off}, {size}]")
            elif whence == _sys.SEEK_DATA and os.pread(fd, pos - off, off).strip(b"\0"):
                out.append("data skipped")
            elif whence == _sys.SEEK_HOLE and pos < size and os.pread(fd, 1, pos) != b"\0":
                out.append("hole with data")
            else:
                out.append("ok")
        return out


def _gen(rng: random.Random, ops: list[str]) -> tuple:
    name = rng.choices(ops, weights=[WEIGHTS.get(o, 1) for o in ops])[0]
    off = rng.randrange(MAXLEN)
    length = rng.randrange(1, MAXOP)
    if off + length > MAXLEN:
        length = MAXLEN - off
    return name, off, max(1, length), rng.randrange(1 << 30)


def _refused(root) -> set[str]:
    """The fallocate modes the mount refuses with EOPNOTSUPP (fsx's own probe), on a scratch file."""
    out = set()
    fd = os.open(root / "probe", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.pwrite(fd, b"p" * 4 * BLOCK, 0)
        for name, mode in FALLOC_OPS.items():
            length = BLOCK
            try:
                _sys.fallocate(fd, mode, BLOCK if mode & _sys.FALLOC_FL_COLLAPSE_RANGE else 0, length)
            except OSError as exc:
                if exc.errno == errno.EOPNOTSUPP:
                    out.add(name)
    finally:
        os.close(fd)
        os.unlink(root / "probe")
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_fsx(tmp_path, seed):
    sname = subject_label()
    t0 = run_start()
    ks = Side(tmp_path / "kernel", _layers(), t0)
    ss = Side(tmp_path / "subject", _layers(), t0)
    rng = random.Random(seed)
    mismatches: list[str] = []
    with contextlib.ExitStack() as es:
        km = es.enter_context(ks.mount("kernel"))
        sm = es.enter_context(ss.mount("subject"))
        assert _refused(km.path) == set(), "the kernel overlay serves every fallocate mode on ext4"
        refused = _refused(sm.path)
        if sname == "pyoverlay":
            assert refused == EXPECTED_REFUSED[engine()], refused
        ops = [o for o in OPS if o not in refused]
        if engine() == "pyfuse3":  # no lseek handler: the kernel treats the file as all data
            ops.remove("seek")
        kt, st = Target(km.path), Target(sm.path)
        try:
            for i in range(N_OPS):
                op = _gen(rng, ops)
                kr, sr = kt.apply(op), st.apply(op)
                if kr != sr:
                    mismatches.append(f"op #{i} {op}: kernel={kr!r} {sname}={sr!r}")
                    break
                if (i + 1) % CHECKPOINT == 0 and kt.content() != st.content():
                    mismatches.append(f"after op #{i}: file differs: kernel={kt.content()} {sname}={st.content()}")
                    break
            final = (kt.content(), st.content())
        finally:
            kt.close()
            st.close()
        sm.check_alive()
    assert not mismatches, f"seed {seed} (ops {ops}): " + mismatches[0]
    assert final[0] == final[1]
    # after unmount: the uppers hold the same file, the workdirs nothing
    up = [hashlib.sha256((s.upper / "file").read_bytes()).hexdigest() for s in (ks, ss)]
    assert up[0] == up[1]
    assert not workdir_problems(ks.workdir) and not workdir_problems(ss.workdir)
