"""The node budget (``-o max_nodes=N``): beyond N live nodes the server asks the kernel
to drop its oldest file entries, so the kernel FORGETs them and the server frees them.
Only caches are lost: the merged view, inode numbers and writes stay exactly the
kernel overlay's, however often names are dropped and looked up again."""

from __future__ import annotations

import os
import stat

import pytest

from helpers import mounts
from helpers.snapshot import diff_snapshots, format_diff, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]

BUDGET = 1000


def _layers(tmp_path):
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    for layer, files in ((l2, range(0, 600)), (l1, range(400, 900))):
        for d in range(3):
            p = layer / f"d{d}"
            p.mkdir(parents=True)
            for i in files:
                (p / f"f{i:03d}").write_text(f"{layer.name} {d} {i}\n")
    os.mknod(l1 / "d0" / "f000", stat.S_IFCHR | 0o000, 0)  # a whiteout over l2's file
    return [l1, l2]


def _served(log) -> list[str]:
    return [line for line in log.read_text().splitlines() if "node budget" in line]


def test_views_equal_the_kernel_while_entries_are_dropped(tmp_path):
    lowers = _layers(tmp_path)
    with mounts.KernelOverlay(lowers, tmp_path / "k") as k:
        want = snapshot(k.path)
    log = tmp_path / "server.log"
    with mounts.PyoverlayMount(lowers, tmp_path / "p", options=[f"max_nodes={BUDGET}"], log_path=log) as p:
        for round_ in range(3):  # 2,700 entries through a 1,000-node budget, three times
            got = snapshot(p.path)
            diff = diff_snapshots(want, got, a_name="kernel", b_name="pyoverlay")
            assert not diff, format_diff(diff, f"round {round_}")
        assert _served(log), "the budget was never reached"


def test_writes_survive_their_names_being_dropped(tmp_path):
    """Copy-ups, new files and whiteouts made early are still seen after the kernel
    dropped and looked up those names again; the upper is the kernel's."""
    lowers = _layers(tmp_path)
    views = {}
    log = tmp_path / "server.log"
    for kind in ("kernel", "pyoverlay"):
        base = tmp_path / kind
        upper, work = base / "upper", base / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        cls = mounts.KernelOverlay if kind == "kernel" else mounts.PyoverlayMount
        extra = {} if kind == "kernel" else {"options": [f"max_nodes={BUDGET}"], "log_path": log}
        with cls(lowers, base / "m", upper, work, **extra) as m:
            root = m.path
            with open(root / "d1" / "f500", "a") as f:  # copy-up of a file in both lowers
                f.write("appended\n")
            (root / "d2" / "new").write_text("new\n")
            os.unlink(root / "d2" / "f010")  # whiteout
            for _ in range(2):  # push them out of the budget
                for dirpath, _, files in os.walk(root):
                    for name in files:
                        os.lstat(os.path.join(dirpath, name))
            views[kind] = snapshot(root)
        views[kind + "-upper"] = sorted(
            os.path.relpath(os.path.join(dp, n), upper) for dp, ds, fs in os.walk(upper) for n in ds + fs
        )
    assert _served(log)
    assert views["pyoverlay"]["entries"]["d1/f500"]["sha256"] == views["kernel"]["entries"]["d1/f500"]["sha256"]
    assert "d2/f010" not in views["pyoverlay"]["entries"] and "d2/new" in views["pyoverlay"]["entries"]
    assert views["pyoverlay-upper"] == views["kernel-upper"]
    # two uppers made at different times: compare what does not depend on when or where
    keys = ("type", "mode", "uid", "gid", "nlink", "size", "sha256", "target")
    view = {
        k: {p: {f: r.get(f) for f in keys} for p, r in views[k]["entries"].items()} for k in ("kernel", "pyoverlay")
    }
    assert view["pyoverlay"] == view["kernel"]


@pytest.mark.parametrize("value", ["12", "-1", "lots", ""])
def test_bad_budgets_are_refused(tmp_path, value):
    lo, mnt = tmp_path / "lo", tmp_path / "mnt"
    lo.mkdir()
    mnt.mkdir()
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", "mount", "-o", f"max_nodes={value}", str(lo), str(mnt)],
        capture_output=True,
        text=True,
        env=mounts.pyoverlay_env(),
        cwd=mounts.REPO_ROOT,
    )
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "max_nodes" in r.stderr
    assert not mounts.is_mounted(mnt)
