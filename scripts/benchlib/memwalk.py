"""``scripts/bench --memwalk N``: the server's memory on a huge tree.

Builds a lower layer of N entries (dirs of 1,000 empty files, 50 such dirs per
top-level dir), mounts it with a fresh upper, walks it with ``os.walk`` + ``lstat``
and reports the server's peak RSS (VmHWM of /proc/PID/status).
"""

from __future__ import annotations

import json
import os
import stat
import time
import types

from .base import _walk
from .impls import CLASSES, is_pyoverlay
from .report import RSS_TARGET_MIB
from .util import SanityError, rmtree

PER_DIR, DIRS_PER_TOP = 1000, 50


def build_tree(root: str, n: int, log) -> None:
    os.makedirs(root)
    made, t = 0, 0
    mode = stat.S_IFREG | 0o644
    while made < n:
        top = os.path.join(root, f"t{t:04d}")
        os.mkdir(top)
        made += 1
        for s in range(DIRS_PER_TOP):
            if made >= n:
                break
            d = os.path.join(top, f"s{s:02d}")
            os.mkdir(d)
            made += 1
            for i in range(min(PER_DIR, n - made)):
                os.mknod(os.path.join(d, f"f{i:04d}"), mode)
                made += 1
        t += 1
        if t % 20 == 0:
            log(f"memwalk: {made} of {n} entries made")


def prepare_tree(base: str, n: int, keep: bool, log) -> str:
    root = os.path.join(base, f"memwalk-{n}")
    stamp = os.path.join(root, ".complete")
    if keep and os.path.exists(stamp):
        log(f"memwalk: reusing {root}")
        return root
    rmtree(root)
    t0 = time.monotonic()
    build_tree(os.path.join(root, "lower"), n, log)
    with open(stamp, "w") as f:
        f.write(json.dumps({"entries": n}))
    log(f"memwalk: {n} entries built in {time.monotonic() - t0:.1f} s")
    return root


def run_memwalk(base: str, run_dir: str, n: int, impl_names: list[str], keep: bool, log, register) -> dict:
    """Walk the tree through each implementation (pyoverlay by default); *register* is
    told every implementation so the caller can always unmount it."""
    root = prepare_tree(base, n, keep, log)
    layers = types.SimpleNamespace(lowers=[os.path.join(root, "lower")])
    out = {"entries": n, "target_mib": RSS_TARGET_MIB, "impls": {}}
    for name in impl_names:
        impl = CLASSES[name](layers, run_dir, log)
        register(impl)
        impl.mount()
        rss0 = impl.rss_kib()
        os.sync()
        t0 = time.perf_counter()
        seen = _walk(impl.merged)
        secs = time.perf_counter() - t0
        rss = impl.rss_kib()
        impl.unmount()
        if seen != n:
            raise SanityError(f"{name}: memwalk saw {seen} entries, expected {n}")
        peak = rss["VmHWM"] / 1024
        r = {
            "walk_s": secs,
            "peak_rss_mib": peak,
            "rss_after_walk_mib": rss["VmRSS"] / 1024,
            "rss_after_mount_mib": rss0["VmRSS"] / 1024 if rss0 and rss0["VmRSS"] else None,
        }
        if is_pyoverlay(name):
            r["ok"] = peak < RSS_TARGET_MIB
        out["impls"][name] = r
        log(
            f"memwalk {name}: {n} entries walked in {secs:.1f} s, server peak RSS {peak:.1f} MiB"
            + (f" (target < {RSS_TARGET_MIB} MiB: {'ok' if r.get('ok') else 'MISSED'})" if is_pyoverlay(name) else "")
        )
    if not keep:
        rmtree(root)
    return out


def table(mw: dict) -> str:
    lines = [
        f"**memwalk: os.walk + lstat of {mw['entries']:,} entries (one lower, fresh upper)**",
        "",
        "| implementation | walk | server RSS after mount | after walk | peak (VmHWM) | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in mw["impls"].items():
        after_mount = f"{r['rss_after_mount_mib']:.1f} MiB" if r.get("rss_after_mount_mib") else "-"
        target = "" if "ok" not in r else f"< {mw['target_mib']} MiB: {'ok' if r['ok'] else '**MISSED**'}"
        lines.append(
            f"| {name} | {r['walk_s']:.1f} s | {after_mount} | {r['rss_after_walk_mib']:.1f} MiB "
            f"| {r['peak_rss_mib']:.1f} MiB | {target} |"
        )
    return "\n".join(lines)
