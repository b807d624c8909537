"""Redirected directories: layers written by a kernel overlay mounted with
``redirect_dir=on`` hold ``trusted.overlay.redirect`` xattrs, which the kernel follows
by default (``redirect_always_follow``). pyoverlay must show the same view.

The layers are produced by the kernel itself: renames of lower directories (same
parent: a relative redirect; another parent: an absolute one, also inside an opaque
directory), a rename of a renamed directory's child, and a chain (a redirected
directory renamed again in a second kernel generation).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers import mounts
from helpers.snapshot import diff_snapshots, format_diff, snapshot

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

IGNORE = ("dot_d_ino", "dotdot_d_ino", "atime_ns")


def _write(path, data=b"x\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _kernel_generation(base, lowers, name, ops):
    """Mount *lowers* with a fresh upper under the kernel with redirect_dir=on, run *ops*
    on the merged dir, unmount; return the upper (a new layer with redirects)."""
    upper, work, mnt = base / name, base / f"{name}.work", base / f"{name}.mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    lowerdir = ":".join(str(lower) for lower in lowers)
    opts = f"lowerdir={lowerdir},upperdir={upper},workdir={work},redirect_dir=on"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        ops(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    return upper


def _build(base):
    l0 = base / "l0"
    _write(l0 / "ld" / "f", b"ld/f\n")
    _write(l0 / "ld" / "sub" / "s", b"ld/sub/s\n")
    _write(l0 / "other" / "deep" / "x", b"deep/x\n")
    _write(l0 / "chain" / "c", b"chain/c\n")
    _write(l0 / "keep" / "k", b"k\n")

    def gen1(m):
        os.rename(m / "ld", m / "ld2")  # relative redirect "ld"
        os.rename(m / "ld2" / "sub", m / "ld2" / "sub2")
        os.mkdir(m / "nd")
        os.rename(m / "other" / "deep", m / "nd" / "deep2")  # absolute "/other/deep"
        os.rename(m / "chain", m / "chain1")
        (m / "ld2" / "added").write_bytes(b"added in gen1\n")

    l1 = _kernel_generation(base, [l0], "g1", gen1)

    def gen2(m):
        os.rename(m / "chain1", m / "keep" / "chain2")  # a redirect of a redirect
        os.unlink(m / "ld2" / "f")

    l2 = _kernel_generation(base, [l1, l0], "g2", gen2)
    return [l2, l1, l0]


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_redirects_followed_like_the_kernel(tmp_path, mode):
    lowers = _build(tmp_path / "layers")
    snaps = {}
    for kind, cls in (("kernel", mounts.KernelOverlay), ("pyoverlay", mounts.PyoverlayMount)):
        d = tmp_path / kind
        d.mkdir()
        (d / "mnt").mkdir()
        upper = work = None
        if mode == "rw":
            upper, work = d / "upper", d / "work"
            upper.mkdir()
            work.mkdir()
        kw = {"log_path": d / "server.log"} if kind == "pyoverlay" else {}
        with cls(lowers, d / "mnt", upper, work, **kw) as m:
            snaps[kind] = snapshot(m.path)
    ks, ps = snaps["kernel"], snaps["pyoverlay"]
    assert "ld2/sub2/s" in ks["entries"] and "keep/chain2/c" in ks["entries"], sorted(ks["entries"])
    diff = diff_snapshots(ks, ps, a_name="kernel", b_name="pyoverlay", ignore_keys=IGNORE)
    if mode == "rw":  # the two (empty) upper roots are different directories
        diff = [d for d in diff if not d.startswith("'.'")]
    assert not diff, format_diff(diff, "redirected dirs: pyoverlay differs from the kernel:")
