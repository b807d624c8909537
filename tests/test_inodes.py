"""Node lifetime without FUSE: the Overlay and its InodeTable on real layers.

The kernel's FORGETs must free every node it no longer holds, so a walk of any tree
keeps memory bounded; readdir entries the kernel did not take are dropped at once.
"""

from __future__ import annotations

import os

from helpers.core import build_core


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
