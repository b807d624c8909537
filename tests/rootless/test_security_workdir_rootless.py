"""Issue 13 item 2 as the attacker does it: the ordinary user pyoverlay-test owns an upper
and a workdir, root mounts them over root's lower (documented as supported until now).

On f323dfb root's server accepted the user's workdir: ``work/`` stayed the user's (root
only chmod'ed it 000, and its owner may chmod it back), so the user swapped each
``work/#N`` for a symlink to a root-owned file while root copied up, and the copy-up's
``chmod`` followed it: the user's target became set-uid root. Now the mount is refused
with one line before anything is mounted or touched.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from helpers import mounts
from helpers.rootless import VENV_BIN

CLI = [sys.executable, "-m", "pyoverlay_cli"]

SWAPPER = r"""
import os, sys
work, victim, grave, stop = sys.argv[1:5]
n = 0
while not os.path.exists(stop):
    try:
        os.chmod(work, 0o700)   # the user's own dir: root's chmod 000 does not keep it out
        names = os.listdir(work)
    except OSError:
        continue
    for name in names:
        p = os.path.join(work, name)
        try:
            if os.path.islink(p):
                continue
            n += 1
            os.rename(p, os.path.join(grave, str(n)))
            os.symlink(victim, p)
        except OSError:
            pass
"""


def _attack(user, lower, mnt, work, victim) -> None:
    """The user's swap loop on work/ while root copies files up through the mount."""
    (grave,) = user.mkdirs("grave")
    stop = user.dir / "stop"
    proc = subprocess.Popen(
        user.argv([VENV_BIN / "python", "-c", SWAPPER, work, victim, grave, stop]),
        cwd=user.dir,
        env=user.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def trigger(name):
            try:
                os.close(os.open(mnt / name, os.O_WRONLY))
            except OSError:
                pass

        threads = [threading.Thread(target=trigger, args=(p.name,)) for p in lower.iterdir()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.2)
    finally:
        stop.write_text("")
        proc.wait(timeout=30)


def test_root_refuses_the_users_workdir_and_the_race_is_gone(user):
    up, wk, mnt = user.mkdirs("up", "wk", "mnt")
    (work,) = user.mkdirs("wk/work")  # the user's own work/ (it made it before the mount)
    os.chmod(work, 0o700)
    lower = user.dir / "rootlower"  # root's layer: set-uid root programs
    lower.mkdir()
    for i in range(16):
        p = lower / f"prog{i}"
        p.write_bytes(b"#!/bin/sh\necho hi\n" * 50000)  # ~1 MB: the copy-up takes a while
        os.chmod(p, 0o4755)
    rootbin = user.dir / "rootbin"  # a root file the user wants set-uid
    rootbin.mkdir()
    victim = rootbin / "victim"
    victim.write_bytes(b"#!/bin/sh\nid\n")
    os.chmod(victim, 0o755)

    env = mounts.pyoverlay_env() | {"PYOVERLAY_STATE_DIR": str(user.dir / "rootstate")}
    r = subprocess.run(
        [*CLI, "mount", "--workdir", str(wk), str(lower), str(up), str(mnt)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if r.returncode == 0:  # f323dfb: mounted. Show what the user can then do with it.
        try:
            _attack(user, lower, mnt, work, victim)
        finally:
            subprocess.run([*CLI, "umount", str(mnt)], capture_output=True, env=env, timeout=60)
        st = os.stat(victim)
        pytest.fail(
            f"root mounted the user's workdir; after the user's swaps in work/ the root-owned "
            f"victim has mode {oct(stat.S_IMODE(st.st_mode))} (was 0o755), owner {st.st_uid}"
        )
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("pyoverlay: "), r.stderr
    assert f"workdir '{wk}' belongs to uid {user.uid}, not to the mounting user (uid 0)" in r.stderr
    assert not mounts.is_mounted(mnt)
    assert os.listdir(wk) == ["work"] and os.listdir(work) == [] and os.listdir(up) == []
    st = os.stat(work)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o700)  # not even chmod'ed
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o755
