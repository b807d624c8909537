"""Issue 13, items 1 and 6, as the attacker is: an ordinary user on a root mount (root
mounts get allow_other). In the mount's sticky /tmp the user opens a file, renames a
symlink to a root-owned host file (or a FIFO, or another file) over its name, and acts
through the fd. The kernel's overlay acts on the open file; so must pyoverlay, and the
host file must stay exactly as it was (on f323dfb fchmod made it set-uid root, fchown
gave it to the user, and the FIFO hung the server).

And the fd limit an ordinary user cannot raise: node fds are a cache below it (the least
recently used given up, opened again and checked when needed), so a tree of more
directories than descriptors walks cleanly and the server survives.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from helpers import mounts
from helpers.nodefd import ATTACK, OPS, build_layers, host_state, make_host_file, run_bounded
from helpers.rootless import VENV_BIN

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]


def _as_user(user, mount, op: str, host) -> dict:
    argv = user.argv(["/usr/bin/python3", "-c", ATTACK, op, host, "upper"])
    return run_bounded(argv, mount, timeout=20, env=user.env(), cwd=mount.path / "tmp")


@pytest.mark.parametrize("op", OPS)
def test_user_acts_through_fd_of_a_replaced_name(user, op):
    host = user.dir / "rootfile"  # root's, 0644: the user may not change it
    before = make_host_file(host)
    out = {}
    for kind in ("kernel", "pyoverlay"):
        base = user.dir / kind
        base.mkdir()
        lo, up, wk = build_layers(base, "x")
        cls = mounts.KernelOverlay if kind == "kernel" else mounts.PyoverlayMount
        extra = {} if kind == "kernel" else {"watchdog": 60}
        with cls([lo], base / "m", up, wk, **extra) as m:
            out[kind] = _as_user(user, m, op, host)
            if kind == "pyoverlay":
                assert out[kind]["result"] != "hung", "the server hung"
                assert os.path.isdir(m.path / "tmp")  # and still answers
    after = host_state(host)
    assert after == before, f"the root-owned file was changed through the mount: {before} -> {after}"
    assert out["pyoverlay"] == out["kernel"]


def test_issue_sequence_does_not_make_a_host_file_setuid(user):
    """The issue's exact sequence, in sh: `cd merged/tmp; echo x > g; ln -s /some/root/file s;
    exec 3<g; mv -f s g; python3 -c 'import os; os.fchmod(3, 0o4755)'`."""
    host = user.dir / "rootfile"
    before = make_host_file(host)
    lo, up, wk = build_layers(user.dir, "x")
    with mounts.PyoverlayMount([lo], user.dir / "m", up, wk, watchdog=60) as m:
        script = (
            f"cd {m.path}/tmp; echo x > g; ln -s {host} s; exec 3<g; mv -f s g; "
            "python3 -c 'import os; os.fchmod(3, 0o4755); print(oct(os.fstat(3).st_mode))'"
        )
        out = run_bounded(
            user.argv(["sh", "-c", script + ' | sed \'s/^/{"mode": "/; s/$/"}/\'']), m, timeout=20, env=user.env()
        )
    assert host_state(host) == before, "the root-owned file was changed through the mount"
    assert out == {"mode": "0o104755"}  # the user's own, unlinked g got the mode (as the kernel)


def _walk(user, mnt) -> subprocess.CompletedProcess:
    script = (
        "import os, sys\n"
        "n = e = 0\n"
        "for dp, ds, fs in os.walk(sys.argv[1], onerror=lambda exc: print(exc, file=sys.stderr)):\n"
        "    for f in fs:\n"
        "        try:\n"
        "            os.lstat(os.path.join(dp, f)); n += 1\n"
        "        except OSError as exc:\n"
        "            e += 1; print(exc, file=sys.stderr)\n"
        "print(n, e)\n"
    )
    return user.run(["/usr/bin/python3", "-c", script, mnt], timeout=120)


def test_fd_limit_caps_node_fds_and_a_huge_dir_tree_walks(user):
    """RLIMIT_NOFILE 1024 (the user cannot raise it): 3,000 files in 6 directories and
    1,500 directories (more live nodes than descriptors: the kernel keeps directories) walk
    cleanly, twice, because node fds are a cache below the limit; the server still serves
    and unmounts cleanly. (Before node fds were a cache, the directories beyond the limit
    failed with EMFILE.)"""
    lo, up, wk, mnt = user.mkdirs("lo", "up", "wk", "mnt")
    r = user.sh(
        "for d in 0 1 2 3 4 5; do mkdir lo/f$d; (cd lo/f$d && seq 1 500 | xargs touch); done;"
        " mkdir lo/dirs && cd lo/dirs && seq 1 1500 | xargs mkdir && echo keep > 1/file"
    )
    assert r.returncode == 0, r.stderr
    log = user.dir / "server.log"
    r = user.run(
        [
            "prlimit",
            "--nofile=1024:1024",
            "--",
            VENV_BIN / "pyoverlay",
            "mount",
            "--log",
            log,
            "--workdir",
            wk,
            lo,
            up,
            mnt,
        ]
    )
    assert r.returncode == 0, r.stderr
    try:
        for d in range(6):
            w = _walk(user, mnt / f"f{d}")
            assert w.returncode == 0 and w.stdout.split() == ["500", "0"], (w.stdout, w.stderr[-500:])
        for _ in range(2):  # cold, then warm
            w = _walk(user, mnt / "dirs")
            assert w.returncode == 0 and not w.stderr.strip(), w.stderr[-1000:]
        # the server survived and still answers (once the kernel forgot some directories)
        assert mounts.is_mounted(mnt)
        for _ in range(50):
            r = user.sh(f"ls {mnt} >/dev/null && cat {mnt}/dirs/1/file && ls -l {mnt}/f0 | grep -c rw")
            if r.returncode == 0 and r.stdout.split() == ["keep", "500"]:
                break
            time.sleep(0.2)
        assert r.returncode == 0 and r.stdout.split() == ["keep", "500"], (r.stdout, r.stderr)
    finally:
        r = user.pyoverlay("umount", mnt)
    assert r.returncode == 0, r.stderr
    assert not mounts.is_mounted(mnt)
    assert "Traceback" not in log.read_text()
