"""fsync of a directory syncs its upper directory, as the kernel's ``ovl_dir_fsync``
(docs/semantics.md, "Caveats"): a program that fsyncs a directory after creating or
renaming in it (databases, package managers) wants the entry durable. Nothing is synced
for a directory with no upper part, nor with ``-o volatile``.

Observed with strace(1) attached to the server: the server's own fsync calls, with the
paths of their fds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from helpers import mounts
from helpers.stacks import F
from helpers.writeops import Side, run_start

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

STRACE = shutil.which("strace")


def _layers():
    return [{"keep": F(b"k\n"), "ldir/a": F(b"a\n"), "merged/t": F(b"t\n")}, {"merged/b": F(b"b\n")}]


def _fsync_dir(path, datasync=False):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (os.fdatasync if datasync else os.fsync)(fd)
    finally:
        os.close(fd)


def _wait_traced(pid, strace):
    """Until every thread of *pid* has a tracer (strace attached)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and strace.poll() is None:
        tids = os.listdir(f"/proc/{pid}/task")
        traced = 0
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                if any(ln.startswith("TracerPid:") and ln.split()[1] != "0" for ln in f):
                    traced += 1
        if traced == len(tids):
            return
        time.sleep(0.05)
    raise AssertionError(f"strace did not attach: {strace.poll()}")


def _synced(tmp_path, options=()):
    """The real directories the server fsyncs while the ops run: [(call, path)]."""
    side = Side(tmp_path / "s", _layers(), run_start(), options)
    out = tmp_path / "strace.out"
    with side.mount("subject") as m:
        st = subprocess.Popen(
            [STRACE, "-f", "-y", "-e", "trace=fsync,fdatasync", "-o", str(out), "-p", str(m.proc.pid)],
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_traced(m.proc.pid, st)
            (m.path / "new").mkdir()
            (m.path / "new/f").write_bytes(b"f")
            _fsync_dir(m.path / "new")
            (m.path / "merged/c").write_bytes(b"c")
            _fsync_dir(m.path / "merged", datasync=True)
            _fsync_dir(m.path / "ldir")  # lower only: nothing to sync
            time.sleep(0.5)
        finally:
            st.send_signal(signal.SIGINT)
            st.wait(30)
    text = out.read_text()
    return [(c, p) for c, p in re.findall(r"\b(fsync|fdatasync)\(\d+<([^>]*)>\)", text)], side


@pytest.mark.skipif(STRACE is None, reason="needs strace(1)")
@pytest.mark.skipif(mounts.subject_name() != "pyoverlay", reason="observes pyoverlay's server")
def test_fsync_of_a_directory_syncs_its_upper_dir(tmp_path):
    calls, side = _synced(tmp_path)
    upper = str(side.upper)
    dirs = [(c, os.path.relpath(p, upper)) for c, p in calls if p.startswith(upper)]
    assert ("fsync", "new") in dirs
    assert ("fdatasync", "merged") in dirs
    assert not [d for d in dirs if d[1] == "ldir"], dirs


@pytest.mark.skipif(STRACE is None, reason="needs strace(1)")
@pytest.mark.skipif(mounts.subject_name() != "pyoverlay", reason="observes pyoverlay's server")
def test_volatile_syncs_nothing(tmp_path):
    calls, side = _synced(tmp_path, options=("volatile",))
    assert not [p for _c, p in calls if p.startswith(str(side.upper))], calls
