"""Issue 13 item 2: copy-up in a workdir the server does not own races into root.

The server builds copied-up objects in ``<workdir>/work`` and then sets their mode, owner,
xattrs and times. On f323dfb it did so by name (``os.chmod(tmp, mode, dir_fd=work)``
follows a symlink), and any workdir was accepted: whoever could swap ``work/#N`` for a
symlink during a copy-up got the server's chmod on the symlink's target (a set-uid root
copy of a lower file's mode on any file). Now:

* a workdir, or its ``work/``, that is not a directory of the mounting user's own is
  refused with one line, before anything is mounted or created;
* every step after creating the temporary acts on its fd, so even an entry of ``work/``
  swapped by someone able to (here root itself, standing in for a workdir's owner) never
  makes the server touch anything outside ``work/``.

The attack as the ordinary user (root mounting the user's upper and workdir) is in
tests/rootless/test_security_workdir_rootless.py.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import mounts

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root]

CLI = [sys.executable, "-m", "pyoverlay_cli"]
OTHER = 4242  # a uid that is not root's


def _mount_cli(lower, upper, work, mnt) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "mount", "--workdir", str(work), str(lower), str(upper), str(mnt)],
        capture_output=True,
        text=True,
        env=mounts.pyoverlay_env(),
        timeout=60,
    )


def _umount_cli(mnt) -> None:
    r = subprocess.run(
        [*CLI, "umount", str(mnt)], capture_output=True, text=True, env=mounts.pyoverlay_env(), timeout=60
    )
    assert r.returncode == 0, r.stderr


def _dirs(tmp_path: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        (tmp_path / n).mkdir()
        out.append(tmp_path / n)
    return out


def _refused(r: subprocess.CompletedProcess, mnt: Path, *parts: str) -> None:
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("pyoverlay: "), r.stderr
    assert "Traceback" not in r.stderr
    for part in parts:
        assert part in r.stderr, r.stderr
    assert not mounts.is_mounted(mnt)


def test_workdir_of_another_user_is_refused(tmp_path):
    """Root mounting an upper and workdir another user owns (the issue's setup; the upper
    may stay theirs): refused with one line, nothing mounted, nothing made in the workdir."""
    lower, upper, work, mnt = _dirs(tmp_path, "lower", "upper", "work", "mnt")
    (lower / "f").write_text("f\n")
    os.chown(upper, OTHER, OTHER)
    os.chown(work, OTHER, OTHER)
    r = _mount_cli(lower, upper, work, mnt)
    _refused(
        r,
        mnt,
        f"workdir '{work}' belongs to uid {OTHER}, not to the mounting user (uid 0)",
        "give a workdir the mounting user owns",
    )
    assert os.listdir(work) == [] and os.listdir(upper) == []

    # a workdir of root's is fine with the other user's upper
    os.chown(work, 0, 0)
    r = _mount_cli(lower, upper, work, mnt)
    assert r.returncode == 0, r.stderr
    try:
        with open(mnt / "f", "a") as f:  # a copy-up into the other user's upper
            f.write("more\n")
    finally:
        _umount_cli(mnt)
    assert (upper / "f").read_text() == "f\nmore\n"
    assert stat.S_IMODE(os.stat(work / "work").st_mode) == 0 and os.stat(work / "work").st_uid == 0


@pytest.mark.parametrize("kind", ["other-owner", "symlink", "file"])
def test_bad_work_subdir_is_refused(tmp_path, kind):
    """``work/`` inside a root workdir must be root's own directory: another user's, a
    symlink (to a directory root owns: it is not followed) or a file are refused, and
    left as they are."""
    lower, upper, work, mnt, elsewhere = _dirs(tmp_path, "lower", "upper", "work", "mnt", "elsewhere")
    (elsewhere / "keep").write_text("keep\n")
    w = work / "work"
    if kind == "other-owner":
        w.mkdir()
        (w / "planted").write_text("x")
        os.chown(w, OTHER, OTHER)
        want = f"work dir '{w}' belongs to uid {OTHER}"
    elif kind == "symlink":
        w.symlink_to(elsewhere)
        want = f"work dir '{w}' is a symlink"
    else:
        w.write_text("x")
        want = f"work dir '{w}' is not a directory"
    before = os.lstat(w)
    r = _mount_cli(lower, upper, work, mnt)
    _refused(r, mnt, want)
    after = os.lstat(w)
    assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode, before.st_uid)
    assert (elsewhere / "keep").read_text() == "keep\n" and os.listdir(elsewhere) == ["keep"]
    if kind == "other-owner":
        assert os.listdir(w) == ["planted"]  # not emptied either


def test_default_workdir_planted_as_symlink_is_refused(tmp_path):
    """The default workdir (``.UPPER.pyoverlay-work`` beside the upper, in a directory the
    upper's owner may write) is opened without following: a symlink planted there does not
    make root use, and empty the ``work/`` of, some other directory. (A workdir given on
    the command line is resolved at once, as the kernel resolves it.)"""
    lower, upper, mnt, target = _dirs(tmp_path, "lower", "upper", "mnt", "target")
    (target / "work").mkdir()
    (target / "work" / "precious").write_text("p\n")
    link = tmp_path / ".upper.pyoverlay-work"
    link.symlink_to(target)
    r = subprocess.run(
        [*CLI, "mount", str(lower), str(upper), str(mnt)],
        capture_output=True,
        text=True,
        env=mounts.pyoverlay_env(),
        timeout=60,
    )
    _refused(r, mnt, f"workdir '{link}' is a symlink")
    assert (target / "work" / "precious").read_text() == "p\n"
    assert os.listdir(target) == ["work"] and os.path.islink(link)


# --- the race -------------------------------------------------------------------------------------

BIG_MB = int(os.environ.get("PYOVERLAY_RACE_MB", "200"))
SMALL = 24
DIRS = 32
ROUNDS = int(os.environ.get("PYOVERLAY_RACE_ROUNDS", "2"))
#: more rounds, up to this many, while the swapper has not yet caught an entry of work/ (a
#: directory's temporary lives there for microseconds: a fast server can outrun it)
MAX_ROUNDS = 12


def _race_lower(lower: Path) -> dict:
    """Set-uid root programs (a big one, small ones) and sticky world-writable dirs."""
    chunk = os.urandom(1 << 20)
    with open(lower / "big", "wb") as f:
        for _ in range(BIG_MB):
            f.write(chunk)
    os.chmod(lower / "big", 0o4755)
    for i in range(SMALL):
        p = lower / f"s{i}"
        p.write_bytes(b"#!/bin/sh\necho %d\n" % i * 2000)
        os.chmod(p, 0o4755)
    for i in range(DIRS):
        d = lower / f"d{i}"
        d.mkdir()
        (d / "inner").write_text("inner\n")
        os.chmod(d, 0o1777)
    return {p.name: _sha(p) for p in lower.iterdir() if p.is_file()}


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


class Swapper(threading.Thread):
    """Replaces every entry that appears in ``work/`` with a symlink to the victim (the
    entry itself is moved aside, to a graveyard on the same filesystem), as fast as it can."""

    def __init__(self, work: Path, victim: Path, graveyard: Path) -> None:
        super().__init__(daemon=True)
        self.work, self.victim, self.graveyard = work, victim, graveyard
        self.stop = threading.Event()
        self.swapped = 0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                names = os.listdir(self.work)
            except OSError:
                continue
            for name in names:
                p = self.work / name
                try:
                    if os.path.islink(p):
                        continue
                    n += 1
                    os.rename(p, self.graveyard / f"{n}")
                    os.symlink(self.victim, p)
                    self.swapped += 1
                except OSError:
                    pass


def _trigger(mnt: Path, name: str, errors: dict) -> None:
    try:
        if name.startswith("d"):
            os.utime(mnt / name, ns=(1, 1))  # copy-up of a directory (work/#N is a directory)
        else:
            os.close(os.open(mnt / name, os.O_WRONLY))  # copy-up of data
    except OSError as exc:
        errors[name] = exc


def test_swapping_work_entries_during_copy_up_touches_nothing_outside(tmp_path):
    """With a workdir the server owns, an entry of ``work/`` swapped for a symlink to a
    victim file during copy-ups (a 200 MiB set-uid file, small set-uid files, sticky
    directories; every entry swapped as soon as it appears) never changes the victim's
    mode, owner, xattrs or times, and every regular file copied up is right: set-uid
    root, its data intact. (On f323dfb the victim became set-uid: the copy-up's chmod
    followed the symlink.)"""
    lower, graveyard = _dirs(tmp_path, "lower", "graveyard")
    digests = _race_lower(lower)
    victim = tmp_path / "victim"
    victim.write_text("the victim\n")
    os.chmod(victim, 0o644)
    os.utime(victim, ns=(10**18, 10**18))
    vst = os.lstat(victim)
    swapped = 0
    rnd = -1
    while rnd + 1 < ROUNDS or (swapped == 0 and rnd + 1 < MAX_ROUNDS):
        rnd += 1
        upper, work, mnt = _dirs(tmp_path, f"upper{rnd}", f"work{rnd}", f"mnt{rnd}")
        errors: dict = {}
        with mounts.PyoverlayMount([lower], mnt, upper, work, log_path=tmp_path / f"server{rnd}.log"):
            swapper = Swapper(work / "work", victim, graveyard)
            swapper.start()
            names = ["big"] + [f"s{i}" for i in range(SMALL)] + [f"d{i}" for i in range(DIRS)]
            threads = [threading.Thread(target=_trigger, args=(mnt, n, errors)) for n in names]
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                swapper.stop.set()
                swapper.join()
            swapped += swapper.swapped
            st = os.lstat(victim)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
                0o644,
                vst.st_uid,
                vst.st_gid,
                vst.st_mtime_ns,
            ), f"round {rnd}: the victim was changed: mode {oct(st.st_mode)}, owner {st.st_uid}:{st.st_gid}"
            assert os.listxattr(victim) == []
            # regular files are built with no name in work/: nothing to swap, all succeed
            assert not {n: e for n, e in errors.items() if not n.startswith("d")}, errors
            for n in digests:
                st = os.lstat(mnt / n)
                assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o4755, (n, oct(st.st_mode))
            # a directory whose temporary was swapped fails (EIO, or ENOENT when it went
            # before the server opened it): the copy-up is refused, nothing else happens
        for n, digest in digests.items():
            st = os.lstat(upper / n)
            assert stat.S_ISREG(st.st_mode), n
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o4755, 0), (n, oct(st.st_mode), st.st_uid)
            assert _sha(upper / n) == digest, n
        for i in range(DIRS):
            p = upper / f"d{i}"
            if f"d{i}" not in errors:  # copied up: the directory built, nothing else
                st = os.lstat(p)
                assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o1777, (p, oct(st.st_mode))
    # the race really ran: entries of work/ (the directories' temporaries) were swapped
    assert swapped > 0, "the swapper never saw an entry in work/"
