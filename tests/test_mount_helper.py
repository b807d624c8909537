"""``mount.fuse.pyoverlay`` (overlayfs_py/mount_helper.py), mount(8) and fstab, and
``pyoverlay mounts`` (docs/mounting.md).

* The helper takes fuse-overlayfs's command line: containers/storage's exact call (``-o
  lowerdir=...,upperdir=...,workdir=...,,volatile MERGED``, run in the driver's home) works
  with it as with fuse-overlayfs, and both show the same tree; mount(8)'s ``SOURCE MERGED
  -o OPTS -n -s -v`` and the generic options are accepted; what pyoverlay cannot do is one
  line on stderr, exit status 1 and nothing mounted; ``-f`` serves in the foreground and
  ``-d`` logs every request.
* ``mount -t fuse.pyoverlay`` and fstab lines (``mount --fstab FILE -a`` and ``mount
  --fstab FILE MERGED``) work through the real mount(8), in a private mount namespace with
  this checkout's helper bound over /usr/sbin/mount.fuse.pyoverlay (scripts/setup links it
  there); a plain ``umount MERGED`` ends the server and its mount record goes.
* ``pyoverlay mounts`` lists every live mount with its layers, engine, server pid and trace
  socket (``--json`` too), and drops the records of servers that are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import mounts
from helpers.containers import wait_gone
from overlayfs_py import procfs

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root]

HELPER = Path(sys.executable).parent / "mount.fuse.pyoverlay"
SBIN_HELPER = Path("/usr/sbin/mount.fuse.pyoverlay")
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs")


@pytest.fixture(autouse=True)
def _helper_installed():
    assert HELPER.exists(), f"{HELPER} is missing: run scripts/setup (pip install -e . makes it)"


@pytest.fixture
def env(tmp_path):
    e = mounts.pyoverlay_env()
    e["PYOVERLAY_STATE_DIR"] = str(tmp_path / "state")
    return e


def _records(env) -> list[dict]:
    """The records in the test's state dir (a server removes its own as it exits: one may
    go between the listing and the read)."""
    d = Path(env["PYOVERLAY_STATE_DIR"])
    out = []
    for p in sorted(d.glob("mount-*.json")) if d.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            out.append(json.loads(p.read_text()))
    return out


def _record(env, mnt) -> dict:
    found = [r for r in _records(env) if r["mountpoint"] == str(mnt)]
    assert len(found) == 1, _records(env)
    return found[0]


def _helper(*args, env, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HELPER), *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _cleanup(mnt, env) -> None:
    """Whatever a failed test left: unmount and wait for the server."""
    recs = [r for r in _records(env) if r["mountpoint"] == str(mnt)]
    if mounts.is_mounted(mnt):
        mounts.force_unmount(mnt)
    for r in recs:
        if not wait_gone(r["pid"], 10):
            os.kill(r["pid"], signal.SIGKILL)


def _tree(root: Path) -> dict[str, str]:
    """Every name under *root* with its type and (files) content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = "dir"
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = "link" if os.path.islink(p) else Path(p).read_text()
    return out


def _storage_layout(home: Path, ctr: str) -> tuple[str, Path, Path, Path]:
    """containers/storage's overlay driver's home: two image layers reached through the short
    links under ``l/``, and a container layer ``ctr`` (diff, work, merged). Returns the
    lowerdir spec (top first, absolute links) and the container's upper, work and merged."""
    (home / "l").mkdir(parents=True, exist_ok=True)
    for layer, link, files in (("base", "BASELINK", {"etc/os": "base\n", "bin/sh": "sh\n", "gone": "x\n"}),
                               ("app", "APPLINK", {"etc/app": "app\n", "etc/os": "app-os\n"})):  # fmt: skip
        diff = home / layer / "diff"
        if not diff.exists():
            for name, text in files.items():
                (diff / name).parent.mkdir(parents=True, exist_ok=True)
                (diff / name).write_text(text)
            (home / "l" / link).symlink_to(f"../{layer}/diff")
    for d in ("diff", "work", "merged"):
        (home / ctr / d).mkdir(parents=True)
    lowers = f"{home}/l/APPLINK:{home}/l/BASELINK"
    return lowers, home / ctr / "diff", home / ctr / "work", home / ctr / "merged"


# --------------------------------------------------------------------------
# the helper's command line
# --------------------------------------------------------------------------


def test_containers_storage_call_works_as_with_fuse_overlayfs(tmp_path, env):
    """podman 4.3's exact call: ``PROG -o lowerdir=L1:L2,upperdir=U,workdir=W,,volatile MERGED``,
    run with the driver's home as the working directory; the empty item and ``volatile``."""
    home = tmp_path / "storage" / "overlay"
    lowers, upper, work, merged = _storage_layout(home, "ctr1")
    r = _helper("-o", f"lowerdir={lowers},upperdir={upper},workdir={work},,volatile", merged, env=env, cwd=home)
    try:
        assert r.returncode == 0, r.stderr
        assert r.stderr == "" and r.stdout == ""
        entry = mounts.mount_entry(merged)
        assert entry is not None and entry.fstype == "fuse.pyoverlay"
        rec = _record(env, merged)
        assert rec["config"]["volatile"] is True
        assert rec["config"]["lowerdirs"] == [str(home / "app" / "diff"), str(home / "base" / "diff")]
        (merged / "etc" / "new").write_text("new\n")
        (merged / "gone").unlink()
        ours = _tree(merged)
        subprocess.run(["umount", str(merged)], check=True)  # podman unmounts it itself
        assert wait_gone(rec["pid"], 30), "the server did not exit after umount"
        assert not [x for x in _records(env) if x["mountpoint"] == str(merged)]
    finally:
        _cleanup(merged, env)
    assert (upper / "etc" / "new").read_text() == "new\n"
    assert os.stat(upper / "gone").st_rdev == 0  # a whiteout (char 0/0)
    assert ours["etc/os"] == "app-os\n" and "gone" not in ours and ours["etc/new"] == "new\n"

    if FUSE_OVERLAYFS is None:
        return
    lowers, upper2, work2, merged2 = _storage_layout(home, "ctr2")
    r = subprocess.run(
        [FUSE_OVERLAYFS, "-o", f"lowerdir={lowers},upperdir={upper2},workdir={work2},,volatile", str(merged2)],
        cwd=home, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        assert r.returncode == 0, r.stderr
        (merged2 / "etc" / "new").write_text("new\n")
        (merged2 / "gone").unlink()
        assert _tree(merged2) == ours  # the same call, the same tree
    finally:
        mounts.force_unmount(merged2)


def _layers(tmp_path):
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "f").write_text("lower\n")
    return lower, upper, work, mnt


@pytest.mark.parametrize(
    "opts, says",
    [
        ("squash_to_uid=x", "mount option 'squash_to_uid' must be a uid or gid"),
        ("squash_to_gid=-1", "mount option 'squash_to_gid' must be a uid or gid"),
        ("squash_to_root=1", "mount option 'squash_to_root' takes no value"),
        ("xattr_permissions=2", "'xattr_permissions=2' is not supported"),
        ("plugins=/usr/lib/x.so", "not supported"),
        ("lowerdri=/x", "unknown mount option 'lowerdri'"),
        ("nfs_export=on", "'nfs_export=on' is not supported"),
        ("fsync=2", "invalid value for option 'fsync=2'"),
        ("subtype=other", "invalid value"),
        ("aufs_whiteouts=yes", "invalid value 'yes' for mount option 'aufs_whiteouts' (expected on|off)"),
        ("aufs_whiteouts", "mount option 'aufs_whiteouts' needs a value"),
    ],
)
def test_a_bad_option_is_one_line_exit_1_and_nothing_mounted(tmp_path, env, opts, says):
    lower, upper, work, mnt = _layers(tmp_path)
    r = _helper("-o", f"lowerdir={lower},upperdir={upper},workdir={work},{opts}", mnt, env=env)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mount.fuse.pyoverlay: ") and says in lines[0], r.stderr
    assert not mounts.is_mounted(mnt) and _records(env) == []


@pytest.mark.parametrize(
    "args, says",
    [
        ([], "usage: mount.fuse.pyoverlay"),
        (["a", "b", "c"], "too many arguments"),
        (["-x", "MNT"], "unknown argument '-x'"),
        (["-o"], "option -o needs a value"),
        (["MNT"], "no lower layer given"),
        (["-o", "lowerdir=TMP/missing", "MNT"], "lower layer"),
        (["-o", "lowerdir=LOWER,upperdir=UPPER", "MNT"], "needs a workdir"),
    ],
)
def test_a_bad_command_line_is_one_line_exit_1(tmp_path, env, args, says):
    lower, upper, work, mnt = _layers(tmp_path)
    subst = {"MNT": str(mnt), "TMP": str(tmp_path), "LOWER": str(lower), "UPPER": str(upper)}
    for k, v in subst.items():
        args = [a.replace(k, v) for a in args]
    r = _helper(*args, env=env)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not mounts.is_mounted(mnt) and _records(env) == []


def test_generic_and_fuse_overlayfs_options_are_accepted(tmp_path, env):
    """mount(8)'s flags and generic options, fstab words, x-* and fuse-overlayfs's options that
    are pyoverlay's behaviour already; nosuid, nodev, noatime become the mount's flags (exec
    after noexec undoes it); ``fsync=0`` is ``volatile``; ``-o`` given twice; ``-s`` makes an
    unknown option a warning."""
    lower, upper, work, mnt = _layers(tmp_path)
    generic = "rw,noexec,nodev,nosuid,noatime,exec,defaults,_netdev,nofail,x-systemd.automount"
    generic += ",allow_other,default_permissions"
    fo = 'context="system_u:object_r:container_file_t:s0:c1,c2",static_nlink,noacl,fsync=0,timeout=1000,,'
    r = _helper(
        "pyoverlay", mnt, "-n", "-v", "-s", "-o", f"{generic},lowerdir={lower}", "-o", f"{fo},upperdir={upper}",
        f"-oworkdir={work},whatever=1", env=env,
    )  # fmt: skip
    try:
        assert r.returncode == 0, r.stderr
        assert "ignoring unknown mount option 'whatever'" in r.stderr  # -s: a warning
        rec = _record(env, mnt)
        assert rec["config"]["volatile"] is True  # fsync=0
        assert rec["config"]["read_only"] is False
        assert (mnt / "f").read_text() == "lower\n"
        (mnt / "w").write_text("w\n")
        assert (upper / "w").read_text() == "w\n"
        entry = mounts.mount_entry(mnt)
        assert entry.source == "pyoverlay"  # SOURCE is the mount's source
        assert {"nosuid", "nodev", "noatime"} <= set(entry.options.split(","))  # mount flags, applied
        assert "noexec" not in entry.options.split(",")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        _cleanup(mnt, env)
    # without -s the same unknown option is refused
    r = _helper("-o", f"lowerdir={lower},upperdir={upper},workdir={work},whatever=1", mnt, env=env)
    assert r.returncode == 1 and "unknown mount option 'whatever'" in r.stderr


@pytest.mark.parametrize("engine", ["direct", "pyfuse3"])
def test_pyoverlay_mount_applies_the_mount_flags_too(tmp_path, env, engine):
    """``pyoverlay mount -o nosuid,nodev,noexec`` (config.parse_options, shared with the
    helper): the flags are the FUSE mount's, and noexec is enforced by the kernel. Before,
    pyoverlay mount accepted them and silently ignored them."""
    lower, upper, work, mnt = _layers(tmp_path)
    (lower / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(lower / "run.sh", 0o755)
    r = subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", "mount", "-o", f"engine={engine},nosuid,nodev,noexec,noatime,atime",
         str(lower), str(upper), str(mnt), "--workdir", str(work)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        assert r.returncode == 0, r.stderr
        flags = set(mounts.mount_entry(mnt).options.split(","))
        assert {"nosuid", "nodev", "noexec"} <= flags and "noatime" not in flags
        with pytest.raises(PermissionError):  # noexec: execve(2) fails with EACCES
            subprocess.run([str(mnt / "run.sh")], capture_output=True, timeout=30)
        assert _record(env, mnt)["config"]["mount_flags"] == ["nosuid", "nodev", "noexec"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        _cleanup(mnt, env)


def test_a_quoted_selinux_label_with_commas(tmp_path, env):
    """containers/storage's ``context="..."`` (label.FormatMountLabel): MCS categories hold a
    comma inside the quotes; the label is one option, accepted and ignored."""
    lower, upper, work, mnt = _layers(tmp_path)
    label = 'context="system_u:object_r:container_file_t:s0:c123,c456"'
    r = _helper("-o", f"lowerdir={lower},upperdir={upper},workdir={work},,volatile,{label}", mnt, env=env)
    try:
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        assert (mnt / "f").read_text() == "lower\n"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        _cleanup(mnt, env)


def _programs() -> list[tuple[str, list[str]]]:
    """pyoverlay's helper, and fuse-overlayfs where it is installed."""
    out = [("pyoverlay", [str(HELPER)])]
    if FUSE_OVERLAYFS is not None:
        out.append(("fuse-overlayfs", [FUSE_OVERLAYFS]))
    return out


@contextlib.contextmanager
def _fresh_mount(argv: list[str], opts: str, upper: Path, work: Path, mnt: Path, env):
    """*argv* (the helper or fuse-overlayfs) mounted with ``-o opts`` on an emptied upper
    and workdir; unmounted and cleaned up after."""
    for d in (upper, work):
        shutil.rmtree(d)
        d.mkdir()
    r = subprocess.run([*argv, "-o", opts, str(mnt)], env=env, capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        yield
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        _cleanup(mnt, env)


def test_aufs_whiteouts_on_by_default_as_with_fuse_overlayfs(tmp_path, env):
    """A ``.wh.NAME`` file in a lower layer (as containers/storage stores a layer from a tar)
    hides NAME below it with the helper, as with fuse-overlayfs; ``aufs_whiteouts=off``
    makes it a plain file again (the kernel's view), and the record says which."""
    lower, upper, work, mnt = _layers(tmp_path)
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    (top / "etc" / ".wh.motd").touch()
    (lower / "etc").mkdir()
    (lower / "etc" / "motd").write_text("motd\n")
    (lower / "etc" / "passwd").write_text("root\n")
    base = f"lowerdir={top}:{lower},upperdir={upper},workdir={work}"
    for name, argv in _programs():
        with _fresh_mount(argv, base, upper, work, mnt, env):
            assert sorted(os.listdir(mnt / "etc")) == ["passwd"], name
            assert not os.path.lexists(mnt / "etc" / "motd") and not os.path.lexists(mnt / "etc" / ".wh.motd"), name
            if name == "pyoverlay":
                assert _record(env, mnt)["config"]["aufs_whiteouts"] is True
                listed = json.loads(_pyoverlay("mounts", "--json", env=env).stdout)
                assert [m["aufs_whiteouts"] for m in listed if m["mountpoint"] == str(mnt)] == [True]
    with _fresh_mount([str(HELPER)], base + ",aufs_whiteouts=off", upper, work, mnt, env):
        assert sorted(os.listdir(mnt / "etc")) == [".wh.motd", "motd", "passwd"]
        assert _record(env, mnt)["config"]["aufs_whiteouts"] is False


def test_uidmapping_and_gidmapping_as_with_fuse_overlayfs(tmp_path, env):
    """containers/storage appends ``uidmapping=``/``gidmapping=`` (fuse-overlayfs's
    HOST:PRESENTED:COUNT, several ranges joined by ':') for a container with an id map."""
    lower, upper, work, mnt = _layers(tmp_path)
    os.chown(lower / "f", 1, 2)
    maps = "uidmapping=0:100000:1:1:200000:10,gidmapping=0:300000:1:1:400000:10"
    seen = {}
    for name, argv in _programs():
        with _fresh_mount(argv, f"lowerdir={lower},upperdir={upper},workdir={work},,{maps}", upper, work, mnt, env):
            st = os.stat(mnt / "f")
            seen[name] = (st.st_uid, st.st_gid)
    assert seen["pyoverlay"] == (200000, 400001)  # stored 1:2 shown through the second ranges
    if "fuse-overlayfs" in seen:
        assert seen["fuse-overlayfs"] == seen["pyoverlay"]


@pytest.mark.parametrize(
    "squash, shown",
    [
        ("squash_to_root", (0, 0)),
        ("squash_to_uid=5,squash_to_gid=6", (5, 6)),
        ("squash_to_root,squash_to_gid=7", (0, 7)),
    ],
)
def test_squash_options_as_with_fuse_overlayfs(tmp_path, env, squash, shown):
    """fuse-overlayfs's squash_to_root / squash_to_uid / squash_to_gid: every object shown with
    that owner (a lower file, the root, a new file, a copied-up one); the disk keeps the real
    owners."""
    lower, upper, work, mnt = _layers(tmp_path)
    os.chown(lower / "f", 1, 2)
    (lower / "g").write_text("g\n")
    os.chown(lower / "g", 3, 4)
    seen = {}
    for name, argv in _programs():
        with _fresh_mount(argv, f"lowerdir={lower},upperdir={upper},workdir={work},{squash}", upper, work, mnt, env):
            (mnt / "new").write_text("n\n")
            with open(mnt / "g", "a") as f:  # a copy-up
                f.write("more\n")
            owners = {n: (os.stat(mnt / n).st_uid, os.stat(mnt / n).st_gid) for n in ("f", "g", "new", ".")}
            os.chown(mnt / "f", 1234, 1234)  # passed on; shown squashed all the same
            owners["f after chown"] = (os.stat(mnt / "f").st_uid, os.stat(mnt / "f").st_gid)
            seen[name] = owners
        assert (os.stat(upper / "g").st_uid, os.stat(upper / "g").st_gid) == (3, 4)  # the disk's owner kept
        assert (os.stat(upper / "f").st_uid, os.stat(upper / "f").st_gid) == (1234, 1234)
    assert set(seen["pyoverlay"].values()) == {shown}
    if "fuse-overlayfs" in seen:
        assert seen["fuse-overlayfs"] == seen["pyoverlay"]


def test_ro_and_a_lower_only_mount(tmp_path, env):
    lower, upper, work, mnt = _layers(tmp_path)
    r = _helper("-o", f"lowerdir={lower}:{upper}", mnt, env=env)  # containers/storage's read-only form
    try:
        assert r.returncode == 0, r.stderr
        assert _record(env, mnt)["config"]["read_only"] is True
        with pytest.raises(OSError):
            (mnt / "x").write_text("x")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        _cleanup(mnt, env)


def test_f_stays_in_the_foreground_and_d_logs_requests(tmp_path, env):
    lower, upper, work, mnt = _layers(tmp_path)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    for flag in ("-f", "-d"):
        proc = subprocess.Popen(
            [str(HELPER), flag, "-o", opts, str(mnt)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not mounts.is_mounted(mnt):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert (mnt / "f").read_text() == "lower\n"
            assert _record(env, mnt)["pid"] == proc.pid  # the helper itself serves
            subprocess.run(["umount", str(mnt)], check=True)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            if flag == "-d":
                # one line per request (the direct engine's, or pyfuse3's fs.py)
                assert "lookup node 1 pid" in err or "lookup 1 b'f'" in err, err[-2000:]
            else:
                assert "lookup node" not in err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _cleanup(mnt, env)


# --------------------------------------------------------------------------
# mount(8), fstab and umount(8), in a private mount namespace
# --------------------------------------------------------------------------


class PrivateNamespace:
    """A private mount namespace held by a sleeping process; ``run`` runs a command in it.
    This checkout's helper is bound over /usr/sbin/mount.fuse.pyoverlay there, so mount(8)
    runs the code under test whichever checkout's setup made the link."""

    def __init__(self, env):
        self.env = env
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sleep", "600"], stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        self.run("mount", "--bind", HELPER, SBIN_HELPER, check=True)

    def run(self, *argv, check=False) -> subprocess.CompletedProcess:
        r = subprocess.run(
            ["nsenter", "-t", str(self.holder.pid), "-m", *map(str, argv)],
            env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if check:
            assert r.returncode == 0, f"{argv}: {r.stderr}"
        return r

    def mountinfo(self) -> list:
        from overlayfs_py import mountinfo

        return mountinfo.mounts(f"/proc/{self.holder.pid}/mountinfo")

    def mount_at(self, path):
        found = [m for m in self.mountinfo() if m.mountpoint == str(path)]
        return found[-1] if found else None

    def close(self):
        for rec in _records(self.env):  # servers still running in the namespace
            if procfs.alive(rec["pid"]):
                os.kill(rec["pid"], signal.SIGKILL)
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def ns(env):
    assert SBIN_HELPER.exists(), f"{SBIN_HELPER} is missing: run scripts/setup as root (it links the helper there)"
    for tool in ("unshare", "nsenter", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    n = PrivateNamespace(env)
    yield n
    n.close()


def test_mount_t_fuse_pyoverlay_and_umount_ends_the_server(tmp_path, env, ns):
    lower, upper, work, mnt = _layers(tmp_path)
    r = ns.run(
        "mount", "-t", "fuse.pyoverlay", "pyoverlay", mnt, "-o", f"lowerdir={lower},upperdir={upper},workdir={work}"
    )
    assert r.returncode == 0, r.stderr
    m = ns.mount_at(mnt)
    assert m is not None and m.fstype == "fuse.pyoverlay" and m.source == "pyoverlay"
    assert not mounts.is_mounted(mnt)  # only in the private namespace
    assert ns.run("cat", mnt / "f", check=True).stdout == "lower\n"
    ns.run("sh", "-c", f"echo new > {mnt}/new", check=True)
    assert (upper / "new").read_text() == "new\n"
    pid = _record(env, mnt)["pid"]
    r = ns.run("umount", mnt)  # plain umount(8): the kernel ends the connection (ENODEV)
    assert r.returncode == 0, r.stderr
    assert wait_gone(pid, 30), "the server did not exit after umount(8)"
    assert _records(env) == []  # the server removed its record
    assert ns.mount_at(mnt) is None


def test_fstab_lines_through_mount_a_and_mount_merged(tmp_path, env, ns):
    lower, upper, work, mnt = _layers(tmp_path)
    upper2, work2, mnt2 = tmp_path / "upper2", tmp_path / "work2", tmp_path / "mnt2"
    for d in (upper2, work2, mnt2):
        d.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# private fstab of this test\n"
        f"pyoverlay {mnt} fuse.pyoverlay lowerdir={lower},upperdir={upper},workdir={work} 0 0\n"
        f"pyoverlay2 {mnt2} fuse.pyoverlay noauto,lowerdir={lower},upperdir={upper2},workdir={work2},ro 0 0\n"
    )
    r = ns.run("mount", "--fstab", fstab, "-a")
    assert r.returncode == 0, r.stderr
    assert ns.mount_at(mnt).fstype == "fuse.pyoverlay"
    assert ns.mount_at(mnt2) is None  # noauto
    assert ns.run("cat", mnt / "f", check=True).stdout == "lower\n"
    r = ns.run("mount", "--fstab", fstab, "-a")  # again: mounted already, nothing done
    assert r.returncode == 0, r.stderr
    assert len([m for m in ns.mountinfo() if m.mountpoint == str(mnt)]) == 1
    r = ns.run("mount", "--fstab", fstab, mnt2)  # the noauto line, by its mountpoint
    assert r.returncode == 0, r.stderr
    m2 = ns.mount_at(mnt2)
    assert m2 is not None and m2.source == "pyoverlay2" and "ro" in m2.options.split(",")
    assert _record(env, mnt2)["config"]["read_only"] is True
    pids = [_record(env, mnt)["pid"], _record(env, mnt2)["pid"]]
    for path in (mnt, mnt2):
        r = ns.run("umount", path)
        assert r.returncode == 0, r.stderr
    assert all(wait_gone(pid, 30) for pid in pids)
    assert _records(env) == []


def test_the_same_fstab_line_with_fuse_overlayfs(tmp_path, env, ns):
    """fuse-overlayfs through mount(8) (``fuse.fuse-overlayfs``, run by mount.fuse3) and
    pyoverlay (``fuse.pyoverlay``) from the same kind of line show the same tree."""
    if FUSE_OVERLAYFS is None:
        pytest.skip("needs fuse-overlayfs")
    lower, upper, work, mnt = _layers(tmp_path)
    (lower / "d").mkdir()
    (lower / "d" / "g").write_text("g\n")
    upper2, work2, mnt2 = tmp_path / "upper2", tmp_path / "work2", tmp_path / "mnt2"
    for d in (upper2, work2, mnt2):
        d.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"pyoverlay {mnt} fuse.pyoverlay lowerdir={lower},upperdir={upper},workdir={work} 0 0\n"
        f"fuse-overlayfs {mnt2} fuse.fuse-overlayfs lowerdir={lower},upperdir={upper2},workdir={work2} 0 0\n"
    )
    r = ns.run("mount", "--fstab", fstab, "-a")
    assert r.returncode == 0, r.stderr
    pid = _record(env, mnt)["pid"]
    script = "cd {0} && rm f && echo x > d/new && mv d/g d/h && find . | sort && cat d/new"
    ours = ns.run("sh", "-c", script.format(mnt), check=True).stdout
    theirs = ns.run("sh", "-c", script.format(mnt2), check=True).stdout
    assert ours == theirs
    for path in (mnt, mnt2):
        assert ns.run("umount", path).returncode == 0
    assert wait_gone(pid, 30)


# --------------------------------------------------------------------------
# pyoverlay mounts
# --------------------------------------------------------------------------


def _pyoverlay(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=60
    )


def test_pyoverlay_mounts_lists_live_mounts_and_drops_dead_ones(tmp_path, env, monkeypatch):
    lower, upper, work, mnt = _layers(tmp_path)
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    r = _pyoverlay("mounts", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    assert _helper("-o", f"lowerdir={lower},upperdir={upper},workdir={work},,volatile", mnt, env=env).returncode == 0
    try:
        r = _pyoverlay("mount", lower, mnt2, env=env)
        assert r.returncode == 0, r.stderr
        r = _pyoverlay("mounts", "--json", env=env)
        assert r.returncode == 0, r.stderr
        listed = {m["mountpoint"]: m for m in json.loads(r.stdout)}
        assert set(listed) == {str(mnt), str(mnt2)}
        one, two = listed[str(mnt)], listed[str(mnt2)]
        assert one["lowerdirs"] == [str(lower)] and one["upperdir"] == str(upper) and one["workdir"] == str(work)
        assert one["engine"] == mounts.engine_name() and one["volatile"] is True and one["read_only"] is False
        assert one["pid"] == _record(env, mnt)["pid"] and procfs.alive(one["pid"])
        assert one["trace_socket"] == _record(env, mnt)["trace_socket"] and os.path.exists(one["trace_socket"])
        assert two["upperdir"] is None and two["read_only"] is True
        assert one["aufs_whiteouts"] is True and two["aufs_whiteouts"] is False  # the helper's default
        text = _pyoverlay("mounts", env=env).stdout
        assert f"{mnt}  (pid {one['pid']}, engine {one['engine']}, read-write, volatile, aufs whiteouts)" in text
        assert f"  lower  {lower}" in text and f"  upper  {upper}" in text and f"  trace  {one['trace_socket']}" in text
        # a server killed with SIGKILL: its record is dropped (and removed), its mount stays dead
        os.kill(two["pid"], signal.SIGKILL)
        assert wait_gone(two["pid"], 30)
        r = _pyoverlay("mounts", "--json", env=env)
        assert [m["mountpoint"] for m in json.loads(r.stdout)] == [str(mnt)]
        assert [x["mountpoint"] for x in _records(env)] == [str(mnt)]
        # a record whose pid now names another process (this one, started at another time)
        monkeypatch.setenv("PYOVERLAY_STATE_DIR", env["PYOVERLAY_STATE_DIR"])
        from overlayfs_py import state

        stale = dict(_record(env, mnt), mountpoint=str(tmp_path / "old"), pid=os.getpid(), start_time=1)
        Path(state._path(stale["mountpoint"])).write_text(json.dumps(stale))
        assert len(_records(env)) == 2
        r = _pyoverlay("mounts", "--json", env=env)
        assert [m["mountpoint"] for m in json.loads(r.stdout)] == [str(mnt)]
        assert [x["mountpoint"] for x in _records(env)] == [str(mnt)]
    finally:
        for path in (mnt, mnt2):
            _pyoverlay("umount", path, env=env)
            _cleanup(path, env)
    r = _pyoverlay("mounts", env=env)
    assert r.returncode == 0 and r.stdout == ""
