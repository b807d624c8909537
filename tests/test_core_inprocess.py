"""The filesystem core in process: no FUSE, no kernel overlay, no root needed.

The core is built on tmp dirs exactly as a mount builds it (``mount.build_overlay``, via
``helpers.core.build_core``) and its methods are called directly, the way
tests/test_inodes.py works. The expectations are the kernel's, as the FUSE+kernel
comparisons established them (tests/test_write_rename.py, tests/test_write_whiteout.py):
the rename flag matrix (plain, RENAME_NOREPLACE, RENAME_EXCHANGE, across lower, upper and
merged directories, onto whiteouts, EXDEV for directories with lower content), whiteouts
(unlink and rmdir of lower names leave char 0/0 whiteouts; a create over a whiteout
replaces it) and opaque directories (mkdir over a whiteout; a pure-upper directory renamed
into a merged one). Cases the VFS decides before a filesystem is asked (a file renamed
over a directory, say) are not the core's and are left to the kernel tests.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio

from helpers.core import build_core
from overlayfs_py import _sys
from overlayfs_py.core import Core
from overlayfs_py.inodes import Node
from overlayfs_py.overlay import Caller

CALLER = Caller(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid(), umask=0o022)


class Mount:
    """A writable core over two lower layers, with path helpers."""

    def __init__(self, core: Core, root: Path) -> None:
        self.core = core
        self.ov = core.view
        self.w = core.writes
        self.upper = root / "upper"
        self.work = root / "wd" / "work"
        self.names = core.view.names

    def node(self, path: str) -> Node:
        """Look *path* up component by component, referencing each node as the kernel would."""
        node = self.ov.inodes.root
        for part in [p for p in path.split("/") if p]:
            node, _ = self.ov.lookup(node, part.encode())
            self.ov.inodes.ref(node)
        return node

    def split(self, path: str) -> tuple[Node, bytes]:
        parent, _, name = path.rpartition("/")
        return self.node(parent), name.encode()

    def exists(self, path: str) -> bool:
        try:
            self.node(path)
        except FileNotFoundError:
            return False
        return True

    def read(self, path: str) -> bytes:
        fh = trio.run(self.ov.open, self.node(path), os.O_RDONLY, CALLER)
        try:
            return self.ov.read(fh, 0, 1 << 16)
        finally:
            self.ov.release(fh)

    def listdir(self, path: str) -> list[str]:
        fh = self.ov.opendir(self.node(path))
        try:
            return sorted(e.name.decode() for _, e in self.ov.readdir(fh, 0) if e.name not in (b".", b".."))
        finally:
            self.ov.release(fh)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        p, n = self.split(old)
        np, nn = self.split(new)
        trio.run(self.w.rename, p, n, np, nn, flags)

    def remove(self, path: str, is_dir: bool = False) -> None:
        self.w.remove(*self.split(path), is_dir=is_dir)

    def create(self, path: str, data: bytes = b"") -> None:
        p, n = self.split(path)
        _node, _st, fh = self.w.create(p, n, 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, CALLER)
        try:
            self.w.write(fh, 0, data)
        finally:
            self.ov.release(fh)

    def mkdir(self, path: str) -> None:
        self.w.mkdir(*self.split(path), 0o755, CALLER)

    # --- the upper layer, as the kernel would leave it ------------------------------------

    def is_whiteout(self, path: str) -> bool:
        try:
            st = os.lstat(self.upper / path)
        except FileNotFoundError:
            return False
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    def in_upper(self, path: str) -> bool:
        return os.path.lexists(self.upper / path)

    def opaque(self, path: str) -> bytes | None:
        try:
            return os.getxattr(self.upper / path, self.names.opaque, follow_symlinks=False)
        except OSError:
            return None

    def origin(self, path: str) -> bool:
        try:
            os.getxattr(self.upper / path, self.names.origin, follow_symlinks=False)
        except OSError:
            return False
        return True


def _write(root: Path, files: dict[str, bytes | None]) -> None:
    """*files*: path -> content (None: a directory)."""
    for rel, data in files.items():
        p = root / rel
        if data is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


L1 = {  # the top lower
    "md/top": b"top\n",  # md: merged (l1 + l2)
    "r/over_top": b"in the top lower\n",
}
L2 = {
    "r/a": b"a\n",
    "r/b": b"b\n",
    "r/c": b"c\n",
    "r/d": b"d\n",
    "r/e": b"e\n",
    "r/x1": b"x1\n",
    "r/x2": b"x2\n",
    "r/w": b"w\n",
    "r/over_top": b"hidden\n",
    "sub/deep": None,
    "ld/f": b"in lower dir\n",
    "ld/sub/g": b"g\n",
    "ld2": None,
    "md/bottom": b"bottom\n",
    "em/bottom": b"b\n",
    "em/sub/s": b"s\n",
    "ne/bottom": b"b\n",
    "f": b"lower file\n",
    "re": b"to be deleted and re-created\n",
    "redir/old": b"old\n",
}


@pytest.fixture
def m(tmp_path):
    for d, files in (("l1", L1), ("l2", L2)):
        (tmp_path / d).mkdir()
        _write(tmp_path / d, files)
    (tmp_path / "upper").mkdir()
    core = build_core([tmp_path / "l1", tmp_path / "l2"], tmp_path / "upper", tmp_path / "wd")
    mount = Mount(core, tmp_path)
    try:
        yield mount
        assert os.listdir(mount.work) == [], "work/ keeps no temporary"
    finally:
        core.destroy()


def _err(fn, *args, **kw) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args, **kw)
    return exc.value.errno


# --- rename: files ------------------------------------------------------------------------


def test_rename_lower_file_copies_up_and_leaves_a_whiteout(m):
    m.rename("r/a", "r/a2")
    assert m.read("r/a2") == b"a\n" and not m.exists("r/a")
    assert m.is_whiteout("r/a") and m.origin("r/a2")  # the copy-up records its lower origin
    m.rename("r/a2", "sub/deep/a3")  # into a lower-only dir: copied up on the way
    assert m.read("sub/deep/a3") == b"a\n" and not m.exists("r/a2")
    assert not m.in_upper("r/a2")  # a pure-upper name leaves nothing behind


def test_rename_over_a_lower_file(m):
    m.rename("r/b", "r/c")
    assert m.read("r/c") == b"b\n" and m.is_whiteout("r/b")
    m.rename("r/w", "r/over_top")  # over a name the top lower serves
    assert m.read("r/over_top") == b"w\n" and m.is_whiteout("r/w")


def test_rename_noreplace(m):
    assert _err(m.rename, "r/d", "r/e", _sys.RENAME_NOREPLACE) == errno.EEXIST
    assert m.read("r/d") == b"d\n" and m.read("r/e") == b"e\n"
    assert not m.in_upper("r/d") and not m.in_upper("r/e")  # nothing copied up
    m.rename("r/d", "r/d2", _sys.RENAME_NOREPLACE)
    assert m.read("r/d2") == b"d\n" and m.is_whiteout("r/d")


def test_rename_exchange_two_lower_files(m):
    m.rename("r/x1", "r/x2", _sys.RENAME_EXCHANGE)
    assert m.read("r/x1") == b"x2\n" and m.read("r/x2") == b"x1\n"
    for p in ("r/x1", "r/x2"):  # both copied up and swapped: no whiteout
        st = os.lstat(m.upper / p)
        assert stat.S_ISREG(st.st_mode)
    assert _err(m.rename, "r/x1", "r/nope", _sys.RENAME_EXCHANGE) == errno.ENOENT


def test_rename_flags_refused(m):
    assert _err(m.rename, "r/e", "r/e2", _sys.RENAME_WHITEOUT) == errno.EINVAL
    both = _sys.RENAME_NOREPLACE | _sys.RENAME_EXCHANGE
    assert _err(m.rename, "r/e", "r/e2", both) == errno.EINVAL
    assert not m.in_upper("r/e")


def test_rename_onto_a_whiteout(m):
    """A pure-upper file replaces a whiteout; a lower file swaps with it (its old name
    keeps a whiteout); a pure-upper dir swaps with it and the whiteout goes."""
    m.remove("f")
    assert m.is_whiteout("f")
    m.create("pu", b"pure upper\n")
    m.rename("pu", "f")
    assert m.read("f") == b"pure upper\n" and not m.is_whiteout("f")
    assert not m.in_upper("pu")
    m.remove("r/c")
    m.rename("r/b", "r/c")  # lower onto a whiteout: RENAME_EXCHANGE with it
    assert m.read("r/c") == b"b\n" and m.is_whiteout("r/b")
    m.remove("redir/old")
    m.remove("redir", is_dir=True)
    m.mkdir("ud")
    m.rename("ud", "redir")
    assert stat.S_ISDIR(os.lstat(m.upper / "redir").st_mode) and not m.in_upper("ud")
    assert m.listdir("redir") == []


# --- rename: directories ------------------------------------------------------------------


def test_rename_pure_upper_dir(m):
    m.mkdir("ud")
    m.mkdir("ud/child")
    m.create("ud/child/f")
    m.rename("ud/child", "ud/child2")  # within a pure-upper dir: stays a plain dir
    assert m.opaque("ud/child2") is None and m.listdir("ud/child2") == ["f"]
    m.rename("ud/child2", "ud/child")
    m.rename("ud", "ud2")  # the root merges upper and lowers: made opaque (ovl_rename)
    assert m.listdir("ud2/child") == ["f"] and not m.exists("ud")
    assert m.opaque("ud2") == b"y" and m.opaque("ud2/child") is None
    m.rename("ud2", "md/ud3")  # into another merged dir
    assert m.opaque("md/ud3") == b"y" and m.listdir("md/ud3") == ["child"]


def test_rename_into_the_root_merged_dir_is_opaque(m):
    m.mkdir("sub/ud")  # sub: copied up, served by upper and l2 (merged)
    assert m.opaque("sub/ud") is None
    m.rename("sub/ud", "ud")
    assert m.opaque("ud") == b"y"


def test_rename_dirs_with_lower_content_exdev(m):
    assert _err(m.rename, "ld", "ld3") == errno.EXDEV
    assert _err(m.rename, "ld", "ld3", _sys.RENAME_NOREPLACE) == errno.EXDEV
    assert _err(m.rename, "md", "md2") == errno.EXDEV
    m.mkdir("empty")
    assert _err(m.rename, "ld", "empty") == errno.EXDEV
    assert _err(m.rename, "empty", "ld") == errno.ENOTEMPTY  # the target shows lower content
    m.mkdir("ux")
    assert _err(m.rename, "ux", "md", _sys.RENAME_EXCHANGE) == errno.EXDEV
    assert m.listdir("ld") == ["f", "sub"] and m.exists("empty") and m.exists("ux")


def test_rename_upper_dir_over_an_empty_lower_dir(m):
    """An empty lower-only dir can be replaced: its name keeps no lower content."""
    m.mkdir("ud")
    m.create("ud/f", b"x")
    m.rename("ud", "ld2")
    assert m.listdir("ld2") == ["f"] and not m.exists("ud")
    assert m.opaque("ld2") == b"y"  # the root is merged: the dir is made opaque


# --- whiteouts ----------------------------------------------------------------------------


def test_unlink_and_rmdir_of_lower_names_leave_whiteouts(m):
    m.remove("f")
    assert m.is_whiteout("f") and not m.exists("f")
    assert _err(m.remove, "f") == errno.ENOENT
    assert "f" not in m.listdir("")
    assert _err(m.remove, "ld", is_dir=True) == errno.ENOTEMPTY
    m.remove("ld/sub/g")
    m.remove("ld/sub", is_dir=True)
    assert m.is_whiteout("ld/sub")
    assert m.listdir("ld") == ["f"]


def test_pure_upper_removal_leaves_nothing(m):
    m.create("pu", b"x")
    m.remove("pu")
    assert not m.in_upper("pu")
    m.mkdir("pud")
    m.mkdir("pud/c")
    assert _err(m.remove, "pud", is_dir=True) == errno.ENOTEMPTY
    m.remove("pud/c", is_dir=True)
    m.remove("pud", is_dir=True)
    assert not m.in_upper("pud")


def test_rmdir_of_a_merged_dir_holding_only_whiteouts(m):
    assert _err(m.remove, "ne", is_dir=True) == errno.ENOTEMPTY
    m.remove("em/bottom")
    assert _err(m.remove, "em/sub", is_dir=True) == errno.ENOTEMPTY
    m.remove("em/sub/s")
    m.remove("em/sub", is_dir=True)
    assert m.listdir("em") == []
    m.remove("em", is_dir=True)
    assert m.is_whiteout("em") and not m.exists("em")


def test_create_over_a_whiteout(m):
    m.remove("re")
    assert m.is_whiteout("re")
    m.create("re", b"new\n")
    st = os.lstat(m.upper / "re")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644 & ~CALLER.umask
    assert m.read("re") == b"new\n" and "re" in m.listdir("")
    assert _err(m.create, "re") == errno.EEXIST


def test_a_whiteout_cannot_be_made_through_the_overlay(m):
    p, n = m.split("wh")
    assert _err(m.w.mknod, p, n, stat.S_IFCHR | 0o600, 0, CALLER) == errno.EPERM


# --- opaque directories -------------------------------------------------------------------


def test_mkdir_over_a_whiteout_is_opaque(m):
    m.remove("redir/old")
    m.remove("redir", is_dir=True)
    assert m.is_whiteout("redir")
    m.mkdir("redir")
    assert m.opaque("redir") == b"y" and m.listdir("redir") == []
    m.mkdir("fresh")  # no whiteout there: a plain new dir
    assert m.opaque("fresh") is None


def test_rm_r_then_mkdir_hides_the_lower_content(m):
    m.remove("ld/sub/g")
    m.remove("ld/sub", is_dir=True)
    m.remove("ld/f")
    m.remove("ld", is_dir=True)
    m.mkdir("ld")
    assert m.listdir("ld") == [] and m.opaque("ld") == b"y"
    assert not m.exists("ld/f")


# --- the callbacks wired by build_overlay ----------------------------------------------------


def test_copy_up_of_a_hard_link_tells_the_engine_its_st_ino_changed(tmp_path):
    """Copying up one name of a lower hard-link set breaks the link, and the kernel then
    reports the upper inode: the engine's attr_changed hears of that node (and only then);
    a file opened read-only before a copy-up reads the upper data (on_copied_up)."""
    for d in ("l1", "upper"):
        (tmp_path / d).mkdir()
    (tmp_path / "l1" / "a").write_bytes(b"lower\n")
    os.link(tmp_path / "l1" / "a", tmp_path / "l1" / "b")
    (tmp_path / "l1" / "single").write_bytes(b"one\n")
    changed: list[int] = []
    core = build_core([tmp_path / "l1"], tmp_path / "upper", tmp_path / "wd", attr_changed=changed.append)
    try:
        m = Mount(core, tmp_path)
        single = m.node("single")
        root = core.view.inodes.root
        trio.run(m.w.setattr, single, {"mode": 0o600}, None)
        assert changed == [root.id]  # one link: the st_ino stays the lower one (origin); the parent's ctime moved
        a = m.node("a")
        before = a.ino
        reader = trio.run(m.ov.open, a, os.O_RDONLY, CALLER)
        writer = trio.run(m.ov.open, a, os.O_WRONLY, CALLER)
        assert changed == [root.id, a.id, root.id] and a.ino != before == m.node("b").ino
        m.w.write(writer, 0, b"UPPER\n")
        assert m.ov.read(reader, 0, 100) == b"UPPER\n"  # the read-only fd followed the copy-up
        assert (tmp_path / "l1" / "a").read_bytes() == b"lower\n"
        m.ov.release(reader)
        m.ov.release(writer)
    finally:
        core.destroy()


def test_the_node_budget_asks_the_engine_to_drop_entries(tmp_path):
    (tmp_path / "l1").mkdir()
    for i in range(100):
        (tmp_path / "l1" / f"f{i}").write_bytes(b"")
    drops: list[list[tuple[int, bytes]]] = []
    core = build_core([tmp_path / "l1"], drop_entries=drops.append, max_nodes=64)
    try:
        ov, budget = core.view, core.budget
        assert budget.max_nodes == 64
        for i in range(80):
            node, _ = ov.lookup(ov.inodes.root, f"f{i}".encode())
            ov.inodes.ref(node)
            budget.check()
        assert drops, "over the budget, the engine was asked to drop entries"
        first = drops[0]
        assert first[0] == (ov.inodes.root.id, b"f0")  # the oldest file entries first
        assert len(first) == 65 - 64 * 4 // 5  # down to 80 % of the budget
    finally:
        core.destroy()


# --- read-only ----------------------------------------------------------------------------


def test_a_read_only_core_refuses_every_change(tmp_path):
    (tmp_path / "l1").mkdir()
    _write(tmp_path / "l1", {"f": b"x", "d": None})
    core = build_core([tmp_path / "l1"])
    try:
        ov, w = core.view, core.writes
        root = ov.inodes.root
        f, _ = ov.lookup(root, b"f")
        assert _err(lambda: ov.writable) == errno.EROFS
        assert _err(w.mkdir, root, b"n", 0o755, CALLER) == errno.EROFS
        assert _err(w.remove, root, b"f", False) == errno.EROFS
        assert _err(trio.run, w.rename, root, b"f", root, b"g", 0) == errno.EROFS
        assert _err(trio.run, ov.open, f, os.O_WRONLY, CALLER) == errno.EROFS
        fh = trio.run(ov.open, f, os.O_RDONLY, CALLER)
        assert ov.read(fh, 0, 10) == b"x"
        ov.release(fh)
    finally:
        core.destroy()


def test_write_opens_without_a_copy_up(tmp_path):
    """An open that copies nothing up needs no await (``Overlay.open_now``, which an engine
    calls inline): a read-only one, or a write open of an object already upper. A read-only
    overlay still refuses write opens of its upper files (EROFS), as ``open`` does."""
    for d in ("l1", "upper"):
        (tmp_path / d).mkdir()
    (tmp_path / "l1" / "low").write_bytes(b"low\n")
    (tmp_path / "upper" / "up").write_bytes(b"up\n")
    core = build_core([tmp_path / "l1"], tmp_path / "upper", tmp_path / "wd")
    try:
        m = Mount(core, tmp_path)
        low, up = m.node("low"), m.node("up")
        assert m.ov.open_copies_up(low, os.O_WRONLY) and m.ov.open_copies_up(low, os.O_RDONLY | os.O_TRUNC)
        assert not m.ov.open_copies_up(low, os.O_RDONLY) and not m.ov.open_copies_up(up, os.O_RDWR)
        fh = m.ov.open_now(up, os.O_WRONLY)
        m.w.write(fh, 0, b"UP")
        m.ov.release(fh)
        assert (tmp_path / "upper" / "up").read_bytes() == b"UP\n"
        with pytest.raises(IsADirectoryError):
            m.ov.open_now(m.node(""), os.O_RDONLY)
    finally:
        core.destroy()
    ro = build_core([tmp_path / "l1"], tmp_path / "upper", read_only=True)
    try:
        m = Mount(ro, tmp_path)
        up = m.node("up")
        for opener in (m.ov.open_now, lambda n, f: trio.run(m.ov.open, n, f, CALLER)):
            with pytest.raises(OSError) as exc:
                opener(up, os.O_WRONLY)
            assert exc.value.errno == errno.EROFS
        fh = m.ov.open_now(up, os.O_RDONLY)
        assert m.ov.read(fh, 0, 10) == b"UP\n"
        m.ov.release(fh)
    finally:
        ro.destroy()


def test_a_small_copy_up_needs_no_await(tmp_path):
    """A write open of a small lower file copies it up without awaiting
    (``Overlay.open_copying_now``, which the direct engine calls inline): ancestors first,
    data and origin as ``open`` would, and the engine's kernel listings dropped only where
    an entry changed (a copied-up directory and its parent, a broken hard link's parent;
    not a file's parent). A file too large for the inline path is left alone (None) for
    ``open``, which copies it up in a task."""
    from overlayfs_py.copyup import THREAD_THRESHOLD

    for d in ("l1", "upper"):
        (tmp_path / d).mkdir()
    _write(tmp_path / "l1", {"d/f": b"small\n", "big": b"x" * (THREAD_THRESHOLD + 1), "h1": b"linked\n"})
    os.link(tmp_path / "l1" / "h1", tmp_path / "l1" / "h2")
    stale: list[int] = []
    core = build_core([tmp_path / "l1"], tmp_path / "upper", tmp_path / "wd", listing_changed=stale.append)
    try:
        m = Mount(core, tmp_path)
        f, d, root = m.node("d/f"), m.node("d"), m.ov.inodes.root
        fh = m.ov.open_copying_now(f, os.O_WRONLY | os.O_APPEND)
        assert fh is not None and f.layer.is_upper and d.layer.is_upper
        m.w.write(fh, 6, b"!")
        m.ov.release(fh)
        assert (tmp_path / "upper" / "d" / "f").read_bytes() == b"small\n!"
        assert (tmp_path / "l1" / "d" / "f").read_bytes() == b"small\n"
        assert m.origin("d/f") and m.origin("d")
        assert sorted(stale) == sorted([root.id, d.id])  # the directory's; none for the file
        big = m.node("big")
        assert m.ov.open_copying_now(big, os.O_WRONLY) is None
        assert not big.layer.is_upper and not m.in_upper("big")
        fh = trio.run(m.ov.open, big, os.O_WRONLY, CALLER)
        m.ov.release(fh)
        assert big.layer.is_upper and os.path.getsize(tmp_path / "upper" / "big") == THREAD_THRESHOLD + 1
        stale.clear()
        fh = m.ov.open_copying_now(m.node("h1"), os.O_RDWR)
        assert fh is not None
        m.ov.release(fh)
        assert stale == [root.id]  # its d_ino changed (a broken hard link)
    finally:
        core.destroy()


def test_a_file_copy_up_drops_the_parents_cached_attributes(tmp_path):
    """The parent's times are put back after a copy-up, but the link moved its ctime (and
    a new entry can grow the upper directory: ext4 by a block, tmpfs with every entry): the
    engine hears of the parent after every file's copy-up (attr_changed), so a stat shows
    the ctime and size the kernel's overlay shows at once."""
    for d in ("l1", "upper"):
        (tmp_path / d).mkdir()
    names = [f"a-rather-long-file-name-to-fill-directory-blocks-{i:04d}" for i in range(150)]
    _write(tmp_path / "l1", {f"d/{n}": b"x" for n in names})
    changed: list[int] = []
    core = build_core([tmp_path / "l1"], tmp_path / "upper", tmp_path / "wd", attr_changed=changed.append)
    try:
        m = Mount(core, tmp_path)
        d = m.node("d")
        ctimes = set()
        for n in names:
            f = m.node(f"d/{n}")
            fh = m.ov.open_copying_now(f, os.O_WRONLY)
            assert fh is not None
            m.ov.release(fh)
            after = os.stat(tmp_path / "upper" / "d")
            ctimes.add(after.st_ctime_ns)
            assert after.st_mtime_ns == os.stat(tmp_path / "l1" / "d").st_mtime_ns
        assert len(ctimes) > 1  # the upper parent's ctime moved
        assert changed.count(d.id) == len(names)
    finally:
        core.destroy()
