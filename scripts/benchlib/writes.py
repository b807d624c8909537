"""The write workloads: creates, unlinks, whiteouts, copy-ups, big writes, untar, rm -r,
the rename of a large lower directory."""

from __future__ import annotations

import errno
import os
import time

from .base import Workload, _expect, _timed
from .layers import MIB, PER_LEAF, leaf_files
from .util import read_file, run


def _create(paths: list[str]) -> None:
    data = b"x" * 99 + b"\n"
    for p in paths:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)


def _unlink(paths: list[str]) -> None:
    for p in paths:
        os.unlink(p)


def _new_names(ctx, impl, rep) -> list[str]:
    d = _create_dir(ctx, impl)
    return [os.path.join(d, f"n{rep}_{i:05d}") for i in range(ctx.sizes.create_n)]


def _create_dir(ctx, impl) -> str:
    """A small merged dir (it holds only leaf dirs): the last tree/dNN."""
    return os.path.join(impl.merged, "tree", f"d{ctx.sizes.tops - 1:02d}")


def _count_prefix(d: str, prefix: str) -> int:
    return sum(1 for n in os.listdir(d) if n.startswith(prefix))


class Create(Workload):
    name, group, redoable = "create_10k", "write", False

    def prepare(self, ctx, impl, rep):
        pass

    def run(self, ctx, impl, rep):
        _, secs = _timed(_create, _new_names(ctx, impl, rep))
        ctx.state[("created", impl.name, rep)] = True
        return secs, secs

    def check(self, ctx, impl, rep, result):
        n = _count_prefix(_create_dir(ctx, impl), f"n{rep}_")
        _expect(n == ctx.sizes.create_n, impl, f"{n} of {ctx.sizes.create_n} new files listed")


class Unlink(Workload):
    name, group, redoable, depends = "unlink_10k", "write", False, "create_10k"

    def prepare(self, ctx, impl, rep):
        if not ctx.state.get(("created", impl.name, rep)):
            _create(_new_names(ctx, impl, rep))
            ctx.state[("created", impl.name, rep)] = True

    def run(self, ctx, impl, rep):
        _, secs = _timed(_unlink, _new_names(ctx, impl, rep))
        ctx.state[("created", impl.name, rep)] = False
        return secs, secs

    def check(self, ctx, impl, rep, result):
        n = _count_prefix(_create_dir(ctx, impl), f"n{rep}_")
        _expect(n == 0, impl, f"{n} unlinked files still listed")


def _lower_snapshot(ctx, rels) -> dict:
    out = {}
    for rel in rels:
        for p in ctx.layers.lower_paths(rel):
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


class _LowerFiles(Workload):
    """Base of whiteout_1k and copyup_small_1k: each rep uses its own leaf dirs."""

    group, redoable, first_leaf = "write", False, 0
    count_attr = "?"

    def leaves_per_rep(self, ctx) -> int:
        return -(-getattr(ctx.sizes, self.count_attr) // PER_LEAF)

    def reps(self, ctx):
        k = self.leaves_per_rep(ctx)
        return max(0, min(ctx.sizes.reps, (len(ctx.leaves) // 2) // k))

    def files(self, ctx, rep) -> list[str]:
        k = self.leaves_per_rep(ctx)
        start = self.first_leaf * (len(ctx.leaves) // 2) + rep * k
        files = [f for leaf in ctx.leaves[start : start + k] for f in leaf_files(leaf)]
        return files[: getattr(ctx.sizes, self.count_attr)]

    def prepare(self, ctx, impl, rep):
        ctx.state[("lowers", self.name, impl.name, rep)] = _lower_snapshot(ctx, self.files(ctx, rep))

    def check_lowers(self, ctx, impl, rep):
        before = ctx.state.pop(("lowers", self.name, impl.name, rep))
        now = _lower_snapshot(ctx, self.files(ctx, rep))
        _expect(now == before, impl, f"{self.name} changed the lower layers")


class Whiteout(_LowerFiles):
    name, count_attr, first_leaf = "whiteout_1k", "whiteout_n", 0

    def run(self, ctx, impl, rep):
        _, secs = _timed(_unlink, [os.path.join(impl.merged, f) for f in self.files(ctx, rep)])
        return secs, secs

    def check(self, ctx, impl, rep, result):
        self.check_lowers(ctx, impl, rep)
        files = self.files(ctx, rep)
        for leaf in sorted({f.rsplit("/", 1)[0] for f in files}):
            left = set(os.listdir(os.path.join(impl.merged, leaf)))
            gone = {f.rsplit("/", 1)[1] for f in files if f.startswith(leaf + "/")}
            _expect(not (left & gone), impl, f"whiteouts do not hide {sorted(left & gone)[:3]}")
        for f in files[:20]:
            try:
                os.lstat(os.path.join(impl.merged, f))
                _expect(False, impl, f"{f} still there after unlink")
            except FileNotFoundError:
                pass


def _append_byte(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"!")
        os.close(fd)


def _check_appended(ctx, impl, rels) -> None:
    for rel in rels:
        size = os.lstat(ctx.layers.lower_paths(rel)[0]).st_size
        with open(os.path.join(impl.merged, rel), "rb") as f:
            f.seek(size - 1)
            tail = f.read()
        _expect(len(tail) == 2 and tail[1:] == b"!", impl, f"{rel}: append did not land")


class CopyupSmall(_LowerFiles):
    name, count_attr, first_leaf, copyup = "copyup_small_1k", "copyup_n", 1, True

    def run(self, ctx, impl, rep):
        _, secs = _timed(_append_byte, [os.path.join(impl.merged, f) for f in self.files(ctx, rep)])
        return secs, secs

    def check(self, ctx, impl, rep, result):
        self.check_lowers(ctx, impl, rep)
        _check_appended(ctx, impl, self.files(ctx, rep)[::25])


class CopyupBig(Workload):
    name, group, copyup, redoable = "copyup_big", "write", True, False

    def reps(self, ctx):
        return min(ctx.sizes.reps, ctx.sizes.n_cu)

    def prepare(self, ctx, impl, rep):
        rel = f"big/cu{rep}.bin"
        ctx.prime_once((self.name, rep), lambda: read_file(ctx.layers.lower_paths(rel)[0]))
        ctx.state[("lowers", self.name, impl.name, rep)] = _lower_snapshot(ctx, [rel])

    def run(self, ctx, impl, rep):
        _, secs = _timed(_append_byte, [os.path.join(impl.merged, f"big/cu{rep}.bin")])
        return secs, secs

    def check(self, ctx, impl, rep, result):
        rel = f"big/cu{rep}.bin"
        _expect(
            _lower_snapshot(ctx, [rel]) == ctx.state.pop(("lowers", self.name, impl.name, rep)),
            impl,
            "copy-up changed the lower file",
        )
        _expect(
            os.lstat(os.path.join(impl.merged, rel)).st_size == ctx.sizes.cu_mib * MIB + 1,
            impl,
            f"{rel} has the wrong size after append",
        )
        _check_appended(ctx, impl, [rel])

    def after(self, ctx, impl, rep):
        os.unlink(os.path.join(impl.merged, f"big/cu{rep}.bin"))  # frees the upper copy


class SeqWrite(Workload):
    name, unit, group = "seqwrite", "MiB/s", "write"

    def prepare(self, ctx, impl, rep):
        pass

    def path(self, impl, rep):
        return os.path.join(impl.merged, f"seqwrite{rep}.bin")

    def run(self, ctx, impl, rep):
        buf = os.urandom(MIB)
        t0 = time.perf_counter()
        fd = os.open(self.path(impl, rep), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(ctx.sizes.seqwrite_mib):
                os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        secs = time.perf_counter() - t0
        return ctx.sizes.seqwrite_mib / secs, secs

    def check(self, ctx, impl, rep, result):
        size = os.lstat(self.path(impl, rep)).st_size
        _expect(size == ctx.sizes.seqwrite_mib * MIB, impl, f"seqwrite file has {size} bytes")

    def after(self, ctx, impl, rep):
        try:
            os.unlink(self.path(impl, rep))
        except FileNotFoundError:
            pass


def _untar(ctx, d: str) -> None:
    os.mkdir(d)
    run(["tar", "-xf", ctx.layers.tarball, "-C", d], timeout=600)


class Untar(Workload):
    name, group, redoable = "untar", "write", False

    def prepare(self, ctx, impl, rep):
        pass

    def run(self, ctx, impl, rep):
        _, secs = _timed(_untar, ctx, os.path.join(impl.merged, f"untar{rep}"))
        return secs, secs

    def check(self, ctx, impl, rep, result):
        n = sum(len(f) for _, _, f in os.walk(os.path.join(impl.merged, f"untar{rep}")))
        _expect(n == ctx.meta["tar_files"], impl, f"untar produced {n} of {ctx.meta['tar_files']} files")


class RmTree(Workload):
    name, group, redoable, depends = "rm_tree", "write", False, "untar"

    def prepare(self, ctx, impl, rep):
        if not os.path.isdir(os.path.join(impl.merged, f"untar{rep}")):
            _untar(ctx, os.path.join(impl.merged, f"untar{rep}"))

    def run(self, ctx, impl, rep):
        _, secs = _timed(run, ["rm", "-rf", os.path.join(impl.merged, f"untar{rep}")])
        return secs, secs

    def check(self, ctx, impl, rep, result):
        try:
            os.lstat(os.path.join(impl.merged, f"untar{rep}"))
            _expect(False, impl, "rm -rf left the tree behind")
        except OSError as e:
            _expect(e.errno == errno.ENOENT, impl, f"rm_tree: {e}")


class RenameLowerDir(Workload):
    """``mv`` of a large lower directory (tree/dNN: subs x 100 small files) to a new name.
    Without ``redirect_dir=on`` the overlay answers EXDEV and mv copies the whole tree and
    removes the old one (whiteouts); with it, the rename is one copy-up of the directory
    and a redirect. Each rep moves another lower directory; it is moved back after
    (untimed), so its content stays where the other workloads look for it."""

    name, group, redoable, copyup = "rename_lower_dir", "write", False, True

    def reps(self, ctx):
        return max(0, min(ctx.sizes.reps, ctx.sizes.tops - 1))  # the last top is create_10k's

    def _paths(self, ctx, impl, rep) -> tuple[str, str]:
        return os.path.join(impl.merged, "tree", f"d{rep:02d}"), os.path.join(impl.merged, f"renamed{rep}")

    def prepare(self, ctx, impl, rep):
        src, _ = self._paths(ctx, impl, rep)  # earlier workloads may have removed some
        ctx.state[("rename_lower_dir", impl.name, rep)] = sum(len(f) for _, _, f in os.walk(src))

    def run(self, ctx, impl, rep):
        src, dst = self._paths(ctx, impl, rep)
        _, secs = _timed(run, ["mv", src, dst])
        return secs, secs

    def check(self, ctx, impl, rep, result):
        src, dst = self._paths(ctx, impl, rep)
        n = sum(len(files) for _, _, files in os.walk(dst))
        want = ctx.state.pop(("rename_lower_dir", impl.name, rep))
        _expect(not os.path.exists(src) and n == want, impl, f"mv left {n} of {want} files at the new name")

    def after(self, ctx, impl, rep):
        src, dst = self._paths(ctx, impl, rep)
        run(["mv", dst, src])


class ChownR(Workload):
    """``chown -R`` of a lower directory ``tree/dNN`` (subs x 100 small files), a new owner
    each time: what a container build's ``RUN chown -R`` does on an image. Every file is
    copied up: with its data by default, its metadata only with ``metacopy=on`` (kernel,
    pyoverlay). Each rep takes another lower directory (from the last: ``rename_lower_dir``
    takes them from the first); nothing is undone (the files stay copied up)."""

    name, group, redoable, copyup = "chown_r", "write", False, True

    def reps(self, ctx):
        return max(0, min(ctx.sizes.reps, ctx.sizes.tops - 1))  # the last top is create_10k's

    def _path(self, ctx, impl, rep) -> str:
        return os.path.join(impl.merged, "tree", f"d{ctx.sizes.tops - 2 - rep:02d}")

    def prepare(self, ctx, impl, rep):
        pass

    def run(self, ctx, impl, rep):
        _, secs = _timed(run, ["chown", "-R", f"{4242 + rep}:{4242 + rep}", self._path(ctx, impl, rep)])
        return secs, secs

    def check(self, ctx, impl, rep, result):
        bad = [
            os.path.join(d, f)
            for d, _, files in os.walk(self._path(ctx, impl, rep))
            for f in files
            if os.lstat(os.path.join(d, f)).st_uid != 4242 + rep
        ]
        _expect(not bad, impl, f"chown -R left {len(bad)} files with another owner")
