"""Faults the filesystem must survive (issue 17, "Faults, to survive and test").

1. The FUSE server SIGKILLed in the middle of a large copy-up, a large ``rm -r`` and a
   rename storm (several threads): the caller in flight gets an error (ECONNABORTED, the
   abort of a request in flight; ENOTCONN after it), never a hang; any later call on the
   dead mount gets ENOTCONN; ``pyoverlay umount`` removes the dead mount; the next
   ``pyoverlay mount`` of the same upper and workdir empties ``work/`` (what the crash left
   there plus leftovers planted by the test, within the depth the kernel cleans) and shows
   a consistent tree: every operation acknowledged before the kill is done, none not yet
   started is, the one in flight is done or not (never half: no name twice, none lost, no
   torn file); the kernel's overlay mounts the same upper and workdir read-write and shows
   the same tree.
2. ENOSPC in the upper filesystem (a small tmpfs) during a copy-up: the writer gets the
   error the kernel gives, no partial file is visible (nor left in upper or work/, nor
   holding the space), and the mount goes on working. The same for EDQUOT, over a btrfs
   qgroup limit (this kernel has no tmpfs, ext4 or XFS quota: docs/semantics.md "Faults").

Both engines (direct, pyfuse3) are run.  The container case is in
tests/runner/test_run_faults.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import mounts
from helpers.faults import remount_and_compare, sha, super_rw, view_of
from helpers.writeops import errname, workdir_problems

pytestmark = [pytest.mark.kernel, pytest.mark.fuse, pytest.mark.needs_root]

ENGINES = ["direct", "pyfuse3"]
BIG_MB = int(os.environ.get("PYOVERLAY_FAULT_MB", "200"))
CHUNK = 1 << 20
DEAD = {"ENOTCONN", "ECONNABORTED"}  # ECONNABORTED: a request in flight at the abort


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _mount(lower: Path, base: Path, upper: Path, workdir: Path, engine: str) -> mounts.PyoverlayMount:
    opts = [f"engine={engine}"]
    return mounts.PyoverlayMount(
        [lower], base / "mnt", upper=upper, workdir=workdir, options=opts, log_path=base / "srv.log"
    )


def _pyoverlay(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=mounts.pyoverlay_env(),
        cwd=mounts.REPO_ROOT,
        timeout=120,
    )


class Workers:
    """Threads doing a workload on a mount; each records what it finished and what it
    was doing when it failed."""

    def __init__(self, jobs):
        self.done: list = []  # operations acknowledged (returned without error)
        self.inflight: dict[int, object] = {}  # thread index -> the operation that failed
        self.errors: dict[int, str] = {}
        self.count = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i, j), daemon=True) for i, j in enumerate(jobs)]

    def _run(self, i, job) -> None:
        for op, fn in job:
            try:
                fn()
            except OSError as e:
                self.inflight[i] = op
                self.errors[i] = errname(e)
                return
            with self.lock:
                self.done.append(op)
                self.count += 1

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not self.alive()


def _kill_when(m, ready, what: str, timeout: float = 60.0) -> None:
    """SIGKILL the server of *m* as soon as ``ready()`` (the workload is under way)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what}: the workload never got under way"
        time.sleep(0.001)
    os.kill(m.proc.pid, signal.SIGKILL)
    m.proc.wait(30)


def _dead_mount_checks(m) -> None:
    """After the kill: calls fail with ENOTCONN at once, ``pyoverlay umount`` removes the
    dead mount (nothing else does: the test's own teardown would hide a failure)."""
    for call in (os.stat, os.listdir, lambda p: os.open(p, os.O_RDONLY)):
        with pytest.raises(OSError) as ei:
            call(m.path / "anything")
        assert errname(ei.value) == "ENOTCONN", f"a call on the dead mount: {ei.value!r}"
    r = _pyoverlay("umount", m.path)
    assert r.returncode == 0, f"pyoverlay umount of the dead mount failed: {r.stderr}"
    assert not mounts.is_mounted(m.path), "the dead mount is still mounted after pyoverlay umount"


# --------------------------------------------------------------------------
# 1. SIGKILL mid-workload
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_lower(tmp_path_factory):
    """A lower layer with one BIG_MB file (made once for the module)."""
    lower = tmp_path_factory.mktemp("biglower")
    base = bytearray(os.urandom(CHUNK))
    h = hashlib.sha256()
    with open(lower / "big", "wb") as f:
        for i in range(BIG_MB):
            base[:16] = b"chunk %09d\n" % i
            h.update(base)
            f.write(base)
    (lower / "small").write_bytes(b"small\n")
    yield lower, h.hexdigest()
    os.unlink(lower / "big")


def _server_fd_into(pid: int, prefix: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("engine", ENGINES)
def test_sigkill_during_copy_up(tmp_path, big_lower, engine):
    lower, digest = big_lower
    upper, workdir = tmp_path / "upper", tmp_path / "workdir"
    upper.mkdir()
    workdir.mkdir()
    size = BIG_MB * CHUNK
    with _mount(lower, tmp_path, upper, workdir, engine) as m:
        pid = m.proc.pid
        w = Workers([[("open big", lambda: os.close(os.open(m.path / "big", os.O_WRONLY)))]])
        w.start()
        prefix = str(workdir / "work") + "/"
        _kill_when(m, lambda: bool(os.listdir(workdir / "work")) or _server_fd_into(pid, prefix), "copy-up")
        assert w.join(60), "the opener is still blocked 60 s after the server was killed"
        assert w.done == [], "the copy-up finished before the kill: nothing was tested (make PYOVERLAY_FAULT_MB larger)"
        assert w.errors[0] in DEAD, f"the opener got {w.errors[0]}, want ENOTCONN/ECONNABORTED"
        print(f"copy-up: the opener got {w.errors[0]}; work/ holds {os.listdir(workdir / 'work')}")
        _dead_mount_checks(m)
    if os.path.lexists(upper / "big"):  # absent or complete, never torn
        st = os.lstat(upper / "big")
        assert st.st_size == size and sha(upper / "big") == digest, f"a torn copy-up in upper: size {st.st_size}"
    view = remount_and_compare([lower], upper, workdir, tmp_path, engine)
    assert view["big"] == ("file", size, digest)
    assert view["small"][0] == "file"


def _tree(root: Path, dirs: int, files: int) -> None:
    for d in range(dirs):
        p = root / "tree" / f"d{d:02d}"
        p.mkdir(parents=True)
        for f in range(files):
            (p / f"f{f:03d}").write_bytes(b"d%d f%d\n" % (d, f))
            if f % 3 == 0:  # metadata a copy-up must keep
                os.chown(p / f"f{f:03d}", 1000 + f, 2000 + d)
                os.chmod(p / f"f{f:03d}", 0o640)
        (p / "sub").mkdir()
        (p / "sub" / "leaf").write_bytes(b"leaf %d\n" % d)


@pytest.mark.parametrize("engine", ENGINES)
def test_sigkill_during_rm_r(tmp_path, engine):
    """``rm -r`` of a lower tree of 30 directories (3000 files), some copied up first."""
    lower, upper, workdir = tmp_path / "lower", tmp_path / "upper", tmp_path / "workdir"
    upper.mkdir()
    workdir.mkdir()
    _tree(lower, 30, 100)
    orig = view_of(lower)
    with _mount(lower, tmp_path, upper, workdir, engine) as m:
        for d in range(0, 30, 3):  # some in upper already (copied up, one new file)
            with open(m.path / "tree" / f"d{d:02d}" / "f000", "ab") as f:
                f.write(b"more\n")
            (m.path / "tree" / f"d{d:02d}" / "new").write_bytes(b"new\n")
        before = view_of(m.path, meta=True)
        ops = []
        for d in range(30):
            dp = m.path / "tree" / f"d{d:02d}"
            for name in sorted(os.listdir(dp)):
                rel = f"tree/d{d:02d}/{name}"
                if name == "sub":
                    ops.append((rel + "/leaf", lambda p=dp / name / "leaf": os.unlink(p)))
                    ops.append((rel, lambda p=dp / name: os.rmdir(p)))
                else:
                    ops.append((rel, lambda p=dp / name: os.unlink(p)))
            ops.append((f"tree/d{d:02d}", lambda p=dp: os.rmdir(p)))
        w = Workers([ops])
        w.start()
        _kill_when(m, lambda: w.count >= len(ops) // 3, "rm -r")
        assert w.join(60), "rm -r is still blocked 60 s after the server was killed"
        assert w.inflight, "rm -r finished before the kill: nothing was tested"
        assert w.errors[0] in DEAD, f"rm -r got {w.errors[0]}, want ENOTCONN/ECONNABORTED"
        _dead_mount_checks(m)
    print(f"rm -r: {len(w.done)} of {len(ops)} done, {w.inflight} in flight: {w.errors}")
    view = remount_and_compare([lower], upper, workdir, tmp_path, engine, meta=True)
    done, inflight = set(w.done), w.inflight[0]
    for rel, v in before.items():
        gone = rel in done or any(rel.startswith(d + "/") for d in done)
        if rel == inflight:
            assert view.get(rel, v) == v, f"{rel}, in flight at the kill, is damaged: {view.get(rel)}"
        elif gone:
            assert rel not in view, f"{rel} was removed before the kill but is back after the remount"
        else:
            assert view.get(rel) == v, f"{rel}, never removed, changed or vanished: {view.get(rel)} (was {v})"
    assert set(view) <= set(before), f"names that never existed: {sorted(set(view) - set(before))}"
    assert orig == view_of(lower), "the lower layer was changed"


@pytest.mark.parametrize("engine", ENGINES)
def test_sigkill_during_rename_storm(tmp_path, engine):
    """Four threads renaming 2000 lower files (within a directory, across directories, over
    an existing name) when the server is killed."""
    lower, upper, workdir = tmp_path / "lower", tmp_path / "upper", tmp_path / "workdir"
    upper.mkdir()
    workdir.mkdir()
    for d in ("a", "b"):
        (lower / d).mkdir(parents=True)
    for i in range(2000):
        (lower / "a" / f"f{i}").write_bytes(b"file %d\n" % i)
    for i in range(1500, 2000):
        (lower / "b" / f"t{i}").write_bytes(b"target %d\n" % i)
    with _mount(lower, tmp_path, upper, workdir, engine) as m:

        def dest(i: int) -> str:
            if i < 500:
                return f"a/g{i}"  # same directory
            if i < 1500:
                return f"b/g{i}"  # to another directory
            return f"b/t{i}"  # over an existing lower file

        jobs = [
            [(i, lambda i=i: os.rename(m.path / "a" / f"f{i}", m.path / dest(i))) for i in range(2000) if i % 4 == k]
            for k in range(4)
        ]
        w = Workers(jobs)
        w.start()
        _kill_when(m, lambda: w.count >= 500, "rename storm")
        assert w.join(60), "renames are still blocked 60 s after the server was killed"
        assert w.inflight, "the renames all finished before the kill: nothing was tested"
        assert set(w.errors.values()) <= DEAD, f"renames got {w.errors}, want ENOTCONN/ECONNABORTED"
        _dead_mount_checks(m)
    print(f"renames: {len(w.done)} done, {w.inflight} in flight: {w.errors}")
    view = remount_and_compare([lower], upper, workdir, tmp_path, engine)
    done, inflight = set(w.done), set(w.inflight.values())

    def old_dst(i: int):
        if i < 1500:
            return None
        data = b"target %d\n" % i
        return ("file", len(data), hashlib.sha256(data).hexdigest())

    for i in range(2000):
        src, dst = view.get(f"a/f{i}"), view.get(dest(i))
        content = ("file", len(b"file %d\n" % i), hashlib.sha256(b"file %d\n" % i).hexdigest())
        if i in done:
            assert (src, dst) == (None, content), f"rename {i} (done before the kill): a/f{i} {src}, {dest(i)} {dst}"
        elif i in inflight:  # done or not, never half (twice, or lost)
            assert (src, dst) in ((None, content), (content, old_dst(i))), (
                f"rename {i} (in flight at the kill) is half done: a/f{i} {src}, {dest(i)} {dst}"
            )
        else:
            assert src == content, f"a/f{i} was never renamed but is {src}"
            assert dst == old_dst(i), f"{dest(i)} is {dst} though rename {i} never ran"


# --------------------------------------------------------------------------
# 2. ENOSPC in the upper filesystem during a copy-up
# --------------------------------------------------------------------------


def _copy_up_on_full_upper(kind: str, tmp_path: Path, lower: Path, engine: str | None, make_fs=None) -> dict:
    """Upper and workdir on a small filesystem (a 4 MiB tmpfs, or *make_fs(path)*'s); a
    copy-up of a lower file larger than the space left; then other files are written and
    read through the same mount. What happened, to compare."""
    base = tmp_path / kind
    base.mkdir()
    with (make_fs or (lambda p: mounts.TmpfsMount(p, size="4m")))(base / "fs") as fs:
        upper, workdir = fs.path / "upper", fs.path / "workdir"
        upper.mkdir()
        workdir.mkdir()
        (upper / "old").write_bytes(b"old upper file\n")
        free0 = os.statvfs(fs.path).f_bfree
        if kind == "kernel":
            cm = mounts.KernelOverlay([lower], base / "mnt", upper=upper, workdir=workdir)
        else:
            cm = _mount(lower, base, upper, workdir, engine)
        out: dict = {}
        with cm as m:
            for what, call in (
                ("open O_WRONLY", lambda: os.close(os.open(m.path / "big", os.O_WRONLY))),
                ("truncate", lambda: os.truncate(m.path / "big", 100)),
                ("chmod", lambda: os.chmod(m.path / "big", 0o600)),
            ):
                try:
                    call()
                    out[what] = "OK"
                except OSError as e:
                    out[what] = errname(e)
                out[what + ": work/"] = sorted(os.listdir(workdir / "work"))
                out[what + ": upper"] = sorted(os.listdir(upper))
            out["big seen"] = sha(m.path / "big")
            out["big mode"] = stat.S_IMODE(os.stat(m.path / "big").st_mode)
            # the mount goes on working: a new file, the old one, a small copy-up
            (m.path / "new").write_bytes(b"new file\n")
            with open(m.path / "old", "ab") as f:
                f.write(b"appended\n")
            with open(m.path / "small", "ab") as f:
                f.write(b"appended\n")
            out["after"] = {n: (m.path / n).read_bytes() for n in ("new", "old", "small")}
            out["names"] = sorted(os.listdir(m.path))
            if kind != "kernel":
                m.check_alive()
            for n in ("new", "small"):
                os.unlink(m.path / n)
            with open(m.path / "old", "wb") as f:
                f.write(b"old upper file\n")
        out["upper at the end"] = sorted(os.listdir(upper))
        out["workdir problems"] = workdir_problems(workdir)
        # the space of the failed copy-up is given back (no unnamed file kept open)
        out["space back"] = os.statvfs(fs.path).f_bfree >= free0 - 2
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_enospc_during_copy_up_like_the_kernel(tmp_path, engine):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "big").write_bytes(os.urandom(8 * CHUNK))
    (lower / "small").write_bytes(b"small\n")
    os.chmod(lower / "big", 0o644)
    digest = sha(lower / "big")
    py = _copy_up_on_full_upper("pyoverlay", tmp_path, lower, engine)
    kernel = _copy_up_on_full_upper("kernel", tmp_path, lower, None)
    print(f"pyoverlay: {py}\nkernel:    {kernel}")
    assert py["open O_WRONLY"] == "ENOSPC", py
    assert py["big seen"] == digest and py["big mode"] == 0o644, py
    assert "big" not in py["open O_WRONLY: upper"] and py["open O_WRONLY: work/"] == [], py
    assert py["after"] == {"new": b"new file\n", "old": b"old upper file\nappended\n", "small": b"small\nappended\n"}
    assert py["space back"], py
    assert py == kernel, f"pyoverlay {py}\nkernel    {kernel}"


class Ext4Reserved:
    """A 64 MiB ext4 image (mounted through a loop device) whose blocks are half reserved
    for uid/gid 54321 (``tune2fs -m 50 -u -g``): root may use them only with
    CAP_SYS_RESOURCE, which the kernel's overlay drops for its writes to the upper."""

    def __init__(self, mountpoint: Path):
        self.path = mountpoint
        self.image = mountpoint.parent / "ext4.img"

    def __enter__(self):
        self.path.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(64 << 20)
        for argv in (
            ["mkfs.ext4", "-q", "-F", "-m", "50", "-O", "^has_journal", str(self.image)],
            ["tune2fs", "-u", "54321", "-g", "54321", str(self.image)],
            ["mount", "-o", "loop", str(self.image), str(self.path)],
        ):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot make the ext4 upper: {' '.join(argv)}: {r.stderr.strip()}")
        return self

    def __exit__(self, *exc):
        if mounts.is_mounted(self.path):
            subprocess.run(["umount", str(self.path)], check=True)  # the loop device goes with it
        self.image.unlink()
        return False


@pytest.mark.parametrize("engine", ENGINES)
def test_reserved_space_is_not_used_like_the_kernel(tmp_path, engine):
    """The kernel's overlay writes to the upper without CAP_SYS_RESOURCE: a copy-up that
    fits only in the blocks reserved for others fails with ENOSPC. pyoverlay's server (root,
    with every capability) must not use them either, nor override disk quotas (EDQUOT:
    the same capability).

    Where the test runs without CAP_SYS_RESOURCE in its bounding set (this machine's root
    lacks it) neither side can use the reserved blocks: the test then checks only that the
    copy-up fails on ext4 as the kernel's does."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "big").write_bytes(os.urandom(40 * CHUNK))  # > the ~28 MiB free, < the ~60 MiB
    (lower / "small").write_bytes(b"small\n")
    os.chmod(lower / "big", 0o644)
    py = _copy_up_on_full_upper("pyoverlay", tmp_path, lower, engine, Ext4Reserved)
    kernel = _copy_up_on_full_upper("kernel", tmp_path, lower, None, Ext4Reserved)
    print(f"pyoverlay: {py}\nkernel:    {kernel}")
    assert kernel["open O_WRONLY"] == "ENOSPC", kernel
    assert py == kernel, f"pyoverlay {py}\nkernel    {kernel}"


class BtrfsQgroup:
    """A 256 MiB btrfs image (through a loop device) with quotas on and a subvolume limited
    to 4 MiB by a qgroup: writes beyond the limit fail with EDQUOT, for root too. The upper
    and workdir go in the subvolume (``path``). This kernel has no other quota an upper can
    have here: no tmpfs quota (CONFIG_TMPFS_QUOTA), no ext4 quota format (CONFIG_QFMT_V2),
    no XFS quota (CONFIG_XFS_QUOTA)."""

    def __init__(self, mountpoint: Path):
        self.top = mountpoint
        self.path = mountpoint / "sub"
        self.image = mountpoint.parent / "btrfs.img"

    def __enter__(self):
        if shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None:
            pytest.skip("needs btrfs-progs (scripts/setup installs it)")
        self.top.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(256 << 20)
        for argv in (
            ["mkfs.btrfs", "-q", "-f", str(self.image)],
            ["mount", "-o", "loop", str(self.image), str(self.top)],
            ["btrfs", "quota", "enable", str(self.top)],
            ["btrfs", "subvolume", "create", str(self.path)],
            ["btrfs", "qgroup", "limit", "4M", str(self.path)],
        ):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                self.__exit__()
                pytest.skip(f"cannot make the btrfs upper: {' '.join(argv)}: {r.stderr.strip()}")
        return self

    def __exit__(self, *exc):
        if mounts.is_mounted(self.top):
            subprocess.run(["umount", str(self.top)], check=True)  # the loop device goes with it
        self.image.unlink(missing_ok=True)
        return False


@pytest.mark.parametrize("engine", ENGINES)
def test_edquot_during_copy_up_like_the_kernel(tmp_path, engine):
    """A copy-up beyond the upper's quota (a btrfs qgroup limit): EDQUOT, nothing of it in
    upper or work/, and the mount goes on, as with the kernel's overlay."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "big").write_bytes(os.urandom(8 * CHUNK))
    (lower / "small").write_bytes(b"small\n")
    os.chmod(lower / "big", 0o644)
    digest = sha(lower / "big")
    py = _copy_up_on_full_upper("pyoverlay", tmp_path, lower, engine, BtrfsQgroup)
    kernel = _copy_up_on_full_upper("kernel", tmp_path, lower, None, BtrfsQgroup)
    print(f"pyoverlay: {py}\nkernel:    {kernel}")
    assert kernel["open O_WRONLY"] == "EDQUOT", kernel
    assert py["open O_WRONLY"] == "EDQUOT", py
    assert py["big seen"] == digest and py["big mode"] == 0o644, py
    assert "big" not in py["open O_WRONLY: upper"] and py["open O_WRONLY: work/"] == [], py
    assert py["after"] == {"new": b"new file\n", "old": b"old upper file\nappended\n", "small": b"small\nappended\n"}
    assert py == kernel, f"pyoverlay {py}\nkernel    {kernel}"


def test_umount_detaches_a_busy_dead_mount(tmp_path):
    """A process still inside the mount when its server was killed: ``pyoverlay umount``
    cannot unmount (EBUSY) and detaches it (the server is gone: it can never serve again),
    saying so; the mount is gone from the namespace at once."""
    lower, upper, workdir = tmp_path / "lower", tmp_path / "upper", tmp_path / "workdir"
    for d in (lower, upper, workdir):
        d.mkdir()
    (lower / "f").write_bytes(b"f\n")
    with _mount(lower, tmp_path, upper, workdir, "direct") as m:
        busy = subprocess.Popen(["sleep", "120"], cwd=m.path)
        try:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(30)
            r = _pyoverlay("umount", m.path)
            assert r.returncode == 0, f"pyoverlay umount of a busy dead mount failed: {r.stderr}"
            assert "is gone and the mount is busy: detached it" in r.stderr, r.stderr
            assert not mounts.is_mounted(m.path), "the busy dead mount is still there"
        finally:
            busy.kill()
            busy.wait()


def test_deep_work_leftovers_kernel_read_only_pyoverlay_cleans(tmp_path):
    """The one difference in the cleanup of work/ (docs/semantics.md, "Faults"): a tree
    three levels deep there (never left by either) makes the kernel log "cleanup ...
    failed" and mount read-only; pyoverlay removes it and mounts read-write."""
    lower, upper, workdir = tmp_path / "lower", tmp_path / "upper", tmp_path / "workdir"
    for d in (lower, upper, workdir / "work"):
        d.mkdir(parents=True)
    (lower / "f").write_bytes(b"f\n")

    def plant():
        deep = workdir / "work" / "#d1" / "d2" / "d3"
        deep.mkdir(parents=True, exist_ok=True)
        (deep / "f").write_bytes(b"x")

    plant()
    with mounts.KernelOverlay([lower], tmp_path / "kmnt", upper=upper, workdir=workdir) as k:
        row = mounts.mount_entry(k.path)
    assert row is not None and not super_rw(row), f"the kernel mounted it read-write: {row}"
    plant()
    with _mount(lower, tmp_path, upper, workdir, "direct") as m:
        row = mounts.mount_entry(m.path)
        left = os.listdir(workdir / "work")
        (m.path / "new").write_bytes(b"new\n")
    assert row is not None and super_rw(row), row
    assert left == [], left


def test_mount_over_a_dead_mount_says_how_to_remove_it(tmp_path):
    """``pyoverlay mount`` on the mountpoint of a killed server's dead mount is refused (it
    is a mount point) with the way out: ``pyoverlay umount``, which then works."""
    lower, upper, workdir = tmp_path / "lower", tmp_path / "upper", tmp_path / "workdir"
    for d in (lower, upper, workdir):
        d.mkdir()
    with _mount(lower, tmp_path, upper, workdir, "direct") as m:
        os.kill(m.proc.pid, signal.SIGKILL)
        m.proc.wait(30)
        r = _pyoverlay("mount", "--workdir", workdir, lower, upper, m.path)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.strip().endswith(
            f"is already a mount point (its server is gone: 'pyoverlay umount {m.path}' removes the dead mount)"
        ), r.stderr
        assert _pyoverlay("umount", m.path).returncode == 0
        assert not mounts.is_mounted(m.path)
