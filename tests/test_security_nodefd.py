"""Issue 13, items 1 and 6: an operation through an open file whose name was since replaced
acts on that file, never on what the name leads to now (a symlink to a host file, a FIFO,
another file), exactly as the kernel's overlay does.

Each case runs the same sequence (tests/helpers/nodefd.py) on a kernel overlay and on
pyoverlay, each over its own identical layers, and compares what the process saw: the
result, and the open file's mode, owner, size, data, xattrs (and times for utimes). The
file a swapped-in symlink points at must be left exactly as it was. The same attacks as
an ordinary user on a root mount are in tests/rootless/test_security_nodefd_user.py.
Also: the node budget is clamped to the fd limit (every node holds an fd).
"""

from __future__ import annotations

import os
import re

import pytest

from helpers import mounts
from helpers.nodefd import attack_argv, build_layers, host_state, make_host_file, run_bounded

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]

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


def _run(tmp_path, kind: str, op: str, where: str, host) -> dict:
    lo, up, wk = build_layers(tmp_path, kind)
    cls = mounts.KernelOverlay if kind == "kernel" else mounts.PyoverlayMount
    extra = {} if kind == "kernel" else {"watchdog": 60}
    with cls([lo], tmp_path / f"{kind}-m", up, wk, **extra) as m:
        out = run_bounded(attack_argv(op, host, where), m, cwd=m.path / "tmp")
        if kind == "pyoverlay" and out["result"] != "hung":
            # the server still answers
            assert os.path.isdir(m.path / "tmp") and not m.aborted
    return out


@pytest.mark.parametrize("op", OPS)
def test_op_through_fd_of_a_replaced_name_acts_on_the_open_file(tmp_path, op):
    host = tmp_path / "host"
    before = make_host_file(host)
    want = _run(tmp_path, "kernel", op, "upper", host)
    got = _run(tmp_path, "pyoverlay", op, "upper", host)
    assert host_state(host) == before, "the file the swapped-in symlink names was changed"
    assert got == want


@pytest.mark.parametrize("op", ["fifo", "reopen", "fchmod"])
def test_lower_file_replaced_while_open(tmp_path, op):
    """The open file is a lower one (not copied up): a FIFO or a symlink renamed over its
    name. Reading it through /proc/self/fd reads the original (the kernel's answer), never
    blocks the server; a change through it fails as the kernel's (the name is taken).
    f323dfb passes these too (it re-opened the name in the lower layer, which never
    changes): they guard the node-fd path for lower files, against the kernel."""
    host = tmp_path / "host"
    before = make_host_file(host)
    want = _run(tmp_path, "kernel", op, "lower", host)
    got = _run(tmp_path, "pyoverlay", op, "lower", host)
    assert host_state(host) == before
    assert got == want


def test_fifo_swapped_in_does_not_hang_the_server(tmp_path):
    """Item 6 on its own: `exec 3<f; mkfifo p; mv -f p f; cat /proc/self/fd/3` reads f."""
    lo, up, wk = build_layers(tmp_path, "p")
    with mounts.PyoverlayMount([lo], tmp_path / "m", up, wk, watchdog=60) as m:
        out = run_bounded(attack_argv("fifo", tmp_path / "none", "upper"), m, timeout=15, cwd=m.path / "tmp")
        assert out["result"] == "ok" and out["read"] == "orig\n", out
        # and later requests are served
        assert sorted(os.listdir(m.path / "tmp")) == ["g", "lf"]
        assert (m.path / "tmp" / "lf").read_text() == "orig\n"


def test_node_budget_is_clamped_to_the_fd_limit(tmp_path):
    """A budget beyond what RLIMIT_NOFILE allows is clamped (every node holds an fd), and
    the server says so in its log."""
    import resource

    lo = tmp_path / "lo"
    lo.mkdir()
    log = tmp_path / "server.log"
    with mounts.PyoverlayMount([lo], tmp_path / "m", options=["max_nodes=100000000"], log_path=log) as m:
        os.listdir(m.path)
    text = log.read_text()
    found = re.search(r"node budget (\d+) \(asked: 100000000\): RLIMIT_NOFILE is (\d+)", text)
    assert found, text[-2000:]
    budget, limit = int(found.group(1)), int(found.group(2))
    assert limit >= resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert 0 < budget < limit


def test_clamp_arithmetic():
    from overlayfs_py.fs import clamp_node_budget
    from overlayfs_py.layers import DirFdCache

    cache = DirFdCache()
    assert clamp_node_budget(200_000, 1_048_576, cache) == 200_000 and cache.capacity == 2048
    cache = DirFdCache()
    b = clamp_node_budget(200_000, 20_000, cache)
    assert b + cache.capacity + 1024 <= 20_000 and b * 5 // 4 + cache.capacity + 1024 <= 20_000
    cache = DirFdCache()
    b = clamp_node_budget(0, 1024, cache)  # 0: as many as fit
    assert b > 0 and b * 5 // 4 + cache.capacity <= 1024 - 64


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_node_fds_live_and_die_with_their_nodes(tmp_path):
    """Without FUSE: every node holds one fd of its own object (checked by inode), the
    table closes it when the node is dropped, and destroy closes the rest."""
    from helpers.core import build_core

    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    for layer, n in ((l1, 30), (l2, 50)):
        (layer / "d").mkdir(parents=True)
        for i in range(n):
            (layer / "d" / f"f{i}").write_text(layer.name)
    os.symlink("/etc/passwd", l1 / "d" / "ln")
    base = _open_fds()
    ov = build_core([l1, l2]).view
    try:
        with_stack = _open_fds()
        d, _ = ov.lookup(ov.inodes.root, b"d")
        ov.inodes.ref(d)
        seen = []
        fh = ov.opendir(d)
        for _, entry in ov.readdir(fh, 0):
            if entry.node is not None:
                ov.inodes.ref(entry.node)
                seen.append(entry.node)
        ov.release(fh)
        assert len(seen) == 51
        for node in seen:
            real = (
                (l1 if node.name in {f"f{i}".encode() for i in range(30)} | {b"ln"} else l2)
                / "d"
                / os.fsdecode(node.name)
            )
            st, lst = os.fstat(node.fd), os.lstat(real)
            assert (st.st_dev, st.st_ino) == (lst.st_dev, lst.st_ino)
        assert ov.readlink(next(n for n in seen if n.name == b"ln")) == b"/etc/passwd"
        assert _open_fds() >= with_stack + 52  # the nodes' fds (and the dir-fd cache's)
        for node in seen + [d]:
            ov.inodes.forget(node.id, 1)
        assert len(ov.inodes) == 1
        assert _open_fds() <= with_stack + 2  # at most the dir-fd cache's
    finally:
        ov.destroy()
    assert _open_fds() == base


_DEAD_DIR = r"""
import errno, json, os, sys
os.chdir(sys.argv[1])
os.mkdir("d"); os.mkdir("lowerdir/sub") if False else None
out = {}
for which in ("d", "ld"):           # ld: a directory of the lower layer
    fd = os.open(which, os.O_RDONLY | os.O_DIRECTORY)
    if which == "ld":
        for n in os.listdir(which):
            os.unlink(os.path.join(which, n))
    os.rmdir(which)
    os.mkdir(which)                 # a new directory takes the name
    with open(os.path.join(which, "inside-new"), "w"):
        pass
    r = {}
    for op in ("list", "create", "mkdir", "stat"):
        try:
            if op == "list":
                r[op] = sorted(os.listdir(fd))
            elif op == "create":
                os.close(os.open("x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)); r[op] = "ok"
            elif op == "mkdir":
                os.mkdir("y", dir_fd=fd); r[op] = "ok"
            else:
                r[op] = os.fstat(fd).st_nlink
        except OSError as e:
            r[op] = errno.errorcode[e.errno]
    r["new"] = sorted(os.listdir(which))
    out[which] = r
print(json.dumps(out))
"""


def test_removed_directory_takes_no_entries(tmp_path):
    """A directory removed (and its name reused) while a process holds it: nothing is
    made in or listed from the new directory through the old one (the kernel's answers)."""
    import subprocess
    import sys

    got = {}
    for kind in ("kernel", "pyoverlay"):
        lo, up, wk = build_layers(tmp_path, kind)
        (lo / "ld").mkdir()
        (lo / "ld" / "f").write_text("x")
        cls = mounts.KernelOverlay if kind == "kernel" else mounts.PyoverlayMount
        with cls([lo], tmp_path / f"{kind}-m", up, wk) as m:
            r = subprocess.run(
                [sys.executable, "-c", _DEAD_DIR, str(m.path)], capture_output=True, text=True, timeout=60
            )
            assert r.returncode == 0, r.stderr
            got[kind] = r.stdout
    assert got["pyoverlay"] == got["kernel"]
