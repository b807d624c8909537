"""``-o volatile``, the kernel's: copy-ups and fsync are not synced, and the workdir
gets the kernel's marker ``work/incompat/volatile``, so that no later mount (the kernel's
or pyoverlay's) uses that upper without the user removing it first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import mounts

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]


def _layout(tmp_path):
    lo, up, wk = tmp_path / "lo", tmp_path / "up", tmp_path / "wk"
    for d in (lo, up, wk):
        d.mkdir()
    (lo / "f").write_text("lower\n")
    return lo, up, wk


def _mount_cli(lo, up, wk, mnt, *opts):
    argv = [sys.executable, "-m", "pyoverlay_cli", "mount", "--workdir", str(wk)]
    if opts:
        argv += ["-o", ",".join(opts)]
    return subprocess.run(
        argv + [str(lo), str(up), str(mnt)],
        capture_output=True,
        text=True,
        env=mounts.pyoverlay_env(),
        cwd=mounts.REPO_ROOT,
        timeout=60,
    )


def _kernel_mount(lo, up, wk, mnt, *opts):
    o = ",".join([*opts, f"lowerdir={lo},upperdir={up},workdir={wk}"])
    return subprocess.run(["mount", "-t", "overlay", "overlay", "-o", o, str(mnt)], capture_output=True, text=True)


def test_volatile_mount_leaves_the_kernels_marker_and_copies_up(tmp_path):
    lo, up, wk = _layout(tmp_path)
    with mounts.PyoverlayMount([lo], tmp_path / "m", up, wk, options=["volatile"]) as m:
        with open(m.path / "f", "a") as f:
            f.write("appended\n")
            f.flush()
            os.fsync(f.fileno())
        assert (m.path / "f").read_text() == "lower\nappended\n"
    assert (up / "f").read_text() == "lower\nappended\n"
    assert (wk / "work/incompat/volatile/dirty").is_file()  # what the kernel makes (checked below)
    kmnt = tmp_path / "k"
    kmnt.mkdir()
    # the kernel refuses our marker ...
    r = _kernel_mount(lo, up, wk, kmnt)
    assert r.returncode != 0 and not mounts.is_mounted(kmnt)


def test_a_later_mount_is_refused_until_the_marker_goes(tmp_path):
    lo, up, wk = _layout(tmp_path)
    kmnt, pmnt = tmp_path / "k", tmp_path / "p"
    kmnt.mkdir()
    pmnt.mkdir()
    # the kernel's own volatile mount makes the same marker ...
    assert _kernel_mount(lo, up, wk, kmnt, "volatile").returncode == 0
    subprocess.run(["umount", str(kmnt)], check=True)
    assert (wk / "work/incompat/volatile/dirty").is_file()
    # ... which pyoverlay refuses, volatile or not, in one line, leaving nothing mounted
    for opts in ((), ("volatile",)):
        r = _mount_cli(lo, up, wk, pmnt, *opts)
        assert r.returncode != 0, r.stdout
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and "volatile" in err and "incompat" in err, err
        assert not mounts.is_mounted(pmnt)
    # removing it (what the kernel's docs tell the user to do) mounts again
    subprocess.run(["rm", "-rf", str(wk / "work/incompat")], check=True)
    r = _mount_cli(lo, up, wk, pmnt)
    assert r.returncode == 0, r.stderr
    try:
        assert (pmnt / "f").read_text() == "lower\n"
    finally:
        subprocess.run(
            [sys.executable, "-m", "pyoverlay_cli", "umount", str(pmnt)],
            env=mounts.pyoverlay_env(),
            cwd=mounts.REPO_ROOT,
            check=True,
        )
