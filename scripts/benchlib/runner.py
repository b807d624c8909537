"""The round-robin loop: workload by workload, repetition by repetition, over all
implementations (mounted at once; who goes first rotates), ``sync`` before each
sample, samples during which the host dropped caches redone (or noted)."""

from __future__ import annotations

import os
import threading
import time

from .impls import Impl
from .util import SanityError, abort_fuse, cache_drops
from .workloads import Ctx, Workload

MAX_REDO = 2
SAMPLE_TIMEOUT = 900  # a sample taking longer means a hung server: abort its FUSE connection


class Results:
    def __init__(self, impls: list[str], workloads: list[Workload]):
        self.impls = impls
        self.workloads = workloads
        self.samples: dict[str, dict[str, list[float]]] = {w.name: {} for w in workloads}
        self.seconds: dict[str, dict[str, list[float]]] = {w.name: {} for w in workloads}
        self.skipped: dict[str, dict[str, str]] = {w.name: {} for w in workloads}
        self.notes: list[str] = []
        self.rss: dict[str, dict] = {}
        self.error: str | None = None

    def add(self, w: str, impl: str, value: float, secs: float) -> None:
        self.samples[w].setdefault(impl, []).append(value)
        self.seconds[w].setdefault(impl, []).append(secs)


def _sample(ctx: Ctx, w: Workload, impl: Impl, rep: int, res: Results, log) -> None:
    for attempt in range(MAX_REDO + 1):
        w.prepare(ctx, impl, rep)
        os.sync()
        before = cache_drops()
        timer = threading.Timer(SAMPLE_TIMEOUT, _hung, (impl, w, log))
        timer.daemon = True
        timer.start()
        prof = ctx.profiler if impl.name.startswith("pyoverlay") else None
        pid = impl.server_pid() if prof else None
        if pid:
            prof.start(w.name if impl.name == "pyoverlay" else f"{w.name}.{impl.name}", pid)
        try:
            value, secs = w.run(ctx, impl, rep)
        finally:
            timer.cancel()
            if pid:
                prof.stop()
        dropped = cache_drops() != before
        w.check(ctx, impl, rep, value)
        w.after(ctx, impl, rep)
        if not dropped:
            break
        if not w.redoable or attempt == MAX_REDO:
            res.notes.append(
                f"{w.name} rep {rep + 1} {impl.name}: host dropped caches during the sample (kept: cannot be redone)"
            )
            break
        log(f"  {w.name} {impl.name}: host dropped caches during the sample, redoing it")
        if w.warm_key and not w.cold:
            impl.warm.discard(w.warm_key)  # warm it again before the redo
    res.add(w.name, impl.name, value, secs)


def _hung(impl: Impl, w: Workload, log) -> None:
    log(f"{w.name} {impl.name}: no progress for {SAMPLE_TIMEOUT} s; aborting its FUSE connection")
    abort_fuse(impl.merged)


def record_rss(impls: list[Impl], res: Results, key: str) -> None:
    for impl in impls:
        r = impl.rss_kib()
        if r is not None:
            res.rss.setdefault(impl.name, {})[key] = r


def run_all(ctx: Ctx, impls: list[Impl], workloads: list[Workload], res: Results, log, fmt) -> None:
    for wi, w in enumerate(workloads):
        active = []
        for impl in impls:
            why = w.skip(ctx, impl)
            if why:
                res.skipped[w.name][impl.name] = why
            else:
                active.append(impl)
        reps = w.reps(ctx)
        if reps < ctx.sizes.reps:
            res.notes.append(f"{w.name}: {reps} repetitions only (the layers have room for no more)")
        if w.depends in res.samples:  # consumes what that one left: as many reps, no more
            done = [len(v) for v in res.samples[w.depends].values()]
            if done and min(done) < reps:
                reps = min(done)
                res.notes.append(f"{w.name}: {reps} repetitions (as many as {w.depends} made)")
        used = {i.name: 0.0 for i in active}
        t_w = time.monotonic()
        for rep in range(reps):
            k = (rep + wi) % max(1, len(active))
            order = active[k:] + active[:k]
            for impl in order:
                n = len(res.samples[w.name].get(impl.name, []))
                try:
                    _sample(ctx, w, impl, rep, res, log)
                except SanityError:
                    raise
                except Exception as exc:  # an implementation failed the operation itself
                    raise SanityError(f"{impl.name}: {w.name} failed: {exc!r}") from exc
                if len(res.samples[w.name].get(impl.name, [])) > n:
                    used[impl.name] += res.seconds[w.name][impl.name][-1]
            line = "  ".join(
                f"{i.name} {fmt(res.samples[w.name][i.name][-1], w.unit)}"
                for i in active
                if res.samples[w.name].get(i.name)
            )
            log(f"{w.name:17s} rep {rep + 1}/{reps}: {line}")
            if rep + 1 < reps and max(used.values(), default=0) >= ctx.sizes.cap_s:
                res.notes.append(
                    f"{w.name}: stopped after {rep + 1} repetition{'s' if rep else ''} "
                    f"({max(used.values()):.0f} s on one implementation)"
                )
                break
        log(f"{'':17s} ({time.monotonic() - t_w:.1f} s)")
        if w.name in ("walk_cold", "walk_warm"):
            record_rss(impls, res, "after_walks")
    record_rss(impls, res, "end")
