"""Checks after a fault (tests/test_faults.py, tests/runner/test_run_faults.py): the tree a
mount shows, and the next mounts of an upper a killed server left behind (pyoverlay's,
then the kernel's on the same upper and workdir)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from helpers import mounts
from helpers.writeops import workdir_problems


def super_rw(row) -> bool:
    """The filesystem of mountinfo row *row* is read-write (its superblock options: the
    kernel's overlay falls back to a read-only superblock, the mount itself stays rw)."""
    return row.super_options.split(",")[0] == "rw" and row.options.split(",")[0] == "rw"


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def view_of(root: Path, meta: bool = False) -> dict[str, tuple]:
    """{relative path: (kind, content)} of the whole tree (symlinks not followed); with
    *meta* each also ends with (mode, uid, gid): a copy-up's metadata is part of it."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_size, sha(p))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(p))
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
            if meta:
                out[rel] += ((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid),)
    return out


def plant_leftovers(workdir: Path) -> None:
    """What an interrupted server may leave in work/ (as deep as the kernel cleans it: a
    directory's entries; the kernel refuses deeper trees and mounts read-only)."""
    w = workdir / "work"
    (w / "#dead1").write_bytes(b"half a copy-up")
    (w / "#dead2").mkdir()
    (w / "#dead2" / "f").write_bytes(b"x")
    os.mknod(w / "#dead2" / "wh", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.mknod(w / "#dead3", stat.S_IFCHR | 0o000, os.makedev(0, 0))


def remount_and_compare(lowers, upper, workdir, base: Path, engine: str | None = None, meta: bool = False) -> dict:
    """The next pyoverlay mount (work/ emptied, the view), then the kernel's on the same
    upper and workdir: read-write, and the same view, metadata included. Returns the view
    (with *meta*: each entry ending with (mode, uid, gid), as ``view_of``'s)."""
    workdir = Path(workdir)
    plant_leftovers(workdir)
    with mounts.PyoverlayMount(
        lowers,
        base / "mnt2",
        upper=upper,
        workdir=workdir,
        options=[f"engine={engine}"] if engine else [],
        log_path=base / "srv2.log",
    ) as m2:
        left = sorted(os.listdir(workdir / "work"))
        view = view_of(m2.path, meta=True)
        m2.check_alive()
    assert left == [], f"work/ not emptied by the next mount: {left}"
    assert not workdir_problems(workdir), workdir_problems(workdir)
    with mounts.KernelOverlay(lowers, base / "kmnt", upper=upper, workdir=workdir) as k:
        row = mounts.mount_entry(k.path)
        kview = view_of(k.path, meta=True)
    assert row is not None and super_rw(row), f"the kernel mounted it read-only: {row}"
    assert kview == view, diff_views(view, kview)
    return view if meta else {k: v[:-1] for k, v in view.items()}


def diff_views(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    lines = [f"  {k}: pyoverlay {a.get(k)} kernel {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    return "pyoverlay and the kernel show different trees:\n" + "\n".join(lines[:40])
