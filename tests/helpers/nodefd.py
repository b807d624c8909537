"""Operations through an fd whose name was replaced since (issue 13, items 1 and 6).

A process opens a file on a mount, its name is then taken by something else (a symlink to
a file outside the mount, a FIFO, another file) or removed, and the process acts through
its fd: fchmod, fchown, (f)truncate, xattrs, utimes, a re-open through /proc/self/fd/N.
The kernel's overlay acts on the open file's own inode; so must pyoverlay, and the file
the symlink names must stay untouched.

``ATTACK`` runs in the mount's ``tmp`` directory (sticky, world-writable), as root or as an
ordinary user, and prints one JSON object; :func:`run_bounded` runs it with a deadline and
aborts the FUSE connection when the server hangs (a process waiting on a hung FUSE server
cannot be killed), so a regression fails instead of hanging the test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from . import mounts

# the operations each attack acts through (tests/test_security_nodefd.py, the rootless one)
OPS = [
    "fchmod",
    "fchown",
    "ftruncate",
    "truncate_opath",
    "setxattr",
    "removexattr",
    "utimes",
    "reopen",
    "unlinked",
    "other",
    "fifo",
]


ATTACK = r"""
import errno, json, os, stat, sys
op, host, where = sys.argv[1], sys.argv[2], sys.argv[3]
root = os.geteuid() == 0
name = "g" if where == "upper" else "lf"   # lf: a file of the lower layer
if where == "upper":
    with open(name, "w") as f:
        f.write("orig\n")
if op == "removexattr":
    os.setxattr(name, "user.t", b"1")
flags = {"ftruncate": os.O_RDWR, "truncate_opath": os.O_PATH}.get(op, os.O_RDONLY)
fd = os.open(name, flags)
if op == "unlinked":                    # removed, and a new file made at the name
    os.unlink(name)
    with open(name, "w") as f:
        f.write("other\n")
elif op == "fifo":                      # exec 3<f; mkfifo p; mv -f p f
    os.mkfifo("p")
    os.rename("p", name)
elif op == "other":                     # another file of the caller's renamed over it
    with open("h", "w") as f:
        f.write("other\n")
    os.rename("h", name)
else:                                   # ln -s /some/root/file s; mv -f s g
    os.symlink(host, "s")
    os.rename("s", name)
out = {}
try:
    if op == "fchmod":
        os.fchmod(fd, 0o4755)
    elif op == "fchown":
        os.fchown(fd, 1234 if root else os.getuid(), 1234 if root else os.getgid())
    elif op == "ftruncate":
        os.ftruncate(fd, 1)
    elif op in ("truncate_opath", "other"):
        os.truncate("/proc/self/fd/%d" % fd, 1)
    elif op == "setxattr":
        os.setxattr(fd, "user.t", b"v")
    elif op == "removexattr":
        os.removexattr(fd, "user.t")
    elif op == "utimes":
        os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
    elif op in ("reopen", "unlinked"):
        w = os.open("/proc/self/fd/%d" % fd, os.O_WRONLY | os.O_APPEND)
        os.write(w, b"more\n")
        os.close(w)
    elif op == "fifo":                  # cat /proc/self/fd/3
        r = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY)
        out["read"] = os.read(r, 100).decode()
        os.close(r)
    out["result"] = "ok"
except OSError as e:
    out["result"] = errno.errorcode[e.errno]
st = os.fstat(fd)
out["fd"] = {"mode": oct(st.st_mode), "uid": st.st_uid == (1234 if root and op == "fchown" else os.getuid()),
             "size": st.st_size, "nlink": st.st_nlink}
if op == "utimes":
    out["fd"]["mtime"] = st.st_mtime_ns
try:
    r = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_NONBLOCK)
    out["fd"]["data"] = os.read(r, 100).decode()
    out["fd"]["xattrs"] = sorted(x for x in os.listxattr(r) if x.startswith("user."))
    os.close(r)
except OSError as e:
    out["fd"]["data"] = errno.errorcode[e.errno]
lst = os.lstat(name)
out["name"] = stat.filemode(lst.st_mode)[0] + (os.readlink(name) if stat.S_ISLNK(lst.st_mode) else "")
if stat.S_ISREG(lst.st_mode):
    with open(name) as f:
        out["name"] += ":" + f.read()
print(json.dumps(out))
"""


def build_layers(base, tag: str) -> tuple:
    """lower (a sticky world-writable ``tmp`` with a lower file ``lf``), upper, workdir."""
    lo, up, wk = base / f"{tag}-lo", base / f"{tag}-up", base / f"{tag}-wk"
    for d in (lo, up, wk):
        d.mkdir()
    (lo / "tmp").mkdir()
    (lo / "tmp" / "lf").write_text("orig\n")
    os.chmod(lo / "tmp" / "lf", 0o666)
    os.chmod(lo / "tmp", 0o1777)
    return lo, up, wk


def make_host_file(path) -> dict:
    """A root-owned file outside every mount: what a symlink swapped in points at."""
    path.write_text("host secret\n")
    os.chown(path, 0, 0)
    os.chmod(path, 0o644)
    os.setxattr(path, "user.tag", b"host")
    return host_state(path)


def host_state(path) -> dict:
    st = os.lstat(path)
    return {
        "mode": oct(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
        "mtime": st.st_mtime_ns,
        "data": path.read_text(),
        "xattrs": {x: os.getxattr(path, x) for x in os.listxattr(path)},
    }


def run_bounded(argv, mount, timeout: float = 20.0, **kw) -> dict:
    """Run *argv* (printing one JSON object); ``{"result": "hung"}`` if it did not finish
    within *timeout* (the FUSE connection of *mount* is then aborted, so it can end)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        mounts.abort_fuse_connection(mount.path)
        proc.kill()
        proc.communicate()
        return {"result": "hung"}
    if proc.returncode != 0:
        return {"result": f"exit {proc.returncode}", "stderr": err.strip().splitlines()[-1:]}
    try:
        return json.loads(out)
    except ValueError:
        return {"result": "no JSON", "stdout": out, "stderr": err.strip().splitlines()[-1:]}


def attack_argv(op: str, host, where: str) -> list[str]:
    return [sys.executable, "-c", ATTACK, op, os.fspath(host), where]
