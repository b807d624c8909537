"""``-o xino=on|off|auto``: inode numbers of layers on several filesystems, compared bit
for bit with the kernel overlay mounted with the same options on the same layers.

The kernel (fs/overlayfs/super.c ovl_get_layers/ovl_get_fsid, inode.c ovl_map_dev_ino,
readdir.c ovl_remap_lower_ino) numbers the filesystems (fsid 0: the upper's, reserved
even without an upper; the others in lowerdir order), takes ``ilog2(numfs - 1) + 2`` high
bits and reports ``ino | fsid << (64 - bits + 1)`` as st_ino and d_ino. Each comparison
reads the same layer directories through both implementations one after the other (st_ino
of every object, d_ino of every listed entry including ``.`` and ``..``), before and after
writes made by one side (copy-ups with origins, hard links, renames into pure upper dirs).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from helpers.mounts import KernelOverlay, PyoverlayMount, TmpfsMount
from overlayfs_py import _syscalls
from overlayfs_py.config import ConfigError, build_config, parse_options, xino_default

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

ENGINES = ["direct", "pyfuse3"]

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_GETDENTS64 = _syscalls.number("getdents64")


def _dents(path: Path) -> dict[bytes, int]:
    """name -> d_ino of every entry getdents64 returns (``.`` and ``..`` included)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    out: dict[bytes, int] = {}
    buf = ctypes.create_string_buffer(65536)
    try:
        while True:
            n = _libc.syscall(_SYS_GETDENTS64, fd, buf, len(buf))
            if n < 0:
                raise OSError(ctypes.get_errno(), "getdents64")
            if n == 0:
                return out
            raw = buf.raw[:n]
            off = 0
            while off < n:
                d_ino, _d_off, reclen, _type = struct.unpack_from("<QqHB", raw, off)
                name = raw[off + 19 : off + reclen].split(b"\0", 1)[0]
                out[name] = d_ino
                off += reclen
    finally:
        os.close(fd)


def _snapshot(root: Path) -> dict[str, object]:
    """st_ino of every object and d_ino of every entry under *root*."""
    snap: dict[str, object] = {}
    todo = [Path(".")]
    while todo:
        rel = todo.pop()
        p = root / rel
        st = os.lstat(p)
        snap[f"ino {rel}"] = st.st_ino
        if not os.path.isdir(p) or os.path.islink(p):
            continue
        for name, d_ino in sorted(_dents(p).items()):
            snap[f"d_ino {rel}/{name.decode()}"] = d_ino
            if name not in (b".", b".."):
                todo.append(rel / name.decode())
    return snap


def _diff(k: dict, s: dict) -> list[str]:
    out = []
    for key in sorted(set(k) | set(s)):
        if k.get(key) != s.get(key):
            kv, sv = k.get(key), s.get(key)
            out.append(f"{key}: kernel {kv!r} ({_hex(kv)}) pyoverlay {sv!r} ({_hex(sv)})")
    return out


def _hex(v: object) -> str:
    return hex(v) if isinstance(v, int) else "-"


class Layout:
    """Layer dirs on several filesystems under *base*: ``fs`` names a tmpfs mounted for the
    test (or ``ext4``: base itself, the tmp dir's filesystem)."""

    def __init__(self, base: Path, stack: contextlib.ExitStack, lowers: list[str], upper: str | None):
        self.base = base
        self.mounts: dict[str, Path] = {"ext4": base / "ext4"}
        (base / "ext4").mkdir()
        for fs in set(lowers) | ({upper} if upper else set()):
            if fs != "ext4" and fs not in self.mounts:
                self.mounts[fs] = stack.enter_context(TmpfsMount(base / fs, size="8m")).path
        self.lowers = []
        for i, fs in enumerate(lowers):
            d = self.mounts[fs] / f"l{i + 1}"
            d.mkdir()
            self.lowers.append(d)
        self.upper = self.work_k = self.work_p = None
        if upper:
            self.upper = self.mounts[upper] / "up"
            self.work_k = self.mounts[upper] / "wk-kernel"
            self.work_p = self.mounts[upper] / "wk-pyoverlay"
            for d in (self.upper, self.work_k, self.work_p):
                d.mkdir()
        self.n = 0

    def mount(self, kind: str, options: list[str], engine: str = "direct"):
        self.n += 1
        mnt = self.base / f"m{self.n}"
        if kind == "kernel":
            return KernelOverlay(self.lowers, mnt, self.upper, self.work_k, options=options)
        return PyoverlayMount(self.lowers, mnt, self.upper, self.work_p, options=[*options, f"engine={engine}"])

    def snap(self, kind: str, options: list[str], engine: str = "direct") -> dict[str, object]:
        with self.mount(kind, options, engine) as m:
            return _snapshot(m.path)

    def compare(self, options: list[str], engine: str) -> dict[str, object]:
        k = self.snap("kernel", options)
        s = self.snap("pyoverlay", options, engine)
        problems = _diff(k, s)
        assert not problems, f"{len(problems)} differences with the kernel ({options}):\n" + "\n".join(problems[:40])
        return k


def _fill(lay: Layout) -> None:
    l1 = lay.lowers[0]
    (l1 / "f1").write_text("f1\n")
    (l1 / "d").mkdir()
    (l1 / "d/y").write_text("y\n")
    (l1 / "hl1").write_text("linked\n")
    os.link(l1 / "hl1", l1 / "hl2")
    last = lay.lowers[-1]
    for name in ("g", "h", "mv"):
        (last / name).write_text(name + "\n")
    (last / "d").mkdir(exist_ok=True)
    (last / "d/x").write_text("x\n")
    (last / "e/sub").mkdir(parents=True)
    (last / "e/sub/z").write_text("z\n")
    (last / "deep/a").mkdir(parents=True)
    (last / "deep/a/b").write_text("b\n")
    os.symlink("g", last / "sym")
    (last / "op/inner").mkdir(parents=True)
    (last / "lowerdir/in").mkdir(parents=True)
    (l1 / "p").mkdir()  # p merged from lowers only; p/q's top layer is not p's
    (last / "p/q/r").mkdir(parents=True)
    (last / "mvdir/deeper").mkdir(parents=True)
    (last / "mvdir/deeper/f").write_text("f\n")
    for i, low in enumerate(lay.lowers[1:-1], start=2):
        (low / f"mid{i}").write_text("mid\n")
        (low / "d").mkdir(exist_ok=True)
        (low / f"d/m{i}").write_text("m\n")
        (low / "p/q").mkdir(parents=True)
        (low / "mvdir").mkdir()
    if lay.upper is not None:
        (lay.upper / "u").write_text("u\n")
        (lay.upper / "ud/w").mkdir(parents=True)


def _ops(m: Path) -> None:
    os.chmod(m / "g", 0o600)  # copy-up: the origin's st_ino
    os.chmod(m / "d/x", 0o600)  # copy-up into a merged dir
    os.mkdir(m / "newd")
    (m / "newd/n").write_text("n\n")
    os.rename(m / "f1", m / "newd/f1m")  # an origin into a pure upper dir (impure)
    os.link(m / "h", m / "h2")  # copy-up, then a link
    os.chmod(m / "hl1", 0o600)  # a lower hard link: the copy-up breaks it (upper st_ino)
    os.mkdir(m / "e/sub2")  # e: upper with origin, merged
    (m / "deep/a/b").write_text("b2\n")  # copies up deep and deep/a
    os.rename(m / "mv", m / "ud/mv")
    os.mkdir(m / "newd/sub")  # a pure upper dir under a pure upper dir
    os.rmdir(m / "op/inner")
    os.rmdir(m / "op")
    os.mkdir(m / "op")  # opaque: a pure upper dir over a lower one
    os.mkdir(m / "op/x")
    os.lchown(m / "sym", 0, 0)  # a symlink copied up


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("writer", ["kernel", "pyoverlay"])
def test_xino_on_upper_ext4_lowers_on_tmpfs(tmp_path, engine, writer):
    """upper on ext4, lowers on two tmpfs and one on the upper's filesystem (fsid 0):
    3 filesystems, 3 xino bits; before and after writes by either side."""
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "ext4", "t2"], "ext4")
        _fill(lay)
        opts = ["xino=on"]
        before = lay.compare(opts, engine)
        assert before["ino d"] >> 61 == 0b010  # merged dir d: its top lower (t1, fsid 1)
        assert before["ino g"] >> 61 == 0b100  # t2: fsid 2
        with lay.mount(writer, opts, engine) as m:
            _ops(m.path)
            live = _snapshot(m.path)
        after = lay.compare(opts, engine)
        if writer == "pyoverlay":  # the numbers in the writing mount are those after a remount
            assert not _diff(after, live), "\n".join(_diff(after, live))
        assert after["ino g"] == before["ino g"]  # the copy-up keeps the origin's
        assert after["ino hl1"] >> 61 == 0  # a broken hard link: the upper's


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("xino", ["on", "auto"])
def test_xino_upper_tmpfs_shared_with_a_lower(tmp_path, engine, xino):
    """upper on a tmpfs that the top lower shares (fsid 0 for both), other lowers on a
    second tmpfs; writes by the kernel, then both read."""
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "t2", "t2"], "t1")
        _fill(lay)
        opts = [f"xino={xino}"]
        before = lay.compare(opts, engine)
        assert before["ino f1"] >> 62 == 0 and before["ino g"] >> 63 == 1  # 2 bits: fsid 1 -> bit 63
        with lay.mount("kernel", opts) as m:
            _ops(m.path)
        lay.compare(opts, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_xino_lower_only(tmp_path, engine):
    """No upper: fsid 0 stays reserved, the lowers' filesystems are 1 and 2 (3 bits)."""
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "t2", "t1"], None)
        _fill(lay)
        for opts in (["xino=on"], ["xino=auto"]):
            snap = lay.compare(opts, engine)
            assert snap["ino f1"] >> 61 == 0b010


@pytest.mark.parametrize("engine", ENGINES)
def test_xino_four_lower_filesystems_take_4_bits(tmp_path, engine):
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "t2", "t3", "t4"], "ext4")
        _fill(lay)
        snap = lay.compare(["xino=on"], engine)
        assert snap["ino g"] >> 60 == 0b1000  # fsid 4 of 5 filesystems: 4 bits, shift 61
        with lay.mount("pyoverlay", ["xino=on"], engine) as m:
            _ops(m.path)
        lay.compare(["xino=on"], engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_xino_kernel_redirects(tmp_path, engine):
    """Directories renamed by the kernel with redirect_dir=on (an upper dir with a redirect
    and an origin on another filesystem), read by both with redirects followed."""
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "ext4", "t2"], "ext4")
        _fill(lay)
        with lay.mount("kernel", ["xino=on", "redirect_dir=on"]) as m:
            os.rename(m.path / "mvdir", m.path / "moved")
            os.rename(m.path / "e", m.path / "ud/e2")
            os.rename(m.path / "p/q", m.path / "newq")
        snap = lay.compare(["xino=on"], engine)
        assert snap["ino moved"] == os.lstat(lay.lowers[1] / "mvdir").st_ino  # its top lower: fsid 0
        assert snap["ino ud/e2"] >> 61 == 0b100  # the origin's, on t2 (fsid 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_xino_lowers_at_mount_roots(tmp_path, engine):
    """Lowers that are filesystem roots (an upper cannot be: its workdir must be on its
    mount): the root's ``..`` is what the top lower's readdir lists (that filesystem's own
    root), not the mountpoint's parent an ``lstat("..")`` reaches."""
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "t2"], None)
        for d in lay.lowers:
            d.rmdir()
        lay.lowers = [lay.mounts["t1"], lay.mounts["t2"]]
        _fill(lay)
        snap = lay.compare(["xino=on"], engine)
        assert snap["d_ino ./.."] >> 61 == 0b010  # t1's root (fsid 1)


def test_xino_all_layers_on_one_fs_is_not_used(tmp_path):
    """The kernel ignores xino=on when every layer is on one filesystem: real inode numbers."""
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["ext4", "ext4"], "ext4")
        _fill(lay)
        snap = lay.compare(["xino=on"], "direct")
        assert snap["ino g"] == os.lstat(lay.lowers[-1] / "g").st_ino


def _loop_ext4(stack: contextlib.ExitStack, base: Path, name: str, fs_uuid: str) -> Path:
    img, mnt = base / f"{name}.img", base / name
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", fs_uuid, str(img)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    stack.callback(subprocess.run, ["umount", str(mnt)], check=True)
    return mnt


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("writer", ["kernel", "pyoverlay"])
def test_xino_origin_found_by_its_filesystem_uuid(tmp_path, engine, writer):
    """Two lower filesystems that are copies of one image (another UUID): the handle of a
    copied-up, renamed file decodes on both; the origin is the one on the filesystem whose
    UUID the record names (ovl_check_origin_fh), which decides the xino fsid."""
    img_a, img_b = tmp_path / "a.img", tmp_path / "b.img"
    with open(img_a, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum", str(img_a)], check=True, capture_output=True)
    mnt_a, mnt_b = tmp_path / "fa", tmp_path / "fb"
    mnt_a.mkdir()
    mnt_b.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img_a), str(mnt_a)], check=True)
    try:
        (mnt_a / "A").mkdir()
        (mnt_a / "B").mkdir()
        (mnt_a / "A/x").write_text("x\n")
    finally:
        subprocess.run(["umount", str(mnt_a)], check=True)
    subprocess.run(["cp", str(img_a), str(img_b)], check=True)
    subprocess.run(["tune2fs", "-U", "random", str(img_b)], check=True, capture_output=True)
    with contextlib.ExitStack() as stack:
        for img, mnt in ((img_a, mnt_a), (img_b, mnt_b)):
            subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
            stack.callback(subprocess.run, ["umount", str(mnt)], check=True)
        lay = Layout(tmp_path, stack, ["t1"], "ext4")
        lay.lowers = [mnt_a / "B", mnt_b / "A", lay.lowers[0]]  # x is in the second lower
        with lay.mount(writer, ["xino=on"], engine) as m:
            os.chmod(m.path / "x", 0o600)
            os.rename(m.path / "x", m.path / "y")
        snap = lay.compare(["xino=on"], engine)
        assert snap["ino y"] >> 61 == 0b100  # fsid 2: the second lower's filesystem


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bad", ["null", "conflicting", "no_handles"])
def test_xino_auto_falls_back_on_a_bad_lower_uuid(tmp_path, engine, bad):
    """With an upper, a lower filesystem with a null UUID, or the UUID of another lower
    filesystem (ovl_lower_uuid_ok), or one that cannot decode file handles (ovl_lower_dir:
    here a kernel overlay, which has a UUID), turns xino=auto off; xino=on stays on."""
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "t2"], "t1")
        u = str(uuidlib.uuid4())
        if bad == "no_handles":
            inner = tmp_path / "inner"
            for d in ("il", "iu", "iw"):
                (tmp_path / d).mkdir()
            stack.enter_context(KernelOverlay([tmp_path / "il"], inner, tmp_path / "iu", tmp_path / "iw"))
            extra = [inner]
        else:
            extra = [_loop_ext4(stack, tmp_path, "e1", "clear" if bad == "null" else u)]
        if bad == "conflicting":
            extra.append(_loop_ext4(stack, tmp_path, "e2", u))
        for i, mnt in enumerate(extra):
            d = mnt / f"x{i}"
            d.mkdir()
            (d / f"ext{i}").write_text("e\n")
            lay.lowers.append(d)
        _fill(lay)
        k_auto, k_off = lay.snap("kernel", ["xino=auto"]), lay.snap("kernel", ["xino=off"])
        assert k_auto == k_off  # the oracle: auto fell back
        p_auto = lay.snap("pyoverlay", ["xino=auto"], engine)
        assert p_auto == lay.snap("pyoverlay", ["xino=off"], engine)
        assert p_auto != lay.compare(["xino=on"], engine)
        # copy-ups from those filesystems: a "bad uuid" one's origins are not followed
        with lay.mount("kernel", ["xino=on"]) as m:
            for i in range(len(extra)):
                os.chmod(m.path / f"ext{i}", 0o600)
        lay.compare(["xino=on"], engine)


def test_xino_default_follows_the_module_parameter(tmp_path):
    with open("/sys/module/overlay/parameters/xino_auto") as f:
        want = "auto" if f.read().strip() == "Y" else "off"
    assert xino_default() == want
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "t2"], "ext4")
        _fill(lay)
        assert lay.snap("pyoverlay", []) == lay.snap("pyoverlay", [f"xino={want}"])
        if want == "auto":  # (here xino_auto=N: the kernel's off cannot be compared bit for bit)
            assert lay.snap("kernel", []) == lay.snap("pyoverlay", [])


@pytest.mark.parametrize("value", ["on", "off", "auto"])
def test_xino_option_parsed(tmp_path, value):
    assert parse_options([f"xino={value}"]) == {"xino": value}
    for d in ("l", "m"):
        (tmp_path / d).mkdir(exist_ok=True)
    cfg = build_config([str(tmp_path / "l")], None, str(tmp_path / "m"), options=[f"xino={value}"])
    assert cfg.xino == value


@pytest.mark.parametrize("opt", ["xino", "xino=yes", "xino="])
def test_xino_bad_value(opt):
    with pytest.raises(ConfigError, match="xino"):
        parse_options([opt])


def test_xino_bad_value_cli(tmp_path):
    for d in ("l", "m"):
        (tmp_path / d).mkdir()
    r = subprocess.run(
        [
            os.path.join(os.path.dirname(os.path.dirname(__file__)), ".venv/bin/pyoverlay"),
            "mount",
            "-o",
            f"lowerdir={tmp_path / 'l'},xino=maybe",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "xino" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("feature", ["metacopy=on", "redirect_dir=on"])
def test_null_uuid_lower_allowed_with_features(tmp_path, engine, feature):
    """With metacopy=on or redirect_dir=on (no offline changes to the lowers allowed:
    ovl_allow_offline_changes), a lower filesystem with a null UUID is not "bad uuid":
    xino=auto stays on, and origins into it are followed, as the kernel's."""
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "t2"], "t1")
        mnt = _loop_ext4(stack, tmp_path, "e1", "clear")
        d = mnt / "x0"
        d.mkdir()
        (d / "ext0").write_text("e\n")
        lay.lowers.append(d)
        _fill(lay)
        k_auto = lay.snap("kernel", ["xino=auto", feature])
        assert k_auto != lay.snap("kernel", ["xino=off", feature])  # the oracle: auto stayed on
        assert lay.compare(["xino=auto", feature], engine) == k_auto
        with lay.mount("kernel", ["xino=auto", feature]) as m:
            os.chmod(m.path / "ext0", 0o600)
        lay.compare(["xino=auto", feature], engine)
