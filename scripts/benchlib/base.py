"""What every workload shares: the context (layers, sizes, tools, per-impl state) and
the sample protocol. A sample is ``prepare`` (untimed: remount/prime/warm-up/set-up),
``run`` (timed, returns the value and the seconds it took), ``check`` (untimed sanity:
raises SanityError), ``after`` (untimed clean-up). File-system work happens in this
process through plain ``os`` calls (no Python-level caching is involved) or in fresh
subprocesses (tar, rm, fio, the import run).
"""

from __future__ import annotations

import os
import shutil
import time

from .impls import Impl
from .layers import Layers, leaf_dirs, leaf_files
from .util import SanityError, cache_drops


class Ctx:
    """What the workloads share: layers, sizes, tools, per-impl state, notes."""

    def __init__(self, layers: Layers, log):
        self.layers, self.sizes, self.log = layers, layers.sizes, log
        self.meta = layers.meta
        self.fio = shutil.which("fio")
        self.leaves = leaf_dirs(self.sizes)
        self.small = [f for leaf in self.leaves for f in leaf_files(leaf)]
        self.state: dict[tuple, object] = {}
        self.primed: dict[tuple, tuple] = {}
        self.profiler = None  # benchlib.profile.Profiler with --profile

    def prime_once(self, key: tuple, fn) -> None:
        """Run *fn* (re-read lower data) once per *key*, and again whenever the host
        dropped caches since."""
        if self.primed.get(key) != cache_drops():
            fn()
            self.primed[key] = cache_drops()


class Workload:
    name = "?"
    unit = "s"  # "s" (lower is better), "MiB/s" or "IOPS" (higher is better)
    group = "read"  # "read" (read/metadata) or "write"
    copyup = False  # skipped for native (would change the lowers through hard links)
    cold = False  # remount the overlay and prime the lower data before each sample
    warm_key = None  # the cache this workload warms (cold) or needs warm (warm)
    redoable = True  # may be repeated after a host cache drop
    depends = None  # the workload whose leftovers this one consumes (same rep)

    def reps(self, ctx: Ctx) -> int:
        return ctx.sizes.reps

    def skip(self, ctx: Ctx, impl: Impl) -> str | None:
        if self.copyup and not impl.overlay:
            return "copy-up: not applicable without an overlay"
        return None

    def prime(self, ctx: Ctx) -> None:
        """Re-read the lower data directly (the lower fs caches are warm, the overlay's not)."""

    def prepare(self, ctx: Ctx, impl: Impl, rep: int) -> None:
        if self.cold:
            impl.remount()
            ctx.prime_once((self.name, rep), lambda: self.prime(ctx))
        elif self.warm_key and self.warm_key not in impl.warm:
            self.run(ctx, impl, rep)  # one untimed pass warms the caches
        if self.warm_key:
            impl.warm.add(self.warm_key)

    def run(self, ctx: Ctx, impl: Impl, rep: int) -> tuple[float, float]:
        raise NotImplementedError

    def check(self, ctx: Ctx, impl: Impl, rep: int, result) -> None:
        pass

    def after(self, ctx: Ctx, impl: Impl, rep: int) -> None:
        pass


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _expect(cond: bool, impl: Impl, what: str) -> None:
    if not cond:
        raise SanityError(f"{impl.name}: {what}")


def _walk(top: str) -> int:
    n = 0
    join, lstat = os.path.join, os.lstat
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            lstat(join(root, name))
            n += 1
    return n
