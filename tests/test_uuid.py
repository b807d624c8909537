"""``-o uuid=on|off|null|auto``, compared with the kernel overlay (6.18) mounted with the
same option on the same layers (overlayfs_py/uuidmode.py; docs/semantics.md, "Optional
features"):

* what each mode leaves on the upper root (``overlay.uuid``: written, kept, ignored) for a
  new upper, an upper used before (``overlay.impure`` on its root), one with a UUID and one
  with a malformed value, read-write, read-only and with userxattr; the statfs ``f_fsid``
  the kernel derives from it (a FUSE mount reports 0: the one difference);
* the UUID field of the origin records a copy-up writes (null with ``uuid=off``; the
  source filesystem's otherwise, also with ``off`` on several filesystems, where the
  kernel falls back to ``null``);
* which origin records are followed (st_ino of a copied-up file: the lower file's when
  its origin is followed) when each side mounts the other's upper with each mode, before
  and after the layers' filesystem got a new UUID (``tune2fs -U``): ``off`` follows only
  null-UUID records, on any filesystem; the others only records with the filesystem's UUID.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.mounts import KernelOverlay, PyoverlayMount, TmpfsMount
from overlayfs_py import _sys, uuidmode

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

MODES = ["", "on", "off", "null", "auto"]  # "": not given


def _mount(impl: str, lowers, mnt: Path, upper: Path | None, work: Path | None, options):
    cls = KernelOverlay if impl == "kernel" else PyoverlayMount
    return cls([Path(x) for x in lowers], mnt, upper, work, options=[o for o in options if o])


def _uuid_opt(mode: str) -> str:
    return f"uuid={mode}" if mode else ""


def _fs_uuid(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        u = _sys.fs_uuid(fd)
    finally:
        os.close(fd)
    assert u is not None, f"{path}: no filesystem UUID"
    return u


def _xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


def _f_fsid(st: os.statvfs_result) -> tuple[int, int]:
    return st.f_fsid & 0xFFFFFFFF, st.f_fsid >> 32


# --- overlay.uuid on the upper root ----------------------------------------------------------

PRE = {
    "new": {},
    "used": {"impure": b"y"},  # a copy-up into the root happened without a UUID written
    "with-uuid": {"uuid": bytes(range(16))},
    "bad-size": {"uuid": b"abc"},
}


def _root_after(base: Path, impl: str, mode: str, pre: str, extra=(), prefix="trusted.overlay."):
    """Mount an upper prepared as *pre* by *impl* with ``uuid=mode`` (and *extra* options):
    what the root's overlay.uuid became ("absent", "kept", "new"), and the f_fsid seen."""
    d = base / f"{impl}-{mode or 'default'}-{pre}-{'-'.join(extra) or 'rw'}"
    for sub in ("l", "u", "w", "m"):
        (d / sub).mkdir(parents=True)
    (d / "l/f").write_bytes(b"lower\n")
    for name, value in PRE[pre].items():
        os.setxattr(d / "u", prefix + name, value)
    before = _xattr(d / "u", prefix + "uuid")
    with _mount(impl, [d / "l"], d / "m", d / "u", d / "w", [_uuid_opt(mode), *extra]) as m:
        st = os.statvfs(m.path)
        assert (m.path / "f").read_bytes() == b"lower\n"
    after = _xattr(d / "u", prefix + "uuid")
    if after is None:
        shape = "absent"
    elif after == before:
        shape = "kept"
    elif len(after) == 16:
        shape = "new"
    else:
        shape = f"changed to {after!r}"
    return shape, after, _f_fsid(st), _f_fsid(os.statvfs(d / "u"))


@pytest.mark.parametrize("pre", list(PRE))
def test_upper_root_uuid_as_the_kernel(tmp_path, pre):
    """Each mode on each kind of upper root: overlay.uuid written, kept or left alone as
    the kernel does; the kernel's f_fsid is uuidmode.fsid of the UUID it uses (else the
    upper filesystem's); pyoverlay's is 0 (a FUSE statfs reply has no fsid)."""
    got = {}
    for mode in MODES:
        k_shape, k_uuid, k_fsid, upper_fsid = _root_after(tmp_path, "kernel", mode, pre)
        s_shape, _s_uuid, s_fsid, _ = _root_after(tmp_path, "pyoverlay", mode, pre)
        got[mode] = (k_shape, s_shape)
        downgraded = pre == "used" and mode in ("", "auto")
        uses_uuid = k_uuid is not None and len(k_uuid) == 16 and mode in ("", "on", "auto") and not downgraded
        if uses_uuid:
            assert k_fsid == uuidmode.fsid(k_uuid), (mode, pre)
        else:
            assert k_fsid == upper_fsid, (mode, pre)
        assert s_fsid == (0, 0), "a FUSE mount's f_fsid: docs/semantics.md says it is 0"
    for mode, (k, s) in got.items():
        assert k == s, f"uuid={mode or '(default)'} on a {pre} upper: kernel {k}, pyoverlay {s}"
    # what the kernel does, spelled out (so that a change in the oracle shows here)
    expect = {
        "new": {"": "new", "on": "new", "off": "absent", "null": "absent", "auto": "new"},
        "used": {"": "absent", "on": "new", "off": "absent", "null": "absent", "auto": "absent"},
        "with-uuid": dict.fromkeys(MODES, "kept"),
        "bad-size": dict.fromkeys(MODES, "kept"),
    }[pre]
    assert {m: k for m, (k, _s) in got.items()} == expect


@pytest.mark.parametrize("extra", [("ro",), ("userxattr",)])
def test_upper_root_uuid_ro_and_userxattr(tmp_path, extra):
    """A read-only mount with an upper writes overlay.uuid too (the kernel does); with
    userxattr it is user.overlay.uuid."""
    prefix = "user.overlay." if extra == ("userxattr",) else "trusted.overlay."
    for mode in ("", "on", "null"):
        k = _root_after(tmp_path, "kernel", mode, "new", extra, prefix)[0]
        s = _root_after(tmp_path, "pyoverlay", mode, "new", extra, prefix)[0]
        assert k == s, f"uuid={mode or '(default)'} {extra}: kernel {k}, pyoverlay {s}"
        assert k == ("absent" if mode == "null" else "new")


def test_no_upper_writes_nothing(tmp_path):
    """uuid=on without an upper layer: the kernel falls back to null (a warning), so does
    pyoverlay; neither writes anything in the lowers."""
    for sub in ("l1", "l2", "mk", "ms"):
        (tmp_path / sub).mkdir()
    (tmp_path / "l1/f").write_bytes(b"x")
    for impl, mnt in (("kernel", "mk"), ("pyoverlay", "ms")):
        for mode in MODES:
            with _mount(impl, [tmp_path / "l1", tmp_path / "l2"], tmp_path / mnt, None, None, [_uuid_opt(mode)]) as m:
                assert (m.path / "f").read_bytes() == b"x"
    for sub in ("l1", "l2"):
        assert os.listxattr(tmp_path / sub) == []


# --- the UUID in origin records ---------------------------------------------------------------


def _copy_up_records(base: Path, impl: str, lower: Path, mode: str, upper_fs: Path) -> dict[str, bytes | None]:
    up, work, mnt = upper_fs / f"up-{impl}-{mode}", upper_fs / f"wk-{impl}-{mode}", base / f"m-{impl}-{mode}"
    up.mkdir()
    work.mkdir()
    with _mount(impl, [lower], mnt, up, work, [_uuid_opt(mode)]) as m:
        os.chmod(m.path / "f", 0o600)
        os.chmod(m.path / "d", 0o700)
        os.chmod(m.path / "d/g", 0o600)
    return {p: _xattr(up / p, "trusted.overlay.origin") for p in ("f", "d", "d/g")}


def _lower(root: Path) -> Path:
    low = root / "low"
    (low / "d").mkdir(parents=True)
    (low / "f").write_bytes(b"f\n")
    (low / "d/g").write_bytes(b"g\n")
    return low


@pytest.mark.parametrize("several_fs", [False, True], ids=["one-fs", "two-fs"])
def test_origin_records_as_the_kernel(tmp_path, several_fs):
    """The origin records of a copied-up file, directory and file in it, byte for byte the
    kernel's (the same lower objects): the UUID field is the lower tmpfs's UUID, null with
    uuid=off when every layer is on that tmpfs; with the upper on another tmpfs uuid=off
    falls back to null: the lower's UUID again."""
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(TmpfsMount(tmp_path / "fs-a", size="8m")).path
        b = stack.enter_context(TmpfsMount(tmp_path / "fs-b", size="8m")).path if several_fs else a
        low = _lower(a)
        fs_uuid = _fs_uuid(a)
        assert fs_uuid != bytes(16)
        for mode in MODES:
            k = _copy_up_records(tmp_path, "kernel", low, mode, b)
            s = _copy_up_records(tmp_path, "pyoverlay", low, mode, b)
            assert s == k, f"uuid={mode or '(default)'}"
            want = bytes(16) if mode == "off" and not several_fs else fs_uuid
            assert all(r is not None and r[5:21] == want for r in k.values()), (mode, k)


# --- following origin records: each side on the other's upper, before and after a new fs UUID --


class Ext4Image(contextlib.AbstractContextManager):
    """A small ext4 image through a loop device, unmounted and given a new UUID by
    ``renew_uuid`` (file handles stay valid: the same inodes and generations)."""

    def __init__(self, base: Path):
        self.image = base / "layers.img"
        self.path = base / "fs"

    def _run(self, *argv: str) -> None:
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {(r.stderr or r.stdout).strip()}")

    def __enter__(self):
        with open(self.image, "wb") as f:
            f.truncate(64 << 20)
        self._run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(self.image))
        self.path.mkdir()
        self._run("mount", "-o", "loop", str(self.image), str(self.path))
        return self

    def renew_uuid(self) -> None:
        self._run("umount", str(self.path))  # the loop device goes with it
        # tune2fs refuses to rewrite a filesystem not checked since its last mount, saying
        # so on stdout only ("Please run e2fsck -fD"; a failure seen once in a full run,
        # with nothing on stderr): check it first, as it asks
        r = subprocess.run(["e2fsck", "-f", "-y", str(self.image)], capture_output=True, text=True)
        if r.returncode > 1:  # 1: errors corrected
            raise AssertionError(f"e2fsck: {(r.stderr or r.stdout).strip()}")
        self._run("tune2fs", "-U", "random", str(self.image))
        self._run("mount", "-o", "loop", str(self.image), str(self.path))

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.path)], capture_output=True)
        self.image.unlink(missing_ok=True)
        return False


def _follows(base: Path, impl: str, low: Path, up: Path, mode: str, n: list[int]) -> dict[str, bool]:
    """Whether a mount of *up* by *impl* with ``uuid=mode`` follows the origin of the
    copied-up f and d/g (st_ino: the lower file's or the upper's)."""
    n[0] += 1
    work, mnt = up.parent / f"wk{n[0]}", base / f"m{n[0]}"
    work.mkdir()
    out = {}
    with _mount(impl, [low], mnt, up, work, [_uuid_opt(mode)]) as m:
        for p in ("f", "d/g"):
            ino = os.lstat(m.path / p).st_ino
            assert ino in (os.lstat(low / p).st_ino, os.lstat(up / p).st_ino), p
            out[p] = ino == os.lstat(low / p).st_ino
    return out


def test_each_side_follows_the_others_origins(tmp_path):
    """Uppers written by the kernel and by pyoverlay with uuid=off and uuid=null, each
    mounted by both with off, null and on: the same origins followed (st_ino); after the
    filesystem gets a new UUID only the uuid=off records are still followed, and only by
    uuid=off mounts."""
    n = [0]
    with Ext4Image(tmp_path) as img:
        low = _lower(img.path)
        uppers = {}
        for writer in ("kernel", "pyoverlay"):
            for wmode in ("off", "null"):
                up = img.path / f"up-{writer}-{wmode}"
                up.mkdir()
                (img.path / f"wk-{writer}-{wmode}").mkdir()
                with _mount(writer, [low], tmp_path / f"w-{writer}-{wmode}", up, img.path / f"wk-{writer}-{wmode}",
                            [_uuid_opt(wmode)]) as m:  # fmt: skip
                    os.chmod(m.path / "f", 0o600)
                    os.chmod(m.path / "d/g", 0o600)
                uppers[(writer, wmode)] = up
        for when in ("same uuid", "new uuid"):
            if when == "new uuid":
                img.renew_uuid()
            for (writer, wmode), up in uppers.items():
                for rmode in ("off", "null", "on"):
                    k = _follows(tmp_path, "kernel", low, up, rmode, n)
                    s = _follows(tmp_path, "pyoverlay", low, up, rmode, n)
                    what = f"{when}: {writer}'s uuid={wmode} upper mounted with uuid={rmode}"
                    assert s == k, f"{what}: kernel {k}, pyoverlay {s}"
                    followed = (rmode == "off") == (wmode == "off") and (wmode == "off" or when == "same uuid")
                    assert k == {"f": followed, "d/g": followed}, what


# --- the option ------------------------------------------------------------------------------


def test_each_side_keeps_the_others_uuid(tmp_path):
    """The kernel mounts the upper pyoverlay gave a UUID (auto, a new upper) and reports
    the f_fsid of that UUID; pyoverlay mounts the kernel's and keeps its UUID, which the
    kernel then reports again (a persistent fsid across both)."""
    for sub in ("l", "up-k", "up-s", "w1", "w2", "w3", "w4", "m1", "m2", "m3", "m4"):
        (tmp_path / sub).mkdir()
    (tmp_path / "l/f").write_bytes(b"x")
    low, name = [tmp_path / "l"], "trusted.overlay.uuid"
    with _mount("pyoverlay", low, tmp_path / "m1", tmp_path / "up-s", tmp_path / "w1", []) as m:
        os.chmod(m.path / "f", 0o600)
    written = _xattr(tmp_path / "up-s", name)
    assert written is not None and len(written) == 16
    with _mount("kernel", low, tmp_path / "m2", tmp_path / "up-s", tmp_path / "w2", []) as m:
        assert _f_fsid(os.statvfs(m.path)) == uuidmode.fsid(written)
    assert _xattr(tmp_path / "up-s", name) == written
    with _mount("kernel", low, tmp_path / "m3", tmp_path / "up-k", tmp_path / "w3", ["uuid=on"]) as m:
        os.chmod(m.path / "f", 0o600)
        fsid = _f_fsid(os.statvfs(m.path))
    kernels = _xattr(tmp_path / "up-k", name)
    with _mount("pyoverlay", low, tmp_path / "m4", tmp_path / "up-k", tmp_path / "w4", ["uuid=on"]) as m:
        os.chmod(m.path / "f", 0o644)
    assert _xattr(tmp_path / "up-k", name) == kernels and uuidmode.fsid(kernels) == fsid
    with _mount("kernel", low, tmp_path / "m3", tmp_path / "up-k", tmp_path / "w3", []) as m:
        assert _f_fsid(os.statvfs(m.path)) == fsid


def test_bad_value_is_one_line(tmp_path):
    """A bad uuid= value, and verity=on|require (refused with the reason): one line, exit 2."""
    for sub in ("l", "u", "m"):
        (tmp_path / sub).mkdir()
    for opt in ("uuid=maybe", "uuid", "verity=on", "verity=require"):
        r = subprocess.run(
            [sys.executable, "-m", "overlayfs_py", "mount", "-o", opt, str(tmp_path / "l"), str(tmp_path / "u"),
             str(tmp_path / "m")],
            capture_output=True,
            text=True,
        )  # fmt: skip
        assert r.returncode == 2, r
        assert opt.partition("=")[0] in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        if opt.startswith("verity"):
            assert "fs-verity digests" in r.stderr


def test_fsid_is_the_kernels():
    """uuidmode.fsid: the kernel's uuid_to_fsid, from a value read off a kernel mount here
    (overlay.uuid 5bd2358a-4a53-4ed4-bddd-196c64b119e7, `stat -f` fsid e62c0fe63357e22e)."""
    u = bytes.fromhex("5bd2358a4a534ed4bddd196c64b119e7")
    assert uuidmode.fsid(u) == (0xE62C0FE6, 0x3357E22E)


@pytest.mark.parametrize("pre", ["new", "used", "with-uuid"])
def test_written_before_mount_returns_and_listed(tmp_path, pre):
    """`pyoverlay mount` returns with overlay.uuid already on the upper root (the kernel
    writes it in mount(2)), and `pyoverlay mounts --json` shows the effective mode, as
    /proc/mounts shows the kernel's: auto becomes on for a new upper, null for one used
    before without a UUID, stays auto for one with a UUID (the kernel then shows no
    uuid=); a read-only mount without an upper stays auto."""
    import json

    for sub in ("l", "l2", "u", "m", "m2"):
        (tmp_path / sub).mkdir()
    for name, value in PRE[pre].items():
        os.setxattr(tmp_path / "u", "trusted.overlay." + name, value)
    env = dict(os.environ, PYOVERLAY_STATE_DIR=str(tmp_path / "state"), XDG_RUNTIME_DIR=str(tmp_path / "state"))
    py = [sys.executable, "-m", "overlayfs_py"]
    low, up, mnt, mnt2 = (str(tmp_path / x) for x in ("l", "u", "m", "m2"))
    subprocess.run([*py, "mount", "-o", "nouserxattr", low, up, mnt], check=True, env=env, capture_output=True)
    try:
        on_disk = _xattr(tmp_path / "u", "trusted.overlay.uuid")
        subprocess.run([*py, "mount", f"{low}:{tmp_path / 'l2'}", mnt2], check=True, env=env, capture_output=True)
        try:
            out = subprocess.run([*py, "mounts", "--json"], check=True, env=env, capture_output=True, text=True).stdout
        finally:
            subprocess.run([*py, "umount", mnt2], check=True, env=env, capture_output=True)
    finally:
        subprocess.run([*py, "umount", mnt], check=True, env=env, capture_output=True)
    listed = {m["mountpoint"]: m["uuid"] for m in json.loads(out)}
    if pre == "new":
        assert on_disk is not None and len(on_disk) == 16
        assert listed == {mnt: "on", mnt2: "auto"}
    elif pre == "with-uuid":
        assert on_disk == PRE[pre]["uuid"]
        assert listed == {mnt: "auto", mnt2: "auto"}
    else:
        assert on_disk is None
        assert listed == {mnt: "null", mnt2: "auto"}
