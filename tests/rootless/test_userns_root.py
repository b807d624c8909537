"""Root inside a user namespace: ``unshare --user --map-root-user --mount`` as the ordinary
user pyoverlay-test, then ``pyoverlay mount`` with nothing set by hand -- the case of
podman's rootless mount program (and ``podman unshare``).

uid 0 there is the user outside, so pyoverlay must not take it for the host's root:

* the mount record goes where that user may write: ``$XDG_RUNTIME_DIR/pyoverlay`` when that
  is the user's own, else ``/tmp/pyoverlay-<uid outside>`` (made 0700; one that is not the
  user's is refused), never the host's /run (on 30ebaa9: ``Permission denied
  (/run/pyoverlay/mount-....json....tmp)``);
* the upper gets ``user.overlay.*`` private xattrs and char 0/0 whiteouts, the same upper
  a kernel overlay mounted with ``-o userxattr`` in the same kind of namespace writes for
  the same operations (compared here, file by file);
* FUSE is mounted with mount(2) in the namespace (no fusermount3, no host root), and
  ``pyoverlay umount`` there unmounts and waits for the server.

With a map of the user's subordinate ids as well (``--map-users``, as podman maps), a
``chown`` to a container uid lands as the matching subordinate id in the upper, as with the
kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from helpers import mounts
from helpers.rootless import VENV_BIN

#: run as the user inside ``unshare --user --map-root-user --mount [--map-users ...]``:
#: argv: pyoverlay, test dir, lower, then (upper, work, merged) for pyoverlay and for the
#: kernel, and where the state dir is expected ("xdg": $XDG_RUNTIME_DIR is set; "tmp": it is
#: not, and /tmp is a private tmpfs so /tmp/pyoverlay-UID is the test's)
_IN_NS = r"""
import ctypes, hashlib, json, os, stat, subprocess, sys
from overlayfs_py import procfs
from overlayfs_py.mountinfo import is_mounted, mounts
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND = 4096
def mount(src, dst, fstype, flags, data):
    if libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount {dst}")

pyoverlay, testdir, lo, up, wk, mnt, kup, kwk, kmnt, where, uid_outside = sys.argv[1:12]
out = {"euid": os.geteuid(), "uid_map": open("/proc/self/uid_map").read().split()}
if where == "tmp":
    # a private /tmp: /tmp/pyoverlay-UID is then the test's; the test's directory (and the
    # checkout, when it lives under /tmp: its .venv runs pyoverlay) are bound back at their
    # own paths
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(pyoverlay))))
    keep = [(d, os.open(d, os.O_PATH | os.O_DIRECTORY))
            for d in (testdir, checkout) if d == "/tmp" or d.startswith("/tmp/")]
    mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777")
    for d, fd in keep:
        os.makedirs(d, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", d, None, MS_BIND, None)
        os.close(fd)
    if sys.argv[12:] == ["planted"]:  # someone else's directory in its place: refused
        os.mkdir(f"/tmp/pyoverlay-{uid_outside}", 0o777)
        os.chmod(f"/tmp/pyoverlay-{uid_outside}", 0o777)
        r = subprocess.run([pyoverlay, "mount", "--workdir", wk, lo, up, mnt], capture_output=True, text=True)
        out.update(planted_rc=r.returncode, planted_err=r.stderr,
                   planted_mounted=is_mounted(mnt))
        print(json.dumps(out))
        sys.exit(0)
    expected = f"/tmp/pyoverlay-{uid_outside}"
else:
    expected = os.path.join(os.environ["XDG_RUNTIME_DIR"], "pyoverlay")

def ops(m):
    with open(os.path.join(m, "a")) as f:
        assert f.read() == "a\n"
    with open(os.path.join(m, "keep", "k"), "a") as f:   # copy-up of a file and its dir
        f.write("more\n")
    os.unlink(os.path.join(m, "a"))                       # whiteout
    os.unlink(os.path.join(m, "d", "b"))
    os.unlink(os.path.join(m, "d", "sub", "c"))
    os.rmdir(os.path.join(m, "d", "sub"))
    os.rmdir(os.path.join(m, "d"))                        # whiteout of a directory
    os.mkdir(os.path.join(m, "d"))                        # then an opaque one
    with open(os.path.join(m, "d", "f"), "w") as f:
        f.write("fresh\n")
    os.rename(os.path.join(m, "old"), os.path.join(m, "renamed"))   # rename of a lower file
    with open(os.path.join(m, "new"), "w") as f:
        f.write("new\n")
    os.mkdir(os.path.join(m, "newdir"))
    os.symlink("new", os.path.join(m, "newln"))
    os.setxattr(os.path.join(m, "x"), "user.note", b"hi")     # copy-up keeps xattrs
    if os.environ.get("CHOWN_TO"):
        os.chown(os.path.join(m, "new"), int(os.environ["CHOWN_TO"]), int(os.environ["CHOWN_TO"]))
    return sorted(os.listdir(m))

def mounted(m):
    return is_mounted(m)

argv = [pyoverlay, "mount"]
if os.environ.get("PYOVERLAY_ENGINE"):
    argv += ["-o", "engine=" + os.environ["PYOVERLAY_ENGINE"]]
r = subprocess.run([*argv, "--log", os.path.join(testdir, "server.log"), "--workdir", wk, lo, up, mnt],
                   capture_output=True, text=True)
if r.returncode != 0:
    sys.exit("pyoverlay mount: " + r.stderr)
out["fstype"] = [m.fstype for m in mounts() if m.mountpoint == mnt]
out["listing"] = ops(mnt)
st = os.stat(expected)
out["state_dir"] = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                    "records": sorted(n for n in os.listdir(expected) if n.endswith(".json"))}
rec = os.path.join(expected, out["state_dir"]["records"][0])
with open(rec) as f:
    data = json.load(f)
out["record"] = {"mountpoint": data["mountpoint"], "userxattr": data["config"]["userxattr"]}
pid = data["pid"]
r = subprocess.run([pyoverlay, "umount", mnt], capture_output=True, text=True)
if r.returncode != 0:
    sys.exit("pyoverlay umount: " + r.stderr)
def alive(pid):  # a zombie has exited (its parent, init, reaps it)
    return procfs.alive(pid)
out["after"] = {"mounted": mounted(mnt), "server_alive": alive(pid),
                "records": sorted(n for n in os.listdir(expected) if not n.startswith("."))}
if where == "tmp":
    os.rmdir(expected)  # empty now; it goes with the tmpfs anyway

# the kernel's overlay, mounted the way the kernel needs it in a user namespace
mount("overlay", kmnt, "overlay", 0, f"userxattr,lowerdir={lo},upperdir={kup},workdir={kwk}")
try:
    out["kernel_listing"] = ops(kmnt)
finally:
    libc.umount2(kmnt.encode(), 0)
print(json.dumps(out))
"""


def _layout(user):
    dirs = user.mkdirs("lo", "up", "wk", "mnt", "kup", "kwk", "kmnt")
    r = user.sh(
        "mkdir -p lo/d/sub lo/keep && echo a > lo/a && echo b > lo/d/b && echo c > lo/d/sub/c"
        " && echo old > lo/old && echo x > lo/x && echo k > lo/keep/k && setfattr -n user.tag -v lower lo/x"
    )
    assert r.returncode == 0, r.stderr
    return dirs


def _unshare(user, extra_maps: bool) -> list[str]:
    argv = ["unshare", "--user", "--map-root-user", "--mount"]
    if extra_maps:
        (start, count), *_ = user.subuid_ranges()
        gstart = _subgid_start(user)
        argv += [f"--map-users={start},1,{min(count, 65536)}", f"--map-groups={gstart},1,{min(count, 65536)}"]
    return argv


def _subgid_start(user) -> int:
    with open("/etc/subgid") as f:
        for line in f:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[0] in (user.name, str(user.uid)):
                return int(parts[1])
    raise AssertionError("no /etc/subgid range")


def _run_in_ns(user, where: str, *, extra_maps: bool = False, env: dict | None = None, planted: bool = False):
    lo, up, wk, mnt, kup, kwk, kmnt = _layout(user)
    script = user.dir / "in_ns.py"
    script.write_text(_IN_NS)
    e = user.env(env)
    del e["PYOVERLAY_STATE_DIR"]  # the default is what is tested
    if where == "xdg":
        runtime = user.mkdirs("runtime")[0]
        os.chmod(runtime, 0o700)
        e["XDG_RUNTIME_DIR"] = str(runtime)
    else:
        e.pop("XDG_RUNTIME_DIR", None)
    args = [VENV_BIN / "pyoverlay", user.dir, lo, up, wk, mnt, kup, kwk, kmnt, where, user.uid]
    if planted:
        args.append("planted")
    argv = user.argv([*_unshare(user, extra_maps), VENV_BIN / "python", script, *args])
    r = subprocess.run(argv, capture_output=True, text=True, cwd=user.dir, env=e, timeout=120)
    log = user.dir / "server.log"
    assert r.returncode == 0, r.stderr + (log.read_text() if log.exists() else "")
    return json.loads(r.stdout.strip().splitlines()[-1]), (lo, up, wk, mnt, kup, kwk, kmnt)


def _upper(root: Path) -> dict:
    """Each entry of an upper dir as the kernel's overlay reads it: type, whiteout device,
    owner, content, link target, xattrs (``overlay.origin`` as present/absent, ``impure``
    dropped: the kernel's bookkeeping of a directory holding copied-up entries)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rec: dict = {"type": stat.S_IFMT(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISCHR(st.st_mode):
                rec["rdev"] = st.st_rdev
            elif stat.S_ISREG(st.st_mode):
                rec["sha"] = hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            xattrs = {}
            for x in os.listxattr(p, follow_symlinks=False):
                if x.endswith("overlay.impure"):
                    continue
                v = os.getxattr(p, x, follow_symlinks=False)
                xattrs[x] = "present" if x.endswith("overlay.origin") else v.decode(errors="replace")
            rec["xattrs"] = xattrs
            out[os.path.relpath(p, root)] = rec
    return out


def _host_records() -> list[str]:
    """The host's mount records, as text (other tests' servers remove theirs meanwhile)."""
    out = []
    for p in Path("/run/pyoverlay").glob("mount-*.json"):
        with contextlib.suppress(FileNotFoundError):
            out.append(p.read_text(errors="replace"))
    return out


@pytest.mark.parametrize("where", ["xdg", "tmp"])
def test_userns_root_mounts_records_in_the_users_dir_and_writes_userxattr(user, where):
    seen, (lo, up, wk, mnt, kup, kwk, kmnt) = _run_in_ns(user, where)
    assert seen["euid"] == 0 and seen["uid_map"] == ["0", str(user.uid), "1"], seen
    assert seen["fstype"] == ["fuse.pyoverlay"], seen
    # the record: in the user's directory (0700, the user's), userxattr decided by itself
    assert seen["state_dir"]["mode"] == 0o700 and seen["state_dir"]["uid"] == 0, seen
    assert len(seen["state_dir"]["records"]) == 1, seen
    assert seen["record"] == {"mountpoint": str(mnt), "userxattr": True}, seen
    # umount there: unmounted, the server gone, its record and trace socket too
    assert seen["after"] == {"mounted": False, "server_alive": False, "records": []}, seen
    if mounts.engine_name() == "direct":  # its log says how it mounted: no fusermount3, no host root
        assert "with mount(2)" in (user.dir / "server.log").read_text()
    if where == "xdg":  # the directory is the user's outside the namespace too
        st = os.stat(user.dir / "runtime" / "pyoverlay")
        assert st.st_uid == user.uid and stat.S_IMODE(st.st_mode) == 0o700
    assert not any(str(mnt) in text for text in _host_records())

    # the same operations on the kernel's overlay (-o userxattr, same namespace): same view,
    # same upper
    assert seen["listing"] == seen["kernel_listing"] == ["d", "keep", "new", "newdir", "newln", "renamed", "x"]
    ours, kernels = _upper(up), _upper(kup)
    assert ours == kernels, json.dumps({"pyoverlay": ours, "kernel": kernels}, indent=1, sort_keys=True)
    assert ours["a"]["type"] == stat.S_IFCHR and ours["a"]["rdev"] == 0  # a char 0/0 whiteout
    assert ours["d"]["xattrs"].get("user.overlay.opaque") == "y"
    assert ours["x"]["xattrs"]["user.note"] == "hi" and ours["new"]["uid"] == user.uid
    assert not [p for p, r in ours.items() if any(x.startswith("trusted.") for x in r["xattrs"])]
    assert not mounts.mounts_under(user.dir)


def test_userns_root_with_subordinate_ids_chowns_like_the_kernel(user):
    if not user.subuid_ranges() or shutil.which("newuidmap") is None:
        pytest.skip("needs /etc/subuid ranges for pyoverlay-test and newuidmap (scripts/setup)")
    if "--map-users" not in subprocess.run(["unshare", "--help"], capture_output=True, text=True).stdout:
        pytest.skip("needs unshare --map-users (util-linux 2.38 or later)")
    (start, _count), *_ = user.subuid_ranges()
    seen, (lo, up, *_rest, kup, _kwk, _kmnt) = _run_in_ns(user, "xdg", extra_maps=True, env={"CHOWN_TO": "1000"})
    assert seen["uid_map"][:3] == ["0", str(user.uid), "1"] and seen["uid_map"][3:5] == ["1", str(start)], seen
    assert seen["after"]["mounted"] is False and seen["after"]["records"] == [], seen
    ours, kernels = _upper(up), _upper(kup)
    assert ours == kernels, json.dumps({"pyoverlay": ours, "kernel": kernels}, indent=1, sort_keys=True)
    assert ours["new"]["uid"] == start + 999  # container uid 1000 = subordinate id 1000 - 1


def test_userns_root_refuses_a_state_dir_that_is_not_its_own(user):
    """/tmp/pyoverlay-UID made by someone else first (here: writable by everyone): one line,
    exit 1, nothing mounted."""
    seen, _dirs = _run_in_ns(user, "tmp", planted=True)
    assert seen["planted_rc"] == 1, seen  # as for any state dir refused (test_security_dirs.py)
    err = seen["planted_err"]
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"/tmp/pyoverlay-{user.uid} is writable by other users" in err, err
    assert not seen["planted_mounted"]
