"""Read-side odds and ends compared with the kernel overlay: over-long names,
statvfs (which filesystem is reported, ST_RDONLY), a read-only mount refusing
changes."""

from __future__ import annotations

import errno
import os

import pytest

from helpers import mounts
from helpers.oracle import View
from helpers.stacks import F, build_layer

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


def _errno_of(fn):
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)
    return "OK"


LONG_NAMES = [255, 256, 300, 1024, 1025, 1100, 4000, 5000]


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_names_longer_than_255_bytes(lab, mode):
    """Lookups of names > 255 bytes give ENAMETOOLONG in both (FUSE itself only
    rejects names > 1024 bytes, so pyoverlay must do it for 256..1024); a
    missing 255-byte name is plain ENOENT."""
    stack = lab.stack("precedence")
    probes = {}
    for n in LONG_NAMES:
        for where in ("", "d/"):
            name = where + "n" * n
            probes[f"lstat {where}{n}"] = lambda p, name=name: os.lstat(p / name)
            probes[f"open {where}{n}"] = lambda p, name=name: os.close(os.open(p / name, os.O_RDONLY))
            probes[f"listxattr {where}{n}"] = lambda p, name=name: os.listxattr(p / name, follow_symlinks=False)
    if mode == "rw":
        for n in (256, 300, 1100):
            nm = "c" * n
            probes[f"create {n}"] = lambda p, nm=nm: os.close(os.open(p / nm, os.O_CREAT | os.O_WRONLY, 0o644))
            probes[f"mkdir {n}"] = lambda p, nm=nm: os.mkdir(p / nm)
            probes[f"symlink {n}"] = lambda p, nm=nm: os.symlink("x", p / nm)
            probes[f"mknod fifo {n}"] = lambda p, nm=nm: os.mkfifo(p / nm)
            probes[f"link {n}"] = lambda p, nm=nm: os.link(p / "same", p / nm)
            probes[f"rename to {n}"] = lambda p, nm=nm: os.rename(p / "onlymid", p / nm)
            probes[f"unlink {n}"] = lambda p, nm=nm: os.unlink(p / nm)

    def run(view: View):
        res = {k: _errno_of(lambda f=f: f(view.path)) for k, f in probes.items()}
        view.check_alive()
        return res

    with lab.view(stack, mode, "kernel") as kv:
        kres = run(kv)
    with lab.view(stack, mode, "subject") as sv:
        sres = run(sv)
    for k, v in kres.items():  # documents the oracle
        n = int(k.split()[-1].rsplit("/", 1)[-1])
        assert v == ("ENOENT" if n == 255 else "ENAMETOOLONG"), (k, v)
    bad = [f"{k}: kernel={kres[k]} {mounts.subject_name()}={sres[k]}" for k in kres if kres[k] != sres[k]]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------
# statvfs

STATVFS_FIXED = ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax")
STATVFS_FREE = ("f_bfree", "f_bavail", "f_ffree", "f_favail")


def _statvfs_check(view: View, fs_path, who: str) -> list[str]:
    before = os.statvfs(fs_path)
    got = os.statvfs(view.path)
    after = os.statvfs(fs_path)
    view.check_alive()
    bad = []
    for k in STATVFS_FIXED:
        if getattr(got, k) != getattr(before, k):
            bad.append(f"{who}: {k}={getattr(got, k)} but the layer fs has {getattr(before, k)}")
    for k in STATVFS_FREE:
        vals = {getattr(before, k), getattr(after, k)}
        if getattr(got, k) not in vals:
            bad.append(f"{who}: {k}={getattr(got, k)} but the layer fs has {sorted(vals)}")
    return bad


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_statvfs_reports_the_upper_or_top_layer_fs(tmp_path, mode):
    """statvfs of the mount is the upper's filesystem (rw) or the top lower's
    (ro): put that one on a small tmpfs, the other layers on the test fs.
    ST_RDONLY is set exactly for the read-only mount."""
    lower2 = build_layer(tmp_path / "ext_lower", {"f": F(b"x\n"), "d/g": F(b"g\n")})
    with mounts.TmpfsMount(tmp_path / "tmpfs", size="48m") as t:
        if mode == "ro":
            lowers = [build_layer(t.path / "top", {"t": F(b"t\n")}), lower2]
        else:
            lowers = [build_layer(tmp_path / "ext_top", {"t": F(b"t\n")}), lower2]
        bad = []
        flags = {}
        for impl in ("kernel", "subject"):
            upper = workdir = None
            if mode == "rw":
                upper, workdir = t.path / f"{impl}-upper", t.path / f"{impl}-work"
                upper.mkdir()
                workdir.mkdir()
            mnt = tmp_path / f"{impl}-mnt"
            if impl == "kernel":
                cm = mounts.KernelOverlay(lowers, mnt, upper=upper, workdir=workdir)
                who = "kernel"
            else:
                cm = mounts.subject_mount(lowers, mnt, upper=upper, workdir=workdir, log_path=tmp_path / "server.log")
                who = mounts.subject_name()
            with cm as m:
                view = View(who, mode, mnt, upper, m)
                bad += _statvfs_check(view, t.path, who)
                flags[who] = os.statvfs(mnt).f_flag
        for who, fl in flags.items():
            want = bool(mode == "ro")
            if bool(fl & os.ST_RDONLY) != want:
                bad.append(f"{who}: f_flag={fl:#x}: ST_RDONLY {'missing' if want else 'set'}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------


def test_readonly_mount_refuses_changes(lab):
    """A read-only mount (lowers only) refuses every change like the kernel
    does (EROFS), and the lowers stay untouched."""
    stack = lab.stack("precedence")
    ops = {
        "open O_WRONLY": lambda p: os.close(os.open(p / "same", os.O_WRONLY)),
        "open O_RDWR": lambda p: os.close(os.open(p / "same", os.O_RDWR)),
        "create": lambda p: os.close(os.open(p / "new", os.O_CREAT | os.O_WRONLY, 0o644)),
        "mkdir": lambda p: os.mkdir(p / "newdir"),
        "unlink": lambda p: os.unlink(p / "same"),
        "rmdir": lambda p: os.rmdir(p / "e"),
        "rename": lambda p: os.rename(p / "same", p / "same.moved"),
        "symlink": lambda p: os.symlink("x", p / "newlink"),
        "link": lambda p: os.link(p / "same", p / "newhard"),
        "chmod": lambda p: os.chmod(p / "same", 0o600),
        "chown": lambda p: os.chown(p / "same", 1, 1),
        "utime": lambda p: os.utime(p / "same", ns=(1, 1)),
        "truncate": lambda p: os.truncate(p / "same", 0),
        "setxattr": lambda p: os.setxattr(p / "same", "user.x", b"1"),
        "removexattr": lambda p: os.removexattr(p / "same", "user.nothing"),
        "mkfifo": lambda p: os.mkfifo(p / "fifo"),
    }
    from helpers.snapshot import diff_snapshots, format_diff, snapshot

    before = [snapshot(lower) for lower in stack.lowers]

    def run(view):
        res = {k: _errno_of(lambda f=f: f(view.path)) for k, f in ops.items()}
        view.check_alive()
        return res

    with lab.view(stack, "ro", "kernel") as kv:
        kres = run(kv)
    with lab.view(stack, "ro", "subject") as sv:
        sres = run(sv)
    bad = [f"{k}: kernel={kres[k]} {mounts.subject_name()}={sres[k]}" for k in kres if kres[k] != sres[k]]
    for lower, b in zip(stack.lowers, before, strict=True):
        d = diff_snapshots(b, snapshot(lower), ignore_keys=("ctime_ns",))
        if d:
            bad.append(format_diff(d, f"lower {lower} changed:"))
    assert all(v == "EROFS" for v in kres.values()), kres  # documents the oracle
    assert not bad, "\n".join(bad)
