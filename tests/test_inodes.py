"""Node lifetime without FUSE: the Overlay and its InodeTable on real layers.

The kernel's FORGETs must free every node it no longer holds, so a walk of any tree
keeps memory bounded; readdir entries the kernel did not take are dropped at once.
"""

from __future__ import annotations

import gc
import os
import tracemalloc

from helpers.core import build_core
from overlayfs_py.inodes import ROOT_ID


def _tree(root, dirs=20, files=50):
    for d in range(dirs):
        p = root / f"d{d}"
        p.mkdir(parents=True)
        for f in range(files):
            (p / f"f{f}").write_bytes(b"")


def _overlay(tmp_path):
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    _tree(l1)
    _tree(l2, dirs=10, files=80)
    return build_core([l1, l2]).view


def test_forget_frees_every_node_of_a_walk(tmp_path):
    ov = _overlay(tmp_path)
    try:
        seen = []
        root = ov.inodes.root
        for name in sorted(os.listdir(tmp_path / "l1")):
            d, _ = ov.lookup(root, name.encode())
            ov.inodes.ref(d)
            seen.append(d)
            fh = ov.opendir(d)
            for _, entry in ov.readdir(fh, 0):
                if entry.node is not None:
                    ov.inodes.ref(entry.node)
                    seen.append(entry.node)
            ov.release(fh)
        # root + 20 dirs; d0..d9 merge 80 names (l2's f0..f79 cover l1's f0..f49), d10..d19 hold 50
        assert len(ov.inodes) == 1 + 20 + 10 * 80 + 10 * 50
        # the kernel forgets children before parents; any order must work
        for node in reversed(seen):
            ov.inodes.forget(node.id, 1)
        assert len(ov.inodes) == 1  # only the root is left
    finally:
        ov.destroy()


def test_readdir_entry_not_taken_is_dropped(tmp_path):
    ov = _overlay(tmp_path)
    try:
        d, _ = ov.lookup(ov.inodes.root, b"d0")
        ov.inodes.ref(d)
        fh = ov.opendir(d)
        for _, entry in ov.readdir(fh, 0):
            if entry.node is not None:  # the reply buffer was full: the kernel took none
                ov.inodes.maybe_drop(entry.node)
        ov.release(fh)
        assert len(ov.inodes) == 2  # root and d0
        ov.inodes.forget(d.id, 1)
        assert len(ov.inodes) == 1
    finally:
        ov.destroy()


def test_shed_offers_the_oldest_files_once_never_dirs(tmp_path):
    """Over the node budget, the oldest file nodes are offered for the kernel to drop,
    each once; directories (dropping one prunes its subtree) and unlinked-but-open
    nodes never; nothing is freed until the kernel's FORGET."""
    ov = _overlay(tmp_path)
    try:
        root = ov.inodes.root
        d0, _ = ov.lookup(root, b"d0")
        ov.inodes.ref(d0)
        files = []
        for i in range(10):
            n, _ = ov.lookup(d0, f"f{i}".encode())
            ov.inodes.ref(n)
            files.append(n)
        assert len(ov.inodes) == 12
        drops = ov.inodes.shed(keep=8)
        assert drops == [(d0.id, f"f{i}".encode()) for i in range(4)]  # oldest first, files only
        assert len(ov.inodes) == 12  # only the kernel frees
        assert ov.inodes.shed(keep=8)[:1] == [(d0.id, b"f4")]  # each offered once
        # a name removed from the tree (unlinked, still open) is not offered
        ov.inodes.detach(d0, b"f6")
        assert (d0.id, b"f6") not in ov.inodes.shed(keep=0)
        assert all(p != root.id for p, _ in ov.inodes.shed(keep=0))  # d0 itself never
        for n in files:
            ov.inodes.forget(n.id, 1)
        assert len(ov.inodes) == 2
    finally:
        ov.destroy()


def _walk_all(ov, names):
    """What the kernel does on a walk: look each directory up, list it (READDIRPLUS gives
    it a node per entry) and keep a reference to everything."""
    root = ov.inodes.root
    for name in names:
        d, _ = ov.lookup(root, name)
        ov.inodes.ref(d)
        fh = ov.opendir(d)
        for _, entry in ov.readdir(fh, 0):
            if entry.node is not None:
                ov.inodes.ref(entry.node)
        ov.release(fh)


def test_memory_per_node_of_a_large_walk(tmp_path):
    """The node table's memory per live node, with most node fds given up as on a walk far
    beyond RLIMIT_NOFILE (scripts/bench --memwalk: the server must stay under 150 MiB on 1M
    entries with the 200k node budget; docs/performance.md). Counted by tracemalloc: the
    node, its name, its id and st_ino ints, the record of its given-up fd and the table's
    maps; the listing cache is dropped first (it is bounded on its own). The nodes took
    ~600 bytes each before the compact records, 128-byte nodes and the chunked id map;
    now ~370."""
    lower = tmp_path / "lower"
    dirs = [b"d%d" % d for d in range(3)]
    for d in dirs:
        (lower / d.decode()).mkdir(parents=True)
        for f in range(1000):
            os.mknod(lower / d.decode() / f"f{f:04d}", 0o100644)
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    core = build_core([lower], tmp_path / "upper", tmp_path / "work", max_nodes=0)
    ov = core.view
    try:
        ov.inodes.fd_cap = 100  # most nodes give their fd up
        before_nodes = len(ov.inodes)
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            _walk_all(ov, dirs)
            ov.listings.changed()
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        nodes = len(ov.inodes) - before_nodes
        assert nodes == 3003 and ov.inodes.held <= 100
        assert sum(1 for n in ov.inodes if n.gone is not None) >= 2900
        assert used / nodes < 450, f"{used / nodes:.0f} bytes per node"
    finally:
        core.destroy()


def test_id_map_gives_chunks_back(tmp_path):
    """The table's id map (chunks of consecutive ids) frees what the kernel forgot: after
    forgetting a 3,000-node walk only the root's chunk is left, and every node is still
    found by its id while it lives."""
    lower = tmp_path / "lower"
    dirs = [b"d%d" % d for d in range(3)]
    for d in dirs:
        (lower / d.decode()).mkdir(parents=True)
        for f in range(1000):
            (lower / d.decode() / f"f{f}").write_bytes(b"")
    ov = build_core([lower]).view
    try:
        _walk_all(ov, dirs)
        nodes = list(ov.inodes)
        assert len(nodes) == len(ov.inodes) == 3004
        assert all(ov.inodes[n.id] is n and ov.inodes.get(n.id) is n for n in nodes)
        for n in reversed(nodes):
            if n.id != ROOT_ID:
                ov.inodes.forget(n.id, 1)
        assert len(ov.inodes) == 1 and list(ov.inodes) == [ov.inodes.root]
        assert ov.inodes.get(nodes[-1].id) is None
        assert len(ov.inodes._chunks) == 1
    finally:
        ov.destroy()
