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

import errno
import os

import pytest

from helpers import mounts
from helpers.nodefd import OPS, attack_argv, build_layers, host_state, make_host_file, run_bounded

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]


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


def test_budget_and_fd_cache_sizes():
    """The budget is what was asked (nodes do not each need a descriptor); the node fd cache
    and the directory fd cache fit RLIMIT_NOFILE with room for open files."""
    from overlayfs_py.budget import node_fd_cap
    from overlayfs_py.fs import clamp_node_budget
    from overlayfs_py.layers import DirFdCache

    cache = DirFdCache()
    assert clamp_node_budget(200_000, 1_048_576, cache) == 200_000 and cache.capacity == 2048
    cache = DirFdCache()
    assert clamp_node_budget(200_000, 20_000, cache) == 200_000
    assert node_fd_cap(20_000, cache.capacity) + cache.capacity + 1024 <= 20_000
    cache = DirFdCache()
    assert clamp_node_budget(0, 1024, cache) == 0  # 0: no budget
    assert 0 < node_fd_cap(1024, cache.capacity) + cache.capacity <= 1024 - 64
    for limit in (128, 200, 300, 400, 512):  # small limits too: the server's own and open files fit
        cache = DirFdCache()
        clamp_node_budget(200_000, limit, cache)
        assert 16 <= node_fd_cap(limit, cache.capacity) <= limit - cache.capacity - 64, limit


def _ident(path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def test_node_fds_are_a_cache_and_a_swapped_object_is_never_reached(tmp_path):
    """Without FUSE, with room for 40 node fds: lookups of 320 files keep at most 40 held;
    every node still reaches its own object (a given-up fd is opened again at the name and
    checked); a node whose object was replaced behind the server's back (another file put
    at its name in the upper layer, as the upper's owner could) gets no fd (EBADF for its
    operations), never the other object; and a node renamed over while held keeps its fd
    (nothing else reaches its object), however many others come and go."""
    from helpers.core import build_core

    lo, up, wk = tmp_path / "lo", tmp_path / "up", tmp_path / "wk"
    (lo / "d").mkdir(parents=True)
    for i in range(300):
        (lo / "d" / f"f{i}").write_text(f"lower {i}\n")
    (up / "u").mkdir(parents=True)
    for i in range(20):
        (up / "u" / f"g{i}").write_text(f"upper {i}\n")
    wk.mkdir()
    core = build_core([lo], up, wk)
    ov, inodes = core.view, core.view.inodes
    inodes.fd_cap = 40
    try:
        nodes = {}
        for sub, names in ((b"d", [f"f{i}" for i in range(300)]), (b"u", [f"g{i}" for i in range(20)])):
            dnode, _ = ov.lookup(inodes.root, sub)
            inodes.ref(dnode)
            for name in names:
                node, _ = ov.lookup(dnode, name.encode())
                inodes.ref(node)
                nodes[name] = node
                assert inodes.held <= 40
        assert sum(n.holds_fd for n in nodes.values()) <= 40
        for i in (0, 7, 150, 299):  # given up long ago: opened again, checked, the right object
            node = nodes[f"f{i}"]
            st = os.fstat(node.fd)
            assert (st.st_dev, st.st_ino) == _ident(lo / "d" / f"f{i}")
            fd = os.open(f"/proc/self/fd/{node.fd}", os.O_RDONLY)
            try:
                assert os.read(fd, 100) == f"lower {i}\n".encode()
            finally:
                os.close(fd)
        # g0 is used no more: others push its fd out; then its object is replaced
        # outside the mount, and the node must not reach the new file
        victim = nodes["g0"]
        for i in range(200, 260):
            assert nodes[f"f{i}"].fd >= 0
        assert not victim.holds_fd
        os.unlink(up / "u" / "g0")
        (up / "u" / "g0").write_text("planted\n")
        assert victim.fd == -1
        with pytest.raises(OSError) as e:
            ov.getattr(victim)
        assert e.value.errno == errno.EBADF
        # a node no name leads to (renamed over, as the server's rename detaches it)
        # keeps its fd and its object, however many others come and go
        kept = nodes["g5"]
        assert kept.fd >= 0
        os.rename(up / "u" / "g6", up / "u" / "g5")
        inodes.detach(kept.parent, kept.name)
        for i in range(300):
            assert nodes[f"f{i}"].fd >= 0
        assert kept.holds_fd and os.fstat(kept.fd).st_size == len("upper 5\n")
    finally:
        core.destroy()


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
