"""Crash during copy-up (semantics.md row 12: atomic copy-up via workdir).

A ~300 MB lower file is opened O_WRONLY through a subject mount in a
background thread (which starts its copy-up); as soon as the copy-up is
seen in progress (an entry in ``workdir/work/``, or a server fd open on
something inside it, e.g. an O_TMPFILE), the server is SIGKILLed and the
mount lazily detached.  Then, on disk, the file's real name in upper must
be absent or complete (same size + sha256 as the lower), and a new subject
mount must start with an empty ``work/`` and show the intact file.

With ``PYOVERLAY_TEST_SUBJECT=kernel`` (harness self-test) nothing can be
killed: the kernel copies up through an invisible O_TMPFILE, so the test
only detaches the mount lazily while the open is in flight, then checks the
same invariants.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest

from helpers import mounts
from helpers.writeops import errname, subject_label, workdir_problems

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

SIZE_MB = int(os.environ.get("PYOVERLAY_CRASH_MB", "300"))
CHUNK = 1 << 20


def _make_big(path) -> str:
    base = bytearray(os.urandom(CHUNK))
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for i in range(SIZE_MB):
            base[:16] = b"chunk %09d\n" % i
            view = memoryview(base)
            h.update(view)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return h.hexdigest()


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(4 * CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _in_progress(work, pid) -> str | None:
    """What shows a copy-up in progress, or None."""
    try:
        names = os.listdir(work)
    except OSError:
        names = []
    if names:
        return f"work/ holds {names}"
    if pid is not None:
        prefix = str(work) + "/"
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return None
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                return f"server fd {fd} -> {target}"
    return None


def test_sigkill_during_copy_up(tmp_path):
    sname = subject_label()
    lower, upper, workdir = tmp_path / "l1", tmp_path / "upper", tmp_path / "workdir"
    for d in (lower, upper, workdir):
        d.mkdir()
    (lower / "small").write_bytes(b"small\n")
    digest = _make_big(lower / "big")
    size = SIZE_MB * CHUNK
    kernel_mode = sname == "kernel"
    try:
        result = {}
        seen = None
        killed_after = None
        with mounts.subject_mount(
            [lower], tmp_path / "mnt", upper=upper, workdir=workdir, log_path=tmp_path / "server1.log"
        ) as m:
            pid = getattr(getattr(m, "proc", None), "pid", None)

            def opener():
                t = time.monotonic()
                try:
                    fd = os.open(m.path / "big", os.O_WRONLY)
                    os.close(fd)
                    result["open"] = "OK"
                except OSError as e:
                    result["open"] = errname(e)
                result["secs"] = time.monotonic() - t

            th = threading.Thread(target=opener, daemon=True)
            t0 = time.monotonic()
            th.start()
            if kernel_mode:
                time.sleep(0.05)
                seen = "kernel: O_TMPFILE copy-up, not observable"
                mounts.force_unmount(m.path)  # umount -l while in flight
            else:
                deadline = t0 + 30
                while time.monotonic() < deadline and th.is_alive():
                    seen = _in_progress(workdir / "work", pid)
                    if seen:
                        break
                    time.sleep(0.001)
                killed_after = time.monotonic() - t0
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    m.proc.wait(10)
                mounts.force_unmount(m.path)  # lazily detach the dead mount
            th.join(30)
            assert not th.is_alive(), "the opener thread is still blocked after the kill"
        # on disk, after the crash: the real name is absent or complete
        real = upper / "big"
        state = "absent"
        if os.path.lexists(real):
            st = os.lstat(real)
            state = f"present, size {st.st_size}"
            assert st.st_size == size and _sha256(real) == digest, (
                f"{sname} left a PARTIAL copy under the real name upper/big after SIGKILL "
                f"during copy-up: size {st.st_size} of {size}"
            )
        assert seen, (
            f"no copy-up in progress was ever visible in workdir/work (nor via a "
            f"server fd into it) within {killed_after:.1f}s; the open finished: "
            f"{result} -- upper/big is {state}.  Does the copy-up go through the "
            "workdir?"
        )
        print(f"crash: seen={seen!r} killed_after={killed_after} open={result} upper/big {state}")
        # a new mount: work/ cleaned, the file intact
        with mounts.subject_mount(
            [lower], tmp_path / "mnt2", upper=upper, workdir=workdir, log_path=tmp_path / "server2.log"
        ) as m2:
            left = sorted(os.listdir(workdir / "work"))
            st = os.stat(m2.path / "big")
            got = _sha256(m2.path / "big")
            small = (m2.path / "small").read_bytes()
            m2.check_alive()
        assert left == [], f"{sname}: work/ not cleaned by the new mount: {left}"
        assert st.st_size == size and got == digest, "the file is damaged after the crash"
        assert small == b"small\n"
        assert not workdir_problems(workdir), workdir_problems(workdir)
    finally:
        for p in (lower / "big", upper / "big"):
            try:
                os.unlink(p)
            except OSError:
                pass
